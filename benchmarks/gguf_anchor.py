"""GPT-2 weights as a GGUF file for llama.cpp (through llama-cpp-python): the anchor a user
would pick instead of npgpt2 for CPU decoding.

    python benchmarks/gguf_anchor.py OUT.gguf [--qtype f32|q8_0] [--seed 0] [--size 124M]
    write_gguf(params, hparams, path, qtype)      # params: {npgpt2/TF name: float array}

Needs the `gguf` package (benchmarks/requirements-anchors.txt); NumPy only otherwise, so it
runs in a venv without npgpt2's dependencies (llama-cpp-python's). The layout is the one
llama.cpp's `gpt2` architecture loads (its tensor names are gguf.constants' TENSOR_NAMES for
MODEL_ARCH.GPT2):

    token_embd (V, C)  position_embd (n_ctx, C)  output_norm.{weight,bias}
    blk.i.attn_norm.{weight,bias}  blk.i.attn_qkv.{weight (3C, C), bias}
    blk.i.attn_output.{weight (C, C), bias}  blk.i.ffn_norm.{weight,bias}
    blk.i.ffn_up.{weight (4C, C), bias}  blk.i.ffn_down.{weight (C, 4C), bias}

Weights are stored as (out, in) rows (GGML's ne = [in, out]): GPT-2's conv1d (1, C, OC)
weights are transposed. There is no `output.weight`: the head is tied to token_embd, as in
GPT-2 (llama.cpp then uses token_embd for the head). qtype "q8_0" stores the 2-D matrices
(token_embd and the four per block) as GGML Q8_0 (blocks of 32 int8 with a float16 scale),
the rest float32, as llama.cpp's own converter does for `--outtype q8_0`. The vocabulary is
GPT-2's (npgpt2/assets/encoder.json, vocab.bpe): llama.cpp will not load a model without one.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

ASSETS = Path(__file__).resolve().parent.parent / "npgpt2" / "assets"
SIZES = {"124M": dict(n_vocab=50257, n_ctx=1024, n_embd=768, n_head=12, n_layer=12)}
EOT = 50256  # <|endoftext|>


def random_params(hparams, seed=0):
    """GPT-2-shaped random weights in npgpt2's (TF checkpoint) names and shapes: N(0, 0.02)
    matrices, N(0, 0.01) wpe, zero biases, unit layernorm gains (as npgpt2's init_model)."""
    rng = np.random.default_rng(seed)
    V, T, C, L = hparams["n_vocab"], hparams["n_ctx"], hparams["n_embd"], hparams["n_layer"]

    def normal(shape, std):
        return (rng.standard_normal(shape, dtype=np.float32) * std).astype(np.float32)
    p = {"model/wte": normal((V, C), 0.02), "model/wpe": normal((T, C), 0.01),
         "model/ln_f/g": np.ones(C, np.float32), "model/ln_f/b": np.zeros(C, np.float32)}
    for i in range(L):
        h = f"model/h{i}/"
        for ln in ("ln_1", "ln_2"):
            p[h + ln + "/g"], p[h + ln + "/b"] = np.ones(C, np.float32), np.zeros(C, np.float32)
        for name, oc in (("attn/c_attn", 3 * C), ("attn/c_proj", C), ("mlp/c_fc", 4 * C), ("mlp/c_proj", C)):
            cin = 4 * C if name == "mlp/c_proj" else C
            p[h + name + "/w"] = normal((1, cin, oc), 0.02)
            p[h + name + "/b"] = np.zeros(oc, np.float32)
    return p


def gguf_tensors(params, n_layer):
    """npgpt2 names -> [(GGUF name, float32 array in GGUF's (out, in) row layout, is_matrix)]."""
    out = [("token_embd.weight", params["model/wte"], True),
           ("position_embd.weight", params["model/wpe"], False),
           ("output_norm.weight", params["model/ln_f/g"], False),
           ("output_norm.bias", params["model/ln_f/b"], False)]
    names = {"ln_1": "attn_norm", "ln_2": "ffn_norm", "attn/c_attn": "attn_qkv", "attn/c_proj": "attn_output",
             "mlp/c_fc": "ffn_up", "mlp/c_proj": "ffn_down"}
    for i in range(n_layer):
        h, b = f"model/h{i}/", f"blk.{i}."
        for ln in ("ln_1", "ln_2"):
            out.append((b + names[ln] + ".weight", params[h + ln + "/g"], False))
            out.append((b + names[ln] + ".bias", params[h + ln + "/b"], False))
        for name in ("attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj"):
            w = np.asarray(params[h + name + "/w"], np.float32)
            out.append((b + names[name] + ".weight", np.ascontiguousarray(w.reshape(w.shape[-2:]).T), True))  # [OC, C]
            out.append((b + names[name] + ".bias", params[h + name + "/b"], False))
    return [(n, np.ascontiguousarray(a, dtype=np.float32), m) for n, a, m in out]


def gpt2_vocab():
    """GPT-2's tokens (byte-level strings, by id) and merges ("a b" lines) from npgpt2's assets."""
    enc = json.loads((ASSETS / "encoder.json").read_text(encoding="utf-8"))
    tokens = [None] * len(enc)
    for tok, i in enc.items():
        tokens[i] = tok
    merges = [line for line in (ASSETS / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:] if line]
    return tokens, merges


def write_gguf(params, hparams, path, qtype="f32"):
    """Write GPT-2 `params` ({npgpt2 name: array}) with `hparams` (n_vocab, n_ctx, n_embd,
    n_head, n_layer) to `path` as GGUF for llama.cpp's gpt2 architecture; qtype "f32" or
    "q8_0". n_vocab must be GPT-2's 50257 (the vocabulary written is GPT-2's)."""
    import gguf
    if qtype not in ("f32", "q8_0"):
        raise ValueError(f"qtype: {qtype!r} (choose f32 or q8_0)")
    tokens, merges = gpt2_vocab()
    if hparams["n_vocab"] != len(tokens):
        raise ValueError(f"n_vocab {hparams['n_vocab']}: the vocabulary written is GPT-2's {len(tokens)} tokens")
    Q = gguf.GGMLQuantizationType
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_name("npgpt2 GPT-2 anchor")
    w.add_block_count(hparams["n_layer"])
    w.add_context_length(hparams["n_ctx"])
    w.add_embedding_length(hparams["n_embd"])
    w.add_feed_forward_length(4 * hparams["n_embd"])
    w.add_head_count(hparams["n_head"])
    w.add_layer_norm_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if qtype == "q8_0" else gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if i == EOT else gguf.TokenType.NORMAL for i in range(len(tokens))])
    w.add_token_merges(merges)
    w.add_bos_token_id(EOT)
    w.add_eos_token_id(EOT)
    for name, a, matrix in gguf_tensors(params, hparams["n_layer"]):
        if qtype == "q8_0" and matrix:
            w.add_tensor(name, gguf.quants.quantize(a, Q.Q8_0), raw_dtype=Q.Q8_0)  # bytes (rows, 34 per 32)
        else:
            w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--qtype", default="f32", choices=("f32", "q8_0"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", default="124M", choices=sorted(SIZES))
    args = ap.parse_args(argv)
    hp = SIZES[args.size]
    write_gguf(random_params(hp, args.seed), hp, args.out, args.qtype)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
