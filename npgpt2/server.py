"""`npgpt2 serve`: an HTTP API and a chat page in front of one model.

Endpoints (JSON in, JSON out; errors are `{"error": "<one line>"}` with a 4xx/5xx status):

    GET  /             the chat page (assets/chat.html, self-contained)
    GET  /explain      the explain page: a text box, then the model's insides for that text
    GET  /health       {"status": "ok", "model", "n_ctx", "n_vocab", "queued", "limits"}
    POST /v1/generate  {prompt, length, temperature, top_k, top_p, seed, truncate, stream}
    POST /v1/chat      {messages: [{role: "user"|"assistant", content}], length, ..., stream}
    POST /v1/explain   {text, layer, top_k} -> explain.build_report's JSON
    GET  /v1/models, POST /v1/completions, POST /v1/chat/completions: OpenAI's API (openai_api.py)

generate and chat answer `{"text", "tokens": [generated ids], "finish_reason":
"stop"|"length"|"timeout"}` (chat adds `"message": {"role": "assistant", "content"}` and
`"dropped"`: the number of old messages left out of the context). With `"stream": true` the
answer is Server-Sent Events: `data: {"text": "<piece>"}` per piece of text as it is
generated, then `event: done` whose data is the JSON above (or `event: error` with
`{"error"}`, e.g. when the server stops mid-stream).

Design, by module:
- server_http.py: connections. One thread with a selector holds every connection until its
  request line and headers are in (so slow clients cost a socket, not a thread); then the
  request gets a thread of its own, at most --max_connections at once (more get 503), which
  reads and checks the body and submits a job. Headers and bodies have --read_timeout.
- server_worker.py: one model thread. Generation requests are decoded together, up to
  --max_batch rows (batch_decode.py): a new one is prefilled into a free KV-cache row (the
  requests waiting together in one forward) and joins at the next token, a finished or
  cancelled one leaves at once. A seeded request gives
  the same tokens whatever else is going on: it prefills a fresh cache row and draws from its
  own random stream (its logits match a solo run's within float rounding: see batch_decode).
  Unseeded requests may start from a free row that holds a prefix of their prompt and feed
  only the rest, which is most of a conversation that a chat page sends again.
  The worker never waits on a socket: it puts text pieces on the job's own queue and the
  request's thread writes them with a socket timeout, so a slow reader cannot stall the
  worker; when a write fails or the client goes away the job is cancelled at the next token.
  (A stream's pieces the worker writes itself while the socket takes each one at once,
  sparing a wake-up of the request's thread per token: server_http.Lane.)
  A per-request deadline (from arrival, so time in the queue counts) ends generation early
  with finish_reason "timeout".
- server_fields.py: every field of a body checked, a 400 naming it otherwise.
- openai_api.py: OpenAI's endpoints, fields and answer shapes, on the same worker.
The work is one CPU-bound model, so an asyncio framework would add a dependency without
adding throughput.
"""
import dataclasses
import errno
import ipaddress
import logging
import os
import resource
import socket
import socketserver
import threading
import time
from http import HTTPStatus
from pathlib import Path

from . import explain, openai_api
from .batch_decode import Row, row_rng
from .chat import DEFAULT_BOT_TAG, DEFAULT_USER_TAG, build_prompt, check_tags, check_vocab, stop_strings
from .errors import Npgpt2Error
from .sampling import check_batch_memory
from .server_fields import BadRequest, parse_explain, parse_messages, parse_options, string
from .server_http import Handler, HeaderGate, canned, close_socket, send_and_close
from .server_worker import Generation, Job, Worker, explain_task

log = logging.getLogger("npgpt2.server")

PAGE = Path(__file__).parent / "assets" / "chat.html"
MAX_BATCH = 256  # the most sequences --max_batch may decode together
MAX_PATTERN_WEIGHTS = 2_000_000  # attention weights in one /v1/explain answer (about 12 MB of JSON)


@dataclasses.dataclass
class Limits:
    """What one request may ask for. None means: derived from the model's n_ctx."""
    max_body: int = 256 * 1024        # bytes of request body
    max_length: int = None            # tokens per answer; default n_ctx - 1
    max_prompt_tokens: int = None     # tokens in a /v1/generate prompt; default 8 * n_ctx
    timeout: float = 60.0             # seconds from arrival to the last token
    io_timeout: float = 10.0          # seconds a socket read or write may block
    read_timeout: float = 10.0        # seconds for a request's headers, and again for its body
    max_queue: int = 64               # requests waiting or running; more get 503
    max_connections: int = 64         # requests being read or answered at once; more get 503
    max_batch: int = 8                # sequences decoded together (batch_decode.py)
    max_request_tokens: int = None    # new tokens one request may ask for in all (n x max_tokens); default 4 * n_ctx

    def check(self):
        """Raise Npgpt2Error naming the flag of a limit out of range."""
        for flag, v in (("--max_body", self.max_body), ("--max_length", self.max_length),
                        ("--max_prompt_tokens", self.max_prompt_tokens), ("--max_queue", self.max_queue),
                        ("--max_connections", self.max_connections), ("--max_batch", self.max_batch),
                        ("--max_request_tokens", self.max_request_tokens)):
            if v is not None and (not isinstance(v, int) or v < 1):
                raise Npgpt2Error(f"{flag} must be an integer >= 1, got {v}")
        if self.max_batch > MAX_BATCH:  # on a CPU more rows gain nothing; each costs a cache row
            raise Npgpt2Error(f"--max_batch must be at most {MAX_BATCH}, got {self.max_batch}")
        for flag, v in (("--timeout", self.timeout), ("--io_timeout", self.io_timeout),
                        ("--read_timeout", self.read_timeout)):
            if not v > 0:  # inf is allowed: no limit
                raise Npgpt2Error(f"{flag} must be > 0 seconds, got {v}")

    def resolved(self, n_ctx):
        return dataclasses.replace(
            self,
            max_length=min(self.max_length or n_ctx - 1, n_ctx - 1),
            max_prompt_tokens=self.max_prompt_tokens or 8 * n_ctx,
            max_request_tokens=self.max_request_tokens or 4 * n_ctx)


def encode_limited(tokenizer, text, limit, what, block_chars=2048):
    """tokenizer.encode(text), refusing (BadRequest) as soon as it passes `limit` tokens:
    the text is encoded in blocks, so a huge text costs about `limit` tokens' work."""
    blocks = (text[i:i + block_chars] for i in range(0, len(text), block_chars))
    tokens = []
    try:
        for ids in tokenizer.encode_iter(blocks, block_chars=block_chars):
            tokens.extend(ids.tolist())
            if len(tokens) > limit:
                raise BadRequest(f"{what} is more than {limit} tokens (the limit)")
    except Npgpt2Error as e:  # e.g. a lone surrogate such as "\ud800" in the JSON string
        raise BadRequest(f"{what}: {e}") from None
    return tokens


class App:
    """What the server offers: pages, jobs for the model worker, limits."""

    def __init__(self, model, tokenizer, limits=None, user_tag=DEFAULT_USER_TAG, bot_tag=DEFAULT_BOT_TAG,
                 model_name=None, system="", host_names=()):
        check_tags(user_tag, bot_tag)
        try:
            check_vocab(tokenizer, user_tag, bot_tag, system)
            self.chat_refusal = None
        except Npgpt2Error as e:  # e.g. the demo's compact vocabulary: it still generates and explains
            self.chat_refusal = str(e)
            log.warning("%s; the chat endpoints will answer 400", e)
        # the names a Host header may give besides IP addresses (which DNS rebinding cannot use)
        self.host_names = {"localhost", *(h.lower().strip("[]") for h in host_names if h)}
        self.model, self.tokenizer = model, tokenizer
        self.n_ctx, self.n_vocab = model.hparams["n_ctx"], model.hparams["n_vocab"]
        limits = limits or Limits()
        limits.check()
        self.limits = limits.resolved(self.n_ctx)
        self.user_tag, self.bot_tag, self.system = user_tag, bot_tag, system  # the transcript (chat.py)
        self.model_name = model_name or (model.source_dir.name if model.source_dir else "model")
        self.pages = {"/": PAGE.read_bytes(), "/explain": explain.page_html().encode("utf-8")}
        self.jobs = {"/v1/generate": self.generate_job, "/v1/chat": self.chat_job,
                     "/v1/explain": self.explain_job}
        self.gets = {"/health": self.health}  # GET paths answered with JSON
        openai_api.add_routes(self)  # /v1/models, /v1/completions, /v1/chat/completions
        # a row takes KV-cache memory only as its positions fill (model.lazy_zeros): refuse up
        # front only a --max_batch whose rows could not even hold their logits
        check_batch_memory(model.hparams, self.limits.max_batch, 1, 1, model.dtype, name="--max_batch")
        self.worker = Worker(model, tokenizer, self.limits.max_queue, self.limits.max_batch)

    def host_allowed(self, host):
        """Host header `host` (name or address, with or without :port) names this server."""
        name = host.strip().lower()
        name = name[1:name.find("]")] if name.startswith("[") else name.rsplit(":", 1)[0] if name.count(":") == 1 \
            else name
        try:
            ipaddress.ip_address(name)
            return True
        except ValueError:
            return name.rstrip(".") in self.host_names

    def methods(self, path):
        """The methods a path answers (empty: no such path)."""
        if path in self.pages or path in self.gets:
            return ["GET", "HEAD"]
        return ["POST"] if path in self.jobs else []

    def error_body(self, path, e):
        """A BadRequest as the JSON body for path: OpenAI's error object on its routes."""
        if path in openai_api.ROUTES:
            return openai_api.error_object(e.status, str(e), e.param, e.code)
        return {"error": str(e)}

    def health(self):
        L = self.limits
        return {"status": "ok", "model": self.model_name, "n_ctx": self.n_ctx, "n_vocab": self.n_vocab,
                "queued": self.worker.pending,
                "limits": {"max_body": L.max_body, "max_length": L.max_length,
                           "max_prompt_tokens": L.max_prompt_tokens, "timeout": L.timeout,
                           "max_connections": L.max_connections, "max_batch": L.max_batch,
                           "max_request_tokens": L.max_request_tokens}}

    def _deadline(self):
        return time.monotonic() + self.limits.timeout

    def generate_job(self, body):
        deadline = self._deadline()
        options = parse_options(body, self.limits, self.n_vocab, self.n_ctx // 2, ("prompt",))
        prompt = string(body, "prompt", "", self.limits.max_body)
        tokens = (encode_limited(self.tokenizer, prompt, self.limits.max_prompt_tokens, '"prompt"')
                  if prompt else [self.tokenizer.eot_token])
        # too long for the context: keep its end, as `npgpt2 prompt` does
        tokens = tokens[-(self.n_ctx - options["length"]):]
        stops = [options["truncate"]] if options["truncate"] else []
        return Job(None, deadline, options["stream"], gen=Generation([self.row(tokens, options)], stops))

    def chat_job(self, body):
        deadline = self._deadline()
        if self.chat_refusal:
            raise BadRequest(self.chat_refusal)
        options = parse_options(body, self.limits, self.n_vocab, self.n_ctx // 4, ("messages",))
        turns = parse_messages(body)
        try:  # encodes only the newest messages that can fit, so its cost is bounded
            tokens, dropped = build_prompt(self.tokenizer, turns, self.n_ctx, options["length"],
                                           self.user_tag, self.bot_tag, self.system)
        except Npgpt2Error as e:
            raise BadRequest(str(e).replace("--length", '"length"')) from None
        stops = stop_strings(self.user_tag, self.bot_tag, options["truncate"])
        return Job(None, deadline, options["stream"],
                   gen=Generation([self.row(tokens, options)], stops, chat=True, extra={"dropped": dropped}))

    @staticmethod
    def row(tokens, o, index=0, **kwargs):
        """One sequence for the batch. An unseeded one may continue a cached prefix (a chat page
        that sends its history again feeds only the new turn); a seeded one starts from a fresh
        cache row, so the same seed gives the same text whatever ran before."""
        return Row(tokens, o["length"], o["temperature"], o["top_k"], o["top_p"], rng=row_rng(o["seed"], index),
                   reuse=o["seed"] is None, **kwargs)

    def explain_job(self, body):
        deadline = self._deadline()
        hp = self.model.hparams
        args = parse_explain(body, self.limits.max_body, hp["n_layer"], self.n_vocab)
        # the report looks at the last n_ctx tokens; a text far longer is refused before any work
        n = len(encode_limited(self.tokenizer, args["text"], self.limits.max_prompt_tokens, '"text"'))
        T = min(n, self.n_ctx)
        layers = 1 if args["layer"] is not None else hp["n_layer"]
        weights = layers * hp["n_head"] * T * (T + 1) // 2  # the causal attention patterns sent back
        if weights > MAX_PATTERN_WEIGHTS:
            which = 'one "layer"' if args["layer"] is not None else f'all {layers} layers (ask for one "layer")'
            raise BadRequest(f'"text" is {T} tokens: the attention patterns of {which} would be {weights:,} '
                             f"numbers, more than the {MAX_PATTERN_WEIGHTS:,} one answer may hold; send a shorter text")
        return Job(explain_task, deadline, stops_at_deadline=False, **args)


def waiting_cap(max_connections):
    """How many connections may wait for their headers: well inside the open-file limit, so
    accept() never fails for lack of file descriptors."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 16
    return max(16, min(4096, soft // 2 - max_connections))


class HTTPServer(socketserver.TCPServer):
    """Accepts connections and hands them to the HeaderGate; a request whose head is in gets
    a thread running one Handler, then its connection goes back to the gate if kept alive."""

    allow_reuse_address = True
    request_queue_size = 128  # the listen backlog; socketserver's 5 resets bursts of clients

    def __init__(self, address, app, family):
        self.address_family = family
        self.app = app
        self.active = 0
        self.idle = threading.Condition()
        self.stopping = False
        super().__init__(address, Handler)
        self.reserve = os.open(os.devnull, os.O_RDONLY)  # freed to answer 503 when accept() hits EMFILE
        self.shed_warned = float("-inf")
        self.gate = HeaderGate(self.dispatch, app.limits.read_timeout, waiting_cap(app.limits.max_connections))

    def process_request(self, sock, addr):
        self.gate.add(sock, addr)

    def dispatch(self, sock, addr, head):
        with self.idle:
            full = self.active >= self.app.limits.max_connections
            if not full:
                self.active += 1
        if full:
            log.warning("%s: %d requests in progress; answered 503", addr[0], self.active)
            send_and_close(sock, canned(HTTPStatus.SERVICE_UNAVAILABLE,
                                        "too many connections; try again later"))
            return
        try:
            threading.Thread(target=self._serve, args=(sock, addr, head), name="npgpt2-request",
                             daemon=True).start()
        except RuntimeError:  # "can't start new thread": the system's limit is below ours
            log.warning("%s: no thread for the request; answered 503", addr[0])
            send_and_close(sock, canned(HTTPStatus.SERVICE_UNAVAILABLE, "too many connections; try again later"))
            with self.idle:
                self.active -= 1
                self.idle.notify_all()

    def _serve(self, sock, addr, head):
        keep = False
        try:
            handler = Handler(sock, addr, self, head)
            keep = not handler.close_connection and not self.stopping
            if keep:
                self.gate.add(sock, addr, handler.rfile.leftover())
        except (ConnectionError, TimeoutError) as e:  # the client closed or stalled mid-request: one line
            log.info("%s: connection lost (%s)", addr[0], e.strerror or type(e).__name__)
        except Exception:  # a bug must cost one connection, not the server
            log.exception("%s: the request failed", addr[0])
        finally:
            if not keep:
                close_socket(sock)
            with self.idle:
                self.active -= 1
                self.idle.notify_all()

    def get_request(self):
        """accept(), but out of file descriptors (EMFILE) the connection waiting would keep
        the listening socket readable and serve_forever would spin: use the descriptor kept
        in reserve to take it and answer 503, then pause a little."""
        try:
            return self.socket.accept()
        except OSError as e:
            if e.errno not in (errno.EMFILE, errno.ENFILE):
                raise
            self._shed()
            raise  # socketserver drops an OSError from get_request

    def _shed(self):
        now = time.monotonic()
        if now - self.shed_warned > 5:
            self.shed_warned = now
            log.warning("out of file descriptors (ulimit -n); answering 503 until some close")
        if self.reserve is not None:
            os.close(self.reserve)
            self.reserve = None
            try:
                sock, _ = self.socket.accept()
                send_and_close(sock, canned(HTTPStatus.SERVICE_UNAVAILABLE, "too many connections; try again later"))
            except OSError:
                pass
            try:
                self.reserve = os.open(os.devnull, os.O_RDONLY)
            except OSError:
                pass
        time.sleep(0.01)  # whatever happened, do not spin on a socket that stays readable

    def refuse_backlog(self):
        """Answer 503 to connections accepted by the kernel but not yet by us."""
        self.socket.setblocking(False)
        while True:
            try:
                sock, _ = self.socket.accept()
            except OSError:
                return
            send_and_close(sock, canned(HTTPStatus.SERVICE_UNAVAILABLE, "the server is shutting down"))

    def wait_idle(self, timeout):
        with self.idle:
            return self.idle.wait_for(lambda: self.active == 0, timeout=timeout)


class Server:
    """A running npgpt2 server: the HTTP server, its gate and the model worker.

        with Server(model, tok, port=0) as s:   # port 0: any free port
            s.start()                           # serve on a background thread
            requests.get(s.url + "health")
    """

    def __init__(self, model, tokenizer, host="127.0.0.1", port=8000, limits=None,
                 user_tag=DEFAULT_USER_TAG, bot_tag=DEFAULT_BOT_TAG, model_name=None, system="", allowed_hosts=()):
        if not isinstance(port, int) or not 0 <= port <= 65535:
            raise Npgpt2Error(f"--port must be from 0 to 65535, got {port}")
        self.app = App(model, tokenizer, limits, user_tag, bot_tag, model_name, system,
                       host_names=(host, *allowed_hosts))
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            self.httpd = HTTPServer((host, port), self.app, family)
        except OSError as e:
            self.app.worker.stop()
            raise Npgpt2Error(f"--host {host} --port {port}: cannot listen ({e.strerror or e})") from None
        self.host, self.port = host, self.httpd.server_address[1]
        self.thread = None
        self.closed = False
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
        """Stop: no new connections (those already waiting get 503), every open stream ends
        with `event: error`, every queued request gets 503, and their threads finish writing."""
        if self.closed:
            return
        self.closed = True
        httpd = self.httpd
        httpd.stopping = True
        if self.thread is not None:
            httpd.shutdown()
            self.thread.join(timeout=10)
        httpd.refuse_backlog()
        httpd.server_close()
        httpd.gate.stop()
        self.app.worker.stop()
        if not httpd.wait_idle(timeout=self.app.limits.io_timeout + 5):
            log.warning("stopped with %d requests still being answered", httpd.active)
        log.info("stopped")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
