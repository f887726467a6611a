r"""Trains a WordPiece or SentencePiece vocabulary on a document source.

    python -m distil_flax.data.train_vocab --source=bundled --kind=wordpiece \
        --vocab_size=8000 --output=runs/quickstart/vocab.txt

An existing output is reused (and says so) unless --overwrite, so scripts can call this
unconditionally before training. Point `--config.data.tokenizer` at the written file.
"""

import os
import time

from absl import app
from absl import flags

from distil_flax.data import corpus
from distil_flax.data import tokenizer as tokenizer_lib

_SOURCE = flags.DEFINE_enum("source", "bundled", corpus.SOURCES, "Document source.")
_PATHS = flags.DEFINE_list("paths", [], "Files or globs for the text/jsonl sources.")
_JSONL_FIELD = flags.DEFINE_string("jsonl_field", "text", "Document field of jsonl sources.")
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


def main(argv):
    del argv
    path = output_path(_KIND.value, _OUTPUT.value)
    if os.path.exists(path) and not _OVERWRITE.value:
        tokenizer = tokenizer_lib.load_tokenizer(path, lowercase=_LOWERCASE.value)
        print(f"Reusing existing {path} (vocab size {tokenizer.vocab_size}); pass --overwrite "
              "to retrain.")
        return
    start = time.perf_counter()
    documents = corpus.read_documents(_SOURCE.value, _PATHS.value, _JSONL_FIELD.value)
    if _KIND.value == "wordpiece":
        tokenizer_lib.train_wordpiece(documents, _VOCAB_SIZE.value, path, _LOWERCASE.value)
    else:
        tokenizer_lib.train_sentencepiece(documents, _VOCAB_SIZE.value, path, _LOWERCASE.value)
    seconds = time.perf_counter() - start
    tokenizer = tokenizer_lib.load_tokenizer(path, lowercase=_LOWERCASE.value)
    print(f"Wrote {path}: vocab size {tokenizer.vocab_size} ({_KIND.value}, "
          f"source {_SOURCE.value}) in {seconds:.1f} s.")


if __name__ == "__main__":
    app.run(main)
