"""Exercises that grade themselves: `npgpt2 exercise list | show NAME [--hint] | check NAME FILE`.

A "write" exercise asks for a function with the name and signature of the package function it
re-implements (layernorm_backward, attention_backward, an AdamW step, one BPE merge round, ...);
`check` imports the learner's FILE, runs the function on seeded shapes (edge cases first; --seed
draws other shapes) and compares it with central finite differences (gradcheck.numeric_grad)
and with the package's own function, naming the case that failed, the output, the worst entry
and by how much. A "break" exercise asks for a copy of a package function with one given mistake
and the letter of its symptom (breakit.py).

    ex, cases = check("layernorm_backward", "my_layernorm.py")
    print(format_check(ex, cases, "my_layernorm.py"))
"""
import importlib.util
import sys
from pathlib import Path

from ..errors import Npgpt2Error
from .catalog import BY_NAME, EXERCISES
from .grading import Case

__all__ = ["BY_NAME", "EXERCISES", "Case", "check", "format_check", "format_list", "get", "load_answer", "show"]


def get(name):
    """The Exercise called `name`, or a one-line Npgpt2Error listing the names."""
    if name not in BY_NAME:
        raise Npgpt2Error(f"exercise {name!r}: unknown (one of: {', '.join(BY_NAME)})")
    return BY_NAME[name]


def format_list():
    """One line per exercise: name, kind and title."""
    width = max(len(e.name) for e in EXERCISES)
    lines = [f"  {e.name:<{width}}  {e.kind:<5}  {e.title}" for e in EXERCISES]
    return "\n".join(["Exercises (npgpt2 exercise show NAME; check NAME FILE):"] + lines)


def show(name, hint=False):
    """The task, a starter to copy into a file, how to check it; the hints when asked."""
    e = get(name)
    out = [f"{e.name}: {e.title}", "", e.task, "",
           f"Write it in a file of your own (this starter is a beginning), defining `{e.function}`:", "",
           e.starter, f"Check it:  npgpt2 exercise check {e.name} YOUR_FILE.py"]
    if hint:
        out += [""] + [f"Hint {i}: {h}" for i, h in enumerate(e.hints, 1)]
    else:
        out.append(f"Stuck?     npgpt2 exercise show {e.name} --hint")
    return "\n".join(out)


def load_answer(path, function, exercise="NAME"):
    """Import the learner's file and return it as a module; one-line Npgpt2Error naming the
    file when it is missing, does not compile, fails on import or lacks `function`."""
    path = Path(path)
    if not path.is_file():
        raise Npgpt2Error(f"{path}: no such file")
    name = f"_npgpt2_answer_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None:
        raise Npgpt2Error(f"{path}: not a Python file (name it .py)")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look a module up by name
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise Npgpt2Error(f"{path}: line {e.lineno}: {e.msg}") from None
    except Exception as e:  # whatever the learner's module does at import
        raise Npgpt2Error(f"{path}: importing it raised {type(e).__name__}: {e}") from None
    finally:
        sys.modules.pop(name, None)
    if not callable(getattr(module, function, None)):
        raise Npgpt2Error(f"{path}: defines no function {function}() (the exercise's function; "
                          f"the starter is in: npgpt2 exercise show {exercise})")
    return module


def check(name, path, seed=0):
    """Grade the learner's file for exercise `name` -> (Exercise, [Case])."""
    e = get(name)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise Npgpt2Error(f"--seed must be an integer >= 0, got {seed!r}")
    module = load_answer(path, e.function, e.name)
    return e, e.grade(module, seed)


def format_check(exercise, cases, path):
    """The result as lines: PASS/FAIL per case with the detail, then a summary."""
    out = [f"{exercise.name}: {exercise.function}() in {path}, {len(cases)} cases"]
    for c in cases:
        out.append(f"  {'PASS' if c.ok else 'FAIL'} {c.label}: {c.detail}")
    passed = sum(c.ok for c in cases)
    if passed == len(cases):
        out.append(f"All {len(cases)} cases passed.")
    else:
        out.append(f"{passed} of {len(cases)} cases passed. Hints: npgpt2 exercise show {exercise.name} --hint")
    return "\n".join(out)
