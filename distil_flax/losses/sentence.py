"""Sentence-embedding terms: the student's pooled embeddings against the teacher's.

    L_mse        = mean over sentences of ‖e_s·W + b − e_t‖² / d_t    (W, b: a projection when the
    L_cosine     = mean over sentences of 1 − cos(e_s·W + b, e_t)       widths differ)
    L_similarity = in-batch structure: KL(softmax(C_t/τ) ‖ softmax(C_s/τ)) over each sentence's
                   row of cosine similarities to the other sentences, or the MSE between C_s, C_t

e are the sentence embeddings pooled per packed segment (`pooling.pool_segments`), so packing
stays exact. The similarity term compares each model in its own space: it needs no projection
and keeps the teacher's rankings, not only its vectors. Reductions run in float32 (float64 inputs
stay float64).

Metrics: `embedding_mse` and `embedding_cosine` (cos, not its distance; when the widths agree or
a projection is trained), `embedding_similarity_KIND`, and `loss_embeddings`, the weighted sum.
"""

import dataclasses

import jax
import jax.numpy as jnp

from distil_flax.data import packing, teacher_targets
from distil_flax.losses.term import Field, Term, TermInputs, kept_channels, project
from distil_flax.losses.triple import weighted_mean, wide
from distil_flax.model.pooling import POOLINGS, pool_segments
from distil_flax.training import fields

Array = jax.Array

SIMILARITIES = ("kl", "mse")


@dataclasses.dataclass(frozen=True)
class SentenceEmbeddings:
    """Terms on sentence embeddings pooled per packed segment: MSE and cosine against the
    teacher's (through a projection when the widths differ), and the in-batch similarity
    structure; each weight 0 is off."""

    mse: float = 0.0
    cosine: float = 0.0
    similarity: float = 0.0
    similarity_kind: str = "kl"  # kl | mse
    temperature: float = 0.05  # Of the similarity KL's softmax over cosine similarities.
    pooling: str = "mean"  # mean | cls
    max_segments: int = 1  # Segments a row may hold (static: the pooled array's size).

    @property
    def weight(self) -> float:
        return self.mse + self.cosine + self.similarity


def pooled_mse(student: Array, teacher: Array, present: Array) -> Array:
    """Mean over present sentences of the mean squared difference over features.

    Args:
      student, teacher: [n, d] sentence embeddings (the student's already projected).
      present: [n] bool, False for empty slots.
    """
    diff = wide(student) - wide(teacher)
    return weighted_mean(jnp.mean(diff * diff, axis=-1), present.astype(diff.dtype))


def _normalised(x: Array) -> Array:
    x = wide(x)
    # Not x / ‖x‖: the norm's gradient is 0/0 at the zero vectors of empty segment slots.
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-24))


def pooled_cosine_distance(student: Array, teacher: Array, present: Array) -> Array:
    """Mean over present sentences of 1 − cos(student, teacher); embeddings [n, d]."""
    cos = jnp.sum(_normalised(student) * _normalised(teacher), axis=-1)
    return weighted_mean(1.0 - cos, present.astype(cos.dtype))


def similarity_structure(student: Array, teacher: Array, present: Array, *, kind: str = "kl",
                         temperature: float = 0.05) -> Array:
    """How far the student's in-batch cosine-similarity matrix is from the teacher's.

    Only pairs of two different present sentences count. "kl": for each sentence, KL(teacher ‖
    student) between softmax(cosine similarities / temperature) over the other sentences, averaged
    over sentences; "mse": the mean squared difference of the similarities over pairs.

    Args:
      student, teacher: [n, d_s], [n, d_t] sentence embeddings, each in its own model's space.
      present: [n] bool.
    """
    if kind not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {', '.join(SIMILARITIES)}, got {kind!r}")
    s, t = _normalised(student), _normalised(teacher)
    c_s, c_t = s @ s.T, t @ t.T
    n = present.shape[0]
    pairs = present[:, None] & present[None, :] & ~jnp.eye(n, dtype=bool)
    if kind == "mse":
        diff = c_s - c_t
        return weighted_mean(diff * diff, pairs.astype(diff.dtype))
    lowest = jnp.finfo(c_s.dtype).min  # Left-out pairs vanish from the softmax.
    log_p_s = jax.nn.log_softmax(jnp.where(pairs, c_s / temperature, lowest), axis=-1)
    log_p_t = jax.nn.log_softmax(jnp.where(pairs, c_t / temperature, lowest), axis=-1)
    kl = jnp.sum(jnp.where(pairs, jnp.exp(log_p_t) * (log_p_t - log_p_s), 0.0), axis=-1)
    # A sentence alone in the batch has no row to compare.
    rows = jnp.any(pairs, axis=-1)
    return weighted_mean(kl, rows.astype(kl.dtype))


def embedding_terms(spec: SentenceEmbeddings, student_hidden: Array, teacher_hidden: Array | None,
                    segment_ids: Array, projection: dict[str, Array] | None,
                    teacher_channels: tuple[int, ...] = (), teacher_pooled: Array | None = None
                    ) -> tuple[Array, dict[str, Array]]:
    """The weighted terms on both models' final hidden states [batch, length, width], pooled per
    segment, and their metrics. MSE and cosine compare with the teacher's `teacher_channels`
    when given (`LossSpec.teacher_channels`); the similarity structure, the teacher's whole
    embeddings. `teacher_pooled` [batch, max_segments, width]: the teacher's embeddings already
    pooled (cached targets), used instead of `teacher_hidden`."""

    def pooled(hidden):  # [batch, max_segments, d] → [batch · max_segments, d]
        vectors, present = pool_segments(hidden, segment_ids, spec.max_segments, spec.pooling)
        return vectors.reshape(-1, vectors.shape[-1]), present.reshape(-1)

    student, present = pooled(student_hidden)
    if teacher_pooled is None:
        teacher, _ = pooled(teacher_hidden)
    else:
        teacher = teacher_pooled.reshape(-1, teacher_pooled.shape[-1])
    loss = jnp.zeros((), jnp.float32)
    metrics = {}
    compared = kept_channels(teacher, teacher_channels)
    if projection or student.shape[-1] == compared.shape[-1]:
        projected = project(projection, student)
        metrics["embedding_mse"] = pooled_mse(projected, compared, present)
        metrics["embedding_cosine"] = 1.0 - pooled_cosine_distance(projected, compared, present)
        loss += (spec.mse * metrics["embedding_mse"]
                 + spec.cosine * (1.0 - metrics["embedding_cosine"]))
    if spec.similarity:
        name = f"embedding_similarity_{spec.similarity_kind}"
        metrics[name] = similarity_structure(student, teacher, present,
                                             kind=spec.similarity_kind,
                                             temperature=spec.temperature)
        loss += spec.similarity * metrics[name]
    metrics["loss_embeddings"] = loss
    return loss, metrics


class SentenceEmbeddingsTerm(Term):
    name = "embeddings"
    spec = SentenceEmbeddings
    doc = ("Sentence embeddings, pooled per packed segment in both models (sentence-transformers' "
           "distillation and beyond). MSE and cosine go through a learned projection when the "
           "student is narrower; the similarity term compares each model's in-batch cosine "
           "similarities.")
    fields = (
        Field("mse_weight", 0.0),
        Field("cosine_weight", 0.0, "Weight of 1 − cos(student, teacher)."),
        Field("similarity_weight", 0.0),
        Field("similarity", "kl", "kl (row-wise softmax, temperature) | mse.",
              fields.one_of(*SIMILARITIES)),
        Field("temperature", 0.05, "Of the similarity term's softmax.", fields.positive()),
        Field("pooling", "auto", "mean | cls | auto: the teacher folder's sentence-transformers "
                                 "pooling (1_Pooling), else mean.",
              fields.one_of("auto", *POOLINGS)),
    )
    weights = ("mse_weight", "cosine_weight", "similarity_weight")
    card = "pooled sentence embeddings against the teacher's"  # Named per weight on the card.

    def resolve(self, section, config, student, teacher, teacher_pooling, pruning=None):
        pooling = (teacher_pooling or "mean") if section.pooling == "auto" else section.pooling
        return SentenceEmbeddings(
            mse=section.mse_weight, cosine=section.cosine_weight,
            similarity=section.similarity_weight, similarity_kind=section.similarity,
            temperature=section.temperature, pooling=pooling,
            max_segments=packing.max_segments(config.data.seq_len))

    def projections(self, spec):
        # The similarity structure compares each model in its own space: no projection.
        return ("embeddings",) if spec.mse or spec.cosine else ()

    def compute(self, spec, inputs: TermInputs):
        return embedding_terms(spec, inputs.student["hidden"], inputs.teacher.get("hidden"),
                               inputs.segment_ids, inputs.projections.get("embeddings"),
                               inputs.teacher_channels,
                               inputs.teacher.get(teacher_targets.FIELD))


TERM = SentenceEmbeddingsTerm()
