"""A run's model as a `transformers` or sentence-transformers folder, with its model card
(the library side of `python -m distil_flax.export_hf`, which documents the formats)."""

import os
from typing import Sequence

import jax
from absl import logging

from distil_flax.interop import hf, sources
from distil_flax.interop import sentence_transformers as st_layout
from distil_flax.interop.hf import model_index
from distil_flax.model.pooling import POOLINGS
from distil_flax.training import partitioning

FORMATS = ("hf", "sentence-transformers")


def _cpu_mesh():
    """One CPU device: the export never needs an accelerator, whatever the run was sharded on."""
    return partitioning.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices("cpu")[:1])


def export_run(workdir: str, output: str, *, step: int | None = None, head: str | None = None,
               tokenizer: str | None = None, overwrite: bool = False,
               output_format: str = "hf", pooling: str | None = None,
               results: Sequence[str] = ()) -> list[str]:
    """Exports the parameters of a run's checkpoint; returns the names of the files written.

    Args:
      head: "mlm", "none", or "task" (fine-tuning runs); None: "task" for a fine-tuning run,
        "mlm" for a run whose loss trained the MLM head, else "none" (TinyBERT's and MiniLM's
        recipes leave it as initialised).
      output_format: "hf", or "sentence-transformers" (the bare encoder, head "none", in the
        layout `SentenceTransformer` loads; see the module docstring).
      pooling: the sentence-transformers export's pooling: "mean", "cls", or "auto" (the teacher
        folder's); None: the run's loss.embeddings.pooling (auto when it has none).
      results: results files for the card's model-index (`model_index.read_results`): a GLUE
        suite table, an embedding evaluation report.

    Raises:
      ValueError: missing workdir, config.json, checkpoint step or tokenizer, a bad head, a
        sentence-transformers export of a fine-tuning run or with an MLM head, or a results
        file that is missing or of no known kind.
    """
    if output_format not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {output_format!r}")
    sentence = output_format == "sentence-transformers"
    if pooling is not None and not sentence:
        raise ValueError("--pooling sets the pooling of --format=sentence-transformers")
    if sentence and head not in (None, "none"):
        raise ValueError(f"--head={head}: --format=sentence-transformers exports the bare "
                         "encoder (--head=none)")
    source = sources.open_source(workdir, field="--workdir")
    if source.kind == "hf":
        raise ValueError(f"{source.named()} is a Hugging Face model folder already; --workdir "
                         "takes a distil_flax distillation or fine-tuning workdir")
    found = model_index.read_results(results, workdir=workdir)  # Before the restore, too.
    if source.kind == "finetuned":
        if sentence:
            raise ValueError(f"{workdir!r} is a fine-tuning run, which exports its task model; "
                             "--format=sentence-transformers exports a distillation run's encoder")
        return _export_finetuned(source, output, step=step, head=head or "task",
                                 tokenizer=tokenizer, overwrite=overwrite, results=found)
    c = source.run_config
    loss = c.get("loss", {})
    head = head or ("mlm" if loss.get("alpha_mlm", 1) or loss.get("alpha_ce", 1) else "none")
    if sentence:
        head = "none"
    if head == "task":
        raise ValueError(f"--head=task: {workdir!r} is not a fine-tuning run (no "
                         f"{sources.TASK_MODEL_FILE}); use --head=mlm or --head=none")
    command = _command(workdir=workdir, output=output, step=step, head=head, tokenizer=tokenizer,
                       overwrite=overwrite, output_format=output_format, pooling=pooling,
                       results=[r.path for r in found])
    # Before the restore: a bad pooling or a teacher folder that cannot be read fails fast.
    sentence_setup = _sentence_setup(c, pooling) if sentence else {}
    tokenizer = tokenizer or c.data.get("tokenizer") or None
    if tokenizer and not os.path.exists(tokenizer):  # A file, or a folder holding one.
        raise ValueError(f"tokenizer {tokenizer!r} (the run's data.tokenizer) does not exist; "
                         "pass --tokenizer=PATH")
    params, restored_step = sources.encoder_params(source, _cpu_mesh(),
                                                   partitioning.DEFAULT_RULES, step=step)
    logging.info("Restored step %d of %s.", restored_step, workdir)
    if not tokenizer:
        logging.warning("The run names no tokenizer: exporting the model only.")
    card = hf.run_card(workdir, hf.hf_config(c.model, head=head), head,
                       name=os.path.basename(os.path.abspath(output)), step=restored_step,
                       export_command=command, has_tokenizer=bool(tokenizer), results=found)
    if sentence:
        return st_layout.export_sentence_transformers(
            params, c.model, output, tokenizer_path=tokenizer,
            lowercase=c.data.get("lowercase", True), overwrite=overwrite, card=card,
            **sentence_setup)
    return hf.export_hf(params, c.model, output, tokenizer_path=tokenizer,
                        lowercase=c.data.get("lowercase", True), head=head, overwrite=overwrite,
                        card=card)


def _sentence_setup(c, pooling: str | None) -> dict:
    """pooling, normalize and max_seq_length of a run's sentence-transformers export.

    The pooling: `pooling` (mean / cls), else the run's loss.embeddings.pooling, else — auto —
    the teacher folder's sentence-transformers pooling (what training's embedding terms used),
    else mean. Normalize when the teacher folder has the module. max_seq_length: data.seq_len,
    capped at the model's positions.
    """
    configured = c.get("loss", {}).get("embeddings", {}).get("pooling", "auto")
    pooling = pooling or configured or "auto"
    if pooling not in ("auto", *POOLINGS):
        raise ValueError(f"--pooling must be auto, {', '.join(POOLINGS)}, got "
                         f"{pooling!r}")
    teacher = c.get("teacher", {}).get("checkpoint") or ""
    found = None
    if teacher:
        try:  # hf://ORG/NAME: its snapshot in the Hugging Face cache.
            folder = hf.resolve_checkpoint(teacher)
        except ValueError as error:
            raise ValueError(f"cannot read the teacher's sentence-transformers setup ({error}); "
                             "pass --pooling=mean or --pooling=cls") from None
        if os.path.isdir(folder):
            found = st_layout.read_sentence_config(folder)
    if pooling == "auto":
        pooling = (found and found.pooling) or "mean"
    if found and found.other_modules:
        logging.warning("The teacher's sentence-transformers modules %s are not exported: the "
                        "student's embeddings are the pooled ones.", list(found.other_modules))
    seq_len = int(c.get("data", {}).get("seq_len") or 0)
    positions = int(c.model.max_position_embeddings)
    max_seq_length = min(seq_len, positions) if seq_len >= 3 else positions
    logging.info("Sentence-transformers export: %s pooling%s, max_seq_length %d.", pooling,
                 ", normalised" if found and found.normalize else "", max_seq_length)
    return {"pooling": pooling, "normalize": bool(found and found.normalize),
            "max_seq_length": max_seq_length}


def _command(*, workdir: str, output: str, step: int | None, head: str | None,
             tokenizer: str | None, overwrite: bool, output_format: str = "hf",
             pooling: str | None = None, results: Sequence[str] = ()) -> list[str]:
    """The export's own command line, for its model card."""
    argv = ["python", "-m", "distil_flax.export_hf", f"--workdir={workdir}", f"--output={output}"]
    if step is not None:
        argv.append(f"--step={step}")
    if head and head not in ("mlm", "task"):
        argv.append(f"--head={head}")
    if tokenizer:
        argv.append(f"--tokenizer={tokenizer}")
    if output_format != "hf":
        argv.append(f"--format={output_format}")
    if pooling:
        argv.append(f"--pooling={pooling}")
    if results:
        argv.append(f"--results={','.join(results)}")
    return argv + (["--overwrite"] if overwrite else [])


def _export_finetuned(source: sources.Source, output: str, *, step: int | None, head: str,
                      tokenizer: str | None, overwrite: bool,
                      results: Sequence[model_index.ResultsFile] = ()) -> list[str]:
    """A fine-tuning run's task model (best checkpoint, or `step`) as its transformers class."""
    workdir = source.spec
    if head != "task":
        raise ValueError(f"--head={head}: {workdir!r} is a fine-tuning run, which exports its "
                         "task model (--head=task)")
    command = _command(workdir=workdir, output=output, step=step, head=None, tokenizer=tokenizer,
                       overwrite=overwrite, results=[r.path for r in results])
    params, _ = sources.task_params(source, _cpu_mesh(), partitioning.DEFAULT_RULES, step=step)
    tokenizer = tokenizer or source.tokenizer or None
    if tokenizer and not os.path.exists(tokenizer):
        raise ValueError(f"tokenizer {tokenizer!r} (the run's) does not exist; pass --tokenizer")
    card = hf.run_card(
        workdir, hf.hf_task_config(source.model_cfg, source.head), source.head.head,
        name=os.path.basename(os.path.abspath(output)), step=step, export_command=command,
        has_tokenizer=bool(tokenizer), results=results)
    return hf.export_task_hf(params, source.model_cfg, source.head, output,
                             tokenizer_path=tokenizer, lowercase=source.lowercase,
                             overwrite=overwrite, card=card)
