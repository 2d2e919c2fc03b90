"""HTTP for `npgpt2 serve`, in small pieces:

- `SocketReader`: a handler's rfile; every read has a deadline, and what it read ahead of
  the current request is kept for the next one.
- `HeaderGate`: one thread with a selector holds every connection until a whole request head
  (request line + headers) has arrived, so a client that sends its headers slowly costs a
  socket, not a thread; a head that takes longer than --read_timeout gets 408.
- `Handler`: one request on its own thread (at most --max_connections at once): route it,
  read and check the JSON body, submit a job to the model worker, write the answer.
- `Results`, `EventStream`: wait for a job's results (noticing a client that went away) and
  write them as Server-Sent Events.
"""
import json
import logging
import os
import queue
import re
import select
import selectors
import socket
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler

from .server_fields import BadRequest

log = logging.getLogger("npgpt2.server")
access_log = logging.getLogger("npgpt2.server.access")

MAX_HEAD = 64 * 1024   # bytes of request line + headers
HEAD_END = re.compile(rb"\r?\n\r?\n")
METHOD = re.compile(r"[A-Z]{1,20}")
UNPRINTABLE = re.compile(r"[^\x20-\x7e]")


def canned(status, message, close=True):
    """A complete JSON answer as bytes, for places with no handler (the gate)."""
    body = json.dumps({"error": message}).encode()
    s = HTTPStatus(status)
    return (b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
            b"Cache-Control: no-store\r\n%s\r\n%s"
            % (s.value, s.phrase.encode(), len(body), b"Connection: close\r\n" if close else b"", body))


def send_and_close(sock, data):
    """Best effort, never blocking: the answer is small enough for the socket's send buffer."""
    try:
        sock.setblocking(False)
        sock.send(data)
    except OSError:
        pass
    close_socket(sock)


def close_socket(sock):
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


def client_gone(sock):
    """True when the peer has closed its end (a readable socket with nothing to read)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


# ---------------------------------------------------------------- reading
class SocketReader:
    """A file-like reader over a socket with a deadline for everything it reads.

    `deadline` (time.monotonic()) bounds the whole of a read, not each recv, so a client
    that sends one byte every few seconds cannot hold the connection's thread for long.
    """

    def __init__(self, sock, data, io_timeout):
        self.sock, self.buf, self.io_timeout = sock, bytearray(data), io_timeout
        self.deadline = float("inf")
        self.closed = False

    def _fill(self):
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request took too long to arrive")
        self.sock.settimeout(min(self.io_timeout, left))
        try:
            chunk = self.sock.recv(1 << 16)
        finally:
            self.sock.settimeout(self.io_timeout)
        self.buf += chunk
        return bool(chunk)

    def readline(self, limit=-1):
        while True:
            end = self.buf.find(b"\n")
            if end >= 0:
                n = end + 1
                break
            if 0 <= limit <= len(self.buf) or not self._fill():
                n = len(self.buf)
                break
        if limit >= 0:
            n = min(n, limit)
        return self._take(n)

    def read(self, n):
        while len(self.buf) < n and self._fill():
            pass
        return self._take(min(n, len(self.buf)))

    def _take(self, n):
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def leftover(self):
        """What arrived after the current request: the start of the next one."""
        return self._take(len(self.buf))

    def close(self):
        self.closed = True


class HeaderGate:
    """Connections waiting for a complete request head, watched by one thread.

    `dispatch(sock, addr, head_bytes)` is called (on the gate's thread) once a head is in;
    the gate then forgets the socket. Connections come back here between the requests of a
    kept-alive connection, with whatever the client already sent of the next request.
    """

    def __init__(self, dispatch, read_timeout, max_waiting):
        self.dispatch, self.read_timeout, self.max_waiting = dispatch, read_timeout, max_waiting
        self.selector = selectors.DefaultSelector()
        self.incoming = queue.SimpleQueue()
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.selector.register(self.wake_r, selectors.EVENT_READ)
        self.waiting = {}  # sock -> [addr, bytearray, deadline]
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="npgpt2-gate", daemon=True)
        self.thread.start()

    def add(self, sock, addr, data=b""):
        self.incoming.put((sock, addr, data))
        self._wake()

    def stop(self):
        self.stopping = True
        self._wake()
        self.thread.join(timeout=10)

    def _wake(self):
        try:
            self.wake_w.send(b"x")
        except OSError:  # the buffer is full: a wake-up is pending anyway
            pass

    def _run(self):
        try:
            while not self.stopping:
                try:
                    self._step()
                except Exception:  # a bug must not stop the server from taking requests
                    log.exception("header gate")
        finally:
            for sock in list(self.waiting):
                self._forget(sock)
                close_socket(sock)
            self.selector.close()
            self.wake_r.close()
            self.wake_w.close()

    def _step(self):
        self._take_incoming()
        now = time.monotonic()
        wait = min((d for _, _, d in self.waiting.values()), default=now + 1) - now
        for key, _ in self.selector.select(timeout=max(0.0, min(wait, 1.0))):
            if key.fileobj is self.wake_r:
                self._drain_wake()
            elif key.fileobj in self.waiting:
                self._receive(key.fileobj)
        self._expire(time.monotonic())

    def _drain_wake(self):
        try:
            while self.wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _take_incoming(self):
        while True:
            try:
                sock, addr, data = self.incoming.get_nowait()
            except queue.Empty:
                return
            if self.stopping:
                close_socket(sock)
            elif len(self.waiting) >= self.max_waiting:
                log.warning("%s: %d connections are waiting for their headers; answered 503",
                            addr[0], len(self.waiting))
                send_and_close(sock, canned(HTTPStatus.SERVICE_UNAVAILABLE, "too many connections"))
            else:
                self.waiting[sock] = [addr, bytearray(data), time.monotonic() + self.read_timeout]
                sock.setblocking(False)
                self.selector.register(sock, selectors.EVENT_READ)
                self._check_head(sock)

    def _receive(self, sock):
        try:
            chunk = sock.recv(1 << 16)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._forget(sock)
            close_socket(sock)
            return
        buf = self.waiting[sock][1]
        buf += chunk
        # look only where a new end can be: a client sending a byte at a time costs linear time
        self._check_head(sock, max(0, len(buf) - len(chunk) - 3))

    def _check_head(self, sock, start=0):
        addr, buf, _ = self.waiting[sock]
        if HEAD_END.search(buf, start):
            self._forget(sock)
            sock.setblocking(True)
            self.dispatch(sock, addr, bytes(buf))
        elif len(buf) > MAX_HEAD:
            self._forget(sock)
            send_and_close(sock, canned(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                                        f"the request line and headers exceed {MAX_HEAD} bytes"))

    def _expire(self, now):
        for sock, (addr, buf, deadline) in list(self.waiting.items()):
            if now > deadline:
                self._forget(sock)
                if buf.strip():  # a request was started and not finished in time
                    log.info("%s: request headers not complete after %gs; answered 408",
                             addr[0], self.read_timeout)
                    send_and_close(sock, canned(HTTPStatus.REQUEST_TIMEOUT, "the request headers took too long"))
                else:  # an idle kept-alive connection
                    close_socket(sock)

    def _forget(self, sock):
        del self.waiting[sock]
        self.selector.unregister(sock)


# ---------------------------------------------------------------- the handler
class Handler(BaseHTTPRequestHandler):
    """One request of one connection, on its own thread. The server (`server.HTTPServer`)
    gives it `.app` (routes, limits, worker) and takes the connection back afterwards."""

    protocol_version = "HTTP/1.1"   # keep-alive for plain answers
    server_version = "npgpt2"

    def __init__(self, sock, addr, server, head):
        self.head, self.status, self.sent = head, None, 0
        self.started = time.monotonic()
        super().__init__(sock, addr, server)

    def setup(self):
        self.app = self.server.app
        self.timeout = self.app.limits.io_timeout   # StreamRequestHandler applies it to the socket
        super().setup()
        self.rfile.close()  # reads go through SocketReader instead, which sees the head first
        self.rfile = SocketReader(self.connection, self.head, self.timeout)

    def handle(self):
        """One request; the server decides what happens to the connection afterwards."""
        self.close_connection = True
        self.handle_one_request()
        self.log_access()

    # ------------------------------------------------------------ logging
    def log_request(self, code="-", size="-"):  # called by send_response
        self.status = int(code) if str(code).isdigit() else code

    def log_message(self, fmt, *args):
        log.debug("%s %s", self.address_string(), fmt % args)

    def log_access(self):
        """One line per request, like other servers' access logs."""
        line = getattr(self, "requestline", "")
        if self.status is None and not line:
            return  # the client connected and went away without a request
        # the request line is the client's: escaped, so it cannot forge a line of the log
        line = UNPRINTABLE.sub(lambda m: m.group().encode("unicode_escape").decode(), line[:200])
        access_log.info('%s "%s" %s %d %.3fs', self.client_address[0], line,
                        self.status or "-", self.sent, time.monotonic() - self.started)

    # ------------------------------------------------------------ routing
    def host_refused(self):
        """Answer 403 (True) when the Host header names a host this server is not (DNS rebinding:
        a page on evil.example whose name now resolves to 127.0.0.1 sends `Host: evil.example`)."""
        host = self.headers.get("Host")
        if host is None or self.app.host_allowed(host):
            return False
        discard_body(self)
        name = UNPRINTABLE.sub("?", host[:100])
        refusal = BadRequest(f"Host {name!r} is not a name this server answers to; start it with "
                             f"--allowed_hosts {name.split(':')[0]} to allow it", HTTPStatus.FORBIDDEN)
        send_json(self, refusal.status, self.app.error_body(self.path_only(), refusal), close=True)
        return True

    def do_GET(self):
        if self.host_refused():
            return
        discard_body(self)  # a GET may have one; left unread it would be taken for the next request
        path = self.path_only()
        page = self.app.pages.get(path)
        if page is not None:
            send_page(self, page)
        elif path in self.app.gets:
            send_json(self, HTTPStatus.OK, self.app.gets[path]())
        else:
            self.not_found_or_not_allowed(path)

    do_HEAD = do_GET

    def do_POST(self):
        if self.host_refused():
            return
        path = self.path_only()
        make_job = self.app.jobs.get(path)
        if make_job is None:
            discard_body(self)
            self.not_found_or_not_allowed(path)
            return
        try:
            job = make_job(read_json(self))
            self.app.worker.submit(job)
        except BadRequest as e:
            send_json(self, e.status, self.app.error_body(path, e), close=self.close_connection)
            return
        (job.respond or (answer_stream if job.stream else answer_json))(self, job)

    def do_other(self):
        if self.host_refused():
            return
        discard_body(self)
        self.not_found_or_not_allowed(self.path_only())

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_other

    def path_only(self):
        return self.path.split("?", 1)[0].split("#", 1)[0]

    def not_found_or_not_allowed(self, path):
        allowed = self.app.methods(path)
        if not allowed:
            send_json(self, HTTPStatus.NOT_FOUND, {"error": f"no such path: {path}"})
        else:
            send_json(self, HTTPStatus.METHOD_NOT_ALLOWED,
                      {"error": f"{self.command} is not supported for {path} (use {' or '.join(allowed)})"},
                      headers={"Allow": ", ".join(allowed)})

    # ------------------------------------------------------------ errors from the base class
    def parse_request(self):
        """The base class's parse, refusing what it lets through: HTTP/0.9 ("GET /", answered
        without a status line) and a method that is not an HTTP token."""
        if not super().parse_request():
            return False
        if not self.request_version.startswith("HTTP/1."):
            self.send_error(HTTPStatus.BAD_REQUEST, f"not an HTTP/1.x request line: {self.requestline[:80]!r}")
            return False
        if not METHOD.fullmatch(self.command):
            self.send_error(HTTPStatus.BAD_REQUEST, f"not an HTTP method: {self.command[:20]!r}")
            return False
        return True

    def send_error(self, code, message=None, explain=None):
        """The base class answers HTML; here everything is JSON. A request line that is not
        HTTP/1.x still gets an HTTP/1.1 status line (the base class would send a bare body
        to what it takes for an HTTP/0.9 client)."""
        if not str(getattr(self, "request_version", "")).startswith("HTTP/1."):
            self.request_version = "HTTP/1.1"
        if code == HTTPStatus.HTTP_VERSION_NOT_SUPPORTED:
            code = HTTPStatus.BAD_REQUEST  # e.g. "HTTP/2.0": this server speaks HTTP/1.x only
            message = f"{message}: this server speaks HTTP/1.0 and HTTP/1.1"
        try:
            send_json(self, code, {"error": message or HTTPStatus(code).phrase}, close=True)
        except OSError:
            self.close_connection = True


# ---------------------------------------------------------------- request bodies
CONTENT_LENGTH = re.compile(r"[0-9]{1,18}")


def content_length(handler):
    """The body's size. On a BadRequest the body is unread, so the connection must close."""
    if "chunked" in handler.headers.get("Transfer-Encoding", "").lower():
        handler.close_connection = True
        raise BadRequest("chunked request bodies are not supported; send Content-Length",
                         HTTPStatus.LENGTH_REQUIRED)
    values = {v.strip() for v in handler.headers.get_all("Content-Length", [])}
    if len(values) > 1:  # which one frames the body? (request smuggling relies on the difference)
        handler.close_connection = True
        raise BadRequest(f"{len(values)} different Content-Length headers")
    value = values.pop() if values else "0"
    if not CONTENT_LENGTH.fullmatch(value):  # int() would also take "+5", "1_0" and " 5"
        handler.close_connection = True
        raise BadRequest("Content-Length is not a number >= 0")
    return int(value)


def skip(rfile, n):
    while n > 0:
        chunk = rfile.read(min(n, 1 << 16))
        if not chunk:
            break
        n -= len(chunk)


def discard_body(handler):
    """Read and drop a body we will not use, so the connection can serve the next request."""
    try:
        n = content_length(handler)
    except BadRequest:
        return
    if n > handler.app.limits.max_body:
        handler.close_connection = True
        return
    handler.rfile.deadline = time.monotonic() + handler.app.limits.read_timeout
    try:
        skip(handler.rfile, n)
    except OSError:
        handler.close_connection = True


def read_json(handler):
    """The body as a JSON object (a dict), within --max_body and --read_timeout."""
    n, limit = content_length(handler), handler.app.limits.max_body
    handler.rfile.deadline = time.monotonic() + handler.app.limits.read_timeout
    try:
        if n > limit:
            # read a moderately large body before answering, so the client sees the 413
            # rather than a connection reset in the middle of its upload
            handler.close_connection = True
            if n <= 16 * limit:
                skip(handler.rfile, n)
            raise BadRequest(f"the body is {n} bytes; the limit is {limit}", HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        raw = handler.rfile.read(n)
    except TimeoutError:
        handler.close_connection = True
        raise BadRequest(f"the body did not arrive within {handler.app.limits.read_timeout:g}s",
                         HTTPStatus.REQUEST_TIMEOUT) from None
    if len(raw) < n:
        handler.close_connection = True
        raise BadRequest("the body ended early")
    # a web page may send any site a "simple" text/plain POST without asking (no CORS preflight);
    # application/json needs the preflight, which this server never grants
    media = handler.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
    if media != "application/json":
        raise BadRequest(f"Content-Type must be application/json, got {media or 'none'!r}",
                         HTTPStatus.UNSUPPORTED_MEDIA_TYPE)
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise BadRequest(f"the body is not valid JSON: {e}") from None
    except RecursionError:  # e.g. [[[[...]]]] nested deeper than Python's stack
        raise BadRequest("the body is not valid JSON: nested too deeply") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body


# ---------------------------------------------------------------- answers
def to_json(obj):
    """Strict JSON (json.dumps would write NaN / Infinity, which no JSON parser reads); a
    non-finite number becomes a 500 naming the cause instead."""
    try:
        return json.dumps(obj, allow_nan=False), None
    except ValueError:
        return (json.dumps({"error": "the model computed NaN or infinite values (are its weights damaged?)"}),
                HTTPStatus.INTERNAL_SERVER_ERROR)


def send_json(handler, status, obj, close=False, headers=None):
    text, error_status = to_json(obj)
    status = error_status or status
    body = text.encode("utf-8")
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(body)))
    handler.send_header("Cache-Control", "no-store")
    for name, value in (headers or {}).items():
        handler.send_header(name, value)
    if close:
        handler.send_header("Connection", "close")
        handler.close_connection = True
    handler.end_headers()
    if handler.command != "HEAD":
        handler.wfile.write(body)
        handler.sent += len(body)


def send_page(handler, body):
    handler.send_response(HTTPStatus.OK)
    handler.send_header("Content-Type", "text/html; charset=utf-8")
    handler.send_header("Content-Length", str(len(body)))
    handler.send_header("Content-Security-Policy",
                        "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'")
    handler.send_header("X-Content-Type-Options", "nosniff")
    handler.end_headers()
    if handler.command != "HEAD":
        handler.wfile.write(body)
        handler.sent += len(body)


class Results:
    """A job's results as its connection thread waits for them."""

    def __init__(self, handler, job):
        self.handler, self.job = handler, job
        self.checked = time.monotonic()

    def next(self):
        """The next result; None once the client has gone (the job is then cancelled)."""
        job = self.job
        # generation ends itself at the deadline (the grace is for a stuck worker); other work
        # is given up on at the deadline
        backstop = job.deadline + (30 if job.stops_at_deadline else 0)
        while True:
            now = time.monotonic()
            if now - self.checked >= 0.2:  # results may flow without pause: look every 0.2 s
                self.checked = now
                if client_gone(self.handler.connection):
                    log.info("%s went away; cancelling its request", self.handler.client_address[0])
                    self.give_up()
                    return None
            if now > backstop:
                job.cancelled.set()
                return ("error", HTTPStatus.GATEWAY_TIMEOUT, "timed out (--timeout)")
            try:
                return job.out.get(timeout=0.2)
            except queue.Empty:
                pass

    def give_up(self):
        self.job.cancelled.set()
        self.handler.close_connection = True


def plain_error(status, message):
    """npgpt2's error body (OpenAI's routes pass openai_api.error_object instead)."""
    return {"error": message}


def answer_json(handler, job, error_body=plain_error):
    results = Results(handler, job)
    item = results.next()
    while item is not None and item[0] not in ("done", "error"):
        item = results.next()
    try:
        if item is not None and item[0] == "done":
            send_json(handler, HTTPStatus.OK, item[1])
        elif item is not None:
            send_json(handler, item[1], error_body(item[1], item[2]))
    except OSError as e:  # gone after all, or too slow to read even this
        log.info("%s: answer not delivered (%s)", handler.client_address[0], e)
        handler.close_connection = True


class EventStream:
    """Server-Sent Events on a handler's connection. HTTP/1.1 clients get chunked encoding:
    every event reaches them as its own chunk (clients that read a close-delimited body in
    fixed-size blocks would wait for several events) and the connection can be kept."""

    def __init__(self, handler):
        self.handler = handler
        self.chunked = handler.request_version == "HTTP/1.1"
        handler.send_response(HTTPStatus.OK)
        handler.send_header("Content-Type", "text/event-stream; charset=utf-8")
        handler.send_header("Cache-Control", "no-store")
        handler.send_header("X-Accel-Buffering", "no")
        if self.chunked:
            handler.send_header("Transfer-Encoding", "chunked")
        else:
            handler.send_header("Connection", "close")  # the stream ends when the connection does
            handler.close_connection = True
        handler.end_headers()

    def event(self, name, obj):
        head = f"event: {name}\n" if name else ""
        text, error_status = to_json(obj)
        if error_status:
            head = "event: error\n"
        self._write(f"{head}data: {text}\n\n".encode("utf-8"))

    def data(self, text):
        """A bare `data: text` event (OpenAI's `data: [DONE]`)."""
        self._write(f"data: {text}\n\n".encode("utf-8"))

    def frame(self, data):
        return b"%x\r\n%s\r\n" % (len(data), data) if self.chunked else data

    def _write(self, data):
        self.raw(self.frame(data))

    def raw(self, data):
        """Bytes already framed (Lane's rest of an event)."""
        self.handler.wfile.write(data)
        self.handler.wfile.flush()
        self.handler.sent += len(data)

    def encode(self, write, item):
        """The bytes write(self, item) would send, sent by nobody (for Lane)."""
        frames = Frames(self.chunked)
        write(frames, item)
        return b"".join(frames.parts)

    def end(self):
        if self.chunked:
            self.handler.wfile.write(b"0\r\n\r\n")
        self.handler.wfile.flush()


class Frames(EventStream):
    """An EventStream that keeps its events' bytes instead of sending them."""

    def __init__(self, chunked):  # no handler, no headers
        self.chunked, self.parts = chunked, []

    def _write(self, data):
        self.parts.append(self.frame(data))


class Lane:
    """A stream's events written by the model worker itself (Job.emit) while the socket takes
    each one whole at once.

    Why: otherwise every token of every stream wakes its connection thread, which must get a
    core and the GIL from the model's threads, encode the event and write it; with 8 streams
    that is 8 context switches and GIL hand-overs per decode step, on cores the model is using.
    The worker never waits here: the socket's descriptor is non-blocking (the socket has a
    timeout), and what it does not take at once (a slow reader, a full buffer, a closed
    connection) goes on the job's queue for the connection thread, which writes it with its
    timeout as before. The lane stays shut from then until that thread has emptied the queue,
    so the events keep their order; it is shut for good (detach) before the connection thread
    lets go of the socket, so the worker never writes to a descriptor that may be reused.
    Used with job.lock held (Job.emit, attach, reopen, detach).
    """

    def __init__(self, handler, stream, write, job):
        self.fd, self.stream, self.write, self.job = handler.connection.fileno(), stream, write, job
        self.open = False   # the queue was empty when the connection thread last looked
        self.sent = 0       # bytes the worker wrote (the access log's count)

    def offer(self, item):
        """Worker thread: write item now if the lane is open and the socket takes it whole."""
        if not self.open:
            self.job.out.put(item)
            return
        data = self.stream.encode(self.write, item)
        try:
            n = os.write(self.fd, data)
        except OSError:  # full (BlockingIOError) or gone: the connection thread finds out which
            n = 0
        self.sent += n
        if n < len(data):
            self.open = False
            self.job.out.put(("raw", data[n:]))

    def attach(self):
        with self.job.lock:
            self.job.lane = self

    def reopen(self):
        """Connection thread, after writing what it took: open the lane if nothing is queued."""
        with self.job.lock:
            self.open = self.job.out.empty()

    def detach(self):
        with self.job.lock:
            self.job.lane, self.open = None, False
        self.stream.handler.sent += self.sent


def write_event(stream, item):
    """npgpt2's events: `data: {"text"}` per piece, then `event: done` or `event: error`.
    Returns True after the last one."""
    if item[0] == "text":
        stream.event(None, {"text": item[1]})
    elif item[0] == "done":
        stream.event("done", item[1])
    elif item[0] == "error":
        stream.event("error", {"error": item[2]})
    return item[0] in ("done", "error")


def answer_stream(handler, job, error_body=plain_error, write=write_event):
    results = Results(handler, job)
    item = results.next()
    if item is None:
        return
    if item[0] == "error":  # before any output: a plain JSON error with its status
        send_json(handler, item[1], error_body(item[1], item[2]))
        return
    lane = None
    try:
        stream = EventStream(handler)
        if handler.connection.gettimeout():  # a non-blocking descriptor: the worker may write (Lane)
            lane = Lane(handler, stream, write, job)
            lane.attach()
        while True:
            item = results.next()
            if item is None:
                return
            if item[0] == "raw":
                stream.raw(item[1])
            elif write(stream, item):
                break
            if lane is not None:
                lane.reopen()
        stream.end()
    except OSError as e:  # includes a write that timed out: a reader too slow to keep
        log.info("%s: stream ended early (%s); cancelling its request", handler.client_address[0], e)
        results.give_up()
    finally:
        if lane is not None:
            lane.detach()
