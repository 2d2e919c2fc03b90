"""Regenerate benchmarks/data/devil.txt.gz from Debian's dict-devil package.

    apt-get download dict-devil && dpkg-deb -x dict-devil_*.deb dx
    python tools/extract_devil.py dx/usr/share/dictd > benchmarks/data/devil.txt.gz

Ambrose Bierce's *The Devil's Dictionary* (1881-1906; the 1911 edition, "A Public Domain
Text, Copyright Expired", Debian's copyright file) is the second corpus of the LoRA quality
row (benchmarks/run.py lora_quality): a base trained on the Jargon File is fine-tuned on it.
The dictd index lists `headword<TAB>offset<TAB>length`, offsets in dictd's base64 digits
(as tools/extract_jargon.py reads). Each entry becomes one paragraph group: its paragraphs
(the definition, the verses quoted under it) each on one line with whitespace folded,
entries separated by a blank line. The 00-database entries (the header, the preface's
notice) are left out.
"""
import gzip
import re
import sys

from dictd import dictd_entries


def main(folder):
    entries = []
    for _, body in dictd_entries(folder, "devil"):
        paragraphs = [re.sub(r"\s+", " ", p).strip() for p in re.split(r"\n\s*\n", body)]
        text = "\n".join(p for p in paragraphs if p)
        if text:
            entries.append(text)
    out = "\n\n".join(entries) + "\n"
    sys.stdout.buffer.write(gzip.compress(out.encode("utf-8"), mtime=0))


if __name__ == "__main__":
    main(sys.argv[1])
