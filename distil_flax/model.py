"""The one transformer encoder: BERT (teacher) and DistilBERT (student) are configs of it.

BERT and DistilBERT differ only by fields: number of layers, token-type embeddings, pooler, and the
names their MLM heads carry in Hugging Face checkpoints. Both are post-LayerNorm encoders with learned
absolute positions, exact (erf) GELU and LayerNorm eps 1e-12, so one module computes both.

Every parameter carries logical axis names (`vocab`, `embed`, `heads`, `kv`, `mlp`, …); the rules in
`partitioning.py` map them to mesh axes. Activations get logical constraints on the same names.
"""

from typing import TYPE_CHECKING, Any, Literal, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

if TYPE_CHECKING:  # Imported lazily: the benchmark machines lack ml_collections.
    import ml_collections

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


def model_config(size: str) -> "ml_collections.ConfigDict":
    """Returns the model section of a config for a size in `SIZES`, with every field explained."""
    import ml_collections

    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; known sizes: {sorted(SIZES)}")
    c = ml_collections.ConfigDict()
    c.vocab_size = 0  # 0: take it from the tokenizer.
    c.max_position_embeddings = 512  # Learned absolute positions, as BERT.
    c.dropout_rate = 0.1  # Hidden/embedding dropout (BERT and DistilBERT: 0.1).
    # Dropout on attention probabilities forces the unfused einsum attention path; flash kernels
    # have no dropout, so it is off by default (modern BERT recipes train without it too).
    c.attention_dropout_rate = 0.0
    # auto | xla | cudnn | splash | einsum. auto: cuDNN flash attention on NVIDIA GPUs (bf16/fp16),
    # the Pallas splash kernel on TPUs, XLA's attention elsewhere (see `select_attention`).
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


ATTENTION_IMPLS = ("auto", "xla", "cudnn", "splash", "einsum")
ATTENTION_MASKS = ("segments", "lengths")

# Remat policy by name: what a layer keeps for the backward pass (everything else is recomputed).
REMAT_POLICIES = {
    "full": None,  # Only the layer's inputs.
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _platform() -> str:
    """"cuda", "rocm", "tpu" or "cpu": where the step is compiled for."""
    backend = jax.default_backend()
    if backend != "gpu":
        return backend
    from jax.extend import backend as jax_backend

    version = jax_backend.get_backend().platform_version.lower()
    return "rocm" if "rocm" in version else "cuda"


def _splash_available() -> bool:
    try:
        from jax.experimental.pallas.ops.tpu import splash_attention  # noqa: F401
    except ImportError:
        return False
    return True


def select_attention(requested: str, *, platform: str, dtype: Any, head_dim: int, length: int,
                     mask: str, dropout: bool) -> str:
    """The attention kernel to run: "einsum", "xla", "cudnn" or "splash".

    Args:
      requested: `model.attention_impl`.
      platform: "cuda", "rocm", "tpu" or "cpu".
      dtype: compute dtype of queries and keys.
      head_dim, length: per-head width and row length.
      mask: `model.attention_mask` ("segments" or "lengths").
      dropout: whether attention-probability dropout is active (only einsum implements it).
    """
    if dropout:
        return "einsum"
    if requested == "auto":
        if platform == "tpu" and length % 128 == 0 and _splash_available():
            return "splash"  # Its blocks are multiples of 128 tokens.
        if platform == "cuda" and _cudnn_supports(dtype, head_dim, length, mask):
            return "cudnn"
        return "xla"
    if requested == "cudnn" and platform != "cuda":
        raise ValueError(
            f"model.attention_impl='cudnn' needs an NVIDIA GPU, but the step runs on {platform}; "
            "use 'auto' or 'xla'")
    if requested == "splash" and platform != "tpu":
        raise ValueError(
            f"model.attention_impl='splash' needs a TPU, but the step runs on {platform}; use "
            "'auto' or 'xla'")
    return requested


def _cudnn_supports(dtype: Any, head_dim: int, length: int, mask: str) -> bool:
    # cuDNN flash attention: half-precision inputs, head_dim a multiple of 8 up to 128 (256 on
    # Hopper; 128 is enough here). A boolean mask reaches cuDNN as an additive bias, which its
    # training kernels accept only for even sequence lengths.
    return (jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0
            and head_dim <= 128 and (mask == "lengths" or length % 2 == 0))


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
        use_dropout = train and self.attention_dropout_rate > 0
        impl = select_attention(
            self.attention_impl, platform=_platform(), dtype=q.dtype, head_dim=self.head_dim,
            length=x.shape[1], mask=self.attention_mask, dropout=use_dropout)
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
            out = splash_attention(q, k, v, kernel_segments)  # Selected only on TPUs.
        else:
            out = jax.nn.dot_product_attention(q, k, v, implementation=impl, **mask_args)
        out = nn.with_logical_constraint(out, axes)
        return dense(self.hidden_size, ("heads", "embed"), "out")(out.reshape(*out.shape[:2], width))

    def _einsum_attention(self, q, k, v, mask, use_dropout: bool) -> Array:
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / jnp.sqrt(self.head_dim)
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        if use_dropout:
            probs = nn.Dropout(self.attention_dropout_rate)(probs, deterministic=False)
        return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def splash_attention(q: Array, k: Array, v: Array, segment_ids: Array, *,
                     interpret: bool = False) -> Array:
    """Pallas splash attention (TPU) restricted to equal segment ids.

    Args:
      q, k, v: [batch, length, heads, head_dim]; length a multiple of 128.
      segment_ids: [batch, length] int32; a token attends to keys with the same id.
      interpret: run the kernel in the Pallas interpreter (any backend; for tests).

    Returns:
      [batch, length, heads, head_dim].

    A Pallas kernel cannot be partitioned by XLA, so under a mesh it runs per shard through
    `shard_map`, with batch and heads split as the logical rules in effect say.
    """
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    def local(q, k, v, segment_ids):
        _, length, heads, head_dim = q.shape
        block = min(512, length)
        sizes = splash.BlockSizes(
            block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
            block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
        kernel = splash.make_splash_mha(
            splash.MultiHeadMask([splash.FullMask((length, length))] * heads),
            block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
        def run(q, k, v, s):  # One row: [heads, length, head_dim].
            return kernel(q, k, v, segment_ids=splash.SegmentIds(q=s, kv=s))

        heads_first = lambda t: jnp.swapaxes(t, 1, 2)  # noqa: E731
        out = jax.vmap(run)(heads_first(q * head_dim**-0.5), heads_first(k), heads_first(v),
                            segment_ids)
        return heads_first(out)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return local(q, k, v, segment_ids)
    spec = nn.logical_to_mesh_axes(("batch", "length", "act_heads", "act_kv"))
    if spec[1] is not None or spec[3] is not None:
        raise ValueError("splash attention needs whole rows and heads on each device: the mesh "
                         "rules must not shard `length` or `act_kv`")
    segment_spec = jax.sharding.PartitionSpec(spec[0], None)
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, segment_spec),
                         out_specs=spec, check_vma=False)(q, k, v, segment_ids)


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
    attention_mask: str = "segments"

    @nn.compact
    def __call__(self, x: Array, segment_ids: Array, train: bool) -> Array:
        dense = lambda features, names, name: nn.Dense(  # noqa: E731
            features, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=_dense_init(names),
            bias_init=_zeros(names[1:]), name=name)
        dropout = nn.Dropout(self.dropout_rate)
        attended = Attention(
            num_heads=self.num_heads, head_dim=self.hidden_size // self.num_heads,
            hidden_size=self.hidden_size, attention_dropout_rate=self.attention_dropout_rate,
            attention_impl=self.attention_impl, attention_mask=self.attention_mask,
            dtype=self.dtype, param_dtype=self.param_dtype, name="attention")(
                x, segment_ids, train=train)
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
    attention_impl: str = "auto"  # See `select_attention`.
    attention_mask: str = "segments"  # segments | lengths (one sequence per row).
    dtype: Any = jnp.bfloat16
    param_dtype: Any = jnp.float32
    remat: bool | str = False  # A name in REMAT_POLICIES or "none"; True means "full".

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
                dtype=self.dtype, param_dtype=self.param_dtype, name=f"layers_{i}")
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


def attention_kernel(model: Encoder, length: int, *, train: bool = False) -> str:
    """The attention kernel `model` runs on this platform for rows of `length` tokens."""
    return select_attention(
        model.attention_impl, platform=_platform(), dtype=model.dtype,
        head_dim=model.hidden_size // model.num_heads, length=length, mask=model.attention_mask,
        dropout=train and model.attention_dropout_rate > 0)


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
    if c.hidden_size % c.num_heads:
        raise ValueError(
            f"model.hidden_size ({c.hidden_size}) must be divisible by model.num_heads "
            f"({c.num_heads})")
    if c.attention_impl not in ATTENTION_IMPLS:
        raise ValueError(f"model.attention_impl must be one of {', '.join(ATTENTION_IMPLS)}, "
                         f"got {c.attention_impl!r}")
    attention_mask = getattr(c, "attention_mask", "segments")
    if attention_mask not in ATTENTION_MASKS:
        raise ValueError(f"model.attention_mask must be segments or lengths, got "
                         f"{attention_mask!r}")
    remat = remat_policy_name(c.remat)
    if c.head_style not in ("bert", "distilbert"):
        raise ValueError(f"model.head_style must be bert or distilbert, got {c.head_style!r}")
    return Encoder(
        vocab_size=vocab, num_layers=c.num_layers, hidden_size=c.hidden_size,
        num_heads=c.num_heads, intermediate_size=c.intermediate_size,
        max_position_embeddings=c.max_position_embeddings, type_vocab_size=c.type_vocab_size,
        use_pooler=c.use_pooler, head_style=c.head_style, dropout_rate=c.dropout_rate,
        attention_dropout_rate=c.attention_dropout_rate, attention_impl=c.attention_impl,
        attention_mask=attention_mask, dtype=_dtype(c.dtype), param_dtype=_dtype(c.param_dtype),
        remat=remat)
