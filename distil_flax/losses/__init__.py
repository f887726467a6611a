"""The distillation losses: pure functions of the two models' outputs, composed by a `LossSpec`.

`triple`: DistilBERT's soft-target, MLM and cosine terms (plain and fused-head paths).
`features`: TinyBERT's hidden-state and attention-score terms, MiniLM's relations, and (from
`sentence`) the sentence-embedding terms.
`spec`: the weights and options of every term.
"""

from distil_flax.losses.features import (
    attention_score_mse,
    feature_terms,
    hidden_mse,
    project,
    projection_init,
    projections_needed,
    relation_kl,
)
from distil_flax.losses.sentence import (
    SIMILARITIES,
    pooled_cosine_distance,
    pooled_mse,
    similarity_structure,
)
from distil_flax.losses.spec import (
    RELATION_PAIRS,
    AttentionScores,
    Captures,
    HiddenStates,
    LossSpec,
    Relations,
    SentenceEmbeddings,
    captures,
    hidden_state_pairs,
    layer_pairs,
    uniform_layer_map,
)
from distil_flax.losses.triple import (
    HeadInputs,
    cosine_distance,
    distillation_loss,
    fused_distillation_loss,
    masked_lm_loss,
    soft_target_kl,
)

__all__ = [
    "RELATION_PAIRS", "SIMILARITIES", "AttentionScores", "Captures", "HeadInputs",
    "HiddenStates", "LossSpec", "Relations", "SentenceEmbeddings", "attention_score_mse",
    "captures", "cosine_distance", "distillation_loss", "feature_terms",
    "fused_distillation_loss", "hidden_mse", "hidden_state_pairs", "layer_pairs",
    "masked_lm_loss", "pooled_cosine_distance", "pooled_mse", "project", "projection_init",
    "projections_needed", "relation_kl", "similarity_structure", "soft_target_kl",
    "uniform_layer_map",
]
