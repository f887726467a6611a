"""The distillation losses: pure functions of the two models' outputs, composed by a `LossSpec`.

`triple`: DistilBERT's soft-target, MLM and cosine terms (plain and fused-head paths), the core
of every `LossSpec` (`spec.CoreSpec`).
The feature terms, one module each, declared as a `term.Term` and listed in `registry.TERMS`:
`hidden_states` and `attention_scores` (TinyBERT), `relations` (MiniLM), `sentence` (sentence
embeddings); `scores` holds what the score terms share.
`features`: the feature terms composed: captures, projections, their weighted sum.
`registry`: `TERMS`, and the `LossSpec` with a field per term.
"""

from distil_flax.losses.attention_scores import AttentionScores, attention_score_mse
from distil_flax.losses.features import (
    captures,
    feature_terms,
    projection_init,
    projections_needed,
)
from distil_flax.losses.hidden_states import HiddenStates, hidden_mse, hidden_state_pairs
from distil_flax.losses.registry import TERMS, LossSpec
from distil_flax.losses.relations import RELATION_PAIRS, Relations, relation_kl
from distil_flax.losses.sentence import (
    SIMILARITIES,
    SentenceEmbeddings,
    pooled_cosine_distance,
    pooled_mse,
    similarity_structure,
)
from distil_flax.losses.spec import Captures, CoreSpec, layer_pairs, uniform_layer_map
from distil_flax.losses.term import Field, Term, TermInputs, kept_channels, project
from distil_flax.losses.triple import (
    HeadInputs,
    TopK,
    cosine_distance,
    distillation_loss,
    fused_distillation_loss,
    masked_lm_loss,
    soft_target_kl,
    top_k_gap_bound,
    top_k_kl,
)

__all__ = [
    "TopK",
    "top_k_gap_bound",
    "top_k_kl",
    "AttentionScores", "Captures", "CoreSpec", "Field", "HeadInputs", "HiddenStates", "LossSpec",
    "RELATION_PAIRS", "Relations", "SIMILARITIES", "SentenceEmbeddings", "TERMS", "Term",
    "TermInputs", "attention_score_mse", "captures", "cosine_distance", "distillation_loss",
    "feature_terms", "fused_distillation_loss", "hidden_mse", "hidden_state_pairs",
    "kept_channels", "layer_pairs", "masked_lm_loss", "pooled_cosine_distance", "pooled_mse",
    "project", "projection_init", "projections_needed", "relation_kl", "similarity_structure",
    "soft_target_kl", "uniform_layer_map",
]
