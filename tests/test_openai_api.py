"""OpenAI-compatible endpoints, driven by the official `openai` client (pinned in setup.cfg's
test extra) against a live `npgpt2 serve` on a loopback port, with the `full` fixture model.

As in test_server.py, expected texts are never computed by npgpt2 outside the server: the
checks compare the server with itself across modes (streaming or not, n = 1 or more, alone
or among 50 concurrent clients, its own API or OpenAI's) and check the protocol the client
library parses (objects, chunks, usage, error classes, `param`).
"""
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests
from test_server import load, no_proxy_for_loopback  # noqa: F401 (autouse: no proxy for 127.0.0.1)

from npgpt2.errors import Npgpt2Error
from npgpt2.server import Limits, Server

T = 30  # seconds: the most any single HTTP call in these tests may take
MSGS = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def server():
    model, tok = load()
    with Server(model, tok, host="127.0.0.1", port=0, limits=Limits(max_request_tokens=200)) as s:
        s.start()
        yield s


CLIENTS = {}


def client(server):
    """One openai.OpenAI per server (it is thread-safe; making one takes ~0.1 s)."""
    if server.url not in CLIENTS:
        CLIENTS[server.url] = openai.OpenAI(base_url=server.url + "v1", api_key="unused", max_retries=0, timeout=T)
    return CLIENTS[server.url]


def slowed(model, seconds):
    plain = model.forward

    def forward(*args, **kwargs):
        time.sleep(seconds)
        return plain(*args, **kwargs)
    model.forward = forward
    return model


def joined(chunks, chat):
    """Chunks of a stream -> ({index: text}, {index: finish_reason}, usage)."""
    text, finish, usage = {}, {}, None
    for c in chunks:
        usage = c.usage or usage
        for ch in c.choices:
            piece = (ch.delta.content if chat else ch.text) or ""
            text[ch.index] = text.get(ch.index, "") + piece
            if ch.finish_reason:
                finish[ch.index] = ch.finish_reason
    return text, finish, usage


# ---------------------------------------------------------------- answers
def test_models_lists_the_one_model(server):
    models = client(server).models.list()
    assert [m.id for m in models.data] == ["full"] and models.data[0].object == "model"


def test_completions_n_prompt_lists_and_usage(server):
    c = client(server)
    ids = [[464, 3797, 3332], [15496, 11, 616, 1438, 318]]
    r = c.completions.create(model="full", prompt=ids, max_tokens=5, n=2, seed=3, temperature=1.0)
    assert r.object == "text_completion" and [ch.index for ch in r.choices] == [0, 1, 2, 3]
    assert all(ch.finish_reason == "length" for ch in r.choices)
    assert r.usage.prompt_tokens == 3 + 5 and r.usage.completion_tokens == 4 * 5 and r.usage.total_tokens == 28
    assert len({ch.text for ch in r.choices}) == 4  # each choice draws its own tokens
    # choice 0 of a seeded request is the n=1 answer, and what /v1/generate gives for that seed
    one = c.completions.create(model="full", prompt=ids[0], max_tokens=5, seed=3)
    assert one.choices[0].text == r.choices[0].text
    text = c.completions.create(model="full", prompt="The cat sat", max_tokens=6, seed=4).choices[0].text
    own = requests.post(server.url + "v1/generate", json={"prompt": "The cat sat", "length": 6, "seed": 4},
                        timeout=T).json()
    assert text == own["text"]


def test_chat_completion_and_streams_equal_plain_answers(server):
    c = client(server)
    plain = c.chat.completions.create(model="full", messages=MSGS, max_tokens=8, seed=5, n=2)
    assert plain.object == "chat.completion" and len(plain.choices) == 2
    assert all(ch.message.role == "assistant" for ch in plain.choices)
    chunks = list(c.chat.completions.create(model="full", messages=MSGS, max_tokens=8, seed=5, n=2, stream=True,
                                            stream_options={"include_usage": True}))
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    text, finish, usage = joined(chunks, chat=True)
    assert text == {ch.index: ch.message.content for ch in plain.choices}
    assert finish == {ch.index: ch.finish_reason for ch in plain.choices}
    assert usage.model_dump() == plain.usage.model_dump()
    comp = c.completions.create(model="full", prompt="Once upon", max_tokens=10, seed=6, n=3)
    text, finish, usage = joined(c.completions.create(model="full", prompt="Once upon", max_tokens=10, seed=6, n=3,
                                                      stream=True), chat=False)
    assert text == {ch.index: ch.text for ch in comp.choices} and usage is None
    assert finish == {ch.index: ch.finish_reason for ch in comp.choices}


def test_stream_is_data_lines_ending_with_done(server):
    r = requests.post(server.url + "v1/chat/completions", json={"model": "x", "messages": MSGS, "max_tokens": 4,
                                                                 "stream": True, "seed": 1}, timeout=T)
    assert r.headers["Content-Type"].startswith("text/event-stream")
    events = r.text.strip("\n").split("\n\n")
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    first = json.loads(events[0][6:])
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}


def test_stop_ends_the_text(server):
    c = client(server)
    full = c.completions.create(model="full", prompt="a", max_tokens=30, seed=8).choices[0].text
    cut = full[10:13]
    r = c.completions.create(model="full", prompt="a", max_tokens=30, seed=8, stop=[cut, "never appears"])
    assert r.choices[0].text == full[:full.index(cut)] and r.choices[0].finish_reason == "stop"
    streamed, finish, _ = joined(c.completions.create(model="full", prompt="a", max_tokens=30, seed=8, stop=cut,
                                                      stream=True), chat=False)
    assert streamed[0] == r.choices[0].text and finish[0] == "stop"
    reply = c.chat.completions.create(model="full", messages=MSGS, max_tokens=30, seed=9).choices[0].message.content
    if len(reply) > 8:
        cut = reply[5:8]
        r = c.chat.completions.create(model="full", messages=MSGS, max_tokens=30, seed=9, stop=cut)
        assert r.choices[0].message.content == reply[:reply.index(cut)].strip()


def test_logprobs_with_top_alternatives(server):
    c = client(server)
    r = c.completions.create(model="full", prompt="The", max_tokens=6, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:k]) for k in range(6)]
    for tok, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        values = list(top.values())
        assert len(top) <= 3 and values == sorted(values, reverse=True) and all(v <= 0 for v in values)
        assert value <= 0 and value == pytest.approx(values[0])  # greedy: the top alternative was drawn
        assert tok == next(iter(top))
    echo = c.completions.create(model="full", prompt="The cat", max_tokens=2, seed=1, logprobs=1, echo=True)
    e = echo.choices[0]
    assert e.text.startswith("The cat") and e.logprobs.token_logprobs[0] is None
    assert len(e.logprobs.tokens) == 2 + 2 and e.logprobs.tokens[:2] == ["The", " cat"]
    chat = c.chat.completions.create(model="full", messages=MSGS, max_tokens=5, temperature=0, logprobs=True,
                                     top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert "".join(x.token for x in content).strip() == chat.choices[0].message.content
    for x in content:
        assert len(x.top_logprobs) == 2 and x.logprob == pytest.approx(x.top_logprobs[0].logprob)
        assert bytes(x.bytes).decode("utf-8", "replace") == x.token
    plain = c.chat.completions.create(model="full", messages=MSGS, max_tokens=5, temperature=0)
    assert plain.choices[0].logprobs is None


# ---------------------------------------------------------------- bad input
BAD_COMPLETION = [
    ("temperature", -1), ("temperature", 2.5), ("temperature", "1"), ("top_p", 1.5), ("top_p", -0.1),
    ("n", 0), ("n", 9), ("n", 1.5), ("max_tokens", 0), ("max_tokens", 64), ("max_tokens", "5"),
    ("stop", 5), ("stop", ["a", "b", "c", "d", "e"]), ("stop", [""]), ("seed", -1), ("seed", "x"),
    ("logprobs", 6), ("logprobs", True), ("echo", "yes"), ("stream", "no"), ("presence_penalty", 0.5),
    ("presence_penalty", 3), ("frequency_penalty", "0"), ("logit_bias", {"1": 5}), ("logit_bias", [1]),
    ("best_of", 2), ("suffix", "x"), ("prompt", 5), ("prompt", []), ("prompt", [[-1]]), ("prompt", [[50257]]),
    ("prompt", ["a"] * 9), ("top_k", -1), ("user", 5), ("stream_options", {"include_usage": True}), ("model", ""),
    ("no_such_field", 1)]


@pytest.mark.parametrize("field,value", BAD_COMPLETION)
def test_bad_completion_field_is_a_400_naming_it(server, field, value):
    with pytest.raises(openai.BadRequestError) as e:  # extra_body's fields replace the arguments'
        client(server).completions.create(model="full", prompt="x", max_tokens=2, extra_body={field: value})
    err = e.value.body
    assert e.value.status_code == 400 and err["type"] == "invalid_request_error" and err["param"] == field, err
    assert set(err) == {"message", "type", "param", "code"} and "\n" not in err["message"]


BAD_CHAT = [
    ("messages", []), ("messages", "hi"), ("messages", [{"role": "tool", "content": "x"}]),
    ("messages", [{"role": "user", "content": 5}]), ("messages", [{"role": "assistant", "content": "x"}]),
    ("messages", [{"role": "user", "content": "x", "tool_calls": []}]), ("top_logprobs", 21),
    ("logprobs", "yes"), ("response_format", {"type": "json_object"}), ("tools", [{"type": "function"}]),
    ("max_completion_tokens", 0), ("temperature", None, "ok")]


@pytest.mark.parametrize("case", BAD_CHAT)
def test_bad_chat_field_is_a_400_naming_it(server, case):
    field, value = case[:2]
    args = {"model": "full", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, field: value}
    if len(case) == 3:  # null is the default, as with OpenAI
        assert client(server).chat.completions.create(**args).choices[0].finish_reason == "length"
        return
    with pytest.raises(openai.BadRequestError) as e:
        client(server).chat.completions.create(**args)
    param = e.value.body["param"]
    assert e.value.status_code == 400 and (param == field or param.startswith(field + "[")), e.value.body


def test_top_logprobs_needs_logprobs(server):
    with pytest.raises(openai.BadRequestError) as e:
        client(server).chat.completions.create(model="full", messages=MSGS, max_tokens=2, top_logprobs=2)
    assert e.value.body["param"] == "top_logprobs"


def test_limits_are_refused_up_front(server):
    c = client(server)
    # n x max_tokens beyond --max_request_tokens (200 here)
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="full", prompt=["a", "b"], n=4, max_tokens=30)
    assert e.value.body["param"] == "max_tokens" and "240" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="full", prompt=[[1] * 60], max_tokens=10)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="full", messages=[{"role": "user", "content": "word " * 80}], max_tokens=10)
    assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "messages"


def test_other_errors_have_the_openai_shape(server):
    r = requests.post(server.url + "v1/completions", data=b"{not json", timeout=T,
                      headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = requests.get(server.url + "v1/completions", timeout=T)
    assert r.status_code == 405
    with pytest.raises(openai.NotFoundError):
        client(server).embeddings.create(model="full", input="x")
    r = requests.post(server.url + "v1/completions", json={"prompt": "x"}, headers={"Host": "evil.example"}, timeout=T)
    assert r.status_code == 403 and "--allowed_hosts" in r.json()["error"]["message"]  # DNS rebinding refused
    r = requests.post(server.url + "v1/completions", data=b'{"prompt": "x"}', headers={"Content-Type": "text/plain"},
                      timeout=T)
    assert r.status_code == 415 and r.json()["error"]["type"] == "invalid_request_error"


# ---------------------------------------------------------------- connections and load
def test_client_gone_mid_stream_frees_its_row():
    model, tok = load()
    slowed(model, 0.05)
    with Server(model, tok, port=0) as s:
        s.start()
        body = json.dumps({"model": "x", "messages": MSGS, "max_tokens": 40, "stream": True}).encode()
        sock = socket.create_connection(("127.0.0.1", s.port), timeout=T)
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        got = b""
        while got.count(b"data: ") < 2:
            more = sock.recv(4096)
            assert more, got
            got += more
        assert s.app.worker.active_rows == 1
        sock.close()
        t0 = time.monotonic()
        while s.app.worker.active_rows and time.monotonic() - t0 < 5:
            time.sleep(0.01)
        # noticed within Results' 0.2 s look, then gone at the next step (a step is 50 ms here)
        assert s.app.worker.active_rows == 0 and time.monotonic() - t0 < 1.0
        assert s.app.worker.pending == 0


def good_request(i):
    """(kind, body) of client i's seeded request, one of six kinds."""
    kind = ["generate", "completions", "chat", "generate", "completions", "chat"][i % 6]
    stream = i % 2 == 1
    if kind == "generate":
        return kind, {"prompt": f"Client {i} says", "length": 8, "seed": 100 + i, "stream": stream}
    if kind == "completions":
        return kind, {"model": "full", "prompt": f"Client {i} writes", "max_tokens": 8, "seed": 100 + i,
                      "n": 1 + i % 3, "stream": stream}
    return kind, {"model": "full", "messages": [{"role": "user", "content": f"I am client {i}"}], "max_tokens": 8,
                  "seed": 100 + i, "stream": stream}


def ask(server, kind, body):
    """One request as a client library sends it -> a comparable answer."""
    if kind == "generate":
        r = requests.post(server.url + "v1/generate", json=body, timeout=T)
        assert r.status_code == 200
        text = r.text if body["stream"] else r.json()["text"]
        return json.loads(text.split("event: done\ndata: ")[1])["text"] if body["stream"] else text
    c = client(server)
    create = c.completions.create if kind == "completions" else c.chat.completions.create
    r = create(**body)
    if body["stream"]:
        return joined(r, chat=kind == "chat")[0]
    return {ch.index: ch.text if kind == "completions" else ch.message.content for ch in r.choices}


def test_fifty_concurrent_clients_mixing_apis_cancellations_and_bad_requests():
    model, tok = load()
    with Server(model, tok, port=0) as s:
        s.start()
        baseline = threading.active_count()
        roles = {i: ("bad" if i % 5 == 0 else "cancel" if i % 7 == 3 else "good") for i in range(50)}
        alone = {i: ask(s, *good_request(i)) for i in roles if roles[i] == "good"}  # one at a time first
        start = threading.Barrier(50)

        def run(i):
            start.wait(timeout=T)
            if roles[i] == "good":
                return ask(s, *good_request(i))
            if roles[i] == "bad":
                path = ["v1/completions", "v1/chat/completions", "v1/generate"][i % 3]
                r = requests.post(s.url + path, json={"model": "full", "prompt": "x", "n": "two", "length": -1},
                                  timeout=T)
                return r.status_code
            body = json.dumps({"model": "x", "prompt": "bye", "max_tokens": 60, "stream": True}).encode()
            with socket.create_connection(("127.0.0.1", s.port), timeout=T) as sock:
                sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                             % (len(body), body))
                got = b""
                while b"data: " not in got:
                    more = sock.recv(4096)
                    assert more, got
                    got += more
            return "cancelled"

        t0 = time.monotonic()
        with ThreadPoolExecutor(50) as pool:
            together = dict(zip(range(50), pool.map(run, range(50))))
        assert time.monotonic() - t0 < 120
        for i, role in roles.items():
            if role == "good":
                assert together[i] == alone[i], f"client {i}"
            elif role == "bad":
                assert together[i] == 400, f"client {i}"
        # nothing left behind: no rows, no queued jobs, no connection threads
        deadline = time.monotonic() + 10
        while (s.app.worker.pending or s.app.worker.active_rows or s.httpd.active) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert s.app.worker.pending == 0 and s.app.worker.active_rows == 0 and s.httpd.active == 0
        while threading.active_count() > baseline and time.monotonic() < deadline:
            time.sleep(0.05)
        assert threading.active_count() <= baseline, [t.name for t in threading.enumerate()]


@pytest.mark.parametrize("value", [0, 257, 2.0])
def test_max_batch_flag_is_checked(value):
    with pytest.raises(Npgpt2Error, match="--max_batch"):
        Limits(max_batch=value).check()


def sse_data(body):
    """A chunked text/event-stream body (bytes after the head) -> its `data:` payloads."""
    out, rest = b"", body
    while True:
        size, _, rest = rest.partition(b"\r\n")
        n = int(size, 16)
        if n == 0:
            break
        out, rest = out + rest[:n], rest[n + 2:]
    return [block[6:].decode() for block in out.split(b"\n\n") if block.startswith(b"data: ")]


def test_a_stream_the_socket_cannot_take_at_once_arrives_whole_and_in_order(monkeypatch):
    """The worker writes a stream's chunks itself while the socket takes them at once
    (server_http.Lane). A client that stops reading fills the socket: the rest goes through
    the connection thread, the lane opens again once that thread has caught up, and the client
    gets the same chunks in the same order as one that reads as they come."""
    from npgpt2 import server_http
    ways = []  # per chunk the worker was offered while its lane was open: written ("d") or queued ("q")
    offer = server_http.Lane.offer

    def spy(self, item):
        was = self.open
        offer(self, item)
        if was:
            ways.append("d" if self.open else "q")
    monkeypatch.setattr(server_http.Lane, "offer", spy)
    setup = server_http.Handler.setup

    def small_buffer(self):  # a small send buffer (a slow network's): a few events fill it
        self.request.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        setup(self)
    monkeypatch.setattr(server_http.Handler, "setup", small_buffer)
    model, tok = load()
    slowed(model, 0.02)  # 60 steps take over a second: the slow client's pause falls mid-stream
    body = {"model": "x", "prompt": "Once upon a time", "max_tokens": 60, "n": 4, "logprobs": 5, "seed": 7,
            "stream": True}
    data = json.dumps(body).encode()
    with Server(model, tok, port=0) as s:
        s.start()
        with requests.post(s.url + "v1/completions", json=body, timeout=T) as r:
            fast = [line[6:] for line in r.text.split("\n") if line.startswith("data: ")]
        assert ways and set(ways) == {"d"}
        ways.clear()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        sock.settimeout(T)
        sock.connect(("127.0.0.1", s.port))
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
        time.sleep(0.4)  # reads nothing while the server has some 20 KB more to send
        got = b""
        while not got.endswith(b"\r\n0\r\n\r\n"):
            more = sock.recv(65536)
            assert more, got[-200:]
            got += more
        sock.close()
    assert "q" in ways and "d" in ways[ways.index("q"):], ways  # shut when full, open again after
    slow = sse_data(got.split(b"\r\n\r\n", 1)[1])

    def content(payloads):
        return [(c["choices"][0]["index"], c["choices"][0]["text"], c["choices"][0]["logprobs"],
                 c["choices"][0]["finish_reason"]) for c in map(json.loads, payloads[:-1])] + payloads[-1:]
    assert len(fast) > 200 and content(slow) == content(fast)
