"""Task heads on the shared encoder, laid out as Hugging Face lays them out.

`TaskModel` holds our `Encoder` as its submodule `encoder` (so its parameters are the same tree a
pretraining run saves, under `params["encoder"]`) and adds one head, whose parameter names are the
HF module names, so export is a name map:

  seq_cls          sentence(-pair) classification, or regression with num_labels = 1:
                     pooling "pooler" (BERT): the encoder's tanh pooler on [CLS] → dropout →
                     `classifier`;
                     pooling "first_token" (DistilBERT): the first token → `pre_classifier` →
                     ReLU → dropout → `classifier`.
  multiple_choice  the same on every (context, choice) row, one logit per choice.
  qa               extractive QA: `qa_outputs` gives start and end logits at every position
                     (DistilBERT puts dropout before it, BERT does not).
  token_cls        dropout → `classifier` at every position.

Inputs are one example per row (no packing): the attention mask doubles as the encoder's segment
ids, and positions restart at 0 in every row.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from distil_flax.model.config import make_encoder
from distil_flax.model.encoder import INIT_STD, Encoder

Array = jax.Array

HEADS = ("seq_cls", "multiple_choice", "qa", "token_cls")
POOLINGS = ("pooler", "first_token")


def default_head_dropout(head: str, pooling: str, encoder_dropout: float) -> float:
    """The dropout transformers puts before each head (DistilBERT: seq_classif_dropout 0.2 and
    qa_dropout 0.1; BERT: hidden_dropout_prob, and none before `qa_outputs`)."""
    distilbert = pooling == "first_token"
    if head in ("seq_cls", "multiple_choice"):
        return 0.2 if distilbert else encoder_dropout
    if head == "qa":
        return 0.1 if distilbert else 0.0
    return encoder_dropout


def task_pooling(model_cfg) -> str:
    """How a seq_cls / multiple_choice head pools, from the model's own fields.

    A DistilBERT-shaped encoder (no token types, no pooler, head_style "distilbert") classifies
    its first token through `pre_classifier`, as DistilBERT does; any other keeps BERT's tanh
    pooler over [CLS] (added fresh where the encoder was saved without one). The HF export picks
    its family from the same fields, so the head always has a transformers class.
    """
    distilbert_shaped = (model_cfg.type_vocab_size == 0 and not model_cfg.use_pooler
                         and model_cfg.head_style == "distilbert")
    return "first_token" if distilbert_shaped else "pooler"


@dataclasses.dataclass(frozen=True)
class TaskHead:
    """What a fine-tuned model's head is, beside its weights.

    Attributes:
      head: a kind in `HEADS`.
      num_labels: outputs of the classifier (1 for regression and multiple choice, 2 for QA).
      label_names: class names by index (HF's id2label); () when they carry no names.
      regression: a seq_cls head trained with MSE (STS-B).
      head_dropout: the dropout before the head (HF's seq_classif_dropout / qa_dropout /
        classifier_dropout).
    """

    head: str
    num_labels: int
    label_names: tuple[str, ...] = ()
    regression: bool = False
    head_dropout: float = 0.1


class TaskModel(nn.Module):
    """An encoder with one task head.

    `__call__` returns `(logits, out)`: float32 logits — [batch, num_labels] (seq_cls),
    [batch, choices] (multiple_choice), [batch, length, 2] start/end (qa) or
    [batch, length, num_labels] (token_cls) — and the encoder's named intermediates.
    """

    encoder: Encoder  # Constructed without an MLM head; its params live under "encoder".
    head: str
    num_labels: int
    pooling: str = "pooler"  # seq_cls / multiple_choice: "pooler" (BERT) or "first_token".
    head_dropout: float = 0.1

    def _dense(self, features: int, names: tuple[Any, ...], name: str) -> nn.Dense:
        return nn.Dense(
            features, dtype=self.encoder.dtype, param_dtype=self.encoder.param_dtype,
            kernel_init=nn.with_logical_partitioning(nn.initializers.normal(INIT_STD), names),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), names[1:]),
            name=name)

    @nn.compact
    def __call__(self, input_ids: Array, attention_mask: Array, token_type_ids: Array | None = None,
                 *, train: bool = False) -> tuple[Array, dict[str, Any]]:
        """Args:
          input_ids: [batch, length] token ids ([batch, choices, length] for multiple_choice).
          attention_mask: same shape, 1 on tokens and 0 on padding.
          token_type_ids: same shape, BERT's sentence A/B ids (ignored by DistilBERT-shaped
            encoders); zeros when None.
          train: enables dropout (needs a "dropout" rng).
        """
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        choices = None
        if self.head == "multiple_choice":
            choices = input_ids.shape[1]
            flat = lambda x: None if x is None else x.reshape(-1, x.shape[-1])  # noqa: E731
            input_ids, attention_mask, token_type_ids = map(
                flat, (input_ids, attention_mask, token_type_ids))
        positions = jnp.broadcast_to(jnp.arange(input_ids.shape[-1]), input_ids.shape)
        _, out = self.encoder(input_ids, attention_mask, positions, token_type_ids, train=train)
        dropout = nn.Dropout(self.head_dropout)
        hidden = out["hidden"]

        if self.head in ("seq_cls", "multiple_choice"):
            if self.pooling == "pooler":
                if "pooled" not in out:
                    raise ValueError("pooling='pooler' needs an encoder with use_pooler=True")
                pooled = out["pooled"]
            elif self.pooling == "first_token":
                pooled = nn.relu(self._dense(self.encoder.hidden_size, ("embed", "transform"),
                                             "pre_classifier")(hidden[:, 0]))
            else:
                raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
            features = 1 if self.head == "multiple_choice" else self.num_labels
            logits = self._dense(features, ("transform", None), "classifier")(
                dropout(pooled, deterministic=not train))
            if choices is not None:
                logits = logits.reshape(-1, choices)
        elif self.head == "qa":
            logits = self._dense(2, ("embed", None), "qa_outputs")(
                dropout(hidden, deterministic=not train))
        else:
            logits = self._dense(self.num_labels, ("embed", None), "classifier")(
                dropout(hidden, deterministic=not train))
        return logits.astype(jnp.float32), out


def make_task_model(model_cfg, *, head: str, num_labels: int, pooling: str,
                    head_dropout: float) -> TaskModel:
    """A `TaskModel` on the encoder a model config section describes (without its MLM head).

    Args:
      model_cfg: a model section (`model.model_config`, a run's config.json, or an HF import).
      head, num_labels, pooling, head_dropout: as `TaskModel`'s fields.
    """
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    encoder = make_encoder(model_cfg).clone(use_mlm_head=False)
    return TaskModel(encoder=encoder, head=head, num_labels=num_labels, pooling=pooling,
                     head_dropout=head_dropout)


def init_fn(model: TaskModel, length: int = 8, choices: int = 2):
    """`rng → logically-boxed params` of `model`, on a dummy batch (for `jax.eval_shape` and
    `partitioning.sharded_init`)."""
    shape = (1, choices, length) if model.head == "multiple_choice" else (1, length)

    def init(rng):
        ids = jnp.zeros(shape, jnp.int32)
        return model.init(rng, ids, jnp.ones_like(ids), ids)["params"]

    return init
