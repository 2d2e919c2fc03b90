"""A model whose vocabulary is a subset of GPT-2's: the tokenizer that speaks its ids.

`npgpt2 demo` trains on the ~19.7k GPT-2 tokens present in its corpus, numbered 0..K-1
(a 2.5x cheaper output head). Its run folder keeps GPT-2's encoder.json and vocab.bpe plus
`compact_vocab.npy`, an int64 array (K,) mapping compact id -> GPT-2 id. load_tokenizer
sees that file and wraps the GPT-2 tokenizer in a CompactTokenizer: text is split by GPT-2's
BPE as usual and the ids are renumbered, so `prompt`, `chat`, `eval` and `explain` work on
such a folder as on any other.

    tok = CompactTokenizer(load_tokenizer(), vocab)   # vocab: (K,) GPT-2 ids, ascending
    tok.encode("hacker:")  # -> compact ids; a token outside the K is a one-line Npgpt2Error
    tok.decode(ids)        # compact ids -> text
"""
from pathlib import Path

import numpy as np

from .errors import Npgpt2Error

VOCAB_FILE = "compact_vocab.npy"


class CompactTokenizer:
    """GPT-2's tokenizer with ids renumbered to a model's compact vocabulary.

    base: the GPT-2 Tokenizer; vocab: int array (K,), vocab[compact id] = GPT-2 id, distinct.
    """

    def __init__(self, base, vocab, source=VOCAB_FILE):
        vocab = np.asarray(vocab)
        self.base = base
        self.source = str(source)
        self.vocab = vocab.astype(np.int64)
        self.to_compact = np.full(base.n_vocab, -1, dtype=np.int64)  # GPT-2 id -> compact id or -1
        self.to_compact[self.vocab] = np.arange(self.vocab.size)
        self.n_vocab = int(self.vocab.size)
        eot = base.eot_token
        self.eot_token = int(self.to_compact[eot]) if eot is not None and self.to_compact[eot] >= 0 else None
        self.special_tokens = {s: int(self.to_compact[i]) for s, i in base.special_tokens.items()
                               if self.to_compact[i] >= 0}
        self._decoder = None

    # ---- ids in both directions
    def compact_ids(self, gpt2_ids):
        """GPT-2 ids -> compact ids (int64 array); a token the model lacks is an Npgpt2Error."""
        ids = np.asarray(gpt2_ids, dtype=np.int64).reshape(-1)
        out = self.to_compact[ids]
        missing = np.flatnonzero(out < 0)
        if missing.size:
            bad = int(ids[missing[0]])
            raw = self.base.decode_bytes([bad])
            try:
                shown = repr(raw.decode("utf-8"))
            except UnicodeDecodeError:  # a piece of a multi-byte character
                shown = repr(raw)
            raise Npgpt2Error(f"{self.source}: the text has the token {shown} (GPT-2 id {bad}), "
                              f"which is not among this model's {self.n_vocab} tokens")
        return out

    def gpt2_ids(self, ids):
        """Compact ids -> GPT-2 ids (int64 array); an id >= n_vocab is an Npgpt2Error."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        bad = ids[(ids < 0) | (ids >= self.n_vocab)]
        if bad.size:
            raise Npgpt2Error(f"{self.source}: token id {int(bad[0])} is outside this model's vocabulary "
                              f"of {self.n_vocab}")
        return self.vocab[ids]

    # ---- the Tokenizer interface
    def encode(self, text, allowed_special=()):
        return self.compact_ids(self.base.encode(text, allowed_special)).tolist()

    def encode_ordinary(self, text):
        return self.compact_ids(self.base.encode_ordinary(text)).tolist()

    def encode_iter(self, text_chunks, allowed_special=(), block_chars=1 << 20):
        for arr in self.base.encode_iter(text_chunks, allowed_special, block_chars):
            yield self.compact_ids(arr).astype(arr.dtype)

    def decode_bytes(self, ids):
        return self.base.decode_bytes(self.gpt2_ids(ids).tolist())

    def decode(self, ids):
        return self.base.decode(self.gpt2_ids(ids).tolist())

    @property
    def decoder(self):
        """{compact id: the token's byte-level string}, as Tokenizer.decoder."""
        if self._decoder is None:
            self._decoder = {c: self.base.decoder[int(g)] for c, g in enumerate(self.vocab)}
        return self._decoder

    @property
    def encoder(self):
        return {s: i for i, s in self.decoder.items()}


def shown_ids(tokenizer):
    """The one numbering npgpt2 shows people (server answers, explain): GPT-2's ids. Returns
    (to_shown, vocab): to_shown(model id) -> GPT-2 id, and vocab the (K,) array of GPT-2 ids
    by model id for a compact vocabulary (None when the model's ids already are GPT-2's)."""
    if isinstance(tokenizer, CompactTokenizer):
        vocab = tokenizer.vocab
        return (lambda i: int(vocab[int(i)])), vocab
    return int, None


def read_vocab_map(model_dir):
    """The compact vocabulary of `model_dir` (int64 (K,)), or None when it has none."""
    path = Path(model_dir) / VOCAB_FILE
    if not path.is_file():
        return None
    try:
        vocab = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise Npgpt2Error(f"{path}: unreadable compact vocabulary ({e})") from None
    if vocab.ndim != 1 or vocab.dtype.kind not in "iu" or vocab.size == 0:
        raise Npgpt2Error(f"{path}: not a compact vocabulary (want a 1-D integer array, "
                          f"got {vocab.dtype} of shape {vocab.shape})")
    return vocab


def wrap_if_compact(tokenizer, model_dir):
    """tokenizer as is, or a CompactTokenizer over it when model_dir holds compact_vocab.npy."""
    if model_dir is None:
        return tokenizer
    vocab = read_vocab_map(model_dir)
    if vocab is None:
        return tokenizer
    path = Path(model_dir) / VOCAB_FILE
    if vocab.min() < 0 or vocab.max() >= tokenizer.n_vocab or np.unique(vocab).size != vocab.size:
        raise Npgpt2Error(f"{path}: ids must be distinct GPT-2 ids below {tokenizer.n_vocab}")
    return CompactTokenizer(tokenizer, vocab, path)
