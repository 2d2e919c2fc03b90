"""The exercises: what each asks, a starter to copy, hints, and which checker grades it."""
from dataclasses import dataclass, field

from . import backward, breakit, others


@dataclass
class Exercise:
    """name: what `npgpt2 exercise` calls it; function: what the answer file must define (the
    package function's name and signature); kind: "write" or "break"; grade(module, seed) -> [Case]."""
    name: str
    function: str
    kind: str
    title: str
    task: str
    starter: str
    hints: tuple = field(default_factory=tuple)
    grade: object = None


def _write(name, title, task, starter, hints, grader):
    return Exercise(name, name, "write", title, task, starter, tuple(hints),
                    lambda module, seed: grader(getattr(module, name), seed))


def _break(name, function, title, task, starter, hints):
    return Exercise(name, function, "break", title, task, starter, tuple(hints),
                    lambda module, seed: breakit.grade_break(name, module, seed))


EXERCISES = [
    _write("layernorm_backward", "the backward pass of layer normalisation",
           "The forward (layers.py: layernorm_forward) is out = (x - mean) * rstd * weight + bias over the\n"
           "last axis, rstd = 1 / sqrt(var + 1e-5). Given dout = dL/dout, return dL/dx, dL/dweight, dL/dbias.\n"
           "Shapes: dout, inp (..., C); weight (C,); mean, rstd (...) as the forward returned them.\n"
           "Returns dinp (..., C), dweight (C,), dbias (C,).",
           "def layernorm_backward(dout, inp, weight, mean, rstd):\n"
           "    \"\"\"-> dinp (..., C), dweight (C,), dbias (C,).\"\"\"\n"
           "    raise NotImplementedError\n",
           ["dbias and dweight sum over every axis but the last: each channel's weight touches every position.",
            "Write norm = (inp - mean) * rstd and dnorm = dout * weight. dinp is rstd times dnorm minus two "
            "means over the row: mean(dnorm), and norm * mean(dnorm * norm).",
            "Both means come from mean and rstd depending on every x_i of the row; keepdims=True keeps "
            "them broadcastable."],
           backward.grade_layernorm),
    _write("gelu_backward", "the backward pass of GELU (tanh form)",
           "gelu(x) = 0.5 x (1 + tanh(s (x + 0.044715 x^3))), s = sqrt(2 / pi) (layers.py: gelu_forward).\n"
           "Return dinp = dout * gelu'(x), same shape as inp.",
           "import math\n\nimport numpy as np\n\n\ndef gelu_backward(dout, inp):\n"
           "    \"\"\"-> dinp, same shape as inp.\"\"\"\n    raise NotImplementedError\n",
           ["Product rule: d/dx [0.5 x (1 + t)] = 0.5 (1 + t) + 0.5 x dt/dx, with t = tanh(u).",
            "dt/dx = (1 - t^2) du/dx and du/dx = s (1 + 3 * 0.044715 x^2)."],
           backward.grade_gelu),
    _write("attention_backward", "the backward pass of causal self-attention",
           "layers.py: attention_forward(qkv, NH) splits qkv (B, T, 3C) into q, k, v (B, NH, T, hs), takes\n"
           "att = softmax(q k^T / sqrt(hs), future masked) and returns out = att @ v, heads merged (B, T, C),\n"
           "and att (B, NH, T, T). Given dout (B, T, C), return dqkv (B, T, 3C).",
           "import math\n\nimport numpy as np\n\nfrom npgpt2.layers import merge_heads, split_heads\n\n\n"
           "def attention_backward(dout, qkv, att, NH):\n    \"\"\"dout: (B, T, C) -> dqkv (B, T, 3C).\"\"\"\n"
           "    raise NotImplementedError\n",
           ["Go backwards through out = att @ v: datt = dy @ v^T and dv = att^T @ dy (dy: dout split into heads).",
            "Softmax backward, row by row: dscores = att * (datt - sum(datt * att, last axis)). Masked entries "
            "have att = 0, so they get no gradient by themselves.",
            "Do not forget the 1/sqrt(hs) scale; then dq = dscores @ k, dk = dscores^T @ q; merge the heads "
            "and concatenate dq, dk, dv."],
           backward.grade_attention),
    _write("crossentropy_softmax_backward", "softmax + cross-entropy, backwards together",
           "losses = -log softmax(logits)[target] per position (layers.py: crossentropy_forward returns the\n"
           "losses (B, T) and probs (B, T, V)). Given dlosses (B, T), return dlogits (B, T, V).",
           "import numpy as np\n\n\ndef crossentropy_softmax_backward(dlosses, probs, targets):\n"
           "    \"\"\"dlosses: (B, T), probs: (B, T, V), targets: int (B, T) -> dlogits (B, T, V).\"\"\"\n"
           "    raise NotImplementedError\n",
           ["d(-log p_target)/d logit_j = p_j - 1[j == target].",
            "Scale each position's row by its dlosses (the checker does not use 1/(B T) everywhere)."],
           backward.grade_crossentropy),
    _write("adamw_update", "one AdamW step, in place",
           "Same math as torch.optim.AdamW (optim.py explains it): decay p by lr * weight_decay, update the\n"
           "moments m and v, then step by the bias-corrected ratio. Change p, m and v in place; return nothing.\n"
           "step is the 1-based number of this update.",
           "import math\n\nimport numpy as np\n\n\n"
           "def adamw_update(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step):\n"
           "    \"\"\"One AdamW step, in place on p, m, v.\"\"\"\n    raise NotImplementedError\n",
           ["In place: p -= ..., m *= beta1; m += ..., never p = ... (that only rebinds your local name).",
            "Decoupled decay: p *= 1 - lr * weight_decay first, not g += weight_decay * p.",
            "m_hat = m / (1 - beta1**step), v_hat = v / (1 - beta2**step); p -= lr * m_hat / (sqrt(v_hat) + eps)."],
           others.grade_adamw),
    _write("bpe_merge_round", "one round of GPT-2's BPE merge loop",
           "word: a list of symbols; merges: {(a, b): (rank, merged)}. Find the adjacent pair with the lowest\n"
           "rank, replace it by `merged` at every occurrence, scanning left to right, and return\n"
           "(rank, (a, b), merged, at, new_word), `at` the indices in `word` where it merged; None when no\n"
           "pair has a rank. tokenizer.py: bpe_merge_rounds runs these rounds until None.",
           "def bpe_merge_round(word, merges):\n"
           "    \"\"\"-> (rank, (a, b), merged, at, new_word), or None.\"\"\"\n    raise NotImplementedError\n",
           ["Scan zip(word, word[1:]) and keep the pair with the smallest merges[pair][0].",
            "Rebuild the word with an index i: when word[i], word[i + 1] is the pair, append merged and "
            "skip two; otherwise append word[i] and move one. So 'a a a' with (a, a) gives 'aa a'."],
           others.grade_bpe),
    _write("top_p_filter", "nucleus (top-p) filtering",
           "logits: (V,). Return a copy where every token outside the nucleus is -inf: the most likely\n"
           "tokens (ties broken by the smaller id) whose probabilities first reach top_p in total (always\n"
           "at least one). 0 < top_p < 1. sampling.py: sample_logits draws from what is left.",
           "import numpy as np\n\n\ndef top_p_filter(logits, top_p):\n"
           "    \"\"\"(V,) -> (V,) float, -inf outside the nucleus.\"\"\"\n    raise NotImplementedError\n",
           ["Sort most likely first with np.lexsort((ids, -logits)) so ties go to the smaller id.",
            "Keep the first k where cumsum(sorted probs)[k - 1] >= top_p: np.searchsorted(cumsum, top_p) + 1.",
            "A common slip keeps only the tokens whose cumsum is below top_p: one too few."],
           others.grade_top_p),
    _write("induction_score", "how much a head looks like an induction head",
           "pattern: (B, NH, T, T) attention probabilities of one layer, on tokens made of a random block of\n"
           "`period` tokens followed by the same block again. An induction head at position t (in the repeat)\n"
           "attends to the token after the previous occurrence of the current token. Return (NH,): for each\n"
           "head, the mean weight on that position over the batch and every t from `period` on.",
           "import numpy as np\n\n\ndef induction_score(pattern, period):\n"
           "    \"\"\"(B, NH, T, T) -> (NH,).\"\"\"\n    raise NotImplementedError\n",
           ["The current token at t appeared before at t - period.",
            "So the head should look at t - period + 1; index with two arrays: pattern[:, :, t, t - period + 1]."],
           others.grade_induction),
    _break("break_layernorm_mean", "layernorm_backward", "drop a mean term of layernorm's backward",
           "Copy layers.py's layernorm_backward into your file and delete `- dnorm.mean(axis=-1, keepdims=True)`.\n"
           "Run it. What goes wrong? Put in the file SYMPTOM = the letter:\n"
           "  A. dinp, dweight and dbias are all wrong\n"
           "  B. only dinp is wrong, by the same amount at every channel of a row (its rows no longer sum to 0)\n"
           "  C. only dinp is wrong, and only where the normalised input is large\n"
           "  D. nothing changes: that mean is always 0",
           "import numpy as np\n\n\ndef layernorm_backward(dout, inp, weight, mean, rstd):\n"
           "    ...  # layers.py's, with the mean term deleted\n\n\nSYMPTOM = \"?\"\n",
           ["`npgpt2 exercise check layernorm_backward FILE` on your broken copy says which output fails."]),
    _break("break_embedding_add_at", "embedding_backward", "+= instead of np.add.at in the embedding's backward",
           "Copy layers.py's embedding_backward and replace np.add.at(dwte, inp.reshape(-1), dout.reshape(-1, C))\n"
           "by dwte[inp.reshape(-1)] += dout.reshape(-1, C). What goes wrong? SYMPTOM = the letter:\n"
           "  A. an IndexError\n"
           "  B. every row of dwte is wrong\n"
           "  C. a token that occurs more than once gets the gradient of only one occurrence; the others are right\n"
           "  D. dwpe is wrong",
           "import numpy as np\n\n\ndef embedding_backward(dout, inp, V, maxT):\n"
           "    ...  # layers.py's, with += for np.add.at\n\n\nSYMPTOM = \"?\"\n",
           ["Try inp = np.array([[3, 3]]) with dout of ones: what is dwte[3]?"]),
    _break("break_attention_mask", "attention_forward", "the causal mask off by one",
           "Copy layers.py's attention_forward (drop its hook argument if you like) and make the mask\n"
           "np.triu(np.ones((T, T), dtype=bool), k=2) instead of k=1. What goes wrong? SYMPTOM = the letter:\n"
           "  A. position 0 gets NaN\n"
           "  B. position t also sees t + 1: a model trained so copies the next token (training loss near 0)\n"
           "     and generates no better\n"
           "  C. no position sees itself any more\n"
           "  D. nothing: softmax gives masked entries 0 anyway",
           "import math\n\nimport numpy as np\n\nfrom npgpt2.layers import merge_heads, softmax, split_heads\n\n\n"
           "def attention_forward(qkv, NH):\n    ...  # layers.py's, with k=2 in the mask\n\n\nSYMPTOM = \"?\"\n",
           ["Print att[0, 0] for T = 4: which entries above the diagonal are not 0?"]),
]
BY_NAME = {e.name: e for e in EXERCISES}
