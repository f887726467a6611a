"""Exports a run's model for `transformers`.

    python -m distil_flax.export_hf --workdir=RUN --output=DIR

Reads RUN/config.json (the model section and the run's tokenizer), restores the checkpoint's
parameters on the CPU (latest step, or --step), and writes a folder that
`AutoModelForMaskedLM.from_pretrained(DIR)` and `AutoTokenizer.from_pretrained(DIR)` load offline:
DistilBertForMaskedLM for a DistilBERT-shaped student, RobertaForMaskedLM / XLMRobertaForMaskedLM
for a RoBERTa-family one (model.head_style), else BertForMaskedLM (--head=none: the bare encoder).
See `distil_flax.hf.names` for the name maps.

A fine-tuning run (`distil_flax.finetune`) exports its task model from the best checkpoint (or
--step): DistilBertForSequenceClassification / ForQuestionAnswering / ..., or the Bert ones, with
id2label and the head's dropout in config.json, loadable by `AutoModelFor<Task>`.

Every export carries a model card, README.md (`distil_flax.hf.card`): the recipe, held-out
metrics and the commands that reproduce the run, read from the workdir.

--format=sentence-transformers writes the bare encoder in the layout `SentenceTransformer(DIR)`
loads (`distil_flax.hf.st_layout`): modules.json (Transformer → Pooling [→ Normalize]),
1_Pooling/config.json and sentence_bert_config.json beside the HF files. The pooling is --pooling,
else the run's loss.embeddings.pooling, else (auto) the teacher folder's sentence-transformers
pooling, else mean; Normalize is added when the teacher folder has it; max_seq_length is the run's
data.seq_len. Its `.encode(sentences)` equals `embeddings.embed` with that pooling.

    python -m distil_flax.export_hf --workdir=runs/quickstart/student --output=runs/quickstart/hf
"""

import functools
import os

import jax
from absl import app, flags, logging

from distil_flax import checkpoint, cli, hf, partitioning
from distil_flax import config as config_lib
from distil_flax import model as model_lib
from distil_flax.downstream import init as finetune_init
from distil_flax.hf import st_layout
from distil_flax.model import make_encoder
from distil_flax.pooling import POOLINGS


def _define_flags() -> dict[str, flags.FlagHolder]:
    """The CLI's flags, defined only when run as a program: `main.py` also defines --workdir, and
    both modules must stay importable side by side (notebooks, tests)."""
    return {
        "workdir": flags.DEFINE_string(
            "workdir", None, "Run directory holding config.json and checkpoints.", required=True),
        "output": flags.DEFINE_string(
            "output", None, "Folder to write (must not exist, or be empty).", required=True),
        "step": flags.DEFINE_integer(
            "step", None, "Checkpoint step to export; default: latest (a fine-tuning run: best)."),
        "head": flags.DEFINE_enum(
            "head", None, ["mlm", "none", "task"],
            "mlm: *ForMaskedLM; none: the bare BertModel / DistilBertModel; task: a fine-tuning "
            "run's task model. Default: task for a fine-tuning run; mlm when the run's loss "
            "trained the MLM head; else none."),
        "tokenizer": flags.DEFINE_string(
            "tokenizer", None, "Tokenizer file (or folder) to ship; default: the run's "
                               "data.tokenizer."),
        "overwrite": flags.DEFINE_bool("overwrite", False, "Replace a non-empty --output."),
        "format": flags.DEFINE_enum(
            "format", "hf", list(FORMATS),
            "hf: a transformers folder; sentence-transformers: the bare encoder plus the "
            "sentence-transformers modules (Pooling, Normalize), loadable by "
            "SentenceTransformer(DIR)."),
        "pooling": flags.DEFINE_enum(
            "pooling", None, ["auto", "mean", "cls"],
            "--format=sentence-transformers: the sentence pooling. Default: the run's "
            "loss.embeddings.pooling; auto: the teacher folder's sentence-transformers pooling, "
            "else mean."),
    }


FORMATS = ("hf", "sentence-transformers")


def _available_steps(workdir: str) -> list[int]:
    directory = checkpoint.checkpoint_dir(workdir)
    if not directory.exists():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def export_run(workdir: str, output: str, *, step: int | None = None, head: str | None = None,
               tokenizer: str | None = None, overwrite: bool = False,
               output_format: str = "hf", pooling: str | None = None) -> list[str]:
    """Exports the parameters of a run's checkpoint; returns the names of the files written.

    Args:
      head: "mlm", "none", or "task" (fine-tuning runs); None: "task" for a fine-tuning run,
        "mlm" for a run whose loss trained the MLM head, else "none" (TinyBERT's and MiniLM's
        recipes leave it as initialised).
      output_format: "hf", or "sentence-transformers" (the bare encoder, head "none", in the
        layout `SentenceTransformer` loads; see the module docstring).
      pooling: the sentence-transformers export's pooling: "mean", "cls", or "auto" (the teacher
        folder's); None: the run's loss.embeddings.pooling (auto when it has none).

    Raises:
      ValueError: missing workdir, config.json, checkpoint step or tokenizer, a bad head, or a
        sentence-transformers export of a fine-tuning run or with an MLM head.
    """
    if output_format not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {output_format!r}")
    sentence = output_format == "sentence-transformers"
    if pooling is not None and not sentence:
        raise ValueError("--pooling sets the pooling of --format=sentence-transformers")
    if sentence and head not in (None, "none"):
        raise ValueError(f"--head={head}: --format=sentence-transformers exports the bare "
                         "encoder (--head=none)")
    config_file = os.path.join(workdir, "config.json")
    if not os.path.isdir(workdir):
        raise ValueError(f"--workdir={workdir!r} does not exist")
    if not os.path.isfile(config_file):
        raise ValueError(f"--workdir={workdir!r} is not a distil_flax run: no config.json")
    if finetune_init.is_finetuning_run(workdir):
        if sentence:
            raise ValueError(f"{workdir!r} is a fine-tuning run, which exports its task model; "
                             "--format=sentence-transformers exports a distillation run's encoder")
        return _export_finetuned(workdir, output, step=step, head=head or "task",
                                 tokenizer=tokenizer, overwrite=overwrite)
    c = config_lib.load_json(config_file)
    loss = c.get("loss", {})
    head = head or ("mlm" if loss.get("alpha_mlm", 1) or loss.get("alpha_ce", 1) else "none")
    if sentence:
        head = "none"
    if head == "task":
        raise ValueError(f"--head=task: {workdir!r} is not a fine-tuning run (no "
                         f"{finetune_init.TASK_MODEL_FILE}); use --head=mlm or --head=none")
    steps = _available_steps(workdir)
    if not steps:
        raise ValueError(f"--workdir={workdir!r} has no checkpoint (nothing under checkpoints/)")
    if step is not None and step not in steps:
        raise ValueError(f"no checkpoint step {step} in {workdir!r}; available: {steps}")

    command = _command(workdir=workdir, output=output, step=step, head=head, tokenizer=tokenizer,
                       overwrite=overwrite, output_format=output_format, pooling=pooling)
    # Before the restore: a bad pooling or a teacher folder that cannot be read fails fast.
    sentence_setup = _sentence_setup(c, pooling) if sentence else {}
    if not c.model.get("vocab_size"):
        raise ValueError(f"{config_file} has model.vocab_size 0: the run never resolved it")
    tokenizer = tokenizer or c.data.get("tokenizer") or None
    if tokenizer and not os.path.exists(tokenizer):  # A file, or a folder holding one.
        raise ValueError(f"tokenizer {tokenizer!r} (the run's data.tokenizer) does not exist; "
                         "pass --tokenizer=PATH")
    model = make_encoder(c.model)
    # One CPU device: the export never needs an accelerator, whatever the run was sharded on.
    mesh = partitioning.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices("cpu")[:1])
    abstract = partitioning.abstract_params(model_lib.init_fn(model), mesh,
                                            partitioning.DEFAULT_RULES)
    params, restored_step = checkpoint.restore_params(workdir, abstract, step)
    logging.info("Restored step %d of %s.", restored_step, workdir)
    if not tokenizer:
        logging.warning("The run names no tokenizer: exporting the model only.")
    card = hf.run_card(workdir, hf.hf_config(c.model, head=head), head,
                       name=os.path.basename(os.path.abspath(output)), step=restored_step,
                       export_command=command, has_tokenizer=bool(tokenizer))
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
             pooling: str | None = None) -> list[str]:
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
    return argv + (["--overwrite"] if overwrite else [])


def _export_finetuned(workdir: str, output: str, *, step: int | None, head: str,
                      tokenizer: str | None, overwrite: bool) -> list[str]:
    """A fine-tuning run's task model (best checkpoint, or `step`) as its transformers class."""
    if head != "task":
        raise ValueError(f"--head={head}: {workdir!r} is a fine-tuning run, which exports its "
                         "task model (--head=task)")
    mesh = partitioning.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices("cpu")[:1])
    command = _command(workdir=workdir, output=output, step=step, head=None, tokenizer=tokenizer,
                       overwrite=overwrite)
    model = finetune_init.load_finetuned(workdir, mesh, partitioning.DEFAULT_RULES, step=step)
    tokenizer = tokenizer or model.tokenizer or None
    if tokenizer and not os.path.exists(tokenizer):
        raise ValueError(f"tokenizer {tokenizer!r} (the run's) does not exist; pass --tokenizer")
    card = hf.run_card(
        workdir, hf.hf_task_config(model.model_cfg, model.head), model.head.head,
        name=os.path.basename(os.path.abspath(output)), step=step, export_command=command,
        has_tokenizer=bool(tokenizer))
    return hf.export_task_hf(model.params, model.model_cfg, model.head, output,
                             tokenizer_path=tokenizer, lowercase=model.lowercase,
                             overwrite=overwrite, card=card)


def main(argv, flag_values: dict[str, flags.FlagHolder]):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    v = {name: holder.value for name, holder in flag_values.items()}
    # A bad flag, run or file ends in one `error:` line; an abort leaves --output as it was.
    written = cli.run(
        lambda: export_run(v["workdir"], v["output"], step=v["step"], head=v["head"],
                           tokenizer=v["tokenizer"], overwrite=v["overwrite"],
                           output_format=v["format"], pooling=v["pooling"]),
        sigterm_aborts=True, interrupted="interrupted: --output was left as it was (an export is "
                                         "renamed into place whole); rerun the same command")
    output = os.path.abspath(v["output"])
    print(f"Wrote {output}:")
    for name in written:
        print(f"  {name}  ({os.path.getsize(os.path.join(output, name)):,} bytes)")


if __name__ == "__main__":
    cli.main(functools.partial(main, flag_values=_define_flags()))
