"""Exports a distil_flax run's model as a folder that `transformers` (or sentence-transformers)
loads offline, with a model card that states the run's recipe, metrics and commands.

    python -m distil_flax.export_hf --workdir=runs/quickstart/student --output=runs/quickstart/hf

Reads RUN/config.json (the model section and the run's tokenizer), restores the checkpoint's
parameters on the CPU (latest step, or --step), and writes a folder that
`AutoModelForMaskedLM.from_pretrained(DIR)` and `AutoTokenizer.from_pretrained(DIR)` load offline:
DistilBertForMaskedLM for a DistilBERT-shaped student, RobertaForMaskedLM / XLMRobertaForMaskedLM
for a RoBERTa-family one (model.head_style), else BertForMaskedLM (--head=none: the bare encoder).
See `distil_flax.interop.hf.names` for the name maps.

A fine-tuning run (`distil_flax.finetune`) exports its task model from the best checkpoint (or
--step): DistilBertForSequenceClassification / ForQuestionAnswering / ..., or the Bert ones, with
id2label and the head's dropout in config.json, loadable by `AutoModelFor<Task>`.

Every export carries a model card, README.md (`distil_flax.interop.hf.card`): the recipe, held-out
metrics and the commands that reproduce the run, read from the workdir. Its metadata's
`model-index` states the results as the Hub reads them (`distil_flax.interop.hf.model_index`): the
run's own (a fine-tuning run's best.json, a distillation's held-out masked-LM metrics when the MLM
head is exported), and those of --results=FILE[,FILE]: a GLUE suite table (glue.json of
`distil_flax.glue`, or its workdir) or an embedding evaluation report (`evaluate_embeddings
--output`), each known by its content; a file that is missing or of neither kind stops the export.

--format=sentence-transformers writes the bare encoder in the layout `SentenceTransformer(DIR)`
loads (`distil_flax.interop.sentence_transformers`): modules.json (Transformer → Pooling [→
Normalize]), 1_Pooling/config.json and sentence_bert_config.json beside the HF files. The pooling is
--pooling, else the run's loss.embeddings.pooling, else (auto) the teacher folder's
sentence-transformers pooling, else mean; Normalize is added when the teacher folder has it;
max_seq_length is the run's data.seq_len. Its `.encode(sentences)` equals `embeddings.embed` with
that pooling.
"""
import functools
import os

from absl import app, flags

from distil_flax.interop.export import FORMATS, export_run
from distil_flax.training import cli


def _define_flags() -> dict[str, flags.FlagHolder]:
    """The CLI's flags, defined only when run as a program: `main` also defines --workdir, and
    both commands must stay importable side by side (notebooks, tests)."""
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
        "results": flags.DEFINE_list(
            "results", [], "Results files for the model card's model-index: a GLUE suite table "
            "(glue.json, or its folder) or an embedding evaluation report (evaluate_embeddings "
            "--output)."),
    }


def main(argv, flag_values: dict[str, flags.FlagHolder]):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    v = {name: holder.value for name, holder in flag_values.items()}
    # A bad flag, run or file ends in one `error:` line; an abort leaves --output as it was.
    written = cli.run(
        lambda: export_run(v["workdir"], v["output"], step=v["step"], head=v["head"],
                           tokenizer=v["tokenizer"], overwrite=v["overwrite"],
                           output_format=v["format"], pooling=v["pooling"],
                           results=v["results"]),
        sigterm_aborts=True, interrupted="interrupted: --output was left as it was (an export is "
                                         "renamed into place whole); rerun the same command")
    output = os.path.abspath(v["output"])
    print(f"Wrote {output}:")
    for name in written:
        print(f"  {name}  ({os.path.getsize(os.path.join(output, name)):,} bytes)")


if __name__ == "__main__":
    cli.main(functools.partial(main, flag_values=_define_flags()))
