"""README.md's Python API blocks run as pasted (issue 22, item 9: `inputs`, `targets` and
`tokens` were undefined). They name `weights/124M`, which CI cannot download, so the test
points that path at the committed full-vocabulary test model and runs every block of the
section, in order, in one namespace, from an empty folder."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FULL = ROOT / "tests" / "fixtures" / "full"


def api_blocks():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Python API"):text.index("## Speed and memory")]
    return re.findall(r"^```python\n(.*?)^```", section, flags=re.DOTALL | re.MULTILINE)


def test_the_api_blocks_run_as_pasted(tmp_path, monkeypatch, capsys):
    import code
    blocks = api_blocks()
    assert len(blocks) == 2 and all("weights/124M" in b or "model." in b for b in blocks)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NPGPT2_PLAIN", "1")
    console = code.InteractiveConsole({"__name__": "__console__"})  # what the python3 prompt runs
    failures = []
    console.write = failures.append
    for block in blocks:
        for line in block.replace('"weights/124M"', repr(str(FULL))).split("\n") + [""]:
            console.push(line)
        assert not failures, "".join(failures)
    ns = console.locals
    assert ns["grads"].keys() == ns["model"].params.keys()
    assert ns["grad"].shape == (len(ns["ids"]), ns["model"].hparams["n_embd"])
    assert (tmp_path / "my-model" / "checkpoint").is_file()
    capsys.readouterr()
