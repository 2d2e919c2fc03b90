"""OpenAI-compatible endpoints of `npgpt2 serve`, beside its own API, for the clients that
speak OpenAI's HTTP API (the `openai` package, chat front-ends, editor plugins):

    GET  /v1/models            {"object": "list", "data": [{"id": <model name>, "object": "model", ...}]}
    POST /v1/completions       prompt (a string, a list of strings, a list of token ids or a
                               list of such lists), max_tokens (16), temperature, top_p, n, stop,
                               seed, logprobs (0-5 top alternatives), echo, stream, stream_options
    POST /v1/chat/completions  messages (system/developer, user, assistant), max_tokens or
                               max_completion_tokens, temperature, top_p, n, stop, seed, logprobs,
                               top_logprobs (0-20), stream, stream_options

Answers have OpenAI's shape (`choices`, `usage` token counts, `finish_reason` "stop" or
"length", or "timeout" at --timeout); a stream is `data: {chunk}` lines ending `data: [DONE]`.
Errors are OpenAI's object {"error": {"message", "type", "param", "code"}}, `param` naming the
field. Null means the default, as with OpenAI. `model` is required but any name is served by
the one model; `top_k` is accepted as an extension (vLLM's and llama.cpp's); `user`, `store`,
`metadata`, `service_tier` are ignored; penalties other than 0, logit_bias, suffix, best_of
other than n, tools and a response_format other than text are refused (400), as is any other
field ("Unrecognized request argument"). Log-probabilities are the model's own (softmax of
the raw logits, before temperature or top-k/top-p). A chat is rendered as chat.py's transcript
with the server's tags and system text (`chat_template`), and a completion ends at
<|endoftext|> as OpenAI's do.
"""
import functools
import secrets
import time

from .chat import BOT, USER, build_prompt, header_ids, stop_strings
from .errors import Npgpt2Error
from .sampling import TextStream
from .server_fields import BadRequest, integer, number, shown
from .server_http import answer_json, answer_stream
from .server_worker import Generation, Job

ROUTES = ("/v1/models", "/v1/completions", "/v1/chat/completions")
COMMON = ("model", "max_tokens", "temperature", "top_p", "top_k", "n", "stop", "seed", "stream", "stream_options",
          "presence_penalty", "frequency_penalty", "logit_bias", "user", "logprobs")
COMPLETION_FIELDS = COMMON + ("prompt", "echo", "best_of", "suffix")
CHAT_FIELDS = COMMON + ("messages", "top_logprobs", "max_completion_tokens", "response_format", "tools",
                        "tool_choice", "parallel_tool_calls", "store", "metadata", "service_tier")
CHAT_ROLES = {"system": None, "developer": None, "user": USER, "assistant": BOT}
MAX_STOPS = 4  # OpenAI's limit


def add_routes(app):
    """Give a server.App the OpenAI routes."""
    app.gets["/v1/models"] = functools.partial(models, app)
    app.jobs["/v1/completions"] = functools.partial(completion_job, app)
    app.jobs["/v1/chat/completions"] = functools.partial(chat_job, app)


def error_object(status, message, param=None, code=None):
    """OpenAI's error body; `type` from the status as OpenAI's API uses them."""
    status = int(status)
    kind = ("rate_limit_error" if status == 429 else "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def models(app):
    created = int(app.model.source_dir.stat().st_mtime) if app.model.source_dir else 0
    return {"object": "list", "data": [{"id": app.model_name, "object": "model", "created": created,
                                        "owned_by": "npgpt2"}]}


def chat_template(app):
    """(user_tag, bot_tag, system) of the transcript: the server's, which come from the model
    folder's chat.json when it has one (chat.read_template), or its flags."""
    if app.chat_refusal:  # the model's vocabulary cannot spell the tags (App)
        raise BadRequest(app.chat_refusal, param="messages")
    return app.user_tag, app.bot_tag, app.system


# ---------------------------------------------------------------- request fields
def flag(body, key, default=False):
    v = body.get(key, default)
    if not isinstance(v, bool):
        raise BadRequest(f'"{key}" must be true or false, got {shown(v)}', param=key)
    return v


def refuse_unless(ok, key, what):
    if not ok:
        raise BadRequest(f'"{key}": {what} is not supported by this server', param=key)


def common_fields(app, body, allowed):
    """The fields both endpoints share, checked -> dict. Null values are dropped first."""
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise BadRequest(f"Unrecognized request argument supplied: {shown(unknown[0])[1:-1]}", param=unknown[0])
    body = {k: v for k, v in body.items() if v is not None}
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise BadRequest('you must provide a "model" (a string; this server has one model: GET /v1/models)',
                         param="model")
    o = dict(body=body, temperature=number(body, "temperature", 1.0, 0, 2), top_p=number(body, "top_p", 1.0, 0, 1),
             top_k=integer(body, "top_k", 0, 0, app.n_vocab), n=integer(body, "n", 1, 1, app.limits.max_batch),
             seed=integer(body, "seed", None, 0, 2**63 - 1, nullable=True), stream=flag(body, "stream"))
    if o["top_p"] == 0:  # the smallest nucleus: the most likely token
        o["temperature"], o["top_p"] = 0.0, 1.0
    for key in ("presence_penalty", "frequency_penalty"):
        refuse_unless(number(body, key, 0.0, -2, 2) == 0, key, "a penalty other than 0")
    bias = body.get("logit_bias", {})
    if not isinstance(bias, dict):
        raise BadRequest(f'"logit_bias" must be an object, got {shown(bias)}', param="logit_bias")
    refuse_unless(not bias, "logit_bias", "a non-empty logit_bias")
    if not isinstance(body.get("user", ""), str):
        raise BadRequest('"user" must be a string', param="user")
    options = body.get("stream_options", {})
    if not isinstance(options, dict) or set(options) - {"include_usage"} or (options and not o["stream"]):
        raise BadRequest('"stream_options" must be {"include_usage": true|false}, with "stream": true',
                         param="stream_options")
    o["include_usage"] = flag(options, "include_usage") if options else False
    o["stops"] = stop_list(body.get("stop"))
    return o


def stop_list(stop):
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if (not isinstance(stops, list) or not 1 <= len(stops) <= MAX_STOPS
            or not all(isinstance(s, str) and 0 < len(s) <= 1000 for s in stops)):
        raise BadRequest(f'"stop" must be a string or a list of 1 to {MAX_STOPS} non-empty strings, got {shown(stop)}',
                         param="stop")
    return stops


def check_budget(app, choices, max_tokens, key="max_tokens"):
    """n x prompts x max_tokens within the server's limits, refused before any work."""
    L = app.limits
    if choices > L.max_batch:
        raise BadRequest(f'"n" x prompts = {choices} completions; this server decodes at most {L.max_batch} at once '
                         f"(--max_batch)", param="n")
    if choices * max_tokens > L.max_request_tokens:
        raise BadRequest(f'"n" x prompts x "{key}" = {choices * max_tokens} new tokens, more than the '
                         f"{L.max_request_tokens} one request may ask for (--max_request_tokens)", param=key)


def context_error(n_prompt, max_tokens, n_ctx, param):
    return BadRequest(f"This model's maximum context length is {n_ctx} tokens, however you requested "
                      f"{n_prompt + max_tokens} tokens ({n_prompt} in the prompt; {max_tokens} for the completion). "
                      f"Please reduce the prompt or the completion length.", param=param,
                      code="context_length_exceeded")


def prompt_list(app, body):
    """"prompt" -> a list of token-id lists (a string, strings, ids or lists of ids)."""
    from .server import encode_limited
    p = body.get("prompt", "")
    is_ids = (lambda x: isinstance(x, list) and bool(x)  # noqa: E731
              and all(isinstance(t, int) and not isinstance(t, bool) for t in x))
    if isinstance(p, str) or is_ids(p):
        p = [p]
    if not isinstance(p, list) or not p or not all(isinstance(x, str) or is_ids(x) for x in p):
        raise BadRequest('"prompt" must be a string, a list of strings, a list of token ids or a list of such lists',
                         param="prompt")
    if len(p) > app.limits.max_batch:
        raise BadRequest(f'"prompt" is {len(p)} prompts; this server decodes at most {app.limits.max_batch} at once',
                         param="prompt")
    out = []
    for x in p:
        if isinstance(x, str):
            ids = (encode_limited(app.tokenizer, x, app.limits.max_prompt_tokens, '"prompt"') if x
                   else [app.tokenizer.eot_token])
        else:
            if not all(0 <= t < app.n_vocab for t in x):
                raise BadRequest(f'"prompt": token ids must be from 0 to {app.n_vocab - 1}', param="prompt")
            ids = x
        out.append(ids)
    return out


# ---------------------------------------------------------------- the two POST endpoints
def completion_job(app, body):
    deadline = time.monotonic() + app.limits.timeout
    o = common_fields(app, body, COMPLETION_FIELDS)
    body = o["body"]
    refuse_unless(body.get("suffix", "") == "", "suffix", "a suffix")
    refuse_unless(body.get("best_of", o["n"]) == o["n"], "best_of", "best_of other than n")
    logprobs = integer(body, "logprobs", None, 0, 5, nullable=True)
    echo = flag(body, "echo")
    max_tokens = integer(body, "max_tokens", min(16, app.limits.max_length), 1, app.limits.max_length)
    prompts = prompt_list(app, body)
    check_budget(app, len(prompts) * o["n"], max_tokens)
    for ids in prompts:
        if len(ids) + max_tokens > app.n_ctx:
            raise context_error(len(ids), max_tokens, app.n_ctx, "prompt")
    o["length"] = max_tokens
    rows = [app.row(ids, o, i * o["n"] + j, logprobs=logprobs, prompt_logprobs=echo and logprobs is not None)
            for i, ids in enumerate(prompts) for j in range(o["n"])]
    echoes = [app.tokenizer.decode(ids) if echo else "" for ids in prompts for _ in range(o["n"])]
    gen = OpenAIGeneration(rows, o["stops"], False, app.model_name, o, sum(map(len, prompts)), echoes)
    return openai_job(gen, deadline, o)


def chat_job(app, body):
    deadline = time.monotonic() + app.limits.timeout
    o = common_fields(app, body, CHAT_FIELDS)
    body = o["body"]
    fmt = body.get("response_format", {"type": "text"})
    refuse_unless(fmt == {"type": "text"}, "response_format", "a response_format other than text")
    refuse_unless(not body.get("tools"), "tools", "tool calling")
    refuse_unless(body.get("tool_choice", "none") == "none", "tool_choice", "tool calling")
    logprobs = flag(body, "logprobs")
    top = integer(body, "top_logprobs", 0, 0, 20)
    if "top_logprobs" in body and not logprobs:
        raise BadRequest('"top_logprobs" needs "logprobs": true', param="top_logprobs")
    key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    default = min(app.n_ctx // 4, app.limits.max_length, max(1, app.limits.max_request_tokens // o["n"]))
    max_tokens = integer(body, key, default, 1, app.limits.max_length)
    check_budget(app, o["n"], max_tokens, key)
    system, turns = messages(body)
    user_tag, bot_tag, template_system = chat_template(app)
    system = "\n".join(s for s in (template_system.strip(), system) if s)  # the model folder's, then the request's
    try:  # chat.py's transcript, as `npgpt2 chat` builds it; only the newest messages that fit are encoded
        ids, dropped = build_prompt(app.tokenizer, turns, app.n_ctx, max_tokens, user_tag, bot_tag, system)
    except Npgpt2Error:
        raise context_error(len(header_ids(app.tokenizer, system)), max_tokens, app.n_ctx, "messages") from None
    o["length"] = max_tokens
    rows = [app.row(ids, o, j, logprobs=top if logprobs else None) for j in range(o["n"])]
    gen = OpenAIGeneration(rows, stop_strings(user_tag, bot_tag) + o["stops"], True, app.model_name, o, len(ids))
    return openai_job(gen, deadline, o)


def messages(body):
    """"messages" -> (system text, [(USER|BOT, text)]); the last turn must be the user's."""
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise BadRequest('"messages" must be a non-empty list of {"role", "content"} objects', param="messages")
    system, turns = [], []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or set(m) - {"role", "content", "name"}:
            raise BadRequest(f'"{where}" must be an object with "role", "content" (and "name")', param=where)
        role = m.get("role")
        if not isinstance(role, str) or role not in CHAT_ROLES:
            raise BadRequest(f'"{where}.role" must be one of {", ".join(CHAT_ROLES)}, got {shown(role)}',
                             param=f"{where}.role")
        text = content_text(m.get("content"), f"{where}.content")
        if CHAT_ROLES[role] is None:
            system.append(text.strip())
        else:
            turns.append((CHAT_ROLES[role], text.strip()))
    if not turns or turns[-1][0] != USER:
        raise BadRequest('the last of "messages" (after any system message) must have role "user"', param="messages")
    return "\n".join(s for s in system if s), turns


def content_text(content, where):
    """A message's content: a string, or a list of {"type": "text", "text"} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise BadRequest(f'"{where}" must be a string or a list of {{"type": "text", "text"}} parts', param=where)


def openai_job(gen, deadline, o):
    respond = (functools.partial(answer_stream, error_body=error_object, write=write_chunk) if o["stream"]
               else functools.partial(answer_json, error_body=error_object))
    return Job(None, deadline, o["stream"], gen=gen, respond=respond)


def write_chunk(stream, item):
    """OpenAI's stream: each chunk as `data: {...}`, then `data: [DONE]`; an error mid-stream
    as `data: {"error": {...}}` (the openai client raises it)."""
    if item[0] == "chunk":
        stream.event(None, item[1])
    elif item[0] == "done":
        for chunk in item[1]:
            stream.event(None, chunk)
        stream.data("[DONE]")
    elif item[0] == "error":
        stream.event(None, error_object(item[1], item[2]))
    return item[0] in ("done", "error")


# ---------------------------------------------------------------- answers
class UntilEnd(TextStream):
    """TextStream that also ends at the <|endoftext|> token, as OpenAI's completions do."""

    def push(self, token):
        if not self.stopped and int(token) == self.tokenizer.eot_token:
            text = self.finish()
            self.stopped = True
            return text, True
        return super().push(token)


class OpenAIGeneration(Generation):
    """A completion or chat completion's rows, answered in OpenAI's shape: chunks as text is
    known (streaming), or one object at the end; log-probabilities of the tokens shown."""

    def __init__(self, rows, stops, chat, model_name, o, prompt_tokens, echoes=None):
        super().__init__(rows, stops, chat)
        self.stream, self.include_usage, self.prompt_tokens = o["stream"], o["include_usage"], prompt_tokens
        self.echoes = echoes or [""] * len(rows)
        self.meta = {"id": ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12),
                     "object": "chat.completion.chunk" if chat else "text_completion",
                     "created": int(time.time()), "model": model_name}
        self.shown = [0] * len(rows)    # tokens whose text has been shown, per row
        self.sent = [0] * len(rows)     # tokens whose log-probabilities went out in chunks
        self.offset = [len(e) for e in self.echoes]  # text_offset of the next token (completions)

    def start(self, job, tokenizer):
        super().start(job, tokenizer)
        if not self.chat:
            self.texts = [UntilEnd(tokenizer, self.stops) for _ in self.rows]
        if self.stream:
            for i in range(len(self.rows)):
                if self.chat:
                    job.out.put(("chunk", self.chunk(i, {"role": "assistant", "content": ""}, None)))
                elif self.echoes[i]:
                    job.out.put(("chunk", self.chunk(i, self.echoes[i], self.prompt_logprobs(i))))

    def send(self, job, i, piece):
        if piece:
            self.shown[i] = len(self.rows[i].tokens)
            if self.stream:
                job.emit(("chunk", self.chunk(i, {"content": piece} if self.chat else piece, self.take(i))))

    def finish(self, job, i, reason):
        last = super().finish(job, i, reason)
        if reason != "stop":
            self.shown[i] = len(self.rows[i].tokens)
        if self.stream:
            job.emit(("chunk", self.chunk(i, {} if self.chat else "", self.take(i), reason)))
        return last

    def chunk(self, i, delta, logprobs, finish_reason=None):
        choice = {"index": i, ("delta" if self.chat else "text"): delta, "logprobs": logprobs,
                  "finish_reason": finish_reason}
        return {**self.meta, "choices": [choice]}

    def take(self, i):
        """The log-probabilities of row i's shown tokens not sent yet (None when not asked)."""
        a, b = self.sent[i], self.shown[i]
        self.sent[i] = b
        return self.logprobs(i, a, b)

    def usage(self):
        done = sum(len(r.tokens) for r in self.rows)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": done,
                "total_tokens": self.prompt_tokens + done}

    def answer(self):
        if self.stream:  # what follows the last chunk
            return [{**self.meta, "choices": [], "usage": self.usage()}] if self.include_usage else []
        choices = []
        for i in range(len(self.rows)):
            lp = self.logprobs(i, 0, self.shown[i])
            if self.chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": self.texts[i].text,
                                                        "refusal": None},
                                "logprobs": lp, "finish_reason": self.reasons[i]})
            else:
                if self.echoes[i] and lp is not None:
                    lp = merge(self.prompt_logprobs(i), lp)
                choices.append({"index": i, "text": self.echoes[i] + self.texts[i].shown_text, "logprobs": lp,
                                "finish_reason": self.reasons[i]})
        obj = "chat.completion" if self.chat else "text_completion"
        return {**self.meta, "object": obj, "choices": choices, "usage": self.usage()}

    # ------------------------------------------------------------ log-probabilities
    def token(self, t):
        raw = self.tokenizer.decode_bytes([int(t)])
        return raw.decode("utf-8", errors="replace"), list(raw)

    def logprobs(self, i, a, b):
        """Row i's tokens a..b-1 in OpenAI's logprobs shape, or None when not asked for."""
        row = self.rows[i]
        if row.logprobs is None:
            return None
        entries = [(row.tokens[k], row.token_logprobs[k], row.top[k]) for k in range(a, b)]
        return self.format(i, entries)

    def prompt_logprobs(self, i):
        row = self.rows[i]
        if row.prompt_scores is None:
            return None
        return self.format(i, [(t, lp, top if lp is not None else None)
                               for t, (lp, top) in zip(row.prompt, row.prompt_scores)], offset=0)

    def format(self, i, entries, offset=None):
        if self.chat:
            return {"content": [{"token": s, "logprob": lp, "bytes": raw,
                                 "top_logprobs": [dict(zip(("token", "bytes"), self.token(a)), logprob=alp)
                                                  for a, alp in top]}
                                for (t, lp, top), (s, raw) in ((e, self.token(e[0])) for e in entries)]}
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        at = self.offset[i] if offset is None else offset
        for t, lp, top in entries:
            s = self.token(t)[0]
            out["tokens"].append(s)
            out["token_logprobs"].append(lp)
            out["top_logprobs"].append(None if top is None else {self.token(a)[0]: alp for a, alp in top})
            out["text_offset"].append(at)
            at += len(s)
        if offset is None:
            self.offset[i] = at
        return out


def merge(a, b):
    return {k: a[k] + b[k] for k in a}
