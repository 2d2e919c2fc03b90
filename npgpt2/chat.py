"""Conversations: a transcript of speaker turns that GPT-2 continues.

The transcript is plain text: the system text and a newline when there is one, then one
turn after another, each `<tag> <text>` and a newline:

    You are a helpful bot.
    User: hello there
    Bot: hi!
    User: how are you?
    Bot:

To reply, the model continues after the final bot tag. The reply ends at a line that starts
with a speaker tag, at `<|endoftext|>`, at an optional `truncate` string, or after `length`
tokens. When the transcript plus `length` no longer fits in n_ctx, the oldest turns are left
out of the context (never the current message). The KV cache keeps the transcript's tokens
between replies, and each reply only feeds what comes after the longest prefix it shares
with them. Positions are absolute, so once the oldest turn is dropped the whole context is
fed again.

One renderer serves chatting and training (chat_data.py's `--format chat`): `header_text` and
`turn_text` are the transcript's text, `header_ids` and `turn_ids` its tokens (a turn's tag
encoded alone, then the rest, so a bot turn in a training transcript is exactly the prompt's
tail plus what the model is asked to generate). A run trained on conversations records its
template (tags and system text) in `<run>/chat.json` (`write_template`, `read_template`).
"""
import json
import logging
from pathlib import Path

import numpy as np

from .errors import Npgpt2Error
from .fsutil import atomic_write, read_json
from .sampling import TextStream, check_length, check_sampling_args, check_seed, sample_logits
from .tokenizer import ENDOFTEXT

log = logging.getLogger(__name__)

USER, BOT = "user", "bot"
DEFAULT_USER_TAG, DEFAULT_BOT_TAG = "User:", "Bot:"
TEMPLATE_FILE = "chat.json"  # {"user_tag", "bot_tag", "system"} in a run folder


def check_tags(user_tag, bot_tag):
    """Raise Npgpt2Error unless the tags are two different, non-empty, one-line strings."""
    for flag, tag in (("--user_tag", user_tag), ("--bot_tag", bot_tag)):
        if not tag.strip() or "\n" in tag:
            raise Npgpt2Error(f"{flag} must be non-empty text on one line, got {tag!r}")
    if user_tag.strip() == bot_tag.strip():
        raise Npgpt2Error(f"--user_tag and --bot_tag must differ, both are {user_tag!r}")


def turn_text(tag, text):
    """One turn as it appears in the transcript: 'User: hello\\n'."""
    return f"{tag} {text}".rstrip(" ") + "\n"


def header_text(system):
    """The system text as the transcript's first line(s): '' when there is none."""
    system = (system or "").strip()
    return system + "\n" if system else ""


def turn_ids(tokenizer, tag, text):
    """(tag ids, rest ids) of one turn: the tag encoded alone, then ' <text>\\n'. Decoded
    together they are turn_text(tag, text); a reply's prompt ends with the same tag ids."""
    return tokenizer.encode(tag), tokenizer.encode(turn_text(tag, text)[len(tag):])


def header_ids(tokenizer, system):
    return tokenizer.encode(header_text(system)) if header_text(system) else []


def check_vocab(tokenizer, user_tag, bot_tag, system=""):
    """Raise Npgpt2Error naming the flag when the model's vocabulary cannot spell a tag or the
    system text (a compact vocabulary such as the demo's lacks most of GPT-2's tokens)."""
    # each text as the transcript writes it (a tag after a newline, before a space), named as given
    for flag, shown, text in (("--user_tag", user_tag, turn_text(user_tag, "") + user_tag),
                              ("--bot_tag", bot_tag, turn_text(bot_tag, "") + bot_tag),
                              ("--system", (system or "").strip(), header_text(system))):
        try:
            tokenizer.encode(text)
        except Npgpt2Error as e:
            raise Npgpt2Error(f"{flag} {shown!r}: the model's vocabulary cannot spell it ({e}); "
                              f"give --user_tag/--bot_tag/--system text it can") from None


def build_prompt(tokenizer, turns, n_ctx, length, user_tag=DEFAULT_USER_TAG, bot_tag=DEFAULT_BOT_TAG, system=""):
    """The tokens to continue for the bot's next reply, and how many old turns were left out.

    turns: [(USER or BOT, text)], oldest first; the last one is the current message and is
    always kept, as is the system text on top. Returns (tokens, n_dropped) with
    len(tokens) + length <= n_ctx. Each turn is encoded on its own (turn_ids), so a turn's
    tokens stay the same as the transcript grows.
    """
    check_length(length, n_ctx)
    if not turns:
        raise Npgpt2Error("the conversation is empty (give at least one message)")
    tags = {USER: user_tag, BOT: bot_tag}
    head, tail = header_ids(tokenizer, system), tokenizer.encode(bot_tag)
    room = n_ctx - length - len(tail) - len(head)
    # newest first, and only as far back as fits: a long history costs no encoding
    kept = []
    for role, text in reversed(turns):
        tokens = sum(turn_ids(tokenizer, tags[role], text), [])
        if not kept and len(tokens) > room:
            raise Npgpt2Error(f"the message is {len(tokens)} tokens, but with --length {length} only "
                              f"{max(room, 0)} fit in the context (n_ctx={n_ctx})")
        if len(tokens) > room:
            break
        room -= len(tokens)
        kept.append(tokens)
    dropped = len(turns) - len(kept)
    if dropped:
        log.info("left out the %d oldest turns to fit the context (n_ctx=%d, --length %d)",
                 dropped, n_ctx, length)
    return head + [t for tokens in reversed(kept) for t in tokens] + tail, dropped


def transcript_text(turns, user_tag=DEFAULT_USER_TAG, bot_tag=DEFAULT_BOT_TAG, system=""):
    tags = {USER: user_tag, BOT: bot_tag}
    return header_text(system) + "".join(turn_text(tags[role], text) for role, text in turns)


def read_template(model_dir):
    """The chat template a run was trained with: {"user_tag", "bot_tag", "system"} from
    <model_dir>/chat.json, or None when the folder has none. Raises Npgpt2Error for a bad file."""
    path = Path(model_dir) / TEMPLATE_FILE
    try:
        t = read_json(path)
    except FileNotFoundError:
        return None
    if not isinstance(t, dict) or not all(isinstance(t.get(k), str) for k in ("user_tag", "bot_tag")) \
            or not isinstance(t.get("system", ""), str):
        raise Npgpt2Error(f"{path}: expected {{\"user_tag\": str, \"bot_tag\": str, \"system\": str}}")
    return {"user_tag": t["user_tag"], "bot_tag": t["bot_tag"], "system": t.get("system", "")}


def write_template(model_dir, template):
    """Write <model_dir>/chat.json atomically (template: read_template's dict)."""
    with atomic_write(Path(model_dir) / TEMPLATE_FILE, "w", encoding="utf-8") as f:
        json.dump({k: template[k] for k in ("user_tag", "bot_tag", "system")}, f, indent=2)


def resolve_template(model_dir, user_tag=None, bot_tag=None, system=None):
    """The tags and system text to chat with: each flag given wins, then the run's chat.json,
    then the defaults (User:, Bot:, no system text)."""
    saved = (read_template(model_dir) if model_dir is not None else None) or {}
    out = {"user_tag": DEFAULT_USER_TAG, "bot_tag": DEFAULT_BOT_TAG, "system": "", **saved}
    given = {"user_tag": user_tag, "bot_tag": bot_tag, "system": system}
    out.update({k: v for k, v in given.items() if v is not None})
    return out


def stop_strings(user_tag, bot_tag, truncate=None):
    """Where a reply ends: a line that starts with a speaker tag, <|endoftext|>, truncate."""
    stops = ["\n" + user_tag.strip(), "\n" + bot_tag.strip(), ENDOFTEXT]
    return stops + ([truncate] if truncate else [])


class ReplyText:
    """A bot reply as text, token by token: TextStream with the chat's stops, no leading
    whitespace, and an end at the <|endoftext|> token however the tokenizer spells it.

    push(token) -> (text now safe to show, stopped); finish() -> the held-back rest;
    .text is the whole reply, stripped.
    """

    def __init__(self, tokenizer, stops):
        self.stream = TextStream(tokenizer, stops)
        self.eot = tokenizer.eot_token
        self.started = False
        self.stopped = False

    def push(self, token):
        if self.stopped:
            return "", True
        if int(token) == self.eot:
            text, self.stopped = self.stream.finish(), True
        else:
            text, self.stopped = self.stream.push(token)
        return self._lead(text), self.stopped

    def finish(self):
        return "" if self.stopped else self._lead(self.stream.finish())

    def _lead(self, text):
        if not self.started:
            text = text.lstrip()
            self.started = bool(text)
        return text

    @property
    def text(self):
        return self.stream.shown_text.strip()


class CachedContext:
    """One KV cache kept from one generation to the next.

    Each generation feeds only what follows the longest prefix its prompt shares with the
    tokens already in the cache. The result can differ from a fresh prefill in the last
    float bits (tokens fed one at a time take another path than a prefill), so a seeded
    answer that must not depend on earlier requests uses a fresh cache instead.
    """

    def __init__(self, model):
        self.model = model
        self.cache = model.new_cache(1)
        self.tokens = []     # the tokens whose keys/values are in self.cache, in order
        self.reused = 0      # tokens the last generation took from the cache instead of feeding

    def clear(self):
        self.cache.truncate(0)
        self.tokens = []

    def generate(self, prompt, length, rng, temperature=1.0, top_k=0, top_p=1.0):
        """Yield up to `length` sampled token ids after prompt (a non-empty list of ids that,
        with length, fits in n_ctx)."""
        from .batch_decode import common_prefix
        n = common_prefix(self.tokens, prompt, len(prompt) - 1)  # feed at least one token to get logits
        self.cache.truncate(n)
        del self.tokens[n:]
        self.reused = n
        logits = self._feed(prompt[n:], last_only=True)
        for step in range(length):
            token = int(sample_logits(logits, rng, temperature, top_k, top_p)[0])
            yield token
            if step + 1 < length:
                logits = self._feed([token])

    def _feed(self, tokens, last_only=False):
        logits = self.model.forward(np.asarray([tokens], dtype=np.int64), cache=self.cache,
                                    last_only=last_only)
        # only after forward returned: an interrupted forward leaves the cache as it was
        self.tokens.extend(tokens)
        return logits[:, -1]


class ChatSession:
    """A conversation with a model, kept as a list of turns, with a KV cache kept between replies.

    length: most tokens per reply (default n_ctx // 4). Sampling settings as in `prompt`;
    one random stream for the whole session, so a seed makes the conversation repeatable.

        chat = ChatSession(model, tokenizer, seed=1)
        for piece in chat.say("hello"):   # the reply, as it is generated
            print(piece, end="")
        chat.turns   # [("user", "hello"), ("bot", "...")]
    """

    def __init__(self, model, tokenizer, length=None, temperature=1.0, top_k=0, top_p=1.0,
                 seed=None, truncate=None, user_tag=DEFAULT_USER_TAG, bot_tag=DEFAULT_BOT_TAG, system=""):
        check_sampling_args(temperature, top_k, top_p)
        check_seed(seed)
        check_tags(user_tag, bot_tag)
        check_vocab(tokenizer, user_tag, bot_tag, system)
        self.model, self.tokenizer = model, tokenizer
        self.n_ctx = model.hparams["n_ctx"]
        self.length = length if length is not None else max(1, self.n_ctx // 4)
        check_length(self.length, self.n_ctx)
        self.sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
        self.rng = np.random.default_rng(seed)
        self.user_tag, self.bot_tag, self.system = user_tag, bot_tag, system
        self.stops = stop_strings(user_tag, bot_tag, truncate)
        self.turns = []      # every turn since the last reset, for /save
        self.ended = None    # whether the last reply ended by itself (a speaker tag, <|endoftext|>, truncate)
        self.start = 0       # turns[:start] no longer fit in the context
        self.context = CachedContext(model)

    def reset(self):
        """Forget the conversation (the cache is simply overwritten next time)."""
        self.turns, self.start = [], 0
        self.context.clear()

    def transcript(self):
        """The whole conversation since the last reset, in the speaker format."""
        return transcript_text(self.turns, self.user_tag, self.bot_tag, self.system)

    def save(self, path):
        """Write the transcript to path atomically (UTF-8)."""
        try:
            with atomic_write(path, "w", encoding="utf-8") as f:
                f.write(self.transcript())
        except OSError as e:
            raise Npgpt2Error(f"{path}: cannot write the transcript ({e.strerror or e})") from None

    def say(self, text):
        """Add the user's message; returns a generator of the bot's reply as it is generated.

        Raises Npgpt2Error, before changing anything, when the message alone does not fit in
        the context. The bot's turn holds what the generator has shown so far, also when it
        is closed early (e.g. on Ctrl-C).
        """
        turns = self.turns[self.start:] + [(USER, text)]
        prompt, dropped = build_prompt(self.tokenizer, turns, self.n_ctx, self.length,
                                       self.user_tag, self.bot_tag, self.system)
        self.start += dropped
        self.turns += [(USER, text), (BOT, "")]
        return self._reply(prompt, len(self.turns) - 1)

    def _reply(self, prompt, index):
        reply = ReplyText(self.tokenizer, self.stops)
        try:
            for token in self.context.generate(prompt, self.length, self.rng, **self.sampling):
                piece, stopped = reply.push(token)
                if piece:
                    yield piece
                if stopped:
                    break
            tail = reply.finish()
            if tail:
                yield tail
        finally:
            self.ended = reply.stopped
            if index < len(self.turns):  # unless reset() came first
                self.turns[index] = (BOT, reply.text)

    def reply(self, text):
        """say() without streaming: the whole reply."""
        return "".join(self.say(text)).strip()
