"""Tokenizer speed: npgpt2 vs OpenAI's original algorithm (re-implemented below) vs tiktoken.

    python benchmarks/tokenizer.py [--mb 10] [--reps 5] [--long_kb 256] [--old_sizes 16000 30000]

Text: the Python standard library's .py sources (sorted walk of os.path.dirname(os.__file__)),
concatenated until `mb` MB of UTF-8. Every run of every tokenizer starts with an empty word cache
(the encoders are built beforehand; npgpt2's JIT is warmed up once). MB/s = UTF-8 bytes / median
time; the tokenizers take turns within each repetition, since the machine is noisy.

The baseline `OriginalEncoder` follows OpenAI's encoder.py step by step (its own code, not a
copy). Checked once against transformers' GPT2Tokenizer, itself a port of encoder.py, driven the
same way on 3 MB: equal ids and equal speed (0.35-0.46 vs 0.35-0.38 MB/s on a loaded machine).

A second table times one long pre-token chunk (seeded random letters a-z, no spaces: one
chunk, as in base64 blobs or minified files), where BPE used to be quadratic: npgpt2's encode
(engine warm) and its plain engine (NPGPT2_PLAIN=1) on `long_kb` KB, both merging on a heap, and
for contrast the old algorithm, the simple merge loop (`tokenizer.bpe_merge_plain`, still the
reference) that both engines ran on every chunk before, on the smaller `old_sizes`. Goal:
256 KB in under 1 s. Each time is the best of `reps` (1 for the old loop), caches cleared.

`bench_tokenizer(mb, reps)` and `bench_long_chunk(kb, old_sizes, reps)` return their results as
dicts (bench_tokenizer is called by benchmarks/run.py).
"""
import argparse
import json
import os
import random
import statistics
import string
import sys
import time
from pathlib import Path

import regex

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from workers import peak_rss_mib  # noqa: E402  (benchmarks/workers.py: this script's folder is on sys.path)

from npgpt2 import tokenizer as tk  # noqa: E402

ASSETS = ROOT / "npgpt2" / "assets"


def stdlib_text(mb=10):
    """About `mb` MB (10**6 bytes of UTF-8) of the standard library's Python sources."""
    target = int(mb * 1_000_000)
    parts, size = [], 0
    for folder, dirs, files in os.walk(os.path.dirname(os.__file__)):
        dirs.sort()
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            try:
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    text = f.read()
            except (OSError, UnicodeDecodeError):
                continue
            parts.append(text)
            size += len(text.encode("utf-8"))
            if size >= target:
                return "".join(parts)
    return "".join(parts)


class OriginalEncoder:
    """OpenAI's encoder.py algorithm, written here from its description, with its costs: strings
    throughout, a dict cache of BPE results per pre-token, the pair set rebuilt after every merge,
    min() over it by rank, and every occurrence of the best pair merged left to right."""

    def __init__(self, encoder, merges):
        self.encoder = encoder
        self.ranks = {pair: r for r, pair in enumerate(merges)}
        self.byte_char = tk.bytes_to_unicode()
        self.cache = {}
        self.pat = regex.compile(tk.PATTERN)

    @staticmethod
    def pairs(word):
        return {(word[i], word[i + 1]) for i in range(len(word) - 1)}

    def bpe(self, token):
        if token in self.cache:
            return self.cache[token]
        word = tuple(token)
        pairs = self.pairs(word)
        if not pairs:
            return token
        while True:
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            a, b = best
            merged, i = [], 0
            while i < len(word):
                try:
                    j = word.index(a, i)
                except ValueError:
                    merged.extend(word[i:])
                    break
                merged.extend(word[i:j])
                i = j
                if i < len(word) - 1 and word[i + 1] == b:
                    merged.append(a + b)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
            if len(word) == 1:
                break
            pairs = self.pairs(word)
        result = " ".join(word)
        self.cache[token] = result
        return result

    def encode(self, text):
        ids = []
        for token in self.pat.findall(text):
            token = "".join(self.byte_char[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(token).split(" "))
        return ids


def _tiktoken():
    """tiktoken's Encoding built from the packaged files, or None when it is not installed."""
    try:
        os.environ.setdefault("TIKTOKEN_CACHE_DIR", "")
        import tiktoken
        import tiktoken.load
    except ImportError:
        return None
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(str(ASSETS / "vocab.bpe"),
                                                         str(ASSETS / "encoder.json"))
    return tiktoken.Encoding("gpt2-local", pat_str=tk.PATTERN, mergeable_ranks=ranks,
                             special_tokens={tk.ENDOFTEXT: 50256})


def bench_tokenizer(mb=10, reps=5):
    """Encode ~mb MB of stdlib sources with each tokenizer `reps` times (after one warm-up).

    Returns {"mb", "bytes", "tokens", "reps", "rows": [{"name", "seconds", "mb_per_s",
    "ratio_vs_original", "ids_identical"} or {"name", "status": "not installed"}]}.
    """
    text = stdlib_text(mb)
    nbytes = len(text.encode("utf-8"))
    tok = tk.read_tokenizer(ASSETS / "encoder.json", ASSETS / "vocab.bpe")
    with open(ASSETS / "encoder.json", encoding="utf-8") as f:
        encoder = json.load(f)
    merges = tk._read_merges(ASSETS / "vocab.bpe")
    tt = _tiktoken()

    def original():
        return OriginalEncoder(encoder, merges).encode  # fresh cache every run

    def npgpt2_fast():
        tok.clear_cache()
        return tok.encode

    def npgpt2_plain():
        tok.clear_cache()
        return tok._encode_plain

    def tiktoken_run():
        return tt.encode_ordinary

    runners = {"OpenAI original (re-implemented)": original, "npgpt2": npgpt2_fast,
               "npgpt2 plain engine (NPGPT2_PLAIN=1)": npgpt2_plain}
    if tt is not None:
        runners["tiktoken"] = tiktoken_run
    tok.encode(text[:1_000_000])  # warm up: JIT load and the code point class table
    times = {name: [] for name in runners}
    ids = {}
    for r in range(reps):
        names = list(runners)
        names = names[r % len(names):] + names[:r % len(names)]  # take turns going first
        for name in names:
            encode = runners[name]()
            t0 = time.perf_counter()
            out = encode(text)
            times[name].append(time.perf_counter() - t0)
            if r == 0:
                ids[name] = list(out)
    base_name = "OpenAI original (re-implemented)"
    base = statistics.median(times[base_name])
    rows = []
    for name in runners:
        sec = statistics.median(times[name])
        rows.append({"name": name, "seconds": sec, "mb_per_s": nbytes / 1e6 / sec,
                     "ratio_vs_original": base / sec, "ids_identical": ids[name] == ids[base_name]})
    if tt is None:
        rows.append({"name": "tiktoken", "status": "not installed"})
    return {"mb": mb, "bytes": nbytes, "tokens": len(ids[base_name]), "reps": reps, "rows": rows,
            "peak_rss_mib": peak_rss_mib()}


def format_table(res):
    lines = [f"Tokenizer: encode {res['bytes'] / 1e6:.1f} MB of Python stdlib sources "
             f"({res['tokens']:,} tokens), median of {res['reps']}",
             f"{'tokenizer':40s} {'MB/s':>8s} {'seconds':>8s} {'vs original':>12s} {'ids identical':>14s}"]
    for row in res["rows"]:
        if "status" in row:
            lines.append(f"{row['name']:40s} {row['status']:>8s}")
        else:
            lines.append(f"{row['name']:40s} {row['mb_per_s']:8.2f} {row['seconds']:8.2f} "
                         f"{row['ratio_vs_original']:11.2f}x {'yes' if row['ids_identical'] else 'NO':>14s}")
    return "\n".join(lines)


def random_letters(n, seed=0):
    rng = random.Random(seed)
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(n))


def bench_long_chunk(kb=256, old_sizes=(16000, 30000), reps=3):
    """Encode one chunk of `kb` KB of random letters; the old merge loop on `old_sizes` letters.

    Returns {"rows": [{"name", "chars", "seconds", "mb_per_s", "ids_identical"}], "goal_seconds",
    "goal_met"}; ids_identical compares each row with the old loop (same size) or with tiktoken
    (the long size) when it is installed, else with the plain engine.
    """
    tok = tk.read_tokenizer(ASSETS / "encoder.json", ASSETS / "vocab.bpe")
    tok.encode(stdlib_text(1))  # warm up: the fast engine's JIT load and class table
    tt = _tiktoken()
    rows, n_long = [], int(kb * 1024)

    def timed(name, text, encode, n_reps, want=None):
        best, out = float("inf"), None
        for _ in range(n_reps):
            tok.clear_cache()
            t0 = time.perf_counter()
            out = list(encode(text))
            best = min(best, time.perf_counter() - t0)
        rows.append({"name": name, "chars": len(text), "seconds": best,
                     "mb_per_s": len(text.encode("utf-8")) / 1e6 / best,
                     "ids_identical": None if want is None else out == want})
        return out

    def old_loop(text):
        return tk.bpe_merge_plain([tok.byte_sym[b] for b in text.encode("utf-8")], tok.merges)

    for n in old_sizes:
        text = random_letters(n)
        want = timed("old: simple merge loop (bpe_merge_plain)", text, old_loop, 1)
        timed("npgpt2 plain engine, heap (NPGPT2_PLAIN=1)", text, tok._encode_plain, reps, want)
        timed("npgpt2 encode", text, tok.encode, reps, want)
    text = random_letters(n_long)
    want = tt.encode_ordinary(text) if tt is not None else None
    if tt is not None:
        timed("tiktoken", text, tt.encode_ordinary, reps)
    plain = timed("npgpt2 plain engine, heap (NPGPT2_PLAIN=1)", text, tok._encode_plain, reps, want)
    fast = timed("npgpt2 encode", text, tok.encode, reps, want if want is not None else plain)
    sec = rows[-1]["seconds"]
    return {"rows": rows, "goal_seconds": 1.0, "goal_met": sec < 1.0 and fast == (want or plain)}


def format_long_table(res):
    lines = ["One long chunk (random letters a-z, no spaces), best of several runs, caches cleared",
             f"{'algorithm':44s} {'chars':>8s} {'seconds':>8s} {'MB/s':>8s} {'ids identical':>14s}"]
    for row in res["rows"]:
        same = {None: "(reference)", True: "yes", False: "NO"}[row["ids_identical"]]
        lines.append(f"{row['name']:44s} {row['chars']:8d} {row['seconds']:8.3f} "
                     f"{row['mb_per_s']:8.2f} {same:>14s}")
    lines.append(f"goal: npgpt2 encode of the long chunk under {res['goal_seconds']:g} s: "
                 f"{'met' if res['goal_met'] else 'NOT met'}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=10, help="MB of text to encode (default 10)")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions (default 5)")
    ap.add_argument("--long_kb", type=float, default=256, help="KB of the long single chunk (default 256)")
    ap.add_argument("--old_sizes", type=int, nargs="*", default=[16000, 30000],
                    help="letters for the old merge loop's rows (default 16000 30000)")
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    res = bench_tokenizer(args.mb, args.reps)
    print(format_table(res))
    res["long_chunk"] = bench_long_chunk(args.long_kb, args.old_sizes, max(1, min(args.reps, 3)))
    print()
    print(format_long_table(res["long_chunk"]))
    if args.json:
        from npgpt2.fsutil import atomic_write
        with atomic_write(args.json, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
