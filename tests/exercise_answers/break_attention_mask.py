import math

import numpy as np


def attention_forward(qkv, NH):
    B, T, C3 = qkv.shape
    C = C3 // 3
    q, k, v = (x.reshape(B, T, NH, C // NH).transpose(0, 2, 1, 3) for x in np.split(qkv, 3, axis=-1))
    scores = (q @ k.transpose(0, 1, 3, 2)) / math.sqrt(C // NH)
    scores = np.where(np.triu(np.ones((T, T), dtype=bool), k=2), -np.inf, scores)
    e = np.exp(scores - scores.max(axis=-1, keepdims=True))
    att = e / e.sum(axis=-1, keepdims=True)
    return (att @ v).transpose(0, 2, 1, 3).reshape(B, T, C), att


SYMPTOM = "B"
