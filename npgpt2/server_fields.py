"""The fields of a request body, checked: each bad value is a `BadRequest` whose one-line
message names the field and says what it must be (the server answers it with a 400)."""
import json
import math
from http import HTTPStatus

from .chat import BOT, USER
from .errors import Npgpt2Error
from .sampling import check_temperature

ROLES = {"user": USER, "assistant": BOT, "bot": BOT}
SAMPLING_FIELDS = ("length", "temperature", "top_k", "top_p", "seed", "truncate", "stream")


class BadRequest(Exception):
    """A client error; str(e) is the one-line message sent back as JSON. param: the field it
    is about (OpenAI's error object names it), code: OpenAI's machine-readable code."""

    def __init__(self, message, status=HTTPStatus.BAD_REQUEST, param=None, code=None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


def shown(v, limit=40):
    """v for an error message, cut short. Lists and objects are named, not printed: printing
    one nested 1000 deep would itself raise RecursionError."""
    if isinstance(v, list):
        return "a list"
    if isinstance(v, dict):
        return "an object"
    text = json.dumps(v)
    return text if len(text) <= limit else text[:limit] + "..."


def integer(body, key, default, lo, hi, nullable=False):
    v = body.get(key, default)
    if v is None and nullable:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise BadRequest(f'"{key}" must be an integer from {lo} to {hi}, got {shown(v)}', param=key)
    return v


def number(body, key, default, lo, hi, lo_open=False):
    v = body.get(key, default)
    # compared before math.isfinite, which raises OverflowError for an int beyond float range
    ok = (isinstance(v, (int, float)) and not isinstance(v, bool)
          and (lo < v if lo_open else lo <= v) and v <= hi and math.isfinite(v))
    if not ok:
        span = f"{'above' if lo_open else 'from'} {lo} to {hi}"
        raise BadRequest(f'"{key}" must be a number {span}, got {shown(v)}', param=key)
    return float(v)


def string(body, key, default, max_chars, nullable=False, nonempty=False):
    v = body.get(key, default)
    if v is None and nullable:
        return None
    if not isinstance(v, str) or len(v) > max_chars or (nonempty and not v):
        size = f"{'a non-empty string' if nonempty else 'a string'} of at most {max_chars} characters"
        got = "" if isinstance(v, str) and v else f", got {shown(v)}"
        raise BadRequest(f'"{key}" must be {size}{got}', param=key)
    return v


def check_known(body, allowed):
    """A misspelt field is reported, not ignored."""
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise BadRequest(f'unknown field "{shown(unknown[0])[1:-1]}" (allowed: {", ".join(allowed)})',
                         param=unknown[0])


def temperature(body):
    """0 is greedy; at most 100. The rule is --temperature's (`sampling.check_temperature`):
    one so small that logit / temperature overflows also samples greedily."""
    t = number(body, "temperature", 1.0, 0, 100)
    try:
        check_temperature(t, '"temperature"')
    except Npgpt2Error as e:
        raise BadRequest(str(e)) from None
    return t


def parse_options(body, limits, n_vocab, default_length, allowed):
    """The sampling options of a request body (a dict), checked. Raises BadRequest."""
    check_known(body, tuple(allowed) + SAMPLING_FIELDS)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest(f'"stream" must be true or false, got {shown(stream)}')
    return dict(
        length=integer(body, "length", min(default_length, limits.max_length), 1, limits.max_length),
        temperature=temperature(body),
        top_k=integer(body, "top_k", 0, 0, n_vocab),
        top_p=number(body, "top_p", 1.0, 0, 1, lo_open=True),
        seed=integer(body, "seed", None, 0, 2**63 - 1, nullable=True),
        truncate=string(body, "truncate", None, 1000, nullable=True) or None,
        stream=stream)


def parse_messages(body):
    """[{role, content}] -> [(USER|BOT, text)], the last from the user. Raises BadRequest."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest('"messages" must be a non-empty list of {"role", "content"} objects')
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) - {"role", "content"}:
            raise BadRequest(f'"messages"[{i}] must be an object with just "role" and "content"')
        role = m.get("role")
        if not isinstance(role, str) or role not in ROLES:  # a list or object is not hashable
            raise BadRequest(f'"messages"[{i}]["role"] must be "user" or "assistant", got {shown(role)}')
        if not isinstance(m.get("content"), str):
            raise BadRequest(f'"messages"[{i}]["content"] must be a string')
        turns.append((ROLES[role], m["content"].strip()))
    if turns[-1][0] != USER:
        raise BadRequest('the last of "messages" must have role "user"')
    return turns


def parse_explain(body, max_chars, n_layer, n_vocab):
    """{text, layer, top_k} of /v1/explain, checked -> dict of build_report's arguments."""
    check_known(body, ("text", "layer", "top_k"))
    return dict(text=string(body, "text", None, max_chars, nonempty=True),
                layer=integer(body, "layer", None, 0, n_layer - 1, nullable=True),
                top_k=integer(body, "top_k", 10, 1, min(n_vocab, 100)))
