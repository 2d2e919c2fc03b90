"""The pictures WALKTHROUGH.md shows are the ones tools/make_pictures.py draws.

Every image the walkthrough links exists and is made by the script; the script, run again into
a temporary folder, writes the committed files byte for byte (the diagrams are fixed text; the
trained-model pictures come from the shipped weights, with their numbers rounded before they
become colours or labels). A retrained example model therefore fails here until the pictures
are redrawn: `python tools/make_pictures.py`.
"""
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import tool_module

ROOT = Path(__file__).resolve().parent.parent
IMG = ROOT / "docs" / "img"


def load_tool():
    return tool_module.load_tool("make_pictures")


def linked_images():
    return re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", (ROOT / "WALKTHROUGH.md").read_text(encoding="utf-8"))


def test_every_linked_image_exists_and_is_drawn_by_the_script():
    links = linked_images()
    assert len(links) >= 7
    committed = sorted(p.name for p in IMG.glob("*.svg"))
    assert sorted({Path(link).name for link in links}) == committed  # each drawn picture is shown, and only those
    for link in links:
        path = ROOT / link
        assert path.is_file(), link
        root = ET.parse(path).getroot()  # well-formed XML, an <svg> with a size
        assert root.tag == "{http://www.w3.org/2000/svg}svg" and int(root.get("width")) > 0, link


def test_script_redraws_the_committed_pictures(tmp_path, monkeypatch):
    monkeypatch.setenv("NPGPT2_PLAIN", "1")
    tool = load_tool()
    assert tool.main(["--out", str(tmp_path)]) == 0
    made = sorted(p.name for p in tmp_path.iterdir())
    assert made == sorted(p.name for p in IMG.glob("*.svg"))
    for name in made:
        assert (tmp_path / name).read_bytes() == (IMG / name).read_bytes(), \
            f"docs/img/{name} is not what tools/make_pictures.py draws now: run python tools/make_pictures.py"


def test_heads_are_found_by_score_not_by_index():
    import numpy as np
    tool = load_tool()
    period, T = 5, 10
    pattern = np.zeros((1, 3, T, T))
    pattern[0, :, np.arange(T), np.arange(T)] = 1.0                  # every head attends to itself...
    pattern[0, 2, np.arange(1, T), np.arange(T - 1)] = 1.0            # ...except head 2: the previous token
    pattern[0, 2, np.arange(1, T), np.arange(1, T)] = 0.0
    induction = np.zeros((1, 3, T, T))
    induction[0, :, np.arange(T), np.arange(T)] = 1.0
    t = np.arange(period, T)
    induction[0, 1, t, t] = 0.0
    induction[0, 1, t, t - period + 1] = 1.0                          # head 1: the textbook induction head
    acts = {"h0.attn.pattern": pattern, "h1.attn.pattern": induction}
    prev, (offset, head, score), last = tool.find_heads(acts, period)
    assert (prev, offset, head, last) == (2, 1, 1, 1) and score == 1.0
