"""`model.params`: the parameter arrays by TF name, a mapping you can assign into.

`model.params[name] = array` (and so `model.params[name] *= 2`) writes the new values into
the existing array, in place: the block views (`model.blocks[i]`), an optimizer holding the
array and the KV-cache-free forward all see them at once. The shape must be the same and
the values castable to the model's dtype; anything else fails with one line *before*
anything changes. Names cannot be added or removed (use `GPT2.set_params` for a new set).
"""
from collections.abc import Mapping

import numpy as np

from .errors import Npgpt2Error
from .quant import QuantizedWeight


class ParamMap(Mapping):
    """{TF name: array} of one model; item assignment copies into the existing array."""

    def __init__(self, params, dtype):
        self._params, self._dtype = params, np.dtype(dtype)

    def __getitem__(self, name):
        return self._params[name]

    def __iter__(self):
        return iter(self._params)

    def __len__(self):
        return len(self._params)

    def __repr__(self):
        return "ParamMap({" + ", ".join(f"{k!r}: {getattr(v, 'shape', '?')}" for k, v in self._params.items()) + "})"

    def __setitem__(self, name, value):
        if name not in self._params:
            raise Npgpt2Error(f"params[{name!r}]: no such parameter (the names are fixed; set_params replaces all)")
        old = self._params[name]
        if value is old:  # `params[name] *= 2` already changed the array in place
            return
        if isinstance(old, QuantizedWeight) or isinstance(value, QuantizedWeight):
            raise Npgpt2Error(f"params[{name!r}]: an int8 weight cannot be assigned; load the model as float32")
        new = np.asarray(value)
        if new.shape != old.shape:
            raise Npgpt2Error(f"params[{name!r}]: shape {new.shape} does not match {old.shape}")
        if not np.can_cast(new.dtype, self._dtype, casting="same_kind"):
            raise Npgpt2Error(f"params[{name!r}]: dtype {new.dtype} cannot become the model's {self._dtype}")
        if not old.flags.writeable:  # a memory-mapped checkpoint: a new array, nothing else changes
            raise Npgpt2Error(f"params[{name!r}]: the array is read-only (a memory-mapped checkpoint); "
                              f"load the model with mmap=False to change its weights")
        np.copyto(old, new, casting="same_kind")

    def __delitem__(self, name):
        raise Npgpt2Error(f"params[{name!r}]: parameters cannot be removed")
