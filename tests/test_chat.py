"""`npgpt2 chat` and ChatSession on the `full` fixture model (GPT-2's vocabulary, n_ctx 64).

What the model sees is observed by wrapping GPT2.forward: every call's tokens and the cache
position they were written at rebuild the context, independently of the session's own
bookkeeping. Expected transcripts are written out by hand from the rules (`User: <text>\\n`,
`Bot: <reply>\\n`, ending in `Bot:`); replies are whatever the model printed.
"""
import io
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import npgpt2
from npgpt2 import chat as chat_mod
from npgpt2.chat import ChatSession
from npgpt2.cli import main
from npgpt2.errors import Npgpt2Error
from npgpt2.model import GPT2

FIX = Path(__file__).parent / "fixtures"
N_CTX = 64


@pytest.fixture(scope="module")
def model():
    return npgpt2.load_model(FIX / "full")


@pytest.fixture(scope="module")
def tok():
    return npgpt2.load_tokenizer(FIX / "full")


class Recorder:
    """Wraps GPT2.forward; .prefills are the full contexts the model saw before each reply,
    with the logits it returned for their last position."""

    def __init__(self, monkeypatch, fail_on_call=None):
        self.ctx, self.prefills, self.calls = [], [], 0
        plain = GPT2.forward
        rec = self

        def forward(model, tokens, cache=None, last_only=False):
            rec.calls += 1
            if rec.calls == fail_on_call:
                raise KeyboardInterrupt
            start = cache.length if cache is not None else 0
            logits = plain(model, tokens, cache=cache, last_only=last_only)
            if cache is not None:
                assert tokens.shape[0] == 1
                rec.ctx = rec.ctx[:start] + [int(t) for t in tokens[0]]
                if last_only:
                    rec.prefills.append((list(rec.ctx), start, logits[0, -1].copy()))
            return logits
        monkeypatch.setattr(GPT2, "forward", forward)


def run_chat(monkeypatch, capsys, lines, *flags):
    """`npgpt2 chat` on the full fixture with `lines` piped to stdin -> (rc, stdout, stderr)."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(line + "\n" for line in lines)))
    rc = main(["chat", "--models_dir", str(FIX), "--model_name", "full", *flags])
    out = capsys.readouterr()
    return rc, out.out, out.err


def replies(out, messages):
    """The bot replies printed for `messages`, parsed from `User: m\\nBot: r\\n` blocks."""
    pattern = "".join(f"User: {re.escape(m)}\nBot: (.*)\n" for m in messages)
    match = re.fullmatch(pattern, out, flags=re.S)
    assert match, f"unexpected output {out!r}"
    return list(match.groups())


def line(tag, text):
    return f"{tag} {text.strip()}".rstrip(" ") + "\n"


# ---------------------------------------------------------------- history in the context
def test_piped_conversation_feeds_the_history(monkeypatch, capsys, model, tok):
    rec = Recorder(monkeypatch)
    msgs = ["my name is Alice", "what is my name?", "thanks"]
    rc, out, err = run_chat(monkeypatch, capsys, msgs, "--seed", "1", "--length", "8")
    assert rc == 0, err
    r = replies(out, msgs)
    assert len(rec.prefills) == 3
    expected = ""
    for i, (m, (ctx, start, logits)) in enumerate(zip(msgs, rec.prefills)):
        expected += line("User:", m)
        assert tok.decode(ctx) == expected + "Bot:"
        if i:
            # the cache held the earlier turns: only the new part was fed ...
            assert start > 0
            # ... and what came out equals the model run on the whole context from scratch
            fresh = model.forward(np.asarray([ctx]))[0, -1]
            np.testing.assert_allclose(logits, fresh, rtol=0, atol=1e-4)
        expected += line("Bot:", r[i])
    assert "Alice" in tok.decode(rec.prefills[-1][0])


def test_same_seed_same_conversation(model, tok):
    a, b = (ChatSession(model, tok, length=6, seed=5) for _ in range(2))
    for m in ["hello", "and then?", "ok"]:
        assert a.reply(m) == b.reply(m)
    c = ChatSession(model, tok, length=6, seed=6)
    assert [c.reply(m) for m in ["hello", "and then?", "ok"]] != [t for r, t in a.turns if r == "bot"]


def test_trimming_keeps_the_newest_turns(monkeypatch, model, tok):
    rec = Recorder(monkeypatch)
    length = 12
    chat = ChatSession(model, tok, length=length, seed=2)
    msgs = [f"this is message number {i}" for i in range(8)]
    first_kept = []
    for m in msgs:
        chat.reply(m)
        ctx = rec.prefills[-1][0]
        assert len(ctx) + length <= N_CTX
        lines = [line("User:" if r == "user" else "Bot:", t) for r, t in chat.turns[:-1]]  # up to this message
        text = tok.decode(ctx)
        assert text.endswith(line("User:", m) + "Bot:")
        # the context is the transcript from some whole turn j on: the newest turns
        j = next((j for j in range(len(lines)) if "".join(lines[j:]) + "Bot:" == text), None)
        assert j is not None, text
        # and the turn before j would not have fitted
        if j:
            assert len(tok.encode(lines[j - 1])) + len(ctx) + length > N_CTX
        first_kept.append(j)
    assert first_kept[0] == 0 and first_kept[-1] > 0
    assert first_kept == sorted(first_kept)  # older turns never come back
    # the saved transcript still has everything
    assert all(f"User: {m}\n" in chat.transcript() for m in msgs)


def test_reset_and_save(monkeypatch, capsys, tmp_path, tok):
    rec = Recorder(monkeypatch)
    saved, bad = tmp_path / "talk.txt", tmp_path / "no" / "such" / "dir.txt"
    saved.write_text("old content that must be replaced\n" * 50)
    rc, out, err = run_chat(monkeypatch, capsys, ["hello", "how are you", f"/save {saved}", "/reset",
                                                  f"/save {bad}", "/help", "/nonsense", "", "again"],
                            "--seed", "3", "--length", "6")
    assert rc == 0
    r = replies(out, ["hello", "how are you", "again"])
    # /save wrote the conversation so far, replacing the old file, and left no temp files behind
    assert saved.read_text() == line("User:", "hello") + line("Bot:", r[0]) + line("User:", "how are you") \
        + line("Bot:", r[1])
    assert [p.name for p in tmp_path.iterdir()] == ["talk.txt"]
    # a /save that cannot write says so and the chat goes on; /help and unknown commands answer
    assert str(bad.parent) in err and "/reset" in err and "unknown command" in err
    # after /reset the model sees only the new message
    assert tok.decode(rec.prefills[-1][0]) == "User: again\nBot:"


def test_too_long_message_is_refused_and_the_chat_goes_on(monkeypatch, capsys):
    rc, out, err = run_chat(monkeypatch, capsys, ["word " * 80, "short one"], "--seed", "1", "--length", "8")
    assert rc == 0
    assert "tokens" in err and "n_ctx=64" in err
    replies(out, ["short one"])


def test_ctrl_c_stops_the_reply_and_the_chat_goes_on(monkeypatch, capsys, model, tok):
    # the 3rd forward pass (the 2nd token after the first prompt) is interrupted
    rec = Recorder(monkeypatch, fail_on_call=3)
    rc, out, err = run_chat(monkeypatch, capsys, ["first", "second"], "--seed", "4", "--length", "10")
    assert rc == 0
    r = replies(out, ["first", "second"])
    ctx, start, logits = rec.prefills[-1]
    # the interrupted reply keeps what was shown, and the cache is still right
    assert tok.decode(ctx) == line("User:", "first") + line("Bot:", r[0]) + "User: second\nBot:"
    np.testing.assert_allclose(logits, model.forward(np.asarray([ctx]))[0, -1], rtol=0, atol=1e-4)


# ---------------------------------------------------------------- where a reply ends
class Script:
    """Replaces sampling with a fixed token sequence; counts the draws."""

    def __init__(self, monkeypatch, tokens):
        self.tokens, self.draws = list(tokens), 0

        def sample(logits, rng, *args, **kwargs):
            self.draws += 1
            return np.array([self.tokens[self.draws - 1]])
        monkeypatch.setattr(chat_mod, "sample_logits", sample)


@pytest.mark.parametrize("text,kwargs,reply", [
    (" Fine, thanks.\nUser: and you?", {}, "Fine, thanks."),
    (" Fine.\nBot: again", {}, "Fine."),
    (" two\nlines\nUser:", {}, "two\nlines"),
    (" Q: A: done\nQ: next", {"user_tag": "Q:", "bot_tag": "A:"}, "Q: A: done"),  # only at a line start
    (" stop HERE please", {"truncate": "HERE"}, "stop"),
])
def test_reply_ends_at_a_speaker_tag_or_truncate(monkeypatch, model, tok, text, kwargs, reply):
    ids = tok.encode(text)
    script = Script(monkeypatch, ids + tok.encode(" padding") * 30)
    chat = ChatSession(model, tok, length=30, **kwargs)
    shown = "".join(chat.say("hi"))
    assert shown.rstrip() == reply  # trailing whitespace may have been shown
    assert chat.turns[-1] == ("bot", reply)
    # generation stopped at the token that completed the stop (or at the script's end)
    assert script.draws <= len(ids)


def test_reply_ends_at_endoftext(monkeypatch, model, tok):
    ids = tok.encode(" Hi there") + [tok.eot_token] + tok.encode(" more text")
    script = Script(monkeypatch, ids)
    chat = ChatSession(model, tok, length=30)
    assert chat.reply("hi") == "Hi there"
    assert script.draws == 3


def test_reply_ends_at_length(monkeypatch, model, tok):
    script = Script(monkeypatch, tok.encode(" one two three four five six"))
    chat = ChatSession(model, tok, length=4)
    assert chat.reply("count") == "one two three four"
    assert script.draws == 4


def test_bad_settings(model, tok):
    with pytest.raises(Npgpt2Error, match="--top_p"):
        ChatSession(model, tok, top_p=0)
    with pytest.raises(Npgpt2Error, match="--length"):
        ChatSession(model, tok, length=64)
    with pytest.raises(Npgpt2Error, match="must differ"):
        ChatSession(model, tok, user_tag="A:", bot_tag="A:")
    with pytest.raises(Npgpt2Error, match="--bot_tag"):
        ChatSession(model, tok, bot_tag=" ")


def test_cli_over_a_real_pipe_exits_cleanly_at_end_of_input():
    proc = subprocess.run(
        [sys.executable, "-m", "npgpt2.cli", "chat", "--models_dir", str(FIX), "--model_name", "full",
         "--seed", "9", "--length", "6"],
        input="hello\n/help\nbye\n", capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    replies(proc.stdout, ["hello", "bye"])
    assert "/save FILE" in proc.stderr
