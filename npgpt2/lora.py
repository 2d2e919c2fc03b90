"""LoRA adapters: low-rank updates to a frozen GPT-2's matrices (Hu et al. 2021).

A target matrix W (C_in, C_out) of a block (one of TARGETS) is used as

    y = x @ W + b + scaling * (x @ A) @ B        A: (C_in, r), B: (r, C_out), scaling = alpha / r

W and b stay frozen; only A and B are trained. A starts random and B at zero, so the
adapted model starts equal to the base. Parameter names follow the base's TF names:
`model/h{i}/attn/c_attn/lora_A` (C, r) and `model/h{i}/attn/c_attn/lora_B` (r, 3C).

Hugging Face PEFT stores the same two matrices transposed (`lora_A.weight` (r, C_in),
`lora_B.weight` (C_out, r), GPT-2's Conv1D with fan_in_fan_out): A = lora_A.weight.T,
B = lora_B.weight.T (adapter_files.py reads and writes that layout).
"""
import dataclasses

import numpy as np

from .errors import Npgpt2Error

# a block's four matrices, as `--lora_targets` names them
TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def module_prefix(layer, target):
    """(3, "attn.c_attn") -> "model/h3/attn/c_attn": the TF name of the module whose /w is adapted."""
    return f"model/h{layer}/{target.replace('.', '/')}"


@dataclasses.dataclass
class LoraConfig:
    """r and alpha of every adapted matrix.

    targets: which of TARGETS carry adapters (in every layer). rank_pattern / alpha_pattern:
    exceptions keyed by module_prefix(layer, target), as PEFT's patterns resolve to.
    """
    r: int
    alpha: float
    targets: tuple = TARGETS
    rank_pattern: dict = dataclasses.field(default_factory=dict)
    alpha_pattern: dict = dataclasses.field(default_factory=dict)

    def rank(self, layer, target):
        return int(self.rank_pattern.get(module_prefix(layer, target), self.r))

    def scaling(self, layer, target):
        """alpha / r for this matrix (PEFT's `scaling`)."""
        return float(self.alpha_pattern.get(module_prefix(layer, target), self.alpha)) / self.rank(layer, target)

    def check(self):
        """Raise Npgpt2Error naming the flag for a rank, alpha or target out of range."""
        if isinstance(self.r, bool) or not isinstance(self.r, (int, np.integer)) or self.r < 1:
            raise Npgpt2Error(f"--lora must be a whole number >= 1, got {self.r!r}")
        if not np.isfinite(self.alpha) or self.alpha <= 0:
            raise Npgpt2Error(f"--lora_alpha must be a finite number > 0, got {self.alpha!r}")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise Npgpt2Error(f"--lora_targets: unknown target {unknown[0] if unknown else '(none given)'!r}; "
                              f"choose from {','.join(TARGETS)}")


@dataclasses.dataclass
class LoraAdapters:
    """A LoraConfig and its arrays {module_prefix + "/lora_A": (C_in, r), ... "/lora_B": (r, C_out)}."""
    config: LoraConfig
    params: dict
