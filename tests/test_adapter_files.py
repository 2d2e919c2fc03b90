"""Hugging Face PEFT LoRA interop (adapter_files.py) and `npgpt2 convert --merge / --to peft`.

References are peft's and torch's, never npgpt2's (tests/fixtures/lora/README.md): peft_f32/ (and its
float16 / bfloat16 copies) was written by peft's save_pretrained; lora_reference.npz holds peft's logits
for it, merge_and_unload's weights and peft's per-module scaling. npgpt2_written/ was written by
write_peft_adapter and loaded by peft's PeftModel.from_pretrained, whose logits are in
npgpt2_written_peft.npz. The test suite never imports torch or peft.
"""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from npgpt2 import adapter_files as af
from npgpt2 import lora
from npgpt2.cli import main as cli_main
from npgpt2.convert import convert, read_model
from npgpt2.errors import Npgpt2Error
from npgpt2.lora import LoraAdapters, LoraConfig, module_prefix
from npgpt2.model import GPT2, load_model
from npgpt2.safetensors_io import read_safetensors, write_safetensors

FIX = Path(__file__).parent / "fixtures"
LORA = FIX / "lora"
TINY = FIX / "tiny"
TINY_HP = {"n_vocab": 96, "n_ctx": 16, "n_embd": 24, "n_head": 3, "n_layer": 2}
FILES = {"f32": "logits_f32", "f16": "logits_f16file", "bf16": "logits_bf16file"}


@pytest.fixture(scope="module")
def ref():
    with np.load(LORA / "lora_reference.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def base():
    with np.load(FIX / "tiny_values.npz") as z:
        return {k: z[k] for k in z.files}


def logits(params, tokens, dtype=np.float32):
    return GPT2(TINY_HP, params, dtype).forward(tokens)


def one_line(excinfo):
    msg = str(excinfo.value)
    assert msg and "\n" not in msg
    return msg


# ---------------------------------------------------------------- peft-written adapters load here
def test_is_peft_dir(tmp_path):
    assert af.is_peft_dir(LORA / "peft_f32") and af.is_peft_dir(LORA / "npgpt2_written")
    assert not af.is_peft_dir(TINY) and not af.is_peft_dir(tmp_path / "missing")
    assert not af.is_peft_dir(LORA / "peft_f32" / "adapter_config.json")


@pytest.mark.parametrize("tag", sorted(FILES))
def test_peft_file_reads_as_peft_built_it(tag, ref):
    adapters = af.read_peft_adapter(LORA / f"peft_{tag}", TINY_HP)
    c = adapters.config
    assert (c.r, c.alpha, c.targets) == (4, 8.0, lora.TARGETS)
    assert c.rank_pattern == {"model/h1/mlp/c_fc": 2} and c.alpha_pattern == {"model/h0/attn/c_proj": 3.0}
    for i in range(2):
        for t in lora.TARGETS:
            assert c.scaling(i, t) == ref[f"scaling/{module_prefix(i, t)}"]  # peft's module.scaling
    assert sorted(adapters.params) == sorted(k[len("adapter/"):] for k in ref if k.startswith("adapter/"))
    for name, a in adapters.params.items():
        want = ref["adapter/" + name]  # float32, npgpt2's layout (C_in, r) / (r, C_out)
        assert a.dtype == np.float32 and a.shape == want.shape and a.flags.c_contiguous, name
        if tag == "f32":
            assert np.array_equal(a, want), name
        elif tag == "f16":
            assert np.array_equal(a, want.astype(np.float16).astype(np.float32)), name  # NumPy's rounding
        else:  # bfloat16 keeps 8 significant bits
            assert np.all(np.abs(a - want) <= np.abs(want) * 2.0 ** -8), name
            assert not np.array_equal(a, want)


@pytest.mark.parametrize("tag", sorted(FILES))
def test_peft_file_logits_equal_peft(tag, ref, base, path):
    """float32 base + the file's adapters merged = peft's logits with that file (<=1e-5)."""
    adapters = af.read_peft_adapter(LORA / f"peft_{tag}", TINY_HP)
    got = logits(af.merged_params(base, adapters), ref["tokens"])
    assert np.abs(got - ref[FILES[tag]]).max() <= 1e-5
    # the adapter matters: the base alone is far from peft's logits
    assert np.abs(logits(base, ref["tokens"]) - ref[FILES[tag]]).max() > 1.0


def test_peft_file_float64_logits(ref, base):
    adapters = af.read_peft_adapter(LORA / "peft_f32", TINY_HP)
    got = logits(af.merged_params(base, adapters, dtype=np.float64), ref["tokens"], np.float64)
    assert np.abs(got - ref["logits_f64"]).max() <= 1e-9


def test_merged_params_equals_merge_and_unload(ref, base):
    adapters = af.read_peft_adapter(LORA / "peft_f32", TINY_HP)
    merged = af.merged_params(base, adapters)
    merged64 = af.merged_params(base, adapters, dtype=np.float64)
    names = [k[len("merged/"):] for k in ref if k.startswith("merged/")]
    assert len(names) == 8
    for name in names:
        assert merged[name].dtype == np.float32 and merged[name].shape == base[name].shape
        # peft sums in float32; here the sum is rounded once from float64
        assert np.abs(merged[name] - ref["merged/" + name]).max() <= 1e-6, name
        assert np.abs(merged64[name] - ref["merged64/" + name]).max() <= 1e-12, name
        assert np.abs(merged[name] - base[name]).max() > 0.1, name  # the adapter moved W
    for name in set(base) - set(names):
        assert np.array_equal(merged[name], base[name]), name
    assert set(merged) == set(base)


def test_target_modules_regex_and_pattern_regex_match_as_peft(tmp_path, ref):
    """The same adapter described another way PEFT allows: a regex target_modules string, regex pattern
    keys, layers_to_transform naming every layer, an exclude_modules entry that excludes nothing."""
    folder = peft_copy(tmp_path, cfg={
        "target_modules": r".*\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)",
        "rank_pattern": {r"h\.1\.mlp\.c_\w+": 2}, "alpha_pattern": {r"0\.attn\.c_proj": 3},
        "layers_to_transform": [0, 1], "exclude_modules": ["ln_f"]})
    with pytest.raises(Npgpt2Error):  # "c_\w+" also matches h.1.mlp.c_proj, whose tensors are rank 4
        af.read_peft_adapter(folder, TINY_HP)
    json_edit(folder, {"rank_pattern": {r"1\.mlp\.c_fc": 3, r"h\.1\.mlp\.c_fc": 2}})  # the first matching key wins
    with pytest.raises(Npgpt2Error, match="but r=3"):
        af.read_peft_adapter(folder, TINY_HP)
    json_edit(folder, {"rank_pattern": {r"h\.1\.mlp\.c_fc": 2, r"1\.mlp\.c_fc": 3}})
    got = af.read_peft_adapter(folder, TINY_HP)
    want = af.read_peft_adapter(LORA / "peft_f32", TINY_HP)
    assert got.config == want.config
    assert all(np.array_equal(got.params[k], want.params[k]) for k in want.params)
    json_edit(folder, {"target_modules": "all-linear"})  # PEFT's shorthand: every Conv1D of the blocks
    assert af.read_peft_adapter(folder, TINY_HP).config == want.config
    json_edit(folder, {"exclude_modules": ["h.1.mlp.c_fc"]})
    with pytest.raises(Npgpt2Error, match="does not target transformer.h.1.mlp.c_fc but"):
        af.read_peft_adapter(folder, TINY_HP)


# ---------------------------------------------------------------- ours loads in peft
@pytest.fixture(scope="module")
def ours():
    """The LoraAdapters npgpt2_written/ was written from (seeded inputs, tests/fixtures/lora/README.md)."""
    with np.load(LORA / "npgpt2_written_input.npz") as z:
        cfg = json.loads(str(z["config"]))
        params = {k: z[k] for k in z.files if k.startswith("model/")}
        base_name = str(z["base_name"])
    config = LoraConfig(r=cfg["r"], alpha=cfg["alpha"], targets=tuple(cfg["targets"]),
                        rank_pattern=cfg["rank_pattern"], alpha_pattern=cfg["alpha_pattern"])
    return LoraAdapters(config=config, params=params), base_name


def test_write_peft_adapter_writes_the_folder_peft_loaded(tmp_path, ours):
    adapters, base_name = ours
    out = af.write_peft_adapter(adapters, tmp_path / "a", base_name=base_name)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (out / name).read_bytes() == (LORA / "npgpt2_written" / name).read_bytes(), name
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["fan_in_fan_out"] is True
    assert not list(tmp_path.glob(".*"))  # no temporary folder left


def test_ours_in_peft_gives_our_logits(ours, base):
    """peft's logits for the folder npgpt2 wrote (and peft's scaling/rank per module) = ours."""
    adapters, _ = ours
    with np.load(LORA / "npgpt2_written_peft.npz") as z:
        peft = {k: z[k] for k in z.files}
    c = adapters.config
    prefixes = [module_prefix(i, t) for i in range(2) for t in c.targets]
    assert sorted(k[len("scaling/"):] for k in peft if k.startswith("scaling/")) == sorted(prefixes)
    for i in range(2):
        for t in c.targets:
            assert peft[f"rank/{module_prefix(i, t)}"] == c.rank(i, t)
            assert abs(peft[f"scaling/{module_prefix(i, t)}"] - c.scaling(i, t)) <= 1e-15
    assert np.abs(logits(af.merged_params(base, adapters), peft["tokens"]) - peft["logits_f32"]).max() <= 1e-5
    got64 = logits(af.merged_params(base, adapters, dtype=np.float64), peft["tokens"], np.float64)
    assert np.abs(got64 - peft["logits_f64"]).max() <= 1e-9


def test_ours_round_trips(ours):
    adapters, _ = ours
    back = af.read_peft_adapter(LORA / "npgpt2_written", TINY_HP)
    assert back.config == adapters.config
    assert sorted(back.params) == sorted(adapters.params)
    assert all(np.array_equal(back.params[k], adapters.params[k]) for k in adapters.params)


def test_write_refuses_and_leaves_nothing(tmp_path, ours, monkeypatch):
    adapters, _ = ours
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    with pytest.raises(Npgpt2Error, match="not empty") as e:
        af.write_peft_adapter(adapters, tmp_path / "full")
    one_line(e)
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["notes.txt"]
    broken = LoraAdapters(adapters.config, {k: v for k, v in adapters.params.items() if "h1/mlp" not in k})
    with pytest.raises(Npgpt2Error, match="does not fit") as e:
        af.write_peft_adapter(broken, tmp_path / "x")
    one_line(e)
    wrong_rank = LoraAdapters(LoraConfig(r=3, alpha=5.0, targets=adapters.config.targets), adapters.params)
    with pytest.raises(Npgpt2Error, match="not rank"):
        af.write_peft_adapter(wrong_rank, tmp_path / "x")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(af, "write_safetensors", disk_full)
    with pytest.raises(Npgpt2Error, match="No space left") as e:
        af.write_peft_adapter(adapters, tmp_path / "x")
    one_line(e)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]  # no x, no .x.*.tmp


# ---------------------------------------------------------------- npgpt2 convert --merge / --to peft
def test_convert_merge_from_peft_folder(tmp_path, ref, base, capsys):
    assert cli_main(["convert", str(LORA / "peft_f32"), str(tmp_path / "merged"), "--merge",
                     "--base", str(TINY)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "merged")
    model = load_model(tmp_path / "merged")  # an OpenAI-layout float32 folder, as any fine-tune
    assert model.hparams == TINY_HP and (tmp_path / "merged" / "encoder.json").is_file()
    assert np.abs(model.forward(ref["tokens"]) - ref["logits_f32"]).max() <= 1e-5
    for name, w in read_model(tmp_path / "merged")[1].items():
        if "merged/" + name in ref:
            assert np.abs(w - ref["merged/" + name]).max() <= 1e-6, name
        else:
            assert np.array_equal(w, base[name]), name
    convert(LORA / "peft_f32", tmp_path / "m8", merge=True, base=TINY, dtype="int8")  # 8-bit merged weights
    assert (tmp_path / "m8" / "quant.json").is_file() and load_model(tmp_path / "m8", dtype="int8").weight_dtype == "int8"
    convert(LORA / "peft_bf16", tmp_path / "merged.npz", merge=True, base=TINY)  # .npz and --to hf too
    convert(LORA / "peft_f16", tmp_path / "hf", merge=True, base=TINY, fmt="hf")
    for out, key in ((tmp_path / "merged.npz", "logits_bf16file"), (tmp_path / "hf", "logits_f16file")):
        params = read_model(out)[1]
        assert np.abs(logits(params, ref["tokens"]) - ref[key]).max() <= 1e-5


def test_convert_merge_onto_hf_and_int8_bases(tmp_path, ref):
    """--base may be a Hugging Face folder; an int8 folder merges onto its dequantised weights (what an
    adapter trained on it saw): merged - dequantised = peft's scaling * A @ B."""
    convert(LORA / "peft_f32", tmp_path / "from_hf", merge=True, base=FIX / "hf_tiny")
    assert np.abs(load_model(tmp_path / "from_hf").forward(ref["tokens"]) - ref["logits_f32"]).max() <= 1e-5
    convert(TINY, tmp_path / "w8", dtype="int8")
    convert(LORA / "peft_f32", tmp_path / "m8", merge=True, base=tmp_path / "w8")
    dequantised, merged = load_model(tmp_path / "w8").params, read_model(tmp_path / "m8")[1]
    for name in (k[len("merged/"):] for k in ref if k.startswith("merged/")):
        prefix = name[:-len("/w")]
        delta = ref[f"scaling/{prefix}"] * (ref[f"adapter/{prefix}/lora_A"].astype(np.float64)
                                            @ ref[f"adapter/{prefix}/lora_B"])
        assert np.abs(merged[name][0] - dequantised[name][0] - delta).max() <= 1e-6, name


def test_convert_to_peft_from_peft_folder(tmp_path):
    out = convert(LORA / "npgpt2_written", tmp_path / "p", fmt="peft", base=TINY)
    back, orig = af.read_peft_adapter(out, TINY_HP), af.read_peft_adapter(LORA / "npgpt2_written", TINY_HP)
    assert back.config == orig.config
    assert all(np.array_equal(back.params[k], orig.params[k]) for k in orig.params)
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(TINY)
    with pytest.raises(Npgpt2Error, match="not empty"):
        convert(LORA / "npgpt2_written", tmp_path / "p", fmt="peft", base=TINY)
    convert(LORA / "peft_f32", tmp_path / "p", fmt="peft", base=TINY, force=True)
    assert af.read_peft_adapter(tmp_path / "p", TINY_HP).config.r == 4


@pytest.mark.parametrize("kwargs, message", [
    (dict(merge=True), "--base: .* PEFT adapter folder"),
    (dict(), "holds LoRA adapters: write a full model with --merge"),
    (dict(fmt="tf", base=TINY), "holds LoRA adapters"),
    (dict(merge=True, fmt="peft", base=TINY), "--merge and --to peft: choose one"),
    (dict(fmt="peft", base=TINY, dtype="int8"), "--dtype int8"),
    (dict(merge=True, base=FIX / "nowhere"), "no such file or folder"),
    (dict(merge=True, base=LORA / "peft_f32"), "not a model folder"),
    (dict(merge=True, base=FIX / "full"), "layer|shape"),
])
def test_convert_adapter_bad_input(tmp_path, kwargs, message):
    with pytest.raises(Npgpt2Error, match=message) as e:
        convert(LORA / "peft_f32", tmp_path / "out", **kwargs)
    one_line(e)
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_convert_merge_refuses_a_model_or_an_occupied_destination(tmp_path):
    for kwargs in (dict(merge=True), dict(base=TINY), dict(fmt="peft")):
        with pytest.raises(Npgpt2Error, match="not a LoRA adapter folder.*--merge, --to peft and --base are for"):
            convert(TINY, tmp_path / "out", **kwargs)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(Npgpt2Error, match="not empty"):
        convert(LORA / "peft_f32", tmp_path / "out", merge=True, base=TINY)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["notes.txt"]


# ---------------------------------------------------------------- with the adapter forward and run folders (lora.py)


def test_merged_folder_logits_equal_adapter_model(tmp_path, ref, path):
    """The merged folder (convert --merge) = the base with the adapters attached, float32 <=1e-5."""
    convert(LORA / "peft_f32", tmp_path / "merged", merge=True, base=TINY)
    model = lora.attach(load_model(TINY), af.read_peft_adapter(LORA / "peft_f32", TINY_HP))
    adapted = model.forward(ref["tokens"])
    assert np.abs(adapted - ref["logits_f32"]).max() <= 1e-5  # peft's
    assert np.abs(load_model(tmp_path / "merged").forward(ref["tokens"]) - adapted).max() <= 1e-5


def test_convert_run_folder(tmp_path, ref):
    """A LoRA run folder (adapter.json naming its base) converts without --base, both ways."""
    base_dir = tmp_path / "base"
    shutil.copytree(TINY, base_dir)
    model = load_model(base_dir)
    adapters = af.read_peft_adapter(LORA / "peft_f32", TINY_HP)
    adapters.base = lora.base_record(base_dir)
    lora.save_adapters(lora.attach(model, adapters), tmp_path / "run", step=3)
    with pytest.raises(Npgpt2Error, match="names its own base"):
        convert(tmp_path / "run", tmp_path / "m", merge=True, base=TINY)
    convert(tmp_path / "run", tmp_path / "m", merge=True)
    assert np.abs(load_model(tmp_path / "m").forward(ref["tokens"]) - ref["logits_f32"]).max() <= 1e-5
    out = convert(tmp_path / "run", tmp_path / "p", fmt="peft")
    back = af.read_peft_adapter(out, TINY_HP)
    assert back.config == adapters.config
    assert all(np.array_equal(back.params[k], adapters.params[k]) for k in adapters.params)


# ---------------------------------------------------------------- bad PEFT folders: one line naming the file
def json_edit(folder, cfg):
    path = folder / "adapter_config.json"
    data = json.loads(path.read_text())
    for k, v in cfg.items():
        if v is KeyError:
            data.pop(k, None)
        else:
            data[k] = v
    path.write_text(json.dumps(data))


def peft_copy(tmp_path, cfg=None, tensors=None, source="peft_f32"):
    """A copy of the fixture folder `source` with its config edited (value KeyError: key removed)
    and its tensors passed through tensors(dict) (inputs for the refusals below)."""
    folder = tmp_path / "adapter"
    shutil.copytree(LORA / source, folder)
    json_edit(folder, cfg or {})
    if tensors is not None:
        t, _ = read_safetensors(folder / "adapter_model.safetensors")
        t = tensors(dict(t))
        (folder / "adapter_model.safetensors").unlink()
        write_safetensors(folder / "adapter_model.safetensors", t)
    return folder


KEY = "base_model.model.transformer.h.{}.{}.lora_{}.weight"


def rename_llama(t):
    return {k.replace("transformer.h.", "model.layers.").replace("attn.c_attn", "self_attn.q_proj"): v
            for k, v in t.items()}


def drop(*parts):
    return lambda t: {k: v for k, v in t.items() if not all(p in k for p in parts)}


def with_value(key, fn):
    return lambda t: {**t, key: fn(t[key])}


BAD = [
    ("peft_type", dict(cfg={"peft_type": "IA3"}), "adapter_config.json: peft_type is 'IA3'"),
    ("dora", dict(cfg={"use_dora": True}), "adapter_config.json: use_dora=True"),
    ("rslora", dict(cfg={"use_rslora": True}), "use_rslora=True"),
    ("bias", dict(cfg={"bias": "all"}), "bias='all'"),
    ("modules_to_save", dict(cfg={"modules_to_save": ["lm_head"]}), "modules_to_save"),
    ("no r", dict(cfg={"r": KeyError}), "no 'r'"),
    ("r 0", dict(cfg={"r": 0}), "r must be a whole number"),
    ("r float", dict(cfg={"r": 4.5}), "r must be a whole number"),
    ("alpha", dict(cfg={"lora_alpha": "eight"}), "lora_alpha must be"),
    ("rank_pattern list", dict(cfg={"rank_pattern": [2]}), "rank_pattern must be an object"),
    ("rank_pattern 0", dict(cfg={"rank_pattern": {"h.1.mlp.c_fc": 0}}), "rank_pattern for transformer.h.1"),
    ("bad regex", dict(cfg={"alpha_pattern": {"(": 2}}), "not a valid regex"),
    ("another model's targets", dict(cfg={"target_modules": ["q_proj", "v_proj"]}), "does not target"),
    ("position embedding target", dict(cfg={"target_modules": ["wpe", "c_attn", "c_proj", "c_fc"]}),
     "matches transformer.wpe, which npgpt2 cannot adapt"),
    ("wte targeted, no tensors", dict(cfg={"target_modules": ["wte", "c_attn", "c_proj", "c_fc"]}),
     "targets transformer.wte but adapter_model.safetensors has no tensors for it"),
    ("target_modules type", dict(cfg={"target_modules": 5}), "target_modules must be"),
    ("another model's tensors", dict(cfg={"target_modules": ["q_proj"]}, tensors=rename_llama), "unknown tensor"),
    ("half a head adapter", dict(tensors=lambda t: {**t, "base_model.model.lm_head.lora_A.weight": t[KEY.format(
        0, "attn.c_attn", "A")]}), "has lora_A but no lora_B for lm_head"),
    ("extra tensor", dict(tensors=lambda t: {**t, "base_model.model.transformer.wpe.lora_embedding_A": t[KEY.format(
        0, "attn.c_attn", "A")]}), "unknown tensor 'base_model.model.transformer.wpe"),
    ("wrong shape", dict(cfg={"rank_pattern": {}}), "has shape (2, 24), but r=4"),
    ("missing B", dict(tensors=drop("h.0.mlp.c_fc", "lora_B")), "no lora_B for h.0.mlp.c_fc"),
    ("untargeted tensors", dict(cfg={"target_modules": ["c_attn", "c_fc"]}), "does not target transformer.h.0.attn.c_proj"),
    ("missing tensors", dict(tensors=drop("mlp.c_fc")), "targets transformer.h.0.mlp.c_fc but"),
    ("some layers", dict(cfg={"layers_to_transform": [0]}, tensors=drop("h.1.")), "in some layers but not in layer 1"),
    ("nan", dict(tensors=with_value(KEY.format(1, "attn.c_proj", "B"), lambda a: a * np.nan)), "NaN"),
    ("int tensor", dict(tensors=with_value(KEY.format(1, "attn.c_proj", "B"), lambda a: a.astype(np.int32))),
     "not a float"),
    ("no tensors", dict(cfg={"target_modules": []}, tensors=lambda t: {}), "holds no LoRA tensors"),
]


def test_bad_peft_folder_files_and_sizes(tmp_path):
    folder = peft_copy(tmp_path)
    with pytest.raises(Npgpt2Error, match="layer 1, but the model has n_layer=1"):
        af.read_peft_adapter(folder, {**TINY_HP, "n_layer": 1})
    with pytest.raises(Npgpt2Error, match=r"has shape \(4, 24\), but r=4 and n_embd=32"):
        af.read_peft_adapter(folder, {**TINY_HP, "n_embd": 32})
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    with pytest.raises(Npgpt2Error, match="adapter_model.safetensors: missing .*pickle"):
        af.read_peft_adapter(folder, TINY_HP)
    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(Npgpt2Error, match="adapter_config.json") as e:
        af.read_peft_adapter(folder, TINY_HP)
    one_line(e)
    with pytest.raises(Npgpt2Error, match="no such adapter folder"):
        af.read_peft_adapter(tmp_path / "nowhere", TINY_HP)
    with pytest.raises(Npgpt2Error, match="adapter_config.json: missing"):
        af.read_peft_adapter(tmp_path, TINY_HP)


def test_a_peft_folder_loads_through_adapter_and_the_cli(tmp_path, ref, capsys):
    """load_model(base, adapter=<PEFT folder>) is the base with peft's adapters: peft's own logits
    (float32 <=1e-5); `npgpt2 eval --adapter <PEFT folder>` runs on it (and differs from the base)."""
    model = load_model(TINY, adapter=LORA / "peft_f32")
    assert model.lora is not None
    np.testing.assert_allclose(model.forward(ref["tokens"]), ref["logits_f32"], rtol=0, atol=1e-5)
    data = tmp_path / "ids.npz"
    np.savez(data, ref["tokens"].reshape(-1).astype(np.uint16))
    from npgpt2.cli import main
    losses = []
    for extra in ([], ["--adapter", str(LORA / "peft_f32")]):
        assert main(["eval", "--dataset", str(data), "--models_dir", str(FIX), "--model_name", "tiny", *extra]) in (0, None)
        losses.append(capsys.readouterr().out)
    assert losses[0] != losses[1] and all("loss" in out for out in losses)


# ---------------------------------------------------------------- the tied wte (target "wte")
WTE_KEYS = ("base_model.model.transformer.wte.lora_embedding_A", "base_model.model.transformer.wte.lora_embedding_B",
            "base_model.model.lm_head.lora_A.weight", "base_model.model.lm_head.lora_B.weight")


@pytest.fixture(scope="module")
def wte_ref():
    with np.load(LORA / "lora_wte_reference.npz") as z:  # tools/make_fixtures.py lora_wte (peft's numbers)
        return {k: z[k] for k in z.files}


def test_peft_wte_folder_loads_with_peft_logits(tmp_path, wte_ref, base, capsys):
    """peft_wte/ as peft's save_pretrained wrote it (target_modules lists wte but not lm_head;
    ensure_weight_tying: true) reads as one adapter on the tied wte, whose logits are those of the
    peft model that saved it (float32 <=1e-5, float64 <=1e-9), as an attached adapter and merged."""
    cfg = json.loads((LORA / "peft_wte" / "adapter_config.json").read_text())
    assert "lm_head" not in cfg["target_modules"] and cfg["ensure_weight_tying"] is True
    adapters = af.read_peft_adapter(LORA / "peft_wte", TINY_HP)
    c = adapters.config
    assert (c.r, c.alpha, c.targets) == (3, 5.0, ("attn.c_attn", "mlp.c_proj", "wte"))
    for name, a in adapters.params.items():
        assert np.array_equal(a, wte_ref["adapter/" + name]), name
    tokens = wte_ref["tokens"]
    assert np.abs(logits(af.merged_params(base, adapters), tokens) - wte_ref["logits_f32"]).max() <= 1e-5
    got64 = logits(af.merged_params(base, adapters, dtype=np.float64), tokens, np.float64)
    assert np.abs(got64 - wte_ref["logits_f64"]).max() <= 1e-9
    model = load_model(TINY, adapter=LORA / "peft_wte")
    assert model.wte_lora is not None
    assert np.abs(model.forward(tokens) - wte_ref["logits_f32"]).max() <= 1e-5
    assert cli_main(["convert", str(LORA / "peft_wte"), str(tmp_path / "merged"), "--merge", "--base", str(TINY)]) == 0
    capsys.readouterr()
    assert np.abs(load_model(tmp_path / "merged").forward(tokens) - wte_ref["logits_f32"]).max() <= 1e-5


@pytest.fixture(scope="module")
def ours_wte():
    with np.load(LORA / "npgpt2_written_wte_input.npz") as z:  # tools/write_lora_fixture.py's seeded inputs
        cfg = json.loads(str(z["config"]))
        params = {k: z[k] for k in z.files if k.startswith("model/")}
    return LoraAdapters(LoraConfig(r=cfg["r"], alpha=cfg["alpha"], targets=tuple(cfg["targets"])), params)


def test_ours_wte_written_as_peft_loads_it_tied(tmp_path, ours_wte, base):
    """write_peft_adapter with wte: the committed folder byte for byte (an Embedding LoRA on transformer.wte,
    lm_head's LoRA holding the same values, ensure_weight_tying); peft loaded it with the head tied to the
    embedding (make_fixtures.py lora_wte_ours asserts it) and its logits equal ours; it reads back exactly."""
    out = af.write_peft_adapter(ours_wte, tmp_path / "a", base_name="tests/fixtures/hf_tiny")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (out / name).read_bytes() == (LORA / "npgpt2_written_wte" / name).read_bytes(), name
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["attn.c_proj", "wte", "lm_head"] and cfg["ensure_weight_tying"] is True
    t, _ = read_safetensors(out / "adapter_model.safetensors")
    assert t[WTE_KEYS[0]].shape == (2, 96) and t[WTE_KEYS[3]].shape == (96, 2)
    with np.load(LORA / "npgpt2_written_wte_peft.npz") as z:
        peft = {k: z[k] for k in z.files}
    assert peft["scaling_f32"] == ours_wte.config.scaling(None, "wte")
    assert np.abs(logits(af.merged_params(base, ours_wte), peft["tokens"]) - peft["logits_f32"]).max() <= 1e-5
    got64 = logits(af.merged_params(base, ours_wte, dtype=np.float64), peft["tokens"], np.float64)
    assert np.abs(got64 - peft["logits_f64"]).max() <= 1e-9
    back = af.read_peft_adapter(out, TINY_HP)
    assert back.config == ours_wte.config
    assert all(np.array_equal(back.params[k], ours_wte.params[k]) for k in ours_wte.params)


BAD_WTE = [
    ("untied: wte alone", dict(source="peft_wte", cfg={"ensure_weight_tying": False}, tensors=drop("lm_head")),
     "adapts transformer.wte but not lm_head (untied)"),
    ("head alone", dict(source="peft_wte", cfg={"target_modules": ["c_attn", "mlp.c_proj", "lm_head"],
                                                "ensure_weight_tying": False},
                        tensors=drop("transformer.wte")), "adapts lm_head but not transformer.wte (untied)"),
    ("head differs", dict(source="peft_wte", tensors=with_value(WTE_KEYS[3], lambda a: a * 1.5)),
     "'base_model.model.lm_head.lora_B.weight' is not 'base_model.model.transformer.wte.lora_embedding_A' transposed"),
    ("head's alpha differs", dict(source="peft_wte", cfg={"alpha_pattern": {"lm_head": 7}}),
     "alpha_pattern gives transformer.wte and lm_head"),
    ("tied but no head tensors", dict(source="peft_wte", tensors=drop("lm_head")),
     "targets lm_head but adapter_model.safetensors has no"),
    ("wrong vocabulary", dict(source="peft_wte", tensors=lambda t: {**t, WTE_KEYS[0]: t[WTE_KEYS[0]][:, :50],
                                                                    WTE_KEYS[3]: t[WTE_KEYS[3]][:50]}),
     "n_vocab=96 imply (3, 96)"),
]


@pytest.mark.parametrize("edit, message", [b[1:] for b in BAD + BAD_WTE], ids=[b[0] for b in BAD + BAD_WTE])
def test_bad_peft_folder(tmp_path, edit, message):
    folder = peft_copy(tmp_path, **edit)
    with pytest.raises(Npgpt2Error) as e:
        af.read_peft_adapter(folder, TINY_HP)
    msg = one_line(e)
    assert message in msg
    assert str(folder) in msg  # names the file (or folder) at fault


