"""The explain page in headless Chromium (driven over CDP as in test_browser.py).

- the file `npgpt2 explain --out` writes opens with no network request at all, draws the
  attention heatmaps (pixels read back from the canvas), the logit-lens grid and the
  attribution bars, and a screenshot is saved;
- the sampling view's survivors and probabilities are the ones sampling.py's sample_logits
  draws with: sample_logits is probed with chosen random numbers at the page's cumulative
  probabilities, for several temperature / top_k / top_p settings;
- the server's form of the page (no report in it) posts to /v1/explain, renders the answer,
  fetches another layer's attention when it is chosen and shows a 400's message.
"""
import base64
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from test_browser import CHROMIUM, Chromium, Page

import npgpt2
from npgpt2 import explain
from npgpt2.cli import main
from npgpt2.sampling import sample_logits

FIX = Path(__file__).parent / "fixtures"
TEXT = "The quick brown fox jumps over the lazy dog, and then"

pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no chromium on PATH: Debian's `chromium` package is needed (.ci/run installs it with apt-get)")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    d = tmp_path_factory.mktemp("chromium")
    b = Chromium(d / "profile", d / "chromium.log")
    try:
        yield b
    finally:
        b.close()


@pytest.fixture(scope="module")
def report_file(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "report.html"
    assert main(["explain", "--models_dir", str(FIX), "--model_name", "full", "--out", str(out), TEXT]) == 0
    return out


def open_page(browser, url):
    page = Page(browser)
    page.call("Network.enable")
    page.call("Page.navigate", {"url": url})
    page.wait_for("document.readyState === 'complete'")
    return page


def events(browser, method):
    return [e["params"] for e in browser.events if e.get("method") == method]


def test_out_file_renders_offline(browser, report_file, tmp_path):
    browser.events.clear()
    page = open_page(browser, report_file.as_uri())
    page.wait_for("document.querySelectorAll('#grid canvas').length === 2")
    # nothing but the file itself was requested, and nothing failed
    urls = [e["request"]["url"] for e in events(browser, "Network.requestWillBeSent")]
    assert urls == [report_file.as_uri()]
    assert events(browser, "Network.loadingFailed") == []

    R = page.js("R")
    T = len(R["tokens"])
    assert T == len(npgpt2.load_tokenizer(FIX / "full").encode(TEXT))
    # heatmap of layer 0 head 0: one cell per (query, key), future cells in the mask colour,
    # and in each row the darkest cell is where the pattern is largest
    cell = int(page.js("Number(document.getElementById('heatmap').dataset.cell)"))
    pixels = page.js(f"""(() => {{
        const c = document.getElementById('heatmap'), d = c.getContext('2d').getImageData(0, 0, c.width, c.height);
        const out = [];
        for (let t = 0; t < {T}; t++) {{ const row = [];
          for (let s = 0; s < {T}; s++) {{ const o = 4 * ((t * {cell} + ({cell} >> 1)) * c.width + s * {cell} + ({cell} >> 1));
            row.push([d.data[o], d.data[o + 1], d.data[o + 2]]); }}
          out.push(row); }}
        return [c.width, out]; }})()""")
    width, cells = pixels
    assert width == T * cell
    cells = np.array(cells, dtype=float)                        # (T, T, 3)
    pattern = R["attention"]["patterns"][0][0]
    future = np.triu(np.ones((T, T), bool), 1)
    assert (cells[future] == [236, 238, 242]).all()
    brightness = cells.sum(-1)
    for t in range(T):
        w = np.array(pattern[t])
        assert np.argmin(brightness[t, :t + 1]) == np.argmax(w) or np.isclose(np.sort(w)[-1], np.sort(w)[-2], atol=2e-3)
        if w.max() > 0.5:
            assert brightness[t, np.argmax(w)] < 3 * 200       # a heavy weight is dark
    # the logit-lens grid has a cell per layer and position, the attribution a bar per token
    L = R["model"]["n_layer"]
    assert page.js("document.querySelectorAll('#lens td.lenscell').length") == (L + 1) * T
    assert page.js("document.querySelectorAll('#attr tr.attrrow').length") == T
    assert page.js("document.querySelectorAll('#tokens .chip').length") == T
    # another head, then the last layer: the heatmap follows the selectors
    page.js("document.getElementById('layer').value = 1; document.getElementById('layer').dispatchEvent(new Event('change'))")
    assert page.js("document.getElementById('heatmap').dataset.layer") == "1"
    page.js("document.querySelectorAll('#grid figure')[1].click()")
    assert page.js("document.getElementById('heatmap').dataset.head") == "1"

    shot = base64.b64decode(page.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True,
                                                                 "clip": {"x": 0, "y": 0, "width": 900,
                                                                          "height": 1800, "scale": 1}})["data"])
    assert shot.startswith(b"\x89PNG\r\n\x1a\n")
    (tmp_path / "explain.png").write_bytes(shot)
    if os.environ.get("NPGPT2_SCREENSHOT"):  # to look at it: NPGPT2_SCREENSHOT=/tmp/explain.png
        Path(os.environ["NPGPT2_SCREENSHOT"]).write_bytes(shot)


class FixedRng:
    """A stand-in for np.random.Generator whose random() returns the number we choose."""

    def __init__(self, u):
        self.u = u

    def random(self):
        return self.u


SETTINGS = [(1.0, 0, 1.0), (0.7, 40, 1.0), (1.3, 0, 0.9), (0.5, 10, 0.8), (2.0, 5, 0.5), (0.0, 0, 1.0),
            (0.8, 0, 0.02), (1.0, 3, 1.0), (1e-310, 0, 1.0), (1e-310, 5, 0.5)]  # the last two overflow: greedy


@pytest.mark.parametrize("temperature, top_k, top_p", SETTINGS)
def test_sampling_view_matches_sampling_py(browser, report_file, temperature, top_k, top_p):
    page = open_page(browser, report_file.as_uri())
    page.wait_for("R !== null")
    logits = np.array(page.js("R.last_logits"), dtype=np.float64)[None]  # what the page computes from
    # move the controls as a user would; the table shows at most 20 survivors
    for name, v in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p)):
        page.js(f"{{ const e = document.getElementById('{name}'); e.value = '{v}'; e.dispatchEvent(new Event('input')) }}")
    table = page.js("[...document.querySelectorAll('#dist tr.surv')].map(r => [Number(r.dataset.id), Number(r.dataset.p)])")
    shown = page.js("document.getElementById('survive').textContent")
    s = page.js(f"npgpt2Survivors(R.last_logits, {temperature}, {top_k}, {top_p})")
    ids, probs = np.array(s["ids"]), np.array(s["probs"])
    assert shown.startswith(f"{len(ids)} of 50257 tokens can be drawn")
    order = np.lexsort((ids, -probs))
    assert table == [[int(ids[j]), pytest.approx(probs[j], abs=1e-15)] for j in order[:20]]

    def draw(u):
        return int(sample_logits(logits, FixedRng(u), temperature, top_k, top_p)[0])

    with np.errstate(over="ignore"):
        greedy = temperature == 0 or not np.isfinite(logits / temperature).all()
    if greedy:
        assert ids.tolist() == [draw(0.5)] == [int(logits.argmax())] and probs.tolist() == [1.0]
        return
    if top_k:
        assert len(ids) == min(top_k, len(ids))
    # sample_logits walks its survivors in this order: sorted when there is a cut, else by id
    if not (top_k or top_p < 1):
        assert len(ids) == 50257
        ids, probs = ids[np.argsort(ids)], probs[np.argsort(ids)]
    cdf = np.cumsum(probs)
    assert cdf[-1] == pytest.approx(1, abs=1e-12)
    # the middle of each interval draws that token; just inside either end too, so the page's
    # cumulative probabilities are sample_logits' to ~1e-10 (intervals wider than 1e-9 only)
    n = len(ids)
    for j in sorted({*range(min(n, 25)), *range(max(0, n - 3), n), *np.linspace(0, n - 1, 40).astype(int)}):
        lo = cdf[j - 1] if j else 0.0
        assert draw((lo + cdf[j]) / 2) == ids[j]
        if cdf[j] - lo > 1e-8:
            assert draw(lo + 1e-10) == ids[j] and draw(cdf[j] - 1e-10) == ids[j]
    assert draw(1 - 1e-13) == ids[-1]  # and nothing survives past the page's last token


# ---------------------------------------------------------------- the server's form of the page
class ExplainApp(BaseHTTPRequestHandler):
    """GET /explain and POST /v1/explain as the server offers them, on explain's functions alone."""
    model = tok = None
    posts = []

    def log_message(self, *a):
        pass

    def send(self, status, ctype, body):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self.send(200, "text/html; charset=utf-8", explain.page_html().encode())

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.posts.append(body)
        try:
            r = explain.build_report(self.model, self.tok, body.get("text"), layer=body.get("layer"))
            self.send(200, "application/json", json.dumps(r).encode())
        except npgpt2.Npgpt2Error as e:
            self.send(400, "application/json", json.dumps({"error": str(e)}).encode())


def test_server_page_asks_and_fetches_layers(browser, monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    ExplainApp.model, ExplainApp.tok = npgpt2.load_model(FIX / "full"), npgpt2.load_tokenizer(FIX / "full")
    ExplainApp.posts = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), ExplainApp)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        page = open_page(browser, f"http://127.0.0.1:{httpd.server_port}/explain")
        assert page.js("document.getElementById('report').classList.contains('hidden')")
        page.js("document.getElementById('text').value = 'Hello there, world'; document.getElementById('go').click()")
        page.wait_for("document.querySelectorAll('#grid canvas').length === 2")
        assert ExplainApp.posts == [{"text": "Hello there, world", "layer": 0}]
        assert page.js("R.attention.patterns[1]") is None  # one layer per answer
        page.js("document.getElementById('layer').value = 1; document.getElementById('layer').dispatchEvent(new Event('change'))")
        page.wait_for("R.attention.patterns[1] !== null && document.getElementById('heatmap').dataset.layer === '1'")
        assert ExplainApp.posts[-1] == {"text": "Hello there, world", "layer": 1}
        assert page.js("document.querySelectorAll('#lens td.lenscell').length") == 3 * 4
        # the temperature control changes the numbers shown
        before = page.js("document.querySelector('#dist tr.surv').dataset.p")
        page.js("{ const e = document.getElementById('temperature_r'); e.value = '0.3'; e.dispatchEvent(new Event('input')) }")
        assert page.js("document.getElementById('temperature').value") == "0.3"
        assert float(page.js("document.querySelector('#dist tr.surv').dataset.p")) > float(before)
        # a 400 is shown as its one-line message
        page.js("document.getElementById('text').value = ''; document.getElementById('go').click()")
        page.wait_for("document.getElementById('status').textContent !== ''")
        assert page.js("document.getElementById('status').textContent") == "text is empty (give at least one token)"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_random_weights_banner(browser, report_file, tmp_path):
    # the fixture has random weights: the page says so above everything; a trained model's does not
    page = open_page(browser, report_file.as_uri())
    page.wait_for("document.querySelectorAll('#grid canvas').length === 2")
    assert page.js("getComputedStyle(document.getElementById('random')).display") != "none"
    assert page.js("document.getElementById('random').textContent").startswith(
        "Warning: these weights look untrained (random)")
    out = tmp_path / "induction.html"
    assert main(["explain", "--example", "induction", "--out", str(out), "cat dog red blue sun cat dog red"]) == 0
    page = open_page(browser, out.as_uri())
    page.wait_for("document.querySelectorAll('#grid canvas').length === 2")  # its 2 heads a layer
    assert page.js("R.random_weights.verdict") is False
    assert page.js("getComputedStyle(document.getElementById('random')).display") == "none"
