"""WALKTHROUGH.ipynb is WALKTHROUGH.md as a notebook, made by tools/make_notebook.py, and it runs.

The committed notebook must be byte-equal to what the script makes from the committed text
(so the two cannot drift), and it is executed here, cell by cell, by a real Jupyter kernel
(nbclient + ipykernel) of this same Python, from the repository's root: what a learner who
opens it in Jupyter gets. tests/test_walkthrough.py runs the same code as plain Python with a
per-block report; this file proves the notebook form works.
"""
import json
import os
import sys
from pathlib import Path

import pytest
import tool_module

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "WALKTHROUGH.ipynb"


def load_tool():
    return tool_module.load_tool("make_notebook")


def test_split_into_cells():
    tool = load_tool()
    text = ("# Title\n\nIntro.\n\n## 1. One\n\nText.\n\n```python\na = 1\n\nb = 2\n```\n\n"
            "```bash\nnot python\n```\n### 1.1 Sub\n\n```python\nc = 3\n```\nEnd.\n")
    assert tool.split(text) == [("markdown", "# Title\n\nIntro."), ("markdown", "## 1. One\n\nText."),
                                ("code", "a = 1\n\nb = 2"), ("markdown", "```bash\nnot python\n```"),
                                ("markdown", "### 1.1 Sub"), ("code", "c = 3"), ("markdown", "End.")]
    nb = json.loads(tool.render(text))
    assert [c["cell_type"] for c in nb["cells"]] == ["markdown"] * 3 + ["code"] + ["markdown"] * 2 + ["code", "markdown"]
    assert nb["cells"][3]["source"] == ["a = 1\n", "\n", "b = 2"] and nb["cells"][3]["outputs"] == []
    assert len({c["id"] for c in nb["cells"]}) == len(nb["cells"])


def test_committed_notebook_is_made_from_the_walkthrough():
    tool = load_tool()
    fresh = tool.render((ROOT / "WALKTHROUGH.md").read_text(encoding="utf-8"))
    assert NOTEBOOK.read_bytes() == fresh.encode("utf-8"), \
        "WALKTHROUGH.ipynb differs from WALKTHROUGH.md: run python tools/make_notebook.py"
    # every code block of the text is a code cell, in order (nothing lost in the split)
    import re
    blocks = re.findall(r"^```python\n(.*?)^```", (ROOT / "WALKTHROUGH.md").read_text(encoding="utf-8"),
                        flags=re.DOTALL | re.MULTILINE)
    cells = ["".join(c["source"]) for c in json.loads(fresh)["cells"] if c["cell_type"] == "code"]
    assert cells == [b.rstrip("\n") for b in blocks]


def kernel_modules():
    """nbclient and nbformat (and ipykernel importable), or a skip; a failure under CI, whose
    install step (.ci/run: pip install -e ".[test,...]") provides them."""
    try:
        import ipykernel  # noqa: F401
        import nbclient
        import nbformat
    except ImportError as e:
        if os.environ.get("CI") and sys.version_info >= (3, 11):  # the test extra's ipykernel needs 3.11
            raise AssertionError(f"{e}: CI installs the test extra (nbclient, ipykernel, nbformat)") from e
        pytest.skip(f"{e.name} is not installed (pip install -e '.[test]')")
    return nbclient, nbformat


def test_notebook_runs_in_a_kernel(tmp_path, monkeypatch):
    nbclient, nbformat = kernel_modules()
    # a kernel spec naming this very interpreter, so the kernel imports what the tests import
    spec_dir = tmp_path / "kernels" / "npgpt2-test"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "npgpt2 test", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    monkeypatch.setenv("NPGPT2_PLAIN", os.environ.get("NPGPT2_PLAIN", "1"))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    n_code = sum(c.cell_type == "code" for c in nb.cells)
    probe = nbformat.v4.new_code_cell("import sys, npgpt2\nprint(sys.executable)\nprint(npgpt2.__file__)")
    nb.cells.insert(0, probe)
    client = nbclient.NotebookClient(nb, kernel_name="npgpt2-test", timeout=300,
                                     resources={"metadata": {"path": str(ROOT)}})
    client.execute()  # raises CellExecutionError, naming the cell, if any cell fails
    executable, package = nb.cells[0].outputs[0]["text"].splitlines()
    assert Path(executable).resolve() == Path(sys.executable).resolve()
    assert Path(package).resolve().parent == (ROOT / "npgpt2").resolve()
    ran = [c for c in nb.cells[1:] if c.cell_type == "code" and c.execution_count]
    assert len(ran) == n_code
    text = "".join(o.get("text", "") for c in ran for o in c.outputs)
    assert "layers.py: attention_forward" in text and "induction head: layer" in text
