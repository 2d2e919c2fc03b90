"""Training to chat: conversation datasets and their loss mask (chat_data.py), the masked loss
(model.loss_and_grads), mask-aware batches, validation and eval, the chat template a run
records, early stopping and the best checkpoint (early_stop.py).

References: tests/fixtures/mask_reference.npz (torch's cross_entropy with ignore_index=-100,
from tools/make_fixtures.py); token spellings and mask positions written out by hand below.
"""
import json
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

import npgpt2
from npgpt2 import chat, chat_data, layers, model_loss
from npgpt2 import train as train_mod
from npgpt2.chat import ChatSession
from npgpt2.cli import main
from npgpt2.data import Sampler, read_npz_tokens
from npgpt2.errors import Npgpt2Error
from npgpt2.train import TrainConfig, fit, restore

FIX = Path(__file__).parent / "fixtures"
REF = np.load(FIX / "mask_reference.npz")


@pytest.fixture(scope="module")
def tok():
    return npgpt2.load_tokenizer(FIX / "full")


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def conv(*pairs, system=None):
    msgs = [{"role": "system", "content": system}] if system is not None else []
    return {"messages": msgs + [{"role": r, "content": c} for r, c in pairs]}


# ---------------------------------------------------------------- the masked loss vs torch
@pytest.mark.parametrize("rows", [256, 5])  # one chunk of the head, and several (the last partial)
@pytest.mark.parametrize("nn_name", ["layers", "kernels"])
def test_masked_head_loss_and_grads_equal_torch(rows, nn_name, monkeypatch):
    """On the fixture's logits x @ wte.T: sum(mask * ce) / sum(mask) and its gradients w.r.t. x and
    wte equal torch's cross_entropy(..., ignore_index=-100), float64, to 1e-12."""
    monkeypatch.setattr(model_loss, "HEAD_ROWS", rows)
    lay = layers if nn_name == "layers" else pytest.importorskip("npgpt2.kernels")
    model = npgpt2.load_model(FIX / "tiny", dtype=np.float64)
    model.params["model/wte"][...] = REF["wte"]
    mask = REF["mask"]
    losses, dx, dwte = model._head_loss_backward(lay, REF["x"].copy(), REF["targets"], mask)
    loss = float((losses * mask).sum() / mask.sum())
    assert abs(loss - float(REF["head_loss"])) <= 1e-12
    assert np.abs(dx - REF["head_dx"]).max() <= 1e-12
    assert np.abs(dwte - REF["head_dwte"]).max() <= 1e-12
    assert np.abs(REF["head_dx"][REF["mask"] == 0]).max() == 0  # torch: no gradient off the mask
    assert np.abs(REF["head_dx"]).max() > 1e-3


@pytest.mark.parametrize("plain", ["1", "0"])  # layers.py, and the Numba kernels where they load
def test_masked_loss_and_every_grad_through_the_model_equal_torch(plain, monkeypatch):
    """loss_and_grads(inputs, targets, mask) on the tiny model against HF's GPT-2 with torch's
    ignore_index=-100 loss, float64: the loss and every gradient entry to 1e-12."""
    monkeypatch.setenv("NPGPT2_PLAIN", plain)
    model = npgpt2.load_model(FIX / "tiny", dtype=np.float64)
    loss, grads = model.loss_and_grads(REF["tokens"], REF["targets"], mask=REF["mask"])
    assert abs(loss - float(REF["model_loss"])) <= 1e-12
    for name, g in grads.items():
        assert np.abs(g - REF["grad/" + name]).max() <= 1e-12, name
    assert np.abs(REF["grad/model/wte"]).max() > 1e-3


class FixtureRows:
    """A sampler whose micro-batch i is the fixture's row i (its mask; the tokens and targets are
    put in by the wrapped loss_and_grads: the fixture's targets are not its tokens shifted)."""

    def __init__(self):
        self.i = 0

    def sample_masked(self, batch_size):
        self.i += 1
        return np.zeros((1, REF["tokens"].shape[1] + 1), np.int64), REF["mask"][self.i - 1:self.i]


def test_accumulated_micro_batches_average_over_every_masked_position(monkeypatch):
    """Two micro-batches (fixture rows 0 and 1, with different counts of masked positions) give
    the mean over all of them, as torch's loss over the two rows together: not the mean of the
    two means."""
    model = npgpt2.load_model(FIX / "tiny", dtype=np.float64)
    sampler = FixtureRows()
    real = model.loss_and_grads

    def fixture_row(inputs, targets, mask=None, memory_saving=False):
        i = sampler.i - 1
        return real(REF["tokens"][i:i + 1], REF["targets"][i:i + 1], mask=mask, memory_saving=memory_saving)
    monkeypatch.setattr(model, "loss_and_grads", fixture_row)
    names = list(model.params)
    loss, grads, weight = train_mod.batch_gradients(model, sampler, names, 1, 2)
    assert weight == int(REF["mask"].sum()) and REF["mask"][0].sum() != REF["mask"][1].sum()
    assert abs(loss - float(REF["model_loss"])) <= 1e-12
    for name in names:
        assert np.abs(grads[name] - REF["grad/" + name]).max() <= 1e-12, name


def test_weighted_allreduce_is_the_mean_over_every_rank_position():
    """dist.MPIComm.allreduce_mean(grads, loss, weight) on a stand-in for COMM_WORLD whose sums
    are over two ranks' values: (w0 g0 + w1 g1) / (w0 + w1)."""
    from npgpt2 import dist

    class TwoRanks:  # rank 0's view; rank 1 contributes `other`
        other = {"w": 3.0, "g": np.array([10.0, 20.0]), "loss": 7.0}

        def Get_rank(self):
            return 0

        def Get_size(self):
            return 2

        def allreduce(self, x, op=None):
            return x + (self.other["w"] if x == 1.0 else self.other["loss"] * self.other["w"])

        def Allreduce(self, inplace, buf, op=None):
            buf += self.other["g"] * self.other["w"]
    pytest.importorskip("mpi4py")
    comm = dist.MPIComm(TwoRanks())
    g = {"a": np.array([1.0, 2.0])}
    loss = comm.allreduce_mean(g, 4.0, weight=1.0)
    assert g["a"].tolist() == [(1 * 1 + 10 * 3) / 4, (2 * 1 + 20 * 3) / 4]
    assert loss == (4.0 * 1 + 7.0 * 3) / 4


# ---------------------------------------------------------------- rendering and the mask
# GPT-2's tokens of the transcript, spelled out by hand, with the mask each must get
SYSTEM_CONV = conv(("user", "Hi"), ("assistant", "Hello there."), ("user", "Bye"), ("assistant", "Bye now."),
                   system="Be brief.")
SYSTEM_EXPECTED = [
    ("Be", 0), (" brief", 0), (".", 0), ("\n", 0),
    ("User", 0), (":", 0), (" Hi", 0), ("\n", 0),
    ("Bot", 0), (":", 0), (" Hello", 1), (" there", 1), (".", 1), ("\n", 1),
    ("User", 1), (":", 1), (" Bye", 0), ("\n", 0),          # the next tag ends the reply: trained
    ("Bot", 0), (":", 0), (" Bye", 1), (" now", 1), (".", 1), ("\n", 1),
    ("<|endoftext|>", 1),                                    # the conversation's end ends the last reply
]
OTHER_CONVS = [
    # ends on a user turn: its <|endoftext|> ends no reply
    (conv(("user", "a"), ("assistant", "b"), ("user", "c")),
     [("User", 0), (":", 0), (" a", 0), ("\n", 0), ("Bot", 0), (":", 0), (" b", 1), ("\n", 1),
      ("User", 1), (":", 1), (" c", 0), ("\n", 0), ("<|endoftext|>", 0)]),
    # two replies in a row: the second one's tag ends the first; weight 0 trains neither it nor its end
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                   {"role": "assistant", "content": "c", "weight": 0}]},
     [("User", 0), (":", 0), (" a", 0), ("\n", 0), ("Bot", 0), (":", 0), (" b", 1), ("\n", 1),
      ("Bot", 1), (":", 1), (" c", 0), ("\n", 0), ("<|endoftext|>", 0)]),
]


def encoded(tmp_path, tok, rows, *flags):
    src = write_jsonl(tmp_path / "c.jsonl", rows)
    out = tmp_path / "c.npz"
    assert main(["encode", "--format", "chat", str(src), str(out), "--models_dir", str(FIX),
                 "--model_name", "full", *flags]) == 0
    tokens = np.concatenate(list(read_npz_tokens(out)))
    masks, template = chat_data.read_npz_extras(out)
    return out, tokens, np.concatenate(masks), template


def test_mask_positions_match_hand_written_expectations(tmp_path, tok):
    rows = [SYSTEM_CONV] + [c for c, _ in OTHER_CONVS]
    out, tokens, mask, template = encoded(tmp_path, tok, rows)
    expected = SYSTEM_EXPECTED + [t for _, e in OTHER_CONVS for t in e]
    got = [(tok.decode([int(t)]), int(m)) for t, m in zip(tokens, mask)]
    assert got == expected
    assert template == {"user_tag": "User:", "bot_tag": "Bot:", "system": ""}


def test_old_and_foreign_readers_see_exactly_the_tokens(tmp_path, tok):
    """np.load (nshepperd's and OpenAI's load_dataset read every member) sees only arr_0..: the
    mask is in zip comments; and a plain np.savez file still loads with no mask."""
    out, tokens, mask, _ = encoded(tmp_path, tok, [SYSTEM_CONV] * 3)
    with np.load(out) as npz:
        assert npz.files == ["arr_0"]
        nshepperd = np.concatenate([npz[f] for f in npz.files])
    assert np.array_equal(nshepperd, tokens) and mask.size == tokens.size
    plain = tmp_path / "plain.npz"
    np.savez(plain, np.arange(50, dtype=np.uint16), np.arange(7, dtype=np.uint16))
    t, m, template = chat_data.load_masked_dataset(str(plain))
    assert t.tolist() == list(range(50)) + list(range(7)) and m is None and template is None


def test_training_transcript_is_byte_equal_to_the_chat_session(tok, monkeypatch):
    """A real ChatSession conversation (system text, two replies from the fixture model) and
    the training transcript of the same messages: the same bytes, and the tokens the model was
    fed before each reply are the training tokens before that reply's first trained token."""
    model = npgpt2.load_model(FIX / "full")
    prompts = []
    real = chat.CachedContext.generate

    def record(self, prompt, *a, **kw):
        prompts.append(list(prompt))
        return real(self, prompt, *a, **kw)
    monkeypatch.setattr(chat.CachedContext, "generate", record)
    session = ChatSession(model, tok, length=8, seed=3, system="You answer in French.")
    session.reply("What does kludge mean?")
    session.reply("And hack?")
    turns = [(r, t, 1) for r, t in session.turns]
    ids, mask = chat_data.conversation_ids(tok, session.system, turns, "User:", "Bot:", tok.eot_token)
    assert tok.decode(ids[:-1]).encode("utf-8") == session.transcript().encode("utf-8")
    assert session.transcript().startswith("You answer in French.\nUser: What does kludge mean?\nBot:")
    starts = [i for i in range(1, len(mask)) if mask[i] and not mask[i - 1]]
    assert len(starts) == 2 and [ids[:s] for s in starts] == prompts


def test_template_flags_and_system_default(tmp_path, tok):
    rows = [conv(("user", "Hi"), ("assistant", "Hello.")),
            conv(("user", "Hi"), ("assistant", "Hello."), system="Own.")]
    _, tokens, mask, template = encoded(tmp_path, tok, rows, "--user_tag", "Q:", "--bot_tag", "A:",
                                        "--system", "Shared.")
    assert template == {"user_tag": "Q:", "bot_tag": "A:", "system": "Shared."}
    text = tok.decode(tokens.tolist())
    assert text == ("Shared.\nQ: Hi\nA: Hello.\n<|endoftext|>" "Own.\nQ: Hi\nA: Hello.\n<|endoftext|>")


def test_jsonl_and_csv_formats(tmp_path, tok):
    src = write_jsonl(tmp_path / "t.jsonl", [{"text": "one two", "id": 1}, {"text": "three"}])
    out = tmp_path / "t.npz"
    assert main(["encode", "--format", "jsonl", str(src), str(out), "--models_dir", str(FIX),
                 "--model_name", "full"]) == 0
    assert tok.decode(np.concatenate(list(read_npz_tokens(out))).tolist()) == "one two<|endoftext|>three"
    assert chat_data.read_npz_extras(out) == (None, None)
    csv = tmp_path / "t.csv"
    csv.write_text('id,body\n1,"first, with a comma"\n2,"second\nline"\n')
    assert main(["encode", "--format", "csv", "--column", "body", str(csv), str(out), "--models_dir", str(FIX),
                 "--model_name", "full"]) == 0
    assert tok.decode(np.concatenate(list(read_npz_tokens(out))).tolist()) == \
        "first, with a comma<|endoftext|>second\nline"


BAD = [
    ('{"messages": [', r"c\.jsonl:2: not valid JSON"),
    ('{"text": "x"}', r'c\.jsonl:2: missing "messages"'),
    ('{"messages": [{"role": "bot", "content": "x"}]}', r'c\.jsonl:2: messages\[0\]\.role: unknown role "bot"'),
    ('{"messages": [{"role": "user", "content": ["x"]}]}', r"c\.jsonl:2: messages\[0\]\.content: must be a string"),
    ('{"messages": []}', r'c\.jsonl:2: "messages": empty conversation'),
    ('{"messages": [{"role": "user", "content": "x"}]}', r'c\.jsonl:2: "messages": no assistant turn'),
]


@pytest.mark.parametrize("line, message", BAD)
def test_bad_conversations_are_one_line_and_write_nothing(tmp_path, capsys, line, message):
    src = tmp_path / "c.jsonl"
    src.write_text(json.dumps(conv(("user", "a"), ("assistant", "b"))) + "\n" + line + "\n")
    out = tmp_path / "out.npz"
    assert main(["encode", "--format", "chat", str(src), str(out), "--models_dir", str(FIX),
                 "--model_name", "full"]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and err.count("\n") == 1, err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl"]


def test_csv_without_the_column_is_one_line(tmp_path, capsys):
    csv = tmp_path / "t.csv"
    csv.write_text("id,body\n1,x\n")
    out = tmp_path / "t.npz"
    assert main(["encode", "--format", "csv", str(csv), str(out), "--models_dir", str(FIX),
                 "--model_name", "full"]) == 2
    err = capsys.readouterr().err
    assert "t.csv:1: no column named 'text'" in err and "--column" in err and err.count("\n") == 1
    assert not out.exists()


def test_mask_length_differs_from_tokens_is_one_line(tmp_path, tok):
    out, *_ = encoded(tmp_path, tok, [SYSTEM_CONV])
    bad = tmp_path / "bad.npz"
    with zipfile.ZipFile(out) as src, zipfile.ZipFile(bad, "w") as dst:
        for info in src.infolist():
            n = int(info.comment.split(b":")[1])
            info.comment = b"npgpt2-mask:%d:" % (n - 1) + info.comment.split(b":", 2)[2]
            dst.writestr(info, src.read(info))
        dst.comment = src.comment
    with pytest.raises(Npgpt2Error, match=r"bad\.npz: member 'arr_0' has 25 tokens but a loss mask of 24"):
        chat_data.load_masked_dataset(str(bad))


# ---------------------------------------------------------------- batches
def test_sampler_draws_only_windows_with_a_target_and_resumes_exactly():
    tokens = np.arange(100, dtype=np.uint16)
    mask = np.zeros(100, np.uint8)
    mask[[10, 60]] = 1
    s = Sampler(tokens, 5, seed=1, mask=mask)  # a window starting at s trains on s+1 .. s+4
    batch, m = s.sample_masked(400)
    assert set(batch[:, 0].tolist()) == {6, 7, 8, 9, 56, 57, 58, 59}
    assert (m.sum(axis=1) == 1).all() and np.array_equal(m, mask[batch[:, 1:]])
    state = s.get_state()
    want = s.sample_masked(3)[0]
    again = Sampler(tokens, 5, seed=99, mask=mask)
    again.set_state(state)
    assert np.array_equal(again.sample_masked(3)[0], want)
    with pytest.raises(Npgpt2Error, match="no window of 5 tokens holds"):
        Sampler(tokens, 5, mask=np.zeros(100, np.uint8))


def test_evaluate_scores_only_masked_tokens():
    model = npgpt2.load_model(FIX / "tiny", dtype=np.float64)
    tokens = np.random.default_rng(0).integers(0, 96, 40).astype(np.uint16)
    mask = np.zeros(40, np.uint8)
    mask[[5, 6, 30]] = 1
    loss, n = train_mod.evaluate(model, tokens, 16, mask=mask)
    assert n == 3
    # every token was predicted with the whole context before it in one window of 16 or fewer:
    # the windows start at 0, 16, 32, so positions 5, 6 and 30 are targets 4, 5 and 13 of theirs
    w0 = train_mod.forward_losses(model, tokens[None, 0:16].astype(np.int64), tokens[None, 1:17].astype(np.int64))
    w1 = train_mod.forward_losses(model, tokens[None, 16:32].astype(np.int64), tokens[None, 17:33].astype(np.int64))
    assert loss == pytest.approx((w0[0, 4] + w0[0, 5] + w1[0, 13]) / 3, rel=1e-12)


# ---------------------------------------------------------------- training runs
def chat_npz(tmp_path, tok, n=40, weight=1):
    rows = [{"messages": [{"role": "user", "content": f"count {i % 4}"},
                          {"role": "assistant", "content": "one two three", "weight": weight}]} for i in range(n)]
    out, *_ = encoded(tmp_path, tok, rows, "--user_tag", "Q:", "--bot_tag", "A:")
    return out


def full_cfg(tmp_path, dataset, **kw):
    base = dict(dataset=str(dataset), models_dir=str(FIX), model_name="full", checkpoint_dir=str(tmp_path / "ck"),
                run_name="r", context=16, batch_size=2, learning_rate=1e-2, seed=5, sample_every=0,
                save_every=0, plot=False)
    base.update(kw)
    return TrainConfig(**base)


def test_train_records_the_template_and_chat_uses_it(tmp_path, tok, capsys):
    data = chat_npz(tmp_path, tok)
    result = train_mod.train(full_cfg(tmp_path, data, steps=2))
    capsys.readouterr()
    run = tmp_path / "ck" / "r"
    assert result["step"] == 2
    assert json.loads((run / "chat.json").read_text()) == {"user_tag": "Q:", "bot_tag": "A:", "system": ""}
    assert chat.read_template(run) == {"user_tag": "Q:", "bot_tag": "A:", "system": ""}
    import io
    import sys
    for flags, tags in (([], ("Q:", "A:")), (["--user_tag", "Me:"], ("Me:", "A:"))):
        old = sys.stdin
        sys.stdin = io.StringIO("count 1\n")
        try:
            assert main(["chat", "--models_dir", str(tmp_path / "ck"), "--model_name", "r", "--length", "3",
                         "--seed", "1", *flags]) == 0
        finally:
            sys.stdin = old
        out = capsys.readouterr().out
        assert out.startswith(f"{tags[0]} count 1\n{tags[1]} "), out


def test_server_app_uses_the_system_text(tok):
    from npgpt2.server import App
    model = npgpt2.load_model(FIX / "full")
    app = App(model, tok, user_tag="Q:", bot_tag="A:", system="Be brief.")
    job = app.chat_job({"messages": [{"role": "user", "content": "hi"}], "length": 2})
    try:
        assert tok.decode(job.gen.rows[0].prompt) == "Be brief.\nQ: hi\nA:"
    finally:
        app.worker.stop()


def test_a_mask_without_ones_refuses_to_train(tmp_path, tok):
    data = chat_npz(tmp_path, tok, weight=0)
    with pytest.raises(Npgpt2Error, match=r"c\.npz: the loss mask has no 1s"):
        train_mod.train(full_cfg(tmp_path, data, steps=1))
    with pytest.raises(Npgpt2Error, match="--train_on assistant: .* has no loss mask"):
        plain = tmp_path / "plain.npz"
        np.savez(plain, np.arange(200, dtype=np.uint16))
        train_mod.train(full_cfg(tmp_path, plain, steps=1, train_on="assistant"))
    assert not (tmp_path / "ck" / "r" / "checkpoint").exists()


def test_chat_on_a_vocabulary_without_the_tags_exits_nonzero(tmp_path, capsys):
    """A compact vocabulary (as the demo's) that cannot spell "User:": one line naming the flags, exit 2."""
    from npgpt2.compact_vocab import VOCAB_FILE
    from npgpt2.model import init_model, save_model
    base = npgpt2.load_tokenizer()
    vocab = np.unique(base.encode("hello world, a kludge"))
    model = init_model(dict(n_vocab=int(vocab.size), n_ctx=16, n_embd=8, n_head=2, n_layer=1))
    save_model(model, tmp_path / "m")
    np.save(tmp_path / "m" / VOCAB_FILE, vocab.astype(np.int64))
    import io
    import sys
    old = sys.stdin
    sys.stdin = io.StringIO("hello\n")
    try:
        code = main(["chat", "--models_dir", str(tmp_path), "--model_name", "m"])
    finally:
        sys.stdin = old
    err = capsys.readouterr().err
    assert code == 2 and "--user_tag 'User:'" in err and "--user_tag/--bot_tag" in err and err.count("\n") == 1


# ---------------------------------------------------------------- early stopping and the best checkpoint
def test_early_stop_at_k_plus_n_and_model_best_holds_step_k(tmp_path, tok, monkeypatch):
    """Seam: train.validate is replaced by a scripted sequence of validation losses (falling to
    step k = 3, then rising); the stop, the best save and its weights are the real code path."""
    data = chat_npz(tmp_path, tok)
    script = iter([5.0, 4.0, 3.0, 3.5, 3.2, 3.9, 1.0, 1.0])
    monkeypatch.setattr(train_mod, "validate", lambda model, batches: next(script))
    cfg = full_cfg(tmp_path, data, steps=20, val_every=1, val_batch_count=1, early_stop=3, keep_best=True,
                   save_every=1, max_to_keep=1)
    run = tmp_path / "ck" / "r"
    model, state = restore(cfg, run)
    at = {}
    result = fit(model, np.concatenate(list(read_npz_tokens(data))), cfg, run, state=state,
                 mask=np.concatenate(chat_data.read_npz_extras(data)[0]),
                 on_step=lambda info: at.__setitem__(info["step"], {k: v.copy() for k, v in model.params.items()}))
    assert result["step"] == 6 and result["early_stopped"] and not result["interrupted"]
    best = json.loads((run / "best.json").read_text())
    assert best == {"checkpoint": "model-best-3", "step": 3, "val_loss": 3.0}
    kept = sorted(p.name for p in run.iterdir() if p.name.startswith(("model-", "train_state-")))
    assert kept == ["model-6.data-00000-of-00001", "model-6.index", "model-best-3.data-00000-of-00001",
                    "model-best-3.index", "train_state-6.npz", "train_state-best-3.npz"]
    loaded = npgpt2.load_model(run, checkpoint=str(run / "model-best-3"))
    assert all(np.array_equal(loaded.params[k], at[3][k]) for k in at[3])
    assert not all(np.array_equal(at[3][k], at[6][k]) for k in at[3])
    # --restore_from best continues from it: its weights and its train state (step 3)
    model, state = restore(full_cfg(tmp_path, data, restore_from="best"), run)
    assert int(state["step"]) == 3 and all(np.array_equal(model.params[k], at[3][k]) for k in at[3])


def test_a_kill_during_a_best_save_leaves_a_complete_best(tmp_path, tok, monkeypatch):
    from test_train import Killed, kill_at
    data = chat_npz(tmp_path, tok)
    tokens = np.concatenate(list(read_npz_tokens(data)))
    k = 1
    while True:
        run = tmp_path / "ck" / f"k{k}"
        script = iter([5.0, 4.0, 3.0])
        monkeypatch.setattr(train_mod, "validate", lambda model, batches, script=script: next(script))
        cfg = full_cfg(tmp_path, data, run_name=f"k{k}", steps=2, val_every=1, val_batch_count=1, keep_best=True)
        model, state = restore(cfg, run)
        fit(model, tokens, cfg, run, state=state)
        cfg.steps = 1
        model, state = restore(cfg, run)
        with monkeypatch.context() as m:
            kill_at(m, k)
            try:
                fit(model, tokens, cfg, run, state=state)
                finished = True
            except Killed:
                finished = False
        best = json.loads((run / "best.json").read_text())
        assert best["step"] in (2, 3)
        assert (run / f"model-best-{best['step']}.index").is_file(), f"killed at operation {k}"
        model, state = restore(full_cfg(tmp_path, data, run_name=f"k{k}", restore_from="best"), run)
        assert int(state["step"]) == best["step"]
        if finished:
            break
        k += 1
    assert k >= 4


def test_flags_need_validation():
    for kw in (dict(early_stop=2), dict(keep_best=True)):
        with pytest.raises(Npgpt2Error, match="needs validation: give --val_every"):
            train_mod.check_config(TrainConfig(**kw), 16)
    with pytest.raises(Npgpt2Error, match="--train_on must be 'assistant' or 'all', got 'user'"):
        train_mod.check_config(TrainConfig(train_on="user"), 16)


def test_restore_best_without_one_is_one_line(tmp_path, tok):
    data = chat_npz(tmp_path, tok)
    train_mod.train(full_cfg(tmp_path, data, steps=1))
    with pytest.raises(Npgpt2Error, match=r"best\.json: missing; the run kept no best checkpoint"):
        train_mod.train(full_cfg(tmp_path, data, steps=1, restore_from="best"))
    shutil.rmtree(tmp_path / "ck")


MASKED_EQUIV = r"""
import sys, numpy as np
from npgpt2 import dist
from npgpt2.model import init_model
from npgpt2.train import TrainConfig, fit
ranks = int(sys.argv[1])
comm = dist.get_comm() if ranks > 1 else dist.SingleProcess()
model = init_model(dict(n_vocab=96, n_ctx=16, n_embd=24, n_head=3, n_layer=2), seed=3, dtype="float64")
rng = np.random.default_rng(0)
tokens = rng.integers(0, 96, 3000).astype(np.uint16)
mask = (rng.random(3000) < 0.1).astype(np.uint8)  # windows hold different counts of targets
cfg = TrainConfig(context=8, batch_size=2, accumulate_gradients=2 if ranks == 1 else 1, learning_rate=3e-3,
                  seed=11, steps=4, sample_every=0, save_every=0, plot=False, shared_stream=True)
out = fit(model, tokens, cfg, comm=comm, mask=mask)
if comm.is_main:
    np.savez(sys.argv[2], loss=out["loss"], **{k.replace("/", "|"): v for k, v in model.params.items()})
"""


def test_two_ranks_equal_one_rank_accumulating_two_with_a_mask(tmp_path):
    """Masked: 2 ranks x batch 2 == 1 process x 2 micro-batches on the same batches (shared_stream):
    the step's mean is over every masked position, whichever rank holds it (weights summed)."""
    import os
    import subprocess
    import sys

    from test_dist import ROOT, mpi_available, mpirun
    if mpi_available() is not None and os.environ.get("NPGPT2_REQUIRE_MPI") != "1":
        pytest.skip(mpi_available())
    script = tmp_path / "equiv.py"
    script.write_text(MASKED_EQUIV)
    one = subprocess.run([sys.executable, str(script), "1", str(tmp_path / "one.npz")], cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    two = mpirun(2, [str(script), "2", str(tmp_path / "two.npz")], timeout=300)
    assert two.returncode == 0, two.stdout + two.stderr
    a, b = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    assert set(a.files) == set(b.files) and len(a.files) > 10
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a.files) <= 1e-12


def test_masked_resume_is_exact(tmp_path, tok):
    """2 + 2 steps with a loss mask (validation and a best checkpoint too) == 4 steps, bit for bit."""
    data = chat_npz(tmp_path, tok)
    tokens = np.concatenate(list(read_npz_tokens(data)))
    mask = np.concatenate(chat_data.read_npz_extras(data)[0])

    def run(name, *steps):
        for n in steps:
            cfg = full_cfg(tmp_path, data, run_name=name, steps=n, val_every=1, val_batch_count=1, keep_best=True,
                           accumulate_gradients=2)
            model, state = restore(cfg, tmp_path / "ck" / name)
            fit(model, tokens, cfg, tmp_path / "ck" / name, state=state, mask=mask)
        return npgpt2.load_model(tmp_path / "ck" / name).params
    a, b = run("straight", 4), run("resumed", 2, 2)
    assert all(np.array_equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- demo --chat
def test_the_jargon_conversation_set():
    """Entries become (question, first sentence) conversations; held-out terms and their entries
    are in no training data. Expected sentences copied by hand from the Jargon File."""
    from npgpt2 import demo_chat
    e = dict(demo_chat.entries())
    assert demo_chat.short_definition(e["kluge"]) == \
        "A Rube Goldberg (or Heath Robinson) device, whether in hardware or software."
    assert demo_chat.short_definition(e["kludge"]) == \
        "Incorrect (though regrettably common) spelling of kluge (US)."
    assert demo_chat.short_definition(e["foo"]) == "Term of disgust."
    data = demo_chat.build_conversations(npgpt2.load_tokenizer(), seed=0)

    def terms(convs):
        out = set()
        for c in convs:
            q = c["messages"][0]["content"]
            m = re.fullmatch(r"What does '(.+)' mean\?|What is meant by '(.+)'\?|What is (.+)\?|Define (.+)\.", q)
            out.add(next(g for g in m.groups() if g))
        return out
    train, val, test = terms(data["train"]), terms(data["val"]), terms(data["test"])
    assert len(test) >= 50 and len(val) >= 50 and not (train & test) and not (train & val) and not (val & test)
    paragraphs = {p.partition(": ")[0] for p in data["train_text"].strip().split("\n\n")}
    assert not (paragraphs & (test | val)) and train <= paragraphs
    assert len(data["train"]) == 2 * len(train)
    c = data["test"][0]["messages"]
    assert [m["role"] for m in c] == ["user", "assistant"] and c[1]["content"] == demo_chat.short_definition(
        e[next(iter(terms(data["test"][:1])))])


def test_demo_chat_quick_prints_answers_without_a_terminal(tmp_path):
    """`npgpt2 demo --chat --quick` end to end: a run folder with chat.json that `chat` loads."""
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "npgpt2.cli", "demo", "--chat", "--quick", "--out",
                          str(tmp_path / "dc")], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                         timeout=600, cwd=tmp_path, env={**__import__("os").environ,
                                                         "PYTHONPATH": str(Path(__file__).parents[1])})
    assert out.returncode == 0, out.stderr
    assert "Greedy answers to questions about held-out terms" in out.stdout
    assert len(re.findall(r"^Q: .*\nA: ", out.stdout, re.M)) == 4
    assert chat.read_template(tmp_path / "dc") == {"user_tag": "Q:", "bot_tag": "A:", "system": ""}
    assert (tmp_path / "dc" / "conversations-test.jsonl").is_file()
