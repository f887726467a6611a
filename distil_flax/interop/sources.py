"""The one way a user's path or id becomes a model: `open_source(spec)`, then its parameters.

Every command and config field that names a model (`teacher.checkpoint`, `init.checkpoint`,
`distill.teacher`, `--student`, `--teacher`, `--workdir`, `--model`) takes the same inputs:

    run          a distil_flax pretraining or distillation workdir: config.json with a resolved
                 model section, and checkpoints/ (its latest step, or one asked for)
    finetuned    a distil_flax fine-tuning workdir: `task_model.json` beside its checkpoints
                 (the best evaluation's under best/, the resumable ones beside them)
    hf           a Hugging Face folder (config.json with a model_type, and weights): bare,
                 *ForMaskedLM, fine-tuned *For<Task>, or a sentence-transformers folder (its
                 pooling is read too); `hf://ORG/NAME[@REVISION]` is such a folder in the
                 Hugging Face cache (downloaded when missing and the Hub is reachable)

`open_source` says what a path is (config, tokenizer, head, pooling) and reads an HF folder's
weights, which transformers' own format keeps with its config; `encoder_params` and
`task_params` read a workdir's checkpoint into the shardings asked for. A path that is none of
these ends in one ValueError naming the field, so every command reports it alike.
"""

import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections
from absl import logging
from etils import epath

from distil_flax import model as model_lib
from distil_flax.interop import hf
from distil_flax.interop import sentence_transformers as st_layout
from distil_flax.model import heads, student_init
from distil_flax.training import atomic, best_params, config_files, partitioning
from distil_flax.training.checkpoint import checkpoint_dir, restore_params

KINDS = ("run", "finetuned", "hf")
# Written into every fine-tuning workdir: what the trained model is, for readers of its checkpoints.
TASK_MODEL_FILE = "task_model.json"
BEST_DIR = best_params.BEST_DIR  # A fine-tuning run's best evaluation's parameters, in its workdir.
_TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "spiece.model")


@dataclasses.dataclass
class Source:
    """What a path or id holds (weights excepted, but for an HF folder's).

    Attributes:
      spec: as the user gave it; `field` names where (in messages).
      path: the local folder (a Hub id resolved).
      kind: one of KINDS.
      model_cfg: the encoder's model config section.
      tokenizer: its tokenizer file ("" when it names none); `lowercase` its normalisation.
      head: the task head of a fine-tuned model (finetuned, or an HF *For<Task> folder).
      task: the task it was fine-tuned on ("" when unknown).
      has_mlm_head: whether its MLM head was trained (an HF folder without one gets a fresh one).
      run_config: a run workdir's whole config.json.
      pruning: what a run's student, pruned from its teacher, kept of it (its pruning.json).
      host_params: an HF folder's parameters (host numpy): the encoder's tree, or the
        `TaskModel`'s when `head` is set.
    """

    spec: str
    field: str
    path: str
    kind: str
    model_cfg: ml_collections.ConfigDict
    tokenizer: str = ""
    lowercase: bool = True
    head: heads.TaskHead | None = None
    task: str = ""
    has_mlm_head: bool = True
    run_config: ml_collections.ConfigDict | None = None
    host_params: Any = None
    pruning: student_init.Pruning | None = None

    def named(self) -> str:
        return f"{self.field}={self.spec!r}"

    def sentence_config(self) -> st_layout.SentenceConfig | None:
        """An HF folder's sentence-transformers setup (pooling, Normalize); None if it has none.

        Read when asked: a pooling we do not compute fails only the callers that need it.
        """
        return st_layout.read_sentence_config(self.path) if self.kind == "hf" else None


def open_source(spec: str, *, field: str = "--model", seed: int = 0) -> Source:
    """What `spec` (a workdir, an HF or sentence-transformers folder, `hf://ORG/NAME`) holds.

    Args:
      spec: the path or id.
      field: the flag or config field it came from, named in errors ("teacher.checkpoint").
      seed: seeds the fresh MLM head of an HF folder that has none.

    Raises:
      ValueError: nothing there; neither a distil_flax workdir nor an HF model folder; a
        damaged config.json or task_model.json; a run that never started; an unreadable HF
        folder (its own message); a Hub model that is neither cached nor reachable.
    """
    named = f"{field}={spec!r}"
    path = hf.resolve_checkpoint(spec)
    if not os.path.exists(path):
        raise ValueError(f"{named} does not exist")
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise ValueError(f"{named} is neither a distil_flax workdir nor a Hugging Face model "
                         f"folder ({config_file} is missing)")
    raw = config_files.read_json(config_file)
    if isinstance(raw, dict) and "model_type" in raw:
        return _open_hf(spec, field, path, seed)
    if (epath.Path(path) / TASK_MODEL_FILE).exists():
        described = _read_task_model(os.path.join(path, TASK_MODEL_FILE))
        return Source(spec, field, path, "finetuned",
                      ml_collections.ConfigDict(described["model"]), described["tokenizer"],
                      described["lowercase"], _task_head(described["head"]), described["task"],
                      has_mlm_head=False)
    if not isinstance(raw, dict) or "model" not in raw:
        raise ValueError(f"{named} is neither a distil_flax workdir nor a Hugging Face model "
                         f"folder ({config_file} has neither a model section nor a model_type)")
    c = config_files.load_json(config_file)
    if not c.model.get("vocab_size"):
        raise ValueError(f"{config_file} has no resolved model section (model.vocab_size): the "
                         "run never started")
    return Source(spec, field, path, "run", c.model, c.data.get("tokenizer", ""),
                  c.data.get("lowercase", True), run_config=c, pruning=read_pruning(path))


def read_pruning(workdir: str) -> student_init.Pruning | None:
    """What a run's student pruned from its teacher kept (its pruning.json); None if unpruned.

    Raises:
      ValueError: the record is damaged (naming it).
    """
    record = epath.Path(workdir) / student_init.PRUNING_FILE
    if not record.exists():
        return None
    try:
        return student_init.Pruning.from_json(config_files.read_json(record))
    except ValueError as error:
        raise ValueError(f"{record} is damaged: {error}") from None


def _open_hf(spec: str, field: str, path: str, seed: int) -> Source:
    if not hf.is_hf_checkpoint(path):
        hf.load_hf_checkpoint(path)  # A folder without weights: it says what is missing.
    tokenizer, lowercase = _hf_tokenizer(path)
    if _is_hf_task_folder(path):
        model_cfg, head, params = hf.load_hf_task_checkpoint(path)
        return Source(spec, field, path, "hf", model_cfg, tokenizer, lowercase, head=head,
                      has_mlm_head=False, host_params=params)
    has_mlm_head = hf.has_mlm_head(path)
    model_cfg, params = hf.load_hf_checkpoint(path, seed=seed)
    return Source(spec, field, path, "hf", model_cfg, tokenizer, lowercase,
                  has_mlm_head=has_mlm_head, host_params=params)


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


_TASK_MODEL_KEYS = ("task", "model", "head", "tokenizer", "lowercase")


def _read_task_model(path: str) -> dict:
    described = config_files.read_json(path)
    missing = [key for key in _TASK_MODEL_KEYS
               if not isinstance(described, dict) or key not in described]
    if missing:
        raise ValueError(f"{path} is damaged: it lacks {', '.join(missing)}")
    return described


def _task_head(described: dict) -> heads.TaskHead:
    return heads.TaskHead(**{**described, "label_names": tuple(described["label_names"])})


def write_task_model(workdir: str, *, model_cfg: ml_collections.ConfigDict,
                     head: heads.TaskHead, tokenizer: str, lowercase: bool, task: str) -> None:
    """Writes `task_model.json`: what a reader of a fine-tuning run needs besides weights."""
    value = {"task": task, "model": model_cfg.to_dict(), "head": dataclasses.asdict(head),
             "tokenizer": os.path.abspath(tokenizer) if tokenizer else "",
             "lowercase": bool(lowercase)}
    atomic.write_text(epath.Path(workdir) / TASK_MODEL_FILE, json.dumps(value, indent=2) + "\n")


def available_steps(workdir: str) -> list[int]:
    """The checkpoint steps of a workdir's resumable checkpoints, in order."""
    directory = checkpoint_dir(workdir)
    if not directory.exists():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def task_model(model_cfg: ml_collections.ConfigDict, head: heads.TaskHead) -> heads.TaskModel:
    """The `TaskModel` of an encoder config and a head, pooled as its fields say."""
    return heads.make_task_model(model_cfg, head=head.head, num_labels=head.num_labels,
                                 pooling=heads.task_pooling(model_cfg),
                                 head_dropout=head.head_dropout)


def abstract_task_params(model: heads.TaskModel, mesh, rules) -> Any:
    """`model`'s parameters as `jax.ShapeDtypeStruct`s carrying their shardings on `mesh`."""
    return partitioning.abstract_params(heads.init_fn(model), mesh, rules)


def encoder_params(source: Source, mesh, rules, *, step: int | None = None
                   ) -> tuple[Any, int | None]:
    """The encoder's parameters (MLM head and pooler where saved), and the checkpoint step.

    A run's are restored straight into their shardings on `mesh`; a fine-tuned run's encoder
    comes from its task model (`task_params`); an HF folder's are host numpy arrays, for the
    caller to place (its tree may lack a pooler the caller adds).

    Raises:
      ValueError: no checkpoint, or no such step.
    """
    if source.kind == "hf":
        params = source.host_params
        return (params["encoder"] if source.head else params), None
    if source.kind == "finetuned":
        params, step = task_params(source, mesh, rules, step=step)
        return params["encoder"], step
    _check_step(source, step)
    encoder = model_lib.make_encoder(source.model_cfg)
    params, step = restore_params(
        source.path, partitioning.abstract_params(model_lib.init_fn(encoder), mesh, rules), step)
    logging.info("Encoder from %s (step %d).", source.path, step)
    return params, step


def task_params(source: Source, mesh, rules, *, step: int | None = None,
                model_cfg: ml_collections.ConfigDict | None = None) -> tuple[Any, int | None]:
    """A fine-tuned model's `TaskModel` parameters in their shardings on `mesh`, and the step.

    Args:
      step: a fine-tuning workdir's checkpoint step (its best or a kept last one); None: the best.
      model_cfg: the config to lay the parameters out for (a dtype changed); None: the source's.

    Raises:
      ValueError: not a fine-tuned model, or no such step.
    """
    if source.head is None:
        raise ValueError(f"{source.named()} is not a fine-tuned model: neither a distil_flax "
                         f"fine-tuning workdir (no {TASK_MODEL_FILE}) nor a fine-tuned Hugging "
                         f"Face folder ({sorted(hf.TASK_CLASSES.values())})")
    abstract = abstract_task_params(task_model(model_cfg or source.model_cfg, source.head),
                                    mesh, rules)
    if source.kind == "hf":
        return jax.device_put(source.host_params,
                              jax.tree.map(lambda a: a.sharding, abstract)), None
    best_dir = os.path.join(source.path, BEST_DIR)
    directory = best_dir
    if step is not None and not (checkpoint_dir(best_dir) / str(step)).exists():
        directory = source.path  # A step of the resumable checkpoints, if it was kept.
        if not (checkpoint_dir(source.path) / str(step)).exists():
            kept = sorted({*available_steps(best_dir), *available_steps(source.path)})
            raise ValueError(f"no checkpoint step {step} in {source.path!r}; available: {kept}")
    params, step = restore_params(directory, abstract, step)
    logging.info("Fine-tuned %s model from %s (%s checkpoint, step %d).", source.task,
                 source.path, "best" if directory == best_dir else "last", step)
    return params, step


def _check_step(source: Source, step: int | None) -> None:
    steps = available_steps(source.path)
    if not steps:
        raise ValueError(f"{source.named()} has no checkpoint (nothing under checkpoints/)")
    if step is not None and step not in steps:
        raise ValueError(f"no checkpoint step {step} in {source.path!r}; available: {steps}")
