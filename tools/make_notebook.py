"""Make WALKTHROUGH.ipynb from WALKTHROUGH.md: one source, the notebook is never edited by hand.

    python tools/make_notebook.py            # writes WALKTHROUGH.ipynb next to WALKTHROUGH.md
    python tools/make_notebook.py --check    # exit 1 if the committed notebook is not what this makes

Each ```python block becomes a code cell; the text between them becomes markdown cells, split
at every heading so the notebook's outline is the walkthrough's. No outputs are stored (CI runs
the notebook: tests/test_notebook.py), and the bytes depend on WALKTHROUGH.md alone (cell ids are
numbered, keys sorted), so tests/test_notebook.py can hold the committed file equal to a fresh one.
"""
import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE, TARGET = ROOT / "WALKTHROUGH.md", ROOT / "WALKTHROUGH.ipynb"
FENCE = re.compile(r"^```python\n(.*?)^```\n?", flags=re.DOTALL | re.MULTILINE)
HEADING = re.compile(r"^(?=#{1,3} )", flags=re.MULTILINE)
NOTE = ("*This notebook is made from `WALKTHROUGH.md` by `tools/make_notebook.py`; edit that file, "
        "not this one. Run it from the repository's root (where it lies): the code opens files by "
        "paths relative to it.*")


def split(text):
    """WALKTHROUGH.md's text -> [(kind, source)], kind "markdown" or "code", in order."""
    cells, at = [], 0
    for m in FENCE.finditer(text):
        cells += [("markdown", part) for part in _markdown_parts(text[at:m.start()])]
        cells.append(("code", m.group(1).rstrip("\n")))
        at = m.end()
    cells += [("markdown", part) for part in _markdown_parts(text[at:])]
    return cells


def _markdown_parts(text):
    """Prose between two code blocks, cut before each heading; empty parts dropped."""
    return [part.strip("\n") for part in HEADING.split(text) if part.strip()]


def notebook(text):
    """The notebook (nbformat 4.5) as a dict."""
    cells = [{"cell_type": "markdown", "id": "note", "metadata": {}, "source": _lines(NOTE)}]
    for i, (kind, source) in enumerate(split(text)):
        cell = {"cell_type": kind, "id": f"cell-{i:03d}", "metadata": {}, "source": _lines(source)}
        if kind == "code":
            cell.update(execution_count=None, outputs=[])
        cells.append(cell)
    return {"cells": cells, "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python",
                                                        "name": "python3"},
                                         "language_info": {"name": "python"}},
            "nbformat": 4, "nbformat_minor": 5}


def _lines(source):
    """Jupyter's form of a cell's text: a list of lines, each but the last ending in a newline."""
    return source.splitlines(keepends=True)


def render(text):
    """The notebook file's exact text (the form Jupyter itself writes: one-space indent, sorted keys)."""
    return json.dumps(notebook(text), indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="only compare with the committed notebook")
    args = parser.parse_args(argv)
    fresh = render(SOURCE.read_text(encoding="utf-8"))
    if args.check:
        same = TARGET.is_file() and TARGET.read_text(encoding="utf-8") == fresh
        if not same:
            print(f"{TARGET.name} is not made from {SOURCE.name}: run python tools/make_notebook.py", file=sys.stderr)
        return 0 if same else 1
    with open(TARGET, "w", encoding="utf-8", newline="\n") as f:  # the same bytes on every system
        f.write(fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
