"""All four released GPT-2 sizes, checked without allocating their weights.

The hparams are OpenAI's published hparams.json values, written out here by hand; the
parameter counts are the well-known totals (wte counted once, the head is tied):
124M 124,439,808; 355M 354,823,168; 774M 774,030,080; 1558M 1,557,611,200.
Shape checks use zero-stride arrays (np.broadcast_to), so nothing big is allocated.

A real random-weight 355M checkpoint (1.4 GB on disk) is written, loaded and run only when
NPGPT2_BIG_TESTS=1 (too slow and too big for CI; see test_real_355m_checkpoint).
"""
import json
import os
import time

import numpy as np
import pytest

from npgpt2.convert import count_params, expected_shapes, hf_config, hf_name, hparams_from_config
from npgpt2.download import canonical_name
from npgpt2.errors import Npgpt2Error
from npgpt2.model import validate_params

SIZES = {
    "124M": (dict(n_vocab=50257, n_ctx=1024, n_embd=768, n_head=12, n_layer=12), 124_439_808),
    "355M": (dict(n_vocab=50257, n_ctx=1024, n_embd=1024, n_head=16, n_layer=24), 354_823_168),
    "774M": (dict(n_vocab=50257, n_ctx=1024, n_embd=1280, n_head=20, n_layer=36), 774_030_080),
    "1558M": (dict(n_vocab=50257, n_ctx=1024, n_embd=1600, n_head=25, n_layer=48), 1_557_611_200),
}


@pytest.mark.parametrize("size", SIZES)
def test_parameter_count_and_names(size):
    hp, total = SIZES[size]
    shapes = expected_shapes(hp)
    assert count_params(hp) == total
    L, C = hp["n_layer"], hp["n_embd"]
    assert len(shapes) == 2 + 12 * L + 2  # wte, wpe, 12 per block, ln_f g/b
    assert shapes["model/wte"] == (50257, C) and shapes["model/wpe"] == (1024, C)
    last = f"model/h{L - 1}/"
    assert shapes[last + "attn/c_attn/w"] == (1, C, 3 * C)
    assert shapes[last + "attn/c_proj/w"] == (1, C, C)
    assert shapes[last + "mlp/c_fc/w"] == (1, C, 4 * C)
    assert shapes[last + "mlp/c_proj/w"] == (1, 4 * C, C)
    assert shapes[last + "mlp/c_fc/b"] == (4 * C,) and shapes["model/ln_f/g"] == (C,)
    assert f"model/h{L}/ln_1/g" not in shapes
    assert C % hp["n_head"] == 0 and C // hp["n_head"] == 64  # every released size: 64 per head


@pytest.mark.parametrize("size", SIZES)
def test_validate_params_without_allocating(size):
    hp, _ = SIZES[size]
    params = {k: np.broadcast_to(np.float32(0), s) for k, s in expected_shapes(hp).items()}
    validate_params(hp, params, "test")  # the right shapes pass
    bad = dict(params)
    name = f"model/h{hp['n_layer'] - 1}/attn/c_attn/w"
    bad[name] = np.broadcast_to(np.float32(0), (1, hp["n_embd"], hp["n_embd"]))
    with pytest.raises(Npgpt2Error, match=name):
        validate_params(hp, bad, "test")
    smaller = {**hp, "n_layer": hp["n_layer"] - 1}  # a checkpoint one layer short
    with pytest.raises(Npgpt2Error, match="missing"):
        validate_params(hp, {k: v for k, v in params.items() if k in expected_shapes(smaller)},
                        "test")


@pytest.mark.parametrize("size", SIZES)
def test_hugging_face_names_and_config(size, tmp_path):
    hp, _ = SIZES[size]
    L, C = hp["n_layer"], hp["n_embd"]
    names = [hf_name(n) for n in expected_shapes(hp)]
    assert len(set(names)) == len(names)
    assert f"transformer.h.{L - 1}.mlp.c_proj.weight" in names
    assert f"transformer.h.{L - 1}.ln_2.bias" in names
    assert {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight",
            "transformer.ln_f.bias"} <= set(names)
    cfg = hf_config(hp)
    # the fields transformers' GPT2Config reads, with GPT-2's values
    assert (cfg["vocab_size"], cfg["n_positions"], cfg["n_embd"], cfg["n_head"],
            cfg["n_layer"]) == (50257, 1024, C, hp["n_head"], L)
    assert cfg["eos_token_id"] == 50256 and cfg["model_type"] == "gpt2"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert hparams_from_config(tmp_path / "config.json") == hp


@pytest.mark.parametrize("name, want", [("124M", "124M"), ("117M", "124M"), ("355M", "355M"),
                                        ("345M", "355M"), ("774M", "774M"), ("1558M", "1558M")])
def test_download_names(name, want):
    assert canonical_name(name) == want


@pytest.mark.skipif(os.environ.get("NPGPT2_BIG_TESTS") != "1",
                    reason="writes a 1.4 GB checkpoint; set NPGPT2_BIG_TESTS=1 to run")
def test_real_355m_checkpoint(tmp_path):
    """Write random 355M-shaped weights as an OpenAI folder, load them back, run a token."""
    import npgpt2
    from npgpt2.checkpoint import write_checkpoint, write_checkpoint_state

    hp, total = SIZES["355M"]
    rng = np.random.default_rng(0)
    params = {k: (rng.standard_normal(s, dtype=np.float32) * 0.02)
              for k, s in expected_shapes(hp).items()}
    t0 = time.perf_counter()
    (tmp_path / "hparams.json").write_text(json.dumps(hp))
    write_checkpoint(str(tmp_path / "model.ckpt"), params)
    write_checkpoint_state(tmp_path, "model.ckpt")
    t1 = time.perf_counter()
    model = npgpt2.load_model(tmp_path, mmap=True)
    t2 = time.perf_counter()
    assert sum(v.size for v in model.params.values()) == total
    for k in ("model/wte", "model/h23/mlp/c_proj/w"):
        assert np.array_equal(model.params[k], params[k])
    logits = model.forward(np.array([[464, 3290]]), last_only=True)
    assert logits.shape == (1, 1, 50257) and np.isfinite(logits).all()
    print(f"355M: write {t1 - t0:.1f} s, load+crc {t2 - t1:.1f} s, "
          f"forward {time.perf_counter() - t2:.1f} s")
