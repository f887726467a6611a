"""Where fine-tuning starts from: a pretrained encoder (`interop.sources`: a distil_flax
pretraining, distillation or fine-tuning workdir, a Hugging Face folder or `hf://ORG/NAME`) under
a freshly initialised task head.

The encoder's MLM head is dropped and, for BERT-style classification heads on an encoder saved
without a pooler, a fresh pooler is added — both are logged, as transformers logs "newly
initialized" weights.
"""

from typing import Any

import jax
import numpy as np
from absl import logging
from flax import traverse_util


def merge_pretrained(fresh: dict[str, Any], pretrained: dict[str, Any], source: str) -> dict:
    """Fresh task-model params with the encoder's entries replaced by the pretrained ones.

    Args:
      fresh: `TaskModel` params (nested), freshly initialised in their shardings.
      pretrained: the encoder's params (nested; host or device arrays).
      source: named in messages.

    Returns:
      The merged nested params; pretrained arrays are placed in the fresh ones' shardings.

    Raises:
      ValueError: an encoder parameter other than the pooler is missing, or shapes differ.
    """
    flat = traverse_util.flatten_dict(fresh, sep="/")
    pretrained = traverse_util.flatten_dict(pretrained, sep="/")
    encoder_paths = {k[len("encoder/"):] for k in flat if k.startswith("encoder/")}
    new = sorted(encoder_paths - set(pretrained))
    if any(not p.startswith("pooler/") for p in new):
        raise ValueError(f"{source} lacks encoder parameter(s) {new}: it is not the encoder the "
                         "model config describes")
    wrong = [f"{p}: {tuple(np.shape(pretrained[p]))} != {tuple(flat['encoder/' + p].shape)}"
             for p in sorted(encoder_paths & set(pretrained))
             if tuple(np.shape(pretrained[p])) != tuple(flat["encoder/" + p].shape)]
    if wrong:
        raise ValueError(f"{source}: wrong shapes [{'; '.join(wrong)}]")
    for path in encoder_paths & set(pretrained):
        target = flat["encoder/" + path]
        flat["encoder/" + path] = jax.device_put(
            jax.numpy.asarray(pretrained[path], target.dtype), target.sharding)
    unused = sorted(set(pretrained) - encoder_paths)
    head = sorted({k.split("/")[0] for k in flat if not k.startswith("encoder/")})
    logging.info("Fine-tuning from %s. Newly initialised: head %s%s. Not used: %s.", source, head,
                 f", encoder {new}" if new else "",
                 sorted({p.split("/")[0] for p in unused}) or "nothing")
    return traverse_util.unflatten_dict(flat, sep="/")
