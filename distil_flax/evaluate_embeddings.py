r"""Evaluates a student's sentence embeddings beside its teacher's, on files a user brings.

    python -m distil_flax.evaluate_embeddings --student=runs/embed \
        --teacher=hf://sentence-transformers/all-MiniLM-L6-v2 --sts=pairs.tsv \
        --labelled=labelled.tsv --text=sentences.txt --output=report.json

Models: a distil_flax workdir (config.json + checkpoints; its latest params), a fine-tuning
workdir (its best encoder), or a Hugging Face BERT/DistilBERT folder. Sentences are packed
several to a row and pooled per segment (`embeddings/embed.py`); files are read by
`embeddings/files.py`, metrics computed by `embeddings/metrics.py`; --pooling=auto takes the teacher
folder's sentence-transformers `1_Pooling/config.json`, else mean pooling. The tokenizer is the
teacher's (its folder's vocab.txt / tokenizer.json, or its run's data.tokenizer) unless
--tokenizer names one.

Metrics, each on the files given:
  sts_spearman          --sts: lines `sentence1 <TAB> sentence2 <TAB> score` (a first line whose
                        score does not parse is a header; a GLUE STS-B header naming columns
                        sentence1, sentence2, score is read by name). Spearman of the pair's
                        cosine similarity against the gold score.
  probe_accuracy        --labelled: lines `label <TAB> text` (or a header naming columns label
                        and text / sentence, as GLUE SST-2). Accuracy of a multinomial logistic
                        regression on frozen, standardised embeddings, stratified --folds-fold
                        cross-validation (scikit-learn's LogisticRegression: its objective, L2
                        with C = 1, and its L-BFGS-B stopping rule).
  text_cosine_spearman  --text: one sentence or passage a line. Agreement with the teacher:
                        Spearman between student and teacher cosine similarities of every pair
                        of lines (a seeded sample of MAX_PAIRS pairs when there are more).
  text_recall@10        the fraction of each sentence's 10 nearest teacher neighbours (itself
                        excluded) that are among its 10 nearest student neighbours.

Rows: the teacher; the init-only student — the teacher with layers removed as the student run
started (`student_init.init_from_teacher` with the run's init.layer_map, or pruned as the run's
pruning.json records), when the student is a distil_flax distillation workdir — so that what
distillation gained is visible; and the student; then each --onnx file, an ONNX export of the
student (`export_onnx`, fp32 or int8), run by ONNX Runtime on the same sentences one to a row, so
that what quantisation costs is measured the same way. The table goes to stdout and, with
--output, the same numbers to JSON with what was evaluated (files, sizes, pooling, tokenizer). A
bad file or model ends in one `error:` line.

Each text is read up to --max_len tokens: by default as far as the teacher reads it (its
max_seq_length), not a student's training row length, so that a passage is compared whole; the
report's `data.<file>.truncated` counts the texts cut there.
"""

import functools
import os

from absl import app, flags

from distil_flax.embeddings.evaluate import evaluate, format_table
from distil_flax.training import cli


def _define_flags() -> dict[str, flags.FlagHolder]:
    """The CLI's flags, defined only when run as a program, so that this module imports beside
    the other commands (which define --output, --tokenizer …) in notebooks and tests."""
    return {
        "student": flags.DEFINE_string(
            "student", None, "distil_flax workdir or Hugging Face folder of the student.",
            required=True),
        "teacher": flags.DEFINE_string(
            "teacher", None, "Hugging Face folder or distil_flax workdir of the teacher.",
            required=True),
        "sts": flags.DEFINE_string(
            "sts", None, "TSV of sentence1 <TAB> sentence2 <TAB> gold score."),
        "labelled": flags.DEFINE_string("labelled", None, "TSV of label <TAB> text."),
        "text": flags.DEFINE_string("text", None, "Text file, one sentence per line."),
        "tokenizer": flags.DEFINE_string(
            "tokenizer", None, "vocab.txt / tokenizer.json / .model; default: the teacher's."),
        "lowercase": flags.DEFINE_bool(
            "lowercase", None, "Uncased normalisation for a vocab.txt; default: the teacher's "
            "(its folder's tokenizer_config.json do_lower_case, or its run's data.lowercase)."),
        "pooling": flags.DEFINE_enum(
            "pooling", "auto", ["auto", "mean", "cls"],
            "auto: the teacher folder's sentence-transformers 1_Pooling/config.json, else mean."),
        "folds": flags.DEFINE_integer("folds", 5, "Cross-validation folds of the probe."),
        "neighbours": flags.DEFINE_integer("neighbours", 10, "k of text_recall@k."),
        "max_len": flags.DEFINE_integer(
            "max_len", 0, "Tokens per text, [CLS] and [SEP] included (longer ones are cut, and "
            "counted), and the packed row length; 0: the teacher's sentence-transformers "
            "max_seq_length (256 for all-MiniLM-L6-v2), else its positions (at most 512)."),
        "batch_size": flags.DEFINE_integer("batch_size", 64, "Packed rows per forward pass."),
        "dtype": flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                                   "Compute dtype of the encoders."),
        "init_only": flags.DEFINE_bool(
            "init_only", True, "Also evaluate the student as its run started (teacher layers "
            "init.layer_map, or the teacher pruned as its pruning.json says), when the student "
            "is a distil_flax distillation workdir."),
        "seed": flags.DEFINE_integer("seed", 0, "Seeds the probe's folds and pair sampling."),
        "onnx": flags.DEFINE_string(
            "onnx", None, "Comma-separated ONNX exports of the student (export_onnx: fp32, "
            "int8): each is scored as another row, on the same sentences."),
        "output": flags.DEFINE_string("output", None, "Write the report here as JSON."),
    }


def main(argv, flag_values: dict[str, flags.FlagHolder]):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    v = {name: holder.value for name, holder in flag_values.items()}
    report = cli.run(lambda: evaluate(**v), sigterm_aborts=True,
                     interrupted="interrupted: nothing was written (--output is written last)")
    print(format_table(report))
    if v["output"]:
        print(f"Wrote {os.path.abspath(v['output'])}")


if __name__ == "__main__":
    cli.main(functools.partial(main, flag_values=_define_flags()))
