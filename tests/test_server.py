"""`npgpt2 serve` over real HTTP on a free loopback port, with the `full` fixture model
(GPT-2's 50257-token vocabulary, n_ctx 64, tiny width).

Expected texts are never computed by npgpt2 outside the server: the checks compare the
server with itself across modes (streaming vs not, alone vs among 20 concurrent clients)
and check the protocol (status codes, JSON error bodies, SSE framing, limits).
"""
import json
import logging
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

import npgpt2
from npgpt2.errors import Npgpt2Error
from npgpt2.server import Limits, Server

FULL = Path(__file__).parent / "fixtures" / "full"
JSON = {"Content-Type": "application/json"}  # what the server requires of a POST body
T = 30  # seconds: the most any single HTTP call in these tests may take


@pytest.fixture(autouse=True)
def no_proxy_for_loopback(monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


def load():
    return npgpt2.load_model(FULL), npgpt2.load_tokenizer(FULL)


@pytest.fixture(scope="module")
def server():
    model, tok = load()
    with Server(model, tok, host="127.0.0.1", port=0) as s:
        s.start()
        yield s


def slowed(model, seconds, calls=None):
    """Make every forward pass of this model instance take at least `seconds`."""
    plain = model.forward

    def forward(*args, **kwargs):
        if calls is not None:
            calls.append(time.monotonic())
        time.sleep(seconds)
        return plain(*args, **kwargs)
    model.forward = forward
    return model


def events(resp):
    """Parse a text/event-stream body -> [(event name, data object)], checking the framing."""
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    raw = b"".join(resp.iter_content(chunk_size=None)).decode("utf-8")
    assert raw.endswith("\n\n")
    out = []
    for block in raw[:-2].split("\n\n"):
        name, data = "message", None
        for line in block.split("\n"):
            key, _, value = line.partition(": ")
            if key == "event":
                name = value
            else:
                assert key == "data", f"unexpected SSE line {line!r}"
                data = json.loads(value)
        out.append((name, data))
    return out


def post(url, body, **kw):
    return requests.post(url, json=body, timeout=T, **kw)


def streamed(url, body):
    """POST with stream=true -> (concatenated text pieces, the done event's data)."""
    with requests.post(url, json={**body, "stream": True}, timeout=T, stream=True) as r:
        assert r.status_code == 200
        evs = events(r)
    assert evs[-1][0] == "done" and all(name == "message" for name, _ in evs[:-1])
    assert all(set(d) == {"text"} and d["text"] for _, d in evs[:-1])
    return "".join(d["text"] for _, d in evs[:-1]), evs[-1][1]


# ---------------------------------------------------------------- basics
def test_health_page_and_unknown_paths(server):
    r = requests.get(server.url + "health", timeout=T)
    assert r.status_code == 200
    h = r.json()
    assert h["status"] == "ok" and h["n_ctx"] == 64 and h["n_vocab"] == 50257

    r = requests.get(server.url, timeout=T)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/html")
    page = r.text
    assert "/v1/chat" in page and "getReader" in page
    # self-contained: nothing loaded from another host
    assert "http://" not in page and "https://" not in page and "<link" not in page

    for method, path in [("get", "nope"), ("post", "v1/nope"), ("delete", "nope")]:
        r = getattr(requests, method)(server.url + path, timeout=T)
        assert r.status_code == 404, path
        assert "error" in r.json()
    # a path that exists, with the wrong method: 405 and the methods it takes
    for method, path, allow in [("get", "v1/generate", "POST"), ("get", "v1/chat", "POST"),
                                ("delete", "v1/generate", "POST"), ("post", "health", "GET, HEAD"),
                                ("put", "", "GET, HEAD")]:
        r = getattr(requests, method)(server.url + path, timeout=T)
        assert r.status_code == 405 and "error" in r.json(), (method, path)
        assert r.headers["Allow"] == allow


def test_binds_loopback_by_default():
    model, tok = load()
    with Server(model, tok, port=0) as s:
        assert s.httpd.server_address[0] == "127.0.0.1"


def test_generate_answer_shape(server):
    r = post(server.url + "v1/generate", {"prompt": "Hello, my name is", "length": 7, "seed": 3})
    assert r.status_code == 200
    a = r.json()
    assert set(a) == {"text", "tokens", "finish_reason"}
    assert len(a["tokens"]) == 7 and a["finish_reason"] == "length"
    assert all(isinstance(t, int) and 0 <= t < 50257 for t in a["tokens"])
    # the text is the decoding of exactly those tokens (no truncate asked for)
    assert a["text"] == npgpt2.load_tokenizer(FULL).decode(a["tokens"])


def test_seed_repeats_and_differs(server):
    body = {"prompt": "The cat", "length": 12, "seed": 11, "temperature": 1.0, "top_k": 50}
    a = post(server.url + "v1/generate", body).json()
    b = post(server.url + "v1/generate", body).json()
    c = post(server.url + "v1/generate", {**body, "seed": 12}).json()
    assert a == b
    assert a["tokens"] != c["tokens"]


def test_streaming_equals_non_streaming(server):
    for path, body in [
        ("v1/generate", {"prompt": "Once upon a time", "length": 20, "seed": 5, "top_p": 0.9}),
        ("v1/generate", {"prompt": "", "length": 15, "seed": 6}),
        ("v1/chat", {"messages": [{"role": "user", "content": "hi there"},
                                  {"role": "assistant", "content": "hello!"},
                                  {"role": "user", "content": "how are you?"}],
                     "length": 20, "seed": 7}),
    ]:
        plain = post(server.url + path, body)
        assert plain.status_code == 200
        plain = plain.json()
        text, done = streamed(server.url + path, body)
        assert done == plain
        # chat replies are shown stripped; the pieces are the text as it was generated
        assert (text.strip() if path == "v1/chat" else text) == plain["text"]


def test_stream_arrives_piece_by_piece():
    model, tok = load()
    slowed(model, 0.05)  # 20 tokens take over a second
    with Server(model, tok, port=0) as s, requests.Session() as http:
        s.start()
        arrivals = []
        with http.post(s.url + "v1/generate", json={"prompt": "x", "length": 20, "seed": 1, "stream": True},
                       stream=True, timeout=T) as r:
            assert r.headers.get("Transfer-Encoding") == "chunked"
            for chunk in r.iter_content(chunk_size=None):
                arrivals.append((time.monotonic(), chunk))
        body = b"".join(c for _, c in arrivals)
        assert body.count(b"\n\n") == body.count(b"data: ") >= 2
        # the first events came well before the last, not all at the end
        pieces = [t for t, c in arrivals if b"data: " in c]
        assert len(pieces) >= 5 and pieces[-1] - pieces[0] > 0.5
        # the same connection serves the next request
        assert http.post(s.url + "v1/generate", json={"prompt": "y", "length": 2}, timeout=T).status_code == 200


def test_unseeded_requests_reuse_the_cache_and_seeded_ones_do_not():
    model, tok = load()
    starts = []  # (cache position, tokens fed) of every prefill
    plain = model.forward

    def forward(tokens, cache=None, last_only=False):
        if last_only:
            starts.append((cache.length, tokens.shape[1]))
        return plain(tokens, cache=cache, last_only=last_only)
    model.forward = forward
    with Server(model, tok, port=0) as s:
        s.start()
        first = [{"role": "user", "content": "hello there"}]
        a = post(s.url + "v1/chat", {"messages": first, "length": 6, "top_k": 40}).json()
        second = first + [{"role": "assistant", "content": a["text"]}, {"role": "user", "content": "go on"}]
        for seed in (None, 5, 5, None):
            assert post(s.url + "v1/chat", {"messages": second, "length": 6, "seed": seed, "top_k": 40}).ok
        fed_from = [start for start, _ in starts]
        # the 2nd request continues after the 1st one's tokens
        assert fed_from[0] == 0 and fed_from[1] > 0
        # seeded requests always start from a fresh cache
        assert fed_from[2] == 0 and fed_from[3] == 0
        # the last one repeats the 2nd's prompt: the shared cache, which the seeded requests
        # left alone, has all of it but the token whose logits are needed
        assert starts[4] == (fed_from[1] + starts[1][1] - 1, 1)


def test_truncate_stops_the_text(server):
    body = {"prompt": "a", "length": 40, "seed": 8}
    full = post(server.url + "v1/generate", body).json()
    cut_at = full["text"][10:14]  # some text from the middle of the answer
    cut = post(server.url + "v1/generate", {**body, "truncate": cut_at}).json()
    assert cut["finish_reason"] == "stop"
    assert cut["text"] == full["text"][:full["text"].index(cut_at)]
    assert len(cut["tokens"]) < 40


def test_chat_answer_and_history_limit(server):
    msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"message number {i} here"}
            for i in range(21)]
    r = post(server.url + "v1/chat", {"messages": msgs, "length": 16, "seed": 1})
    assert r.status_code == 200
    a = r.json()
    assert a["message"] == {"role": "assistant", "content": a["text"]}
    assert a["text"] == a["text"].strip()
    # 21 messages of ~7 tokens cannot fit in 64 - 16 positions: the oldest were left out
    assert 0 < a["dropped"] < 21
    # a message that alone is too long for the context is a client error
    r = post(server.url + "v1/chat", {"messages": [{"role": "user", "content": "word " * 80}], "length": 16})
    assert r.status_code == 400 and "context" in r.json()["error"]


# ---------------------------------------------------------------- concurrency
def test_twenty_concurrent_clients_get_their_own_complete_answers(server):
    def body(i):
        return {"prompt": f"Client {i} says", "length": 12, "seed": 100 + i, "top_k": 40}

    # every answer alone first, one after another
    alone = [post(server.url + "v1/generate", body(i)).json() for i in range(20)]
    assert len({a["text"] for a in alone}) == 20  # 20 different answers to tell apart

    start = threading.Barrier(20)

    def client(i):
        start.wait(timeout=T)
        if i % 2:  # half of them stream
            text, done = streamed(server.url + "v1/generate", body(i))
            assert text == done["text"]
            return done
        r = post(server.url + "v1/generate", body(i))
        assert r.status_code == 200
        return r.json()

    with ThreadPoolExecutor(20) as pool:
        together = list(pool.map(client, range(20)))
    for i in range(20):
        assert together[i] == alone[i], f"client {i}"
        assert len(together[i]["tokens"]) == 12 and together[i]["finish_reason"] == "length"


def test_keep_alive_connection_serves_many_requests(server):
    with requests.Session() as s:
        for i in range(3):
            r = s.post(server.url + "v1/generate", json={"prompt": "x", "length": 2, "seed": i}, timeout=T)
            assert r.status_code == 200 and len(r.json()["tokens"]) == 2


def raw_post(port, path, body):
    """Send a POST on a plain socket and return the socket, for clients that misbehave."""
    data = json.dumps(body).encode()
    c = socket.create_connection(("127.0.0.1", port), timeout=T)
    c.sendall(b"POST /%s HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n%s" % (path.encode(), len(data), data))
    return c


@pytest.mark.parametrize("stream", [True, False])
def test_vanished_client_is_cancelled_and_does_not_block_others(stream):
    calls = []
    model, tok = load()
    slowed(model, 0.05, calls)
    with Server(model, tok, port=0) as s:
        s.start()
        # a client that asks for 63 tokens (> 3 s) and hangs up: after the first piece of a
        # stream, or while waiting for a plain answer
        c = raw_post(s.port, "v1/generate", {"prompt": "x", "length": 63, "seed": 1, "stream": stream})
        if stream:
            got = b""
            while b"data: " not in got:
                got += c.recv(4096)
            assert got.startswith(b"HTTP/1.1 200 ")
        else:
            deadline = time.monotonic() + T
            while not calls and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.3)
        c.close()
        t0 = time.monotonic()
        ok = post(s.url + "v1/generate", {"prompt": "y", "length": 3, "seed": 2})
        assert ok.status_code == 200 and len(ok.json()["tokens"]) == 3
        # the other client waited for at most a few steps of the abandoned one
        assert time.monotonic() - t0 < 2.0
        assert len(calls) < 30, f"{len(calls)} forward passes: the abandoned request was not stopped"


def test_silent_and_non_reading_clients_do_not_block_others():
    model, tok = load()
    with Server(model, tok, port=0, limits=Limits(io_timeout=1)) as s:
        s.start()
        # one sends half a request and then nothing
        half = socket.create_connection(("127.0.0.1", s.port), timeout=T)
        half.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"pro")
        # one asks for a long stream and never reads it
        mute = raw_post(s.port, "v1/generate", {"prompt": "z", "length": 60, "seed": 3, "stream": True})
        try:
            t0 = time.monotonic()
            for i in range(3):
                r = post(s.url + "v1/generate", {"prompt": "ok", "length": 5, "seed": i})
                assert r.status_code == 200 and len(r.json()["tokens"]) == 5
            assert time.monotonic() - t0 < 5
            # the half-sent request is given up after io_timeout: the server closes it
            half.settimeout(5)
            while half.recv(1 << 16):  # raises socket.timeout if the server keeps it open
                pass
            deadline = time.monotonic() + 10
            while s.app.worker.pending and time.monotonic() < deadline:
                time.sleep(0.05)
            assert s.app.worker.pending == 0  # the worker is free again
        finally:
            half.close()
            mute.close()


def test_per_request_timeout():
    model, tok = load()
    slowed(model, 0.5)  # a forward pass takes 0.5 s, the timeout is 0.6 s
    with Server(model, tok, port=0, limits=Limits(timeout=0.6)) as s:
        s.start()
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(post, s.url + "v1/generate", {"prompt": "x", "length": 60, "seed": 1})
            time.sleep(0.2)
            second = pool.submit(post, s.url + "v1/generate", {"prompt": "y", "length": 5, "seed": 1})
            a, r = first.result(), second.result()
        # the first ran out of time while generating: what was made so far, marked "timeout"
        assert a.status_code == 200
        assert a.json()["finish_reason"] == "timeout"
        assert 1 <= len(a.json()["tokens"]) < 60
        # the second ran out of time waiting behind it: 503 with a JSON message
        assert r.status_code == 503 and "queue" in r.json()["error"]


@pytest.mark.parametrize("limit,then,expected", [
    ("max_queue", lambda url: post(url + "v1/generate", {"prompt": "y", "length": 2}), "busy"),
    # one request in progress takes the only connection: even /health waits for none
    ("max_connections", lambda url: requests.get(url + "health", timeout=T), "connections")])
def test_busy_server_answers_503(limit, then, expected):
    model, tok = load()
    slowed(model, 0.05)
    with Server(model, tok, port=0, limits=Limits(**{limit: 1})) as s:
        s.start()
        with ThreadPoolExecutor(1) as pool:
            busy = pool.submit(post, s.url + "v1/generate", {"prompt": "x", "length": 20, "seed": 1})
            deadline = time.monotonic() + 10
            while s.app.worker.pending == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            r = then(s.url)
            assert r.status_code == 503 and expected in r.json()["error"]
            assert busy.result().status_code == 200
        assert requests.get(s.url + "health", timeout=T).status_code == 200


# ---------------------------------------------------------------- bad input
BAD_GENERATE = [
    {"prompt": "x", "length": 0},
    {"prompt": "x", "length": 64},            # n_ctx - 1 = 63 is the most
    {"prompt": "x", "length": "10"},
    {"prompt": "x", "length": True},
    {"prompt": "x", "length": 2.5},
    {"prompt": "x", "temperature": -0.1},
    {"prompt": "x", "temperature": "hot"},
    {"prompt": "x", "top_k": -1},
    {"prompt": "x", "top_k": 50258},
    {"prompt": "x", "top_p": 0},
    {"prompt": "x", "top_p": 1.5},
    {"prompt": "x", "seed": -1},
    {"prompt": "x", "seed": 1.5},
    {"prompt": "x", "seed": "1"},
    {"prompt": "x", "stream": "yes"},
    {"prompt": "x", "truncate": 5},
    {"prompt": 5},
    {"prompt": ["x"]},
    {"prompt": "x", "lenght": 5},             # a typo is reported, not ignored
    {"prompt": "x", "temperature": 10**400},  # beyond float range: math.isfinite would raise
    {"prompt": "x", "top_p": -10**400},
]
BAD_CHAT = [
    {},
    {"messages": []},
    {"messages": "hi"},
    {"messages": [{"role": "system", "content": "x"}]},
    {"messages": [{"role": "user", "content": 5}]},
    {"messages": [{"role": "user"}]},
    {"messages": ["hi"]},
    {"messages": [{"role": "user", "content": "a", "name": "b"}]},
    {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
    {"messages": [{"role": "user", "content": "a"}], "length": -3},
]
BAD_RAW = [b"", b"{", b"[1, 2]", b'"text"', b"\xff\xfe", b'{"prompt": "x", "temperature": NaN}',
           b'{"prompt": "x", "top_p": Infinity}',
           b"[" * 100_000 + b"]" * 100_000]  # deeper than json's recursion limit


@pytest.mark.parametrize("path,body", [("v1/generate", b) for b in BAD_GENERATE] + [("v1/chat", b) for b in BAD_CHAT])
def test_bad_fields_get_400_with_a_message(server, path, body):
    r = post(server.url + path, body)
    assert r.status_code == 400, r.text
    assert r.headers["Content-Type"] == "application/json"
    msg = r.json()["error"]
    assert isinstance(msg, str) and msg and "\n" not in msg


@pytest.mark.parametrize("raw", BAD_RAW, ids=lambda raw: repr(raw[:24]))
def test_bad_json_gets_400(server, raw):
    r = requests.post(server.url + "v1/generate", data=raw, timeout=T,
                      headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]


@pytest.mark.parametrize("path,body", [
    ("v1/generate", b'{"prompt": "caf\\udce9", "length": 2}'),
    ("v1/chat", b'{"messages": [{"role": "user", "content": "\\ud800"}], "length": 2}')])
def test_lone_surrogate_in_text_gets_400(server, path, body):
    r = requests.post(server.url + path, data=body, timeout=T, headers=JSON)
    assert r.status_code == 400 and "surrogate" in r.json()["error"], r.text


def test_error_messages_do_not_echo_huge_values(server):
    for body in ({"prompt": "x", "temperature": 10**400}, {"prompt": "x", "top_k": 10**400}):
        r = post(server.url + "v1/generate", body)
        assert r.status_code == 400 and len(r.json()["error"]) < 200, r.text


def test_limits_and_the_server_keeps_serving(server):
    # a body over max_body
    r = requests.post(server.url + "v1/generate", data=b'{"prompt": "' + b"a" * 300_000 + b'"}', timeout=T, headers=JSON)
    assert r.status_code == 413 and "limit" in r.json()["error"]
    # a prompt over max_prompt_tokens (8 * n_ctx = 512)
    r = post(server.url + "v1/generate", {"prompt": " hello" * 600, "length": 4})
    assert r.status_code == 400 and "tokens" in r.json()["error"]
    # a Content-Length that is not a number, and a request line that is not HTTP
    for raw in [b"POST /v1/generate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: ten\r\n\r\n",
                b"NOT HTTP\r\n\r\n"]:
        with socket.create_connection(("127.0.0.1", server.port), timeout=T) as c:
            c.sendall(raw)
            answer = b""
            while chunk := c.recv(4096):  # the server answers and closes
                answer += chunk
        assert b'{"error": ' in answer
        if raw.startswith(b"POST"):
            assert answer.startswith(b"HTTP/1.1 400 ")
    # and still serving
    r = post(server.url + "v1/generate", {"prompt": "still there?", "length": 3, "seed": 1})
    assert r.status_code == 200 and len(r.json()["tokens"]) == 3


def test_bad_settings_are_refused():
    model, tok = load()
    with pytest.raises(Npgpt2Error, match="--timeout"):
        Server(model, tok, port=0, limits=Limits(timeout=0))
    with pytest.raises(Npgpt2Error, match="--max_queue"):
        Server(model, tok, port=0, limits=Limits(max_queue=0))
    with pytest.raises(Npgpt2Error, match="--max_connections"):
        Server(model, tok, port=0, limits=Limits(max_connections=0))
    with pytest.raises(Npgpt2Error, match="--read_timeout"):
        Server(model, tok, port=0, limits=Limits(read_timeout=float("nan")))
    with pytest.raises(Npgpt2Error, match="--user_tag"):
        Server(model, tok, port=0, user_tag="")
    with pytest.raises(Npgpt2Error, match="--port"):
        Server(model, tok, port=70000)
    with Server(model, tok, port=0) as s:  # the port is taken
        with pytest.raises(Npgpt2Error, match="cannot listen"):
            Server(model, tok, port=s.port)


def test_cli_serve_starts_answers_and_stops_on_sigterm():
    import signal
    import subprocess
    import sys
    proc = subprocess.Popen([sys.executable, "-m", "npgpt2.cli", "serve", "--models_dir", str(FULL.parent),
                             "--model_name", "full", "--port", "0", "--max_length", "5"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # "serving full on http://127.0.0.1:PORT/ (Ctrl-C stops)"
        url = line.split(" on ")[1].split()[0]
        assert url.startswith("http://127.0.0.1:")
        assert requests.get(url + "health", timeout=T).json()["limits"]["max_length"] == 5
        r = post(url + "v1/generate", {"prompt": "hi", "length": 6})
        assert r.status_code == 400 and "from 1 to 5" in r.json()["error"]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
        assert proc.returncode == 0 and "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


# ---------------------------------------------------------------- hostile HTTP
def raw_exchange(port, data, timeout=T):
    """Send raw bytes, read until the server closes -> the bytes it answered."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as c:
        c.sendall(data)
        answer = b""
        while chunk := c.recv(4096):
            answer += chunk
    return answer


@pytest.mark.parametrize("role", [["user"], {"user": 1}, 5, None, True])
def test_chat_role_that_is_not_a_string_gets_400(server, role):
    r = post(server.url + "v1/chat", {"messages": [{"role": role, "content": "hi"}], "length": 2})
    assert r.status_code == 400 and '"role"' in r.json()["error"], r.text


def test_deeply_nested_list_in_a_number_field_gets_400(server, caplog):
    # json.loads accepts nesting up to Python's recursion limit minus the stack in use;
    # printing the value back in the error message needs a few frames more
    with requests.Session() as http, caplog.at_level(logging.INFO, logger="npgpt2"):
        for field in ("length", "temperature", "top_p"):
            for depth in range(950, 1000):
                raw = b'{"prompt": "x", "%s": %s%s}' % (field.encode(), b"[" * depth, b"]" * depth)
                r = http.post(server.url + "v1/generate", data=raw, timeout=T, headers=JSON)
                assert r.status_code == 400, (field, depth, r.text)
                assert len(r.json()["error"]) < 200
    assert not [rec for rec in caplog.records if rec.exc_info or rec.levelno >= logging.ERROR]


def test_conflicting_content_lengths_get_400(server):
    body = b'{"prompt": "x", "length": 2}'
    for lengths in [(len(body), 2), (2, len(body)), (len(body), len(body) + 1)]:
        head = b"".join(b"Content-Length: %d\r\n" % n for n in lengths)
        answer = raw_exchange(server.port, b"POST /v1/generate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n%s\r\n%s" % (head, body))
        assert answer.startswith(b"HTTP/1.1 400 ") and b"Content-Length headers" in answer, answer[:300]
    for value in [b"+28", b"2_8", b"-1", b"0x1c", b"28 28"]:  # int() would take the first two
        answer = raw_exchange(server.port, b"POST /v1/generate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: %s\r\n\r\n%s"
                              % (value, body))
        assert answer.startswith(b"HTTP/1.1 400 "), (value, answer[:300])
    # the same value twice is one length: served
    answer = raw_exchange(server.port, b"POST /v1/generate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nConnection: close\r\n"
                          b"Content-Length: %d\r\nContent-Length: %d\r\n\r\n%s" % (len(body), len(body), body))
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]


@pytest.mark.parametrize("line", [b"NOT HTTP", b"GET / HTTP/2.0", b"PRI * HTTP/2.0", b"GET /", b"\x16\x03\x01\x02\x00",
                                  b"GET / HTTP/1.1 extra", b"GET / HTTQ/1.1", b"G\xffT / HTTP/1.1"])
def test_bad_request_line_gets_an_http_400_status_line(server, line):
    answer = raw_exchange(server.port, line + b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:300]
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"Content-Type: application/json" in head and json.loads(body)["error"]


def test_access_log_line_per_request_and_stopped_line(caplog):
    model, tok = load()
    with caplog.at_level(logging.INFO, logger="npgpt2"):
        with Server(model, tok, port=0) as s:
            s.start()
            assert post(s.url + "v1/generate", {"prompt": "x", "length": 2, "seed": 1}).status_code == 200
            assert requests.get(s.url + "nope", timeout=T).status_code == 404
            raw_exchange(s.port, b"NOT HTTP\r\n\r\n")
            raw_exchange(s.port, b"GET /\x1b[2J\rfake HTTP/1.1\r\n\r\n")  # no terminal escapes into the log
    access = [r.getMessage() for r in caplog.records if r.name == "npgpt2.server.access"]
    assert len(access) == 4, access
    assert access[3].startswith('127.0.0.1 "GET /\\x1b[2J\\rfake HTTP/1.1" 400 '), access[3]
    assert access[0].startswith('127.0.0.1 "POST /v1/generate HTTP/1.1" 200 ')
    assert access[1].startswith('127.0.0.1 "GET /nope HTTP/1.1" 404 ')
    assert access[2].startswith('127.0.0.1 "NOT HTTP" 400 ')
    assert caplog.records[-1].getMessage() == "stopped"


def test_prompt_limit_stops_tokenizing_early(server, monkeypatch):
    tok = server.app.tokenizer
    encoded = []  # characters given to the BPE engine
    plain = tok._encode

    def counting(text, *args):
        encoded.append(len(text))
        return plain(text, *args)
    monkeypatch.setattr(tok, "_encode", counting)
    prompt = " hello" * 40_000  # 240 KB, within --max_body; 40,000 tokens against a limit of 512
    r = post(server.url + "v1/generate", {"prompt": prompt, "length": 4})
    assert r.status_code == 400 and "512 tokens" in r.json()["error"]
    assert 0 < sum(encoded) < 20_000, f"{sum(encoded)} characters tokenized"
    # below the limit every character is tokenized once
    encoded.clear()
    text = "Once upon a time, " * 20
    assert post(server.url + "v1/generate", {"prompt": text, "length": 3, "seed": 4}).status_code == 200
    assert sum(encoded) == len(text)


@pytest.mark.parametrize("text", ["", "a", "Hello, world!\n\n  It's   42 o'clock.\r\n" * 300,
                                  "x" * 5000 + " y" * 3000, "caf\u00e9 \U0001F600 " * 800, "<|endoftext|>" * 400])
def test_encode_limited_gives_encodes_ids(text):
    from npgpt2.server import encode_limited
    from npgpt2.server_fields import BadRequest
    tok = npgpt2.load_tokenizer(FULL)
    expected = tok.encode(text)
    assert encode_limited(tok, text, len(expected), "text") == expected
    if expected:
        with pytest.raises(BadRequest, match="more than"):
            encode_limited(tok, text, len(expected) - 1, "text")


def test_tiny_temperature_is_greedy(server):
    # as --temperature (sampling.check_temperature): logits / t overflows float64, which is greedy
    for path, body in (("v1/generate", {"prompt": "The", "length": 6, "seed": 2}),
                       ("v1/chat", {"messages": [{"role": "user", "content": "The"}], "length": 6, "seed": 2})):
        greedy = post(server.url + path, {**body, "temperature": 0}).json()
        for t in (1e-320, 5e-324, 1e-300):
            r = post(server.url + path, {**body, "temperature": t})
            assert r.status_code == 200 and r.json() == greedy, (path, t, r.text)


def test_slowloris_holds_no_threads_and_others_stay_fast():
    """A bounded slowloris on 127.0.0.1: 60 connections that each send a header line a byte
    at a time, for at most 4 s; the server's cap is 4 connections and headers get 1.5 s."""
    model, tok = load()
    cap, slow_count = 4, 60
    with Server(model, tok, port=0, limits=Limits(max_connections=cap, read_timeout=1.5)) as s:
        s.start()
        assert requests.get(s.url + "health", timeout=T).status_code == 200
        threads_before = threading.active_count()
        slow = []
        try:
            for _ in range(slow_count):
                c = socket.create_connection(("127.0.0.1", s.port), timeout=T)
                c.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n")
                slow.append(c)
            peak, fast = 0, []
            stop = time.monotonic() + 4
            while time.monotonic() < stop:
                for c in slow:
                    try:
                        c.send(b"X")  # one more byte of a header that never ends
                    except OSError:
                        pass
                peak = max(peak, threading.active_count())
                t0 = time.monotonic()
                assert requests.get(s.url + "health", timeout=T).status_code == 200
                r = post(s.url + "v1/generate", {"prompt": "ok", "length": 2, "seed": 1})
                assert r.status_code == 200
                fast.append(time.monotonic() - t0)
                time.sleep(0.2)
            # the slow connections were answered 408 after read_timeout and closed
            for c in slow:
                c.settimeout(5)
                answer = b""
                try:
                    while chunk := c.recv(4096):
                        answer += chunk
                except ConnectionResetError:
                    pass
                assert answer.startswith(b"HTTP/1.1 408 "), answer[:100]
        finally:
            for c in slow:
                c.close()
        assert peak <= threads_before + cap + 2, (peak, threads_before)
        assert max(fast) < 3.0, fast


def test_sigterm_ends_open_streams_and_answers_queued_clients():
    """`npgpt2 serve` in a child process whose model takes 50 ms per token: SIGTERM while one
    client streams and two more wait in the queue."""
    import signal
    import subprocess
    import sys
    script = ("import sys, time, npgpt2.model, npgpt2.cli as cli\n"
              "plain = npgpt2.model.GPT2.forward\n"
              "def slow(self, *a, **k):\n"
              "    time.sleep(0.05)\n"
              "    return plain(self, *a, **k)\n"
              "npgpt2.model.GPT2.forward = slow\n"
              "sys.exit(cli.main(sys.argv[1:]))\n")
    # --max_batch 1: the two others wait in the queue (with room in the batch they would join it)
    proc = subprocess.Popen([sys.executable, "-c", script, "serve", "--models_dir", str(FULL.parent),
                             "--model_name", "full", "--port", "0", "--max_batch", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().split(" on ")[1].split()[0]
        with ThreadPoolExecutor(3) as pool:
            first = requests.post(url + "v1/generate", json={"prompt": "x", "length": 60, "seed": 1, "stream": True},
                                  stream=True, timeout=T)
            assert first.status_code == 200
            pieces = first.iter_content(chunk_size=None)
            assert b"data: " in next(pieces)  # generating now
            queued = [pool.submit(post, url + "v1/generate", {"prompt": "y", "length": 5, "stream": stream})
                      for stream in (False, True)]
            deadline = time.monotonic() + T  # until both wait in the queue behind the stream
            while requests.get(url + "health", timeout=T).json()["queued"] < 3 and time.monotonic() < deadline:
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            rest = b"".join(pieces)  # requests raises if the chunked body is not ended properly
            for q in queued:
                r = q.result()
                assert r.status_code == 503 and "shutting down" in r.json()["error"]
        tail = rest.decode().rstrip("\n").split("\n\n")[-1]
        assert tail.startswith("event: error\ndata: ") and "shutting down" in tail
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0 and "Traceback" not in err, err
        assert err.rstrip().endswith("npgpt2: stopped"), err
        assert err.count('"POST /v1/generate HTTP/1.1"') == 3 and '"GET /health HTTP/1.1" 200' in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


# ---------------------------------------------------------------- /explain
BAD_EXPLAIN = [
    {},
    {"text": ""},
    {"text": 5},
    {"text": ["a"]},
    {"text": None},
    {"text": "a", "layer": -1},
    {"text": "a", "layer": 2},       # the full fixture has 2 layers: 0 and 1
    {"text": "a", "layer": "1"},
    {"text": "a", "layer": 1.0},
    {"text": "a", "layer": True},
    {"text": "a", "layer": [[[1]]]},
    {"text": "a", "top_k": 0},
    {"text": "a", "top_k": 101},
    {"text": "a", "top_k": "5"},
    {"text": "a", "stream": True},   # explain does not stream: an unknown field, as elsewhere
    {"text": "a", "lyer": 1},
    {"text": " hello" * 600},        # more than max_prompt_tokens (512)
    {"text": "caf\udce9"},           # a lone surrogate: no UTF-8 bytes to tokenize
]


@pytest.mark.parametrize("body", BAD_EXPLAIN, ids=lambda b: json.dumps(b)[:40])
def test_explain_bad_fields_get_400(server, body):
    r = post(server.url + "v1/explain", body)
    assert r.status_code == 400, r.text
    msg = r.json()["error"]
    assert "\n" not in msg and len(msg) < 300
    name = [k for k in ("text", "layer", "top_k", "lyer", "stream") if k in body] or ["text"]
    assert name[-1] in msg or "tokens" in msg, msg


def test_explain_routes_and_methods(server):
    r = requests.get(server.url + "explain", timeout=T)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/html")
    r = requests.get(server.url + "v1/explain", timeout=T)
    assert r.status_code == 405 and r.headers["Allow"] == "POST"
    r = requests.post(server.url + "explain", json={"text": "a"}, timeout=T)
    assert r.status_code == 405 and r.headers["Allow"] == "GET, HEAD"
    r = requests.post(server.url + "v1/explain", data=b"[" * 100_000, timeout=T, headers=JSON)
    assert r.status_code == 400


def test_explain_answers_the_report(server):
    text = "The quick brown fox"
    ids = npgpt2.load_tokenizer(FULL).encode(text)
    one = post(server.url + "v1/explain", {"text": text, "layer": 1, "top_k": 3})
    assert one.status_code == 200, one.text
    one = one.json()
    assert [t["id"] for t in one["tokens"]] == ids
    assert len(one["next"]) == 3
    # the patterns of the layer asked for only: 2 heads, query t sees t + 1 keys summing to 1
    assert one["attention"]["layers"] == [1] and one["attention"]["patterns"][0] is None
    heads = one["attention"]["patterns"][1]
    assert len(heads) == 2 and [len(row) for row in heads[0]] == list(range(1, len(ids) + 1))
    assert all(abs(sum(row) - 1) < 0.01 for head in heads for row in head)
    every = post(server.url + "v1/explain", {"text": text, "layer": None}).json()
    assert every["attention"]["layers"] == [0, 1] and len(every["next"]) == 10


def test_explain_answer_size_is_bounded(server, monkeypatch):
    import npgpt2.server as server_module
    # the fixture: 2 layers x 2 heads; 40 tokens give 820 weights per head
    monkeypatch.setattr(server_module, "MAX_PATTERN_WEIGHTS", 2 * 820)
    text = " hello" * 40
    r = post(server.url + "v1/explain", {"text": text, "layer": None})
    assert r.status_code == 400 and '"layer"' in r.json()["error"] and "3,280" in r.json()["error"]
    monkeypatch.setattr(server_module, "MAX_PATTERN_WEIGHTS", 2 * 820 - 1)
    r = post(server.url + "v1/explain", {"text": text, "layer": 1})
    assert r.status_code == 400 and "shorter" in r.json()["error"]


def test_explain_runs_on_the_worker_and_honours_the_timeout(monkeypatch):
    import npgpt2.server as server_module
    ran = []

    def slow_report(worker, job):  # stands in for explain.build_report: 2 s of model work
        ran.append((threading.current_thread().name, job.fields["text"], job.fields["layer"]))
        time.sleep(2)
        job.out.put(("done", {"ok": True}))
    monkeypatch.setattr(server_module, "explain_task", slow_report)
    model, tok = load()
    with Server(model, tok, port=0, limits=Limits(timeout=0.5)) as s:
        s.start()
        t0 = time.monotonic()
        r = post(s.url + "v1/explain", {"text": "hello", "layer": 1})
        assert r.status_code == 504 and "timeout" in r.json()["error"]
        assert time.monotonic() - t0 < 1.5
        assert ran == [("npgpt2-model", "hello", 1)]  # on the one model thread


def test_pipelined_requests_on_one_connection_are_all_answered(server):
    body = b'{"prompt": "x", "length": 2, "seed": 1}'
    data = (b"GET /health HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 5\r\n\r\nhello"  # a GET with a body
            b"POST /v1/generate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            b"GET /nope HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n" % (len(body), body))
    answer = raw_exchange(server.port, data)
    assert re.findall(rb"HTTP/1.1 (\d+) ", answer) == [b"200", b"200", b"404"], answer


def test_import_npgpt2_does_not_load_the_server():
    import subprocess
    import sys
    code = ("import sys, npgpt2\n"
            "assert 'npgpt2.server' not in sys.modules and 'http.server' not in sys.modules\n"
            "from npgpt2 import Server\n"
            "assert Server is npgpt2.Server and Server.__module__ == 'npgpt2.server'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
