"""GPT2's fast forward: the kernels, decoding with a KV cache, the last position only.

The same result as the readable forward (GPT2._trunk + GPT2._head; tests hold them equal),
arranged for speed and memory instead of for reading.
"""
import contextlib

import numpy as np

from . import layers
from .linear import linear as _linear


def _quantised_decode(lay):
    """The kernels' forward quantises a few activation rows for an int8 weight's GEMV
    (quant_kernels.quantised_activations: the opt-in; a caller's float_activations() still wins);
    the plain layers have no such GEMV."""
    if lay is layers:
        return contextlib.nullcontext()
    from .quant_kernels import quantised_activations
    return quantised_activations()


class FastForward:
    """GPT2's _forward_fast (a mixin: GPT2 gives hparams, blocks, _params, _head)."""

    def _forward_fast(self, lay, tokens, cache, last_only):
        """forward() for the kernels and for decoding with a KV cache: the same result as
        _trunk + _head (tests hold them equal), computed the way that is fast, not readable.

        It differs from the paper's forward in four ways, each for speed or memory:
        - attention goes through attention_forward_cached (keys and values written to a cache,
          a throwaway one without `cache`): the (B, NH, T, T) probabilities, which only
          training and run_with_cache need, are never kept;
        - with a cache, tokens are only the new positions; earlier keys and values are reused;
        - with last_only, the last layer computes attention, MLP and residual for the last
          position only (the others only give it keys and values);
        - the residual additions go into x in place (no saved activation needs the old x);
        - an int8 model's few-row products (decoding) quantise their activations too
          (int8_dot.py), unless the caller asked for exact ones (quant_kernels.float_activations).
        """
        with _quantised_decode(lay):
            return self._forward_fast_body(lay, tokens, cache, last_only)

    def _forward_fast_body(self, lay, tokens, cache, last_only):
        B, T = tokens.shape  # T new positions pos0..pos0+T-1 (all of them without a cache)
        rows, pos0 = (None, 0) if cache is None else (cache.rows, cache.lengths)  # cache rows, (B,) lengths
        if rows is None and (pos0 == np.min(pos0)).all():
            pos0 = int(np.min(pos0))  # every row at one length: the kernels' one-call path
        NH, L = self.hparams["n_head"], self.hparams["n_layer"]
        hs = self.hparams["n_embd"] // NH
        # x is a fresh array: the residual additions below go into it in place
        x = self._embed(lay, tokens, pos0)  # [B, T, C]
        for i, blk in enumerate(self.blocks):
            ln_1, _, _ = lay.layernorm_forward(x, blk["ln_1/g"], blk["ln_1/b"])  # [B, T, C]
            qkv = _linear(lay, blk, "attn/c_attn", ln_1)  # [B, T, C] -> [B, T, 3C]
            if cache is None:
                # a throwaway cache for this layer: the same result as attention_forward
                # without keeping its (B, NH, T, T) probabilities, which only training needs
                kv = np.empty((2, B, NH, T, hs), dtype=qkv.dtype)
                k_cache, v_cache, p0 = kv[0], kv[1], 0  # [B, NH, T, hs] each
            else:
                k_cache, v_cache, p0 = cache.k[i], cache.v[i], pos0  # [B, NH, n_ctx, hs] each
            if last_only and i == L - 1 and T > 1:
                # only the last position's output is read: the others give the last layer
                # keys and values, but their attention, MLP and residual rows are skipped
                k, v = (layers.split_heads(t, NH) for t in np.split(qkv[:, :-1], 3, axis=-1)[1:])  # [B, NH, T-1, hs]
                for b, (r, p) in enumerate(zip(range(B) if rows is None else rows, np.broadcast_to(p0, (B,)))):
                    k_cache[r, :, p:p + T - 1] = k[b]  # [NH, T-1, hs] into cache row r at its length
                    v_cache[r, :, p:p + T - 1] = v[b]
                qkv, x, p0 = qkv[:, -1:], x[:, -1:], p0 + T - 1  # from here T is 1
            z = lay.attention_forward_cached(qkv, k_cache, v_cache, p0, NH, rows)  # [B, T, 3C] -> [B, T, C]
            x += _linear(lay, blk, "attn/c_proj", z)  # [B, T, C]
            ln_2, _, _ = lay.layernorm_forward(x, blk["ln_2/g"], blk["ln_2/b"])  # [B, T, C]
            mlp_h = _linear(lay, blk, "mlp/c_fc", ln_2)  # [B, T, C] -> [B, T, 4C]
            mlp_h = lay.gelu_forward(mlp_h)  # [B, T, 4C]
            x += _linear(lay, blk, "mlp/c_proj", mlp_h)  # [B, T, 4C] -> [B, T, C]
        if cache is not None:
            cache.advance(T)
        if last_only:
            x = x[:, -1:]  # [B, 1, C]
        x, _, _ = lay.layernorm_forward(x, self._params["model/ln_f/g"], self._params["model/ln_f/b"])  # [B, T, C]
        return self._head(x, fast=True)  # [B, T, C] -> [B, T, V]
