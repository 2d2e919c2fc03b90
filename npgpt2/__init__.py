"""npgpt2: GPT-2 written by hand in NumPy.

    import npgpt2
    model = npgpt2.load_model("weights/124M")
    enc = npgpt2.load_tokenizer("weights/124M")
    ids = npgpt2.generate(model, enc.encode("Hello"), length=20, top_k=40, seed=1)
    print(enc.decode(ids))
"""
from .batch_decode import generate_batch
from .chat import ChatSession
from .errors import Npgpt2Error
from .interp import input_gradient, logit_lens
from .model import GPT2, init_model, load_model, save_model
from .sampling import generate
from .tokenizer import Tokenizer, load_tokenizer

__version__ = "0.1.0"


def __getattr__(name):
    # the server (and its http/selectors imports) loads only when asked for
    if name == "Server":
        from .server import Server
        return Server
    raise AttributeError(f"module 'npgpt2' has no attribute {name!r}")


__all__ = ["ChatSession", "GPT2", "Npgpt2Error", "Server", "Tokenizer", "generate", "generate_batch", "init_model",
           "input_gradient", "load_model", "load_tokenizer", "logit_lens", "save_model"]
