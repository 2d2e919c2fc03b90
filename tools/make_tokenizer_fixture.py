"""Write tests/fixtures/tokenizer_cases.json.gz: GPT-2 token ids of tricky strings, computed by
independent tokenizers built from the two vocab files committed in npgpt2/assets/.

Run in the fixture venv (never in CI; npgpt2 and its tests never import these libraries):

    /opt/fixenv/bin/python tools/make_tokenizer_fixture.py

Known to work with tiktoken==0.14.0, tokenizers==0.22.2, transformers==4.57.6 (Python 3.11).

References, all built from npgpt2/assets/encoder.json + vocab.bpe (nothing is downloaded):
- tiktoken (Rust): `data_gym_to_mergeable_bpe_ranks` on the local files, GPT-2's pattern,
  `<|endoftext|>` = 50256. Its ids are the ones written.
- HF `tokenizers` (Rust, another BPE): a BPE model + ByteLevel pre-tokenizer from the same files.
- transformers' GPT2Tokenizer (Python) and GPT2TokenizerFast, also from the same files.
Every case must get the same ids from every reference, or this script fails without writing.

Output (gzip JSON): {"tiktoken": version, "vocab_sha256": {...}, "cases": [{"name", "text",
"allowed_special": bool, "ids": [int]}]}. With allowed_special, "<|endoftext|>" is token 50256;
without it, it is ordinary text.

Also tests/fixtures/tokenizer_long_chunks.json: long unbroken runs (where BPE used to be
quadratic), each a seeded random string `long_text(alphabet, chars, seed)` that the test
rebuilds, with the number of ids and the sha256 of the ids as little-endian uint32 (tiktoken's,
checked against HF `tokenizers`; transformers' Python GPT2Tokenizer is too slow on them).
`--long_only` writes only this file.
"""
import gzip
import hashlib
import json
import os
import random
import struct
import sys
from pathlib import Path

os.environ["TIKTOKEN_CACHE_DIR"] = ""  # read the committed files themselves, never a cached copy

import tiktoken  # noqa: E402
import tiktoken.load  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "npgpt2" / "assets"
OUT = ROOT / "tests" / "fixtures" / "tokenizer_cases.json.gz"
LONG_OUT = ROOT / "tests" / "fixtures" / "tokenizer_long_chunks.json"
# name, alphabet, characters, seed
LONG_CASES = [("letters 256k", "abcdefghijklmnopqrstuvwxyz", 262_144, 1),
              ("aaaab 64k", "aaaab", 65_536, 2),
              ("base64 64k", "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/", 65_536, 3),
              ("accents and cjk 32k", "éàßœ日本語", 32_768, 4)]
ENCODER, VOCAB = ASSETS / "encoder.json", ASSETS / "vocab.bpe"
SHA256 = {"encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
          "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"}
GPT2_PAT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOT = "<|endoftext|>"


def check_files():
    for p in (ENCODER, VOCAB):
        h = hashlib.sha256(p.read_bytes()).hexdigest()
        if h != SHA256[p.name]:
            sys.exit(f"{p}: sha256 {h} is not OpenAI's {SHA256[p.name]}")


def tiktoken_encoding():
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(str(VOCAB), str(ENCODER))
    return tiktoken.Encoding("gpt2-local", pat_str=GPT2_PAT, mergeable_ranks=ranks,
                             special_tokens={EOT: 50256})


def hf_references():
    """[(name, encode(text, allowed) -> ids)] for the HF tokenizers that are installed."""
    refs = []
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    except ImportError:
        print("tokenizers not installed: skipping that cross-check")
    else:
        def raw(with_special):
            t = Tokenizer(models.BPE.from_file(str(ENCODER), str(VOCAB)))
            t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
            t.decoder = decoders.ByteLevel()
            if with_special:
                t.add_special_tokens([EOT])
            return t
        plain, special = raw(False), raw(True)
        refs.append(("tokenizers.BPE", lambda s, allowed: (special if allowed else plain).encode(s).ids))
    try:
        from transformers import GPT2Tokenizer, GPT2TokenizerFast
    except ImportError:
        print("transformers not installed: skipping that cross-check")
    else:
        for cls in (GPT2Tokenizer, GPT2TokenizerFast):
            keep = cls(vocab_file=str(ENCODER), merges_file=str(VOCAB))
            split = cls(vocab_file=str(ENCODER), merges_file=str(VOCAB), split_special_tokens=True)
            refs.append((f"transformers.{cls.__name__}",
                         lambda s, allowed, k=keep, p=split: (k if allowed else p).encode(s)))
    return refs


def fixed_cases():
    """(name, text) pairs chosen to hit every branch of the pattern and the byte map."""
    c = [
        ("empty", ""),
        ("single space", " "),
        ("hello", "Hello world"),
        ("leading space", " Hello"),
        ("sentence", "The quick brown fox jumps over the lazy dog."),
        # contractions: the pattern is case-sensitive, so upper-case ones split differently
        ("contractions lower", "I'm sure you're right, they've said we'll go, he'd know, it's 'tis don't"),
        ("contractions upper", "I'M SURE YOU'RE RIGHT, THEY'VE SAID WE'LL GO, HE'D KNOW, IT'S DON'T"),
        ("contractions mixed", "Don't DON'T don'T DoN'T I'm I'M i'M 'S 's 'Re 're 'LL 'll"),
        ("apostrophe runs", "''s '''t rock'n'roll 'quoted' ' ' '"),
        ("curly apostrophe", "don’t it’s ‘quoted’ “double”"),
        ("numbers", "0 1 12 123 1234 12345 123456789 3.14159 -42 1e10 0x1F 1,000,000"),
        ("unicode numbers", "² ³ ½ ¾ Ⅻ ٣٤٥ ०१२ 一二三 ①②"),
        ("punctuation runs", "!!! ??? ... --- *** ### $$$ %%% ^^^ &&& ((())) [[]] {{}} <<>> ;;; ::: ~~~"),
        ("mixed punct", "Wait...what?!? (yes) [no] {maybe} <tag/> a@b.com http://x.y/z?q=1&r=2#f"),
        # whitespace runs: spaces, tabs, newlines, trailing, CRLF, NBSP, unicode spaces
        ("spaces 2", "a  b"),
        ("spaces many", "a          b"),
        ("trailing spaces", "end   "),
        ("only spaces", "     "),
        ("leading spaces", "   start"),
        ("tabs", "a\tb\t\tc\t\t\t d"),
        ("newlines", "line1\nline2\n\nline3\n\n\n\nline4\n"),
        ("crlf", "line1\r\nline2\r\n\r\nline3\r\n"),
        ("lone cr", "a\rb\r\rc"),
        ("space before newline", "a \nb  \n c \n\n d"),
        ("indent", "def f(x):\n    if x:\n        return 1\n    return 2\n"),
        ("nbsp", "a\u00a0b \u00a0c\u00a0\u00a0d"),
        ("unicode spaces", "a\u2009b\u3000c\u2003d\u202fe\u205ff\u2028g\u2029h\x85i"),
        ("vertical tab formfeed", "a\x0bb\x0cc\x1cd\x1fe"),
        ("control chars", "\x00\x01\x02\x07\x08\x1b[31mred\x1b[0m\x7f"),
        ("whitespace only mix", " \t\n \r\n\u00a0 \u3000 "),
        # scripts
        ("latin accents", "Café naïve façade Zürich Ærøskøbing żółć Đắk Lắk"),
        ("greek cyrillic", "Καλημέρα κόσμε. Привет, мир! Ελληνικά και Русский"),
        ("cjk", "日本語のテキストです。中文文本，还有한국어 텍스트。"),
        ("cjk spaced", "東京 大阪 京都 北京 上海"),
        ("arabic", "مرحبا بالعالم. هذا نص عربي مع أرقام ١٢٣."),
        ("hebrew", "שלום עולם, זה טקסט בעברית."),
        ("hindi", "नमस्ते दुनिया। यह हिंदी पाठ है।"),
        ("thai", "สวัสดีชาวโลก นี่คือข้อความภาษาไทย"),
        ("combining marks", "e\u0301 a\u0308 n\u0303o\u0302 Z\u0351\u036b\u0343\u036a\u0302 \u0301alone"),
        ("decomposed vs composed", "\u00e9 e\u0301 \u00c5 A\u030a"),
        # emoji: single, modifiers, flags, keycaps, ZWJ sequences, variation selectors
        ("emoji", "I ❤️ Python 🐍 and 🍕!"),
        ("emoji skin tones", "👍 👍🏻 👍🏿 👋🏽"),
        ("emoji zwj family", "👨‍👩‍👧‍👦 👩‍👩‍👧 🏳️‍🌈 🧑‍💻"),
        ("emoji flags", "🇺🇸🇬🇧🇯🇵 🇫🇷"),
        ("emoji keycap", "1️⃣ #️⃣ *️⃣"),
        ("emoji run", "😀😃😄😁😆😅😂🤣"),
        ("emoji long run", "😀" * 120),
        ("astral private run", "\U000f0000" * 120 + " \U000f0001" * 3),
        ("astral letters", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝐁𝐨𝐥𝐝 𐍈 𝟙𝟚𝟛"),
        ("symbols", "™ © ® ° ± × ÷ € £ ¥ § ¶ • … ← → ⇔ ∀ ∃ ∅ ∞ ≠ ≤ ≥ ⊕"),
        ("box drawing", "┌──┐\n│ab│\n└──┘"),
        ("soft hyphen zwsp", "co\u00adoperate zero\u200bwidth\u200d joiner\ufeffbom"),
        ("replacement char", "bad \ufffd byte"),
        ("private use", "\ue000\uf8ff \U000f0000"),
        # code
        ("python", "import numpy as np\n\nclass A(B):\n    def __init__(self, x=1):\n"
                   "        self.x = x  # comment\n        return None\n"),
        ("c code", "int main(int argc, char **argv) {\n\tprintf(\"%d\\n\", argc);\n\treturn 0;\n}\n"),
        ("json", '{"key": [1, 2.5, true, null], "nested": {"a": "b\\"c"}}'),
        ("html", "<div class=\"x\">Hello&nbsp;<b>world</b></div>"),
        ("url path", "https://example.com/a/b_c-d.e?f=g&h=%20#frag"),
        ("long word", "a" * 300),
        ("long digits", "9" * 200),
        ("long mixed token", "supercalifragilisticexpialidocious" * 8),
        ("long punct", "=" * 150 + "-" * 150),
        ("base64", "SGVsbG8gd29ybGQhIFRoaXMgaXMgYmFzZTY0IGVuY29kZWQgdGV4dC4=" * 3),
        ("hex", "deadbeef 0xDEADBEEF cafebabe 1234abcd"),
        # the special token as text (disallowed) — allowed variants are added below
        ("eot alone", EOT),
        ("eot in text", f"Hello{EOT}World {EOT} x\n{EOT}\n"),
        ("eot twice", EOT + EOT),
        ("eot partial", "<|endoftext| <|endoftext |endoftext|> <|endoftext|"),
        ("eot near spaces", f"  {EOT}  "),
    ]
    return c


def random_cases(n=400, seed=20240601):
    """Random strings over an alphabet of everything the pattern treats specially."""
    pools = [
        list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"),
        list("stredvlmSTREDVLM'''"),  # contraction letters and apostrophes, often
        list("0123456789²½٣"),
        list("!\"#$%&()*+,-./:;<=>?@[\\]^_`{|}~"),
        [" "] * 6 + list("\t\n\r\x0b\x0c\xa0\u2009\u3000\u2028\x85\x1c"),
        list("éüßçñøåÆŒĳ") + list("αβγδΩжщЯ") + list("日本語中文한국") + list("مرحبا") + list("नमस्ते"),
        ["\u0301", "\u0308", "\u200d", "\ufe0f", "\u200b", "\u00ad"],
        list("😀🐍❤👍🏽👨👩🇺🇸🍕") + ["\U0001d518", "\U00010348"],
    ]
    rng = random.Random(seed)
    out = []
    for k in range(n):
        length = rng.choice([1, 2, 3, 5, 8, 13, 21, 40, 80])
        chars = []
        for _ in range(length):
            pool = pools[rng.randrange(len(pools))]
            chars.append(pool[rng.randrange(len(pool))])
        out.append((f"random {k}", "".join(chars)))
    return out


def jargon_cases():
    with gzip.open(ASSETS / "jargon.txt.gz", "rt", encoding="utf-8") as f:
        text = f.read()
    return [("jargon 4k", text[:4096]),
            ("jargon 64k", text[200_000:200_000 + 65_536])]


def long_text(alphabet, chars, seed):
    return "".join(random.Random(seed).choices(alphabet, k=chars))


def write_long_chunks(enc, refs):
    refs = [(name, ref) for name, ref in refs if name != "transformers.GPT2Tokenizer"]
    out = []
    for name, alphabet, chars, seed in LONG_CASES:
        text = long_text(alphabet, chars, seed)
        ids = enc.encode_ordinary(text)
        for ref_name, ref in refs:
            if list(ref(text, False)) != ids:
                sys.exit(f"DISAGREE {ref_name} on {name!r}; nothing written")
        if enc.decode_bytes(ids) != text.encode("utf-8"):
            sys.exit(f"tiktoken does not round-trip {name!r}")
        digest = hashlib.sha256(struct.pack(f"<{len(ids)}I", *ids)).hexdigest()
        out.append({"name": name, "alphabet": alphabet, "chars": chars, "seed": seed,
                    "n_ids": len(ids), "ids_sha256": digest})
    data = {"tiktoken": tiktoken.__version__, "references": ["tiktoken"] + [r for r, _ in refs],
            "text": "random.Random(seed).choices(alphabet, k=chars), joined", "cases": out}
    tmp = LONG_OUT.with_name(LONG_OUT.name + ".tmp")
    tmp.write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, LONG_OUT)
    print(f"wrote {LONG_OUT} ({len(out)} cases); references agree: {', '.join(data['references'])}")


def main():
    check_files()
    enc = tiktoken_encoding()
    refs = hf_references()
    write_long_chunks(enc, refs)
    if "--long_only" in sys.argv[1:]:
        return
    cases = fixed_cases() + jargon_cases() + random_cases()
    out, disagreements = [], 0
    for name, text in cases:
        variants = [(False,)]
        if EOT in text:
            variants.append((True,))
        for (allowed,) in variants:
            if allowed:
                ids = enc.encode(text, allowed_special={EOT})
            else:
                ids = enc.encode_ordinary(text)
            for ref_name, ref in refs:
                other = list(ref(text, allowed))
                if other != ids:
                    disagreements += 1
                    print(f"DISAGREE {ref_name} on {name!r} (allowed={allowed}): {text[:80]!r}\n"
                          f"  tiktoken {ids[:30]}\n  {ref_name} {other[:30]}")
            if enc.decode_bytes(ids) != text.encode("utf-8"):
                sys.exit(f"tiktoken does not round-trip {name!r}")
            out.append({"name": name + (" (eot allowed)" if allowed else ""), "text": text,
                        "allowed_special": allowed, "ids": ids})
    if disagreements:
        sys.exit(f"{disagreements} disagreements between references; nothing written")
    data = {"tiktoken": tiktoken.__version__, "references": ["tiktoken"] + [r for r, _ in refs],
            "vocab_sha256": SHA256, "cases": out}
    blob = gzip.compress(json.dumps(data, ensure_ascii=False, indent=0).encode("utf-8"), mtime=0)
    tmp = OUT.with_name(OUT.name + ".tmp")
    tmp.write_bytes(blob)
    os.replace(tmp, OUT)
    print(f"wrote {OUT} ({len(out)} cases, {len(blob)} bytes); references agree: "
          f"{', '.join(data['references'])}")


if __name__ == "__main__":
    main()
