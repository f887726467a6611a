"""Reading Hugging Face folders: BERT-family checkpoints in, our config and params out.

`load_hf_checkpoint` reads a folder written by `save_pretrained`:
  BertModel (with or without the `bert.` prefix, e.g. sentence-transformers exports),
  BertForMaskedLM, BertForPreTraining (its NSP head `cls.seq_relationship.*` is ignored),
  DistilBertModel, DistilBertForMaskedLM, RobertaModel, RobertaForMaskedLM, XLMRobertaModel,
  XLMRobertaForMaskedLM (RoBERTa's positions start at row pad_token_id + 1: our
  `position_offset`);
  weights from `model.safetensors`, sharded safetensors (`model.safetensors.index.json`), or
  (only when torch is installed, and only through `torch.load(weights_only=True)`) a legacy
  `pytorch_model.bin`. Nothing from the folder is ever executed (no `auto_map` / remote code).

`load_hf_task_checkpoint` reads a fine-tuned one (`names.TASK_CLASSES`) into a `heads.TaskModel`'s
params and its `heads.TaskHead`. Every read asserts the key set and each shape against the model
the config describes, so a checkpoint either converts completely or fails with a ValueError
naming the offending keys; keys we do not read are logged, never dropped silently.
"""

import json
import os
from typing import Any, Callable, Mapping

import jax
import ml_collections
import numpy as np
import safetensors
from absl import logging
from safetensors import safe_open

from distil_flax import model as model_lib
from distil_flax.interop.hf.names import (
    ARCHITECTURES,
    DISTILBERT,
    HEAD_MODULES,
    OFFSET_FAMILIES,
    SAFETENSORS,
    SAFETENSORS_INDEX,
    TASK_CLASSES,
    TORCH_BIN,
    TORCH_BIN_INDEX,
    WEIGHT_FILES,
    Architecture,
    check_tree,
    expected_shapes,
    exports_pooler,
    head_names,
    is_transposed,
    is_transposed_task,
    name_map,
    task_shapes,
    task_uses_pooler,
    unflatten,
)
from distil_flax.model import heads as heads_lib
from distil_flax.training.config_files import read_json


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


def _model_config(hf: Mapping[str, Any], config_file: str) -> ml_collections.ConfigDict:
    """Our model config section from a HF config.json; ValueError if our Encoder differs."""
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"{config_file}: model_type {model_type!r} is not supported; distil_flax reads "
            f"{sorted(ARCHITECTURES)} checkpoints (post-LayerNorm BERT encoders)")
    offset = 0
    if model_type == "distilbert":
        # DistilBERT hard-codes LayerNorm eps 1e-12 in transformers.
        act, eps = hf.get("activation", "gelu"), model_lib.LAYER_NORM_EPS
        sizes = dict(num_layers=hf["n_layers"], hidden_size=hf["dim"], num_heads=hf["n_heads"],
                     intermediate_size=hf["hidden_dim"], type_vocab_size=0,
                     dropout_rate=hf.get("dropout", 0.1))
    else:  # BERT, RoBERTa and XLM-R configs name the same fields (their defaults are BERT's).
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
            raise ValueError(f"{config_file}: a decoder / cross-attention {model_type} model is "
                             "not an encoder distil_flax can run")
        if ARCHITECTURES[model_type] in OFFSET_FAMILIES:
            # RobertaEmbeddings numbers real tokens from padding_idx + 1 (fairseq's make_positions).
            pad = hf.get("pad_token_id", 1)
            if not isinstance(pad, int) or pad < 0:
                raise ValueError(f"{config_file}: pad_token_id {pad!r}; {model_type} numbers "
                                 "positions from pad_token_id + 1, so it must be an id ≥ 0")
            offset = pad + 1
    if act != "gelu":
        raise ValueError(f"{config_file}: activation {act!r}; our Encoder computes exact (erf) "
                         "GELU, which transformers calls 'gelu' (gelu_new / tanh variants differ)")
    if not (isinstance(eps, (int, float)) and 0 < eps < 1):
        raise ValueError(f"{config_file}: layer_norm_eps {eps!r} must be in (0, 1)")
    positions = int(hf.get("max_position_embeddings", 512)) - offset
    if positions < 1:
        raise ValueError(f"{config_file}: max_position_embeddings "
                         f"{hf.get('max_position_embeddings', 512)} leaves no position after the "
                         f"{offset} row(s) before pad_token_id + 1")
    c = model_lib.model_config("base")
    c.vocab_size = int(hf["vocab_size"])
    c.max_position_embeddings = positions  # Usable positions; the table has `offset` more rows.
    c.position_offset = offset
    c.layer_norm_eps = float(eps)
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
            weight_map = read_json(os.path.join(path, index)).get("weight_map")
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


def _backbone_prefix(arch: Architecture, keys: set[str], source: str) -> str:
    """"bert." / "roberta." / ... for models with heads, "" for a bare *Model export."""
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
    """Reads a HF BERT / DistilBERT / RoBERTa / XLM-R folder into our config and parameter tree.

    The architecture comes from config.json (model_type bert | distilbert | roberta |
    xlm-roberta, exact GELU; its LayerNorm eps and, for RoBERTa, the position offset
    pad_token_id + 1); the pooler is kept when the checkpoint has one. A checkpoint without an
    MLM head (BertModel, DistilBertModel, RobertaModel, sentence-transformers exports) gets a
    freshly initialised head — a teacher or student needs one, and distilling or MLM training
    then learns it — and says so in the log. The returned config keeps our defaults for dtype
    ("bfloat16" compute) and attention.

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
    model_cfg = _model_config(read_json(config_file), config_file)
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
    check_tree(flat, expected_shapes(model_cfg), f"{path} does not match its config.json",
               labels=names)
    if has_head:
        _check_tied(arch, files, flat, names, path)
    flat = {k: np.ascontiguousarray(v, np.float32) for k, v in flat.items()}
    logging.info("Read %s (%s, %d layers × %d, vocab %d, pooler %s) from %s.",
                 arch.mlm_class if has_head else arch.base_class, arch.model_type,
                 model_cfg.num_layers, model_cfg.hidden_size, model_cfg.vocab_size,
                 model_cfg.use_pooler, path)
    return model_cfg, unflatten(flat)


def has_mlm_head(path: str | os.PathLike) -> bool:
    """Whether a HF checkpoint folder carries a trained MLM head (a *ForMaskedLM export)."""
    path = os.fspath(path)
    config_file = os.path.join(path, "config.json")
    model_cfg = _model_config(read_json(config_file), config_file)
    arch = ARCHITECTURES[model_cfg.head_style]
    _, has_head = _checkpoint_layout(arch, model_cfg, set(_weight_index(path)), path)
    return has_head


def _checkpoint_layout(arch: Architecture, model_cfg: ml_collections.ConfigDict,
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


def _report_unused(arch: Architecture, unused: set[str], prefix: str, source: str) -> None:
    """Logs keys we do not read: expected ones (NSP head, buffers, tied decoder) at INFO, anything
    else as a WARNING listing them, so nothing is ever dropped silently."""
    expected = set(arch.ignored_heads) | set(arch.tied) | {prefix + b for b in arch.buffers}
    ignored = sorted(unused & expected)
    unknown = sorted(unused - expected)
    if ignored:
        logging.info("%s: ignoring %s (no counterpart in our model, or tied).", source, ignored)
    if unknown:
        logging.warning("%s: unexpected key(s) not used by distil_flax: %s", source, unknown)


def _check_tied(arch: Architecture, files: Mapping[str, str], flat: Mapping[str, np.ndarray],
                names: Mapping[str, str], source: str) -> None:
    """Stored decoder weights must equal what they are tied to: our decoder is always tied."""
    present = [k for k in arch.tied if k in files]
    stored = _read_tensors(files, present)
    for key in present:
        if not np.array_equal(stored[key], flat[arch.tied[key]]):
            raise ValueError(f"{source}: {key} differs from {names[arch.tied[key]]}, which it is "
                             "tied to in our Encoder; an untied MLM decoder cannot be represented")




def load_hf_task_checkpoint(
        path: str | os.PathLike
) -> tuple[ml_collections.ConfigDict, heads_lib.TaskHead, dict[str, Any]]:
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
    hf = read_json(config_file)
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
    # RobertaForSequenceClassification keeps the pooler in its head (`names.head_names`).
    model_cfg.use_pooler = task_uses_pooler(arch, head)
    names = {f"encoder/{ours}": key for ours, key in name_map(
        arch, model_cfg.num_layers, prefix=prefix, token_types=model_cfg.type_vocab_size > 0,
        pooler=exports_pooler(arch, head), mlm_head=False).items()}
    names.update(head_names(arch, head))
    missing = sorted(k for k in names.values() if k not in keys)
    if missing:
        raise ValueError(f"{path}: {classes[0]} checkpoint lacks key(s) {missing}")
    _report_unused(arch, keys - set(names.values()), prefix, path)
    tensors = _read_tensors(files, list(names.values()))
    flat = {ours: tensors[key].T if is_transposed_task(ours) else tensors[key]
            for ours, key in names.items()}
    head_module = HEAD_MODULES[(arch.model_type, head)][-1]
    num_labels = {"multiple_choice": 1, "qa": 2}.get(
        head, int(np.shape(flat[f"{head_module}/bias"])[0]))
    id2label = hf.get("id2label") or {}
    label_names = tuple(id2label[str(i)] for i in range(num_labels)) if (
        head in ("seq_cls", "token_cls") and len(id2label) == num_labels) else ()
    if arch is DISTILBERT:
        dropout = hf.get("qa_dropout", 0.1) if head == "qa" else (
            hf.get("seq_classif_dropout", 0.2) if head != "token_cls" else model_cfg.dropout_rate)
    elif arch in OFFSET_FAMILIES and head == "multiple_choice":
        dropout = model_cfg.dropout_rate  # RobertaForMultipleChoice: hidden_dropout_prob.
    else:
        dropout = 0.0 if head == "qa" else (hf.get("classifier_dropout")
                                            if hf.get("classifier_dropout") is not None
                                            else model_cfg.dropout_rate)
    task = heads_lib.TaskHead(head, num_labels, label_names,
                    regression=head == "seq_cls" and (hf.get("problem_type") == "regression"
                                                      or num_labels == 1),
                    head_dropout=float(dropout))
    check_tree(flat, task_shapes(model_cfg, task), f"{path} does not match its config.json",
               labels=names)
    flat = {k: np.ascontiguousarray(v, np.float32) for k, v in flat.items()}
    logging.info("Read %s (%d layers × %d, %d label(s)) from %s.", classes[0],
                 model_cfg.num_layers, model_cfg.hidden_size, num_labels, path)
    return model_cfg, task, unflatten(flat)
