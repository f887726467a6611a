"""The one transformer encoder: BERT (teacher) and DistilBERT (student) are configs of it.

BERT and DistilBERT differ only by fields: number of layers, token-type embeddings, pooler, and the
names their MLM heads carry in Hugging Face checkpoints. Both are post-LayerNorm encoders with learned
absolute positions, exact (erf) GELU and LayerNorm eps 1e-12, so one module computes both.

Every parameter carries logical axis names (`vocab`, `embed`, `heads`, `kv`, `mlp`, …); the rules in
`partitioning.py` map them to mesh axes. Activations get logical constraints on the same names.
"""

from typing import Any, Literal, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

Array = jax.Array

# BERT's LayerNorm epsilon; DistilBERT uses the same.
LAYER_NORM_EPS = 1e-12
INIT_STD = 0.02

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
}


def model_config(size: str) -> ml_collections.ConfigDict:
    """Returns the model section of a config for a size in `SIZES`, with every field explained."""
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; known sizes: {sorted(SIZES)}")
    c = ml_collections.ConfigDict()
    c.vocab_size = 0  # 0: take it from the tokenizer.
    c.max_position_embeddings = 512  # Learned absolute positions, as BERT.
    c.dropout_rate = 0.1  # Hidden/embedding dropout (BERT and DistilBERT: 0.1).
    # Dropout on attention probabilities forces the unfused einsum attention path; flash kernels
    # have no dropout, so it is off by default (modern BERT recipes train without it too).
    c.attention_dropout_rate = 0.0
    c.attention_impl = "auto"  # auto | xla | cudnn | einsum.
    c.dtype = "bfloat16"  # Compute dtype of activations and matmuls.
    c.param_dtype = "float32"  # Storage dtype of parameters (and so of optimizer state).
    c.remat = False  # Recompute each layer's activations in the backward pass (saves memory).
    for key, value in SIZES[size].items():
        setattr(c, key, value)
    return c


def _dtype(name: str) -> jnp.dtype:
    return jnp.dtype(name)


def _dense_init(names: Sequence[str | None]):
    return nn.with_logical_partitioning(nn.initializers.normal(INIT_STD), tuple(names))


def _zeros(names: Sequence[str | None]):
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), tuple(names))


def _layer_norm(dtype, param_dtype, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=LAYER_NORM_EPS, dtype=dtype, param_dtype=param_dtype, name=name,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
        bias_init=_zeros(("norm",)),
    )


def _gelu(x: Array) -> Array:
    return nn.gelu(x, approximate=False)


class Attention(nn.Module):
    """Multi-head self-attention restricted to tokens of the same packed segment."""

    num_heads: int
    head_dim: int
    hidden_size: int
    attention_dropout_rate: float
    attention_impl: str
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x: Array, segment_ids: Array, *, train: bool) -> Array:
        """Args: x [batch, length, embed]; segment_ids [batch, length], 0 on padding."""
        # Kernels keep Hugging Face's flat [embed, heads × head_dim] layout; the flat axis is
        # split on head boundaries when sharded over `tensor`.
        dense = lambda features, names, name: nn.Dense(  # noqa: E731
            features, dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=_dense_init(names), bias_init=_zeros(names[1:]), name=name)
        split = lambda t: t.reshape(*t.shape[:2], self.num_heads, self.head_dim)  # noqa: E731
        width = self.num_heads * self.head_dim
        q, k, v = (split(dense(width, ("embed", "heads"), name)(x))
                   for name in ("query", "key", "value"))
        axes = ("batch", "length", "act_heads", "act_kv")
        q, k, v = (nn.with_logical_constraint(t, axes) for t in (q, k, v))
        # Packed rows hold several documents: a token sees only its own segment. Padding (segment
        # 0) attends to padding, which keeps every softmax row finite and is never read.
        mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
        use_dropout = train and self.attention_dropout_rate > 0
        if self.attention_impl == "einsum" or use_dropout:
            out = self._einsum_attention(q, k, v, mask, use_dropout)
        else:
            impl = None if self.attention_impl == "auto" else self.attention_impl
            out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl)
        out = nn.with_logical_constraint(out, axes)
        return dense(self.hidden_size, ("heads", "embed"), "out")(out.reshape(*out.shape[:2], width))

    def _einsum_attention(self, q, k, v, mask, use_dropout: bool) -> Array:
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / jnp.sqrt(self.head_dim)
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        if use_dropout:
            probs = nn.Dropout(self.attention_dropout_rate)(probs, deterministic=False)
        return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


class EncoderLayer(nn.Module):
    """One post-LayerNorm transformer block, as in BERT."""

    num_heads: int
    hidden_size: int
    intermediate_size: int
    dropout_rate: float
    attention_dropout_rate: float
    attention_impl: str
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x: Array, segment_ids: Array, train: bool) -> Array:
        dense = lambda features, names, name: nn.Dense(  # noqa: E731
            features, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=_dense_init(names),
            bias_init=_zeros(names[1:]), name=name)
        dropout = nn.Dropout(self.dropout_rate)
        attended = Attention(
            num_heads=self.num_heads, head_dim=self.hidden_size // self.num_heads,
            hidden_size=self.hidden_size, attention_dropout_rate=self.attention_dropout_rate,
            attention_impl=self.attention_impl, dtype=self.dtype, param_dtype=self.param_dtype,
            name="attention")(x, segment_ids, train=train)
        x = _layer_norm(self.dtype, self.param_dtype, "attention_norm")(
            x + dropout(attended, deterministic=not train))
        h = _gelu(dense(self.intermediate_size, ("embed", "mlp"), "mlp_in")(x))
        h = nn.with_logical_constraint(h, ("batch", "length", "act_mlp"))
        h = dense(self.hidden_size, ("mlp", "embed"), "mlp_out")(h)
        x = _layer_norm(self.dtype, self.param_dtype, "mlp_norm")(
            x + dropout(h, deterministic=not train))
        return nn.with_logical_constraint(x, ("batch", "length", "act_embed"))


class Encoder(nn.Module):
    """BERT/DistilBERT encoder with an optional pooler and a tied MLM head.

    `__call__` returns `(logits, out)`: MLM logits where asked for (or None), and a dict of named
    intermediates: `hidden` [batch, length, embed] (final hidden states), `pooled` [batch, embed]
    when the model has a pooler, and `hidden_states` (embeddings, then every layer's output) when
    `return_all_hidden`.
    """

    vocab_size: int
    num_layers: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 0  # 0: no token-type embeddings (DistilBERT).
    use_pooler: bool = False
    use_mlm_head: bool = True
    head_style: str = "bert"  # bert | distilbert: only the Hugging Face names differ.
    dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.0
    attention_impl: str = "auto"
    dtype: Any = jnp.bfloat16
    param_dtype: Any = jnp.float32
    remat: bool = False

    def setup(self):
        embed_init = lambda names: nn.with_logical_partitioning(  # noqa: E731
            nn.initializers.normal(INIT_STD), names)
        embed = lambda n, names, name: nn.Embed(  # noqa: E731
            n, self.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
            embedding_init=embed_init(names), name=name)
        self.word_embeddings = embed(self.vocab_size, ("vocab", "embed"), "word_embeddings")
        self.position_embeddings = embed(
            self.max_position_embeddings, ("positions", "embed"), "position_embeddings")
        if self.type_vocab_size:
            self.token_type_embeddings = embed(
                self.type_vocab_size, ("types", "embed"), "token_type_embeddings")
        self.embeddings_norm = _layer_norm(self.dtype, self.param_dtype, "embeddings_norm")
        self.dropout = nn.Dropout(self.dropout_rate)
        layer_cls = nn.remat(EncoderLayer, static_argnums=(3,)) if self.remat else EncoderLayer
        self.layers = [
            layer_cls(
                num_heads=self.num_heads, hidden_size=self.hidden_size,
                intermediate_size=self.intermediate_size, dropout_rate=self.dropout_rate,
                attention_dropout_rate=self.attention_dropout_rate,
                attention_impl=self.attention_impl, dtype=self.dtype,
                param_dtype=self.param_dtype, name=f"layers_{i}")
            for i in range(self.num_layers)
        ]
        dense = lambda names, name: nn.Dense(  # noqa: E731
            self.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=_dense_init(names), bias_init=_zeros(names[1:]), name=name)
        if self.use_pooler:
            self.pooler = dense(("embed", "transform"), "pooler")
        if self.use_mlm_head:
            self.mlm_transform = dense(("embed", "transform"), "mlm_transform")
            self.mlm_norm = _layer_norm(self.dtype, self.param_dtype, "mlm_norm")
            self.mlm_bias = self.param(
                "mlm_bias", _zeros(("vocab",)), (self.vocab_size,), self.param_dtype)

    def __call__(
        self,
        input_ids: Array,
        segment_ids: Array,
        positions: Array,
        token_type_ids: Array | None = None,
        *,
        logits_at: Array | Literal["all"] | None = None,
        train: bool = False,
        return_all_hidden: bool = False,
    ) -> tuple[Array | None, dict[str, Any]]:
        """Encodes packed rows.

        Args:
          input_ids: [batch, length] token ids.
          segment_ids: [batch, length] packed-document ids, 1, 2, … per row; 0 on padding.
          positions: [batch, length] position of each token inside its segment.
          token_type_ids: [batch, length] BERT sentence A/B ids; zeros when None.
          logits_at: None for no MLM logits; "all" for logits at every position
            [batch, length, vocab]; or positions [batch, k] to gather first, giving
            [batch, k, vocab] (the head then costs k / length of the full head).
          train: enables dropout (needs a "dropout" rng).
          return_all_hidden: also return every layer's output in `out["hidden_states"]`.
        """
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        if self.type_vocab_size:
            if token_type_ids is None:
                token_type_ids = jnp.zeros_like(input_ids)
            x = x + self.token_type_embeddings(token_type_ids)
        x = self.dropout(self.embeddings_norm(x), deterministic=not train)
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
        hidden_states = [x]
        for layer in self.layers:
            x = layer(x, segment_ids, train)
            hidden_states.append(x)
        out: dict[str, Any] = {"hidden": x}
        if return_all_hidden:
            out["hidden_states"] = tuple(hidden_states)
        if self.use_pooler:
            out["pooled"] = jnp.tanh(self.pooler(x[:, 0]))
        if logits_at is None:
            return None, out
        if isinstance(logits_at, str):
            if logits_at != "all":
                raise ValueError(f"logits_at must be None, 'all' or positions, got {logits_at!r}")
            selected = x
        else:
            selected = jnp.take_along_axis(x, logits_at[..., None], axis=1)
        return self.mlm_logits(selected), out

    def mlm_logits(self, hidden: Array) -> Array:
        """MLM head on hidden states [..., embed] → logits [..., vocab] (decoder tied to embeddings)."""
        h = self.mlm_norm(_gelu(self.mlm_transform(hidden)))
        logits = self.word_embeddings.attend(h) + self.mlm_bias.astype(self.dtype)
        return nn.with_logical_constraint(logits, ("batch", "length", "act_vocab"))


def make_encoder(c: ml_collections.ConfigDict, vocab_size: int | None = None) -> Encoder:
    """Builds the encoder described by a config's model section.

    Args:
      c: a model section as returned by `model_config`.
      vocab_size: used when `c.vocab_size` is 0 (taken from the tokenizer).
    """
    vocab = c.vocab_size or vocab_size
    if not vocab:
        raise ValueError("model.vocab_size is 0 and no tokenizer vocabulary size was given")
    if c.hidden_size % c.num_heads:
        raise ValueError(
            f"model.hidden_size ({c.hidden_size}) must be divisible by model.num_heads "
            f"({c.num_heads})")
    if c.attention_impl not in ("auto", "xla", "cudnn", "einsum"):
        raise ValueError(
            f"model.attention_impl must be auto, xla, cudnn or einsum, got {c.attention_impl!r}")
    if c.head_style not in ("bert", "distilbert"):
        raise ValueError(f"model.head_style must be bert or distilbert, got {c.head_style!r}")
    return Encoder(
        vocab_size=vocab, num_layers=c.num_layers, hidden_size=c.hidden_size,
        num_heads=c.num_heads, intermediate_size=c.intermediate_size,
        max_position_embeddings=c.max_position_embeddings, type_vocab_size=c.type_vocab_size,
        use_pooler=c.use_pooler, head_style=c.head_style, dropout_rate=c.dropout_rate,
        attention_dropout_rate=c.attention_dropout_rate, attention_impl=c.attention_impl,
        dtype=_dtype(c.dtype), param_dtype=_dtype(c.param_dtype), remat=c.remat)
