"""Regenerate npgpt2/assets/jargon.txt.gz from Debian's dict-jargon package.

    apt-get download dict-jargon && dpkg-deb -x dict-jargon_*.deb jx
    python tools/extract_jargon.py jx/usr/share/dictd > npgpt2/assets/jargon.txt.gz

The dictd index lists `headword<TAB>offset<TAB>length`, offsets in dictd's base64
digits. Each entry becomes one paragraph "term: definition" with whitespace folded,
paragraphs separated by a blank line. The Jargon File 4.4.7 is in the public domain.
"""
import gzip
import re
import sys

from dictd import dictd_entries


def main(folder):
    entries = []
    for _, body in dictd_entries(folder, "jargon"):
        lines = body.split("\n")
        # first line repeats the headword, second is pronunciation/part of speech
        term = lines[0].strip()
        text = " ".join(line.strip() for line in lines[1:] if line.strip())
        text = re.sub(r"^//\s*", "", text)
        text = re.sub(r"\s+", " ", text).strip()
        if text:
            entries.append(f"{term}: {text}")
    out = "\n\n".join(entries) + "\n"
    sys.stdout.buffer.write(gzip.compress(out.encode("utf-8"), mtime=0))


if __name__ == "__main__":
    main(sys.argv[1])
