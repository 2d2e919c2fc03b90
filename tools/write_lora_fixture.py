"""Write tests/fixtures/lora/npgpt2_written/ and npgpt2_written_wte/: adapter folders made by npgpt2's
write_peft_adapter, for the "ours loads in peft" check (the second adapts the tied wte too). Runs with the
package's Python (not the fixture venv):

    PYTHONPATH=. python3 tools/write_lora_fixture.py
    /opt/fixenv/bin/python tools/make_fixtures.py lora_ours lora_wte_ours   # peft loads them, records logits

The adapter arrays are seeded random inputs (not expected values), kept in
npgpt2_written_input.npz so the test rebuilds the same LoraAdapters, writes them again and compares
the files byte for byte; peft's logits for the committed folder are the reference.
"""
import json
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from npgpt2.adapter_files import write_peft_adapter  # noqa: E402
from npgpt2.lora import LoraAdapters, LoraConfig, adapted_modules, matrix_shapes, module_prefix  # noqa: E402

LORA = ROOT / "tests" / "fixtures" / "lora"
SEED = 18
# other choices than the peft-made fixture: two targets, r 3, alpha 5, one rank and one alpha exception
CONFIG = {"r": 3, "alpha": 5.0, "targets": ["attn.c_attn", "mlp.c_proj"],
          "rank_pattern": {"model/h1/mlp/c_proj": 2}, "alpha_pattern": {"model/h0/attn/c_attn": 7.0}}
# the wte folder: r 2, alpha 3 on attn.c_proj and the tied token embedding / output head
CONFIG_WTE = {"r": 2, "alpha": 3.0, "targets": ["attn.c_proj", "wte"], "rank_pattern": {}, "alpha_pattern": {}}
BASE_NAME = "tests/fixtures/hf_tiny"  # the same tiny model as tests/fixtures/tiny, in HF's layout


def write(hp, spec, name, seed):
    """Seeded N(0, 0.15) adapters for `spec` written as LORA/name/ (+ name_input.npz, the inputs)."""
    dims = matrix_shapes(hp)
    config = LoraConfig(r=spec["r"], alpha=spec["alpha"], targets=tuple(spec["targets"]),
                        rank_pattern=dict(spec["rank_pattern"]), alpha_pattern=dict(spec["alpha_pattern"]))
    rng = np.random.default_rng(seed)
    params = {}
    for i, t in adapted_modules(hp["n_layer"], config.targets):
        c_in, c_out = dims[t]
        r = config.rank(i, t)
        params[module_prefix(i, t) + "/lora_A"] = rng.normal(0.0, 0.15, (c_in, r)).astype(np.float32)
        params[module_prefix(i, t) + "/lora_B"] = rng.normal(0.0, 0.15, (r, c_out)).astype(np.float32)
    folder = LORA / name
    if folder.exists():
        shutil.rmtree(folder)
    write_peft_adapter(LoraAdapters(config=config, params=params), folder, base_name=BASE_NAME)
    np.savez_compressed(LORA / f"{name}_input.npz", config=np.array(json.dumps(spec)),
                        base_name=np.array(BASE_NAME), **params)
    print(f"wrote {folder} and {name}_input.npz")


def main():
    hp = json.loads((ROOT / "tests" / "fixtures" / "tiny" / "hparams.json").read_text())
    write(hp, CONFIG, "npgpt2_written", SEED)
    write(hp, CONFIG_WTE, "npgpt2_written_wte", SEED + 1)
    print("now run: /opt/fixenv/bin/python tools/make_fixtures.py lora_ours lora_wte_ours")


if __name__ == "__main__":
    main()
