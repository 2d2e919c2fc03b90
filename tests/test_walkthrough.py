"""WALKTHROUGH.md cannot rot: every ```python block in it runs, in order, in one namespace.

The blocks carry their own asserts (shapes, the hand-derived gradients against finite
differences, the step-by-step forward against model.run_with_cache, the sizing table against
param_shapes and 124,439,808), so a change that makes the text wrong fails here.
"""
import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "WALKTHROUGH.md"


def python_blocks(text):
    """The bodies of the ```python fences, in order, with the line each starts on."""
    blocks = []
    for m in re.finditer(r"^```python\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE):
        blocks.append((text.count("\n", 0, m.start()) + 2, m.group(1)))
    return blocks


def test_python_blocks_are_found():
    blocks = python_blocks("x\n```python\na = 1\n```\n```bash\nnot python\n```\n```python\nb = 2\n```\n")
    assert blocks == [(3, "a = 1\n"), (9, "b = 2\n")]


def test_every_block_runs(monkeypatch, capsys):
    blocks = python_blocks(DOC.read_text(encoding="utf-8"))
    assert len(blocks) >= 20, "the walkthrough lost its code"
    monkeypatch.chdir(ROOT)  # the blocks name files relative to the repository
    monkeypatch.setenv("NPGPT2_PLAIN", os.environ.get("NPGPT2_PLAIN", "1"))
    namespace = {"__name__": "walkthrough"}
    for line, code in blocks:
        try:
            exec(compile(code, f"WALKTHROUGH.md:{line}", "exec"), namespace)
        except Exception as e:  # name the block; the chained traceback shows the line in it
            raise AssertionError(f"WALKTHROUGH.md: the block at line {line} failed: {type(e).__name__}: {e}") from e
    out = capsys.readouterr().out
    assert "layers.py: attention_forward" in out  # the blocks print where each step lives

    # the sizing table written in the text is the one the sizing block computed
    written = [line.strip("|").split("|") for line in DOC.read_text(encoding="utf-8").splitlines()
               if re.match(r"^\| \d+M \|", line)]
    assert len(written) == len(namespace["rows"]) == 4
    for cells, (name, n, params, fwd, flops) in zip(written, namespace["rows"]):
        cells = [c.strip() for c in cells]
        assert cells == [name, f"{n:,}", f"{(params['wte'] + params['wpe']) / n:.1%}",
                         f"{params['attn'] / n:.1%}", f"{params['mlp'] / n:.1%}", f"{fwd / 1e9:.3f}",
                         f"{flops['attn'] / fwd:.1%}", f"{flops['mlp'] / fwd:.1%}", f"{flops['head'] / fwd:.1%}",
                         f"{3 * fwd / 1e9:.3f}"], name


def test_every_pointer_names_a_real_function():
    """`layers.py: layernorm_forward`, `model.py: GPT2._head`, ...: each `file.py: name` the text
    or a block's output points to is defined in that file (a rename cannot leave a stale pointer)."""
    refs = set(re.findall(r"([a-z_0-9]+\.py): ([A-Za-z_][A-Za-z_0-9.]*)", DOC.read_text(encoding="utf-8")))
    assert len(refs) >= 20
    for file, name in sorted(refs):
        source = (ROOT / "npgpt2" / file).read_text(encoding="utf-8")
        last = re.escape(name.split(".")[-1])
        assert re.search(rf"^\s*(def|class) {last}\b|^{last}\s*=", source, re.M), f"{file}: {name}"


def test_blocks_can_be_pasted_into_the_python_prompt(monkeypatch, capsys):
    """The text says: paste the blocks into `python3`. The interactive prompt (before Python
    3.13) ends an indented block only at a blank line, so a loop followed directly by more code
    is a SyntaxError there, though it runs as a file. Fed line by line to code.InteractiveConsole
    (what the prompt runs), no block may fail to compile. The statements are compiled as the
    prompt compiles them but not run (runcode is a no-op): test_every_block_runs and
    tests/test_notebook.py run the code, and a third run would only add time."""
    import code

    def console_failures(blocks):
        console = code.InteractiveConsole({"__name__": "__console__"})
        console.runcode = lambda compiled: None  # compile each statement as the prompt does; run nothing
        failures = []
        console.write = failures.append  # syntax errors go here
        for line, block in blocks:
            for text in block.split("\n") + [""]:
                console.push(text)
            if failures:
                return line, "".join(failures)
        return None

    # the check can fail: a loop followed directly by code is refused at the prompt
    assert console_failures([(1, "for i in range(2):\n    pass\nx = 1\n")])[0] == 1
    assert console_failures([(1, "for i in range(2):\n    pass\n\nx = 1\n")]) is None
    failed = console_failures(python_blocks(DOC.read_text(encoding="utf-8")))
    assert failed is None, "WALKTHROUGH.md: the block at line {} fails at the prompt: {}".format(*failed)
    capsys.readouterr()


def test_every_link_inside_the_text_names_a_heading():
    """The contents line and the cross-references link to headings by GitHub's anchors
    (lower case, punctuation dropped, spaces to hyphens): each must exist."""
    text = DOC.read_text(encoding="utf-8")
    anchors = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
               for h in re.findall(r"^#+ (.*)$", re.sub(r"^```.*?^```", "", text, flags=re.S | re.M), re.M)}
    links = re.findall(r"\]\(#([^)]+)\)", text)
    assert len(links) >= 8
    assert sorted(set(links) - anchors) == []
