"""The teachers of a distillation run: the live teacher loaded into its shardings, or the cached
targets that replace it (`data/run_targets.py`), with the teacher loaded only to initialise the
student from it.
"""

import dataclasses

import jax
import ml_collections
from absl import logging

from distil_flax import data
from distil_flax import model as model_lib
from distil_flax.data import run_targets, teacher_logits, teacher_targets
from distil_flax.distill import config as config_lib
from distil_flax.interop import sources
from distil_flax.model import make_encoder
from distil_flax.model.encoder import encoder_only
from distil_flax.training import partitioning, train_state


def load_teacher(c: ml_collections.ConfigDict, vocab_size: int, mesh, rules, *,
                 spec: str = "", field: str = "teacher.checkpoint",
                 needs_mlm_head: bool | None = None):
    """Loads the teacher named by `teacher.checkpoint` (`interop.sources`: a distil_flax
    workdir, a Hugging Face folder or `hf://ORG/NAME[@REV]`), once, into its shardings.

    Args:
      spec, field: another teacher than teacher.checkpoint, and the flag that named it.
      needs_mlm_head: refuse a teacher without one (default: when loss.alpha_ce is weighted).

    Returns:
      (teacher model, float32 params in their shardings, whether it has a trained MLM head,
       its sentence-transformers pooling or None).
    """
    spec = spec or c.teacher.checkpoint
    source = sources.open_source(spec, field=field, seed=c.seed)
    if source.head is not None:
        raise ValueError(
            f"{source.named()} is a fine-tuning run (it holds {sources.TASK_MODEL_FILE}) or a "
            "fine-tuned model: distillation needs a pretrained encoder with its MLM head; a "
            "fine-tuned teacher distils on its task (distil_flax.finetune with "
            "--config.distill.teacher)")
    if needs_mlm_head is None:
        needs_mlm_head = bool(c.loss.alpha_ce)
    if needs_mlm_head and not source.has_mlm_head:
        raise ValueError(
            f"{source.named()} has no MLM head, but loss.alpha_ce distils the teacher's MLM "
            "distribution: use a *ForMaskedLM checkpoint or set loss.alpha_ce=0")
    teacher = make_encoder(source.model_cfg)
    params, step = sources.encoder_params(source, mesh, rules)
    if source.kind == "hf":
        params = jax.device_put(params, train_state.shardings_of(
            partitioning.abstract_params(model_lib.init_fn(teacher), mesh, rules)))
    if teacher.vocab_size != vocab_size:
        raise ValueError(
            f"the teacher's vocab_size {teacher.vocab_size} ({field}={spec!r}) differs from "
            f"data.tokenizer's {vocab_size}: its MLM distribution is over another vocabulary than "
            "the student's; distil with the teacher's tokenizer")
    logging.info("Teacher: %s (%s), %d layers × %d%s.", source.path,
                 "Hugging Face checkpoint" if step is None else f"step {step}",
                 teacher.num_layers, teacher.hidden_size,
                 "" if source.has_mlm_head else ", no MLM head")
    found = (source.sentence_config() if c.loss.embeddings.pooling == "auto" else None)
    return teacher, params, source.has_mlm_head, found and found.pooling


def open_targets(c: ml_collections.ConfigDict, caches: list[str], train_rows, mesh, rules,
                 loaded=None):
    """Opens teacher.cache, checked against the run, and the teacher's parameters when the
    student is initialised from it (checked to be the first cache's teacher).

    Args:
      loaded: (model, params) of teacher.checkpoint when the run has loaded it already (it runs
        live beside the caches), or None.

    Returns:
      (targets, the teacher model and its float32 params, or None and None when the student
       does not start from it).

    Raises:
      ValueError: naming teacher.cache or teacher.checkpoint (`run_targets.Targets`).
    """
    dataset = data.PreparedDataset(train_rows.split.directory)
    pooling = c.loss.embeddings.pooling
    expected = teacher_targets.Expected(
        dataset, c.data.seq_len, "" if pooling == "auto" else pooling,
        masking={field: c.masking[field] for field in teacher_logits.MASKING_FIELDS},
        temperature=c.loss.temperature)
    first = teacher_targets.read_manifest(caches[0])
    teacher = params = None
    if loaded is not None:
        teacher, params = loaded
    elif c.init.from_teacher:
        spec = c.teacher.checkpoint or first["teacher"]["spec"]
        source = sources.open_source(spec, field="teacher.checkpoint", seed=c.seed)
        teacher = make_encoder(source.model_cfg)
        params, _ = sources.encoder_params(source, mesh, rules)
        if source.kind == "hf":
            params = jax.device_put(params, train_state.shardings_of(partitioning.abstract_params(
                model_lib.init_fn(teacher), mesh, rules)))
    if c.init.from_teacher:
        expected = dataclasses.replace(expected, teacher_digest=teacher_targets.parameter_digest(
            jax.device_get(encoder_only(params))))
    targets = run_targets.Targets(caches, config_lib.cache_weights(c), expected)
    logging.info("Teacher targets from the cache%s: %s.",
                 "" if loaded else ", no teacher runs", targets.describe())
    return targets, teacher, params
