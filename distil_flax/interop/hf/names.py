"""Hugging Face names and layouts: which HF key holds each of our parameters, and what shape.

Pure tables and the functions that read them, shared by `load` (HF → ours) and `export` (ours →
HF), so both directions use one name map (our parameter path "a/b/c" ↔ HF state-dict key) and one
contract: the key set and shapes of `model.Encoder`'s parameter tree (`expected_shapes`), or of a
`heads.TaskModel`'s (`task_shapes`), checked by `check_tree`.

Layout: torch `Linear` weights are [out, in], Flax `Dense` kernels [in, out]: exactly the entries
of `_TRANSPOSED` (and every task-head kernel) are transposed. The MLM decoder is tied to the word
embeddings on both sides.

Families: BERT, DISTILBERT, ROBERTA and XLM_ROBERTA (XLM-R names every parameter as RoBERTa does;
only the classes and model_type differ). `model.head_style` records the family, so it survives a
run's config.json. RoBERTa's position table starts at row pad_token_id + 1 = 2: HF's
`max_position_embeddings` (514) is our `max_position_embeddings + position_offset` (512 + 2).
"""

import dataclasses
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np
from flax import linen as nn
from flax import traverse_util

from distil_flax import model as model_lib
from distil_flax.model import heads as heads_lib

# Weight files `save_pretrained` writes, in the order we look for them.
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
TORCH_BIN_INDEX = "pytorch_model.bin.index.json"
WEIGHT_FILES = (SAFETENSORS, SAFETENSORS_INDEX, TORCH_BIN, TORCH_BIN_INDEX)

# Task heads (`heads.TaskModel`), exported by `export_task_hf`, not by the MLM/encoder export.
TASK_HEADS = ("seq_cls", "qa", "token_cls", "multiple_choice")
EXPORT_HEADS = ("mlm", "none")


# ----------------------------------------------------------------------------------------------
# Name maps: our parameter path ("a/b/c") → HF state-dict key.
# ----------------------------------------------------------------------------------------------

# Torch Linear weights [out, in] ↔ Flax Dense kernels [in, out]. Paths of layer parameters are
# given below "layers_{i}/". These and only these are transposed; embeddings, LayerNorm and biases
# keep their layout.
_TRANSPOSED = frozenset({
    "attention/query/kernel",
    "attention/key/kernel",
    "attention/value/kernel",
    "attention/out/kernel",
    "mlp_in/kernel",
    "mlp_out/kernel",
    "pooler/kernel",
    "mlm_transform/kernel",
})


@dataclasses.dataclass(frozen=True)
class Architecture:
    """How one HF architecture family names our parameters.

    Backbone names (`embeddings`, `token_types`, `layer`, `pooler`, `buffers`) are relative to the
    backbone prefix ("bert." inside *ForMaskedLM, "" in a bare *Model); head names are absolute.
    """

    model_type: str
    prefix: str  # Backbone prefix inside the models with heads.
    mlm_class: str
    base_class: str
    tokenizer_class: str
    embeddings: Mapping[str, str]
    token_types: Mapping[str, str]
    layer_prefix: str  # Format string with {i}: where layer i's keys start.
    layer: Mapping[str, str]  # Our path below "layers_{i}/" → HF name below `layer_prefix`.
    pooler: Mapping[str, str]
    mlm_head: Mapping[str, str]
    # Decoder keys HF ties (and may or may not store): HF key → our path holding the same values.
    tied: Mapping[str, str]
    # Keys with no counterpart in our model that are expected and safely ignored on import.
    ignored_heads: tuple[str, ...]
    buffers: tuple[str, ...]  # Non-parameter buffers some versions save (backbone-relative).
_EMBEDDINGS = {
    "word_embeddings/embedding": "embeddings.word_embeddings.weight",
    "position_embeddings/embedding": "embeddings.position_embeddings.weight",
    "embeddings_norm/scale": "embeddings.LayerNorm.weight",
    "embeddings_norm/bias": "embeddings.LayerNorm.bias",
}

BERT = Architecture(
    model_type="bert",
    prefix="bert.",
    mlm_class="BertForMaskedLM",
    base_class="BertModel",
    tokenizer_class="BertTokenizer",
    embeddings=_EMBEDDINGS,
    token_types={"token_type_embeddings/embedding": "embeddings.token_type_embeddings.weight"},
    layer_prefix="encoder.layer.{i}.",
    layer={
        "attention/query/kernel": "attention.self.query.weight",
        "attention/query/bias": "attention.self.query.bias",
        "attention/key/kernel": "attention.self.key.weight",
        "attention/key/bias": "attention.self.key.bias",
        "attention/value/kernel": "attention.self.value.weight",
        "attention/value/bias": "attention.self.value.bias",
        "attention/out/kernel": "attention.output.dense.weight",
        "attention/out/bias": "attention.output.dense.bias",
        "attention_norm/scale": "attention.output.LayerNorm.weight",
        "attention_norm/bias": "attention.output.LayerNorm.bias",
        "mlp_in/kernel": "intermediate.dense.weight",
        "mlp_in/bias": "intermediate.dense.bias",
        "mlp_out/kernel": "output.dense.weight",
        "mlp_out/bias": "output.dense.bias",
        "mlp_norm/scale": "output.LayerNorm.weight",
        "mlp_norm/bias": "output.LayerNorm.bias",
    },
    pooler={"pooler/kernel": "pooler.dense.weight", "pooler/bias": "pooler.dense.bias"},
    mlm_head={
        "mlm_transform/kernel": "cls.predictions.transform.dense.weight",
        "mlm_transform/bias": "cls.predictions.transform.dense.bias",
        "mlm_norm/scale": "cls.predictions.transform.LayerNorm.weight",
        "mlm_norm/bias": "cls.predictions.transform.LayerNorm.bias",
        "mlm_bias": "cls.predictions.bias",
    },
    tied={"cls.predictions.decoder.weight": "word_embeddings/embedding",
          "cls.predictions.decoder.bias": "mlm_bias"},
    # BertForPreTraining's next-sentence head: DistilBERT's recipe has no NSP loss.
    ignored_heads=("cls.seq_relationship.weight", "cls.seq_relationship.bias"),
    buffers=("embeddings.position_ids", "embeddings.token_type_ids"),
)

DISTILBERT = Architecture(
    model_type="distilbert",
    prefix="distilbert.",
    mlm_class="DistilBertForMaskedLM",
    base_class="DistilBertModel",
    tokenizer_class="DistilBertTokenizer",
    embeddings=_EMBEDDINGS,
    token_types={},
    layer_prefix="transformer.layer.{i}.",
    layer={
        "attention/query/kernel": "attention.q_lin.weight",
        "attention/query/bias": "attention.q_lin.bias",
        "attention/key/kernel": "attention.k_lin.weight",
        "attention/key/bias": "attention.k_lin.bias",
        "attention/value/kernel": "attention.v_lin.weight",
        "attention/value/bias": "attention.v_lin.bias",
        "attention/out/kernel": "attention.out_lin.weight",
        "attention/out/bias": "attention.out_lin.bias",
        "attention_norm/scale": "sa_layer_norm.weight",
        "attention_norm/bias": "sa_layer_norm.bias",
        "mlp_in/kernel": "ffn.lin1.weight",
        "mlp_in/bias": "ffn.lin1.bias",
        "mlp_out/kernel": "ffn.lin2.weight",
        "mlp_out/bias": "ffn.lin2.bias",
        "mlp_norm/scale": "output_layer_norm.weight",
        "mlp_norm/bias": "output_layer_norm.bias",
    },
    pooler={},
    mlm_head={
        "mlm_transform/kernel": "vocab_transform.weight",
        "mlm_transform/bias": "vocab_transform.bias",
        "mlm_norm/scale": "vocab_layer_norm.weight",
        "mlm_norm/bias": "vocab_layer_norm.bias",
        "mlm_bias": "vocab_projector.bias",
    },
    tied={"vocab_projector.weight": "word_embeddings/embedding"},
    ignored_heads=(),
    buffers=("embeddings.position_ids",),
)

# RoBERTa: BERT's backbone names under "roberta.", its own MLM head (`lm_head`), and a token-type
# table of one row. Positions start at row pad_token_id + 1 (see the module docstring).
ROBERTA = Architecture(
    model_type="roberta",
    prefix="roberta.",
    mlm_class="RobertaForMaskedLM",
    base_class="RobertaModel",
    tokenizer_class="RobertaTokenizer",
    embeddings=_EMBEDDINGS,
    token_types=BERT.token_types,
    layer_prefix=BERT.layer_prefix,
    layer=BERT.layer,
    pooler=BERT.pooler,
    mlm_head={
        "mlm_transform/kernel": "lm_head.dense.weight",
        "mlm_transform/bias": "lm_head.dense.bias",
        "mlm_norm/scale": "lm_head.layer_norm.weight",
        "mlm_norm/bias": "lm_head.layer_norm.bias",
        "mlm_bias": "lm_head.bias",
    },
    tied={"lm_head.decoder.weight": "word_embeddings/embedding",
          "lm_head.decoder.bias": "mlm_bias"},
    ignored_heads=(),
    buffers=("embeddings.position_ids", "embeddings.token_type_ids"),
)

# XLM-R: RoBERTa's names exactly (its classes subclass RoBERTa's), its own classes and model_type.
XLM_ROBERTA = dataclasses.replace(
    ROBERTA, model_type="xlm-roberta", mlm_class="XLMRobertaForMaskedLM",
    base_class="XLMRobertaModel", tokenizer_class="XLMRobertaTokenizer")

ARCHITECTURES = {a.model_type: a for a in (BERT, DISTILBERT, ROBERTA, XLM_ROBERTA)}
# Families whose position table starts after fairseq's padding row (pad_token_id + 1).
OFFSET_FAMILIES = (ROBERTA, XLM_ROBERTA)


def export_architecture(model_cfg: ml_collections.ConfigDict) -> Architecture:
    """The HF family that holds a model: its `head_style` for RoBERTa and XLM-R; DISTILBERT when
    HF's DistilBERT can hold the model exactly; else BERT.

    The same fields decide `heads.task_pooling`, so a first-token classifier always exports as a
    DistilBERT *For<Task> and a pooler classifier as a BERT or RoBERTa one.

    Raises:
      ValueError: a BERT-style model whose positions start past row 0 (`position_offset`), which
        only the RoBERTa family's checkpoints express.
    """
    if model_cfg.head_style in ("roberta", "xlm-roberta"):
        return ARCHITECTURES[model_cfg.head_style]
    offset = model_lib.later_field(model_cfg, "position_offset")
    if offset:
        raise ValueError(
            f"model.position_offset is {offset}, but {model_cfg.head_style} checkpoints start "
            "positions at row 0: only head_style roberta or xlm-roberta exports an offset")
    # transformers' DistilBERT hard-codes LayerNorm eps 1e-12; BERT's config carries any.
    if (model_cfg.type_vocab_size == 0 and not model_cfg.use_pooler
            and model_cfg.head_style == "distilbert"
            and model_lib.later_field(model_cfg, "layer_norm_eps") == model_lib.LAYER_NORM_EPS):
        return DISTILBERT
    return BERT


def is_transposed(path: str) -> bool:
    """Whether our parameter at `path` ("layers_3/mlp_in/kernel") is stored transposed by HF."""
    if path.startswith("layers_"):
        path = path.split("/", 1)[1]
    return path in _TRANSPOSED


def name_map(arch: Architecture, num_layers: int, *, prefix: str, token_types: bool,
             pooler: bool, mlm_head: bool) -> dict[str, str]:
    """Our parameter path → HF key for one model layout.

    Args:
      arch: one of `ARCHITECTURES`.
      num_layers: encoder depth.
      prefix: backbone prefix of the keys ("bert.", "roberta."... or "" for a bare *Model).
      token_types, pooler, mlm_head: which optional parts the model has.

    Returns:
      A one-to-one map covering exactly the parameters of that layout.
    """
    if token_types and not arch.token_types:
        raise ValueError(f"{arch.model_type} checkpoints have no token-type embeddings")
    if pooler and not arch.pooler:
        raise ValueError(f"{arch.model_type} checkpoints have no pooler")
    names = {ours: prefix + hf for ours, hf in arch.embeddings.items()}
    if token_types:
        names.update({ours: prefix + hf for ours, hf in arch.token_types.items()})
    for i in range(num_layers):
        layer_prefix = prefix + arch.layer_prefix.format(i=i)
        names.update({f"layers_{i}/{ours}": layer_prefix + hf for ours, hf in arch.layer.items()})
    if pooler:
        names.update({ours: prefix + hf for ours, hf in arch.pooler.items()})
    if mlm_head:
        names.update(arch.mlm_head)
    expected = (len(arch.embeddings) + token_types * len(arch.token_types)
                + num_layers * len(arch.layer) + pooler * len(arch.pooler)
                + mlm_head * len(arch.mlm_head))
    assert len(names) == expected, (len(names), expected)
    assert len(set(names.values())) == len(names), "two parameters map to one HF key"
    return names


# ----------------------------------------------------------------------------------------------
# Task heads: the transformers class of each (family, head), and its modules' names.
# ----------------------------------------------------------------------------------------------

# transformers class of each (family, head); the heads' parameter names are HF's module names.
TASK_CLASSES = {
    ("roberta", "seq_cls"): "RobertaForSequenceClassification",
    ("roberta", "multiple_choice"): "RobertaForMultipleChoice",
    ("roberta", "qa"): "RobertaForQuestionAnswering",
    ("roberta", "token_cls"): "RobertaForTokenClassification",
    ("xlm-roberta", "seq_cls"): "XLMRobertaForSequenceClassification",
    ("xlm-roberta", "multiple_choice"): "XLMRobertaForMultipleChoice",
    ("xlm-roberta", "qa"): "XLMRobertaForQuestionAnswering",
    ("xlm-roberta", "token_cls"): "XLMRobertaForTokenClassification",
    ("bert", "seq_cls"): "BertForSequenceClassification",
    ("bert", "multiple_choice"): "BertForMultipleChoice",
    ("bert", "qa"): "BertForQuestionAnswering",
    ("bert", "token_cls"): "BertForTokenClassification",
    ("distilbert", "seq_cls"): "DistilBertForSequenceClassification",
    ("distilbert", "multiple_choice"): "DistilBertForMultipleChoice",
    ("distilbert", "qa"): "DistilBertForQuestionAnswering",
    ("distilbert", "token_cls"): "DistilBertForTokenClassification",
}
# Our `TaskModel`'s head modules of each (family, head), HF's names too except RoBERTa's seq_cls
# (`head_names`); the last gives the logits.
HEAD_MODULES = {
    **{(family, head): ("qa_outputs",) if head == "qa" else ("classifier",)
       for family in ("roberta", "xlm-roberta") for head in TASK_HEADS},
    ("bert", "seq_cls"): ("classifier",),
    ("bert", "multiple_choice"): ("classifier",),
    ("distilbert", "seq_cls"): ("pre_classifier", "classifier"),
    ("distilbert", "multiple_choice"): ("pre_classifier", "classifier"),
    ("bert", "qa"): ("qa_outputs",),
    ("distilbert", "qa"): ("qa_outputs",),
    ("bert", "token_cls"): ("classifier",),
    ("distilbert", "token_cls"): ("classifier",),
}


def exports_pooler(arch: Architecture, head: str) -> bool:
    """Whether the HF class of `head` in family `arch` holds a pooler in its backbone."""
    # BertForQuestionAnswering / ForTokenClassification build BertModel(add_pooling_layer=False);
    # RobertaForSequenceClassification too: its classifier.dense is our pooler (`head_names`).
    if arch in OFFSET_FAMILIES:
        return head == "multiple_choice"
    return arch is BERT and head in ("seq_cls", "multiple_choice")


def task_uses_pooler(arch: Architecture, head: str) -> bool:
    """Whether our `TaskModel` of `head` in family `arch` has an encoder pooler (pooling
    "pooler"), wherever the HF class keeps it."""
    return arch is not DISTILBERT and head in ("seq_cls", "multiple_choice")


def head_names(arch: Architecture, head: str) -> dict[str, str]:
    """Our head parameter paths → HF keys (Dense kernel ↔ Linear weight, transposed).

    RoBERTa's sequence classifier (`RobertaClassificationHead`) is dense → tanh → out_proj on the
    <s> token: exactly our BERT-style pooler (tanh(dense) of the first token) and classifier, so
    our `encoder/pooler` is its `classifier.dense` and our `classifier` its `classifier.out_proj`
    (only the training-time dropout before `dense` differs).
    """
    if arch in OFFSET_FAMILIES and head == "seq_cls":
        return {"encoder/pooler/kernel": "classifier.dense.weight",
                "encoder/pooler/bias": "classifier.dense.bias",
                "classifier/kernel": "classifier.out_proj.weight",
                "classifier/bias": "classifier.out_proj.bias"}
    names = {}
    for module in HEAD_MODULES[(arch.model_type, head)]:
        names[f"{module}/kernel"] = f"{module}.weight"
        names[f"{module}/bias"] = f"{module}.bias"
    return names


def is_transposed_task(path: str) -> bool:
    """Whether a `TaskModel` parameter path is stored transposed by HF (every Dense kernel)."""
    if path.startswith("encoder/"):
        return is_transposed(path[len("encoder/"):])
    return path.endswith("kernel")


# ----------------------------------------------------------------------------------------------
# The contract: every parameter's shape, and the check both directions run against it.
# ----------------------------------------------------------------------------------------------


def flatten(params: Mapping[str, Any]) -> dict[str, Any]:
    """Nested (possibly logically boxed) params → arrays by path ("layers_0/mlp_in/kernel")."""
    return traverse_util.flatten_dict(nn.unbox(dict(params)), sep="/")


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    return traverse_util.unflatten_dict(dict(flat), sep="/")


def expected_shapes(model_cfg: ml_collections.ConfigDict) -> dict[str, tuple[int, ...]]:
    """Shapes of every parameter of `make_encoder(model_cfg)`, by path: the tree's contract."""
    model = model_lib.make_encoder(model_cfg)

    def init(rng):
        ids = np.zeros((1, 2), np.int32)
        return model.init(rng, ids, np.ones_like(ids), ids, logits_at="all")["params"]

    abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
    return {path: tuple(a.shape) for path, a in flatten(abstract).items()}


def task_shapes(model_cfg: ml_collections.ConfigDict,
                task: heads_lib.TaskHead) -> dict[str, tuple[int, ...]]:
    """Shapes of every parameter of the `TaskModel` of `model_cfg` and `task`, by path."""
    model = heads_lib.make_task_model(model_cfg, head=task.head, num_labels=task.num_labels,
                                      pooling=heads_lib.task_pooling(model_cfg),
                                      head_dropout=task.head_dropout)
    abstract = jax.eval_shape(heads_lib.init_fn(model, length=2), jax.random.PRNGKey(0))
    return {path: tuple(a.shape) for path, a in flatten(abstract).items()}


def check_tree(values: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]], what: str,
               labels: Mapping[str, str] | None = None) -> None:
    """Raises ValueError listing missing, extra and mis-shaped entries of `values`.

    Args:
      values: arrays by our parameter path.
      shapes: the expected shape of every path.
      what: the start of the error message.
      labels: HF key of each path, named beside it in the message (import direction).
    """
    labels = labels or {}
    name = lambda k: f"{labels[k]} → {k}" if k in labels else k  # noqa: E731
    problems = []
    missing = sorted(set(shapes) - set(values))
    extra = sorted(set(values) - set(shapes))
    if missing:
        problems.append(f"missing {missing}")
    if extra:
        problems.append(f"unexpected {extra}")
    wrong = [f"{name(k)}: {tuple(np.shape(values[k]))} != expected {shapes[k]}"
             for k in sorted(set(values) & set(shapes)) if tuple(np.shape(values[k])) != shapes[k]]
    if wrong:
        problems.append(f"wrong shapes [{'; '.join(wrong)}]")
    if problems:
        raise ValueError(f"{what}: " + "; ".join(problems))
