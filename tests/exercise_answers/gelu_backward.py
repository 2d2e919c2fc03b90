import math

import numpy as np


def gelu_backward(dout, inp):
    s = math.sqrt(2.0 / math.pi)
    u = s * (inp + 0.044715 * inp ** 3)
    t = np.tanh(u)
    du = s * (1.0 + 3 * 0.044715 * inp ** 2)
    return dout * (0.5 * (1.0 + t) + 0.5 * inp * (1.0 - t ** 2) * du)
