import math


def adamw_update(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step):
    p *= 1.0 - lr * weight_decay
    m *= beta1
    m += (1.0 - beta1) * g
    v *= beta2
    v += (1.0 - beta2) * g * g
    m_hat = m / (1.0 - beta1 ** step)
    v_hat = v / (1.0 - beta2 ** step)
    p -= lr * m_hat / (v_hat ** 0.5 + eps)
    assert math.isfinite(lr)
