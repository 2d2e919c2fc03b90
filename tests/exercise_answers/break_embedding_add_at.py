import numpy as np


def embedding_backward(dout, inp, V, maxT):
    B, T, C = dout.shape
    dwte = np.zeros((V, C), dtype=dout.dtype)
    dwte[inp.reshape(-1)] += dout.reshape(-1, C)
    dwpe = np.zeros((maxT, C), dtype=dout.dtype)
    dwpe[:T] = dout.sum(axis=0)
    return dwte, dwpe


SYMPTOM = "C"
