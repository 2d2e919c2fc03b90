"""`npgpt2 generate` and `npgpt2 prompt` as a user runs them: a subprocess, stdin piped."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

import npgpt2

FIX = Path(__file__).parent / "fixtures"
ENV = {**os.environ, "PYTHONIOENCODING": "utf-8"}


def run(*args, stdin=""):
    return subprocess.run([sys.executable, "-m", "npgpt2.cli", *args], input=stdin, text=True,
                          capture_output=True, timeout=120, env=ENV, encoding="utf-8")


def samples(stdout):
    """Split OpenAI-format output into the sample texts."""
    out, cur = [], None
    for line in stdout.split("\n"):
        if line.startswith("=" * 40 + " SAMPLE "):
            cur = []
            out.append(cur)
        elif line == "=" * 80:
            cur = None
        elif cur is not None:
            cur.append(line)
    return ["\n".join(s).rstrip("\n") for s in out]


def test_generate_unconditional_samples_reproducible():
    args = ["generate", "--models_dir", str(FIX), "--model_name", "full", "--nsamples", "2",
            "--length", "12", "--top_k", "40", "--seed", "5"]
    a, b = run(*args), run(*args)
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout
    assert a.stdout.count(" SAMPLE ") == 2
    assert "=" * 40 + " SAMPLE 1 " + "=" * 40 in a.stdout
    # the text is the decoding of what the library generates from <|endoftext|> with the same seed
    model = npgpt2.load_model(FIX / "full")
    enc = npgpt2.load_tokenizer(FIX / "full")
    rng = np.random.default_rng(5)
    from npgpt2.sampling import generate_stream
    first = [int(t[0]) for t in generate_stream(model, [50256], 12, top_k=40, rng=rng)]
    assert samples(a.stdout)[0] == enc.decode(first)


def test_batch_size_gives_same_count():
    r = run("generate", "--models_dir", str(FIX), "--model_name", "full", "--nsamples", "3",
            "--batch_size", "2", "--length", "5", "--seed", "1")
    assert r.returncode == 0, r.stderr
    assert len(samples(r.stdout)) == 3


def test_prompt_reads_until_end_of_piped_input_and_rejects_empty():
    r = run("prompt", "--models_dir", str(FIX), "--model_name", "full", "--length", "8",
            "--top_k", "40", "--seed", "2", stdin="Hello there\n\n   \nThe jargon file\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("=" * 80) == 2
    assert r.stderr.count("Prompt should not be empty!") == 2


def test_prompt_truncate_stops_at_the_string():
    # with temperature 0 the continuation is fixed; truncate at a piece of it
    base = run("prompt", "--models_dir", str(FIX), "--model_name", "full", "--length", "12",
               "--temperature", "0", stdin="Hello\n")
    text = samples(base.stdout)[0]
    assert len(text) > 6
    stop = text[5:8]
    cut = run("prompt", "--models_dir", str(FIX), "--model_name", "full", "--length", "12",
              "--temperature", "0", "--truncate", stop, stdin="Hello\n")
    assert samples(cut.stdout)[0] == text[:text.find(stop)]


def test_prompt_longer_than_context_is_trimmed_with_warning():
    r = run("prompt", "--models_dir", str(FIX), "--model_name", "full", "--length", "10",
            "--seed", "1", stdin="word " * 200 + "\n")
    assert r.returncode == 0, r.stderr
    assert "keeping its last 54 tokens" in r.stderr


def test_errors_are_one_line():
    cases = [
        (["generate", "--models_dir", str(FIX), "--model_name", "missing"], "model folder not found"),
        (["generate", "--models_dir", str(FIX), "--model_name", "full", "--length", "64"], "--length"),
        (["generate", "--models_dir", str(FIX), "--model_name", "full", "--top_p", "0"], "--top_p"),
    ]
    for args, msg in cases:
        r = run(*args)
        assert r.returncode == 2, (args, r.stderr)
        lines = r.stderr.strip().split("\n")
        assert len(lines) == 1 and lines[0].startswith("npgpt2: error:") and msg in lines[0], r.stderr
        assert "Traceback" not in r.stderr


def test_flag_errors_come_before_any_output():
    r = run("generate", "--models_dir", str(FIX), "--model_name", "full", "--top_k", "-1")
    assert r.returncode == 2 and r.stdout == "" and "--top_k" in r.stderr


def test_mistyped_flag_shows_the_commands_usage():
    r = run("generate", "--lenght", "5")
    assert r.returncode == 2
    assert "usage: npgpt2 generate" in r.stderr and "unrecognized arguments: --lenght 5" in r.stderr


def test_hugging_face_folder_gets_a_convert_hint():
    r = run("generate", "--models_dir", str(FIX), "--model_name", "hf_tiny")
    assert r.returncode == 2
    assert "looks like a Hugging Face folder" in r.stderr and "npgpt2 convert" in r.stderr
