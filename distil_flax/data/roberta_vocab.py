"""The RoBERTa family's vocabulary files as `tokenizers` backends, and byte-level BPE training.

Two formats that `tokenizer.load_tokenizer` cannot read as written:
  * byte-level BPE as `vocab.json` + `merges.txt` (RoBERTa, GPT-2): built here exactly as
    `transformers.RobertaTokenizer` builds it (byte-level pre-tokeniser and decoder, RoBERTa's
    post-processor for its trimmed offsets), with `<s> <pad> </s> <unk> <mask>` registered as
    special tokens so that they are never split and never masked;
  * XLM-R's `sentencepiece.bpe.model` (a SentencePiece unigram model despite its name), whose ids
    fairseq shifts: `<s>`=0, `<pad>`=1, `</s>`=2, `<unk>`=3, SentencePiece's piece i at i + 1,
    `<mask>` last. Converted into a `tokenizers` Unigram model with those ids, so every
    consumer (packing, SQuAD's character offsets) sees one kind of backend.

Trained vocabularies use RoBERTa's ids: `<s>`=0, `<pad>`=1, `</s>`=2, `<unk>`=3 and `<mask>` the
last id, as in roberta-base (where it is 50264).
"""

import json
import os
import shutil
from collections.abc import Iterable

import tokenizers
from tokenizers import (
    AddedToken,
    Regex,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

from distil_flax.training import atomic

# RoBERTa's special tokens in id order; <mask> comes after every learned token.
BOS, PAD, EOS, UNK, MASK = "<s>", "<pad>", "</s>", "<unk>", "<mask>"
LEADING_SPECIALS = (BOS, PAD, EOS, UNK)

# The files `train_bpe` writes; tokenizer.json last, so that its presence means a whole folder.
BPE_FILES = ("vocab.json", "merges.txt", "tokenizer.json")

# SentencePiece's ModelProto.TrainerSpec.ModelType.UNIGRAM.
_SPM_UNIGRAM = 1


def _special(token: str) -> AddedToken:
    # roberta-base's tokenizer.json lets <mask> absorb the space before it ("a <mask>"), so that
    # a masked word reads as the word would, space included.
    return AddedToken(token, lstrip=token == MASK, rstrip=False, normalized=False, special=True)


def _byte_level_bpe(vocab: dict[str, int], merges: list[tuple[str, str]]) -> tokenizers.Tokenizer:
    """`vocab` and `merges` behind RoBERTa's pre-tokeniser, decoder and post-processor."""
    tokenizer = tokenizers.Tokenizer(models.BPE(
        vocab, merges, dropout=None, continuing_subword_prefix="", end_of_word_suffix="",
        fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = [t for t in (*LEADING_SPECIALS, MASK) if t in vocab]
    tokenizer.add_special_tokens([_special(t) for t in specials])
    if BOS in vocab and EOS in vocab:
        # Offsets without the spaces byte-level tokens carry, as RobertaTokenizerFast reports
        # them (SQuAD maps answers through them); applied even without special tokens.
        tokenizer.post_processor = processors.RobertaProcessing(
            (EOS, vocab[EOS]), (BOS, vocab[BOS]), trim_offsets=True, add_prefix_space=False)
    return tokenizer


def load_bpe(vocab_path: str, merges_path: str) -> tokenizers.Tokenizer:
    """A byte-level BPE tokenizer from GPT-2/RoBERTa's `vocab.json` and `merges.txt`.

    Raises:
      ValueError: a file the BPE model cannot read (the message names both files).
    """
    try:
        return _byte_level_bpe(*models.BPE.read_file(vocab_path, merges_path))
    except Exception as error:  # The Rust library raises a bare Exception.
        raise ValueError(f"{vocab_path!r} and {merges_path!r} are not a byte-level BPE "
                         f"vocabulary (vocab.json + merges.txt): {error}") from None


def train_bpe(documents: Iterable[str], vocab_size: int, output: str, *,
              min_frequency: int = 2) -> str:
    """Trains a byte-level BPE vocabulary with RoBERTa's special tokens and ids.

    The folder gets `vocab.json` and `merges.txt` (what RoBERTa ships; `<mask>` included) and
    the equivalent `tokenizer.json`; `load_tokenizer` reads the folder or any of them. Text is
    cased, as RoBERTa's. Same documents, same files (measured: the trainer breaks ties
    deterministically once the 256-byte alphabet is given up front).

    Args:
      documents: training text, one document per item.
      vocab_size: target size, the 256 bytes and 5 special tokens included; fewer come out when
        no pair occurs `min_frequency` times any more.
      output: the folder to write; created if needed. Each file is replaced whole.
      min_frequency: a pair must occur at least this often to be merged.

    Returns:
      The path of the written `tokenizer.json`.
    """
    output = os.fspath(output)
    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=max(vocab_size - 1, 0), min_frequency=min_frequency,  # -1: room for <mask>.
        special_tokens=list(LEADING_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(documents, trainer)
    learned = json.loads(tokenizer.to_str())["model"]
    vocab = dict(learned["vocab"])
    vocab[MASK] = len(vocab)  # Last, as in roberta-base; in vocab.json, as RoBERTa ships it.
    merges = [tuple(pair.split(" ", 1)) if isinstance(pair, str) else tuple(pair)
              for pair in learned["merges"]]  # Older tokenizers write "a b" strings.
    tokenizer = _byte_level_bpe(vocab, merges)

    os.makedirs(output, exist_ok=True)
    # The library saves into a folder: a staging one (what a killed run left is removed first),
    # whose files are then renamed into place one by one.
    atomic.remove_stale(output, "bpe")
    staging = atomic.temp_path(os.path.join(output, "bpe"))
    os.mkdir(staging)
    try:
        tokenizer.model.save(staging)
        tokenizer.save(os.path.join(staging, "tokenizer.json"))
        for name in BPE_FILES:
            atomic.commit(os.path.join(staging, name), os.path.join(output, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return os.path.join(output, "tokenizer.json")


def load_xlmr_sentencepiece(path: str) -> tokenizers.Tokenizer:
    """XLM-R's `sentencepiece.bpe.model` as a Unigram tokenizer with fairseq's ids.

    Encodes as SentencePiece does (its normaliser spec: precompiled NFKC map, extra spaces
    removed, a dummy "▁" prefix), each id shifted as `XLMRobertaTokenizer` shifts it.

    Raises:
      ValueError: not a SentencePiece unigram model, or not laid out as XLM-R's (`<unk>`, `<s>`,
        `</s>` first).
    """
    try:
        from google.protobuf.message import DecodeError
        from sentencepiece import sentencepiece_model_pb2
    except ImportError:
        raise ValueError(f"Reading {path!r} needs protobuf (pip install protobuf).") from None
    proto = sentencepiece_model_pb2.ModelProto()
    with open(path, "rb") as f:
        try:
            proto.ParseFromString(f.read())
        except DecodeError as error:
            raise ValueError(f"{path!r} is not a SentencePiece model: {error}") from None
    first = [p.piece for p in proto.pieces[:3]]
    if proto.trainer_spec.model_type != _SPM_UNIGRAM or first != [UNK, BOS, EOS]:
        raise ValueError(f"{path!r} is not laid out as XLM-R's sentencepiece.bpe.model (a "
                         f"unigram model starting <unk>, <s>, </s>; this one starts {first}).")
    vocab = ([(t, 0.0) for t in LEADING_SPECIALS]
             + [(p.piece, p.score) for p in proto.pieces[3:]] + [(MASK, 0.0)])
    tokenizer = tokenizers.Tokenizer(models.Unigram(
        vocab, unk_id=LEADING_SPECIALS.index(UNK), byte_fallback=proto.trainer_spec.byte_fallback))

    # SentencePiece's normaliser, step by step in its order.
    spec = proto.normalizer_spec
    steps = []
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:  # Spaces only: other whitespace is left as it is.
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""),
                  normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "▁"))
    if spec.add_dummy_prefix:
        # Metaspace adds no prefix to a text already starting with "▁"; SentencePiece does.
        steps.append(normalizers.Replace(Regex(r"\A▁"), "▁▁"))
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="▁", prepend_scheme="always", split=False)
    tokenizer.normalizer = normalizers.Sequence(steps)
    tokenizer.decoder = decoders.Metaspace(
        replacement="▁", prepend_scheme="always" if spec.add_dummy_prefix else "never")
    tokenizer.add_special_tokens([_special(t) for t in (*LEADING_SPECIALS, MASK)])
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", pair=f"{BOS} $A {EOS} {EOS} $B {EOS}",
        special_tokens=[(BOS, 0), (EOS, 2)])
    return tokenizer
