"""The one transformer encoder: BERT, DistilBERT, RoBERTa and XLM-R are configs of it.

The families differ only by fields: number of layers, token-type embeddings (BERT 2, RoBERTa 1,
DistilBERT none), pooler, LayerNorm epsilon (BERT 1e-12, RoBERTa 1e-5), the row of the position
table where positions start (RoBERTa: 2, after fairseq's padding index), and the names their
checkpoints give the parameters (`head_style`). All are post-LayerNorm encoders with learned
absolute positions and exact (erf) GELU, so one module computes them all.

Every parameter carries logical axis names (`vocab`, `embed`, `heads`, `kv`, `mlp`, …); the
rules in `training/partitioning.py` map them to mesh axes. Activations get logical constraints on
the same names.
"""

from typing import Any, Literal, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from distil_flax.model import attention

Array = jax.Array

# BERT's LayerNorm epsilon; DistilBERT uses the same (RoBERTa and XLM-R: 1e-5).
LAYER_NORM_EPS = 1e-12
INIT_STD = 0.02


def _dense_init(names: Sequence[str | None]):
    return nn.with_logical_partitioning(nn.initializers.normal(INIT_STD), tuple(names))


def _zeros(names: Sequence[str | None]):
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), tuple(names))


def _layer_norm(dtype, param_dtype, name: str, epsilon: float = LAYER_NORM_EPS) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, name=name,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
        bias_init=_zeros(("norm",)),
    )


def _gelu(x: Array) -> Array:
    return nn.gelu(x, approximate=False)


# Remat policy by name: what a layer keeps for the backward pass (everything else is recomputed).
REMAT_POLICIES = {
    "full": None,  # Only the layer's inputs.
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Attention(nn.Module):
    """Multi-head self-attention restricted to tokens of the same packed segment.

    With `attention_mask="lengths"` the restriction is to the real tokens of the row instead (the
    same thing when each row holds one sequence), which cuDNN runs without any mask. The kernel
    is chosen by `select_attention`.
    """

    num_heads: int
    head_dim: int
    hidden_size: int
    attention_dropout_rate: float
    attention_impl: str
    dtype: Any
    param_dtype: Any
    attention_mask: str = "segments"

    @nn.compact
    def __call__(self, x: Array, segment_ids: Array, *, train: bool
                 ) -> tuple[Array, tuple[Array, Array, Array]]:
        """Returns the attention output and (q, k, v), each [batch, length, heads, head_dim].

        Args: x [batch, length, embed]; segment_ids [batch, length], 0 on padding.
        """
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
        use_dropout = train and self.attention_dropout_rate > 0
        impl = attention.select_attention(
            self.attention_impl, platform=attention.platform(), dtype=q.dtype,
            head_dim=self.head_dim, length=x.shape[1], mask=self.attention_mask,
            dropout=use_dropout)
        if self.attention_mask == "lengths":
            # One sequence per row, padding at the end: a key is visible iff it is real.
            lengths = jnp.sum(segment_ids > 0, axis=-1, dtype=jnp.int32)
            dense_mask = (jnp.arange(x.shape[1])[None, :] < lengths[:, None])[:, None, None, :]
            kernel_segments = (segment_ids > 0).astype(jnp.int32)
            mask_args = dict(key_value_seq_lengths=lengths)
        else:
            # Packed rows hold several documents: a token sees only its own segment. Padding
            # (segment 0) attends to padding, which keeps every softmax row finite and is never
            # read. cuDNN receives the boolean mask as an additive bias.
            dense_mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
            kernel_segments = segment_ids
            mask_args = dict(mask=dense_mask)
        if impl == "einsum":
            out = self._einsum_attention(q, k, v, dense_mask, use_dropout)
        elif impl == "splash":
            out = attention.splash_attention(q, k, v, kernel_segments)  # Selected only on TPUs.
        else:
            out = jax.nn.dot_product_attention(q, k, v, implementation=impl, **mask_args)
        out = nn.with_logical_constraint(out, axes)
        # Each head's output, for measuring what it contributes (`importance`); a no-op unless
        # the "intermediates" collection is mutable.
        self.sow("intermediates", "heads", out)
        out = out.reshape(*out.shape[:2], width)
        return dense(self.hidden_size, ("heads", "embed"), "out")(out), (q, k, v)

    def _einsum_attention(self, q, k, v, mask, use_dropout: bool) -> Array:
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / jnp.sqrt(self.head_dim)
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        if use_dropout:
            probs = nn.Dropout(self.attention_dropout_rate)(probs, deterministic=False)
        return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


class EncoderLayer(nn.Module):
    """One post-LayerNorm transformer block, as in BERT; also returns its attention's q, k, v
    (free: distillation losses read them for the layers they distil, XLA drops the others)."""

    num_heads: int
    hidden_size: int
    intermediate_size: int
    dropout_rate: float
    attention_dropout_rate: float
    attention_impl: str
    dtype: Any
    param_dtype: Any
    attention_mask: str = "segments"
    layer_norm_eps: float = LAYER_NORM_EPS
    head_dim: int = 0  # 0: hidden_size // num_heads.

    @nn.compact
    def __call__(self, x: Array, segment_ids: Array, train: bool
                 ) -> tuple[Array, tuple[Array, Array, Array]]:
        dense = lambda features, names, name: nn.Dense(  # noqa: E731
            features, dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=_dense_init(names), bias_init=_zeros(names[1:]), name=name)
        dropout = nn.Dropout(self.dropout_rate)
        attended, qkv = Attention(
            num_heads=self.num_heads, head_dim=self.head_dim or self.hidden_size // self.num_heads,
            hidden_size=self.hidden_size, attention_dropout_rate=self.attention_dropout_rate,
            attention_impl=self.attention_impl, attention_mask=self.attention_mask,
            dtype=self.dtype, param_dtype=self.param_dtype, name="attention")(
                x, segment_ids, train=train)
        x = _layer_norm(self.dtype, self.param_dtype, "attention_norm", self.layer_norm_eps)(
            x + dropout(attended, deterministic=not train))
        h = _gelu(dense(self.intermediate_size, ("embed", "mlp"), "mlp_in")(x))
        # What each feed-forward neuron and the normalised hidden channels carry (`importance`).
        self.sow("intermediates", "neurons", h)
        self.sow("intermediates", "normalised", x)
        h = nn.with_logical_constraint(h, ("batch", "length", "act_mlp"))
        h = dense(self.hidden_size, ("mlp", "embed"), "mlp_out")(h)
        x = _layer_norm(self.dtype, self.param_dtype, "mlp_norm", self.layer_norm_eps)(
            x + dropout(h, deterministic=not train))
        return nn.with_logical_constraint(x, ("batch", "length", "act_embed")), qkv


class Encoder(nn.Module):
    """BERT/DistilBERT/RoBERTa encoder with an optional pooler and a tied MLM head.

    `__call__` returns `(logits, out)`: MLM logits where asked for (or None), and a dict of named
    intermediates: `hidden` [batch, length, embed] (final hidden states), `pooled` [batch, embed]
    when the model has a pooler, `hidden_states` (embeddings, then every layer's output) when
    `return_all_hidden`, and what distillation losses read of chosen layers: `hidden_at`
    {index: [batch, length, embed]} and `qkv_at` {layer: (q, k, v)}.
    """

    vocab_size: int
    num_layers: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512  # Positions a row can use: 0 .. max - 1.
    type_vocab_size: int = 0  # 0: no token-type embeddings (DistilBERT); RoBERTa 1.
    use_pooler: bool = False
    use_mlm_head: bool = True
    head_style: str = "bert"  # One of HEAD_STYLES: only the Hugging Face names differ.
    layer_norm_eps: float = LAYER_NORM_EPS  # RoBERTa, XLM-R: 1e-5.
    # Position p reads row p + position_offset of a table of max_position_embeddings +
    # position_offset rows (RoBERTa, XLM-R: 2; the rows below are never read).
    position_offset: int = 0
    dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.0
    attention_impl: str = "auto"  # See `attention.select_attention`.
    attention_mask: str = "segments"  # segments | lengths (one sequence per row).
    dtype: Any = jnp.bfloat16
    param_dtype: Any = jnp.float32
    remat: bool | str = False  # A name in REMAT_POLICIES or "none"; True means "full".
    # Width of each attention head; 0: hidden_size // num_heads, as in every released BERT (and
    # all transformers can load). Heads pruned from a wider model keep their size.
    head_dim: int = 0

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    def setup(self):
        embed_init = lambda names: nn.with_logical_partitioning(  # noqa: E731
            nn.initializers.normal(INIT_STD), names)
        embed = lambda n, names, name: nn.Embed(  # noqa: E731
            n, self.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
            embedding_init=embed_init(names), name=name)
        self.word_embeddings = embed(self.vocab_size, ("vocab", "embed"), "word_embeddings")
        self.position_embeddings = embed(
            self.max_position_embeddings + self.position_offset, ("positions", "embed"),
            "position_embeddings")
        if self.type_vocab_size:
            self.token_type_embeddings = embed(
                self.type_vocab_size, ("types", "embed"), "token_type_embeddings")
        self.embeddings_norm = _layer_norm(self.dtype, self.param_dtype, "embeddings_norm",
                                           self.layer_norm_eps)
        self.dropout = nn.Dropout(self.dropout_rate)
        policy = remat_policy_name(self.remat)
        layer_cls = EncoderLayer
        if policy != "none":
            # static_argnums counts `self`: argument 3 is `train`.
            layer_cls = nn.remat(EncoderLayer, static_argnums=(3,), policy=REMAT_POLICIES[policy])
        self.layers = [
            layer_cls(
                num_heads=self.num_heads, hidden_size=self.hidden_size,
                intermediate_size=self.intermediate_size, dropout_rate=self.dropout_rate,
                attention_dropout_rate=self.attention_dropout_rate,
                attention_impl=self.attention_impl, attention_mask=self.attention_mask,
                layer_norm_eps=self.layer_norm_eps, head_dim=self.head_size, dtype=self.dtype,
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
            self.mlm_norm = _layer_norm(self.dtype, self.param_dtype, "mlm_norm",
                                        self.layer_norm_eps)
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
        hidden_at: Sequence[int] = (),
        qkv_at: Sequence[int] = (),
    ) -> tuple[Array | None, dict[str, Any]]:
        """Encodes packed rows.

        Args:
          input_ids: [batch, length] token ids.
          segment_ids: [batch, length] packed-document ids, 1, 2, … per row; 0 on padding.
          positions: [batch, length] position of each token inside its segment, from 0 (the
            model adds `position_offset`, so packed segments each start at RoBERTa's row 2).
          token_type_ids: [batch, length] BERT sentence A/B ids; zeros when None.
          logits_at: None for no MLM logits; "all" for logits at every position
            [batch, length, vocab]; or positions [batch, k] to gather first, giving
            [batch, k, vocab] (the head then costs k / length of the full head).
          train: enables dropout (needs a "dropout" rng).
          return_all_hidden: also return every layer's output in `out["hidden_states"]`.
          hidden_at: hidden states to return in `out["hidden_at"]`, by index: 0 is the
            embeddings' output, i the output of layer i − 1.
          qkv_at: layers whose attention q, k, v [batch, length, heads, head_dim] to return in
            `out["qkv_at"]`.
        """
        for name, indices, end in (("hidden_at", hidden_at, self.num_layers + 1),
                                   ("qkv_at", qkv_at, self.num_layers)):
            if any(not 0 <= i < end for i in indices):
                raise ValueError(f"{name} {tuple(indices)} is outside 0..{end - 1} for an encoder "
                                 f"of {self.num_layers} layers")
        x = (self.word_embeddings(input_ids)
             + self.position_embeddings(positions + self.position_offset))
        if self.type_vocab_size:
            if token_type_ids is None:
                token_type_ids = jnp.zeros_like(input_ids)
            x = x + self.token_type_embeddings(token_type_ids)
        x = self.dropout(self.embeddings_norm(x), deterministic=not train)
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
        hidden_states = [x]
        qkv = {}
        for i, layer in enumerate(self.layers):
            x, qkv[i] = layer(x, segment_ids, train)
            hidden_states.append(x)
        out: dict[str, Any] = {"hidden": x}
        if return_all_hidden:
            out["hidden_states"] = tuple(hidden_states)
        if hidden_at:
            out["hidden_at"] = {i: hidden_states[i] for i in hidden_at}
        if qkv_at:
            out["qkv_at"] = {i: qkv[i] for i in qkv_at}
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
        """MLM head: hidden [..., embed] → logits [..., vocab] (decoder tied to the embeddings)."""
        features, _, bias = self.mlm_head_inputs(hidden)
        logits = self.word_embeddings.attend(features) + bias.astype(self.dtype)
        return nn.with_logical_constraint(logits, ("batch", "length", "act_vocab"))

    def mlm_head_inputs(self, hidden: Array) -> tuple[Array, Array, Array]:
        """The MLM head up to its vocabulary projection, for losses that fuse that projection.

        Call through `model.apply(variables, hidden, method=Encoder.mlm_head_inputs)`.

        Args:
          hidden: [batch, n, embed] final hidden states (all positions or gathered ones).

        Returns:
          `features` [batch, n, embed] (compute dtype), `decoder` [vocab, embed] (the tied word
          embeddings) and `bias` [vocab], with logits = features · decoderᵀ + bias.
        """
        features = self.mlm_norm(_gelu(self.mlm_transform(hidden)))
        features = nn.with_logical_constraint(features, ("batch", "length", "act_embed"))
        return features, self.word_embeddings.embedding, self.mlm_bias


def init_fn(model: Encoder, length: int = 8):
    """`rng → logically-boxed params` of `model` on a dummy row (for `jax.eval_shape` and
    `partitioning.sharded_init`); the MLM head is built too (`logits_at="all"`)."""

    def init(rng):
        ids = jnp.zeros((1, length), jnp.int32)
        return model.init(rng, ids, jnp.ones_like(ids), ids, logits_at="all")["params"]

    return init


def remat_policy_name(remat: bool | str) -> str:
    """Normalises `model.remat` (configs before policies were named stored a bool)."""
    if remat is True:
        return "full"
    if remat is False or remat == "none":
        return "none"
    if remat not in REMAT_POLICIES:
        raise ValueError(
            f"model.remat must be none, {', '.join(REMAT_POLICIES)} (or a bool), got {remat!r}")
    return remat


def attention_kernel(model: Encoder, length: int, *, train: bool = False) -> str:
    """The attention kernel `model` runs on this platform for rows of `length` tokens."""
    return attention.select_attention(
        model.attention_impl, platform=attention.platform(), dtype=model.dtype,
        head_dim=model.head_size, length=length, mask=model.attention_mask,
        dropout=train and model.attention_dropout_rate > 0)


# Parameters an encoder carries that sentence embeddings never read (the MLM head, BERT's pooler).
HEAD_PARAMS = ("mlm_transform", "mlm_norm", "mlm_bias", "pooler")


def encoder_only(params: dict[str, Any]) -> dict[str, Any]:
    """An encoder's parameters without the MLM head and the pooler: what its hidden states, and
    so its sentence embeddings, depend on."""
    return {name: value for name, value in params.items() if name not in HEAD_PARAMS}
