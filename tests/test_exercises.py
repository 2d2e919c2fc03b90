"""`npgpt2 exercise`: a correct answer passes every case; each typical mistake fails with a
message that names the case, the output and by how much.

The correct answers in tests/exercise_answers/ are written by hand (they call nothing from
npgpt2); each mistake below is one of them with one edit, the slip a learner typically makes.
"""
from pathlib import Path

import pytest

from npgpt2 import exercises
from npgpt2.cli import main
from npgpt2.errors import Npgpt2Error

ANSWERS = Path(__file__).parent / "exercise_answers"


def answer_file(tmp_path, name, old=None, new=None):
    """The correct answer for `name`, or a copy of it with `old` replaced by `new`."""
    src = (ANSWERS / f"{name}.py").read_text()
    if old is None:
        return ANSWERS / f"{name}.py"
    assert old in src, f"{name}: the mistake's text {old!r} is not in the answer"
    path = tmp_path / f"{name}_mistake.py"
    path.write_text(src.replace(old, new, 1))
    return path


def failures(name, path):
    _, cases = exercises.check(name, path)
    return [c for c in cases if not c.ok]


@pytest.mark.parametrize("name", [e.name for e in exercises.EXERCISES])
def test_a_correct_answer_passes_every_case(name):
    ex, cases = exercises.check(name, ANSWERS / f"{name}.py")
    assert len(cases) >= 3
    assert all(c.ok for c in cases), exercises.format_check(ex, cases, name)


MISTAKES = [
    # (exercise, text of the correct answer, the mistake, what the message must say)
    ("layernorm_backward", "dinp = dnorm - dnorm.mean(axis=-1, keepdims=True)", "dinp = dnorm",
     "dinp differs from finite differences: relative error"),
    ("layernorm_backward", "dinp = dinp * rstd[..., None]", "dinp = dinp", "dinp differs from finite differences"),
    ("layernorm_backward", "dbias = dout.reshape(-1, C).sum(axis=0)", "dbias = dout.sum(axis=0)",
     "dbias has shape"),
    ("layernorm_backward", "return dinp, dweight, dbias", "return dinp, dweight", "should return 3 values"),
    ("gelu_backward", "3 * 0.044715", "0.044715", "dinp differs from finite differences"),
    ("gelu_backward", "return dout * (", "return (", "dinp differs from finite differences"),
    ("attention_backward", " / math.sqrt(C // NH)", "", "dqkv differs from finite differences"),
    ("attention_backward", "(datt - (datt * att).sum(axis=-1, keepdims=True))", "datt",
     "dqkv differs from finite differences"),
    ("attention_backward", "np.swapaxes(dscores, -1, -2) @ q", "dscores @ q", "dqkv differs"),
    ("crossentropy_softmax_backward", "return dlogits * dlosses[..., None]", "return dlogits",
     "dlogits differs from finite differences"),
    ("crossentropy_softmax_backward", "dlogits[b, t, targets[b, t]] -= 1.0", "dlogits[b, t, targets[b, 0]] -= 1.0",
     "dlogits differs"),
    ("adamw_update", "m_hat = m / (1.0 - beta1 ** step)", "m_hat = m", "p after step 1 differs"),
    ("adamw_update", "p -= lr * m_hat / (v_hat ** 0.5 + eps)", "p = p - lr * m_hat / (v_hat ** 0.5 + eps)",
     "p did not change"),
    ("adamw_update", "p *= 1.0 - lr * weight_decay", "g = g + weight_decay * p", "differs from optim.adamw_update"),
    ("bpe_merge_round", "merges[pair][0] < merges[best][0]", "False", "expected 0 (the lowest-ranked pair"),
    ("bpe_merge_round", "            i += 2", "            i += 1", "new_word is"),
    ("bpe_merge_round", "return None", "return word", "the answer is None"),
    ("top_p_filter", "        out[i] = logits[i]\n        total += p[i]\n        if total >= top_p:\n            break",
     "        total += p[i]\n        if total >= top_p:\n            break\n        out[i] = logits[i]", "kept tokens"),
    ("top_p_filter", "key=lambda i: (-logits[i], i)", "key=lambda i: (-logits[i], -i)", "ties by the smaller id"),
    ("top_p_filter", "out = np.full(len(logits), -np.inf)", "out = np.full(len(logits), np.nan)", "NaN"),
    ("induction_score", "t - period + 1", "t - period", "the result differs from interp.induction_score"),
    ("break_layernorm_mean", 'SYMPTOM = "B"', 'SYMPTOM = "A"', "is not what this mistake does"),
    ("break_layernorm_mean", 'SYMPTOM = "B"', 'SYMPTOM = "maybe"', 'needs SYMPTOM = "A"'),
    ("break_layernorm_mean", "dinp = (dnorm - norm", "dinp = (dnorm - dnorm.mean(axis=-1, keepdims=True) - norm",
     "differs from layernorm_backward with the mean term dropped"),
    ("break_embedding_add_at", "dwte[inp.reshape(-1)] += dout.reshape(-1, C)",
     "np.add.at(dwte, inp.reshape(-1), dout.reshape(-1, C))", "differs from embedding_backward with +="),
    ("break_embedding_add_at", 'SYMPTOM = "C"', 'SYMPTOM = "B"', "is not what this mistake does"),
    ("break_attention_mask", "k=2", "k=1", "differs from attention_forward with the mask one place late"),
    ("break_attention_mask", 'SYMPTOM = "B"', 'SYMPTOM = "D"', "is not what this mistake does"),
]


@pytest.mark.parametrize("name, old, new, says", MISTAKES, ids=[f"{m[0]}-{i}" for i, m in enumerate(MISTAKES)])
def test_a_typical_mistake_fails_with_a_useful_message(tmp_path, name, old, new, says):
    bad = failures(name, answer_file(tmp_path, name, old, new))
    assert bad, f"{name}: the mistake {new!r} passed"
    assert any(says in c.detail for c in bad), [c.detail for c in bad]
    assert all(c.label and c.detail for c in bad)


def test_the_message_says_which_case_where_and_by_how_much(tmp_path):
    path = answer_file(tmp_path, "layernorm_backward", "dinp = dinp * rstd[..., None]", "dinp = dinp")
    ex, cases = exercises.check("layernorm_backward", path)
    text = exercises.format_check(ex, cases, path)
    first = next(c for c in cases if not c.ok)
    assert first.label.startswith("case ") and "inp (" in first.label
    for words in ("relative error", "tolerance 1e-06", "worst at [", "yours", "finite differences"):
        assert words in first.detail
    assert f"FAIL {first.label}" in text and "cases passed. Hints: npgpt2 exercise show layernorm_backward --hint" in text


def test_an_exception_names_the_learners_line(tmp_path):
    path = answer_file(tmp_path, "gelu_backward", "t = np.tanh(u)", "t = np.tanh(u) + undefined_name")
    bad = failures("gelu_backward", path)
    assert bad and "raised NameError" in bad[0].detail and "line 9" in bad[0].detail


def test_the_starter_is_reported_as_not_written(tmp_path):
    for e in exercises.EXERCISES:
        if e.kind == "write":
            path = tmp_path / f"{e.name}.py"
            path.write_text(e.starter)
            bad = failures(e.name, path)
            assert bad and "raised NotImplementedError" in bad[0].detail


def test_another_seed_draws_other_shapes():
    _, a = exercises.check("layernorm_backward", ANSWERS / "layernorm_backward.py", seed=0)
    _, b = exercises.check("layernorm_backward", ANSWERS / "layernorm_backward.py", seed=3)
    assert all(c.ok for c in a + b) and [c.label for c in a] != [c.label for c in b]


@pytest.mark.parametrize("content, says", [
    (None, "no such file"),
    ("def layernorm_backward(:\n", "line 1"),
    ("import no_such_module_here\n", "importing it raised ModuleNotFoundError"),
    ("x = 1\n", "defines no function layernorm_backward()"),
])
def test_a_bad_file_is_one_line(tmp_path, content, says):
    path = tmp_path / "answer.py"
    if content is not None:
        path.write_text(content)
    with pytest.raises(Npgpt2Error, match=says) as e:
        exercises.check("layernorm_backward", path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_cli_list_show_check(capsys, tmp_path):
    assert main(["exercise", "list"]) == 0
    out = capsys.readouterr().out
    assert all(e.name in out for e in exercises.EXERCISES)
    assert main(["exercise", "show", "top_p_filter"]) == 0
    out = capsys.readouterr().out
    assert "def top_p_filter(logits, top_p):" in out and "Hint 1" not in out
    assert main(["exercise", "show", "top_p_filter", "--hint"]) == 0
    assert "Hint 1" in capsys.readouterr().out
    assert main(["exercise", "check", "induction_score", str(ANSWERS / "induction_score.py")]) == 0
    assert "All 5 cases passed." in capsys.readouterr().out
    bad = answer_file(tmp_path, "induction_score", "t - period + 1", "t - period")
    assert main(["exercise", "check", "induction_score", str(bad)]) == 1
    assert "FAIL case 1" in capsys.readouterr().out
    assert main(["exercise", "show", "no_such"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown (one of: layernorm_backward" in err
