"""Reading a dictd dictionary (Debian's dict-* packages), for tools/extract_jargon.py and
tools/extract_devil.py.

The index lists `headword<TAB>offset<TAB>length`, offset and length in dictd's base64 digits,
into the gzip-compressed .dict.dz; the 00-database entries are the header, not the text.
"""
import gzip
from pathlib import Path

B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def b64num(s):
    n = 0
    for ch in s:
        n = n * 64 + B64.index(ch)
    return n


def dictd_entries(folder, name):
    """(headword, body text) of each entry of folder/NAME.index, in index order."""
    folder = Path(folder)
    data = gzip.open(folder / f"{name}.dict.dz").read()
    for line in (folder / f"{name}.index").read_text("utf-8").splitlines():
        head, off, length = line.split("\t")
        if head.startswith("00-database") or head.startswith("00database"):
            continue
        yield head, data[b64num(off):b64num(off) + b64num(length)].decode("utf-8")
