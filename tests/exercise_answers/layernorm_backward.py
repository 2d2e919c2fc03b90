

def layernorm_backward(dout, inp, weight, mean, rstd):
    C = inp.shape[-1]
    norm = (inp - mean[..., None]) * rstd[..., None]
    dbias = dout.reshape(-1, C).sum(axis=0)
    dweight = (dout * norm).reshape(-1, C).sum(axis=0)
    dnorm = dout * weight
    dinp = dnorm - dnorm.mean(axis=-1, keepdims=True)
    dinp = dinp - norm * (dnorm * norm).mean(axis=-1, keepdims=True)
    dinp = dinp * rstd[..., None]
    return dinp, dweight, dbias
