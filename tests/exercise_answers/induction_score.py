import numpy as np


def induction_score(pattern, period):
    B, NH, T, _ = pattern.shape
    scores = np.zeros(NH)
    for h in range(NH):
        weights = [pattern[b, h, t, t - period + 1] for b in range(B) for t in range(period, T)]
        scores[h] = np.mean(weights)
    return scores
