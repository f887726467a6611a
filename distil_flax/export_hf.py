"""Exports a run's model for `transformers`.

    python -m distil_flax.export_hf --workdir=RUN --output=DIR

Reads RUN/config.json (the model section and the run's tokenizer), restores the checkpoint's
parameters on the CPU (latest step, or --step), and writes a folder that
`AutoModelForMaskedLM.from_pretrained(DIR)` and `AutoTokenizer.from_pretrained(DIR)` load offline:
DistilBertForMaskedLM for a DistilBERT-shaped student, else BertForMaskedLM (--head=none: the bare
encoder). See `distil_flax.hf.names` for the name maps.

A fine-tuning run (`distil_flax.finetune`) exports its task model from the best checkpoint (or
--step): DistilBertForSequenceClassification / ForQuestionAnswering / ..., or the Bert ones, with
id2label and the head's dropout in config.json, loadable by `AutoModelFor<Task>`.

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
from distil_flax.model import make_encoder


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
            "run's task model. Default: task for a fine-tuning run, else mlm."),
        "tokenizer": flags.DEFINE_string(
            "tokenizer", None, "Tokenizer file to ship; default: the run's data.tokenizer."),
        "overwrite": flags.DEFINE_bool("overwrite", False, "Replace a non-empty --output."),
    }


def _available_steps(workdir: str) -> list[int]:
    directory = checkpoint.checkpoint_dir(workdir)
    if not directory.exists():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def export_run(workdir: str, output: str, *, step: int | None = None, head: str | None = None,
               tokenizer: str | None = None, overwrite: bool = False) -> list[str]:
    """Exports the parameters of a run's checkpoint; returns the names of the files written.

    Args:
      head: "mlm", "none", or "task" (fine-tuning runs); None: "task" for a fine-tuning run,
        else "mlm".

    Raises:
      ValueError: missing workdir, config.json, checkpoint step or tokenizer, or a bad head.
    """
    config_file = os.path.join(workdir, "config.json")
    if not os.path.isdir(workdir):
        raise ValueError(f"--workdir={workdir!r} does not exist")
    if not os.path.isfile(config_file):
        raise ValueError(f"--workdir={workdir!r} is not a distil_flax run: no config.json")
    if finetune_init.is_finetuning_run(workdir):
        return _export_finetuned(workdir, output, step=step, head=head or "task",
                                 tokenizer=tokenizer, overwrite=overwrite)
    head = head or "mlm"
    if head == "task":
        raise ValueError(f"--head=task: {workdir!r} is not a fine-tuning run (no "
                         f"{finetune_init.TASK_MODEL_FILE}); use --head=mlm or --head=none")
    steps = _available_steps(workdir)
    if not steps:
        raise ValueError(f"--workdir={workdir!r} has no checkpoint (nothing under checkpoints/)")
    if step is not None and step not in steps:
        raise ValueError(f"no checkpoint step {step} in {workdir!r}; available: {steps}")

    c = config_lib.load_json(config_file)
    if not c.model.get("vocab_size"):
        raise ValueError(f"{config_file} has model.vocab_size 0: the run never resolved it")
    tokenizer = tokenizer or c.data.get("tokenizer") or None
    if tokenizer and not os.path.isfile(tokenizer):
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
    return hf.export_hf(params, c.model, output, tokenizer_path=tokenizer,
                        lowercase=c.data.get("lowercase", True), head=head, overwrite=overwrite)


def _export_finetuned(workdir: str, output: str, *, step: int | None, head: str,
                      tokenizer: str | None, overwrite: bool) -> list[str]:
    """A fine-tuning run's task model (best checkpoint, or `step`) as its transformers class."""
    if head != "task":
        raise ValueError(f"--head={head}: {workdir!r} is a fine-tuning run, which exports its "
                         "task model (--head=task)")
    mesh = partitioning.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices("cpu")[:1])
    model = finetune_init.load_finetuned(workdir, mesh, partitioning.DEFAULT_RULES, step=step)
    tokenizer = tokenizer or model.tokenizer or None
    if tokenizer and not os.path.isfile(tokenizer):
        raise ValueError(f"tokenizer {tokenizer!r} (the run's) does not exist; pass --tokenizer")
    return hf.export_task_hf(model.params, model.model_cfg, model.head, output,
                             tokenizer_path=tokenizer, lowercase=model.lowercase,
                             overwrite=overwrite)


def main(argv, flag_values: dict[str, flags.FlagHolder]):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    v = {name: holder.value for name, holder in flag_values.items()}
    # A bad flag, run or file ends in one `error:` line; an abort leaves --output as it was.
    written = cli.run(
        lambda: export_run(v["workdir"], v["output"], step=v["step"], head=v["head"],
                           tokenizer=v["tokenizer"], overwrite=v["overwrite"]),
        sigterm_aborts=True, interrupted="interrupted: --output was left as it was (an export is "
                                         "renamed into place whole); rerun the same command")
    output = os.path.abspath(v["output"])
    print(f"Wrote {output}:")
    for name in written:
        print(f"  {name}  ({os.path.getsize(os.path.join(output, name)):,} bytes)")


if __name__ == "__main__":
    cli.main(functools.partial(main, flag_values=_define_flags()))
