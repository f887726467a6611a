"""Where fine-tuning starts from, and how a fine-tuned model is read back.

Starting points (`load_pretrained`, from `init.checkpoint`):
  * a distil_flax pretraining or distillation workdir: its config.json and the `params` of its
    latest checkpoint; the tokenizer is that run's `data.tokenizer`;
  * a distil_flax fine-tuning workdir: the encoder of its best checkpoint (a second fine-tuning);
  * a Hugging Face BERT/DistilBERT folder, bare, *ForMaskedLM or fine-tuned (`distil_flax.hf`
    converts it); the tokenizer is the folder's vocab.txt / tokenizer.json / spiece.model;
  * a Hub model, `hf://ORG/NAME[@REVISION]`: that folder, from the Hugging Face cache
    (`hf.resolve_checkpoint`; downloaded when missing and the Hub is reachable).
The head is always freshly initialised; the encoder's MLM head is dropped and, for BERT-style
classification heads on an encoder saved without a pooler, a fresh pooler is added — both are
logged, as transformers logs "newly initialized" weights.

Fine-tuned models (`load_finetuned`, for the distillation teacher and for export): a fine-tuning
workdir (`task_model.json` + its best checkpoint), or a fine-tuned HF folder or Hub model.
"""

import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from flax import traverse_util

from distil_flax import config as config_lib
from distil_flax import hf, loop, partitioning
from distil_flax import model as model_lib
from distil_flax.checkpoint import checkpoint_dir, restore_params
from distil_flax.downstream import heads
from distil_flax.model import make_encoder

# Written into every fine-tuning workdir: what the trained model is, for readers of its checkpoints.
TASK_MODEL_FILE = "task_model.json"

BEST_DIR = loop.BEST_DIR  # The best evaluation's parameters, under the workdir.
_TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "spiece.model")


@dataclasses.dataclass
class Pretrained:
    """An encoder to fine-tune: its model section, where its weights are, and its tokenizer."""

    model_cfg: ml_collections.ConfigDict
    source: str  # "hf", "run" (pretraining/distillation workdir) or "finetuned".
    path: str
    tokenizer: str  # "" when the checkpoint names none.
    lowercase: bool
    hf_params: Any = None  # Encoder params read from an HF folder (host numpy).


@dataclasses.dataclass
class Finetuned:
    """A fine-tuned model: encoder config, head, parameters and tokenizer."""

    model_cfg: ml_collections.ConfigDict
    head: heads.TaskHead
    params: Any
    tokenizer: str
    lowercase: bool
    task: str  # The task it was fine-tuned on ("" when unknown: an HF folder).


def _hf_tokenizer(path: str) -> tuple[str, bool]:
    """The tokenizer file an HF folder ships, and its lowercase flag."""
    found = [os.path.join(path, f) for f in _TOKENIZER_FILES
             if os.path.isfile(os.path.join(path, f))]
    lowercase = True
    config_file = os.path.join(path, "tokenizer_config.json")
    if os.path.isfile(config_file):
        with open(config_file) as f:
            lowercase = bool(json.load(f).get("do_lower_case", True))
    return (found[0] if found else ""), lowercase


def _is_hf_task_folder(path: str) -> bool:
    with open(os.path.join(path, "config.json")) as f:
        classes = json.load(f).get("architectures") or []
    return bool(classes) and classes[0] in hf.TASK_CLASSES.values()


def _read_task_model(workdir: str) -> dict:
    path = epath.Path(workdir) / TASK_MODEL_FILE
    if not path.exists():
        raise ValueError(f"{workdir} is a fine-tuning run without {TASK_MODEL_FILE}: it never "
                         "started training")
    return json.loads(path.read_text())


def is_finetuning_run(workdir: str) -> bool:
    return (epath.Path(workdir) / TASK_MODEL_FILE).exists()


def load_pretrained(path: str) -> Pretrained:
    """Describes the encoder at `init.checkpoint` (weights are read by `encoder_params`).

    Args:
      path: a distil_flax workdir, an HF folder, or `hf://ORG/NAME[@REVISION]`.

    Raises:
      ValueError: neither a distil_flax workdir nor an HF folder; a Hub model that is neither
        cached nor reachable.
    """
    path = hf.resolve_checkpoint(path)
    if hf.is_hf_checkpoint(path):
        tokenizer, lowercase = _hf_tokenizer(path)
        if _is_hf_task_folder(path):
            model_cfg, _, params = hf.load_hf_task_checkpoint(path)
            params = params["encoder"]
        else:
            model_cfg, params = hf.load_hf_checkpoint(path)
        return Pretrained(model_cfg, "hf", path, tokenizer, lowercase, hf_params=params)
    if is_finetuning_run(path):
        described = _read_task_model(path)
        return Pretrained(ml_collections.ConfigDict(described["model"]), "finetuned", path,
                          described["tokenizer"], described["lowercase"])
    config_file = epath.Path(path) / "config.json"
    if not config_file.exists():
        raise ValueError(f"init.checkpoint={path!r} is neither a distil_flax workdir nor a "
                         f"Hugging Face model folder ({config_file} is missing)")
    c = config_lib.load_json(str(config_file))
    if "model" not in c or not c.model.get("vocab_size"):
        raise ValueError(f"{config_file} has no resolved model section (model.vocab_size): the "
                         "run never started")
    return Pretrained(c.model, "run", path, c.data.get("tokenizer", ""),
                      c.data.get("lowercase", True))


def abstract_params(model: heads.TaskModel, mesh, rules) -> Any:
    """`model`'s parameters as `jax.ShapeDtypeStruct`s carrying their shardings on `mesh`."""
    return partitioning.abstract_params(heads.init_fn(model), mesh, rules)


def encoder_params(pretrained: Pretrained, mesh, rules) -> dict[str, Any]:
    """The pretrained encoder's parameters (MLM head included where saved), on `mesh`.

    Returned as a flat dict by parameter path ("layers_0/mlp_in/kernel").
    """
    if pretrained.source == "hf":
        return traverse_util.flatten_dict(pretrained.hf_params, sep="/")
    if pretrained.source == "finetuned":
        return traverse_util.flatten_dict(
            load_finetuned(pretrained.path, mesh, rules).params["encoder"], sep="/")
    # The full pretraining tree (MLM head included), restored straight into its shardings.
    encoder = make_encoder(pretrained.model_cfg)
    params, step = restore_params(
        pretrained.path, partitioning.abstract_params(model_lib.init_fn(encoder), mesh, rules))
    logging.info("Encoder from %s (step %d).", pretrained.path, step)
    return traverse_util.flatten_dict(params, sep="/")


def merge_pretrained(fresh: dict[str, Any], pretrained: dict[str, Any], source: str) -> dict:
    """Fresh task-model params with the encoder's entries replaced by the pretrained ones.

    Args:
      fresh: `TaskModel` params (nested), freshly initialised in their shardings.
      pretrained: encoder params by flat path.
      source: named in messages.

    Returns:
      The merged nested params; pretrained arrays are placed in the fresh ones' shardings.

    Raises:
      ValueError: an encoder parameter other than the pooler is missing, or shapes differ.
    """
    flat = traverse_util.flatten_dict(fresh, sep="/")
    encoder_paths = {k[len("encoder/"):] for k in flat if k.startswith("encoder/")}
    new = sorted(encoder_paths - set(pretrained))
    if any(not p.startswith("pooler/") for p in new):
        raise ValueError(f"{source} lacks encoder parameter(s) {new}: it is not the encoder the "
                         "model config describes")
    wrong = [f"{p}: {tuple(np.shape(pretrained[p]))} != {tuple(flat['encoder/' + p].shape)}"
             for p in sorted(encoder_paths & set(pretrained))
             if tuple(np.shape(pretrained[p])) != tuple(flat["encoder/" + p].shape)]
    if wrong:
        raise ValueError(f"{source}: wrong shapes [{'; '.join(wrong)}]")
    for path in encoder_paths & set(pretrained):
        target = flat["encoder/" + path]
        flat["encoder/" + path] = jax.device_put(
            jax.numpy.asarray(pretrained[path], target.dtype), target.sharding)
    unused = sorted(set(pretrained) - encoder_paths)
    head = sorted({k.split("/")[0] for k in flat if not k.startswith("encoder/")})
    logging.info("Fine-tuning from %s. Newly initialised: head %s%s. Not used: %s.", source, head,
                 f", encoder {new}" if new else "",
                 sorted({p.split("/")[0] for p in unused}) or "nothing")
    return traverse_util.unflatten_dict(flat, sep="/")


def load_finetuned(path: str, mesh, rules, *, dtype: str | None = None,
                   step: int | None = None) -> Finetuned:
    """A fine-tuned model: a fine-tuning workdir (its best checkpoint) or an HF task folder.

    Args:
      path: the workdir or folder, or `hf://ORG/NAME[@REVISION]`.
      mesh, rules: where to place the parameters.
      dtype: compute dtype to run it in (None: as saved).
      step: a workdir's checkpoint step (the best one or a kept last one); None: the best.

    Raises:
      ValueError: not a fine-tuned model, or no such step; a Hub model that is neither cached
        nor reachable.
    """
    path = hf.resolve_checkpoint(path)
    if hf.is_hf_checkpoint(path):
        if not _is_hf_task_folder(path):
            raise ValueError(f"{path} is a Hugging Face model without a task head; a teacher "
                             f"must be fine-tuned on the task ({sorted(hf.TASK_CLASSES.values())})")
        model_cfg, head, host = hf.load_hf_task_checkpoint(path)
        model_cfg.attention_mask = "lengths"  # Fine-tuning rows hold one sequence each.
        if dtype:
            model_cfg.dtype = dtype
        model = task_model(model_cfg, head)
        params = jax.device_put(host, jax.tree.map(lambda a: a.sharding,
                                                   abstract_params(model, mesh, rules)))
        tokenizer, lowercase = _hf_tokenizer(path)
        return Finetuned(model_cfg, head, params, tokenizer, lowercase, "")
    if not is_finetuning_run(path):
        raise ValueError(f"{path} is neither a distil_flax fine-tuning workdir (no "
                         f"{TASK_MODEL_FILE}) nor a fine-tuned Hugging Face folder")
    described = _read_task_model(path)
    model_cfg = ml_collections.ConfigDict(described["model"])
    if dtype:
        model_cfg.dtype = dtype
    head = heads.TaskHead(**{**described["head"],
                             "label_names": tuple(described["head"]["label_names"])})
    model = task_model(model_cfg, head)
    best_dir = os.path.join(path, BEST_DIR)
    directory = best_dir
    if step is not None and not (checkpoint_dir(best_dir) / str(step)).exists():
        directory = path  # A step of the resumable checkpoints, if it was kept.
        if not (checkpoint_dir(path) / str(step)).exists():
            kept = sorted(int(p.name) for d in (checkpoint_dir(best_dir), checkpoint_dir(path))
                          if d.exists() for p in d.iterdir() if p.name.isdigit())
            raise ValueError(f"no checkpoint step {step} in {path!r}; available: {kept}")
    params, step = restore_params(directory, abstract_params(model, mesh, rules), step)
    logging.info("Fine-tuned %s model from %s (%s checkpoint, step %d).", described["task"],
                 path, "best" if directory == best_dir else "last", step)
    return Finetuned(model_cfg, head, params, described["tokenizer"], described["lowercase"],
                     described["task"])


def task_model(model_cfg: ml_collections.ConfigDict, head: heads.TaskHead) -> heads.TaskModel:
    """The `TaskModel` of an encoder config and a head, pooled as its fields say."""
    return heads.make_task_model(model_cfg, head=head.head, num_labels=head.num_labels,
                                 pooling=heads.task_pooling(model_cfg),
                                 head_dropout=head.head_dropout)


def describe(workdir: str, *, model_cfg: ml_collections.ConfigDict, head: heads.TaskHead,
             tokenizer: str, lowercase: bool, task: str) -> None:
    """Writes `task_model.json`: what `load_finetuned` and the export need besides weights."""
    value = {"task": task, "model": model_cfg.to_dict(), "head": dataclasses.asdict(head),
             "tokenizer": os.path.abspath(tokenizer) if tokenizer else "",
             "lowercase": bool(lowercase)}
    (epath.Path(workdir) / TASK_MODEL_FILE).write_text(json.dumps(value, indent=2) + "\n")
