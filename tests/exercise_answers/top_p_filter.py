import numpy as np


def top_p_filter(logits, top_p):
    ids = np.arange(len(logits))
    order = sorted(ids, key=lambda i: (-logits[i], i))
    p = np.exp(logits - np.max(logits))
    p = p / p.sum()
    out = np.full(len(logits), -np.inf)
    total = 0.0
    for i in order:
        out[i] = logits[i]
        total += p[i]
        if total >= top_p:
            break
    return out
