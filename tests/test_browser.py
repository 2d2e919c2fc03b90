"""The server's pages in a real browser: Debian's headless Chromium, driven with the Chrome
DevTools Protocol. On the chat page it types a message, presses Enter and watches the reply
stream into the page; on /explain it submits a text, reads the heatmap's pixels and moves
the temperature slider.

CDP runs over --remote-debugging-pipe (JSON messages separated by NUL bytes on fds 3 and 4)
rather than a websocket: the same protocol with no listening port, no websocket framing code
and no new dependency. The model's forward pass is slowed down a little so the pieces of the
reply arrive one by one; a MutationObserver in the page records every state the reply bubble
goes through. The final texts are checked against the HTTP API's own non-streaming answers
for the same messages and seed.
"""
import base64
import fcntl
import json
import os
import select
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import requests

import npgpt2
from npgpt2.server import Server

FULL = Path(__file__).parent / "fixtures" / "full"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--no-proxy-server", "--mute-audio", "--hide-scrollbars",
         "--window-size=900,640", "--remote-debugging-pipe"]

pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no chromium on PATH: Debian's `chromium` package is needed (.ci/run installs it with apt-get)")


class Chromium:
    """A headless Chromium and a CDP connection to it over the debugging pipe."""

    def __init__(self, profile, log_path):
        to_r, self.to_w = os.pipe()      # we write commands, Chromium reads them on fd 3
        self.from_r, from_w = os.pipe()  # Chromium writes answers and events on fd 4
        # the child's ends moved to fds >= 10, so placing them on 3 and 4 cannot clobber one another
        ends = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_r, from_w)]
        os.close(to_r)
        os.close(from_w)
        script = f'exec "$0" "$@" 3<&{ends[0]} 4>&{ends[1]}'  # bash places them (dash takes fds < 10 only)
        self.log = open(log_path, "wb")
        try:
            self.proc = subprocess.Popen(["bash", "-c", script, CHROMIUM, *FLAGS, f"--user-data-dir={profile}",
                                          "about:blank"],
                                         pass_fds=ends, stdin=subprocess.DEVNULL,
                                         stdout=self.log, stderr=self.log, start_new_session=True)
        finally:
            for fd in ends:
                os.close(fd)
        self.buf, self.next_id, self.events = b"", 0, []

    def call(self, method, params=None, session=None, timeout=20):
        """Send one command and wait for its answer; events that arrive meanwhile are kept."""
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.to_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self.buf:
                raw, self.buf = self.buf.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self.next_id:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply["result"]
                self.events.append(reply)
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                raise TimeoutError(f"{method}: no answer from Chromium (exit status {self.proc.poll()})")
            if select.select([self.from_r], [], [], left)[0]:
                chunk = os.read(self.from_r, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"{method}: Chromium closed the debugging pipe")
                self.buf += chunk

    def close(self):
        try:
            if self.proc.poll() is None:
                self.call("Browser.close", timeout=5)
        except (OSError, RuntimeError, TimeoutError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        # the process group started for this browser: its renderer and helper processes
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)
        os.close(self.to_w)
        os.close(self.from_r)
        self.log.close()


class Page:
    def __init__(self, browser):
        self.b = browser
        target = browser.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = browser.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.call("Page.enable")
        self.call("Runtime.enable")

    def call(self, method, params=None, timeout=20):
        return self.b.call(method, params, session=self.session, timeout=timeout)

    def js(self, expression):
        r = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in r:
            raise RuntimeError(f"page script failed: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait_for(self, expression, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.05)
        raise TimeoutError(f"timed out waiting for {expression}")

    def type_and_enter(self, text):
        self.js("document.getElementById('input').focus()")
        self.call("Input.insertText", {"text": text})
        for kind in ("keyDown", "keyUp"):
            self.call("Input.dispatchKeyEvent", {"type": kind, "key": "Enter", "code": "Enter",
                                                 "windowsVirtualKeyCode": 13, "nativeVirtualKeyCode": 13})


@pytest.fixture(autouse=True)
def no_proxy_for_loopback(monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


RECORD = """
window.__states = [];
new MutationObserver(() => {
  const b = [...document.querySelectorAll('.msg.bot')].pop();
  if (b) window.__states.push([b.dataset.state, b.textContent]);
}).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true,
                                            attributes: true});
"""
SETTINGS = {"length": 20, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "seed": 7}
LAST_BOT = "[...document.querySelectorAll('.msg.bot')].pop()"


def test_page_streams_a_reply_in_headless_chromium(tmp_path):
    model, tok = npgpt2.load_model(FULL), npgpt2.load_tokenizer(FULL)
    plain = model.forward

    calls = []

    def slow_forward(*args, **kwargs):  # ~25 ms per token, so pieces arrive one at a time
        calls.append(1)
        time.sleep(0.025)
        return plain(*args, **kwargs)
    model.forward = slow_forward

    with Server(model, tok, port=0) as server:
        server.start()
        browser = Chromium(tmp_path / "profile", tmp_path / "chromium.log")
        try:
            page = Page(browser)
            page.call("Page.navigate", {"url": server.url})
            page.wait_for("document.readyState === 'complete' && "
                          "document.getElementById('model').textContent.includes('64')")
            page.js(RECORD)
            page.js(";".join(f"document.getElementById('{k}').value = '{v}'" for k, v in SETTINGS.items()))

            messages = []
            for text in ["Hello there, bot!", "Tell me more."]:
                page.js("window.__states = []")
                page.type_and_enter(text)
                assert page.js("document.getElementById('input').value") == ""  # Enter sent it
                state = page.wait_for(f"{LAST_BOT} && ['done', 'stopped'].includes({LAST_BOT}.dataset.state) "
                                      f"&& {LAST_BOT}.dataset.state")
                assert state == "done"
                shown = page.js(f"{LAST_BOT}.textContent")
                states = page.js("window.__states")

                # the API's non-streaming answer for the same conversation and settings
                messages.append({"role": "user", "content": text})
                r = requests.post(server.url + "v1/chat", json={"messages": messages, **SETTINGS}, timeout=30)
                assert r.status_code == 200
                expected = r.json()["text"]
                assert expected, "pick a seed whose reply is not empty"
                assert shown == expected
                messages.append({"role": "assistant", "content": expected})

                # it streamed: the bubble grew through several partial texts before the end
                partial = []
                for st, txt in states:
                    if st == "streaming" and txt and (not partial or txt != partial[-1]):
                        partial.append(txt)
                assert len(partial) >= 3, states
                for a, b in zip(partial, partial[1:]):
                    assert b.startswith(a) and len(b) > len(a)
                assert all(expected.startswith(p.rstrip()) for p in partial)
                assert len(partial[0].strip()) < len(expected)

            # both turns are on the page, in order
            bubbles = page.js("[...document.querySelectorAll('.msg')].map(e => [e.className, e.textContent])")
            assert bubbles == [["msg user", m["content"]] if m["role"] == "user" else ["msg bot", m["content"]]
                               for m in messages]

            # a picture of the conversation, to look at
            shot = base64.b64decode(page.call("Page.captureScreenshot", {"format": "png"})["data"])
            assert shot.startswith(b"\x89PNG\r\n\x1a\n")
            (tmp_path / "chat.png").write_bytes(shot)
            if os.environ.get("NPGPT2_SCREENSHOT"):  # to look at it: NPGPT2_SCREENSHOT=/tmp/chat.png
                Path(os.environ["NPGPT2_SCREENSHOT"]).write_bytes(shot)

            # "New chat", then a long reply stopped half-way with the Stop button: the page keeps
            # what it had, and the server stops generating for it
            page.js("document.getElementById('reset').click(); document.getElementById('length').value = 40")
            assert page.js("document.querySelectorAll('.msg').length") == 0
            calls.clear()
            page.type_and_enter("Hi")
            page.wait_for(f"{LAST_BOT} && {LAST_BOT}.dataset.state === 'streaming'")
            assert page.js("document.getElementById('send').textContent") == "Stop"
            page.js("document.getElementById('send').click()")
            page.wait_for(f"{LAST_BOT} === undefined || {LAST_BOT}.dataset.state === 'stopped'")
            deadline = time.monotonic() + 10
            while server.app.worker.pending and time.monotonic() < deadline:
                time.sleep(0.05)
            assert server.app.worker.pending == 0
            assert len(calls) < 30, f"{len(calls)} forward passes: the stopped reply was not cancelled"
            assert page.js("document.getElementById('send').textContent") == "Send"
        finally:
            browser.close()


CELLS = """(() => {
  const c = document.getElementById('heatmap'), n = Number(c.dataset.cell), T = c.width / n;
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  const out = [];
  for (let t = 0; t < T; t++) {
    const row = [];
    for (let s = 0; s < T; s++) {
      const o = 4 * ((t * n + (n >> 1)) * c.width + s * n + (n >> 1));  // the cell's centre
      row.push([d[o], d[o + 1], d[o + 2]]);
    }
    out.push(row);
  }
  return [Number(c.dataset.layer), Number(c.dataset.head), out];
})()"""
SHOWN_PROBS = "[...document.querySelectorAll('#dist tr.surv')].map(r => [Number(r.dataset.id), Number(r.dataset.p)])"


def test_explain_page_in_headless_chromium(tmp_path):
    """/explain: type a text, submit, see the attention heatmap drawn from the API's
    weights, move the temperature slider and read the changed probabilities."""
    import numpy as np
    model, tok = npgpt2.load_model(FULL), npgpt2.load_tokenizer(FULL)
    text = "The quick brown fox jumps over the lazy"
    with Server(model, tok, port=0) as server:
        server.start()
        browser = Chromium(tmp_path / "profile", tmp_path / "chromium.log")
        try:
            page = Page(browser)
            page.call("Page.navigate", {"url": server.url + "explain"})
            page.wait_for("document.readyState === 'complete' && "
                          "!document.getElementById('ask').classList.contains('hidden')")
            page.js("document.getElementById('text').focus()")
            page.call("Input.insertText", {"text": text})
            page.js("document.getElementById('go').click()")
            page.wait_for("!document.getElementById('report').classList.contains('hidden') && "
                          "document.querySelectorAll('#dist tr.surv').length > 0")

            # the API's answer for what the page asked: the text, layer 0
            r = requests.post(server.url + "v1/explain", json={"text": text, "layer": 0}, timeout=60)
            assert r.status_code == 200
            report = r.json()
            T = len(report["tokens"])
            assert T == len(tok.encode(text))
            assert page.js("document.getElementById('tokens').children.length") == T

            # the heatmap: T x T cells; future positions grey, the others shaded by the weight
            # (red channel 255 - 225 * sqrt(w), the page's colour scale)
            layer, head, cells = page.js(CELLS)
            weights = report["attention"]["patterns"][layer][head]
            assert len(cells) == T and all(len(row) == T for row in cells)
            for t in range(T):
                for s in range(T):
                    if s > t:
                        assert cells[t][s] == [236, 238, 242]
                    else:
                        expected = 255 - 225 * weights[t][s] ** 0.5
                        assert abs(cells[t][s][0] - expected) <= 1.5, (t, s, cells[t][s], weights[t][s])
            assert len({tuple(c) for row in cells for c in row}) > 3  # not one flat colour
            heads = report["model"]["n_head"]
            assert page.js("document.querySelectorAll('#grid canvas').length") == heads

            # the next-token distribution: softmax(logits / temperature), computed here in NumPy
            logits = np.array(report["last_logits"], dtype=np.float64)

            def softmax(t):
                z = np.exp((logits - logits.max()) / t)
                return z / z.sum()
            before = page.js(SHOWN_PROBS)
            assert len(before) == 20
            for i, p in before:
                assert p == pytest.approx(softmax(1.0)[i], rel=1e-9)
            page.js("const r = document.getElementById('temperature_r'); r.value = '0.5'; "
                    "r.dispatchEvent(new Event('input', {bubbles: true}))")
            assert page.js("document.getElementById('temperature').value") == "0.5"
            after = page.js(SHOWN_PROBS)
            assert after != before
            for i, p in after:
                assert p == pytest.approx(softmax(0.5)[i], rel=1e-9)
            assert after[0][1] > before[0][1]  # cooler: the top token more likely

            # the whole page, heatmaps included, in one picture
            size = page.call("Page.getLayoutMetrics")["cssContentSize"]
            clip = {"x": 0, "y": 0, "width": size["width"], "height": min(size["height"], 4000), "scale": 1}
            shot = base64.b64decode(page.call("Page.captureScreenshot", {
                "format": "png", "clip": clip, "captureBeyondViewport": True})["data"])
            assert shot.startswith(b"\x89PNG\r\n\x1a\n")
            (tmp_path / "explain.png").write_bytes(shot)
            if os.environ.get("NPGPT2_SCREENSHOT"):
                Path(os.environ["NPGPT2_SCREENSHOT"]).with_name("explain.png").write_bytes(shot)
        finally:
            browser.close()
