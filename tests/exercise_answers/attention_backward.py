import math

import numpy as np


def heads(x, NH):
    B, T, C = x.shape
    return x.reshape(B, T, NH, C // NH).transpose(0, 2, 1, 3)


def merge(x):
    B, NH, T, hs = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, T, NH * hs)


def attention_backward(dout, qkv, att, NH):
    C = qkv.shape[-1] // 3
    q, k, v = heads(qkv[..., :C], NH), heads(qkv[..., C:2 * C], NH), heads(qkv[..., 2 * C:], NH)
    dy = heads(dout, NH)
    datt = dy @ np.swapaxes(v, -1, -2)
    dv = np.swapaxes(att, -1, -2) @ dy
    dscores = att * (datt - (datt * att).sum(axis=-1, keepdims=True)) / math.sqrt(C // NH)
    dq = dscores @ k
    dk = np.swapaxes(dscores, -1, -2) @ q
    return np.concatenate([merge(dq), merge(dk), merge(dv)], axis=-1)
