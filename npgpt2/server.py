"""`npgpt2 serve`: an HTTP API and a chat page in front of one model.

Endpoints (JSON in, JSON out; errors are `{"error": "<one line>"}` with a 4xx/5xx status):

    GET  /             the chat page (assets/chat.html, self-contained)
    GET  /health       {"status": "ok", "model", "n_ctx", "n_vocab", "queued", "limits"}
    POST /v1/generate  {prompt, length, temperature, top_k, top_p, seed, truncate, stream}
    POST /v1/chat      {messages: [{role: "user"|"assistant", content}], length, ..., stream}

Both POSTs answer `{"text", "tokens": [generated ids], "finish_reason": "stop"|"length"|"timeout"}`
(chat adds `"message": {"role": "assistant", "content"}` and `"dropped"`: the number of old
messages left out of the context). With `"stream": true` the answer is Server-Sent Events:
`data: {"text": "<piece>"}` per piece of text as it is generated, then `event: done` whose
data is the JSON above (or `event: error` with `{"error"}`).

Design. The standard library's ThreadingHTTPServer: one thread per connection reads,
validates and tokenizes the request, then puts a job on a FIFO queue served by one model
worker thread, which runs jobs one at a time. So answers are never interleaved, and a seeded
request gives the same text whatever else is going on: it prefills a fresh KV cache (no
batching, which changes float rounding). Unseeded requests share one cache instead and feed
only what follows the prefix they have in common with the previous request's tokens, which
is most of a conversation that a chat page sends again with each new message.
The work is one CPU-bound model, so an asyncio framework would add a dependency without
adding throughput. The worker never touches a socket: it puts text pieces on the job's own
queue and the connection thread writes them with a socket timeout, so a slow reader cannot
stall the worker; when a write fails or times out, or the client closes its end, the job is
cancelled and the worker moves on at the next token. A per-request deadline (counted from
arrival, so time in the queue counts) ends generation early with finish_reason "timeout".
"""
import dataclasses
import json
import logging
import math
import queue
import select
import socket
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from .chat import (BOT, DEFAULT_BOT_TAG, DEFAULT_USER_TAG, USER, CachedContext, ReplyText, build_prompt,
                   check_tags, stop_strings)
from .errors import Npgpt2Error
from .sampling import TextStream, generate_stream

log = logging.getLogger(__name__)

PAGE = Path(__file__).parent / "assets" / "chat.html"
ROLES = {"user": USER, "assistant": BOT, "bot": BOT}
SAMPLING_FIELDS = ("length", "temperature", "top_k", "top_p", "seed", "truncate", "stream")


@dataclasses.dataclass
class Limits:
    """What one request may ask for. None means: derived from the model's n_ctx."""
    max_body: int = 256 * 1024        # bytes of request body
    max_length: int = None            # tokens per answer; default n_ctx - 1
    max_prompt_tokens: int = None     # tokens in a /v1/generate prompt; default 8 * n_ctx
    timeout: float = 60.0             # seconds from arrival to the last token
    io_timeout: float = 10.0          # seconds a socket read or write may block
    max_queue: int = 64               # requests waiting or running; more get 503

    def check(self):
        """Raise Npgpt2Error naming the flag of a limit out of range."""
        for flag, v in (("--max_body", self.max_body), ("--max_length", self.max_length),
                        ("--max_prompt_tokens", self.max_prompt_tokens), ("--max_queue", self.max_queue)):
            if v is not None and (not isinstance(v, int) or v < 1):
                raise Npgpt2Error(f"{flag} must be an integer >= 1, got {v}")
        for flag, v in (("--timeout", self.timeout), ("--io_timeout", self.io_timeout)):
            if not v > 0:
                raise Npgpt2Error(f"{flag} must be > 0 seconds, got {v}")

    def resolved(self, n_ctx):
        return dataclasses.replace(
            self,
            max_length=min(self.max_length or n_ctx - 1, n_ctx - 1),
            max_prompt_tokens=self.max_prompt_tokens or 8 * n_ctx)


class BadRequest(Exception):
    """A client error; str(e) is the one-line message sent back as JSON."""

    def __init__(self, message, status=HTTPStatus.BAD_REQUEST):
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------- request validation
def _shown(v, limit=40):
    """v as JSON for an error message, cut short: a 400-digit number stays one short line."""
    text = json.dumps(v)
    return text if len(text) <= limit else text[:limit] + "..."


def _integer(body, key, default, lo, hi, nullable=False):
    v = body.get(key, default)
    if v is None and nullable:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise BadRequest(f'"{key}" must be an integer from {lo} to {hi}, got {_shown(v)}')
    return v


def _number(body, key, default, lo, hi, lo_open=False):
    v = body.get(key, default)
    # compared before math.isfinite, which raises OverflowError for an int beyond float range
    ok = (isinstance(v, (int, float)) and not isinstance(v, bool)
          and (lo < v if lo_open else lo <= v) and v <= hi and math.isfinite(v))
    if not ok:
        span = f"{'above' if lo_open else 'from'} {lo} to {hi}"
        raise BadRequest(f'"{key}" must be a number {span}, got {_shown(v)}')
    return float(v)


def _string(body, key, default, max_chars, nullable=False):
    v = body.get(key, default)
    if v is None and nullable:
        return None
    if not isinstance(v, str) or len(v) > max_chars:
        raise BadRequest(f'"{key}" must be a string of at most {max_chars} characters'
                         + ("" if isinstance(v, str) else f", got {json.dumps(v)[:40]}"))
    return v


def parse_options(body, limits, n_vocab, default_length, allowed):
    """The sampling options of a request body (a dict), checked. Raises BadRequest."""
    unknown = sorted(set(body) - set(allowed) - set(SAMPLING_FIELDS))
    if unknown:
        raise BadRequest(f'unknown field "{unknown[0]}" (allowed: {", ".join(allowed + SAMPLING_FIELDS)})')
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest(f'"stream" must be true or false, got {json.dumps(stream)}')
    return dict(
        length=_integer(body, "length", min(default_length, limits.max_length), 1, limits.max_length),
        temperature=_number(body, "temperature", 1.0, 0, 100),
        top_k=_integer(body, "top_k", 0, 0, n_vocab),
        top_p=_number(body, "top_p", 1.0, 0, 1, lo_open=True),
        seed=_integer(body, "seed", None, 0, 2**63 - 1, nullable=True),
        truncate=_string(body, "truncate", None, 1000, nullable=True) or None,
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
        if m.get("role") not in ROLES:
            raise BadRequest(f'"messages"[{i}]["role"] must be "user" or "assistant", got {json.dumps(m.get("role"))}')
        if not isinstance(m.get("content"), str):
            raise BadRequest(f'"messages"[{i}]["content"] must be a string')
        turns.append((ROLES[m["role"]], m["content"].strip()))
    if turns[-1][0] != USER:
        raise BadRequest('the last of "messages" must have role "user"')
    return turns


# ---------------------------------------------------------------- the model worker
class Job:
    """One request for the worker. Results arrive on .out as ("start",), ("text", piece),
    ("done", answer dict) or ("error", status, message)."""

    def __init__(self, prompt, options, stops, chat, deadline):
        self.prompt, self.options, self.stops, self.chat = prompt, options, stops, chat
        self.deadline = deadline
        self.out = queue.Queue()
        self.cancelled = threading.Event()
        self.extra = {}


class Worker:
    """Runs jobs one at a time on one thread, in arrival order."""

    def __init__(self, model, tokenizer, max_queue):
        self.model, self.tokenizer = model, tokenizer
        self.context = CachedContext(model)  # for unseeded requests
        self.max_queue = max_queue
        self.jobs = queue.Queue()
        self.pending = 0          # queued or running
        self.lock = threading.Lock()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="npgpt2-model", daemon=True)
        self.thread.start()

    def submit(self, job):
        with self.lock:
            if self.stopping:
                raise BadRequest("the server is shutting down", HTTPStatus.SERVICE_UNAVAILABLE)
            if self.pending >= self.max_queue:
                raise BadRequest(f"busy: {self.pending} requests are queued; try again later",
                                 HTTPStatus.SERVICE_UNAVAILABLE)
            self.pending += 1
        self.jobs.put(job)

    def stop(self):
        with self.lock:
            self.stopping = True
        self.jobs.put(None)
        self.thread.join(timeout=30)

    def _run(self):
        while True:
            job = self.jobs.get()
            if job is None:
                break
            try:
                if self.stopping:
                    job.out.put(("error", HTTPStatus.SERVICE_UNAVAILABLE, "the server is shutting down"))
                elif not job.cancelled.is_set():
                    self._generate(job)
            except Exception as e:  # a bug must cost one request, not the server
                log.exception("generation failed")
                job.out.put(("error", HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error: {type(e).__name__}"))
            finally:
                with self.lock:
                    self.pending -= 1
        # tell whoever is still waiting
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.out.put(("error", HTTPStatus.SERVICE_UNAVAILABLE, "the server is shutting down"))

    def _generate(self, job):
        if time.monotonic() > job.deadline:
            job.out.put(("error", HTTPStatus.SERVICE_UNAVAILABLE, "timed out waiting in the queue"))
            return
        job.out.put(("start",))
        o = job.options
        text = ReplyText(self.tokenizer, job.stops) if job.chat else TextStream(self.tokenizer, job.stops)
        tokens, reason = [], "length"
        if o["seed"] is None:
            # nothing to reproduce: continue from the previous request's cache, so a chat page
            # that sends its history again only feeds the new turn
            steps = self.context.generate(job.prompt, o["length"], np.random.default_rng(),
                                          o["temperature"], o["top_k"], o["top_p"])
        else:
            # a fresh cache, so the same seed gives the same text whatever ran before
            steps = (int(t[0]) for t in generate_stream(
                self.model, job.prompt, o["length"], o["temperature"], o["top_k"], o["top_p"],
                rng=np.random.default_rng(o["seed"])))
        try:
            for step in steps:
                if self.stopping:
                    job.out.put(("error", HTTPStatus.SERVICE_UNAVAILABLE, "the server is shutting down"))
                    return
                if job.cancelled.is_set():
                    return
                tokens.append(step)
                piece, stopped = text.push(tokens[-1])
                if piece:
                    job.out.put(("text", piece))
                if stopped:
                    reason = "stop"
                    break
                if time.monotonic() > job.deadline:
                    reason = "timeout"
                    break
        finally:
            steps.close()
        tail = text.finish()
        if tail:
            job.out.put(("text", tail))
        full = text.text if job.chat else text.shown_text
        answer = {"text": full, "tokens": tokens, "finish_reason": reason, **job.extra}
        if job.chat:
            answer["message"] = {"role": "assistant", "content": full}
        job.out.put(("done", answer))


# ---------------------------------------------------------------- HTTP
def client_gone(sock):
    """True when the peer has closed its end (a readable socket with nothing to read)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"   # keep-alive for plain answers; streams close when done
    server_version = "npgpt2"
    app = None                      # the App; set on a subclass per server
    timeout = 10.0                  # socket timeout (StreamRequestHandler applies it)

    # ------------------------------------------------------------ plumbing
    def log_message(self, fmt, *args):
        log.debug("%s %s", self.address_string(), fmt % args)

    def send_error(self, code, message=None, explain=None):
        # the base class answers HTML; everything here answers JSON
        try:
            self._send_json(code, {"error": message or HTTPStatus(code).phrase}, close=True)
        except OSError:
            self.close_connection = True

    def _send_json(self, status, obj, close=False):
        body = json.dumps(obj).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _path(self):
        return urlsplit(self.path).path

    # ------------------------------------------------------------ routes
    def do_GET(self):
        path = self._path()
        if path == "/":
            body = self.app.page
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Content-Security-Policy",
                             "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
        elif path == "/health":
            self._send_json(HTTPStatus.OK, self.app.health())
        else:
            self._send_json(HTTPStatus.NOT_FOUND, {"error": f"no such path: {path}"})

    do_HEAD = do_GET

    def do_POST(self):
        path = self._path()
        routes = {"/v1/generate": self.app.generate_job, "/v1/chat": self.app.chat_job}
        if path not in routes:
            self._discard_body()
            self._send_json(HTTPStatus.NOT_FOUND, {"error": f"no such path: {path}"})
            return
        try:
            job = routes[path](self._read_json())
            self.app.worker.submit(job)
        except BadRequest as e:
            self._send_json(e.status, {"error": str(e)}, close=self.close_connection)
            return
        self._checked = time.monotonic()
        (self._stream if job.options["stream"] else self._answer)(job)

    def _method_not_allowed(self):
        self._discard_body()
        self._send_json(HTTPStatus.METHOD_NOT_ALLOWED, {"error": f"{self.command} is not supported here"})

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _method_not_allowed

    # ------------------------------------------------------------ request body
    def _content_length(self):
        """The body's size; on a BadRequest the body is unread, so the connection must close."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise BadRequest("chunked request bodies are not supported; send Content-Length",
                             HTTPStatus.LENGTH_REQUIRED)
        try:
            n = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            n = -1
        if n < 0:
            self.close_connection = True
            raise BadRequest("Content-Length is not a number >= 0")
        return n

    def _skip(self, n):
        while n > 0:
            chunk = self.rfile.read(min(n, 1 << 16))
            if not chunk:
                break
            n -= len(chunk)

    def _discard_body(self):
        try:
            n = self._content_length()
        except BadRequest:
            n = -1
        if 0 <= n <= self.app.limits.max_body:
            self._skip(n)
        elif n:
            self.close_connection = True

    def _read_json(self):
        n, limit = self._content_length(), self.app.limits.max_body
        if n > limit:
            # read a moderately large body before answering, so the client sees the 413
            # rather than a connection reset in the middle of its upload
            self.close_connection = True
            if n <= 16 * limit:
                self._skip(n)
            raise BadRequest(f"the body is {n} bytes; the limit is {limit}", HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        raw = self.rfile.read(n)
        if len(raw) < n:
            self.close_connection = True
            raise BadRequest("the body ended early")
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise BadRequest(f"the body is not valid JSON: {e}") from None
        except RecursionError:  # e.g. [[[[...]]]] nested deeper than Python's stack
            raise BadRequest("the body is not valid JSON: nested too deeply") from None
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        return body

    # ------------------------------------------------------------ answers
    def _next(self, job):
        """The job's next result; None once the client has gone (the job is then cancelled)."""
        backstop = job.deadline + 30  # the worker enforces the deadline; this is for a stuck one
        while True:
            now = time.monotonic()
            if now - self._checked >= 0.2:  # results may flow without pause: look every 0.2 s
                self._checked = now
                if client_gone(self.connection):
                    log.info("%s went away; cancelling its request", self.address_string())
                    job.cancelled.set()
                    self.close_connection = True
                    return None
            if now > backstop:
                job.cancelled.set()
                return ("error", HTTPStatus.GATEWAY_TIMEOUT, "timed out")
            try:
                return job.out.get(timeout=0.2)
            except queue.Empty:
                pass

    def _answer(self, job):
        while True:
            item = self._next(job)
            if item is None or item[0] in ("done", "error"):
                break
        try:
            if item is not None and item[0] == "done":
                self._send_json(HTTPStatus.OK, item[1])
            elif item is not None:
                self._send_json(item[1], {"error": item[2]})
        except OSError as e:  # gone after all, or too slow to read even this
            log.info("%s: answer not delivered (%s)", self.address_string(), e)
            self.close_connection = True

    def _stream(self, job):
        item = self._next(job)
        if item is None:
            return
        if item[0] == "error":  # before any output: a plain JSON error with its status
            self._send_json(item[1], {"error": item[2]})
            return
        # HTTP/1.1 clients get chunked encoding: every event reaches them as its own chunk
        # (clients that read a close-delimited body in fixed-size blocks would wait for
        # several events) and the connection can be kept after the end.
        self._chunked = self.request_version == "HTTP/1.1"
        try:
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "text/event-stream; charset=utf-8")
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Accel-Buffering", "no")
            if self._chunked:
                self.send_header("Transfer-Encoding", "chunked")
            else:
                self.send_header("Connection", "close")  # the stream ends when the connection does
                self.close_connection = True
            self.end_headers()
            while True:
                item = self._next(job)
                if item is None:
                    return
                if item[0] == "text":
                    self._event(None, {"text": item[1]})
                    continue
                if item[0] == "done":
                    self._event("done", item[1])
                else:
                    self._event("error", {"error": item[2]})
                if self._chunked:
                    self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
                return
        except OSError as e:  # includes a write that timed out: a reader too slow to keep
            log.info("%s: stream ended early (%s); cancelling its request", self.address_string(), e)
            job.cancelled.set()
            self.close_connection = True

    def _event(self, name, obj):
        head = f"event: {name}\n" if name else ""
        data = f"{head}data: {json.dumps(obj)}\n\n".encode("utf-8")
        if self._chunked:
            data = b"%x\r\n%s\r\n" % (len(data), data)
        self.wfile.write(data)
        self.wfile.flush()


class App:
    """The model, tokenizer, limits and worker behind one server."""

    def __init__(self, model, tokenizer, limits=None, user_tag=DEFAULT_USER_TAG, bot_tag=DEFAULT_BOT_TAG,
                 model_name=None):
        check_tags(user_tag, bot_tag)
        self.model, self.tokenizer = model, tokenizer
        self.n_ctx, self.n_vocab = model.hparams["n_ctx"], model.hparams["n_vocab"]
        limits = limits or Limits()
        limits.check()
        self.limits = limits.resolved(self.n_ctx)
        self.user_tag, self.bot_tag = user_tag, bot_tag
        self.model_name = model_name or (model.source_dir.name if model.source_dir else "model")
        self.page = PAGE.read_bytes()
        self.worker = Worker(model, tokenizer, self.limits.max_queue)

    def health(self):
        L = self.limits
        return {"status": "ok", "model": self.model_name, "n_ctx": self.n_ctx, "n_vocab": self.n_vocab,
                "queued": self.worker.pending,
                "limits": {"max_body": L.max_body, "max_length": L.max_length,
                           "max_prompt_tokens": L.max_prompt_tokens, "timeout": L.timeout}}

    def _deadline(self):
        return time.monotonic() + self.limits.timeout

    def _check_prompt_size(self, n):
        if n > self.limits.max_prompt_tokens:
            raise BadRequest(f"the prompt is {n} tokens; the limit is {self.limits.max_prompt_tokens}")

    def generate_job(self, body):
        deadline = self._deadline()
        options = parse_options(body, self.limits, self.n_vocab, self.n_ctx // 2, ("prompt",))
        prompt = _string(body, "prompt", "", self.limits.max_body)
        try:
            tokens = self.tokenizer.encode(prompt) if prompt else [self.tokenizer.eot_token]
        except Npgpt2Error as e:  # e.g. a lone surrogate such as "\ud800" in the JSON string
            raise BadRequest(f'"prompt": {e}') from None
        self._check_prompt_size(len(tokens))
        # too long for the context: keep its end, as `npgpt2 prompt` does
        tokens = tokens[-(self.n_ctx - options["length"]):]
        stops = [options["truncate"]] if options["truncate"] else []
        return Job(tokens, options, stops, chat=False, deadline=deadline)

    def chat_job(self, body):
        deadline = self._deadline()
        options = parse_options(body, self.limits, self.n_vocab, self.n_ctx // 4, ("messages",))
        turns = parse_messages(body)
        try:  # encodes only the newest messages that can fit, so its cost is bounded
            tokens, dropped = build_prompt(self.tokenizer, turns, self.n_ctx, options["length"],
                                           self.user_tag, self.bot_tag)
        except Npgpt2Error as e:
            raise BadRequest(str(e).replace("--length", '"length"')) from None
        job = Job(tokens, options, stop_strings(self.user_tag, self.bot_tag, options["truncate"]),
                  chat=True, deadline=deadline)
        job.extra["dropped"] = dropped
        return job


class Server:
    """A running npgpt2 server: ThreadingHTTPServer + the model worker.

        with Server(model, tok, port=0) as s:   # port 0: any free port
            s.start()                           # serve on a background thread
            requests.get(s.url + "health")
    """

    def __init__(self, model, tokenizer, host="127.0.0.1", port=8000, limits=None,
                 user_tag=DEFAULT_USER_TAG, bot_tag=DEFAULT_BOT_TAG, model_name=None):
        if not isinstance(port, int) or not 0 <= port <= 65535:
            raise Npgpt2Error(f"--port must be from 0 to 65535, got {port}")
        self.app = App(model, tokenizer, limits, user_tag, bot_tag, model_name)
        handler = type("BoundHandler", (Handler,), {"app": self.app, "timeout": self.app.limits.io_timeout})
        server_class = type("NpServer", (ThreadingHTTPServer,), {
            "daemon_threads": True,
            "request_queue_size": 128,  # the listen backlog; socketserver's 5 resets bursts of clients
            "address_family": socket.AF_INET6 if ":" in host else socket.AF_INET})
        try:
            self.httpd = server_class((host, port), handler)
        except OSError as e:
            self.app.worker.stop()
            raise Npgpt2Error(f"--host {host} --port {port}: cannot listen ({e.strerror or e})") from None
        self.host, self.port = host, self.httpd.server_address[1]
        self.thread = None
        if host not in ("127.0.0.1", "localhost", "::1") and not host.startswith("127."):
            log.warning("listening on %s: reachable from other machines", host)

    @property
    def url(self):
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def serve_forever(self):
        self.httpd.serve_forever(poll_interval=0.2)

    def start(self):
        """Serve on a background thread; returns self."""
        self.thread = threading.Thread(target=self.serve_forever, name="npgpt2-http", daemon=True)
        self.thread.start()
        return self

    def close(self):
        if self.thread is not None:
            self.httpd.shutdown()
            self.thread.join(timeout=10)
        self.httpd.server_close()
        self.app.worker.stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
