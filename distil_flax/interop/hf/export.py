"""Writing `transformers`-loadable folders: config.json, model.safetensors and tokenizer files.

`export_hf` writes `RobertaForMaskedLM` / `XLMRobertaForMaskedLM` for head_style "roberta" /
"xlm-roberta", `DistilBertForMaskedLM` for a DistilBERT-shaped model (no token types, no pooler,
head_style "distilbert"), else `BertForMaskedLM`; or the bare `*Model` with head="none".
`export_task_hf` writes a fine-tuned `heads.TaskModel` as its *For<Task> class
(`names.TASK_CLASSES`), with id2label, problem_type and the head's dropout in config.json.
Every export carries a model card, README.md (`card.py`): a run's (`card.run_card`) when the
caller passes one, else one that says what the model is.
Weights go through `safetensors.numpy`, so exporting needs no torch; every export is written
beside its destination and renamed into place, so a failure leaves nothing behind.
"""

import os
import shutil
from typing import Any, Callable, Mapping

import jax
import ml_collections
import numpy as np
import safetensors.numpy
import tokenizers
from absl import logging
from huggingface_hub import ModelCard

from distil_flax import model as model_lib
from distil_flax.data import roberta_vocab
from distil_flax.data import tokenizer as tokenizer_lib
from distil_flax.interop.hf import card as card_lib
from distil_flax.interop.hf.names import (
    BERT,
    DISTILBERT,
    EXPORT_HEADS,
    OFFSET_FAMILIES,
    SAFETENSORS,
    TASK_CLASSES,
    TASK_HEADS,
    Architecture,
    check_tree,
    expected_shapes,
    export_architecture,
    exports_pooler,
    flatten,
    head_names,
    is_transposed,
    is_transposed_task,
    name_map,
    task_shapes,
)
from distil_flax.model import heads as heads_lib
from distil_flax.training import atomic


def hf_config(model_cfg: ml_collections.ConfigDict, *, head: str = "mlm",
              pad_token_id: int | None = None, bos_token_id: int | None = None,
              eos_token_id: int | None = None) -> dict[str, Any]:
    """The transformers config.json for an export of a model with config `model_cfg`.

    Args:
      model_cfg: the model section.
      head: "mlm" or "none".
      pad_token_id, bos_token_id, eos_token_id: the tokenizer's ids; None: the family's default
        (BERT pad 0; RoBERTa pad position_offset − 1, bos 0, eos 2). BERT-family configs carry
        no bos / eos.

    Raises:
      ValueError: a RoBERTa-family model whose pad id is not position_offset − 1: transformers
        numbers RoBERTa's positions from pad_token_id + 1, so the two must agree.
    """
    _check_head(head)
    arch = export_architecture(model_cfg)
    offset = model_lib.later_field(model_cfg, "position_offset")
    if arch in OFFSET_FAMILIES:
        if offset < 1:
            raise ValueError(f"model.position_offset is {offset}, but transformers numbers "
                             f"{arch.model_type} positions from pad_token_id + 1 ≥ 1 (RoBERTa: 2)")
        if pad_token_id is not None and pad_token_id != offset - 1:
            raise ValueError(
                f"pad_token_id {pad_token_id}: transformers numbers "
                f"{arch.model_type} positions from pad_token_id + 1, and this model's start at "
                f"row {offset} (model.position_offset): use a vocabulary whose pad id is "
                f"{offset - 1} (RoBERTa's <pad> is 1)")
        pad_token_id = offset - 1
    head_dim = model_lib.later_field(model_cfg, "head_dim")
    if head_dim and head_dim * model_cfg.num_heads != model_cfg.hidden_size:
        raise ValueError(
            f"model.num_heads ({model_cfg.num_heads}) × model.head_dim ({head_dim}) differs from "
            f"model.hidden_size ({model_cfg.hidden_size}): transformers' {arch.model_type} needs "
            "heads that fill the hidden size (prune heads and channels together)")
    common = {
        "architectures": [arch.mlm_class if head == "mlm" else arch.base_class],
        "model_type": arch.model_type,
        "vocab_size": int(model_cfg.vocab_size),
        # HF's table holds every row, the `offset` ones before the first position included.
        "max_position_embeddings": int(model_cfg.max_position_embeddings) + offset,
        "pad_token_id": int(pad_token_id or 0),
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
    if arch in OFFSET_FAMILIES:
        common |= {"bos_token_id": int(0 if bos_token_id is None else bos_token_id),
                   "eos_token_id": int(2 if eos_token_id is None else eos_token_id)}
    return common | {
        "hidden_size": int(model_cfg.hidden_size), "num_hidden_layers": int(model_cfg.num_layers),
        "num_attention_heads": int(model_cfg.num_heads),
        "intermediate_size": int(model_cfg.intermediate_size), "hidden_act": "gelu",
        "hidden_dropout_prob": float(model_cfg.dropout_rate),
        "attention_probs_dropout_prob": float(model_cfg.attention_dropout_rate),
        # HF's BERT and RoBERTa always have token-type embeddings; a model without them exports
        # one zero row.
        "type_vocab_size": max(int(model_cfg.type_vocab_size), 1),
        "layer_norm_eps": float(model_lib.later_field(model_cfg, "layer_norm_eps")),
        "position_embedding_type": "absolute",
    }


def _special_ids(tokenizer: tokenizer_lib.Tokenizer | None,
                 model_cfg: ml_collections.ConfigDict) -> dict[str, int | None]:
    """The ids `hf_config` writes, from the export's tokenizer (None: the family's defaults).

    Raises:
      ValueError: naming the tokenizer, when its pad id cannot be a RoBERTa export's.
    """
    if tokenizer is None:
        return {"pad_token_id": None}
    offset = model_lib.later_field(model_cfg, "position_offset")
    if export_architecture(model_cfg) in OFFSET_FAMILIES and tokenizer.pad_id != offset - 1:
        raise ValueError(
            f"tokenizer {tokenizer.path}: its pad id is {tokenizer.pad_id}, but transformers "
            f"numbers {model_cfg.head_style} positions from pad_token_id + 1 and this model's "
            f"start at row {offset} (model.position_offset): use a vocabulary whose pad id is "
            f"{offset - 1} (RoBERTa's <pad> is 1)")
    ids: dict[str, int | None] = {"pad_token_id": tokenizer.pad_id}
    if tokenizer.family == "roberta":
        ids |= {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id}
    return ids


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
    check_tree(flat, expected_shapes(model_cfg), "params do not match the model config")
    arch = export_architecture(model_cfg)
    pooler = bool(model_cfg.use_pooler)
    if pooler and head == "mlm":
        # BertForMaskedLM has no pooler; it would report the keys as unexpected.
        logging.info("%s has no pooler: the pooler is not exported (head='none' exports it with "
                     "%s).", arch.mlm_class, arch.base_class)
        pooler = False
    if arch is not DISTILBERT and head == "none" and not pooler:
        logging.warning("%s always has a pooler: transformers will initialise a fresh one for "
                        "this pooler-less model (pooler.dense.* reported missing).",
                        arch.base_class)
    return _backbone_state(flat, model_cfg, prefix=arch.prefix if head == "mlm" else "",
                           pooler=pooler, mlm_head=head == "mlm")


def _float32_flat(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {k: np.asarray(jax.device_get(v), np.float32) for k, v in flatten(params).items()}


def _backbone_state(flat: Mapping[str, np.ndarray], model_cfg: ml_collections.ConfigDict, *,
                    prefix: str, pooler: bool, mlm_head: bool) -> dict[str, np.ndarray]:
    """Encoder parameters by our path → HF state dict entries under `prefix`."""
    arch = export_architecture(model_cfg)
    flat = dict(flat)
    if arch.token_types and not model_cfg.type_vocab_size > 0:
        # HF's BERT and RoBERTa always add a token-type embedding: one zero row adds nothing.
        flat["token_type_embeddings/embedding"] = np.zeros((1, model_cfg.hidden_size), np.float32)
        logging.info("No token-type embeddings: exporting one zero row (type_vocab_size=1).")
    names = name_map(arch, model_cfg.num_layers, prefix=prefix, token_types=bool(arch.token_types),
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
              lowercase: bool = True, head: str = "mlm", overwrite: bool = False,
              card: ModelCard | None = None,
              add: Callable[[str], None] | None = None) -> list[str]:
    """Writes a folder that `transformers.AutoModelForMaskedLM` / `AutoModel` and `AutoTokenizer`
    load offline, with no missing or unexpected keys.

    Everything is written into a temporary folder beside `output_dir` and renamed at the end, so a
    failure leaves nothing behind.

    Args:
      params: `Encoder` parameters (jax or numpy arrays).
      model_cfg: their model config section.
      output_dir: the folder to create.
      tokenizer_path: the run's `data.tokenizer` (vocab.txt, tokenizer.json, vocab.json /
        merges.txt, a SentencePiece .model, or a folder of one); None writes no tokenizer files.
      lowercase: for vocab.txt: uncased normalisation (the run's `data.lowercase`).
      head: "mlm" (*ForMaskedLM) or "none" (the bare *Model).
      overwrite: replace an existing non-empty `output_dir`.
      card: the model card to write as README.md (`card.run_card`); None: `card.plain_card`.
      add: writes more files into the folder before it is renamed into place (the
        sentence-transformers layout), so the whole export is still atomic.

    Returns:
      Paths of the files written, relative to `output_dir`, sorted.

    Raises:
      ValueError: a task head, params that do not match `model_cfg`, or a RoBERTa-family model
        with a tokenizer whose pad id is not position_offset − 1.
      FileExistsError: `output_dir` exists, is not empty, and `overwrite` is False.
    """
    _check_head(head)
    output_dir = check_output_dir(output_dir, overwrite)
    # Everything that can fail on bad inputs happens before anything is written.
    tokenizer = (tokenizer_lib.load_tokenizer(tokenizer_path, lowercase=lowercase)
                 if tokenizer_path else None)
    state = hf_state_dict(params, model_cfg, head=head)
    config = hf_config(model_cfg, head=head, **_special_ids(tokenizer, model_cfg))
    card = card or card_lib.plain_card(config, head, name=os.path.basename(output_dir),
                                       has_tokenizer=tokenizer is not None)
    return _write_export(output_dir, config, state, tokenizer, model_cfg, card,
                         lowercase=lowercase, add=add)


def check_output_dir(output_dir: str | os.PathLike, overwrite: bool) -> str:
    """`output_dir` made absolute, if an export may write it.

    Raises:
      FileExistsError: it exists, is not empty, and `overwrite` is False.
    """
    output_dir = os.path.abspath(os.fspath(output_dir))
    if os.path.exists(output_dir) and not overwrite and (
            not os.path.isdir(output_dir) or os.listdir(output_dir)):
        raise FileExistsError(f"{output_dir} exists and is not empty (--overwrite replaces it)")
    return output_dir


def _write_export(output_dir: str, config: Mapping[str, Any], state: Mapping[str, np.ndarray],
                  tokenizer: tokenizer_lib.Tokenizer | None,
                  model_cfg: ml_collections.ConfigDict, card: ModelCard, *,
                  lowercase: bool, add: Callable[[str], None] | None = None) -> list[str]:
    """Writes config, weights, tokenizer, model card (and `add(folder)`'s files) into a
    temporary folder, then renames it into place (`atomic.replaced`)."""
    arch = export_architecture(model_cfg)
    os.makedirs(os.path.dirname(output_dir), exist_ok=True)
    with atomic.replaced(output_dir, folder=True) as tmp:
        atomic.write_json(os.path.join(tmp, "config.json"), config)
        # "format": "pt" tells transformers the tensors are in torch's layout. Serialised in
        # memory: `save_file` leaves the file 0600 whatever the umask.
        atomic.write_bytes(os.path.join(tmp, SAFETENSORS),
                           safetensors.numpy.save(dict(state), metadata={"format": "pt"}))
        card.save(os.path.join(tmp, "README.md"))
        if tokenizer:
            _write_tokenizer(tmp, tokenizer, arch, lowercase=lowercase,
                             max_length=int(model_cfg.max_position_embeddings))
        if add:
            add(tmp)
        written = sorted(os.path.relpath(os.path.join(root, f), tmp)
                         for root, _, files in os.walk(tmp) for f in files)
    logging.info("Exported %s to %s: %s.", config["architectures"][0], output_dir, written)
    return written


def _write_tokenizer(directory: str, tokenizer: tokenizer_lib.Tokenizer, arch: Architecture, *,
                     lowercase: bool, max_length: int) -> None:
    """Writes the run's vocabulary (`tokenizer.files`) as the tokenizer_config AutoTokenizer needs.

    vocab.txt → (Distil)BertTokenizer with `do_lower_case`;
    vocab.json + merges.txt (byte-level BPE) → copied, with the equivalent tokenizer.json (which
      says `<mask>` absorbs the space before it), for RobertaTokenizer(Fast);
    XLM-R's sentencepiece.bpe.model → copied, with the equivalent tokenizer.json (fairseq's ids),
      for XLMRobertaTokenizer(Fast);
    tokenizer.json → copied as is (its normaliser and post-processor already say everything):
      RobertaTokenizer for a RoBERTa-family BPE (vocab.json + merges.txt written beside it),
      XLMRobertaTokenizer for a RoBERTa-family Unigram, else PreTrainedTokenizerFast;
    other SentencePiece .model → spiece.model with AlbertTokenizer, whose special-token layout
      (<pad>, <unk>, [CLS], [SEP], [MASK]) is ours.
    """
    special = {
        "pad_token": tokenizer.id_to_token(tokenizer.pad_id),
        "unk_token": tokenizer.id_to_token(tokenizer.unk_id),
        "cls_token": tokenizer.id_to_token(tokenizer.cls_id),
        "sep_token": tokenizer.id_to_token(tokenizer.sep_id),
        "mask_token": tokenizer.id_to_token(tokenizer.mask_id),
    }
    roberta = tokenizer.family == "roberta"
    if roberta:  # RoBERTa's names for <s> and </s>, which its tokenizers also set.
        special |= {"bos_token": special["cls_token"], "eos_token": special["sep_token"]}
    files = {os.path.basename(f): f for f in tokenizer.files}
    source = tokenizer.files[0]
    name = os.path.basename(source)
    target = lambda file: os.path.join(directory, file)  # noqa: E731
    tokenizer_config: dict[str, Any] = {"model_max_length": max_length, **special}
    if "vocab.json" in files and "merges.txt" in files:
        for file in ("vocab.json", "merges.txt"):
            shutil.copyfile(files[file], target(file))
        roberta_vocab.load_bpe(files["vocab.json"], files["merges.txt"]).save(
            target("tokenizer.json"))
        tokenizer_config |= {"tokenizer_class": "RobertaTokenizer", "add_prefix_space": False,
                             "trim_offsets": True}
    elif name == "sentencepiece.bpe.model":
        shutil.copyfile(source, target(name))
        roberta_vocab.load_xlmr_sentencepiece(source).save(target("tokenizer.json"))
        tokenizer_config["tokenizer_class"] = "XLMRobertaTokenizer"
    elif name.endswith(".txt"):
        shutil.copyfile(source, target("vocab.txt"))
        bert_class = arch.tokenizer_class if arch in (BERT, DISTILBERT) else BERT.tokenizer_class
        tokenizer_config |= {"tokenizer_class": bert_class,
                             "do_lower_case": bool(lowercase), "strip_accents": None,
                             "tokenize_chinese_chars": True, "do_basic_tokenize": True}
    elif name.endswith(".json"):
        shutil.copyfile(source, target("tokenizer.json"))
        model = tokenizers.Tokenizer.from_file(source).model if roberta else None
        if isinstance(model, tokenizers.models.BPE):
            model.save(directory)  # vocab.json + merges.txt, as RoBERTa ships them.
            tokenizer_config |= {"tokenizer_class": "RobertaTokenizer",
                                 "add_prefix_space": False, "trim_offsets": True}
        elif isinstance(model, tokenizers.models.Unigram):
            tokenizer_config["tokenizer_class"] = "XLMRobertaTokenizer"
        else:
            tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    else:
        shutil.copyfile(source, target("spiece.model"))
        # Case folding and NFKC live in the model's own normaliser; don't add ALBERT's on top.
        tokenizer_config |= {"tokenizer_class": "AlbertTokenizer", "do_lower_case": False,
                             "keep_accents": True, "remove_space": True}
    if arch is DISTILBERT or roberta:
        # DistilBERT's forward takes no token_type_ids; RoBERTa's tokenizers produce none.
        tokenizer_config["model_input_names"] = ["input_ids", "attention_mask"]
    atomic.write_json(target("tokenizer_config.json"), tokenizer_config)
    atomic.write_json(target("special_tokens_map.json"), special)


# ----------------------------------------------------------------------------------------------
# Fine-tuned models: a `heads.TaskModel` as its transformers *For<Task> class.
# ----------------------------------------------------------------------------------------------


def hf_task_config(model_cfg: ml_collections.ConfigDict, task: heads_lib.TaskHead, *,
                   pad_token_id: int | None = None, bos_token_id: int | None = None,
                   eos_token_id: int | None = None) -> dict[str, Any]:
    """The transformers config.json of a fine-tuned model's export (ids as `hf_config`)."""
    arch = export_architecture(model_cfg)
    config = hf_config(model_cfg, head="none", pad_token_id=pad_token_id,
                       bos_token_id=bos_token_id, eos_token_id=eos_token_id)
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
                       task: heads_lib.TaskHead) -> dict[str, np.ndarray]:
    """`heads.TaskModel` parameters → the float32 state dict of the HF *For<Task> model.

    Raises:
      ValueError: `params` do not match `model_cfg` and `task` (keys and shapes listed).
    """
    if task.head not in TASK_HEADS:
        raise ValueError(f"head must be one of {TASK_HEADS}, got {task.head!r}")
    flat = _float32_flat(params)
    check_tree(flat, task_shapes(model_cfg, task),
               f"params do not match the model config and a {task.head} head")
    arch = export_architecture(model_cfg)
    # The head pools as the model's fields say (`heads.task_pooling`); only the family with that
    # classifier (pre_classifier or pooler) can hold it.
    if task.head in ("seq_cls", "multiple_choice") and (
            (heads_lib.task_pooling(model_cfg) == "first_token") != (arch is DISTILBERT)):
        raise ValueError(f"a {heads_lib.task_pooling(model_cfg)} {task.head} head has no "
                         f"{arch.model_type} transformers class")
    pooler = exports_pooler(arch, task.head)
    names = head_names(arch, task.head)  # RoBERTa's seq_cls head holds our pooler.
    if model_cfg.use_pooler and not pooler and "encoder/pooler/kernel" not in names:
        logging.info("%s has no pooler: the pooler is not exported.",
                     TASK_CLASSES[(arch.model_type, task.head)])
    encoder = {k[len("encoder/"):]: v for k, v in flat.items() if k.startswith("encoder/")}
    state = _backbone_state(encoder, model_cfg, prefix=arch.prefix, pooler=pooler,
                            mlm_head=False)
    for ours, hf in names.items():
        state[hf] = np.ascontiguousarray(flat[ours].T if is_transposed_task(ours) else flat[ours])
    return state


def export_task_hf(params: Mapping[str, Any], model_cfg: ml_collections.ConfigDict,
                   task: heads_lib.TaskHead, output_dir: str | os.PathLike, *,
                   tokenizer_path: str | None = None, lowercase: bool = True,
                   overwrite: bool = False, card: ModelCard | None = None) -> list[str]:
    """Writes a fine-tuned model as its transformers class (e.g.
    `DistilBertForSequenceClassification`), loadable with no missing or unexpected keys, with
    id2label and the head's dropout in config.json. Atomic, as `export_hf`.

    Args:
      params: `heads.TaskModel` parameters ({"encoder": ..., head modules}).
      model_cfg: the encoder's model config section (`use_pooler` as trained).
      task: the head.
      output_dir, tokenizer_path, lowercase, overwrite, card: as `export_hf`.

    Returns:
      Names of the files written, sorted.
    """
    output_dir = check_output_dir(output_dir, overwrite)
    tokenizer = (tokenizer_lib.load_tokenizer(tokenizer_path, lowercase=lowercase)
                 if tokenizer_path else None)
    state = hf_task_state_dict(params, model_cfg, task)
    config = hf_task_config(model_cfg, task, **_special_ids(tokenizer, model_cfg))
    card = card or card_lib.plain_card(config, task.head, name=os.path.basename(output_dir),
                                       has_tokenizer=tokenizer is not None)
    return _write_export(output_dir, config, state, tokenizer, model_cfg, card,
                         lowercase=lowercase)
