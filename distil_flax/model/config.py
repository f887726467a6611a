"""The model section of a config: sizes by name, every field explained, and the encoder it builds.

`model_config("distil6")` is a config's `model` section; `make_encoder(section)` the `Encoder` it
describes, its fields checked. A run's config.json holds the section as trained; `later_field`
reads what a section saved before a field existed meant.
"""

from typing import TYPE_CHECKING, Any

import jax.numpy as jnp

from distil_flax.model import attention
from distil_flax.model.encoder import LAYER_NORM_EPS, Encoder, remat_policy_name

if TYPE_CHECKING:  # Imported lazily: the benchmark machines lack ml_collections.
    import ml_collections

# The checkpoint families `head_style` names: which Hugging Face classes and parameter names hold
# the model (`distil_flax.interop.hf.names`). Only names differ; the computation comes from the
# fields.
HEAD_STYLES = ("bert", "distilbert", "roberta", "xlm-roberta")

# Model fields added after runs were first saved, and the value a config.json without them meant.
LATER_FIELDS = {"attention_mask": "segments", "layer_norm_eps": LAYER_NORM_EPS,
                "position_offset": 0, "head_dim": 0}

# RoBERTa's and XLM-R's embeddings and LayerNorms (the head style is set per family).
_ROBERTA = dict(type_vocab_size=1, use_pooler=False, layer_norm_eps=1e-5, position_offset=2)

# Sizes of the encoders this project trains, by name. `intermediate_size` is 4× hidden throughout.
SIZES = {
    # bert-base-uncased: the released DistilBERT's teacher.
    "base": dict(num_layers=12, hidden_size=768, num_heads=12, intermediate_size=3072,
                 type_vocab_size=2, use_pooler=True, head_style="bert"),
    # distilbert-base-uncased: half the layers of "base", no token types, no pooler.
    "distil6": dict(num_layers=6, hidden_size=768, num_heads=12, intermediate_size=3072,
                    type_vocab_size=0, use_pooler=False, head_style="distilbert"),
    # A BERT-shaped teacher small enough to pretrain on two CPU cores in minutes.
    "mini": dict(num_layers=4, hidden_size=128, num_heads=4, intermediate_size=512,
                 type_vocab_size=2, use_pooler=True, head_style="bert"),
    # Its DistilBERT-shaped student: every other layer.
    "mini_student": dict(num_layers=2, hidden_size=128, num_heads=4, intermediate_size=512,
                         type_vocab_size=0, use_pooler=False, head_style="distilbert"),
    # For unit tests: compiles in a second.
    "tiny": dict(num_layers=2, hidden_size=32, num_heads=2, intermediate_size=64,
                 type_vocab_size=2, use_pooler=True, head_style="bert"),
    "tiny_student": dict(num_layers=1, hidden_size=32, num_heads=2, intermediate_size=64,
                         type_vocab_size=0, use_pooler=False, head_style="distilbert"),
    # roberta-base (FacebookAI/roberta-base): DistilRoBERTa's teacher. One token type, positions
    # from row 2 of a 514-row table (512 usable), LayerNorm eps 1e-5.
    "roberta_base": dict(num_layers=12, hidden_size=768, num_heads=12, intermediate_size=3072,
                         head_style="roberta", **_ROBERTA),
    # distilroberta-base: half of roberta-base's layers; it keeps RoBERTa's one-row token-type
    # table (its released config says type_vocab_size 1), so nothing is folded at init.
    "distilroberta": dict(num_layers=6, hidden_size=768, num_heads=12, intermediate_size=3072,
                          head_style="roberta", **_ROBERTA),
    # RoBERTa-shaped "tiny" and "tiny_student", for unit tests.
    "tiny_roberta": dict(num_layers=2, hidden_size=32, num_heads=2, intermediate_size=64,
                         head_style="roberta", **_ROBERTA),
    "tiny_roberta_student": dict(num_layers=1, hidden_size=32, num_heads=2, intermediate_size=64,
                                 head_style="roberta", **_ROBERTA),
}


def model_config(size: str) -> "ml_collections.ConfigDict":
    """Returns the model section of a config for a size in `SIZES`, with every field explained."""
    import ml_collections

    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; known sizes: {sorted(SIZES)}")
    c = ml_collections.ConfigDict()
    c.vocab_size = 0  # 0: take it from the tokenizer.
    # Learned absolute positions: a row holds at most this many tokens. The table has
    # max_position_embeddings + position_offset rows (RoBERTa: 512 + 2, HF's 514).
    c.max_position_embeddings = 512
    # Row of the position table where position 0 is (RoBERTa/XLM-R: 2, padding_idx + 1, as
    # fairseq numbered them; BERT: 0). Rows restart positions at 0 in every packed segment.
    c.position_offset = 0
    c.layer_norm_eps = LAYER_NORM_EPS  # Every LayerNorm's epsilon (BERT 1e-12, RoBERTa 1e-5).
    # Width of each attention head; 0: hidden_size // num_heads. Any other value gives heads that
    # do not fill the hidden size, which transformers' BERT cannot hold (export refuses it).
    c.head_dim = 0
    # Names of the checkpoint family (HEAD_STYLES): bert | distilbert | roberta | xlm-roberta.
    # Only the Hugging Face names and classes differ; the computation comes from the fields.
    c.head_style = "bert"
    c.dropout_rate = 0.1  # Hidden/embedding dropout (BERT and DistilBERT: 0.1).
    # Dropout on attention probabilities forces the unfused einsum attention path; flash kernels
    # have no dropout, so it is off by default (modern BERT recipes train without it too).
    c.attention_dropout_rate = 0.0
    # auto | xla | cudnn | splash | einsum. auto: cuDNN flash attention on NVIDIA GPUs (bf16/fp16),
    # the Pallas splash kernel on TPUs, XLA's attention elsewhere (`attention.select_attention`).
    c.attention_impl = "auto"
    # segments: a token attends only within its packed segment (rows hold several documents).
    # lengths: each row is one sequence followed by padding, so attention needs only the row's
    # length, which cuDNN runs without a mask (its fastest path). Wrong for packed rows.
    c.attention_mask = "segments"
    c.dtype = "bfloat16"  # Compute dtype of activations and matmuls.
    c.param_dtype = "float32"  # Storage dtype of parameters (and so of optimizer state).
    # Recompute layer activations in the backward pass to save memory (large batches): none |
    # full (keep only layer inputs) | dots_saveable (keep matmul outputs, recompute GELU, LayerNorm
    # and softmax) | dots_with_no_batch_dims_saveable (also recompute attention-score matmuls).
    c.remat = "none"
    for key, value in SIZES[size].items():
        setattr(c, key, value)
    return c


def make_encoder(c: "ml_collections.ConfigDict", vocab_size: int | None = None) -> Encoder:
    """Builds the encoder described by a config's model section.

    Args:
      c: a model section as returned by `model_config` (fields added since default when a run's
        saved config.json predates them).
      vocab_size: used when `c.vocab_size` is 0 (taken from the tokenizer).
    """
    vocab = c.vocab_size or vocab_size
    if not vocab:
        raise ValueError("model.vocab_size is 0 and no tokenizer vocabulary size was given")
    head_dim = later_field(c, "head_dim")
    if not head_dim and c.hidden_size % c.num_heads:
        raise ValueError(
            f"model.hidden_size ({c.hidden_size}) must be divisible by model.num_heads "
            f"({c.num_heads})")
    if c.attention_impl not in attention.IMPLS:
        raise ValueError(f"model.attention_impl must be one of {', '.join(attention.IMPLS)}, "
                         f"got {c.attention_impl!r}")
    attention_mask = later_field(c, "attention_mask")
    if attention_mask not in attention.MASKS:
        raise ValueError(f"model.attention_mask must be segments or lengths, got "
                         f"{attention_mask!r}")
    remat = remat_policy_name(c.remat)
    if c.head_style not in HEAD_STYLES:
        raise ValueError(f"model.head_style must be one of {', '.join(HEAD_STYLES)}, got "
                         f"{c.head_style!r}")
    eps, offset = later_field(c, "layer_norm_eps"), later_field(c, "position_offset")
    if not (isinstance(eps, (int, float)) and 0 < eps < 1):
        raise ValueError(f"model.layer_norm_eps must be in (0, 1), got {eps!r}")
    if not (isinstance(offset, int) and offset >= 0):
        raise ValueError(f"model.position_offset must be an integer ≥ 0, got {offset!r}")
    return Encoder(
        vocab_size=vocab, num_layers=c.num_layers, hidden_size=c.hidden_size,
        num_heads=c.num_heads, intermediate_size=c.intermediate_size,
        max_position_embeddings=c.max_position_embeddings, type_vocab_size=c.type_vocab_size,
        use_pooler=c.use_pooler, head_style=c.head_style, dropout_rate=c.dropout_rate,
        attention_dropout_rate=c.attention_dropout_rate, attention_impl=c.attention_impl,
        attention_mask=attention_mask, dtype=jnp.dtype(c.dtype),
        param_dtype=jnp.dtype(c.param_dtype),
        remat=remat, layer_norm_eps=float(eps), position_offset=offset, head_dim=int(head_dim))


def later_field(c: "ml_collections.ConfigDict", name: str) -> Any:
    """A model field of `LATER_FIELDS`, or what a config.json saved before it existed meant."""
    return getattr(c, name, LATER_FIELDS[name])
