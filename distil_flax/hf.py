"""Hugging Face interop: BERT / DistilBERT checkpoints in, `transformers`-loadable folders out.

The one place where Hugging Face names and layouts meet ours. Both directions use the same explicit
name maps below (our parameter path ↔ HF state-dict key), and every conversion asserts the key set
and each shape against `model.Encoder`'s parameter tree, so a checkpoint either converts completely
or fails with a ValueError naming the offending keys.

Read (`load_hf_checkpoint`), from a folder written by `save_pretrained`:
  BertModel (with or without the `bert.` prefix, e.g. sentence-transformers exports),
  BertForMaskedLM, BertForPreTraining (its NSP head `cls.seq_relationship.*` is ignored),
  DistilBertModel, DistilBertForMaskedLM;
  weights from `model.safetensors`, sharded safetensors (`model.safetensors.index.json`), or
  (only when torch is installed, and only through `torch.load(weights_only=True)`) a legacy
  `pytorch_model.bin`. Nothing from the folder is ever executed (no `auto_map` / remote code).

Write (`export_hf`): `DistilBertForMaskedLM` for a DistilBERT-shaped model (no token types, no
pooler, head_style "distilbert"), else `BertForMaskedLM`; or the bare `*Model` with head="none".
Weights go through `safetensors.numpy`, so exporting needs no torch.

Fine-tuned models (`heads.TaskModel`: the encoder under "encoder" plus a head named as HF names
it) go both ways through `export_task_hf` and `load_hf_task_checkpoint`: Bert/DistilBert
ForSequenceClassification, ForQuestionAnswering, ForTokenClassification and ForMultipleChoice
(`TASK_CLASSES`), with id2label, problem_type and the head's dropout in config.json.

Layout: torch `Linear` weights are [out, in], Flax `Dense` kernels [in, out]: exactly the entries
of `_TRANSPOSED` are transposed. The MLM decoder is tied to the word embeddings on both sides.
"""

import dataclasses
import json
import os
import shutil
import uuid
from typing import Any, Callable, Mapping

import jax
import ml_collections
import numpy as np
import safetensors
import safetensors.numpy
from absl import logging
from flax import linen as nn
from flax import traverse_util
from safetensors import safe_open

from distil_flax.downstream import heads as heads_lib
from distil_flax import model as model_lib
from distil_flax.data import tokenizer as tokenizer_lib

# Weight files `save_pretrained` writes, in the order we look for them.
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
TORCH_BIN_INDEX = "pytorch_model.bin.index.json"
WEIGHT_FILES = (SAFETENSORS, SAFETENSORS_INDEX, TORCH_BIN, TORCH_BIN_INDEX)

# Task heads (`heads.TaskModel`), exported by `export_task_hf`, not by the MLM/encoder export.
TASK_HEADS = ("seq_cls", "qa", "token_cls", "multiple_choice")
EXPORT_HEADS = ("mlm", "none")

# Our Encoder hard-codes BERT's LayerNorm epsilon; a checkpoint trained with another would drift.
_EPS_TOLERANCE = 1e-15


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
class _Architecture:
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

BERT = _Architecture(
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

DISTILBERT = _Architecture(
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

ARCHITECTURES = {a.model_type: a for a in (BERT, DISTILBERT)}


def is_transposed(path: str) -> bool:
    """Whether our parameter at `path` ("layers_3/mlp_in/kernel") is stored transposed by HF."""
    if path.startswith("layers_"):
        path = path.split("/", 1)[1]
    return path in _TRANSPOSED


def name_map(arch: _Architecture, num_layers: int, *, prefix: str, token_types: bool,
             pooler: bool, mlm_head: bool) -> dict[str, str]:
    """Our parameter path → HF key for one model layout.

    Args:
      arch: BERT or DISTILBERT.
      num_layers: encoder depth.
      prefix: backbone prefix of the keys ("bert.", "distilbert." or "" for a bare *Model).
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


def expected_shapes(model_cfg: ml_collections.ConfigDict) -> dict[str, tuple[int, ...]]:
    """Shapes of every parameter of `make_encoder(model_cfg)`, by path: the tree's contract."""
    model = model_lib.make_encoder(model_cfg)

    def init(rng):
        ids = np.zeros((1, 2), np.int32)
        return model.init(rng, ids, np.ones_like(ids), ids, logits_at="all")["params"]

    abstract = nn.unbox(jax.eval_shape(init, jax.random.PRNGKey(0)))
    return {path: tuple(a.shape) for path, a in _flatten(abstract).items()}


def _flatten(params: Mapping[str, Any]) -> dict[str, Any]:
    return traverse_util.flatten_dict(nn.unbox(dict(params)), sep="/")


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    return traverse_util.unflatten_dict(dict(flat), sep="/")


def _check_tree(values: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]], what: str,
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


# ----------------------------------------------------------------------------------------------
# Reading a checkpoint folder.
# ----------------------------------------------------------------------------------------------


def is_hf_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` is a HF model folder: a config.json with a model_type, and weights."""
    path = os.fspath(path)
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        return False
    try:
        with open(config_file) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return False
    return (isinstance(config, dict) and "model_type" in config
            and any(os.path.isfile(os.path.join(path, w)) for w in WEIGHT_FILES))


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def _model_config(hf: Mapping[str, Any], config_file: str) -> ml_collections.ConfigDict:
    """Our model config section from a HF config.json; ValueError if our Encoder differs."""
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"{config_file}: model_type {model_type!r} is not supported; distil_flax reads "
            f"{sorted(ARCHITECTURES)} checkpoints (post-LayerNorm BERT encoders)")
    if model_type == "bert":
        act, eps = hf.get("hidden_act", "gelu"), hf.get("layer_norm_eps", 1e-12)
        sizes = dict(num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"],
                     num_heads=hf["num_attention_heads"], intermediate_size=hf["intermediate_size"],
                     type_vocab_size=hf.get("type_vocab_size", 2),
                     dropout_rate=hf.get("hidden_dropout_prob", 0.1))
        position_type = hf.get("position_embedding_type", "absolute")
        if position_type not in (None, "absolute"):
            raise ValueError(f"{config_file}: position_embedding_type {position_type!r}; only "
                             "learned absolute positions are supported")
        if hf.get("is_decoder") or hf.get("add_cross_attention"):
            raise ValueError(f"{config_file}: a decoder / cross-attention BERT is not an encoder "
                             "distil_flax can run")
    else:
        # DistilBERT hard-codes LayerNorm eps 1e-12 in transformers.
        act, eps = hf.get("activation", "gelu"), 1e-12
        sizes = dict(num_layers=hf["n_layers"], hidden_size=hf["dim"], num_heads=hf["n_heads"],
                     intermediate_size=hf["hidden_dim"], type_vocab_size=0,
                     dropout_rate=hf.get("dropout", 0.1))
    if act != "gelu":
        raise ValueError(f"{config_file}: activation {act!r}; our Encoder computes exact (erf) "
                         "GELU, which transformers calls 'gelu' (gelu_new / tanh variants differ)")
    if abs(eps - model_lib.LAYER_NORM_EPS) > _EPS_TOLERANCE:
        raise ValueError(f"{config_file}: layer_norm_eps {eps}; our Encoder uses BERT's "
                         f"{model_lib.LAYER_NORM_EPS}")
    c = model_lib.model_config("base")
    c.vocab_size = int(hf["vocab_size"])
    c.max_position_embeddings = int(hf.get("max_position_embeddings", 512))
    # Attention dropout stays at our default (0): flash attention kernels have none, see model.py.
    for key, value in sizes.items():
        setattr(c, key, type(getattr(c, key))(value))
    c.use_pooler = False  # Set from the weights: a BertForMaskedLM has no pooler.
    c.head_style = model_type
    return c


def _weight_index(path: str) -> dict[str, str]:
    """HF key → the file holding it, for the folder's weights (safetensors preferred)."""
    for single, index in ((SAFETENSORS, SAFETENSORS_INDEX), (TORCH_BIN, TORCH_BIN_INDEX)):
        if os.path.isfile(os.path.join(path, single)):
            return _keys_of_file(os.path.join(path, single))
        if os.path.isfile(os.path.join(path, index)):
            weight_map = _read_json(os.path.join(path, index)).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{os.path.join(path, index)} has no weight_map")
            files = {name: os.path.join(path, shard) for name, shard in weight_map.items()}
            absent = sorted({f for f in files.values() if not os.path.isfile(f)})
            if absent:
                raise ValueError(f"{index} names missing shard file(s) {absent}")
            return files
    raise ValueError(f"{path} has no weights: expected one of {list(WEIGHT_FILES)}")


def _keys_of_file(file: str) -> dict[str, str]:
    if file.endswith(".safetensors"):
        return {key: file for key in _open_safetensors(file, lambda f: list(f.keys()))}
    return {key: file for key in _torch_load(file)}


def _open_safetensors(file: str, fn: Callable[[Any], Any]) -> Any:
    """Runs `fn` on an open safetensors file; ValueError naming the file if it is damaged."""
    try:
        # The flax framework reads bfloat16 too (numpy has no bf16); tensors land on the CPU.
        with jax.default_device(jax.devices("cpu")[0]), safe_open(file, framework="flax") as f:
            return fn(f)
    except safetensors.SafetensorError as e:
        raise ValueError(f"{file} is not a readable safetensors file (truncated or corrupt?): "
                         f"{e}") from e


def _torch_load(file: str) -> dict[str, Any]:
    """A legacy pickle checkpoint, read with torch's safe unpickler (tensors only, no code)."""
    try:
        import torch  # Optional: only legacy pickles need it.
    except ImportError as e:
        raise ValueError(f"{file} is a PyTorch pickle; reading it needs torch (pip install torch), "
                         f"or re-save the checkpoint as model.safetensors") from e
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 — torch raises many types for a bad pickle.
        raise ValueError(f"{file} could not be read with torch.load(weights_only=True): {e}") from e
    if not isinstance(state, dict):
        raise ValueError(f"{file} does not hold a state dict")
    return state


def _read_tensors(files: Mapping[str, str], keys: list[str]) -> dict[str, np.ndarray]:
    """Reads `keys` (only those) as float32 numpy arrays, opening each file once."""
    by_file: dict[str, list[str]] = {}
    for key in keys:
        by_file.setdefault(files[key], []).append(key)
    out = {}
    for file, file_keys in by_file.items():
        if file.endswith(".safetensors"):
            out.update(_open_safetensors(file, lambda f, ks=file_keys: {
                k: np.asarray(f.get_tensor(k), np.float32) for k in ks}))
        else:
            state = _torch_load(file)
            out.update({k: state[k].float().numpy() for k in file_keys})
    return out


def _backbone_prefix(arch: _Architecture, keys: set[str], source: str) -> str:
    """"bert." / "distilbert." for models with heads, "" for a bare *Model export."""
    word = "embeddings.word_embeddings.weight"
    if arch.prefix + word in keys:
        return arch.prefix
    if word in keys:
        return ""
    raise ValueError(f"{source}: no word embeddings under {arch.prefix + word!r} or {word!r}; "
                     f"is this a {arch.model_type} checkpoint?")


def _fresh_mlm_head(hidden: int, vocab: int, seed: int) -> dict[str, np.ndarray]:
    """An MLM head initialised as `model.Encoder` initialises one (normal(0.02) kernel, zeros)."""
    rng = np.random.default_rng(seed)
    return {
        "mlm_transform/kernel": rng.normal(0, model_lib.INIT_STD, (hidden, hidden)).astype(
            np.float32),
        "mlm_transform/bias": np.zeros(hidden, np.float32),
        "mlm_norm/scale": np.ones(hidden, np.float32),
        "mlm_norm/bias": np.zeros(hidden, np.float32),
        "mlm_bias": np.zeros(vocab, np.float32),
    }


def load_hf_checkpoint(path: str | os.PathLike, *, seed: int = 0
                       ) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
    """Reads a HF BERT / DistilBERT folder into our config and parameter tree.

    The architecture comes from config.json (model_type bert | distilbert, exact GELU, LayerNorm
    eps 1e-12); the pooler is kept when the checkpoint has one. A checkpoint without an MLM head
    (BertModel, DistilBertModel, sentence-transformers exports) gets a freshly initialised head —
    a teacher or student needs one, and distilling or MLM training then learns it — and says so in
    the log. The returned config keeps our defaults for dtype ("bfloat16" compute) and attention.

    Args:
      path: a folder written by `save_pretrained` (config.json + weights).
      seed: seeds the fresh MLM head when the checkpoint has none.

    Returns:
      (model_cfg, params): a model config section for `make_encoder`, and the parameter tree
      (nested dicts of float32 numpy arrays) in the exact structure of `Encoder`'s params.

    Raises:
      FileNotFoundError: no config.json in `path`.
      ValueError: unsupported architecture, damaged weights, missing or mis-shaped keys (listed),
        or an untied MLM decoder.
    """
    path = os.fspath(path)
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{path} is not a Hugging Face model folder: no config.json")
    model_cfg = _model_config(_read_json(config_file), config_file)
    arch = ARCHITECTURES[model_cfg.head_style]
    files = _weight_index(path)
    names, has_head = _checkpoint_layout(arch, model_cfg, set(files), path)

    tensors = _read_tensors(files, list(names.values()))
    flat = {ours: tensors[hf].T if is_transposed(ours) else tensors[hf]
            for ours, hf in names.items()}
    if not has_head:
        logging.info("%s has no MLM head (%s): initialising a fresh one (seed %d).", path,
                     arch.base_class, seed)
        flat.update(_fresh_mlm_head(model_cfg.hidden_size, model_cfg.vocab_size, seed))
    _check_tree(flat, expected_shapes(model_cfg), f"{path} does not match its config.json",
                labels=names)
    if has_head:
        _check_tied(arch, files, flat, names, path)
    flat = {k: np.ascontiguousarray(v, np.float32) for k, v in flat.items()}
    logging.info("Read %s (%s, %d layers × %d, vocab %d, pooler %s) from %s.",
                 arch.mlm_class if has_head else arch.base_class, arch.model_type,
                 model_cfg.num_layers, model_cfg.hidden_size, model_cfg.vocab_size,
                 model_cfg.use_pooler, path)
    return model_cfg, _unflatten(flat)


def has_mlm_head(path: str | os.PathLike) -> bool:
    """Whether a HF checkpoint folder carries a trained MLM head (a *ForMaskedLM export)."""
    path = os.fspath(path)
    config_file = os.path.join(path, "config.json")
    model_cfg = _model_config(_read_json(config_file), config_file)
    arch = ARCHITECTURES[model_cfg.head_style]
    _, has_head = _checkpoint_layout(arch, model_cfg, set(_weight_index(path)), path)
    return has_head


def _checkpoint_layout(arch: _Architecture, model_cfg: ml_collections.ConfigDict,
                       keys: set[str], source: str) -> tuple[dict[str, str], bool]:
    """Which layout the checkpoint's keys have; sets `model_cfg.use_pooler` from them.

    Returns:
      (name map of every parameter to read, whether the checkpoint has an MLM head).

    Raises:
      ValueError: a key of that layout is missing (all such keys listed).
    """
    prefix = _backbone_prefix(arch, keys, source)
    model_cfg.use_pooler = bool(arch.pooler) and any(prefix + k in keys
                                                     for k in arch.pooler.values())
    has_head = any(k in keys for k in arch.mlm_head.values())
    names = name_map(arch, model_cfg.num_layers, prefix=prefix,
                     token_types=model_cfg.type_vocab_size > 0, pooler=model_cfg.use_pooler,
                     mlm_head=has_head)
    missing = sorted(k for k in names.values() if k not in keys)
    if missing:
        raise ValueError(f"{source}: {arch.mlm_class if has_head else arch.base_class} checkpoint "
                         f"lacks key(s) {missing}")
    _report_unused(arch, keys - set(names.values()), prefix, source)
    return names, has_head


def _report_unused(arch: _Architecture, unused: set[str], prefix: str, source: str) -> None:
    """Logs keys we do not read: expected ones (NSP head, buffers, tied decoder) at INFO, anything
    else as a WARNING listing them, so nothing is ever dropped silently."""
    expected = set(arch.ignored_heads) | set(arch.tied) | {prefix + b for b in arch.buffers}
    ignored = sorted(unused & expected)
    unknown = sorted(unused - expected)
    if ignored:
        logging.info("%s: ignoring %s (no counterpart in our model, or tied).", source, ignored)
    if unknown:
        logging.warning("%s: unexpected key(s) not used by distil_flax: %s", source, unknown)


def _check_tied(arch: _Architecture, files: Mapping[str, str], flat: Mapping[str, np.ndarray],
                names: Mapping[str, str], source: str) -> None:
    """Stored decoder weights must equal what they are tied to: our decoder is always tied."""
    present = [k for k in arch.tied if k in files]
    stored = _read_tensors(files, present)
    for key in present:
        if not np.array_equal(stored[key], flat[arch.tied[key]]):
            raise ValueError(f"{source}: {key} differs from {names[arch.tied[key]]}, which it is "
                             "tied to in our Encoder; an untied MLM decoder cannot be represented")


# ----------------------------------------------------------------------------------------------
# Writing a transformers folder.
# ----------------------------------------------------------------------------------------------


def export_architecture(model_cfg: ml_collections.ConfigDict) -> _Architecture:
    """DISTILBERT when HF's DistilBERT can hold the model exactly, else BERT."""
    if (model_cfg.type_vocab_size == 0 and not model_cfg.use_pooler
            and model_cfg.head_style == "distilbert"):
        return DISTILBERT
    return BERT


def hf_config(model_cfg: ml_collections.ConfigDict, *, head: str = "mlm",
              pad_token_id: int = 0) -> dict[str, Any]:
    """The transformers config.json for an export of a model with config `model_cfg`."""
    _check_head(head)
    arch = export_architecture(model_cfg)
    common = {
        "architectures": [arch.mlm_class if head == "mlm" else arch.base_class],
        "model_type": arch.model_type,
        "vocab_size": int(model_cfg.vocab_size),
        "max_position_embeddings": int(model_cfg.max_position_embeddings),
        "pad_token_id": int(pad_token_id),
        "initializer_range": model_lib.INIT_STD,
        "tie_word_embeddings": True,
    }
    if arch is DISTILBERT:
        return common | {
            "dim": int(model_cfg.hidden_size), "n_layers": int(model_cfg.num_layers),
            "n_heads": int(model_cfg.num_heads), "hidden_dim": int(model_cfg.intermediate_size),
            "activation": "gelu", "dropout": float(model_cfg.dropout_rate),
            "attention_dropout": float(model_cfg.attention_dropout_rate),
            "sinusoidal_pos_embds": False,
        }
    return common | {
        "hidden_size": int(model_cfg.hidden_size), "num_hidden_layers": int(model_cfg.num_layers),
        "num_attention_heads": int(model_cfg.num_heads),
        "intermediate_size": int(model_cfg.intermediate_size), "hidden_act": "gelu",
        "hidden_dropout_prob": float(model_cfg.dropout_rate),
        "attention_probs_dropout_prob": float(model_cfg.attention_dropout_rate),
        # HF's BERT always has token-type embeddings; a model without them exports one zero row.
        "type_vocab_size": max(int(model_cfg.type_vocab_size), 1),
        "layer_norm_eps": model_lib.LAYER_NORM_EPS, "position_embedding_type": "absolute",
    }


def hf_state_dict(params: Mapping[str, Any], model_cfg: ml_collections.ConfigDict, *,
                  head: str = "mlm") -> dict[str, np.ndarray]:
    """Our parameters → the float32 HF state dict of the export (tied decoder weights omitted).

    Args:
      params: `Encoder` params (nested dicts; jax or numpy arrays, boxed or not).
      model_cfg: their model config section.
      head: "mlm" (a *ForMaskedLM) or "none" (the bare *Model).

    Raises:
      ValueError: `params` do not match `model_cfg` (keys and shapes listed), or a bad head.
    """
    _check_head(head)
    flat = _float32_flat(params)
    _check_tree(flat, expected_shapes(model_cfg), "params do not match the model config")
    arch = export_architecture(model_cfg)
    pooler = bool(model_cfg.use_pooler)
    if pooler and head == "mlm":
        # BertForMaskedLM has no pooler; it would report the keys as unexpected.
        logging.info("BertForMaskedLM has no pooler: the pooler is not exported (head='none' "
                     "exports it with BertModel).")
        pooler = False
    if arch is BERT and head == "none" and not pooler:
        logging.warning("BertModel always has a pooler: transformers will initialise a fresh "
                        "one for this pooler-less model (pooler.dense.* reported missing).")
    return _backbone_state(flat, model_cfg, prefix=arch.prefix if head == "mlm" else "",
                           pooler=pooler, mlm_head=head == "mlm")


def _float32_flat(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {k: np.asarray(jax.device_get(v), np.float32) for k, v in _flatten(params).items()}


def _backbone_state(flat: Mapping[str, np.ndarray], model_cfg: ml_collections.ConfigDict, *,
                    prefix: str, pooler: bool, mlm_head: bool) -> dict[str, np.ndarray]:
    """Encoder parameters by our path → HF state dict entries under `prefix`."""
    arch = export_architecture(model_cfg)
    flat = dict(flat)
    if arch is BERT and not model_cfg.type_vocab_size > 0:
        # HF's BERT always adds a token-type embedding: one zero row adds nothing.
        flat["token_type_embeddings/embedding"] = np.zeros((1, model_cfg.hidden_size), np.float32)
        logging.info("No token-type embeddings: exporting one zero row (type_vocab_size=1).")
    names = name_map(arch, model_cfg.num_layers, prefix=prefix, token_types=arch is BERT,
                     pooler=pooler, mlm_head=mlm_head)
    return {hf: np.ascontiguousarray(flat[ours].T if is_transposed(ours) else flat[ours])
            for ours, hf in names.items()}


def _check_head(head: str) -> None:
    if head in TASK_HEADS:
        raise ValueError(f"head={head!r}: task heads come with the fine-tuning module "
                         "(export_task_hf, or export_hf's CLI on a fine-tuning run); export_hf "
                         "writes head='mlm' or head='none'")
    if head not in EXPORT_HEADS:
        raise ValueError(f"head must be one of {EXPORT_HEADS}, got {head!r}")


def export_hf(params: Mapping[str, Any], model_cfg: ml_collections.ConfigDict,
              output_dir: str | os.PathLike, *, tokenizer_path: str | None = None,
              lowercase: bool = True, head: str = "mlm", overwrite: bool = False) -> list[str]:
    """Writes a folder that `transformers.AutoModelForMaskedLM` / `AutoModel` and `AutoTokenizer`
    load offline, with no missing or unexpected keys.

    Everything is written into a temporary folder beside `output_dir` and renamed at the end, so a
    failure leaves nothing behind.

    Args:
      params: `Encoder` parameters (jax or numpy arrays).
      model_cfg: their model config section.
      output_dir: the folder to create.
      tokenizer_path: the run's `data.tokenizer` (vocab.txt, tokenizer.json or SentencePiece
        .model); None writes no tokenizer files.
      lowercase: for vocab.txt: uncased normalisation (the run's `data.lowercase`).
      head: "mlm" (DistilBertForMaskedLM / BertForMaskedLM) or "none" (the bare *Model).
      overwrite: replace an existing non-empty `output_dir`.

    Returns:
      Names of the files written, sorted.

    Raises:
      ValueError: a task head, or params that do not match `model_cfg`.
      FileExistsError: `output_dir` exists, is not empty, and `overwrite` is False.
    """
    _check_head(head)
    output_dir = _check_output_dir(output_dir, overwrite)
    # Everything that can fail on bad inputs happens before anything is written.
    tokenizer = (tokenizer_lib.load_tokenizer(tokenizer_path, lowercase=lowercase)
                 if tokenizer_path else None)
    state = hf_state_dict(params, model_cfg, head=head)
    config = hf_config(model_cfg, head=head, pad_token_id=tokenizer.pad_id if tokenizer else 0)
    return _write_export(output_dir, config, state, tokenizer, model_cfg, lowercase=lowercase)


def _check_output_dir(output_dir: str | os.PathLike, overwrite: bool) -> str:
    output_dir = os.path.abspath(os.fspath(output_dir))
    if os.path.exists(output_dir) and not overwrite and (
            not os.path.isdir(output_dir) or os.listdir(output_dir)):
        raise FileExistsError(f"{output_dir} exists and is not empty (pass overwrite=True)")
    return output_dir


def _write_export(output_dir: str, config: Mapping[str, Any], state: Mapping[str, np.ndarray],
                  tokenizer: tokenizer_lib.Tokenizer | None,
                  model_cfg: ml_collections.ConfigDict, *, lowercase: bool) -> list[str]:
    """Writes config, weights and tokenizer into a temporary folder, then renames it into place."""
    arch = export_architecture(model_cfg)
    parent = os.path.dirname(output_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = _sibling(output_dir, "tmp")
    os.mkdir(tmp)  # Not mkdtemp: its 0o700 would survive the rename; mkdir honours the umask.
    try:
        _write_model(tmp, config, state)
        if tokenizer:
            _write_tokenizer(tmp, tokenizer, arch, lowercase=lowercase,
                             max_length=int(model_cfg.max_position_embeddings))
        written = sorted(os.listdir(tmp))
        _replace_dir(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logging.info("Exported %s to %s: %s.", config["architectures"][0], output_dir, written)
    return written


def _sibling(path: str, kind: str) -> str:
    """A fresh hidden name beside `path`, on the same filesystem, so renames are atomic."""
    return os.path.join(os.path.dirname(path),
                        f".{os.path.basename(path)}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _replace_dir(src: str, dst: str) -> None:
    """Renames `src` to `dst`, moving an existing `dst` aside first and deleting it after."""
    old = None
    if os.path.lexists(dst):
        old = _sibling(dst, "old")
        os.rename(dst, old)
    os.rename(src, dst)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def _write_model(directory: str, config: Mapping[str, Any],
                 state: Mapping[str, np.ndarray]) -> None:
    _write_json(os.path.join(directory, "config.json"), config)
    # "format": "pt" tells transformers the tensors are in torch's layout. Serialised in memory and
    # written with open(): `save_file` leaves the file 0600 whatever the umask.
    with open(os.path.join(directory, SAFETENSORS), "wb") as f:
        f.write(safetensors.numpy.save(dict(state), metadata={"format": "pt"}))


def _write_json(path: str, value: Any) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True)
        f.write("\n")


def _write_tokenizer(directory: str, tokenizer: tokenizer_lib.Tokenizer, arch: _Architecture, *, lowercase: bool,
                     max_length: int) -> None:
    """Copies the run's vocabulary and writes the tokenizer_config AutoTokenizer needs.

    vocab.txt → (Distil)BertTokenizer with `do_lower_case`; tokenizer.json → copied as is (its
    normaliser and post-processor already say everything); SentencePiece .model → spiece.model
    with AlbertTokenizer, whose special-token layout (<pad>, <unk>, [CLS], [SEP], [MASK]) is ours.
    """
    special = {
        "pad_token": tokenizer.id_to_token(tokenizer.pad_id),
        "unk_token": tokenizer.id_to_token(tokenizer.unk_id),
        "cls_token": tokenizer.id_to_token(tokenizer.cls_id),
        "sep_token": tokenizer.id_to_token(tokenizer.sep_id),
        "mask_token": tokenizer.id_to_token(tokenizer.mask_id),
    }
    source = tokenizer.path
    tokenizer_config: dict[str, Any] = {"model_max_length": max_length, **special}
    if source.endswith(".txt"):
        shutil.copyfile(source, os.path.join(directory, "vocab.txt"))
        tokenizer_config |= {"tokenizer_class": arch.tokenizer_class,
                             "do_lower_case": bool(lowercase), "strip_accents": None,
                             "tokenize_chinese_chars": True, "do_basic_tokenize": True}
    elif source.endswith(".json"):
        shutil.copyfile(source, os.path.join(directory, "tokenizer.json"))
        tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    else:
        shutil.copyfile(source, os.path.join(directory, "spiece.model"))
        # Case folding and NFKC live in the model's own normaliser; don't add ALBERT's on top.
        tokenizer_config |= {"tokenizer_class": "AlbertTokenizer", "do_lower_case": False,
                             "keep_accents": True, "remove_space": True}
    if arch is DISTILBERT:
        # DistilBERT's forward takes no token_type_ids; the tokenizer must not produce them.
        tokenizer_config["model_input_names"] = ["input_ids", "attention_mask"]
    _write_json(os.path.join(directory, "tokenizer_config.json"), tokenizer_config)
    _write_json(os.path.join(directory, "special_tokens_map.json"), special)


# ----------------------------------------------------------------------------------------------
# Task heads: fine-tuned models out (`export_task_hf`) and in (`load_hf_task_checkpoint`).
# ----------------------------------------------------------------------------------------------

# transformers class of each (family, head); the heads' parameter names are HF's module names.
TASK_CLASSES = {
    ("bert", "seq_cls"): "BertForSequenceClassification",
    ("bert", "multiple_choice"): "BertForMultipleChoice",
    ("bert", "qa"): "BertForQuestionAnswering",
    ("bert", "token_cls"): "BertForTokenClassification",
    ("distilbert", "seq_cls"): "DistilBertForSequenceClassification",
    ("distilbert", "multiple_choice"): "DistilBertForMultipleChoice",
    ("distilbert", "qa"): "DistilBertForQuestionAnswering",
    ("distilbert", "token_cls"): "DistilBertForTokenClassification",
}
_HEAD_MODULES = {
    ("bert", "seq_cls"): ("classifier",),
    ("bert", "multiple_choice"): ("classifier",),
    ("distilbert", "seq_cls"): ("pre_classifier", "classifier"),
    ("distilbert", "multiple_choice"): ("pre_classifier", "classifier"),
    ("bert", "qa"): ("qa_outputs",),
    ("distilbert", "qa"): ("qa_outputs",),
    ("bert", "token_cls"): ("classifier",),
    ("distilbert", "token_cls"): ("classifier",),
}


@dataclasses.dataclass(frozen=True)
class TaskHead:
    """What a fine-tuned model's head is, beside its weights.

    Attributes:
      head: a kind in `heads.HEADS`.
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


def task_pooling(model_cfg: ml_collections.ConfigDict) -> str:
    """How a seq_cls / multiple_choice head pools: as the HF family the model exports to does."""
    return "first_token" if export_architecture(model_cfg) is DISTILBERT else "pooler"


def _exports_pooler(arch: _Architecture, head: str) -> bool:
    # BertForQuestionAnswering / ForTokenClassification build BertModel(add_pooling_layer=False).
    return arch is BERT and head in ("seq_cls", "multiple_choice")


def _task_shapes(model_cfg: ml_collections.ConfigDict, task: TaskHead) -> dict[str, tuple]:
    model = heads_lib.make_task_model(model_cfg, head=task.head, num_labels=task.num_labels,
                                      pooling=task_pooling(model_cfg),
                                      head_dropout=task.head_dropout)
    abstract = nn.unbox(jax.eval_shape(heads_lib.init_fn(model, length=2),
                                       jax.random.PRNGKey(0)))
    return {path: tuple(a.shape) for path, a in _flatten(abstract).items()}


def _head_names(arch: _Architecture, head: str) -> dict[str, str]:
    """Our head parameter paths → HF keys (Dense kernel ↔ Linear weight, transposed)."""
    names = {}
    for module in _HEAD_MODULES[(arch.model_type, head)]:
        names[f"{module}/kernel"] = f"{module}.weight"
        names[f"{module}/bias"] = f"{module}.bias"
    return names


def hf_task_config(model_cfg: ml_collections.ConfigDict, task: TaskHead, *,
                   pad_token_id: int = 0) -> dict[str, Any]:
    """The transformers config.json of a fine-tuned model's export."""
    arch = export_architecture(model_cfg)
    config = hf_config(model_cfg, head="none", pad_token_id=pad_token_id)
    config["architectures"] = [TASK_CLASSES[(arch.model_type, task.head)]]
    names = task.label_names or tuple(f"LABEL_{i}" for i in range(task.num_labels))
    if len(names) != task.num_labels:
        raise ValueError(f"{len(names)} label names for {task.num_labels} labels")
    config["id2label"] = {str(i): name for i, name in enumerate(names)}
    config["label2id"] = {name: i for i, name in enumerate(names)}
    if task.head == "seq_cls":
        config["problem_type"] = ("regression" if task.regression
                                  else "single_label_classification")
    if arch is DISTILBERT:
        if task.head in ("seq_cls", "multiple_choice"):
            config["seq_classif_dropout"] = float(task.head_dropout)
        elif task.head == "qa":
            config["qa_dropout"] = float(task.head_dropout)
    elif task.head != "qa":
        config["classifier_dropout"] = float(task.head_dropout)
    return config


def hf_task_state_dict(params: Mapping[str, Any], model_cfg: ml_collections.ConfigDict,
                       task: TaskHead) -> dict[str, np.ndarray]:
    """`heads.TaskModel` parameters → the float32 state dict of the HF *For<Task> model.

    Raises:
      ValueError: `params` do not match `model_cfg` and `task` (keys and shapes listed).
    """
    if task.head not in TASK_HEADS:
        raise ValueError(f"head must be one of {TASK_HEADS}, got {task.head!r}")
    flat = _float32_flat(params)
    _check_tree(flat, _task_shapes(model_cfg, task),
                f"params do not match the model config and a {task.head} head")
    arch = export_architecture(model_cfg)
    pooler = _exports_pooler(arch, task.head)
    if model_cfg.use_pooler and not pooler:
        logging.info("%s has no pooler: the pooler is not exported.",
                     TASK_CLASSES[(arch.model_type, task.head)])
    encoder = {k[len("encoder/"):]: v for k, v in flat.items() if k.startswith("encoder/")}
    state = _backbone_state(encoder, model_cfg, prefix=arch.prefix, pooler=pooler,
                            mlm_head=False)
    for ours, hf in _head_names(arch, task.head).items():
        state[hf] = np.ascontiguousarray(flat[ours].T if is_transposed_task(ours) else flat[ours])
    return state


def export_task_hf(params: Mapping[str, Any], model_cfg: ml_collections.ConfigDict,
                   task: TaskHead, output_dir: str | os.PathLike, *,
                   tokenizer_path: str | None = None, lowercase: bool = True,
                   overwrite: bool = False) -> list[str]:
    """Writes a fine-tuned model as its transformers class (e.g.
    `DistilBertForSequenceClassification`), loadable with no missing or unexpected keys, with
    id2label and the head's dropout in config.json. Atomic, as `export_hf`.

    Args:
      params: `heads.TaskModel` parameters ({"encoder": ..., head modules}).
      model_cfg: the encoder's model config section (`use_pooler` as trained).
      task: the head.
      output_dir, tokenizer_path, lowercase, overwrite: as `export_hf`.

    Returns:
      Names of the files written, sorted.
    """
    output_dir = _check_output_dir(output_dir, overwrite)
    tokenizer = (tokenizer_lib.load_tokenizer(tokenizer_path, lowercase=lowercase)
                 if tokenizer_path else None)
    state = hf_task_state_dict(params, model_cfg, task)
    config = hf_task_config(model_cfg, task, pad_token_id=tokenizer.pad_id if tokenizer else 0)
    return _write_export(output_dir, config, state, tokenizer, model_cfg, lowercase=lowercase)


def load_hf_task_checkpoint(path: str | os.PathLike
                            ) -> tuple[ml_collections.ConfigDict, TaskHead, dict[str, Any]]:
    """Reads a fine-tuned HF folder (one of `TASK_CLASSES`, named in config.json's
    `architectures`) into our model config, its head, and `heads.TaskModel` parameters.

    Raises:
      FileNotFoundError: no config.json.
      ValueError: not a supported task class, or missing/mis-shaped keys (listed).
    """
    path = os.fspath(path)
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{path} is not a Hugging Face model folder: no config.json")
    hf = _read_json(config_file)
    model_cfg = _model_config(hf, config_file)
    arch = ARCHITECTURES[model_cfg.head_style]
    by_class = {cls: head for (family, head), cls in TASK_CLASSES.items()
                if family == arch.model_type}
    classes = hf.get("architectures") or []
    if not classes or classes[0] not in by_class:
        raise ValueError(f"{config_file}: architectures {classes} is not a fine-tuned "
                         f"{arch.model_type} model distil_flax reads ({sorted(by_class)})")
    head = by_class[classes[0]]
    files = _weight_index(path)
    keys = set(files)
    prefix = _backbone_prefix(arch, keys, path)
    model_cfg.use_pooler = _exports_pooler(arch, head)
    names = {f"encoder/{ours}": key for ours, key in name_map(
        arch, model_cfg.num_layers, prefix=prefix, token_types=model_cfg.type_vocab_size > 0,
        pooler=model_cfg.use_pooler, mlm_head=False).items()}
    names.update(_head_names(arch, head))
    missing = sorted(k for k in names.values() if k not in keys)
    if missing:
        raise ValueError(f"{path}: {classes[0]} checkpoint lacks key(s) {missing}")
    _report_unused(arch, keys - set(names.values()), prefix, path)
    tensors = _read_tensors(files, list(names.values()))
    flat = {ours: tensors[key].T if is_transposed_task(ours) else tensors[key]
            for ours, key in names.items()}
    head_module = _HEAD_MODULES[(arch.model_type, head)][-1]
    num_labels = {"multiple_choice": 1, "qa": 2}.get(
        head, int(np.shape(flat[f"{head_module}/bias"])[0]))
    id2label = hf.get("id2label") or {}
    label_names = tuple(id2label[str(i)] for i in range(num_labels)) if (
        head in ("seq_cls", "token_cls") and len(id2label) == num_labels) else ()
    if arch is DISTILBERT:
        dropout = hf.get("qa_dropout", 0.1) if head == "qa" else (
            hf.get("seq_classif_dropout", 0.2) if head != "token_cls" else model_cfg.dropout_rate)
    else:
        dropout = 0.0 if head == "qa" else (hf.get("classifier_dropout")
                                            if hf.get("classifier_dropout") is not None
                                            else model_cfg.dropout_rate)
    task = TaskHead(head, num_labels, label_names,
                    regression=head == "seq_cls" and (hf.get("problem_type") == "regression"
                                                      or num_labels == 1),
                    head_dropout=float(dropout))
    _check_tree(flat, _task_shapes(model_cfg, task), f"{path} does not match its config.json",
                labels=names)
    flat = {k: np.ascontiguousarray(v, np.float32) for k, v in flat.items()}
    logging.info("Read %s (%d layers × %d, %d label(s)) from %s.", classes[0],
                 model_cfg.num_layers, model_cfg.hidden_size, num_labels, path)
    return model_cfg, task, _unflatten(flat)


def is_transposed_task(path: str) -> bool:
    """Whether a `TaskModel` parameter path is stored transposed by HF (every Dense kernel)."""
    if path.startswith("encoder/"):
        return is_transposed(path[len("encoder/"):])
    return path.endswith("kernel")
