"""The model: one encoder for every family and size, its heads, pooling and student init.

  encoder        `Encoder` (BERT, DistilBERT, RoBERTa, XLM-R by fields), its MLM head
  config         the model section of a config: sizes by name, `make_encoder`
  attention      which attention kernel runs (cuDNN, splash, XLA, einsum)
  heads          task heads (classification, QA, token classification, multiple choice)
  pooling        sentence embeddings pooled per packed segment
  student_init   a student from teacher layers, or pruned from the teacher
  importance     what each head, neuron, channel and layer contributes, and the units to keep

Imports nothing above it. What config files and most callers use is importable from here.
"""

from distil_flax.model.config import (
    HEAD_STYLES,
    SIZES,
    later_field,
    make_encoder,
    model_config,
)
from distil_flax.model.encoder import (
    INIT_STD,
    LAYER_NORM_EPS,
    REMAT_POLICIES,
    Encoder,
    attention_kernel,
    init_fn,
    remat_policy_name,
)

__all__ = [
    "HEAD_STYLES", "INIT_STD", "LAYER_NORM_EPS", "REMAT_POLICIES", "SIZES", "Encoder",
    "attention_kernel", "init_fn", "later_field", "make_encoder", "model_config",
    "remat_policy_name",
]
