"""Write tests/fixtures/lora/npgpt2_written/: an adapter folder made by npgpt2's write_peft_adapter,
for the "ours loads in peft" check. Runs with the package's Python (not the fixture venv):

    PYTHONPATH=. python3 tools/write_lora_fixture.py
    /opt/fixenv/bin/python tools/make_fixtures.py lora_ours    # peft loads it, records its logits

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
from npgpt2.lora import LoraAdapters, LoraConfig, module_prefix  # noqa: E402

LORA = ROOT / "tests" / "fixtures" / "lora"
SEED = 18
# other choices than the peft-made fixture: two targets, r 3, alpha 5, one rank and one alpha exception
CONFIG = {"r": 3, "alpha": 5.0, "targets": ["attn.c_attn", "mlp.c_proj"],
          "rank_pattern": {"model/h1/mlp/c_proj": 2}, "alpha_pattern": {"model/h0/attn/c_attn": 7.0}}
BASE_NAME = "tests/fixtures/hf_tiny"  # the same tiny model as tests/fixtures/tiny, in HF's layout


def main():
    hp = json.loads((ROOT / "tests" / "fixtures" / "tiny" / "hparams.json").read_text())
    C = hp["n_embd"]
    dims = {"attn.c_attn": (C, 3 * C), "mlp.c_proj": (4 * C, C)}
    config = LoraConfig(r=CONFIG["r"], alpha=CONFIG["alpha"], targets=tuple(CONFIG["targets"]),
                        rank_pattern=dict(CONFIG["rank_pattern"]), alpha_pattern=dict(CONFIG["alpha_pattern"]))
    rng = np.random.default_rng(SEED)
    params = {}
    for i in range(hp["n_layer"]):
        for t in config.targets:
            c_in, c_out = dims[t]
            r = config.rank(i, t)
            params[module_prefix(i, t) + "/lora_A"] = rng.normal(0.0, 0.15, (c_in, r)).astype(np.float32)
            params[module_prefix(i, t) + "/lora_B"] = rng.normal(0.0, 0.15, (r, c_out)).astype(np.float32)
    folder = LORA / "npgpt2_written"
    if folder.exists():
        shutil.rmtree(folder)
    write_peft_adapter(LoraAdapters(config=config, params=params), folder, base_name=BASE_NAME)
    np.savez_compressed(LORA / "npgpt2_written_input.npz", config=np.array(json.dumps(CONFIG)),
                        base_name=np.array(BASE_NAME), **params)
    print(f"wrote {folder} and npgpt2_written_input.npz; now run: "
          f"/opt/fixenv/bin/python tools/make_fixtures.py lora_ours")


if __name__ == "__main__":
    main()
