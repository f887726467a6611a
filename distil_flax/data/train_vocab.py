r"""Trains a WordPiece or SentencePiece vocabulary on a document source (or a sample of it).

    python -m distil_flax.data.train_vocab --source=bundled --kind=wordpiece \
        --vocab_size=8000 --output=runs/quickstart/vocab.txt
    python -m distil_flax.data.train_vocab --source=tfds --paths=wikipedia/20230601.en \
        --sample_documents=200000 --vocab_size=30522 --output=vocab.txt

An existing output is reused (and says so) unless --overwrite, so scripts can call this
unconditionally before training. Point `--config.data.tokenizer` at the written file. An existing
vocabulary (bert-base-uncased's `vocab.txt`, a `tokenizer.json`, a SentencePiece `.model`) needs
no training: point `data.tokenizer` at it.

Exit status: 0 when the vocabulary is written or reused; 1 with one line `error: ...` naming
the file or flag when the source, an input or the output stops it.
"""

import os
import random
import time

from absl import flags

from distil_flax import cli
from distil_flax.data import corpus
from distil_flax.data import tokenizer as tokenizer_lib

_SOURCE = flags.DEFINE_enum("source", "bundled", corpus.SOURCES, "Document source.")
_PATHS = flags.DEFINE_list("paths", [], "Files or globs (text/jsonl/parquet), or the TFDS name.")
_TEXT_FIELD = flags.DEFINE_string("text_field", "text", "Document field (jsonl/parquet/tfds).")
_TFDS_SPLIT = flags.DEFINE_string("tfds_split", "train", "TFDS split.")
_TFDS_DATA_DIR = flags.DEFINE_string("tfds_data_dir", "", "TFDS data directory.")
_SAMPLE = flags.DEFINE_integer("sample_documents", 0, "Train on a uniform random sample of this "
                               "many documents (0: all).")
_KIND = flags.DEFINE_enum("kind", "wordpiece", ["wordpiece", "sentencepiece"],
                          "wordpiece writes a BERT vocab.txt; sentencepiece a unigram .model.")
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 8000, "Target vocabulary size.")
_OUTPUT = flags.DEFINE_string("output", None, "vocab.txt path (wordpiece) or .model path or "
                              "prefix (sentencepiece).", required=True)
_LOWERCASE = flags.DEFINE_bool("lowercase", True, "Uncased normalisation.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Retrain even if the output exists.")


def output_path(kind: str, output: str) -> str:
    """The file a run writes: SentencePiece appends `.model` to a bare prefix."""
    if kind == "sentencepiece" and not output.endswith(".model"):
        return output + ".model"
    return output


def sample(documents, k: int, seed: int = 0) -> list[str]:
    """A uniform sample of k documents from a stream of unknown length, in stream order.

    Reservoir sampling (Algorithm R): one pass, memory for k documents only.
    """
    rng = random.Random(seed)
    reservoir: list[tuple[int, str]] = []
    for i, document in enumerate(documents):
        if i < k:
            reservoir.append((i, document))
        else:
            j = rng.randrange(i + 1)
            if j < k:
                reservoir[j] = (i, document)
    return [document for _, document in sorted(reservoir)]


def main(argv):
    del argv
    # A source, input or output problem ends in one `error:` line (exit status 1).
    cli.run(_train_or_reuse, sigterm_aborts=True,
            interrupted="interrupted before the vocabulary was written (nothing was); rerun the "
                        "same command")


def _train_or_reuse() -> None:
    path = output_path(_KIND.value, _OUTPUT.value)
    if os.path.exists(path) and not _OVERWRITE.value:
        tokenizer = tokenizer_lib.load_tokenizer(path, lowercase=_LOWERCASE.value)
        print(f"Reusing existing {path} (vocab size {tokenizer.vocab_size}); pass --overwrite "
              "to retrain.")
        return
    start = time.perf_counter()
    tally = corpus.Tally()
    documents = corpus.read_documents(
        _SOURCE.value, _PATHS.value, _TEXT_FIELD.value, tfds_split=_TFDS_SPLIT.value,
        tfds_data_dir=_TFDS_DATA_DIR.value, tally=tally)
    if _SAMPLE.value:
        documents = sample(documents, _SAMPLE.value)
    if _KIND.value == "wordpiece":
        tokenizer_lib.train_wordpiece(documents, _VOCAB_SIZE.value, path, _LOWERCASE.value)
    else:
        tokenizer_lib.train_sentencepiece(documents, _VOCAB_SIZE.value, path, _LOWERCASE.value)
    seconds = time.perf_counter() - start
    tokenizer = tokenizer_lib.load_tokenizer(path, lowercase=_LOWERCASE.value)
    used = min(_SAMPLE.value, tally.counts["documents"]) if _SAMPLE.value else (
        tally.counts["documents"])
    print(f"Wrote {path}: vocab size {tokenizer.vocab_size} ({_KIND.value}, source "
          f"{_SOURCE.value}, {used} of {tally.counts['documents']} documents) in "
          f"{seconds:.1f} s.")


if __name__ == "__main__":
    cli.main(main)
