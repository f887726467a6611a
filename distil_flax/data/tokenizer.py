"""Tokenizers: one small class over HF `tokenizers` and SentencePiece backends, plus training.

`load_tokenizer` picks the backend from the path:
  a folder  the first of tokenizer.json, vocab.json, vocab.txt, sentencepiece.bpe.model and
           spiece.model that it holds (a Hugging Face model folder), read as below;
  vocab.json or merges.txt  byte-level BPE (RoBERTa, GPT-2), the other file beside it
           (`roberta_vocab`);
  *.txt    a BERT `vocab.txt`, with BERT's normalisation and pre-tokenisation (the same pipeline as
           `transformers.BertTokenizer`: clean text, CJK split, optional lowercase + accent strip,
           whitespace/punctuation split, greedy longest-match WordPiece with `##` continuations);
  *.json   a HF `tokenizer.json` (WordPiece, BPE, Unigram ...), used as written (its
           padding/truncation turned off);
  sentencepiece.bpe.model  XLM-R's SentencePiece model, with fairseq's ids (`roberta_vocab`);
  *.model  a SentencePiece model (ALBERT convention: `<pad>`, `<unk>`, `[CLS]`, `[SEP]`, `[MASK]`).

Encoding never adds special tokens. `Tokenizer.frame` adds them as the vocabulary's family does
(`Tokenizer.family`): BERT `[CLS] a [SEP]` and `[CLS] a [SEP] b [SEP]`; RoBERTa and XLM-R
`<s> a </s>` and `<s> a </s></s> b </s>`. The packer frames each pretraining segment as
`cls … sep`, which is `[CLS] a [SEP]` or `<s> a </s>`: one shape for both families.
Trained WordPiece and SentencePiece vocabularies put the special tokens first, [PAD]=0, [UNK]=1,
[CLS]=2, [SEP]=3, [MASK]=4, as in BERT's vocab where [PAD] is 0; trained byte-level BPE ones use
RoBERTa's ids, `<s>`=0, `<pad>`=1, `</s>`=2, `<unk>`=3, `<mask>` last.
"""

import collections
import hashlib
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple

import sentencepiece as spm
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

from distil_flax.data import roberta_vocab, wordpiece
from distil_flax.training import atomic

# The special tokens a vocabulary must have, in the order trained vocabularies put them (ids 0..4).
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

# Other spellings of the same roles: SentencePiece's own pad/unk pieces, RoBERTa-style tokens.
_ALIASES = {
    "[PAD]": ("[PAD]", "<pad>"),
    "[UNK]": ("[UNK]", "<unk>"),
    "[CLS]": ("[CLS]", "<s>"),
    "[SEP]": ("[SEP]", "</s>"),
    "[MASK]": ("[MASK]", "<mask>"),
}

# What `train_sentencepiece` writes: pad and unk are SentencePiece meta pieces (ids 0 and 1), the
# other three are user-defined symbols (ids 2..4), matching ALBERT's spiece.model.
SENTENCEPIECE_PAD = "<pad>"
SENTENCEPIECE_UNK = "<unk>"
SENTENCEPIECE_SYMBOLS = ("[CLS]", "[SEP]", "[MASK]")

SUFFIXES = (".txt", ".json", ".model")

# What `load_tokenizer` reads in a folder, the first present winning: tokenizer.json says most
# (normaliser and post-processor included), so it goes before the bare vocabularies.
FOLDER_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "sentencepiece.bpe.model",
                "spiece.model")

# How special tokens frame one or two texts: BERT's [CLS] a [SEP] b [SEP], or RoBERTa's
# <s> a </s></s> b </s> (XLM-R too).
FAMILIES = ("bert", "roberta")


class Framed(NamedTuple):
    """One text or a pair, framed with special tokens for a model row (`Tokenizer.frame`)."""

    input_ids: list[int]
    token_type_ids: list[int]  # BERT: 0 up to a's [SEP], 1 from b on; RoBERTa: all 0.
    b_start: int | None  # Index of b's first token; None for one text.


class Tokenizer:
    """Text ↔ ids for one vocabulary, with the special ids the packer and masking need.

    Attributes:
      path: what the tokenizer was loaded from (a file or a folder; `load_tokenizer(path)` loads
        it again).
      files: the files read, e.g. (`vocab.json`, `merges.txt`) or (`tokenizer.json`,).
      vocab_size: number of ids (the model's embedding rows must equal it).
      pad_id, unk_id, cls_id, sep_id, mask_id: ids of the special tokens; `bos_id` and `eos_id`
        are RoBERTa's names for cls_id (`<s>`) and sep_id (`</s>`).
      special_ids: sorted ids of every special token (never masked or predicted).
      family: "bert" or "roberta": how `frame` places special tokens (see `FAMILIES`).
      fingerprint: identifies what the tokenizer does: a hash of its files and, for vocab.txt,
        the lowercase flag. Prepared shards record it, so that training with another vocabulary
        is caught before it reads ids that mean other tokens.
    """

    def __init__(self, path: str, backend: tokenizers.Tokenizer | spm.SentencePieceProcessor,
                 fingerprint: str = "", files: Sequence[str] = ()):
        """Wraps a loaded backend; use `load_tokenizer` rather than calling this directly.

        Raises:
          ValueError: if the vocabulary lacks a pad, unk, cls, sep or mask token ([PAD] or
            <pad>, [UNK] or <unk>, [CLS] or <s>, [SEP] or </s>, [MASK] or <mask>).
        """
        self.path = path
        self.files = tuple(files) or (path,)
        self._backend = backend
        self.fingerprint = fingerprint
        if isinstance(backend, spm.SentencePieceProcessor):
            self.vocab_size = backend.get_piece_size()
            extra = [i for i in range(self.vocab_size)
                     if backend.is_control(i) or backend.is_unknown(i)]
        else:
            self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
            extra = [i for i, t in backend.get_added_tokens_decoder().items() if t.special]
        ids = {name: self._find(name) for name in SPECIAL_TOKENS}
        missing = [name for name, i in ids.items() if i is None]
        if missing:
            spellings = ", ".join(" or ".join(_ALIASES[name]) for name in missing)
            raise ValueError(f"Tokenizer {path} lacks special token(s) {spellings}; a "
                             "vocabulary needs pad, unk, cls, sep and mask tokens, spelled as "
                             "BERT's ([PAD] ...) or RoBERTa's (<pad> ...).")
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (
            ids[name] for name in SPECIAL_TOKENS)
        self.special_ids = tuple(sorted(set(ids.values()) | set(extra)))
        self.family = _family(backend, self.id_to_token(self.cls_id),
                              self.id_to_token(self.sep_id))

    @property
    def bos_id(self) -> int:
        """RoBERTa's name for the id that opens every row (`<s>`, BERT's [CLS])."""
        return self.cls_id

    @property
    def eos_id(self) -> int:
        """RoBERTa's name for the id that ends every segment (`</s>`, BERT's [SEP])."""
        return self.sep_id

    def num_special_tokens(self, pair: bool = False) -> int:
        """How many special tokens `frame` adds: 2 to one text; 3 (BERT) or 4 (RoBERTa) to a
        pair. Truncation leaves the rest of a row to the texts."""
        if not pair:
            return 2
        return 4 if self.family == "roberta" else 3

    def frame(self, a: Sequence[int], b: Sequence[int] | None = None) -> Framed:
        """Token ids of one text (`a`) or a pair, framed as this family's models were trained.

        BERT: `[CLS] a [SEP]`, `[CLS] a [SEP] b [SEP]`, type ids 0 then 1 from b on.
        RoBERTa, XLM-R: `<s> a </s>`, `<s> a </s></s> b </s>`, type ids all 0 (their models
        have one token type, and transformers gives them none).
        """
        ids = [self.cls_id, *a, self.sep_id]
        if b is None:
            return Framed(ids, [0] * len(ids), None)
        if self.family == "roberta":
            ids.append(self.sep_id)
        b_start = len(ids)
        ids += [*b, self.sep_id]
        second_type = 1 if self.family == "bert" else 0
        return Framed(ids, [0] * b_start + [second_type] * (len(ids) - b_start), b_start)

    def _find(self, name: str) -> int | None:
        """The id of special token `name` (or one of its aliases), None if absent."""
        backend = self._backend
        if isinstance(backend, spm.SentencePieceProcessor):
            # SentencePiece knows its own pad/unk ids; its piece_to_id maps absent pieces to unk.
            if name == "[PAD]" and backend.pad_id() >= 0:
                return backend.pad_id()
            if name == "[UNK]":
                return backend.unk_id()
            for piece in _ALIASES[name]:
                i = backend.piece_to_id(piece)
                if backend.id_to_piece(i) == piece:
                    return i
            return None
        for token in _ALIASES[name]:
            i = backend.token_to_id(token)
            if i is not None:
                return i
        return None

    def encode_batch(self, texts: Sequence[str], num_threads: int = 0) -> list[list[int]]:
        """Token ids of each text, without special tokens.

        Args:
          texts: the texts to encode.
          num_threads: SentencePiece threads (0: all cores). HF tokenizers use their own pool,
            sized by RAYON_NUM_THREADS and switched off by TOKENIZERS_PARALLELISM=false.
        """
        texts = list(texts)
        if isinstance(self._backend, spm.SentencePieceProcessor):
            return self._backend.encode(texts, out_type=int,
                                        num_threads=num_threads or os.cpu_count() or 1)
        # encode_batch_fast (tokenizers >= 0.21) skips the character offsets, which we never read.
        encode = getattr(self._backend, "encode_batch_fast", self._backend.encode_batch)
        encodings = encode(texts, add_special_tokens=False)
        return [e.ids for e in encodings]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids` (specials kept by default, so masked inputs read as such)."""
        ids = [int(i) for i in ids]
        if isinstance(self._backend, spm.SentencePieceProcessor):
            if skip_special_tokens:
                ids = [i for i in ids if i not in self.special_ids]
            return self._backend.decode(ids)
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str:
        """The token (piece) string of id `i`."""
        if isinstance(self._backend, spm.SentencePieceProcessor):
            return self._backend.id_to_piece(int(i))
        token = self._backend.id_to_token(int(i))
        if token is None:
            raise IndexError(f"Token id {i} is outside the vocabulary (size {self.vocab_size}).")
        return token

    def __repr__(self) -> str:
        return (f"Tokenizer({self.path!r}, {self.family}, vocab_size={self.vocab_size}, "
                f"pad={self.pad_id}, unk={self.unk_id}, cls={self.cls_id}, sep={self.sep_id}, "
                f"mask={self.mask_id})")


def _family(backend: tokenizers.Tokenizer | spm.SentencePieceProcessor, cls_token: str,
            sep_token: str) -> str:
    """The framing a vocabulary's models were trained with (see `FAMILIES`)."""
    post = getattr(backend, "post_processor", None)  # SentencePiece has none.
    if isinstance(post, processors.RobertaProcessing):
        return "roberta"
    if isinstance(post, processors.BertProcessing):
        return "bert"
    # A template (XLM-R's, recent BERT files) or no post-processor: RoBERTa's spelling of the
    # specials goes with RoBERTa's framing.
    return "roberta" if (cls_token, sep_token) == ("<s>", "</s>") else "bert"


def load_tokenizer(path: str, lowercase: bool = True) -> Tokenizer:
    """Loads a tokenizer, choosing the backend from the path (see the module docstring).

    Args:
      path: a `vocab.txt`, `tokenizer.json`, `vocab.json` or `merges.txt` (byte-level BPE),
        SentencePiece `.model` file, or a folder holding one of `FOLDER_FILES`.
      lowercase: for `.txt` vocabularies only: uncased BERT normalisation (lowercase and strip
        accents), as for `bert-base-uncased`. The other kinds carry their own.

    Raises:
      FileNotFoundError: if `path` does not exist.
      ValueError: unknown suffix, a folder without a tokenizer, a vocab.json without its
        merges.txt (or the other way round), a file its backend cannot parse, a vocab.txt
        listing a token twice, or a vocabulary without pad, unk, cls, sep and mask tokens.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        found = [f for f in FOLDER_FILES if os.path.isfile(os.path.join(path, f))]
        if not found:
            raise ValueError(f"Folder {path!r} holds no tokenizer: expected one of "
                             f"{', '.join(FOLDER_FILES)}.")
        file = os.path.join(path, found[0])
    elif os.path.isfile(path):
        file = path
    else:
        raise FileNotFoundError(f"Tokenizer file {path!r} does not exist.")
    name = os.path.basename(file)
    if name in ("vocab.json", "merges.txt"):  # Before *.txt and *.json: names, not suffixes.
        files = tuple(os.path.join(os.path.dirname(file), f) for f in ("vocab.json", "merges.txt"))
        absent = [f for f in files if not os.path.isfile(f)]
        if absent:
            raise ValueError(f"Byte-level BPE {file!r} needs vocab.json and merges.txt side by "
                             f"side; {absent[0]!r} does not exist.")
        return Tokenizer(path, roberta_vocab.load_bpe(*files), _digest(*files), files)
    digest = _digest(file)
    if name.endswith(".txt"):
        fingerprint = f"{digest}-{'uncased' if lowercase else 'cased'}"
        return Tokenizer(path, _wordpiece_from_vocab(file, lowercase), fingerprint, (file,))
    if name.endswith(".json"):
        try:
            backend = tokenizers.Tokenizer.from_file(file)
        except Exception as error:  # The Rust library raises a bare Exception.
            raise ValueError(f"{file!r} is not a Hugging Face tokenizer.json: {error}") from None
        # Rows are packed by us; padding or truncation configured for serving would corrupt them.
        backend.no_padding()
        backend.no_truncation()
        return Tokenizer(path, backend, digest, (file,))
    if name == "sentencepiece.bpe.model":  # XLM-R's name; its ids are fairseq's, not its own.
        return Tokenizer(path, roberta_vocab.load_xlmr_sentencepiece(file), digest, (file,))
    if name.endswith(".model"):
        try:
            backend = spm.SentencePieceProcessor(model_file=file)
        except (OSError, RuntimeError) as error:
            raise ValueError(f"{file!r} is not a SentencePiece model: {error}") from None
        return Tokenizer(path, backend, digest, (file,))
    raise ValueError(f"Cannot tell the tokenizer kind of {path!r}: expected a folder, vocab.json, "
                     f"merges.txt or a name ending in {', '.join(SUFFIXES)}.")


def _digest(*paths: str) -> str:
    """A short hash of the files' bytes, in order."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:16]


def _bert_normalizer(lowercase: bool) -> normalizers.Normalizer:
    # strip_accents=None follows `lowercase`, as BertTokenizer does.
    return normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase)


def _bert_pipeline(model: models.Model, lowercase: bool) -> tokenizers.Tokenizer:
    """`model` behind BertTokenizer's normaliser and pre-tokeniser, with a WordPiece decoder."""
    tokenizer = tokenizers.Tokenizer(model)
    tokenizer.normalizer = _bert_normalizer(lowercase)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    return tokenizer


def read_vocab(path: str) -> dict[str, int]:
    """A BERT `vocab.txt` as token → id, the id being the token's line (from 0).

    Lines are read as `tokenizers.models.WordPiece.read_file` reads them (trailing whitespace
    dropped), but a token listed twice is an error here: a dict keeps one of its ids, the other
    id then names no token, and the vocabulary has fewer entries than the ids it hands out (the
    model's embedding table would not fit the data).

    Raises:
      ValueError: a file that is not UTF-8, or a token on more than one line (the message names
        the file, the token and its line numbers).
    """
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"Vocabulary {path} is not UTF-8 text: {error}") from None
    lines = text.split("\n")
    if lines and not lines[-1]:
        lines.pop()  # The newline that ends the last line starts no token.
    vocab: dict[str, int] = {}
    for i, line in enumerate(lines):
        token = line.rstrip()
        if token in vocab:
            again = [str(n + 1) for n, other in enumerate(lines) if other.rstrip() == token]
            raise ValueError(
                f"Vocabulary {path} lists token {token!r} on lines {', '.join(again[:-1])} and "
                f"{again[-1]}: each token must appear once (its id is its line number). Remove "
                "the repeated lines.")
        vocab[token] = i
    return vocab


def _wordpiece_from_vocab(path: str, lowercase: bool) -> tokenizers.Tokenizer:
    vocab = read_vocab(path)
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
        raise ValueError(f"Vocabulary {path} lacks special token(s) {', '.join(missing)}; a "
                         f"BERT vocab.txt needs all of {', '.join(SPECIAL_TOKENS)}.")
    model = models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100)
    return _bert_pipeline(model, lowercase)


def train_wordpiece(
    documents: Iterable[str], vocab_size: int, output: str, lowercase: bool = True
) -> str:
    """Trains a BERT-style WordPiece vocabulary and writes it as `vocab.txt` (one token a line).

    Same input, same file (see `wordpiece` for why this is not HF's trainer). Tokens are listed
    by id, special tokens first ([PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4).

    Args:
      documents: training text, one document per item.
      vocab_size: target size including special tokens and the alphabet (may come out smaller
        on a small corpus).
      output: path of the vocab file to write; parent directories are created.
      lowercase: uncased normalisation (must match `load_tokenizer(..., lowercase)`).

    Returns:
      `output`.
    """
    normalizer = _bert_normalizer(lowercase)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    # Count words exactly as `load_tokenizer` will split them, so merges fit what is encoded.
    word_counts: collections.Counter[str] = collections.Counter()
    for document in documents:
        words = pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(document))
        word_counts.update(word for word, _ in words)
    tokens = wordpiece.learn_vocab(word_counts, vocab_size, SPECIAL_TOKENS)
    _write_atomically(output, "".join(t + "\n" for t in tokens))
    return output


# A sentence ends at . ! ? ; or : followed by space; splitting there only shortens the lines
# SentencePiece sees (it never merges across whitespace anyway).
_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+")


def _sentences(documents: Iterable[str]) -> Iterator[str]:
    for document in documents:
        for sentence in _SENTENCE_END.split(document):
            if sentence:
                yield sentence


def train_sentencepiece(
    documents: Iterable[str], vocab_size: int, output_prefix: str, lowercase: bool = False
) -> str:
    """Trains a unigram SentencePiece model with the BERT special tokens; writes `prefix.model`.

    Ids: `<pad>`=0, `<unk>`=1, `[CLS]`=2, `[SEP]`=3, `[MASK]`=4 (ALBERT's layout), no BOS/EOS.

    Args:
      documents: training text, one document per item.
      vocab_size: target size; a soft limit, so tiny corpora give a smaller vocabulary rather
        than an error.
      output_prefix: writes `{output_prefix}.model` and `.vocab`; parent directories are created.
      lowercase: case-fold during normalisation (nmt_nfkc_cf instead of nmt_nfkc).

    Returns:
      The path of the `.model` file.
    """
    output_prefix = os.fspath(output_prefix)
    if output_prefix.endswith(".model"):
        output_prefix = output_prefix[: -len(".model")]
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    # Sampling of sentences (only when the corpus exceeds input_sentence_size) uses this seed.
    spm.set_random_generator_seed(0)
    spm.SentencePieceTrainer.train(
        sentence_iterator=_sentences(documents), model_prefix=output_prefix,
        model_type="unigram", vocab_size=vocab_size, hard_vocab_limit=False,
        pad_id=0, unk_id=1, bos_id=-1, eos_id=-1,
        pad_piece=SENTENCEPIECE_PAD, unk_piece=SENTENCEPIECE_UNK,
        user_defined_symbols=list(SENTENCEPIECE_SYMBOLS),
        normalization_rule_name="nmt_nfkc_cf" if lowercase else "nmt_nfkc",
        input_sentence_size=2_000_000, shuffle_input_sentence=True,
        max_sentence_length=1 << 14, num_threads=os.cpu_count() or 1, minloglevel=2)
    return output_prefix + ".model"


def _write_atomically(path: str, text: str) -> None:
    """Writes via a temporary file, so an interrupted run never leaves a truncated vocab that a
    later `train_vocab` would reuse."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic.write_text(path, text)
