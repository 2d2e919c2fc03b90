"""The model's linear layers (TF's conv1d), with or without a LoRA adapter: forward and
backward over one block's parameters (GPT2.blocks[i], short names such as "attn/c_attn/w").
"""


def linear(lay, blk, name, x, lora_h=None):
    """x @ W + b for blk's matrix `name` (e.g. "attn/c_attn"), x (B, T, C) -> (B, T, OC); with a
    LoRA adapter on it (lora.attach put `name/lora_A`, `/lora_B`, `/lora_scaling` in blk),
    lora_forward's x @ W + b + scaling * (x @ A) @ B, its h = x @ A kept in lora_h[name]."""
    if name + "/lora_A" not in blk:
        return lay.matmul_forward(x, blk[name + "/w"], blk[name + "/b"])
    out, h = lay.lora_forward(x, blk[name + "/w"], blk[name + "/b"], blk[name + "/lora_A"],
                             blk[name + "/lora_B"], blk[name + "/lora_scaling"])  # [B, T, OC], [B, T, r]
    if lora_h is not None:
        lora_h[name] = h
    return out


def linear_backward(lay, blk, name, dout, x, g, lora_h=None):
    """The backward of linear: dout (B, T, OC) -> dx (B, T, C). lora_h None: the base trains,
    g gets `name/w` (1, C, OC) and `name/b`. Otherwise the base is frozen: an adapted matrix
    gives g `name/lora_A`, `name/lora_B` (lora_backward), any other only dx = dout @ W^T."""
    w = blk[name + "/w"]
    if lora_h is None:
        dx, dw, g[name + "/b"] = lay.matmul_backward(dout, x, w)  # [B, T, OC] -> [B, T, C]
        g[name + "/w"] = dw[None]  # [C, OC] -> [1, C, OC], the conv1d weight's shape
        return dx
    if name in lora_h:
        dx, g[name + "/lora_A"], g[name + "/lora_B"] = lay.lora_backward(
            dout, x, w, blk[name + "/lora_A"], blk[name + "/lora_B"], blk[name + "/lora_scaling"],
            lora_h[name])  # [B, T, C], [C, r], [r, OC]
        return dx
    C, OC = w.shape
    return (dout.reshape(-1, OC) @ w.T).reshape(x.shape)  # [N, OC] @ [OC, C]: the input gradient alone
