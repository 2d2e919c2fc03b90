"""OpenAI's TensorFlow checkpoints (TensorBundle V2) read and written without TensorFlow.

    prefix = latest_checkpoint("weights/124M")          # "weights/124M/model.ckpt"
    params = read_checkpoint(prefix)                      # {"model/wte": (50257, 768) float32, ...}
    write_checkpoint("run1/model-100", params)            # run1/model-100.index + .data-00000-of-00001
    write_checkpoint_state("run1", "model-100")           # run1/checkpoint
"""
from .bundle import latest_checkpoint, list_variables, read_checkpoint, write_checkpoint, write_checkpoint_state

# The checksum functions live in npgpt2.checkpoint.crc32c (not re-exported here: the name would
# shadow the submodule).
__all__ = ["latest_checkpoint", "list_variables", "read_checkpoint", "write_checkpoint",
           "write_checkpoint_state"]
