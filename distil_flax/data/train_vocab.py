r"""Trains a WordPiece, SentencePiece or byte-level BPE vocabulary on a document source (the
bundled corpus, text / JSONL / Parquet files or a TFDS dataset) and writes it where a run's
`data.tokenizer` can point.

    python -m distil_flax.data.train_vocab --source=bundled --kind=wordpiece \
        --vocab_size=8000 --output=runs/quickstart/vocab.txt

A large corpus trains on a sample: `--source=tfds --paths=wikipedia/20230601.en
--sample_documents=200000 --vocab_size=30522` (BERT's size). `--kind=bpe` writes a folder
(vocab.json, merges.txt, tokenizer.json) with RoBERTa's special tokens and ids, cased as RoBERTa
is (--lowercase applies to wordpiece and sentencepiece only).
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
import re
import time

from absl import flags

from distil_flax.data import corpus, readers, roberta_vocab
from distil_flax.data import tokenizer as tokenizer_lib
from distil_flax.training import cli, progress

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

# What each kind holds before it learns a token: its special tokens and the least alphabet it
# starts from. The trainers keep these whatever the target (bpe comes out at 261 tokens for 0,
# wordpiece at the corpus's alphabet) or fail on them (sentencepiece), so --vocab_size must
# leave room for at least one learned token beyond them.
_SPECIALS = len(tokenizer_lib.SPECIAL_TOKENS)  # bpe's <s> <pad> </s> <unk> <mask> are as many.
_ALPHABET = {"wordpiece": (1, "a character"),
             "sentencepiece": (2, "'▁' (a word start), a character"),
             "bpe": (256, "the 256 bytes")}
MIN_VOCAB_SIZE = {kind: _SPECIALS + size + 1 for kind, (size, _) in _ALPHABET.items()}
# Well above the largest vocabularies released (~256k). Past it the trainers fail hard: bpe's
# reserves memory for every target token up front (it aborts at 3e9), sentencepiece's rejects
# more than an int32 and spins at 2**31 - 1.
MAX_VOCAB_SIZE = 1 << 20

_VOCAB_SIZE = flags.DEFINE_integer(
    "vocab_size", 8000, "Target vocabulary size, special tokens included: at least "
    + ", ".join(f"{size} for {kind}" for kind, size in MIN_VOCAB_SIZE.items())
    + f" (a learned token beyond the special tokens and alphabet); at most {MAX_VOCAB_SIZE}.")
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


def check_vocab_size(kind: str, vocab_size: int) -> None:
    """Raises ValueError, naming the bound, if `vocab_size` is out of range for `kind`."""
    if kind in MIN_VOCAB_SIZE and vocab_size < MIN_VOCAB_SIZE[kind]:
        raise ValueError(f"--vocab_size={vocab_size} is too small for --kind={kind}: it needs at "
                         f"least {MIN_VOCAB_SIZE[kind]} ({_SPECIALS} special tokens, "
                         f"{_ALPHABET[kind][1]} and one learned token).")
    if vocab_size > MAX_VOCAB_SIZE:
        raise ValueError(f"--vocab_size={vocab_size} is too large for --kind={kind}: it must be "
                         f"at most {MAX_VOCAB_SIZE}.")


def _sentencepiece_problem(message: str, vocab_size: int) -> ValueError:
    """What SentencePiece's failed check (`INTERNAL: src/....cc(N) [check] text`) means here."""
    if needed := re.search(r"smaller than required_chars\. \d+ vs (\d+)", message):
        return ValueError(
            f"--vocab_size={vocab_size} is too small for this corpus: --kind=sentencepiece needs "
            f"at least {needed[1]} ({_SPECIALS} special pieces, '▁' and the characters making "
            "up 99.95% of the text).")
    if "!sentences_.empty()" in message:  # Its max_sentence_length, set by train_sentencepiece.
        return ValueError("SentencePiece found no sentence to train on: it skips those over "
                          "16384 characters, and every sentence of this corpus is longer.")
    return ValueError(f"SentencePiece could not train on this corpus: {message.strip()}")


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
    check_vocab_size(kind, vocab_size)  # Before a corpus is read, which can take hours.
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
    # The trainers read the documents once, then learn the vocabulary from their counts.
    documents = progress.track(documents, progress.Progress("read", None, "documents"))
    if sample_documents:
        documents = sample(documents, sample_documents)
    if kind == "wordpiece":
        tokenizer_lib.train_wordpiece(documents, vocab_size, path, lowercase)
    elif kind == "sentencepiece":
        try:
            tokenizer_lib.train_sentencepiece(documents, vocab_size, path, lowercase)
        except RuntimeError as error:  # A failed check in SentencePiece's C++ trainer.
            raise _sentencepiece_problem(str(error), vocab_size) from None
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
