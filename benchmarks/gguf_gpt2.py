"""A GPT-2 model's parameters (OpenAI's TF names, as npgpt2 keeps them) written as a GGUF file
that llama.cpp loads: the anchor rows of benchmarks/serve.py.

    write_gguf(params, hparams, path, qtype="F32", assets=npgpt2/assets)

Runs where the `gguf` package is (the anchor's venv, benchmarks/requirements-anchor.txt);
it imports only NumPy and gguf, so serve.py saves the parameters to an .npz and calls

    <venv>/bin/python benchmarks/gguf_gpt2.py PARAMS.npz HPARAMS.json OUT.gguf [F32|F16]

The layout is llama.cpp's "gpt2" architecture (gguf.MODEL_TENSORS[MODEL_ARCH.GPT2]):
token_embd (V, C), position_embd (n_ctx, C), per block attn_norm, attn_qkv, attn_output,
ffn_norm, ffn_up, ffn_down (weights and biases), output_norm; no `output` tensor, so llama.cpp
ties the head to token_embd as GPT-2 does. GGUF stores a matrix as (out, in) rows in NumPy's
order, so GPT-2's conv1d weights (in, out) are transposed. The tokenizer is GPT-2's byte-level
BPE (encoder.json ids and vocab.bpe merges, llama.cpp's "gpt2" model and "gpt-2" pre-split).
"""
import json
import sys
from pathlib import Path

import numpy as np

ASSETS = Path(__file__).resolve().parent.parent / "npgpt2" / "assets"
BLOCK_TENSORS = {  # llama.cpp's name: (npgpt2's name, transpose?)
    "attn_norm.weight": ("ln_1/g", False), "attn_norm.bias": ("ln_1/b", False),
    "attn_qkv.weight": ("attn/c_attn/w", True), "attn_qkv.bias": ("attn/c_attn/b", False),
    "attn_output.weight": ("attn/c_proj/w", True), "attn_output.bias": ("attn/c_proj/b", False),
    "ffn_norm.weight": ("ln_2/g", False), "ffn_norm.bias": ("ln_2/b", False),
    "ffn_up.weight": ("mlp/c_fc/w", True), "ffn_up.bias": ("mlp/c_fc/b", False),
    "ffn_down.weight": ("mlp/c_proj/w", True), "ffn_down.bias": ("mlp/c_proj/b", False),
}


def gguf_tensors(params, n_layer, dtype):
    """{llama.cpp tensor name: array}; matrices in `dtype`, vectors float32 (as llama.cpp's converter)."""
    def mat(a):
        return np.ascontiguousarray(a, dtype=dtype)

    vec = np.float32
    out = {"token_embd.weight": mat(params["model/wte"]), "position_embd.weight": mat(params["model/wpe"]),
           "output_norm.weight": params["model/ln_f/g"].astype(vec), "output_norm.bias": params["model/ln_f/b"].astype(vec)}
    for i in range(n_layer):
        for name, (ours, transpose) in BLOCK_TENSORS.items():
            a = params[f"model/h{i}/{ours}"]
            out[f"blk.{i}.{name}"] = mat(a.reshape(a.shape[-2:]).T) if transpose else a.astype(vec)
    return out


def write_gguf(params, hparams, path, qtype="F32", assets=ASSETS):
    """params {TF name: array}, hparams {n_vocab, n_ctx, n_embd, n_head, n_layer} -> a GGUF
    file at path. qtype: "F32" or "F16" (the matrices' type)."""
    import gguf

    dtype, ftype = {"F32": (np.float32, gguf.LlamaFileType.ALL_F32),
                    "F16": (np.float16, gguf.LlamaFileType.MOSTLY_F16)}[qtype]
    encoder = json.loads((Path(assets) / "encoder.json").read_text(encoding="utf-8"))
    tokens = sorted(encoder, key=encoder.get)
    if len(tokens) != hparams["n_vocab"]:
        raise ValueError(f"encoder.json has {len(tokens)} tokens, the model {hparams['n_vocab']}")
    merges = [line for line in (Path(assets) / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:] if line]
    eot = encoder["<|endoftext|>"]
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_name("npgpt2 random-weight GPT-2 (benchmark anchor)")
    w.add_context_length(hparams["n_ctx"])
    w.add_embedding_length(hparams["n_embd"])
    w.add_feed_forward_length(4 * hparams["n_embd"])
    w.add_block_count(hparams["n_layer"])
    w.add_head_count(hparams["n_head"])
    w.add_layer_norm_eps(1e-5)
    w.add_file_type(ftype)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if i == eot else gguf.TokenType.NORMAL for i in range(len(tokens))])
    w.add_token_merges(merges)
    w.add_bos_token_id(eot)
    w.add_eos_token_id(eot)
    w.add_add_bos_token(False)
    for name, a in gguf_tensors(params, hparams["n_layer"], dtype).items():
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main(argv):
    params_npz, hparams_json, out = argv[:3]
    qtype = argv[3] if len(argv) > 3 else "F32"
    with np.load(params_npz) as f:
        params = {k.replace("|", "/"): f[k] for k in f.files}
    write_gguf(params, json.loads(Path(hparams_json).read_text()), out, qtype)


if __name__ == "__main__":
    main(sys.argv[1:])
