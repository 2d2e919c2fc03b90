"""Make the pictures WALKTHROUGH.md shows (docs/img/*.svg), as SVG text written by Python.

    python tools/make_pictures.py              # writes docs/img/
    python tools/make_pictures.py --out DIR    # somewhere else (tests compare the two)

Four diagrams (the block with its shapes, the residual stream, one head's data flow, the KV
cache) and three pictures of the shipped trained models (npgpt2.example_dir): the attention
patterns of the induction model's previous-token and induction heads on a repeated sequence,
and logit-lens grids of the induction and Jargon models. No plotting library: every shape is
an SVG element written here, so the same weights give the same bytes (numbers are rounded
before they become colours or text) and tests/test_pictures.py regenerates the files and
compares. Heads are found by their scores (npgpt2.interp), never by a fixed index, so a
retrained model gives its own pictures: rerun this script after retraining.
"""
import argparse
import os
import sys
from html import escape
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("NPGPT2_PLAIN", "1")  # the plain layers, as the walkthrough

import npgpt2  # noqa: E402
from npgpt2.interp import induction_score, previous_token_score  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "img"
FONT = "font-family='DejaVu Sans, Helvetica, Arial, sans-serif'"
PERIOD = 10  # the repeated sequence of the induction pictures: PERIOD random words, then the same again
SEED = 1


# ---------------------------------------------------------------- SVG pieces
class Svg:
    """A list of SVG elements with a few drawing helpers; str() is the file."""

    def __init__(self, width, height):
        self.width, self.height, self.parts = width, height, []

    def text(self, x, y, s, size=13, anchor="middle", weight="normal", fill="#222", rotate=None):
        turn = f" transform='rotate({rotate} {x} {y})'" if rotate is not None else ""
        self.parts.append(f"<text x='{x:g}' y='{y:g}' font-size='{size}' text-anchor='{anchor}' "
                          f"font-weight='{weight}' fill='{fill}'{turn}>{escape(s)}</text>")

    def rect(self, x, y, w, h, fill="#fff", stroke="#444", rx=0, width=1.2, dash=None):
        d = f" stroke-dasharray='{dash}'" if dash else ""
        self.parts.append(f"<rect x='{x:g}' y='{y:g}' width='{w:g}' height='{h:g}' rx='{rx}' fill='{fill}' "
                          f"stroke='{stroke}' stroke-width='{width}'{d}/>")

    def box(self, x, y, w, h, label, shape=None, fill="#eef3fb"):
        """A rounded box centred on (x, y): a label and, under it, a shape in grey."""
        self.rect(x - w / 2, y - h / 2, w, h, fill=fill, rx=6)
        if shape is None:
            self.text(x, y + 4.5, label)
        else:
            self.text(x, y - 2, label)
            self.text(x, y + 13, shape, size=11, fill="#555")

    def arrow(self, x1, y1, x2, y2, color="#444", dash=None):
        d = f" stroke-dasharray='{dash}'" if dash else ""
        self.parts.append(f"<line x1='{x1:g}' y1='{y1:g}' x2='{x2:g}' y2='{y2:g}' stroke='{color}' "
                          f"stroke-width='1.4' marker-end='url(#arrow)'{d}/>")

    def path(self, d, color="#444", width=1.4, arrow=True):
        end = " marker-end='url(#arrow)'" if arrow else ""
        self.parts.append(f"<path d='{d}' fill='none' stroke='{color}' stroke-width='{width}'{end}/>")

    def plus(self, x, y, color="#b5532b"):
        """The ⊕ where a branch's output is added to the residual stream."""
        self.parts.append(f"<circle cx='{x:g}' cy='{y:g}' r='8' fill='white' stroke='{color}' stroke-width='2'/>"
                          f"<path d='M {x - 5:g} {y:g} H {x + 5:g} M {x:g} {y - 5:g} V {y + 5:g}' "
                          f"stroke='{color}' stroke-width='2'/>")

    def __str__(self):
        head = (f"<svg xmlns='http://www.w3.org/2000/svg' width='{self.width}' height='{self.height}' "
                f"viewBox='0 0 {self.width} {self.height}' {FONT}>\n"
                "<defs><marker id='arrow' viewBox='0 0 10 10' refX='9' refY='5' markerWidth='9' "
                "markerHeight='9' markerUnits='userSpaceOnUse' orient='auto-start-reverse'>"
                "<path d='M 0 0 L 10 5 L 0 10 z' fill='#444'/></marker></defs>\n"
                f"<rect width='{self.width}' height='{self.height}' fill='white'/>\n")
        return head + "\n".join(self.parts) + "\n</svg>\n"


def blue(v):
    """v in [0, 1] -> a colour from white (0) to dark blue (1)."""
    v = min(max(float(v), 0.0), 1.0)
    r, g, b = (round(255 - (255 - c) * v) for c in (33, 84, 160))
    return f"#{r:02x}{g:02x}{b:02x}"


def ink(v):
    """Text colour readable on blue(v)."""
    return "#fff" if v > 0.55 else "#222"


# ---------------------------------------------------------------- diagrams
def block_diagram():
    """The forward pass with every array's shape (B, T, C, NH, hs = C/NH, 4C, V)."""
    s = Svg(560, 930)
    s.text(280, 24, "GPT-2's forward, with shapes", size=16, weight="bold")
    x, w = 200, 250
    steps = [(55, "token ids", "(B, T) int"), (115, "wte[ids] + wpe[positions]", "embed (B, T, C)")]
    for y, label, shape in steps:
        s.box(x, y, w, 40, label, shape, fill="#f4f4f4")
    s.arrow(x, 75, x, 93)
    s.rect(45, 150, 470, 560, fill="#fbfbf4", stroke="#999", rx=10, dash="6 4")
    s.path(f"M {x} 135 L {x} 184", color="#b5532b", width=2.2)
    attn = [(205, "ln_1", "(B, T, C)"), (265, "c_attn: x W + b", "qkv (B, T, 3C)"),
            (325, "split heads", "q, k, v (B, NH, T, hs)"), (385, "softmax(mask(q kᵀ / √hs))", "pattern (B, NH, T, T)"),
            (445, "pattern · v, merge heads", "z (B, T, C)"), (505, "c_proj", "attn.out (B, T, C)")]
    mlp = [(575, "ln_2 → c_fc → GELU", "mlp.pre, mlp.post (B, T, 4C)"), (635, "c_proj", "mlp.out (B, T, C)")]
    for i, (y, label, shape) in enumerate(attn + mlp):
        s.box(x, y, w, 40, label, shape)
        if i not in (len(attn) - 1, len(attn) + len(mlp) - 1):
            s.arrow(x, y + 20, x, y + 40)
    # the residual stream runs down the right-hand side; each branch adds back into it
    rx, red = 420, "#b5532b"
    s.path(f"M {x} 160 L {rx} 160 L {rx} 533", color=red, width=2.2, arrow=False)
    s.text(rx + 8, 350, "residual stream (B, T, C)", size=12, fill=red, rotate=90, anchor="middle")
    s.plus(rx, 541)
    s.arrow(x + w / 2, 505, rx - 9, 539)
    s.text(rx + 12, 560, "resid_mid", size=11, anchor="start", fill=red)
    s.path(f"M {rx} 549 L {rx} 673", color=red, width=2.2, arrow=False)
    s.path(f"M {rx} 549 L {x} 549 L {x} 554", color=red, width=2.2)
    s.plus(rx, 681)
    s.arrow(x + w / 2, 635, rx - 9, 679)
    s.text(rx + 12, 700, "resid_post", size=11, anchor="start", fill=red)
    s.text(60, 700, "block i, repeated L times", size=12, anchor="start", fill="#666")
    s.path(f"M {rx} 689 L {rx} 735 L {x} 735 L {x} 759", color=red, width=2.2)
    s.box(x, 780, w, 40, "ln_f", "(B, T, C)", fill="#f4f4f4")
    s.arrow(x, 800, x, 820)
    s.box(x, 842, w, 40, "ln_f · wteᵀ (the tied head)", "logits (B, T, V)", fill="#f4f4f4")
    s.text(280, 900, "C = n_embd, NH = n_head, hs = C / NH, 4C = the MLP's hidden width, V = n_vocab", size=11,
           fill="#555")
    s.text(280, 918, "names as in model.activation_names(): embed, h{i}.ln_1, h{i}.attn.q, ... ln_f", size=11,
           fill="#555")
    return s


def residual_diagram():
    """The residual stream: every branch reads it through a layer norm and adds its output back."""
    s = Svg(760, 250)
    s.text(380, 24, "The residual stream: read through a layer norm, written by addition", size=16, weight="bold")
    y = 150
    s.path(f"M 30 {y} L 700 {y}", color="#b5532b", width=3)
    s.box(60, y, 70, 40, "embed", fill="#f4f4f4")
    xs = [170, 300, 430, 560]
    names = ["h0.attn", "h0.mlp", "h1.attn", "h1.mlp"]
    for x, name in zip(xs, names):
        s.path(f"M {x - 30} {y} L {x - 30} {y - 60}", width=1.4)
        s.box(x, y - 82, 105, 44, name, "ln → branch", fill="#eef3fb")
        s.path(f"M {x + 30} {y - 60} L {x + 30} {y - 9}", width=1.4)
        s.plus(x + 30, y)
    s.box(710, y, 60, 40, "ln_f", fill="#f4f4f4")
    s.text(380, 200, "resid_post after block L-1 = embed + Σ (every attn.out and mlp.out): each output is a sum of "
           "parts,", size=12, fill="#444")
    s.text(380, 218, "so a head's or an MLP's contribution to the logits can be read off separately "
           "(direct logit attribution)", size=12, fill="#444")
    s.text(380, 236, "the gradient reaches the embedding through the additions unchanged, however deep the model",
           size=12, fill="#444")
    return s


def head_diagram():
    """One head's data flow, with a T x T picture of the mask."""
    s = Svg(860, 300)
    s.text(430, 24, "One attention head h: from its slice of q, k, v to its slice of z", size=16, weight="bold")
    y = 110
    s.box(70, y - 45, 110, 40, "q", "(T, hs)")
    s.box(70, y + 45, 110, 40, "k", "(T, hs)")
    s.arrow(125, y - 45, 170, y - 8)
    s.arrow(125, y + 45, 170, y + 8)
    s.box(225, y, 100, 44, "q kᵀ", "(T, T)")
    s.arrow(275, y, 300, y)
    s.box(350, y, 90, 44, "× 1/√hs", "(T, T)")
    s.arrow(395, y, 420, y)
    # the mask: a T x T grid, the future (above the diagonal) crossed out
    T, cell, gx, gy = 6, 11, 425, y - 33
    for t in range(T):
        for u in range(T):
            fill = "#d9d9d9" if u > t else "#cfe0f5"
            s.rect(gx + u * cell, gy + t * cell, cell, cell, fill=fill, stroke="#fff", width=0.8)
    s.text(gx + T * cell / 2, gy + T * cell + 14, "mask: future → −∞", size=11, fill="#555")
    s.arrow(gx + T * cell + 4, y, gx + T * cell + 30, y)
    s.box(560, y, 100, 44, "softmax", "rows sum to 1")
    s.arrow(610, y, 640, y)
    s.box(695, y, 100, 44, "pattern · v", "(T, hs)")
    s.box(695, y + 90, 100, 40, "v", "(T, hs)")
    s.arrow(695, y + 70, 695, y + 23)
    s.arrow(745, y, 790, y)
    s.text(822, y - 4, "z[:, h·hs :", size=12)
    s.text(822, y + 12, "(h+1)·hs]", size=12)
    s.text(430, 250, "scores[t, u] = q_t · k_u / √hs: how well query t matches key u;  pattern[t, u] = "
           "softmax over u ≤ t", size=12, fill="#444")
    s.text(430, 270, "names: h{i}.attn.q|k|v (B, NH, T, hs), h{i}.attn.scores and h{i}.attn.pattern (B, NH, T, T), "
           "h{i}.attn.z (B, T, C)", size=12, fill="#444")
    return s


def kv_cache_diagram():
    """What a KV cache holds per layer, and what one decode step reads and writes."""
    s = Svg(780, 330)
    s.text(390, 24, "The KV cache: per layer, every past position's keys and values", size=16, weight="bold")
    n_ctx, cell, filled = 16, 26, 6
    for name, y in [("k[layer]", 70), ("v[layer]", 130)]:
        s.text(95, y + 18, name, size=13, anchor="end")
        for u in range(n_ctx):
            fill = "#cfe0f5" if u < filled else "#e9a07f" if u == filled else "#f6f6f6"
            s.rect(105 + u * cell, y, cell, 28, fill=fill, stroke="#999", width=0.8)
        s.text(105 + n_ctx * cell + 8, y + 18, "(B, NH, n_ctx, hs)", size=11, anchor="start", fill="#555")
    for u in (0, filled, n_ctx - 1):
        s.text(105 + u * cell + cell / 2, 60, str(u) if u < n_ctx - 1 else "n_ctx-1", size=10, fill="#555")
    s.text(105 + filled * cell / 2, 186, f"positions 0..{filled - 1}: written by earlier steps (cache.lengths = "
           f"{filled})", size=11, fill="#555")
    x6 = 105 + filled * cell + cell / 2
    s.box(x6, 250, 200, 44, f"new token at position {filled}", "q, k, v (B, NH, 1, hs)", fill="#fbe9e1")
    s.arrow(x6, 228, x6, 160)
    s.text(x6 + 110, 224, "its k and v are written at position 6;", size=11, anchor="start", fill="#444")
    s.text(x6 + 110, 240, "its q attends over positions 0..6 (no mask needed:", size=11, anchor="start", fill="#444")
    s.text(x6 + 110, 256, "nothing later is in the cache)", size=11, anchor="start", fill="#444")
    s.text(390, 306, "one decode step adds 2 · n_layer · C numbers per sequence (k and v, every layer), "
           "and runs the blocks for one position only", size=12, fill="#444")
    return s


# ---------------------------------------------------------------- the trained models
def repeated_words(model, period=PERIOD, seed=SEED):
    """One row: `period` distinct random tokens, then the same again: int (1, 2 period)."""
    r = np.random.default_rng(seed).permutation(model.hparams["n_vocab"])[None, :period]
    return np.concatenate([r, r], axis=1)


def find_heads(acts, period):
    """(previous-token head of layer 0, (offset, induction head) of the last layer), each by its best
    score, as WALKTHROUGH.md 7.2: offset 1 is the textbook induction head (the token after the
    current token's previous occurrence), offset 2 one place further."""
    L = len([n for n in acts if n.endswith(".attn.pattern")])
    prev = int(np.argmax(previous_token_score(acts["h0.attn.pattern"])))
    pattern = acts[f"h{L - 1}.attn.pattern"]
    scores = np.stack([induction_score(pattern, period), induction_score(pattern, period - 1)])
    offset, ind = np.unravel_index(scores.argmax(), scores.shape)
    return prev, (int(offset) + 1, int(ind), float(scores.max())), L - 1


def heatmap(s, x0, y0, pattern, labels, cell, title):
    """A (T, T) attention pattern: row = query position, column = key position."""
    T = pattern.shape[0]
    s.text(x0 + T * cell / 2, y0 - 44, title, size=13, weight="bold")
    for t in range(T):
        for u in range(T):
            v = round(float(pattern[t, u]), 2)
            s.rect(x0 + u * cell, y0 + t * cell, cell, cell, fill=blue(v) if u <= t else "#f3f3f3",
                   stroke="#fff", width=0.5)
        s.text(x0 - 4, y0 + t * cell + cell * 0.72, labels[t], size=9, anchor="end")
        s.text(x0 + t * cell + cell * 0.7, y0 - 4, labels[t], size=9, anchor="start", rotate=-60)
    s.text(x0 - 60, y0 + T * cell / 2, "query (position t)", size=11, rotate=-90, fill="#555")
    s.text(x0 + T * cell / 2, y0 + T * cell + 16, "key (position u)", size=11, fill="#555")


def induction_pictures(model, enc):
    """The previous-token head and the induction head on one repeated sequence."""
    tokens = repeated_words(model)
    _, acts = model.run_with_cache(tokens)
    prev, (offset, ind, p1), last = find_heads(acts, PERIOD)
    labels = [enc.decode([int(i)]).strip() or "_" for i in tokens[0]]
    T, cell = tokens.shape[1], 17
    s = Svg(2 * (T * cell + 120) + 40, T * cell + 150)
    p0 = previous_token_score(acts["h0.attn.pattern"][:, prev:prev + 1])[0]
    heatmap(s, 110, 110, acts["h0.attn.pattern"][0, prev], labels, cell,
            f"layer 0, head {prev}: previous-token score {p0:.2f}")
    heatmap(s, 110 + T * cell + 160, 110, acts[f"h{last}.attn.pattern"][0, ind], labels, cell,
            f"layer {last}, head {ind}: induction score {p1:.2f} (offset {offset})")
    s.text(s.width / 2, 22, f"The induction model on {PERIOD} random words repeated (darker = more attention)",
           size=15, weight="bold")
    return s


def lens_grid(rows, labels, probs, tops, title, cell_w=58, note=""):
    """rows: row names; probs (R, T) the probability of the true next token; tops (R, T) top-1 text."""
    R, T = probs.shape
    s = Svg(110 + T * cell_w + 20, 72 + R * 30 + (40 if note else 12))
    s.text(s.width / 2, 22, title, size=14, weight="bold")
    for t in range(T):
        s.text(110 + t * cell_w + cell_w / 2, 62, labels[t], size=10)
    s.text(110 + T * cell_w / 2, 44, "input token at position t; cell: the top guess for t + 1, shaded by "
           "√(probability of the true next token)", size=11, fill="#555")
    for r in range(R):
        y = 72 + r * 30
        s.text(104, y + 19, rows[r], size=11, anchor="end")
        for t in range(T):
            v = round(float(np.sqrt(probs[r, t])), 2)  # sqrt: small probabilities stay visible
            s.rect(110 + t * cell_w, y, cell_w, 28, fill=blue(v), stroke="#fff", width=0.6)
            s.text(110 + t * cell_w + cell_w / 2, y + 18, tops[r][t][:8], size=9, fill=ink(v))
    if note:
        s.text(s.width / 2, 72 + R * 30 + 24, note, size=11, fill="#555")
    return s


def lens_data(model, enc, tokens):
    """(row names, labels, probability of the true next token (L+1, T-1), top-1 texts)."""
    _, acts = model.run_with_cache(tokens)
    lens = npgpt2.logit_lens(model, acts)[:, 0, :-1]                   # (L + 1, T - 1, V): drop the last position
    z = lens - lens.max(-1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    true = np.take_along_axis(p, np.broadcast_to(tokens[0, 1:], p.shape[:2])[..., None], -1)[..., 0]
    tops = [[enc.decode([int(i)]).strip() or "_" for i in row] for row in lens.argmax(-1)]
    rows = ["embed"] + [f"after block {i}" for i in range(model.hparams["n_layer"])]
    labels = [enc.decode([int(i)]).strip() or "_" for i in tokens[0, :-1]]
    return rows, labels, true, tops


def lens_pictures():
    """Logit-lens grids: the induction model on a repeated sequence, the Jargon model on a sentence."""
    folder = npgpt2.example_dir("induction")
    model, enc = npgpt2.load_model(folder, dtype=np.float64), npgpt2.load_tokenizer(folder)
    tokens = repeated_words(model, period=8, seed=SEED)
    ind = lens_grid(*lens_data(model, enc, tokens), "Logit lens, induction model: the second copy is predicted only "
                    "after the last block", cell_w=46)
    folder = npgpt2.example_dir("jargon")
    model, enc = npgpt2.load_model(folder, dtype=np.float64), npgpt2.load_tokenizer(folder)
    tokens = np.array([enc.encode(JARGON_TEXT)])
    jar = lens_grid(*lens_data(model, enc, tokens), "Logit lens, Jargon model: each layer's guess for the next token")
    return ind, jar


JARGON_TEXT = "hacker: a person who enjoys exploring the details of programmable systems"


def pictures():
    """{file name: Svg} of every picture."""
    folder = npgpt2.example_dir("induction")
    model, enc = npgpt2.load_model(folder, dtype=np.float64), npgpt2.load_tokenizer(folder)
    lens_ind, lens_jar = lens_pictures()
    return {"block.svg": block_diagram(), "residual.svg": residual_diagram(), "head.svg": head_diagram(),
            "kv_cache.svg": kv_cache_diagram(), "induction_heads.svg": induction_pictures(model, enc),
            "logit_lens_induction.svg": lens_ind, "logit_lens_jargon.svg": lens_jar}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(OUT), help="folder to write the SVG files into (default docs/img)")
    out = Path(parser.parse_args(argv).out)
    out.mkdir(parents=True, exist_ok=True)
    for name, svg in pictures().items():
        (out / name).write_text(str(svg), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
