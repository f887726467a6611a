r"""Trains a WordPiece, SentencePiece or byte-level BPE vocabulary on a document source.

    python -m distil_flax.data.train_vocab --source=bundled --kind=wordpiece \
        --vocab_size=8000 --output=runs/quickstart/vocab.txt
    python -m distil_flax.data.train_vocab --source=tfds --paths=wikipedia/20230601.en \
        --sample_documents=200000 --vocab_size=30522 --output=vocab.txt
    python -m distil_flax.data.train_vocab --source=bundled --kind=bpe \
        --vocab_size=8000 --output=runs/quickstart/bpe

`--kind=bpe` writes a folder (vocab.json, merges.txt, tokenizer.json) with RoBERTa's special
tokens and ids, cased as RoBERTa is (--lowercase applies to wordpiece and sentencepiece only).
An existing output is reused (and says so) unless --overwrite, so scripts can call this
unconditionally before training. Point `--config.data.tokenizer` at the written file (or, for
bpe, its folder). An existing vocabulary (bert-base-uncased's `vocab.txt`, a `tokenizer.json`,
RoBERTa's `vocab.json` + `merges.txt`, a SentencePiece `.model`, or an HF model folder) needs no
training: point `data.tokenizer` at it.

Exit status: 0 when the vocabulary is written or reused; 1 with one line `error: ...` naming
the file or flag when the source, an input or the output stops it.
"""

import os
import random
import time

from absl import flags

from distil_flax.data import corpus, readers, roberta_vocab
from distil_flax.data import tokenizer as tokenizer_lib
from distil_flax.training import cli

_SOURCE = flags.DEFINE_enum("source", "bundled", corpus.SOURCES, "Document source.")
_PATHS = flags.DEFINE_list("paths", [], "Files or globs (text/jsonl/parquet), or the TFDS name.")
_TEXT_FIELD = flags.DEFINE_string("text_field", "text", "Document field (jsonl/parquet/tfds).")
_TFDS_SPLIT = flags.DEFINE_string("tfds_split", "train", "TFDS split.")
_TFDS_DATA_DIR = flags.DEFINE_string("tfds_data_dir", "", "TFDS data directory.")
_SAMPLE = flags.DEFINE_integer("sample_documents", 0, "Train on a uniform random sample of this "
                               "many documents (0: all).")
_KIND = flags.DEFINE_enum("kind", "wordpiece", ["wordpiece", "sentencepiece", "bpe"],
                          "wordpiece writes a BERT vocab.txt; sentencepiece a unigram .model; "
                          "bpe a RoBERTa-style byte-level BPE folder.")
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 8000, "Target vocabulary size.")
_OUTPUT = flags.DEFINE_string("output", None, "vocab.txt path (wordpiece), .model path or "
                              "prefix (sentencepiece), or folder (bpe).", required=True)
_LOWERCASE = flags.DEFINE_bool("lowercase", True, "Uncased normalisation (wordpiece and "
                               "sentencepiece; bpe is cased, as RoBERTa).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Retrain even if the output exists.")


def output_path(kind: str, output: str) -> str:
    """The file a run writes: SentencePiece appends `.model` to a bare prefix; bpe's folder is
    whole once its tokenizer.json, written last, is there."""
    if kind == "sentencepiece" and not output.endswith(".model"):
        return output + ".model"
    if kind == "bpe":
        return os.path.join(output, "tokenizer.json")
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
    cli.run(lambda: print(train_or_reuse(
        _KIND.value, _OUTPUT.value, _VOCAB_SIZE.value, source=_SOURCE.value, paths=_PATHS.value,
        text_field=_TEXT_FIELD.value, tfds_split=_TFDS_SPLIT.value,
        tfds_data_dir=_TFDS_DATA_DIR.value, sample_documents=_SAMPLE.value,
        lowercase=_LOWERCASE.value, overwrite=_OVERWRITE.value)),
        sigterm_aborts=True,
        interrupted="interrupted before the vocabulary was written (nothing was); rerun the "
                    "same command")


def train_or_reuse(kind: str, output: str, vocab_size: int, *, source: str = "bundled",
                   paths=(), text_field: str = "text", tfds_split: str = "train",
                   tfds_data_dir: str = "", sample_documents: int = 0, lowercase: bool = True,
                   overwrite: bool = False) -> str:
    """What the command does (its flags as arguments); returns the line it prints.

    Raises:
      ValueError, OSError: a source, input or output problem (`main` prints one `error:` line).
    """
    if kind == "bpe" and output.endswith(tokenizer_lib.SUFFIXES):
        raise ValueError(f"--kind=bpe writes a folder (vocab.json, merges.txt, tokenizer.json), "
                         f"but --output={output} names a file; give a folder.")
    path = output_path(kind, output)
    if os.path.exists(path) and not overwrite:
        tokenizer = tokenizer_lib.load_tokenizer(path, lowercase=lowercase)
        return (f"Reusing existing {path} (vocab size {tokenizer.vocab_size}); pass --overwrite "
                "to retrain.")
    start = time.perf_counter()
    tally = corpus.Tally()
    documents = readers.read_documents(source, list(paths), text_field, tfds_split=tfds_split,
                                      tfds_data_dir=tfds_data_dir, tally=tally)
    if sample_documents:
        documents = sample(documents, sample_documents)
    if kind == "wordpiece":
        tokenizer_lib.train_wordpiece(documents, vocab_size, path, lowercase)
    elif kind == "sentencepiece":
        tokenizer_lib.train_sentencepiece(documents, vocab_size, path, lowercase)
    elif kind == "bpe":
        roberta_vocab.train_bpe(documents, vocab_size, output)
    else:
        raise ValueError(f"Unknown vocabulary kind {kind!r}: expected wordpiece, sentencepiece "
                         "or bpe.")
    seconds = time.perf_counter() - start
    tokenizer = tokenizer_lib.load_tokenizer(path, lowercase=lowercase)
    used = min(sample_documents, tally.counts["documents"]) if sample_documents else (
        tally.counts["documents"])
    return (f"Wrote {path}: vocab size {tokenizer.vocab_size} ({kind}, source {source}, {used} "
            f"of {tally.counts['documents']} documents) in {seconds:.1f} s.")


if __name__ == "__main__":
    cli.main(main)
