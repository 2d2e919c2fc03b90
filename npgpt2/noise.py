"""`train --noise P` (the flag of nshepperd's fork of OpenAI's train.py): before each
micro-batch's forward, every input token is replaced, with probability P, by a token drawn
uniformly from the whole vocabulary [0, n_vocab). The targets stay the text's own tokens,
so the model learns to predict the real next token from a corrupted context (a
regulariser for small corpora).

The draws come from a Generator of their own, seeded from the run's --seed and the rank,
so the batch order is the same with or without noise, and its state is saved in the train
state (`noise/rank_states`, one JSON state per rank) so that a resumed run draws exactly
what an uninterrupted one would. `--noise 0` makes no draws at all: the run is bit for bit
the run without the flag.
"""
import json
import logging
import numbers

import numpy as np

from .data import rng_state, set_rng_state
from .errors import Npgpt2Error

log = logging.getLogger(__name__)

STATE_KEY = "noise/rank_states"  # in train_state-<step>.npz: a JSON list, one state per rank
STREAM = 0x6E6F697365  # "noise": keeps this stream apart from the batch sampler's


def check_noise(p):
    """Raise Npgpt2Error unless p is in [0, 1) (NaN is refused too)."""
    if isinstance(p, bool) or not (isinstance(p, numbers.Real) and 0 <= p < 1):
        raise Npgpt2Error(f"--noise must be in [0, 1) (the probability of replacing an input token), got {p}")


class TokenNoise:
    """Replaces input tokens at random; its Generator state is get_state()/set_state()."""

    def __init__(self, p, n_vocab, seed):
        check_noise(p)
        self.p, self.n_vocab = float(p), int(n_vocab)
        self.rng = np.random.default_rng(seed)

    def apply(self, inputs):
        """inputs: int (B, T) -> a new (B, T) array, each token replaced by a uniformly random
        id in [0, n_vocab) with probability p (a replacement may draw the same id back)."""
        inputs = np.array(inputs)  # a copy: the batch (and its targets) stay as sampled
        hit = self.rng.random(inputs.shape) < self.p  # [B, T] which positions are replaced
        inputs[hit] = self.rng.integers(0, self.n_vocab, size=int(hit.sum()))  # [n_hit] new ids
        return inputs

    def get_state(self):
        return rng_state(self.rng)

    def set_state(self, state):
        set_rng_state(self.rng, state, "noise state")


def run_noise(p, n_vocab, seed, comm, state=None):
    """The run's TokenNoise (None when p is 0): seeded from (seed, rank), or continuing the
    draws saved in `state` (a train state) when it has this rank's. A state without them
    (saved before --noise was on, or by another number of processes) starts a fresh stream
    keyed by its step."""
    check_noise(p)
    if not p:
        return None
    saved = json.loads(str(state[STATE_KEY])) if state is not None and STATE_KEY in state else None
    if saved is not None and len(saved) == comm.world_size:
        noise = TokenNoise(p, n_vocab, None)
        noise.set_state(saved[comm.rank])
        return noise
    step = int(state["step"]) if state is not None else 0
    if state is not None and comm.is_main:
        log.info("--noise: the train state has no noise stream for %d process(es); starting one at step %d",
                 comm.world_size, step)
    return TokenNoise(p, n_vocab, [STREAM, seed, comm.rank, step])
