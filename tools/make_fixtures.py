"""Generate npgpt2's independent reference fixtures under tests/fixtures/.

Run in the fixture venv (never in CI; the package and its tests never import these libraries):

    /opt/fixenv/bin/python tools/make_fixtures.py

Versions are pinned in tools/fixtures-requirements.txt. Every random draw comes from a fixed seed,
so re-running rewrites the same values (TensorFlow's .meta may differ in build metadata only).

Outputs (see tests/fixtures/README.md for the formats):
  tiny/, tiny_values.npz      OpenAI-layout TF checkpoint written by real TensorFlow + the exact values fed
  full/, full_sha256.json     same with the full 50257 vocab + OpenAI's encoder.json / vocab.bpe
  tiny_reference.npz          HF transformers GPT-2 logits, loss and every gradient (float64 and float32)
  full_reference.npz          HF logits for the full-vocab model
  adamw_reference.npz         torch.optim.AdamW / SGD trajectories on a fixed problem
  hf_tiny/, hf_tiny_logits.npz  the tiny model saved by transformers itself (safetensors) + its logits
  introspect_tiny.npz, introspect_full.npz  HF attentions, hidden states, logit lens, a head ablation
                              and an input-embedding gradient (for run_with_cache & co.)
  lora/                       a peft LoRA on the tiny model: peft's adapter folders (float32/16, bfloat16),
                              logits, loss, adapter gradients, merge_and_unload weights (lora/README.md)
  lora/npgpt2_written_peft.npz  peft's logits for the adapter folder npgpt2 wrote (part lora_ours)
  lora/peft_wte/, lora/lora_wte_reference.npz  a peft LoRA that adapts the tied wte (Embedding LoRA on
                              transformer.wte + lm_head tied by ensure_weight_tying): logits, loss, gradients
  lora/npgpt2_written_wte_peft.npz  peft's logits for npgpt2's wte adapter folder (part lora_wte_ours)

  mask_reference.npz          torch cross_entropy(..., ignore_index=-100): the masked loss and its
                              gradients, on given logits (x @ wte.T) and through the whole tiny model

Pass part names (tiny, full, optim, introspect, lora, lora_ours, lora_wte, lora_wte_ours, mask) to regenerate
only those parts; the lora and mask parts need only torch (and transformers, peft), no TensorFlow.

The generator also checks, without committing anything: the checkpoint reads back bit-exactly through
TensorFlow, HF float64 logits agree with an independent NumPy forward written below (guards against a
mis-mapped weight), and the HF folder reloads to the same logits.
"""
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import numpy as np
import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel

try:
    import tensorflow as tf
except ImportError:  # the parts that write TF checkpoints need it; lora, lora_ours and mask need only torch
    tf = None

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures"
ASSETS = ROOT / "npgpt2" / "assets"

TINY_HPARAMS = {"n_vocab": 96, "n_ctx": 16, "n_embd": 24, "n_head": 3, "n_layer": 2}
FULL_HPARAMS = {"n_vocab": 50257, "n_ctx": 64, "n_embd": 8, "n_head": 2, "n_layer": 2}

# One seed per artefact so that changing one fixture never shifts the others.
SEED_TINY_VALUES = 1234
SEED_FULL_VALUES = 5678
SEED_TINY_TOKENS = 42
SEED_FULL_TOKENS = 43
SEED_OPTIM = 7
SEED_TORCH = 0  # only for HF's throwaway random init; every weight is overwritten


# ---------------------------------------------------------------- parameter values

def variable_shapes(hp):
    """OpenAI's TF variable names -> shapes, in the order OpenAI's model.py creates them."""
    V, T, C = hp["n_vocab"], hp["n_ctx"], hp["n_embd"]
    shapes = {"model/wpe": (T, C), "model/wte": (V, C)}
    for i in range(hp["n_layer"]):
        h = f"model/h{i}/"
        shapes.update({
            h + "ln_1/g": (C,), h + "ln_1/b": (C,),
            h + "attn/c_attn/w": (1, C, 3 * C), h + "attn/c_attn/b": (3 * C,),
            h + "attn/c_proj/w": (1, C, C), h + "attn/c_proj/b": (C,),
            h + "ln_2/g": (C,), h + "ln_2/b": (C,),
            h + "mlp/c_fc/w": (1, C, 4 * C), h + "mlp/c_fc/b": (4 * C,),
            h + "mlp/c_proj/w": (1, 4 * C, C), h + "mlp/c_proj/b": (C,),
        })
    shapes.update({"model/ln_f/g": (C,), "model/ln_f/b": (C,)})
    return shapes


def make_values(hp, seed):
    """Random float32 weights scaled so logits are far from uniform (not GPT-2's init)."""
    rng = np.random.default_rng(seed)
    values = {}
    for name, shape in variable_shapes(hp).items():
        leaf = name.rsplit("/", 1)[1]
        if name in ("model/wte", "model/wpe"):
            v = rng.normal(0.0, 0.5, shape)
        elif leaf == "g":
            v = 1.0 + rng.normal(0.0, 0.1, shape)
        elif leaf == "b":
            v = rng.normal(0.0, 0.1, shape)
        else:
            v = rng.normal(0.0, 0.2, shape)
        values[name] = np.ascontiguousarray(v, dtype=np.float32)
    return values


# ---------------------------------------------------------------- TensorFlow checkpoint

def write_tf_checkpoint(folder, hp, values):
    """Write an OpenAI-layout model folder with tf.compat.v1.train.Saver, then read it back."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    graph = tf.Graph()
    with graph.as_default():
        tf_vars = {}
        # Ref variables, as OpenAI's TF 1.x release used; zeros initializer keeps the .meta tiny.
        with tf.compat.v1.variable_scope("model"):
            for name, shape in variable_shapes(hp).items():
                tf_vars[name] = tf.compat.v1.get_variable(
                    name[len("model/"):], shape=shape, dtype=tf.float32,
                    initializer=tf.compat.v1.zeros_initializer(), use_resource=False)
        for name, var in tf_vars.items():
            assert var.op.name == name, (var.op.name, name)
        saver = tf.compat.v1.train.Saver(var_list=list(tf_vars.values()), save_relative_paths=True)
        with tf.compat.v1.Session(graph=graph) as sess:
            # Feeding the initial value (what Variable.load does) adds no assign ops to the graph.
            for name, var in tf_vars.items():
                sess.run(var.initializer, feed_dict={var.initial_value: values[name]})
            prefix = saver.save(sess, str(folder / "model.ckpt"), write_meta_graph=True)
    assert Path(prefix).name == "model.ckpt", prefix
    (folder / "hparams.json").write_text(json.dumps(hp, indent=2) + "\n")

    expected = {"checkpoint", "hparams.json", "model.ckpt.index",
                "model.ckpt.data-00000-of-00001", "model.ckpt.meta"}
    got = {p.name for p in folder.iterdir()}
    assert got == expected, got
    state = (folder / "checkpoint").read_text()
    assert 'model_checkpoint_path: "model.ckpt"' in state, state

    # Read back through TensorFlow: exactly our variables, bit-equal to what was fed.
    listed = dict(tf.train.list_variables(str(folder)))
    assert set(listed) == set(values), sorted(set(listed) ^ set(values))
    for name, v in values.items():
        back = tf.train.load_variable(str(folder), name)
        assert back.dtype == np.float32 and back.shape == v.shape, name
        assert back.tobytes() == v.tobytes(), name


# ---------------------------------------------------------------- HF transformers GPT-2

def hf_config(hp):
    return GPT2Config(
        vocab_size=hp["n_vocab"], n_positions=hp["n_ctx"], n_embd=hp["n_embd"],
        n_layer=hp["n_layer"], n_head=hp["n_head"], layer_norm_epsilon=1e-5,
        activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        attn_implementation="eager", tie_word_embeddings=True)


def hf_name_map(hp):
    """HF parameter name -> (TF variable name, function TF array -> HF array)."""
    ident = lambda a: a  # noqa: E731
    conv = lambda a: a[0]  # TF (1, in, out) -> HF Conv1D weight (in, out)  # noqa: E731
    m = {"transformer.wte.weight": ("model/wte", ident),
         "transformer.wpe.weight": ("model/wpe", ident),
         "transformer.ln_f.weight": ("model/ln_f/g", ident),
         "transformer.ln_f.bias": ("model/ln_f/b", ident)}
    for i in range(hp["n_layer"]):
        h, t = f"transformer.h.{i}.", f"model/h{i}/"
        for hf_ln, tf_ln in (("ln_1", "ln_1"), ("ln_2", "ln_2")):
            m[h + hf_ln + ".weight"] = (t + tf_ln + "/g", ident)
            m[h + hf_ln + ".bias"] = (t + tf_ln + "/b", ident)
        for sub in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            tf_sub = t + sub.replace(".", "/")
            m[h + sub + ".weight"] = (tf_sub + "/w", conv)
            m[h + sub + ".bias"] = (tf_sub + "/b", ident)
    return m


def build_hf(hp, values, dtype):
    """GPT2LMHeadModel with our values mapped by hand; lm_head stays tied to wte."""
    torch.manual_seed(SEED_TORCH)
    model = GPT2LMHeadModel(hf_config(hp)).to(dtype).eval()
    assert model.config._attn_implementation == "eager", model.config._attn_implementation
    params = dict(model.named_parameters())  # tied lm_head.weight is deduplicated here
    mapping = hf_name_map(hp)
    assert set(params) == set(mapping), sorted(set(params) ^ set(mapping))
    assert {tf_name for tf_name, _ in mapping.values()} == set(values)
    with torch.no_grad():
        for hf_name, (tf_name, fn) in mapping.items():
            arr = fn(values[tf_name])
            assert tuple(params[hf_name].shape) == arr.shape, (hf_name, arr.shape)
            params[hf_name].copy_(torch.from_numpy(np.array(arr, dtype=np.float64)).to(dtype))
    assert model.lm_head.weight is model.transformer.wte.weight
    return model


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.from_numpy(tokens)).logits.numpy()


def hf_loss_and_grads(model, hp, tokens, targets):
    """Mean cross-entropy of logits vs targets (no shift: targets are given per position)
    and every gradient in TF names and TF shapes."""
    model.zero_grad(set_to_none=True)
    logits = model(torch.from_numpy(tokens)).logits
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), torch.from_numpy(targets).reshape(-1))
    loss.backward()
    params = dict(model.named_parameters())
    grads = {}
    for hf_name, (tf_name, _) in hf_name_map(hp).items():
        g = params[hf_name].grad.detach().numpy().copy()
        if tf_name.endswith("/w"):
            g = g[None]  # HF Conv1D (in, out) -> TF (1, in, out)
        grads[tf_name] = g
    return float(loss.item()), grads


# ---------------------------------------------------------------- independent NumPy forward

def numpy_forward(hp, values, tokens):
    """A plain float64 GPT-2 forward straight from the TF arrays, for the sanity check only."""
    p = {k: v.astype(np.float64) for k, v in values.items()}
    B, T = tokens.shape
    C, H = hp["n_embd"], hp["n_head"]
    D = C // H

    def ln(x, g, b):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-5) * g + b

    def gelu(x):
        return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))

    x = p["model/wte"][tokens] + p["model/wpe"][:T]
    causal = np.tril(np.ones((T, T), dtype=bool))
    for i in range(hp["n_layer"]):
        h = f"model/h{i}/"
        a = ln(x, p[h + "ln_1/g"], p[h + "ln_1/b"])
        qkv = a @ p[h + "attn/c_attn/w"][0] + p[h + "attn/c_attn/b"]
        q, k, v = (qkv[..., j * C:(j + 1) * C].reshape(B, T, H, D).transpose(0, 2, 1, 3)
                   for j in range(3))
        s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(D)
        s = np.where(causal, s, -np.inf)
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        o = (s @ v).transpose(0, 2, 1, 3).reshape(B, T, C)
        x = x + o @ p[h + "attn/c_proj/w"][0] + p[h + "attn/c_proj/b"]
        m = ln(x, p[h + "ln_2/g"], p[h + "ln_2/b"])
        m = gelu(m @ p[h + "mlp/c_fc/w"][0] + p[h + "mlp/c_fc/b"])
        x = x + m @ p[h + "mlp/c_proj/w"][0] + p[h + "mlp/c_proj/b"]
    x = ln(x, p["model/ln_f/g"], p["model/ln_f/b"])
    return x @ p["model/wte"].T


def numpy_loss(hp, values, tokens, targets):
    logits = numpy_forward(hp, values, tokens)
    logits = logits - logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return -np.take_along_axis(logp, targets[..., None], -1).mean()


def fd_check(hp, values, tokens, targets, loss, grads, eps=1e-5):
    """Max relative error of a few torch gradient entries vs central differences of the NumPy loss.

    Includes a wte row that no input token uses, whose gradient comes only from the tied head."""
    v64 = {k: v.astype(np.float64) for k, v in values.items()}
    assert abs(numpy_loss(hp, v64, tokens, targets) - loss) < 1e-12
    unused = sorted(set(range(hp["n_vocab"])) - set(tokens.ravel().tolist()))[0]
    picks = [("model/wte", (unused, 0)), ("model/wte", (int(tokens[0, 0]), 1)),
             ("model/wpe", (3, 2)), ("model/h0/attn/c_attn/w", (0, 1, 30)),
             ("model/h1/mlp/c_proj/w", (0, 5, 7)), ("model/h0/ln_1/g", (4,)),
             ("model/ln_f/b", (0,))]
    worst = 0.0
    for name, idx in picks:
        orig = v64[name][idx]
        v64[name][idx] = orig + eps
        up = numpy_loss(hp, v64, tokens, targets)
        v64[name][idx] = orig - eps
        down = numpy_loss(hp, v64, tokens, targets)
        v64[name][idx] = orig
        fd = (up - down) / (2 * eps)
        worst = max(worst, abs(fd - grads[name][idx]) / max(abs(fd), 1e-8))
    return worst


# ---------------------------------------------------------------- fixtures

def save_npz(path, arrays):
    np.savez_compressed(path, **arrays)
    with np.load(path) as back:  # keys with '/' must survive the zip round trip
        assert set(back.files) == set(arrays), sorted(set(back.files) ^ set(arrays))


def make_tiny(report):
    hp = TINY_HPARAMS
    values = make_values(hp, SEED_TINY_VALUES)
    write_tf_checkpoint(FIX / "tiny", hp, values)
    save_npz(FIX / "tiny_values.npz", values)

    rng = np.random.default_rng(SEED_TINY_TOKENS)
    tokens = rng.integers(0, hp["n_vocab"], size=(2, hp["n_ctx"]), dtype=np.int64)
    targets = rng.integers(0, hp["n_vocab"], size=(2, hp["n_ctx"]), dtype=np.int64)

    m64 = build_hf(hp, values, torch.float64)
    m32 = build_hf(hp, values, torch.float32)
    logits64 = hf_logits(m64, tokens)
    logits32 = hf_logits(m32, tokens)
    assert logits64.dtype == np.float64 and logits32.dtype == np.float32

    ref_np = numpy_forward(hp, values, tokens)
    report["sanity tiny |HF f64 - numpy f64|"] = float(np.abs(ref_np - logits64).max())
    report["tiny |HF f32 - HF f64|"] = float(np.abs(logits32 - logits64).max())
    report["tiny logits std"] = float(logits64.std())
    assert report["sanity tiny |HF f64 - numpy f64|"] < 1e-10

    loss64, grads64 = hf_loss_and_grads(m64, hp, tokens, targets)
    loss32, grads32 = hf_loss_and_grads(m32, hp, tokens, targets)
    for name, v in values.items():
        assert grads64[name].shape == v.shape and grads64[name].dtype == np.float64, name
        assert grads32[name].shape == v.shape and grads32[name].dtype == np.float32, name
    report["tiny loss_f64"] = loss64
    report["sanity tiny grad rel err vs numpy finite differences"] = fd_check(
        hp, values, tokens, targets, loss64, grads64)
    assert report["sanity tiny grad rel err vs numpy finite differences"] < 1e-6
    report["tiny loss_f32"] = loss32

    ref = {"tokens": tokens, "targets": targets,
           "logits_f64": logits64, "logits_f32": logits32,
           "loss_f64": np.float64(loss64), "loss_f32": np.float32(loss32)}
    ref.update({f"grad/{k}": g for k, g in grads64.items()})
    ref.update({f"grad32/{k}": g for k, g in grads32.items()})
    save_npz(FIX / "tiny_reference.npz", ref)

    # The same float32 model written by transformers itself, for the converter tests.
    folder = FIX / "hf_tiny"
    if folder.exists():
        shutil.rmtree(folder)
    m32.save_pretrained(folder, safe_serialization=True)
    extra = {p.name for p in folder.iterdir()} - {"config.json", "model.safetensors"}
    for name in extra:  # generation_config.json: not part of the model, keep the fixture minimal
        (folder / name).unlink()
    reloaded = GPT2LMHeadModel.from_pretrained(folder, attn_implementation="eager").eval()
    assert reloaded.dtype == torch.float32
    hf_tiny = hf_logits(reloaded, tokens)
    assert np.array_equal(hf_tiny, logits32), np.abs(hf_tiny - logits32).max()
    save_npz(FIX / "hf_tiny_logits.npz", {"tokens": tokens, "logits": hf_tiny})


def make_full(report):
    hp = FULL_HPARAMS
    values = make_values(hp, SEED_FULL_VALUES)
    folder = FIX / "full"
    write_tf_checkpoint(folder, hp, values)
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copyfile(ASSETS / name, folder / name)
    sha = {k: hashlib.sha256(np.ascontiguousarray(v, dtype=np.float32).tobytes()).hexdigest()
           for k, v in values.items()}
    (FIX / "full_sha256.json").write_text(json.dumps(sha, indent=2, sort_keys=True) + "\n")

    rng = np.random.default_rng(SEED_FULL_TOKENS)
    tokens = rng.integers(0, hp["n_vocab"], size=(1, 8), dtype=np.int64)
    tokens[0, 3] = hp["n_vocab"] - 1  # make sure the last vocabulary row (<|endoftext|>) is used
    tokens_b = rng.integers(0, hp["n_vocab"], size=(2, 5), dtype=np.int64)

    m64 = build_hf(hp, values, torch.float64)
    m32 = build_hf(hp, values, torch.float32)
    l64 = hf_logits(m64, tokens)
    l32 = hf_logits(m32, tokens)
    lb64 = hf_logits(m64, tokens_b)
    report["sanity full |HF f64 - numpy f64|"] = float(max(
        np.abs(numpy_forward(hp, values, tokens) - l64).max(),
        np.abs(numpy_forward(hp, values, tokens_b) - lb64).max()))
    report["full |HF f32 - HF f64|"] = float(np.abs(l32 - l64).max())
    assert report["sanity full |HF f64 - numpy f64|"] < 1e-10
    save_npz(FIX / "full_reference.npz", {
        "tokens": tokens,
        "logits_f64_last2": l64[:, -2:], "logits_f32_last2": l32[:, -2:],
        "tokens_b": tokens_b, "logits_f64_b_last": lb64[:, -1]})


def make_optim(report):
    """torch.optim trajectories on fixed float64 parameters with hand-set gradients."""
    rng = np.random.default_rng(SEED_OPTIM)
    steps = 6
    p0 = rng.normal(0.0, 1.0, (4, 3))
    p0b = rng.normal(0.0, 1.0, (5,))
    # Scales vary per step so clipping (max_norm 1) bites on some steps and not on others.
    scales = [0.05, 2.0, 0.3, 5.0, 0.1, 1.5]
    g = [rng.normal(0.0, s, (4, 3)) for s in scales]
    gb = [rng.normal(0.0, s, (5,)) for s in scales]

    out = {"p0": p0, "p0b": p0b, "steps": np.int64(steps),
           "lr": np.float64(1e-2), "beta1": np.float64(0.9), "beta2": np.float64(0.999),
           "eps": np.float64(1e-8), "weight_decay": np.float64(0.1),
           "clip/weight_decay": np.float64(0.0), "clip/max_norm": np.float64(1.0),
           "sgd/lr": np.float64(0.1)}
    for t in range(1, steps + 1):
        out[f"g{t}"], out[f"gb{t}"] = g[t - 1], gb[t - 1]

    def run(prefix, make_opt, clip):
        a = torch.tensor(p0, dtype=torch.float64, requires_grad=True)
        b = torch.tensor(p0b, dtype=torch.float64, requires_grad=True)
        opt = make_opt([a, b])
        for t in range(1, steps + 1):
            a.grad = torch.tensor(g[t - 1], dtype=torch.float64)
            b.grad = torch.tensor(gb[t - 1], dtype=torch.float64)
            if clip:
                norm = torch.nn.utils.clip_grad_norm_([a, b], max_norm=1.0)
                out[f"{prefix}norm{t}"] = np.float64(norm.item())  # total norm before clipping
                out[f"{prefix}clipped_norm{t}"] = np.float64(
                    np.sqrt((a.grad.numpy() ** 2).sum() + (b.grad.numpy() ** 2).sum()))
            opt.step()
            out[f"{prefix}p{t}"] = a.detach().numpy().copy()
            out[f"{prefix}pb{t}"] = b.detach().numpy().copy()

    run("", lambda ps: torch.optim.AdamW(ps, lr=1e-2, betas=(0.9, 0.999), eps=1e-8,
                                         weight_decay=0.1), clip=False)
    run("clip/", lambda ps: torch.optim.AdamW(ps, lr=1e-2, betas=(0.9, 0.999), eps=1e-8,
                                              weight_decay=0.0), clip=True)
    run("sgd/", lambda ps: torch.optim.SGD(ps, lr=0.1), clip=False)
    report["clip norms"] = [round(float(out[f"clip/norm{t}"]), 4) for t in range(1, steps + 1)]
    save_npz(FIX / "adamw_reference.npz", out)


# ---------------------------------------------------------------- introspection (issue: see inside)

def hf_introspect(model, hp, tokens, ablate, grad):
    """What HF/torch say about the inside of the model, for run_with_cache, run_with_hooks,
    logit_lens and input_gradient.

    ablate = (layer, head): logits with a forward pre-hook on h[layer].attn.c_proj that zeroes
    that head's slice of its input (the merged heads, before the output projection).
    grad = (ids (T,), position, target): d log_softmax(logits)[position, target] / d inputs_embeds.
    """
    L, NH, C = hp["n_layer"], hp["n_head"], hp["n_embd"]
    hs = C // NH
    with torch.no_grad():
        out = model(torch.from_numpy(tokens), output_attentions=True, output_hidden_states=True)
    assert len(out.attentions) == L and len(out.hidden_states) == L + 1
    res = {"tokens": tokens, "logits": out.logits.numpy()}
    for i, a in enumerate(out.attentions):
        res[f"attn/{i}"] = a.numpy()
    for i, h in enumerate(out.hidden_states):
        res[f"hidden/{i}"] = h.numpy()
    # logit lens: every residual stream through ln_f and the tied head; HF's last hidden
    # state already has ln_f applied, so the last row is the logits themselves
    with torch.no_grad():
        wte = model.transformer.wte.weight
        rows = [model.transformer.ln_f(h) @ wte.T for h in out.hidden_states[:L]]
        rows.append(out.logits)
        res["lens"] = torch.stack(rows).numpy()
    layer, head = ablate

    def zero_head(module, args):
        x = args[0].clone()
        x[..., head * hs:(head + 1) * hs] = 0.0
        return (x,)

    handle = model.transformer.h[layer].attn.c_proj.register_forward_pre_hook(zero_head)
    try:
        with torch.no_grad():
            res["ablate_logits"] = model(torch.from_numpy(tokens)).logits.numpy()
    finally:
        handle.remove()
    res["ablate_layer"], res["ablate_head"] = np.int64(layer), np.int64(head)
    ids, position, target = grad
    embeds = model.transformer.wte.weight[torch.from_numpy(ids)].detach().clone().requires_grad_(True)
    logits = model(inputs_embeds=embeds[None]).logits[0]
    torch.log_softmax(logits, dim=-1)[position, target].backward()
    res["grad_ids"], res["grad_position"], res["grad_target"] = ids, np.int64(position), np.int64(target)
    res["grad_embeds"] = embeds.grad.numpy().copy()
    return res


def make_introspect(report):
    """introspect_tiny.npz / introspect_full.npz from the committed fixture values (float64 HF)."""
    values = dict(np.load(FIX / "tiny_values.npz"))
    hp = TINY_HPARAMS
    rng = np.random.default_rng(SEED_TINY_TOKENS)
    tokens = rng.integers(0, hp["n_vocab"], size=(2, hp["n_ctx"]), dtype=np.int64)  # = tiny_reference's
    m64 = build_hf(hp, values, torch.float64)
    res = hf_introspect(m64, hp, tokens, ablate=(1, 2), grad=(tokens[1], 11, 5))
    ref = np.load(FIX / "tiny_reference.npz")
    assert np.array_equal(ref["tokens"], tokens)
    assert np.abs(res["logits"] - ref["logits_f64"]).max() < 1e-12
    report["introspect tiny ablation max |dlogits|"] = float(np.abs(res["ablate_logits"] - res["logits"]).max())
    report["introspect tiny |grad_embeds| past position"] = float(np.abs(res["grad_embeds"][12:]).max())
    save_npz(FIX / "introspect_tiny.npz", res)

    hp = FULL_HPARAMS
    values = make_values(hp, SEED_FULL_VALUES)
    sha = json.loads((FIX / "full_sha256.json").read_text())
    assert all(hashlib.sha256(np.ascontiguousarray(v, dtype=np.float32).tobytes()).hexdigest() == sha[k]
               for k, v in values.items())  # the values tests/fixtures/full holds
    rng = np.random.default_rng(SEED_FULL_TOKENS)
    tokens = rng.integers(0, hp["n_vocab"], size=(1, 8), dtype=np.int64)  # = full_reference's
    tokens[0, 3] = hp["n_vocab"] - 1
    m64 = build_hf(hp, values, torch.float64)
    res = hf_introspect(m64, hp, tokens, ablate=(0, 1), grad=(tokens[0], 6, 464))
    # the (T, V) arrays of a 50257 vocabulary are too big to commit: keep the last position
    res["lens_last"] = res.pop("lens")[:, :, -1]
    res["ablate_logits_last"] = res.pop("ablate_logits")[:, -1]
    full_logits = res.pop("logits")
    assert np.abs(full_logits[:, -2:] - np.load(FIX / "full_reference.npz")["logits_f64_last2"]).max() < 1e-12
    save_npz(FIX / "introspect_full.npz", res)


# ---------------------------------------------------------------- LoRA references (peft, issue 17)

LORA = FIX / "lora"
SEED_LORA = 17
# a block's four matrices, as npgpt2 names them (HF module h.{i}.<target>, TF prefix model/h{i}/<a>/<b>)
LORA_TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
OURS = "npgpt2_written"  # the adapter folder npgpt2's write_peft_adapter wrote (tools/write_lora_fixture.py)


def peft_lora_config():
    """The peft config of the reference adapter: r 4, alpha 8, all four matrices ("c_proj" matches both
    attn.c_proj and mlp.c_proj by PEFT's suffix matching), one rank and one alpha exception."""
    from peft import LoraConfig
    return LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"],
                      rank_pattern={"h.1.mlp.c_fc": 2}, alpha_pattern={"h.0.attn.c_proj": 3},
                      fan_in_fan_out=True, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")


def lora_prefixes(hp):
    """[(TF prefix "model/h0/attn/c_attn", HF module "transformer.h.0.attn.c_attn"), ...]."""
    return [(f"model/h{i}/{t.replace('.', '/')}", f"transformer.h.{i}.{t}")
            for i in range(hp["n_layer"]) for t in LORA_TARGETS]


def lora_module(peft_model, hf_module):
    return peft_model.get_submodule("base_model.model." + hf_module)


def make_lora_values(hp, seed):
    """{TF prefix: (lora_A.weight (r, in), lora_B.weight (out, r))} float32 in peft's layout; B is
    not zero (peft's init) so the adapter changes the logits."""
    rng = np.random.default_rng(seed)
    cfg = peft_lora_config()
    C = hp["n_embd"]
    dims = {"attn.c_attn": (C, 3 * C), "attn.c_proj": (C, C), "mlp.c_fc": (C, 4 * C), "mlp.c_proj": (4 * C, C)}
    out = {}
    for prefix, hf_module in lora_prefixes(hp):
        r = cfg.rank_pattern.get(hf_module.removeprefix("transformer."), cfg.r)
        c_in, c_out = dims[hf_module.split(".", 3)[3]]
        out[prefix] = (rng.normal(0.0, 0.15, (r, c_in)).astype(np.float32),
                       rng.normal(0.0, 0.15, (c_out, r)).astype(np.float32))
    return out


def build_peft(hp, values, lora, dtype):
    """peft's LoRA GPT-2 on the hand-mapped HF model, its lora_A/lora_B set to `lora`."""
    from peft import get_peft_model
    model = get_peft_model(build_hf(hp, values, dtype), peft_lora_config()).eval()
    names = {n for n, _ in model.named_parameters() if ".lora_" in n}
    assert len(names) == 2 * len(lora), sorted(names)
    with torch.no_grad():
        for prefix, hf_module in lora_prefixes(hp):
            mod = lora_module(model, hf_module)
            for weight, arr in ((mod.lora_A["default"].weight, lora[prefix][0]),
                                (mod.lora_B["default"].weight, lora[prefix][1])):
                assert tuple(weight.shape) == arr.shape and weight.dtype == dtype, (prefix, weight.shape, weight.dtype)
                weight.copy_(torch.from_numpy(arr.astype(np.float64)).to(dtype))
    return model


def peft_loss_and_grads(model, hp, tokens, targets):
    """Mean cross-entropy (no shift, as tiny_reference) and d loss / d A, d loss / d B in npgpt2's
    layout: A = lora_A.weight.T (in, r), B = lora_B.weight.T (r, out)."""
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=torch.from_numpy(tokens)).logits
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), torch.from_numpy(targets).reshape(-1))
    loss.backward()
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert all(".lora_" in n for n in trainable), trainable  # peft froze every base weight
    grads = {}
    for prefix, hf_module in lora_prefixes(hp):
        mod = lora_module(model, hf_module)
        grads[prefix + "/lora_A"] = mod.lora_A["default"].weight.grad.numpy().T.copy()
        grads[prefix + "/lora_B"] = mod.lora_B["default"].weight.grad.numpy().T.copy()
    return float(loss.item()), grads


def numpy_merged(hp, values, lora, scalings):
    """float64 W + scaling * A @ B for each adapted matrix (for the NumPy sanity check only)."""
    merged = {k: v.astype(np.float64) for k, v in values.items()}
    for prefix, (a, b) in lora.items():
        merged[prefix + "/w"] = merged[prefix + "/w"] + scalings[prefix] * (a.T.astype(np.float64)
                                                                          @ b.T.astype(np.float64))[None]
    return merged


def strip_card(folder):
    """save_pretrained also writes a model card README.md; the fixture keeps the two adapter files."""
    (folder / "README.md").unlink(missing_ok=True)
    assert {p.name for p in folder.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}


def half_copy(src, dst, dtype):
    """The peft folder with its tensors cast to float16 / bfloat16 by torch (what `.half()` saves)."""
    from safetensors.torch import load_file, save_file
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir()
    shutil.copyfile(src / "adapter_config.json", dst / "adapter_config.json")
    tensors = {k: v.to(dtype) for k, v in load_file(src / "adapter_model.safetensors").items()}
    save_file(tensors, dst / "adapter_model.safetensors", metadata={"format": "pt"})


def make_lora(report):
    """tests/fixtures/lora/: a peft-written adapter (float32, float16, bfloat16 files) for the tiny model
    and what peft/torch say about it: logits, loss, adapter gradients, merge_and_unload's weights."""
    import peft
    from peft import PeftModel
    from safetensors.torch import load_file
    hp = TINY_HPARAMS
    values = dict(np.load(FIX / "tiny_values.npz"))  # the base: tests/fixtures/tiny and hf_tiny
    ref = np.load(FIX / "tiny_reference.npz")
    tokens, targets = ref["tokens"], ref["targets"]
    lora = make_lora_values(hp, SEED_LORA)
    LORA.mkdir(parents=True, exist_ok=True)

    m64 = build_peft(hp, values, lora, torch.float64)
    m32 = build_peft(hp, values, lora, torch.float32)
    scalings = {prefix: float(lora_module(m64, hf).scaling["default"]) for prefix, hf in lora_prefixes(hp)}
    assert scalings["model/h0/attn/c_proj"] == 3 / 4 and scalings["model/h1/mlp/c_fc"] == 8 / 2
    logits64, logits32 = hf_logits(m64, tokens), hf_logits(m32, tokens)
    base64 = hf_logits(build_hf(hp, values, torch.float64), tokens)
    report["lora |logits - base logits| (the adapter matters)"] = float(np.abs(logits64 - base64).max())
    assert report["lora |logits - base logits| (the adapter matters)"] > 0.5
    merged_np = numpy_merged(hp, values, lora, scalings)
    report["sanity lora |peft f64 - numpy merged f64|"] = float(np.abs(numpy_forward(hp, merged_np, tokens)
                                                                       - logits64).max())
    assert report["sanity lora |peft f64 - numpy merged f64|"] < 1e-10
    report["lora |peft f32 - peft f64|"] = float(np.abs(logits32 - logits64).max())

    loss64, grads64 = peft_loss_and_grads(m64, hp, tokens, targets)
    loss32, grads32 = peft_loss_and_grads(m32, hp, tokens, targets)
    report["lora loss_f64"], report["lora loss_f32"] = loss64, loss32
    # central differences of the NumPy loss through the merged weights, for a few A and B entries
    worst, eps = 0.0, 1e-6
    for prefix, which, idx in (("model/h0/attn/c_attn", 0, (1, 5)), ("model/h0/attn/c_proj", 1, (3, 2)),
                               ("model/h1/mlp/c_fc", 0, (1, 20)), ("model/h1/mlp/c_proj", 1, (7, 0))):
        fd = []
        for sign in (1, -1):
            pert = {k: tuple(np.array(a, dtype=np.float64) for a in v) for k, v in lora.items()}
            pert[prefix][which][idx] += sign * eps  # peft layout (r, in) / (out, r)
            fd.append(numpy_loss(hp, numpy_merged(hp, values, pert, scalings), tokens, targets))
        name = prefix + ("/lora_A" if which == 0 else "/lora_B")
        worst = max(worst, abs((fd[0] - fd[1]) / (2 * eps) - grads64[name][idx[::-1]]) / abs(grads64[name][idx[::-1]]))
    report["sanity lora grad rel err vs numpy finite differences"] = worst
    assert worst < 1e-6

    out = {"tokens": tokens, "targets": targets, "logits_f64": logits64, "logits_f32": logits32,
           "loss_f64": np.float64(loss64), "loss_f32": np.float32(loss32)}
    for prefix, (a, b) in lora.items():
        out[f"adapter/{prefix}/lora_A"], out[f"adapter/{prefix}/lora_B"] = a.T.copy(), b.T.copy()
        out[f"scaling/{prefix}"] = np.float64(scalings[prefix])
    out.update({f"grad/{k}": g for k, g in grads64.items()})
    out.update({f"grad32/{k}": g for k, g in grads32.items()})

    # the adapter as peft saves it, reloaded by peft: the same logits
    folder = LORA / "peft_f32"
    if folder.exists():
        shutil.rmtree(folder)
    m32.save_pretrained(folder)
    strip_card(folder)
    stored = load_file(folder / "adapter_model.safetensors")
    assert len(stored) == 2 * len(lora) and all(v.dtype == torch.float32 for v in stored.values())
    back = PeftModel.from_pretrained(build_hf(hp, values, torch.float32), folder).eval()
    assert np.array_equal(hf_logits(back, tokens), logits32)
    # float16 / bfloat16 copies, each loaded by peft onto the float32 base
    for tag, dtype in (("f16", torch.float16), ("bf16", torch.bfloat16)):
        half_copy(folder, LORA / f"peft_{tag}", dtype)
        model = PeftModel.from_pretrained(build_hf(hp, values, torch.float32), LORA / f"peft_{tag}").eval()
        for prefix, hf in lora_prefixes(hp):
            w = lora_module(model, hf).lora_A["default"].weight
            assert w.dtype == torch.float32 and torch.equal(w, torch.from_numpy(lora[prefix][0]).to(dtype).float())
        out[f"logits_{tag}file"] = hf_logits(model, tokens)
        report[f"lora |logits {tag} file - f32 file|"] = float(np.abs(out[f"logits_{tag}file"] - logits32).max())

    # merge_and_unload: the plain GPT-2 whose Conv1D weights are W + scaling * (lora_B @ lora_A).T
    for tag, dtype in (("merged", torch.float32), ("merged64", torch.float64)):
        merged = build_peft(hp, values, lora, dtype).merge_and_unload()
        assert type(merged) is GPT2LMHeadModel
        mparams = dict(merged.named_parameters())
        for prefix, hf in lora_prefixes(hp):
            out[f"{tag}/{prefix}/w"] = mparams[hf + ".weight"].detach().numpy()[None].copy()
        got = hf_logits(merged, tokens)
        report[f"lora {tag} |merge_and_unload logits - adapter logits|"] = float(
            np.abs(got - (logits32 if dtype == torch.float32 else logits64)).max())
    save_npz(LORA / "lora_reference.npz", out)
    report["peft"] = peft.__version__


def make_lora_ours(report):
    """The adapter folder npgpt2 wrote (tests/fixtures/lora/npgpt2_written/, made by
    tools/write_lora_fixture.py) loaded by peft's PeftModel.from_pretrained onto the tiny model:
    every tensor must land in a LoRA layer, and peft's logits are recorded."""
    from peft import PeftModel
    from safetensors.torch import load_file
    hp = TINY_HPARAMS
    values = dict(np.load(FIX / "tiny_values.npz"))
    tokens = np.load(FIX / "tiny_reference.npz")["tokens"]
    folder = LORA / OURS
    stored = load_file(folder / "adapter_model.safetensors")
    out = {"tokens": tokens}
    for tag, dtype in (("f32", torch.float32), ("f64", torch.float64)):
        model = PeftModel.from_pretrained(build_hf(hp, values, dtype), folder).eval()
        loaded = {}
        for name, p in model.named_parameters():
            if ".lora_" in name:  # base_model.model.X.lora_A.default.weight <- X.lora_A.weight in the file
                loaded[name.replace(".default.", ".")] = p.detach()
        assert set(loaded) == set(stored), sorted(set(loaded) ^ set(stored))
        for name, t in stored.items():
            assert torch.equal(loaded[name], t.to(dtype)), name
        out[f"logits_{tag}"] = hf_logits(model, tokens)
        if tag == "f64":
            for prefix, hf in lora_prefixes(hp):
                mod = lora_module(model, hf)
                if hasattr(mod, "scaling") and "default" in mod.scaling:
                    out[f"scaling/{prefix}"] = np.float64(mod.scaling["default"])
                    out[f"rank/{prefix}"] = np.int64(mod.r["default"])
    report["ours in peft |f32 - f64 logits|"] = float(np.abs(out["logits_f32"] - out["logits_f64"]).max())
    save_npz(LORA / f"{OURS}_peft.npz", out)


# ---------------------------------------------------------------- LoRA on the tied wte (peft, issue 17)
SEED_LORA_WTE = 19
OURS_WTE = "npgpt2_written_wte"  # tools/write_lora_fixture.py writes it too
WTE_TARGETS = ("attn.c_attn", "mlp.c_proj")  # the block matrices adapted beside wte in these fixtures


def peft_wte_config():
    """r 3, alpha 5 on each block's attn.c_attn and mlp.c_proj, and on the tied token embedding: an
    Embedding LoRA on transformer.wte whose lm_head LoRA peft ties to it (ensure_weight_tying)."""
    from peft import LoraConfig
    return LoraConfig(r=3, lora_alpha=5, target_modules=["c_attn", "mlp.c_proj", "wte", "lm_head"],
                      ensure_weight_tying=True, fan_in_fan_out=True, lora_dropout=0.0, bias="none",
                      task_type="CAUSAL_LM")


def wte_halves(model):
    """(the Embedding LoRA on transformer.wte, the Linear LoRA on lm_head) of a peft GPT-2."""
    return lora_module(model, "transformer.wte"), model.get_submodule("base_model.model.lm_head")


def build_peft_wte(hp, values, seed, dtype):
    """peft's tied-wte LoRA GPT-2, every adapter entry N(0, 0.15) (peft's init would leave the
    product zero); -> (model, {npgpt2 name: array in npgpt2's layout})."""
    from peft import get_peft_model
    model = get_peft_model(build_hf(hp, values, dtype), peft_wte_config()).eval()
    rng = np.random.default_rng(seed)
    ours = {}
    with torch.no_grad():
        for i in range(hp["n_layer"]):
            for t in WTE_TARGETS:
                mod = lora_module(model, f"transformer.h.{i}.{t}")
                prefix = f"model/h{i}/{t.replace('.', '/')}"
                for w, weight in (("A", mod.lora_A["default"].weight), ("B", mod.lora_B["default"].weight)):
                    arr = rng.normal(0.0, 0.15, tuple(weight.shape))
                    weight.copy_(torch.from_numpy(arr.astype(np.float32).astype(np.float64)).to(dtype))
                    ours[f"{prefix}/lora_{w}"] = arr.astype(np.float32).T.copy()
        emb, head = wte_halves(model)
        for w, weight in (("A", emb.lora_embedding_A["default"]), ("B", emb.lora_embedding_B["default"])):
            arr = rng.normal(0.0, 0.15, tuple(weight.shape)).astype(np.float32)
            weight.copy_(torch.from_numpy(arr.astype(np.float64)).to(dtype))
            ours[f"model/wte/lora_{w}"] = arr.T.copy()  # A (V, r), B (r, C)
        # the head's adapter is the embedding's (shared storage): B^T A^T
        assert torch.equal(head.lora_A["default"].weight, emb.lora_embedding_B["default"].T)
        assert torch.equal(head.lora_B["default"].weight, emb.lora_embedding_A["default"].T)
    return model, ours


def make_lora_wte(report):
    """tests/fixtures/lora/peft_wte/ (peft's save_pretrained) and lora_wte_reference.npz: peft's logits,
    loss and adapter gradients for a LoRA that adapts the tied wte (embedding + head)."""
    from peft import PeftModel
    hp = TINY_HPARAMS
    values = dict(np.load(FIX / "tiny_values.npz"))
    ref = np.load(FIX / "tiny_reference.npz")
    tokens, targets = ref["tokens"], ref["targets"]
    m64, ours = build_peft_wte(hp, values, SEED_LORA_WTE, torch.float64)
    m32, _ = build_peft_wte(hp, values, SEED_LORA_WTE, torch.float32)
    emb, head = wte_halves(m64)
    scaling = float(emb.scaling["default"])
    assert scaling == float(head.scaling["default"]) == 5 / 3
    logits64, logits32 = hf_logits(m64, tokens), hf_logits(m32, tokens)
    # sanity: the merged float64 model (W + scaling * A @ B, wte for both uses) in plain NumPy
    merged = {k: v.astype(np.float64) for k, v in values.items()}
    for name in ours:
        if name.endswith("/lora_A"):
            prefix = name[:-len("/lora_A")]
            delta = scaling * (ours[name].astype(np.float64) @ ours[prefix + "/lora_B"].astype(np.float64))
            key = prefix if prefix == "model/wte" else prefix + "/w"
            merged[key] = merged[key] + (delta if prefix == "model/wte" else delta[None])
    report["sanity lora_wte |peft f64 - numpy merged f64|"] = float(np.abs(numpy_forward(hp, merged, tokens)
                                                                           - logits64).max())
    assert report["sanity lora_wte |peft f64 - numpy merged f64|"] < 1e-10
    base64 = hf_logits(build_hf(hp, values, torch.float64), tokens)
    assert np.abs(logits64 - base64).max() > 0.5

    out = {"tokens": tokens, "targets": targets, "logits_f64": logits64, "logits_f32": logits32,
           "scaling": np.float64(scaling)}
    out.update({f"adapter/{k}": v for k, v in ours.items()})
    for tag, model in (("f64", m64), ("f32", m32)):
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=torch.from_numpy(tokens)).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 torch.from_numpy(targets).reshape(-1))
        loss.backward()
        assert all(".lora_" in n for n, p in model.named_parameters() if p.requires_grad)
        out[f"loss_{tag}"] = np.float64(loss.item())
        for i in range(hp["n_layer"]):
            for t in WTE_TARGETS:
                mod, prefix = lora_module(model, f"transformer.h.{i}.{t}"), f"model/h{i}/{t.replace('.', '/')}"
                out[f"grad_{tag}/{prefix}/lora_A"] = mod.lora_A["default"].weight.grad.numpy().T.copy()
                out[f"grad_{tag}/{prefix}/lora_B"] = mod.lora_B["default"].weight.grad.numpy().T.copy()
        emb, head = wte_halves(model)
        # torch gives each use's parameter its own gradient; the tied matrix's is their sum
        out[f"grad_{tag}/model/wte/lora_A"] = (emb.lora_embedding_A["default"].grad.numpy().T
                                              + head.lora_B["default"].weight.grad.numpy())
        out[f"grad_{tag}/model/wte/lora_B"] = (emb.lora_embedding_B["default"].grad.numpy().T
                                              + head.lora_A["default"].weight.grad.numpy())
        report[f"lora_wte loss_{tag}"] = loss.item()
    # sanity: central differences of the NumPy loss through the merged wte for two entries
    worst, eps = 0.0, 1e-6
    for name, idx in (("model/wte/lora_A", (int(tokens[0, 0]), 1)), ("model/wte/lora_B", (2, 5))):
        fd = []
        for sign in (1, -1):
            pert = {k: v.astype(np.float64) for k, v in ours.items()}
            pert[name][idx] += sign * eps
            p = {k: v.astype(np.float64) for k, v in values.items()}
            p["model/wte"] = merged["model/wte"] - scaling * (ours["model/wte/lora_A"].astype(np.float64)
                                                              @ ours["model/wte/lora_B"]) \
                + scaling * (pert["model/wte/lora_A"] @ pert["model/wte/lora_B"])
            p.update({k: merged[k] for k in merged if k.endswith("/w")})
            fd.append(numpy_loss(hp, p, tokens, targets))
        g = out[f"grad_f64/{name}"][idx]
        worst = max(worst, abs((fd[0] - fd[1]) / (2 * eps) - g) / abs(g))
    report["sanity lora_wte grad rel err vs numpy finite differences"] = worst
    assert worst < 1e-6

    folder = LORA / "peft_wte"
    if folder.exists():
        shutil.rmtree(folder)
    m32.save_pretrained(folder)
    strip_card(folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    report["lora_wte peft's saved target_modules"] = cfg["target_modules"]
    # peft itself, reloading its own file, leaves lm_head out unless target_modules names it (peft 0.21.2):
    back = PeftModel.from_pretrained(build_hf(hp, values, torch.float32), folder).eval()
    report["lora_wte peft reload |logits - saved model's|"] = float(np.abs(hf_logits(back, tokens) - logits32).max())
    save_npz(LORA / "lora_wte_reference.npz", out)


def make_lora_wte_ours(report):
    """npgpt2_written_wte/ (tools/write_lora_fixture.py: npgpt2's write_peft_adapter, wte among the
    targets) loaded by peft: the head's adapter must be tied to the embedding's; peft's logits."""
    from peft import PeftModel
    hp = TINY_HPARAMS
    values = dict(np.load(FIX / "tiny_values.npz"))
    tokens = np.load(FIX / "tiny_reference.npz")["tokens"]
    out = {"tokens": tokens}
    for tag, dtype in (("f32", torch.float32), ("f64", torch.float64)):
        model = PeftModel.from_pretrained(build_hf(hp, values, dtype), LORA / OURS_WTE).eval()
        emb, head = wte_halves(model)
        assert type(emb).__name__ == "Embedding" and type(head).__name__ == "Linear"
        assert head.lora_A["default"].weight.data_ptr() == emb.lora_embedding_B["default"].data_ptr()  # tied
        out[f"logits_{tag}"] = hf_logits(model, tokens)
        out[f"scaling_{tag}"] = np.float64(emb.scaling["default"])
    save_npz(LORA / f"{OURS_WTE}_peft.npz", out)


# ---------------------------------------------------------------- loss mask (chat training)
SEED_MASK = 44


def masked_targets(targets, mask):
    """torch's convention: a position left out of the loss has target -100 (ignore_index)."""
    return torch.from_numpy(np.where(mask == 1, targets, -100)).reshape(-1)


def make_mask(report):
    """The masked mean cross-entropy sum(mask * ce) / sum(mask) as torch computes it with
    ignore_index=-100 (its default mean is over the positions not ignored), in float64:
    (1) on given logits x @ wte.T, gradients w.r.t. x and wte; (2) through the whole tiny HF
    model (the tiny/ checkpoint's values), every parameter's gradient."""
    hp = TINY_HPARAMS
    rng = np.random.default_rng(SEED_MASK)
    B, T, C, V = 2, hp["n_ctx"], hp["n_embd"], hp["n_vocab"]
    x = rng.normal(0.0, 1.0, (B, T, C))
    wte = rng.normal(0.0, 0.5, (V, C))
    tokens = rng.integers(0, V, size=(B, T), dtype=np.int64)
    targets = rng.integers(0, V, size=(B, T), dtype=np.int64)
    mask = (rng.random((B, T)) < 0.4).astype(np.uint8)  # row 0: about 40% of the positions
    mask[1] = 0
    mask[1, [3, 4, T - 1]] = 1  # row 1: three positions, the last one included
    ignored = masked_targets(targets, mask)

    xt = torch.from_numpy(x).requires_grad_(True)
    wt = torch.from_numpy(wte).requires_grad_(True)
    logits = xt @ wt.T
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), ignored, ignore_index=-100)
    loss.backward()
    ref = {"x": x, "wte": wte, "tokens": tokens, "targets": targets, "mask": mask,
           "head_logits": logits.detach().numpy(), "head_loss": np.float64(loss.item()),
           "head_dx": xt.grad.numpy(), "head_dwte": wt.grad.numpy()}
    report["mask head loss"] = loss.item()

    m64 = build_hf(hp, make_values(hp, SEED_TINY_VALUES), torch.float64)
    m64.zero_grad(set_to_none=True)
    out = m64(torch.from_numpy(tokens)).logits
    loss = torch.nn.functional.cross_entropy(out.reshape(-1, V), ignored, ignore_index=-100)
    loss.backward()
    params = dict(m64.named_parameters())
    for hf_name, (tf_name, _) in hf_name_map(hp).items():
        g = params[hf_name].grad.detach().numpy().copy()
        ref[f"grad/{tf_name}"] = g[None] if tf_name.endswith("/w") else g
    ref["model_loss"] = np.float64(loss.item())
    report["mask model loss"] = loss.item()
    save_npz(FIX / "mask_reference.npz", ref)


def main():
    only = sys.argv[1:]  # e.g. `make_fixtures.py introspect` regenerates just that part
    if (not only or {"lora", "lora_wte"} & set(only)) and os.environ.get("PYTHONHASHSEED") != "0":
        # peft stores target_modules from a set: fix str hashing so the JSON order is the same every run
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "PYTHONHASHSEED": "0"})
    torch.set_num_threads(1)  # shared 2-core machine; also keeps reductions in one order
    FIX.mkdir(parents=True, exist_ok=True)
    report = {"python": sys.version.split()[0], "numpy": np.__version__,
              "tensorflow": tf.__version__ if tf is not None else None, "torch": torch.__version__,
              "transformers": transformers.__version__}
    parts = (("tiny", make_tiny), ("full", make_full), ("optim", make_optim), ("introspect", make_introspect),
             ("lora", make_lora), ("lora_ours", make_lora_ours), ("lora_wte", make_lora_wte),
             ("lora_wte_ours", make_lora_wte_ours), ("mask", make_mask))
    for name, make in parts:
        if not only or name in only:
            if name in ("tiny", "full", "optim", "introspect"):  # they write or read TF checkpoints
                if tf is None:
                    sys.exit(f"{name}: needs tensorflow (tools/fixtures-requirements.txt)")
                tf.compat.v1.disable_eager_execution()
            make(report)
    for k, v in report.items():
        print(f"{k}: {v}")


if __name__ == "__main__":
    main()
