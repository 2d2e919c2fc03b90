"""`npgpt2 explain`: what the model computes for one text, as numbers a learner can read.

For the last position of a text: the next-token distribution; what each layer already
"thinks" the next token is (logit lens: a layer's residual stream through ln_f and the tied
output head); for each layer the head that looks furthest away from the current token; and
which input tokens the prediction depends on most (attribution = ‖gradient × input‖ of each
position's embedding, from the hand-written backward pass). The web report adds the
attention patterns of every head and the logit lens at every position.

Everything runs on the plain layers of layers.py: one `model.forward_with_saves(lay=layers)`,
whose saved activations (kept for the backward pass anyway) hold every layer's residual
stream and attention probabilities, then `model.backward` from d log p(next token) / d logits
for the attributions: what `interp.input_gradient` computes, without a second forward pass.
The logit lens goes a layer and LENS_CHUNK positions at a time, never as an (L+1, T, V) array.

    report = build_report(model, tokenizer, "The quick brown fox")   # a JSON-able dict
    print(format_report(report, width=100))                           # the terminal layout
    page = page_html(report)                                          # one self-contained HTML file
"""
import json
import math
import textwrap
from pathlib import Path

import numpy as np

from . import layers
from .compact_vocab import shown_ids
from .errors import Npgpt2Error
from .interp import float_model, logprob_backward

PAGE = Path(__file__).parent / "assets" / "explain.html"
REPORT_SLOT = "/*REPORT*/null"  # where page_html puts the report's JSON in the template
N_ATTRIBUTIONS = 5              # input tokens the terminal lists
N_SAMPLING_TEXTS = 50           # tokens, by logit, whose text the page's sampling view can show
LENS_CHUNK = 64                 # positions per ln_f + head product: (64, V) floats at a time
MAX_PAGE_WEIGHTS = 10_000_000   # attention weights a report file may hold (~6 bytes each as JSON)
MAX_LENS_K = 10                 # logit-lens tokens per layer and position: 124M at 1024 tokens, 10 is ~6 MB of page


# ---------------------------------------------------------------- arguments
def _check_int(name, value, lo, hi):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not lo <= value <= hi:
        raise Npgpt2Error(f"{name} must be an integer between {lo} and {hi}, got {value!r}")
    return int(value)


def encode_text(tokenizer, text, n_ctx):
    """text -> (ids, note): ids left-trimmed to the last n_ctx tokens; note says so, else None."""
    if not isinstance(text, str):
        raise Npgpt2Error(f"text must be a string, got {type(text).__name__}")
    ids = tokenizer.encode(text)
    if not ids:
        raise Npgpt2Error("text is empty (give at least one token)")
    note = None
    if len(ids) > n_ctx:
        note = (f"the text is {len(ids)} tokens, more than the model's context n_ctx={n_ctx}: "
                f"kept its last {n_ctx}")
        ids = ids[-n_ctx:]
    return ids, note


def check_page_size(hparams, n_tokens, layer=None):
    """Raise Npgpt2Error (naming --layer) when the patterns would make a page too big to open."""
    L, NH = hparams["n_layer"], hparams["n_head"]
    n = (1 if layer is not None else L) * NH * n_tokens * (n_tokens + 1) // 2
    if n > MAX_PAGE_WEIGHTS:
        which = f"layer {layer}" if layer is not None else f"all {L} layers"
        raise Npgpt2Error(f"--layer: the attention of {which} for {n_tokens} tokens is {n / 1e6:.0f}M weights "
                          f"(~{mb(6 * n)} of HTML); "
                          f"choose one layer with --layer N or a shorter text")


# ---------------------------------------------------------------- the numbers
def top_tokens(logits, k):
    """logits: (N, V) -> ids (N, k), probs (N, k) of each row's softmax, most likely first.

    Ties are broken by id (as sampling.py sorts). The softmax is taken in float64.
    """
    x = np.asarray(logits, dtype=np.float64)                       # (N, V)
    e = np.exp(x - x.max(axis=-1, keepdims=True))                  # (N, V)
    probs = e / e.sum(axis=-1, keepdims=True)                      # (N, V)
    part = np.argpartition(-x, k - 1, axis=-1)[:, :k]              # (N, k) the k largest, unordered
    ids = np.array([row[np.lexsort((row, -x[n, row]))] for n, row in enumerate(part)]).reshape(-1, k)
    return ids, np.take_along_axis(probs, ids, axis=-1)            # (N, k), (N, k)


def logit_lens_top(model, streams, k, check=None):
    """The logit lens: each residual stream through ln_f and the tied head, top k per position.

    streams: (R, P, C), R residual streams at the same P positions -> ids (R, P, k), probs (R, P, k).
    Works on LENS_CHUNK rows of all R * P at a time, so no (R, P, V) array is held, and the
    last position's R rows of the terminal share one pass over wte.
    """
    p = model.params
    R, P, C = streams.shape
    flat = streams.reshape(R * P, C)                               # (R*P, C)
    ids, probs = [], []
    for r0 in range(0, R * P, LENS_CHUNK):
        if check is not None:
            check()
        x, _, _ = layers.layernorm_forward(flat[r0:r0 + LENS_CHUNK], p["model/ln_f/g"], p["model/ln_f/b"])
        # the model's own head: wte.T (with a LoRA adapter on the tied wte, W + scaling * A @ B)
        i, pr = top_tokens(model._head(x[None])[0], k)               # (n, C) @ (C, V) -> (n, V) -> (n, k)
        ids.append(i)
        probs.append(pr)
    return np.concatenate(ids).reshape(R, P, k), np.concatenate(probs).reshape(R, P, k)


def head_most_away(pattern):
    """pattern: (NH, T, T) of one layer -> (head, away, to_pos, weight) for the last position.

    away = 1 - the probability the last position gives itself; to_pos = the other position
    that head attends to most (None when the text is one token long).
    """
    NH, T, _ = pattern.shape
    row = pattern[:, T - 1, :].astype(np.float64)                  # (NH, T) what the last query sees
    away = 1.0 - row[:, T - 1]                                     # (NH,)
    h = int(np.argmax(away))
    if T == 1:
        return h, float(away[h]), None, 0.0
    s = int(np.argmax(row[h, :T - 1]))
    return h, float(away[h]), s, float(row[h, s])


def _ragged(pattern):
    """(NH, T, T) -> [head][query t] = the t + 1 weights it gives to positions 0..t, 3 decimals."""
    a = np.round(pattern.astype(np.float64), 3)
    return [[a[h, t, :t + 1].tolist() for t in range(a.shape[1])] for h in range(a.shape[0])]


def build_report(model, tokenizer, text, top_k=10, lens_k=3, layer=None, check=None):
    """Everything `npgpt2 explain` shows about `text`, as a JSON-serialisable dict.

    top_k next tokens; the logit lens' top lens_k at every layer and position; attention
    patterns of every layer, or of `layer` only; per layer the head that attends most away
    from the last token; attributions; the last position's logits. The keys are listed in
    HACKING.md. Raises Npgpt2Error naming the argument for empty text or a bad top_k,
    lens_k or layer. check: see report_for_ids.
    """
    ids, note = encode_text(tokenizer, text, model.hparams["n_ctx"])
    return report_for_ids(model, tokenizer, ids, top_k, lens_k, layer, note=note, text=text, check=check)


class Stopped(Exception):
    """report_for_ids' check() ended the work (the server: past the request's deadline)."""


class CheckedLayers:
    """The layers module with check() before every layer call, forward and backward: a report
    that must stop (check raises) stops within one layer, not at the end."""

    def __init__(self, check):
        self._check = check

    def __getattr__(self, name):
        fn = getattr(layers, name)
        if not callable(fn):
            return fn

        def call(*args, **kwargs):
            self._check()
            return fn(*args, **kwargs)
        return call


def report_for_ids(model, tokenizer, ids, top_k=10, lens_k=3, layer=None, *, note=None, text=None,
                   lens_positions="all", patterns=True, target=None, check=None):
    """build_report for token ids (1-D, at most n_ctx of them).

    lens_positions "last" computes the logit lens at the last position only and
    patterns=False leaves the attention patterns out: what the terminal needs. target is the
    token the attributions are for (default: the most likely next token). check() is called
    before every layer and logit-lens chunk; it raises (e.g. Stopped) to end the work there.
    An int8 model is explained on its dequantised float32 weights (interp.float_model).
    """
    model = float_model(model)
    hp = model.hparams
    L, NH, V = hp["n_layer"], hp["n_head"], hp["n_vocab"]
    top_k = _check_int("top_k", top_k, 1, V)
    lens_k = _check_int("lens_k", lens_k, 1, min(V, MAX_LENS_K))
    if layer is not None:
        layer = _check_int("layer", layer, 0, L - 1)
    ids = np.asarray(ids, dtype=np.int64)
    if ids.ndim != 1 or not 1 <= len(ids) <= hp["n_ctx"]:
        raise Npgpt2Error(f"ids must be 1-D with 1 to n_ctx={hp['n_ctx']} tokens, got shape {ids.shape}")
    if ids.min() < 0 or ids.max() >= V:  # a tokenizer that does not belong to this model
        bad = int(ids[(ids < 0) | (ids >= V)][0])
        raise Npgpt2Error(f"text: token id {bad} is outside the model's vocabulary (n_vocab={V}); "
                          f"is the tokenizer the model folder's own?")
    T = len(ids)
    texts = {}
    gid, vocab = shown_ids(tokenizer)  # ids shown are GPT-2's, also for a compact vocabulary

    def tok(i):
        i = int(i)
        if i not in texts:
            texts[i] = tokenizer.decode([i])
        return texts[i]

    # One forward pass on the plain layers, keeping what the backward pass needs: that
    # includes every layer's residual stream and attention probabilities, so they are read
    # from it (shapes in GPT2.forward_with_saves) rather than from a second forward.
    logits, saved = model.forward_with_saves(ids[None], lay=layers if check is None else CheckedLayers(check))
    blocks = saved["blocks"]                                         # [1, T] -> [1, T, V] above
    # the residual stream entering each block, then after the last: row 0 is the embedding
    rows = slice(None) if lens_positions == "all" else slice(T - 1, T)
    streams = np.stack([b["resid_pre"][0, rows] for b in blocks] + [saved["resid_final"][0, rows]])  # (L+1, P, C)
    lens_ids, lens_probs = logit_lens_top(model, streams, lens_k, check)  # (L+1, P, k) each
    embed = np.array(blocks[0]["resid_pre"][0], dtype=np.float64)   # (T, C) wte[ids] + wpe[:T]
    away = [head_most_away(b["attn.att"][0]) for b in blocks]       # per layer, from (NH, T, T)
    looks_random = random_weights(model, [b["attn.att"][0] for b in blocks], logits[0])
    pats = [_ragged(b["attn.att"][0]) if patterns and layer in (None, i) else None
            for i, b in enumerate(blocks)]
    del streams

    last = logits[0, -1].astype(np.float64)                         # (V,) the next-token logits
    next_ids, next_probs = top_tokens(last[None], top_k)
    target = int(next_ids[0, 0]) if target is None else _check_int("target", target, 0, V - 1)

    # attribution: the gradient of log p(target) at the last position with respect to each
    # input embedding, by the hand-written backward pass (input_gradient without its forward)
    dembed = logprob_backward(model, logits, saved, T - 1, target)  # (T, C); consumes saved
    scores = np.linalg.norm(dembed * embed, axis=-1)                # (T,) ‖gradient × input‖

    head_order = np.argsort(-last, kind="stable")[:N_SAMPLING_TEXTS]
    return {
        "model": {k: int(hp[k]) for k in ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer")},
        "text": text if text is not None else tokenizer.decode(ids.tolist()),
        "note": note,
        "random_weights": looks_random,
        "tokens": [{"id": gid(i), "text": tok(i)} for i in ids],
        "next": [{"id": gid(i), "text": tok(i), "prob": float(p)} for i, p in zip(next_ids[0], next_probs[0])],
        "lens": {
            "k": lens_k,
            "rows": ["embed"] + [f"h{i}" for i in range(L)],
            "positions": list(range(T))[rows],
            # [row][position][rank] = {id, text, prob}; row 0 is the embedding, row i is after block i-1
            "top": [[[{"id": gid(i), "text": tok(i), "prob": float(p)} for i, p in zip(ri, rp)]
                     for ri, rp in zip(lens_ids[r], lens_probs[r])] for r in range(L + 1)],
        },
        "attention": {"n_head": NH, "layers": [i for i in range(L) if pats[i] is not None], "patterns": pats},
        "heads_away": [{"layer": i, "head": h, "away": a, "to_pos": s,
                        "to_id": None if s is None else gid(ids[s]),
                        "to_text": None if s is None else tok(ids[s]), "weight": w}
                       for i, (h, a, s, w) in enumerate(away)],
        "attribution": {"position": T - 1, "target": {"id": gid(target), "text": tok(target)},
                        "scores": [float(s) for s in scores]},
        "last_logits": [round(float(v), 5) for v in last],
        # last_logits is indexed by the model's rows; vocab_ids gives each row's GPT-2 id (compact vocabularies)
        "vocab_ids": None if vocab is None else vocab.tolist(),
        "logit_texts": [[gid(i), tok(i)] for i in head_order],
    }


# ---------------------------------------------------------------- do the weights look trained?
# GPT-2's initialisation (model.init_model): weights N(0, 0.02), wpe N(0, 0.01), the residual
# projections N(0, 0.02 / sqrt(2 n_layer)), biases 0, layernorm gains 1. Training moves the
# weights away from that scale (OpenAI's 124M: std 0.1-0.2, 5-10x) and makes attention pick
# positions and predictions. "Random" = attention on the text is near uniform (mean normalised
# entropy above UNIFORM_ATTENTION) and either the weights have their init scale (median std
# within INIT_STD_BAND of init's) or the predictions are near uniform too (mean entropy above
# UNIFORM_PREDICTION of log V: random weights of another scale, e.g. the test fixtures'); or
# every bias is still exactly 0 and every gain exactly 1. A trained model that predicts at
# chance on a text (the induction model on words it has not seen repeat) still attends sharply.
INIT_STD_BAND = (0.8, 1.25)
UNIFORM_ATTENTION = 0.95
UNIFORM_PREDICTION = 0.85
STAT_ENTRIES = 1 << 16  # entries per matrix the std is estimated from


def init_std(name, n_layer):
    """The std init_model gives weight `name`."""
    return 0.01 if name == "model/wpe" else 0.02 / math.sqrt(2 * n_layer) if name.endswith("c_proj/w") else 0.02


def _entries(w, n=STAT_ENTRIES):
    """About n entries of a weight (evenly spaced rows of an int8 one), float64, for statistics."""
    if hasattr(w, "rows"):                                          # quant.QuantizedWeight (R, K)
        R, K = w.q.shape
        return w.rows(np.linspace(0, R - 1, min(R, max(1, n // K))).astype(np.int64)).astype(np.float64)
    flat = np.asarray(w).reshape(-1)
    return flat[::max(1, flat.size // n)].astype(np.float64)


def weight_statistics(model):
    """(median over weight matrices of std / init_std, whether every bias is 0 and gain 1)."""
    L = model.hparams["n_layer"]
    ratios, untouched = [], True
    for name, w in model.params.items():
        leaf = name.rsplit("/", 1)[1]
        if leaf in ("g", "b"):
            untouched = untouched and bool(np.all(np.asarray(w) == (1.0 if leaf == "g" else 0.0)))
        else:
            ratios.append(float(_entries(w).std()) / init_std(name, L))
    return float(np.median(ratios)), untouched


def attention_uniformity(patterns):
    """patterns: per layer (NH, T, T) -> the mean over layers, heads and queries t >= 1 of
    entropy(row t) / log(t + 1): 1.0 for uniform attention, 0 for one position each; None if T = 1."""
    T = patterns[0].shape[-1]
    if T == 1:
        return None
    t = np.arange(1, T)
    out = []
    for att in patterns:
        a = att[:, 1:, :].astype(np.float64)                       # (NH, T-1, T) rows t >= 1
        ent = -(a * np.log(np.where(a > 0, a, 1.0))).sum(axis=-1)   # (NH, T-1)
        out.append((ent / np.log(t + 1)).mean())
    return float(np.mean(out))


def prediction_uniformity(logits):
    """logits: (T, V) -> the mean over positions of entropy(softmax) / log V (1.0: uniform)."""
    out = []
    for r0 in range(0, logits.shape[0], LENS_CHUNK):
        z = logits[r0:r0 + LENS_CHUNK].astype(np.float64)          # (n, V)
        z -= z.max(axis=-1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=-1, keepdims=True)
        out.append(-(p * np.log(np.where(p > 0, p, 1.0))).sum(axis=-1))
    return float(np.concatenate(out).mean() / math.log(logits.shape[-1]))


def random_weights(model, patterns, logits):
    """The report's `random_weights`: whether the model looks untrained, and the numbers why.
    patterns: per layer (NH, T, T); logits: (T, V) of the text."""
    ratio, untouched = weight_statistics(model)
    uniform = attention_uniformity(patterns)
    flat = prediction_uniformity(logits)
    init_scale = INIT_STD_BAND[0] <= ratio <= INIT_STD_BAND[1]
    verdict = untouched or ((uniform is None or uniform > UNIFORM_ATTENTION)
                            and (init_scale or flat > UNIFORM_PREDICTION))
    message = None
    if verdict:
        scale = (f"the weights have GPT-2's initial scale ({ratio:.2f}x its init std)" if init_scale else
                 f"the predictions are {100 * flat:.0f}% as uncertain as a uniform guess")
        how = ("every bias is 0 and every layernorm gain 1, as initialised" if untouched else
               scale + ("" if uniform is None else f" and attention is {100 * uniform:.0f}% uniform"))
        message = (f"these weights look untrained (random): {how}. The predictions, logit lens and attention "
                   f"below are noise, not learnt structure; for a trained model try --example induction")
    return {"verdict": bool(verdict), "weight_std_ratio": ratio, "attention_uniformity": uniform,
            "prediction_uniformity": flat, "untouched": untouched, "message": message}


# ---------------------------------------------------------------- the terminal layout
def _q(s, width=None):
    """A token's text quoted so spaces and newlines show, cut to width characters."""
    s = json.dumps(s, ensure_ascii=False)
    if width and len(s) > width:
        s = s[:max(1, width - 1)] + "…"
    return s


def _bar(frac, width):
    n = max(0, min(width, int(round(frac * width))))
    return "█" * n


def _wrap(items, width, indent="  "):
    lines, line = [], indent
    for it in items:
        if len(line) + len(it) + 1 > width and line.strip():
            lines.append(line.rstrip())
            line = indent
        line += it + " "
    if line.strip():
        lines.append(line.rstrip())
    return lines


def format_report(report, width=100):
    """The report as terminal text at most `width` columns wide (a narrow floor of 40)."""
    width = max(40, int(width))
    out = []
    if report.get("note"):
        out.append(f"note: {report['note']}")
    if report.get("random_weights", {}).get("verdict"):  # before any number is shown
        out.append(f"warning: {report['random_weights']['message']}")
    toks = report["tokens"]
    m = report["model"]
    out.append(f"Tokens ({len(toks)} of n_ctx {m['n_ctx']}; [position] text id):")
    out += _wrap([f"[{p}]{_q(t['text'], 24)}:{t['id']}" for p, t in enumerate(toks)], width)

    out.append("")
    out.append(f"Next token (top {len(report['next'])}):")
    tw = max(6, min(24, width // 3))
    bw = max(5, width - tw - 18)
    pmax = report["next"][0]["prob"]
    for r, n in enumerate(report["next"], 1):
        out.append(f"{r:3d}. {_q(n['text'], tw):<{tw}} {n['id']:>6} {100 * n['prob']:6.2f}% "
                   f"{_bar(n['prob'] / pmax, bw)}"[:width].rstrip())

    lens = report["lens"]
    out.append("")
    out.append(f"Logit lens at the last position (top {lens['k']} of each layer's residual stream "
               f"through ln_f and the head):")
    lw = max(len(r) for r in lens["rows"])
    cw = max(8, (width - lw - 3) // lens["k"] - 1)
    for name, row in zip(lens["rows"], lens["top"]):
        cells = [f"{_q(c['text'], cw - 7)} {100 * c['prob']:4.1f}%" for c in row[-1]]
        out.append(f"  {name:<{lw}} " + " ".join(f"{c:<{cw}}" for c in cells).rstrip())

    out.append("")
    out.append("Per layer, the head that attends most away from the last token, and where to:")
    for h in report["heads_away"]:
        if h["to_pos"] is None:
            out.append(f"  layer {h['layer']:>2}: one token only: every head attends to itself")
            continue
        line = (f"  layer {h['layer']:>2}: head {h['head']:>2} puts {100 * h['away']:5.1f}% away, "
                f"most on [{h['to_pos']}]{_q(h['to_text'])} ({100 * h['weight']:.1f}%)")
        out.append(line[:width])

    a = report["attribution"]
    scores = np.asarray(a["scores"])
    order = np.argsort(-scores, kind="stable")[:N_ATTRIBUTIONS]
    out.append("")
    out.append(f"Input tokens that move log p({_q(a['target']['text'])}) most (‖gradient × input‖):")
    smax = scores[order[0]] if scores[order[0]] > 0 else 1.0
    labels = [f"[{p}]{_q(toks[p]['text'], 20)}" for p in order]
    lab = max(len(s) for s in labels)
    for p, label in zip(order, labels):
        out.append(f"  {label:<{lab}} {scores[p]:10.4g} {_bar(scores[p] / smax, max(5, width - lab - 15))}"
                   [:width].rstrip())
    # headings and notes longer than the terminal wrap; table rows were cut to fit above
    return "\n".join(part for line in out
                     for part in (textwrap.wrap(line, width, subsequent_indent="    ") or [""]))


# ---------------------------------------------------------------- the web page
def page_html(report=None):
    """The explain page. With a report: one self-contained file showing it (what
    `npgpt2 explain --out` writes). Without: the server's page, whose text box POSTs
    {"text", "layer"} to /v1/explain and renders the answer the same way."""
    page = PAGE.read_text(encoding="utf-8")
    if report is None:
        return page
    # JSON inside <script>: escape "<" so no "</script>" in a token can end the element
    data = json.dumps(report, ensure_ascii=False, allow_nan=False, separators=(",", ":")).replace("<", "\\u003c")
    if REPORT_SLOT not in page:
        raise RuntimeError(f"{PAGE}: the template has no {REPORT_SLOT} slot")
    return page.replace(REPORT_SLOT, data, 1)


def mb(n_bytes):
    return f"{n_bytes / 1e6:.1f} MB" if n_bytes >= 1e5 else f"{math.ceil(n_bytes / 1e3)} kB"
