"""Training's forward and backward: forward_with_saves keeps what backward needs, backward
runs every layer's backward from the output head down to the embedding.

GPT2 gets these methods from `Training`; the loss and the output head's backward in chunks
are in model_loss.py.
"""
import contextlib

import numpy as np

from . import memsave
from .errors import Npgpt2Error
from .jit import ops
from .linear import linear_backward as _linear_backward
from .model_loss import head_backward


def exact_products(lay):
    """A context in which an int8 base's products are exact in the activations (the kernels'
    decode GEMV quantises them; a training forward's gradient is the unquantised product's)."""
    return getattr(lay, "float_activations", contextlib.nullcontext)()


class Training:
    """GPT2's training methods (a mixin: GPT2 gives _trunk, _block_forward, _head, blocks, ...)."""


    # ------------------------------------------------------------ training
    def forward_with_saves(self, tokens, lay=None, memory_saving=False):
        """tokens: int (B, T) -> (logits (B, T, V), saved): the forward that backward() continues.

        lay: the layer module (default ops(): the kernels unless NPGPT2_PLAIN=1); backward
        uses the same one. memory_saving (`train --memory_saving_gradients`): saved["blocks"][i]
        holds resid_pre alone (C floats a token and layer instead of 10C + attention's), and
        backward re-runs block i's forward from it, with its saves, just before block i's
        backward: one block's activations exist at a time, for one more forward of the blocks.
        The same ops on the same inputs, so the gradients are the same (memsave.py runs a block
        a chunk of batch rows at a time when B*T > 1024: the weight gradients are then summed
        chunk by chunk, equal within rounding).
        saved holds (llm.c's ActivationTensors; B, T, C, NH as usual):

            per block, saved["blocks"][i]:
              resid_pre (B, T, C)      the block's input, the residual stream (ln_1's input)
              attn.qkv (B, T, 3C)      c_attn's output: queries, keys, values side by side
              attn.att                 attention_forward's second return: what attention_backward
                                       needs ((B, NH, T, T) probabilities in layers.py)
              attn.z (B, T, C)         the heads' outputs merged, c_proj's input
              resid_mid (B, T, C)      the residual stream after the attention branch (ln_2's input)
              mlp.pre (B, T, 4C)       c_fc's output, GELU's input
            resid_final (B, T, C)      the last block's output
            ln_f (B, T, C)             ln_f's output; ln_f.mean, ln_f.rstd (B, T)
            tokens (B, T), lay         the input ids and the layer module

        Not kept, because backward recomputes them (one cheap pass each, where keeping them
        would cost 6C more floats a token in every layer, on top of these 10C): ln_1 and
        ln_2 (outputs, mean, rstd: layernorm_forward of resid_pre, resid_mid) and mlp.post
        (gelu_forward of mlp.pre). The recomputed values are the forward's, bit for bit.
        """
        ln_f, saved = self._trunk_with_saves(tokens, lay, memory_saving)  # [B, T] -> [B, T, C]
        return self._head(ln_f), saved  # [B, T, C] -> [B, T, V]

    def _trunk_with_saves(self, tokens, lay=None, memory_saving=False):
        """forward_with_saves without the output head: -> (ln_f (B, T, C), saved)."""
        if self.weight_dtype == "int8" and self.lora is None:  # a frozen int8 base under LoRA adapters trains
            raise Npgpt2Error("training an int8 model: int8 weights are for generation only; "
                              "load it with dtype float32 (the default) to train, or train LoRA adapters on it")
        lay = lay or ops()
        tokens = self._check_tokens(tokens)
        saved = {"tokens": tokens, "lay": lay, "blocks": [], "memory_saving": bool(memory_saving)}
        with exact_products(lay):
            return self._trunk(tokens, lay, saved=saved), saved

    def backward(self, dlogits, saved):
        """dlogits: (B, T, V), any gradient of the logits; saved: from forward_with_saves.

        Returns (grads, dembed): grads has the keys and shapes of params (the tied model/wte
        gets the output head's and the embedding's contributions), dembed (B, T, C) is the
        gradient with respect to the embedding output wte[tokens] + wpe[positions].
        Consumes saved (each block's activations are freed once its backward is done).
        """
        B, T, V = dlogits.shape
        C = self.hparams["n_embd"]
        dtype = np.result_type(dlogits.dtype, self.dtype)
        # the output head: logits = ln_f @ wte.T; wte's second contribution comes at the embedding
        dln_f = np.empty((1, B * T, C), dtype=dtype)  # the B*T positions as one row, as loss_and_grads
        dwte = None if self.lora is not None else np.empty((V, C), dtype=dtype)  # a frozen base (LoRA): none
        if self.wte_lora is not None:  # the tied wte's adapter: its head-side gradients (dA, dB) instead
            x = saved["ln_f"].reshape(B * T, C)
            dln_f[0], *dwte = saved["lay"].lora_head_backward(
                dlogits.reshape(B * T, V), x, self._params["model/wte"], *self.wte_lora,
                x @ self.wte_lora[1].T)  # [B*T, C], [V, r], [r, C]
        else:
            head_backward(dlogits.reshape(1, B * T, V), saved["ln_f"].reshape(1, B * T, C),
                          self._params["model/wte"], dln_f, dwte)  # [1, B*T, V] -> [1, B*T, C], [V, C]
        return self._trunk_backward(dln_f.reshape(B, T, C), dwte, saved)

    def _trunk_backward(self, dln_f, dwte, saved):
        """backward() after the head: dln_f (B, T, C) at ln_f's output, dwte (V, C) the head's
        part of wte's gradient (the embedding's is added to it in place; None under LoRA; with an
        adapter on the tied wte, the head's part of its gradients [dA (V, r), dB (r, C)])
        -> (grads, dembed)."""
        lay, tokens, blocks = saved["lay"], saved["tokens"], saved["blocks"]
        grads = {}
        dresid, grads["model/ln_f/g"], grads["model/ln_f/b"] = lay.layernorm_backward(
            dln_f, saved.pop("resid_final"), self._params["model/ln_f/g"], saved["ln_f.mean"],
            saved["ln_f.rstd"])  # [B, T, C]
        saved.pop("ln_f", None)  # not needed below (loss_and_grads drops its own reference too)
        for i in reversed(range(len(blocks))):
            act = blocks.pop()
            if saved.get("memory_saving"):  # the forward kept only the block's input: run the block again
                with exact_products(lay):
                    dresid = memsave.block_backward(self, lay, i, act.pop("resid_pre"), dresid, grads)  # [B, T, C]
            else:
                dresid = self._block_backward(lay, i, dresid, act, grads)  # [B, T, C] -> [B, T, C]
            del act  # this block's activations go before the next block's are made
        dembed = dresid  # [B, T, C]: the gradient at wte[tokens] + wpe[positions]
        if self.wte_lora is not None:  # the tied wte's adapter: the embedding's use added to the head's
            dA, dB = lay.lora_embedding_backward(dembed, tokens, *self.wte_lora)  # [V, r], [r, C]
            head_dA, head_dB = dwte
            grads["model/wte/lora_A"], grads["model/wte/lora_B"] = dA + head_dA, dB + head_dB
        if self.lora is not None:  # LoRA: the adapters' gradients alone (the layer norms' (C,) ones, two
            return {k: grads[k] for k in self.lora.params}, dembed  # sums each, are dropped); no embedding's
        # the embedding: rows of wte picked by the tokens (a repeated token sums its rows' gradients).
        # Only the distinct tokens' rows get a gradient, so embedding_backward runs over those (ids
        # renumbered 0..n-1): a (n, C) array instead of a second (V, C) one (154 MB at 124M)
        ids, renumbered = np.unique(tokens, return_inverse=True)
        drows, grads["model/wpe"] = lay.embedding_backward(
            dembed, renumbered.reshape(tokens.shape), len(ids), self.hparams["n_ctx"])  # [n, C], [n_ctx, C]
        dwte[ids] += drows  # the tied wte's second contribution (ids are distinct: no repeat is lost)
        grads["model/wte"] = dwte
        return {k: grads[k] for k in self._params}, dembed

    def _block_backward(self, lay, i, dresid, act, grads):
        """Block i backward: dresid (B, T, C) at its output -> at its input; fills grads.

        act: what _block_forward saved. Each linear layer's backward is _linear_backward: its
        (C, OC) weight gradient gets back the leading axis of TF's conv1d weight (1, C, OC), so a
        gradient has its parameter's shape; with LoRA adapters (act["lora.h"]) only the adapters'
        gradients are made.
        """
        blk, prefix, NH = self.blocks[i], f"model/h{i}/", self.hparams["n_head"]
        g = {}  # this block's gradients under the short names of blk
        # resid_post = resid_mid + mlp(resid_mid): dresid flows into the MLP branch and past it
        lora_h = act.get("lora.h")  # None, or the base is frozen (LoRA): see _linear_backward
        mlp_post = lay.gelu_forward(act["mlp.pre"])  # [B, T, 4C]: GELU's output again (not saved)
        dmlp_post = _linear_backward(lay, blk, "mlp/c_proj", dresid, mlp_post, g, lora_h)  # [B, T, C] -> [B, T, 4C]
        del mlp_post
        dmlp_pre = lay.gelu_backward(dmlp_post, act["mlp.pre"])  # [B, T, 4C]
        del dmlp_post  # the (B, T, 4C) gradients go as soon as they are used: they set the peak
        dbranch = _norm_linear_backward(lay, blk, "ln_2", "mlp/c_fc", act["resid_mid"], dmlp_pre, g,
                                        lora_h)  # [B, T, C]
        del dmlp_pre
        dresid = dresid + dbranch  # [B, T, C] at resid_mid
        # resid_mid = resid_pre + attn(resid_pre): the same again through the attention branch
        dz = _linear_backward(lay, blk, "attn/c_proj", dresid, act["attn.z"], g, lora_h)  # [B, T, C]
        dqkv = lay.attention_backward(dz, act["attn.qkv"], act["attn.att"], NH)  # [B, T, C] -> [B, T, 3C]
        dbranch = _norm_linear_backward(lay, blk, "ln_1", "attn/c_attn", act["resid_pre"], dqkv, g,
                                        lora_h)  # [B, T, C]
        grads.update({prefix + name: grad for name, grad in g.items()})
        return dresid + dbranch  # [B, T, C] at resid_pre


def _norm_linear_backward(lay, blk, ln, linear, x, dout, g, lora_h=None):
    """The backward of linear(ln(x)), how each branch of a block begins: dout (B, T, OC) at the
    linear layer's output -> the gradient at x (B, T, C); the four parameter gradients go into
    g under blk's short names (with lora_h, a frozen base: the adapter's instead of the
    linear layer's, see _linear_backward). ln's output is recomputed from x (not saved by the forward), bit for
    bit what the forward had.
    """
    h, mean, rstd = lay.layernorm_forward(x, blk[ln + "/g"], blk[ln + "/b"])  # [B, T, C]: ln again
    dh = _linear_backward(lay, blk, linear, dout, h, g, lora_h)  # [B, T, OC] -> [B, T, C]
    dx, g[ln + "/g"], g[ln + "/b"] = lay.layernorm_backward(dh, x, blk[ln + "/g"], mean, rstd)  # [B, T, C]
    return dx
