

def crossentropy_softmax_backward(dlosses, probs, targets):
    dlogits = probs.copy()
    B, T = targets.shape
    for b in range(B):
        for t in range(T):
            dlogits[b, t, targets[b, t]] -= 1.0
    return dlogits * dlosses[..., None]
