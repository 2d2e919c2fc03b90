"""What every exercise checker shares: calling the learner's function without letting it crash
the checker, comparing its answer with a reference (saying where and by how much it differs),
finite differences on sampled entries, and the seeded case shapes.

A check is a list of `Case(label, ok, detail)`: one per input the function was tried on.
"""
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..gradcheck import LAYER_TOL, numeric_grad, rel_error

FD_TOL = LAYER_TOL   # against central differences (gradcheck.py says why 1e-6)
REF_TOL = 1e-9       # against the package's own float64 layer: only roundoff may differ
FD_ENTRIES = 12      # sampled entries per tensor for finite differences
# A gradient that is 0 in exact arithmetic (layernorm over C = 2 channels: its output is +-1
# whatever the input) comes out ~1e-8 from both sides, and its relative error is noise: such
# gradients are compared against FD_FLOOR instead of their own size. Inputs and upstream
# gradients are O(1), so a real mistake moves a gradient by far more than 1e-4 * 1e-6.
FD_FLOOR = 1e-4


@dataclass
class Case:
    """One input the learner's function was tried on: `label` names it (and its shapes),
    `detail` says what was wrong (or, when ok, how close it came)."""
    label: str
    ok: bool
    detail: str = ""


class LearnerError(Exception):
    """The learner's function raised or returned something unusable: the message says what."""


def call(fn, *args, copy=True):
    """fn(*args), with copies of the array arguments unless copy=False (a function that works
    in place); an exception becomes a LearnerError naming it and the learner's line."""
    args = [a.copy() if copy and isinstance(a, np.ndarray) else a for a in args]
    try:
        return fn(*args)
    except Exception as e:  # anything the learner's code raises is reported, not a crash
        where = _learner_line(e, fn)
        raise LearnerError(f"your {fn.__name__} raised {type(e).__name__}: {e}{where}") from None


def _learner_line(exc, fn):
    code = getattr(fn, "__code__", None)
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if code and f.filename == code.co_filename]
    if not frames:
        return ""
    f = frames[-1]
    return f" (at {Path(f.filename).name} line {f.lineno}: {f.line})"


def unpack(result, n, names):
    """result as a tuple of n values (n > 1) or the one value, else a LearnerError."""
    if n == 1:
        return result
    if not isinstance(result, (tuple, list)) or len(result) != n:
        got = f"a {type(result).__name__}" + (f" of {len(result)}" if isinstance(result, (tuple, list)) else "")
        raise LearnerError(f"should return {n} values ({', '.join(names)}), returned {got}")
    return tuple(result)


def as_array(name, got, shape):
    """got as a float64 array of `shape`, else a LearnerError saying what it is instead."""
    if got is None:
        raise LearnerError(f"{name} is None (a missing return?)")
    try:
        arr = np.asarray(got, dtype=np.float64)
    except (TypeError, ValueError):
        raise LearnerError(f"{name} is a {type(got).__name__}, not an array of numbers") from None
    if arr.shape != tuple(shape):
        raise LearnerError(f"{name} has shape {arr.shape}, expected {tuple(shape)}")
    bad = np.argwhere(~np.isfinite(arr))
    if bad.size:
        i = tuple(int(j) for j in bad[0])
        raise LearnerError(f"{name} has {arr[i]} at {list(i)}")
    return arr


def mismatch(name, got, want, tol, against):
    """(relative error, None) when got matches want within tol, else (error, a message naming
    the worst entry: its index, the learner's value and the expected one)."""
    want = np.asarray(want, dtype=np.float64)
    got = as_array(name, got, want.shape)
    err = rel_error(want, got)
    if err <= tol:
        return err, None
    diff = np.abs(got - want)
    i = np.unravel_index(int(np.argmax(diff)), diff.shape) if diff.ndim else ()
    where = f"; worst at {[int(j) for j in i]}" if diff.ndim else ""
    return err, (f"{name} differs from {against}: relative error {err:.1e} (tolerance {tol:.0e}){where}: "
                 f"yours {got[i]:.6g}, expected {want[i]:.6g}")


def fd_mismatch(name, got, f, x, rng, tol=FD_TOL):
    """Compare got (an array shaped like x) with dL/dx by central differences of f() -> L at
    up to FD_ENTRIES sampled entries of x (x is nudged in place and restored)."""
    got = as_array(name, got, x.shape)
    n = min(FD_ENTRIES, x.size)
    flat = rng.choice(x.size, size=n, replace=False)
    entries = [np.unravel_index(int(i), x.shape) for i in flat]
    numeric = numeric_grad(f, x, entries=entries)
    mine = np.array([got[e] for e in entries])
    err = rel_error(numeric, mine, floor=FD_FLOOR)
    if err <= tol:
        return err, None
    k = int(np.argmax(np.abs(numeric - mine)))
    return err, (f"{name} differs from finite differences: relative error {err:.1e} (tolerance {tol:.0e}); "
                 f"worst at {[int(j) for j in entries[k]]}: yours {mine[k]:.6g}, finite differences "
                 f"{numeric[k]:.6g}")


def shapes(seed, fixed, make, n_random=4):
    """The fixed edge-case shapes, then n_random more drawn by make(rng) from a seeded rng."""
    rng = np.random.default_rng(seed)
    return list(fixed) + [make(rng) for _ in range(n_random)]


def run_cases(labels_and_checks):
    """[(label, check())] -> [Case]: check returns a passing detail or raises LearnerError."""
    out = []
    for label, check in labels_and_checks:
        try:
            out.append(Case(label, True, check()))
        except LearnerError as e:
            out.append(Case(label, False, str(e)))
    return out


def first_failure(errors):
    """[(err, message or None)] -> raise the first message, else a summary of the worst error."""
    for _, msg in errors:
        if msg:
            raise LearnerError(msg)
    return f"worst relative error {max(e for e, _ in errors):.1e}"
