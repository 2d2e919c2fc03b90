"""The training loss: the output head, the cross-entropy and their backward, in chunks of
positions, so that the (B, T, V) logits, a step's largest array, never exist whole.
"""
import numpy as np

from .jit import ops
from .quant import QuantizedWeight

# training computes the logits this many positions at a time (256 x 50257 floats: 51 MB) ...
HEAD_ROWS = 256
# ... and adds each chunk's part of the output head's (V, C) gradient this many rows at a time
HEAD_VOCAB_BLOCK = 4096


class Loss:
    """GPT2's loss_and_grads (a mixin: GPT2 gives _trunk_with_saves, _trunk_backward, _head)."""

    def loss_and_grads(self, inputs, targets, mask=None, memory_saving=False):
        """inputs, targets: int (B, T) -> (mean cross-entropy, grads).

        grads has the same keys and shapes as params; the tied model/wte gets both the
        embedding's and the output head's contribution. mask: None, or 0/1 (B, T) on the
        targets: the loss is then sum(mask * ce) / sum(mask), the mean over the masked
        positions only (the caller never passes an all-zero mask), and grads are its gradients.
        memory_saving: keep only each block's input and recompute the block in the backward
        (see forward_with_saves); same gradients.
        """
        lay = ops()
        targets = np.asarray(targets)
        ln_f, saved = self._trunk_with_saves(inputs, lay, memory_saving)  # [B, T] -> [B, T, C]
        # dwte: [V, C]; with an adapter on the tied wte, the head's part of its gradients [dA, dB]
        losses, dln_f, dwte = self._head_loss_backward(lay, ln_f, targets, mask)  # [B, T], [B, T, C]
        del ln_f  # saved holds it until _trunk_backward is past ln_f
        grads, _ = self._trunk_backward(dln_f, dwte, saved)  # {name: array like params}
        if mask is None:
            return float(losses.mean()), grads
        return float(np.sum(losses * mask, dtype=np.float64) / np.sum(mask)), grads

    def _head_loss_backward(self, lay, ln_f, targets, mask=None):
        """The output head, the cross-entropy and their backward, HEAD_ROWS positions at a time.

        ln_f (B, T, C), targets (B, T), mask None or (B, T) -> (losses (B, T), dln_f (B, T, C),
        dwte (V, C) the head's part of wte's gradient; with an adapter on the tied wte, [dA (V, r),
        dB (r, C)] its head-side gradients instead): what _head, crossentropy_forward,
        crossentropy_softmax_backward (for the mean loss, or the masked mean) and backward's head
        give for the whole batch, up to float rounding.
        The logits are the largest array of a step (B*T*V floats: 206 MB at B=1, T=1024), so
        they never exist whole: each chunk's logits buffer holds its probabilities, then their
        gradient (the `out=` of the cross-entropy), and is gone before the next chunk's.
        """
        B, T, C = ln_f.shape
        V, N = self.hparams["n_vocab"], B * T
        wte = self._params["model/wte"]
        x, tgt = ln_f.reshape(1, N, C), targets.reshape(1, N)  # the B*T positions as one row
        losses = np.empty((1, N), dtype=self.dtype)
        dln_f = np.empty((1, N, C), dtype=self.dtype)
        dwte = None if self.lora is not None else np.empty((V, C), dtype=self.dtype)  # LoRA: wte is frozen
        if self.wte_lora is not None:  # ... but its adapter (A (V, r), B (r, C)) gets the head's gradients
            lora_A, lora_B, scaling = self.wte_lora
            dwte = [np.zeros_like(lora_A), np.zeros_like(lora_B)]
        if mask is None:
            dlosses = np.full((1, min(N, HEAD_ROWS)), 1.0 / N, dtype=self.dtype)  # d mean / d each loss
        else:  # d (sum(mask * ce) / sum(mask)) / d each loss: 0 off the mask
            dlosses = (np.asarray(mask, np.float64).reshape(1, N) / np.sum(mask)).astype(self.dtype)
        part = np.empty((min(V, HEAD_VOCAB_BLOCK), C), dtype=self.dtype)  # head_backward's scratch
        for n0 in range(0, N, HEAD_ROWS):
            n1 = min(N, n0 + HEAD_ROWS)
            if self.wte_lora is None:
                logits = self._head(x[:, n0:n1])  # [1, R, C] -> [1, R, V]
            else:  # u = x @ B^T (R, r), the adapter's part that its backward needs
                logits, u = lay.lora_head_forward(x[:, n0:n1], wte, *self.wte_lora)  # [1, R, V], [1, R, r]
            losses[:, n0:n1], probs = lay.crossentropy_forward(logits, tgt[:, n0:n1], out=logits)
            dlogits = lay.crossentropy_softmax_backward(
                dlosses[:, :n1 - n0] if mask is None else dlosses[:, n0:n1], probs, tgt[:, n0:n1],
                out=probs)  # [1, R, V], over probs
            # [1, R, V] -> dln_f [1, R, C]; the first chunk writes dwte, the later ones add to it
            if self.wte_lora is None:
                head_backward(dlogits, x[:, n0:n1], wte, dln_f[:, n0:n1], dwte, add=n0 > 0, part=part)
            else:  # the frozen head's input gradient and the adapter's, summed over the chunks
                dln_f[:, n0:n1], dA, dB = lay.lora_head_backward(dlogits, x[:, n0:n1], wte, *self.wte_lora, u)
                dwte[0] += dA
                dwte[1] += dB
            del logits, probs, dlogits  # this chunk's buffer goes before the next one is made
        return losses.reshape(B, T), dln_f.reshape(B, T, C), dwte


def head_backward(dlogits, x, wte, dx, dwte=None, add=False, part=None):
    """The output head's backward, for logits = x @ wte.T (the head is the token embedding).

    dlogits (1, R, V), x (1, R, C) the head's input -> dx[...] = dlogits @ wte (1, R, C), the
    gradient at x. dwte: None (LoRA: wte is frozen), or a (V, C) array that gets the head's
    part of wte's gradient, dlogits^T @ x: written (add=False), or added HEAD_VOCAB_BLOCK rows
    at a time into what it holds (add=True: a later chunk of rows, see _head_loss_backward),
    through `part` (HEAD_VOCAB_BLOCK, C) as scratch, so that no second (V, C) array is made.
    An int8 wte (a frozen 8-bit base under LoRA) is dequantised HEAD_VOCAB_BLOCK rows at a
    time, never whole.
    """
    V, C = wte.shape
    if not isinstance(wte, QuantizedWeight):
        np.matmul(dlogits, wte, out=dx)  # [1, R, V] @ [V, C] -> [1, R, C]
    else:
        dx[...] = 0
        for v0 in range(0, V, HEAD_VOCAB_BLOCK):
            rows = wte.rows(slice(v0, v0 + HEAD_VOCAB_BLOCK))  # [v, C] float32
            dx += dlogits[..., v0:v0 + HEAD_VOCAB_BLOCK] @ rows  # [1, R, v] @ [v, C] -> [1, R, C]
    if dwte is None:
        return
    d, xr = dlogits.reshape(-1, V), x.reshape(-1, C)  # [R, V], [R, C]
    if not add:
        np.matmul(d.T, xr, out=dwte)  # [V, R] @ [R, C] -> [V, C]
        return
    if part is None:
        part = np.empty((min(V, HEAD_VOCAB_BLOCK), C), dtype=dwte.dtype)
    for v0 in range(0, V, HEAD_VOCAB_BLOCK):
        v1 = min(V, v0 + HEAD_VOCAB_BLOCK)
        dwte[v0:v1] += np.matmul(d[:, v0:v1].T, xr, out=part[:v1 - v0])  # [v, R] @ [R, C]
