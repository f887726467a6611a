"""Bad inputs and killed preparations: one clear error naming the file, nothing left running.

Data preparation and vocabulary training are fed an empty corpus and a vocab.txt listing a
token twice (in this process and through their command lines), and a preparation is killed with
SIGKILL mid-way: its workers must exit with it, and the rerun must clean up what it left and
produce the same data as a run that was never killed. Run alone with `pytest -m fault`.
"""

import contextlib
import glob
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from distil_flax import data
from distil_flax.data import corpus, prepare, records
from distil_flax.data import tokenizer as tokenizer_lib
from distil_flax.distill import train
from distil_flax.distill.config import base_config
from distil_flax.training.config_files import load_config

pytestmark = pytest.mark.fault

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}
WORDS = ("the quick brown fox jumps over lazy dog journey of a thousand miles begins with single "
         "step packing rows beats padding them every token counts dogs and foxes are jumping "
         "rivers steps journeys many later home").split()
SPECIALS = "[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n"


def _write_corpus(path, n_bytes: int, seed: int = 0) -> str:
    """A text corpus of `n_bytes`: documents of 20-120 random words, blank lines between."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        size = 0
        while size < n_bytes:
            doc = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(20, 120))) + ".\n\n"
            size += f.write(doc)
    return str(path)


@pytest.fixture(scope="module")
def vocab_path(tmp_path_factory) -> str:
    documents = [" ".join(random.Random(i).choice(WORDS) for _ in range(30)) for i in range(50)]
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    return tokenizer_lib.train_wordpiece(documents, 300, str(path))


@pytest.fixture
def duplicated_vocab(tmp_path) -> str:
    path = tmp_path / "dup" / "vocab.txt"
    path.parent.mkdir()
    path.write_text(SPECIALS + "fox\nthe\n##es\nfox\n")  # "fox" on lines 6 and 9.
    return str(path)


def _data_config(tokenizer: str, directory, **fields):
    c = base_config().data
    c.tokenizer, c.dir = tokenizer, str(directory)
    c.max_len, c.seq_len, c.min_tokens, c.eval_every = 64, 32, 4, 5
    for key, value in fields.items():
        setattr(c, key, value)
    return c


def _last_line_is_one_error(result: subprocess.CompletedProcess) -> str:
    """Asserts the CLI contract (status 1, last stderr line `error: ...`, no traceback)."""
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), result.stderr
    return last


# ---------------------------------------------------------------------------------------------
# An empty corpus, a vocab listing a token twice
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["txt", "jsonl", "parquet"])
def test_an_empty_corpus_file_is_named(tmp_path, vocab_path, suffix):
    empty = tmp_path / f"empty.{suffix}"
    empty.write_bytes(b"")
    source = {"txt": "text"}.get(suffix, suffix)
    c = _data_config(vocab_path, tmp_path / "out", source=source, paths=str(empty))
    with pytest.raises(ValueError, match=f"^data.paths: {re.escape(str(empty))} holds no text$"):
        prepare.prepare(c, workers=1)
    assert not os.path.exists(os.path.join(c.dir, records.MANIFEST))
    with pytest.raises(ValueError, match="holds no text"):
        list(data.read_documents(source, str(empty)))


def test_an_empty_file_among_others_is_skipped(tmp_path, vocab_path):
    (tmp_path / "a.txt").write_bytes(b"")
    _write_corpus(tmp_path / "b.txt", 5000)
    c = _data_config(vocab_path, tmp_path / "out", source="text",
                     paths=str(tmp_path / "*.txt"))
    assert [u.path for u in corpus.plan_units(prepare.source_spec(c), None)] == [
        str(tmp_path / "b.txt")]
    prepare.prepare(c, workers=1)
    assert records.PreparedDataset(c.dir).manifest["splits"]["train"]["documents"] > 0


def test_a_vocab_listing_a_token_twice_names_the_token_and_lines(duplicated_vocab):
    with pytest.raises(ValueError, match=f"^Vocabulary {re.escape(duplicated_vocab)} lists "
                                         r"token 'fox' on lines 6 and 9: each token must appear "
                                         "once"):
        data.load_tokenizer(duplicated_vocab)


def test_a_vocab_that_is_not_utf8_is_named(tmp_path):
    (tmp_path / "vocab.txt").write_bytes(SPECIALS.encode() + b"caf\xe9\n")
    with pytest.raises(ValueError, match=r"vocab.txt is not UTF-8 text"):
        data.load_tokenizer(str(tmp_path / "vocab.txt"))


def test_a_duplicated_vocab_stops_a_run_before_it_writes_its_workdir(tmp_path,
                                                                     duplicated_vocab):
    (tmp_path / "teacher").mkdir()
    c = load_config(os.path.join(ROOT, "configs/quickstart.py:tiny"))
    c.data.tokenizer, c.teacher.checkpoint = duplicated_vocab, str(tmp_path / "teacher")
    c.data.cache_dir = str(tmp_path / "cache")
    with pytest.raises(ValueError, match=r"lists token 'fox' on lines 6 and 9"):
        train.train_and_evaluate(c, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


# ---------------------------------------------------------------------------------------------
# The command lines: one `error:` line, exit status 1
# ---------------------------------------------------------------------------------------------


def _prepare_command(vocab, out, *flags):
    return [sys.executable, "-m", "distil_flax.data.prepare",
            "--config=configs/quickstart_teacher.py:tiny", f"--config.data.tokenizer={vocab}",
            f"--config.data.dir={out}", *flags]


def test_prepare_cli_errors_are_one_line(tmp_path, vocab_path, duplicated_vocab):
    (tmp_path / "empty.txt").write_bytes(b"")
    empty = ["--config.data.source=text", f"--config.data.paths={tmp_path / 'empty.txt'}"]
    cases = [
        (_prepare_command(vocab_path, tmp_path / "a", *empty),
         f"error: data.paths: {tmp_path / 'empty.txt'} holds no text"),
        (_prepare_command(duplicated_vocab, tmp_path / "b"), "lists token 'fox' on lines 6 and 9"),
        (_prepare_command(vocab_path, tmp_path / "c", "--units=2/2"),
         "--units='2/2': expected K/N"),
    ]
    for command, message in cases:
        result = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True)
        assert message in _last_line_is_one_error(result)


def test_train_vocab_cli_errors_are_one_line(tmp_path, duplicated_vocab):
    (tmp_path / "empty.txt").write_bytes(b"")
    base = [sys.executable, "-m", "distil_flax.data.train_vocab"]
    cases = [
        ([*base, "--source=text", f"--paths={tmp_path / 'empty.txt'}",
          f"--output={tmp_path / 'vocab.txt'}"], f"{tmp_path / 'empty.txt'} holds no text"),
        ([*base, f"--output={duplicated_vocab}"], "lists token 'fox' on lines 6 and 9"),
    ]
    for command, message in cases:
        result = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True)
        assert message in _last_line_is_one_error(result)
    assert not (tmp_path / "vocab.txt").exists()


def _train_vocab(kind: str, vocab_size: int, corpus_path, output) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "distil_flax.data.train_vocab", "--source=text",
         f"--paths={corpus_path}", f"--kind={kind}", f"--vocab_size={vocab_size}",
         f"--output={output}"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    """The CLI contract, and that the whole of stderr holds one `error:` line."""
    last = _last_line_is_one_error(result)
    assert sum(line.startswith("error:") for line in result.stderr.splitlines()) == 1, (
        result.stderr)
    return last


OUTPUTS = {"wordpiece": "vocab.txt", "sentencepiece": "spm", "bpe": "bpe"}


@pytest.mark.parametrize("kind, vocab_size, bound", [
    ("bpe", 0, "at least 262"), ("bpe", -5, "at least 262"), ("bpe", 261, "at least 262"),
    ("wordpiece", 0, "at least 7"), ("wordpiece", 6, "at least 7"),
    ("sentencepiece", -5, "at least 8"), ("sentencepiece", 0, "at least 8"),
    ("sentencepiece", 7, "at least 8"),
    # Past the cap the trainers fail hard: bpe's reserves memory per target token (an abort
    # at 3e9), sentencepiece's spins near 2**31 and rejects more than an int32.
    ("bpe", 2**20 + 1, "at most 1048576"), ("sentencepiece", 2**31 - 1, "at most 1048576"),
    ("wordpiece", 5 * 10**9, "at most 1048576"),
])
def test_train_vocab_refuses_a_vocab_size_out_of_range_before_reading(tmp_path, kind,
                                                                       vocab_size, bound):
    # No such corpus: a run that read it before checking the size would name the file.
    result = _train_vocab(kind, vocab_size, tmp_path / "missing.txt",
                          tmp_path / "out" / OUTPUTS[kind])
    last = _one_error_line(result)
    assert f"--vocab_size={vocab_size}" in last and f"--kind={kind}" in last, last
    assert bound in last, last
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text, vocab_size, message", [
    # The bundled corpus's characters need 42 pieces; these documents' need 33.
    (None, 20, "--vocab_size=20 is too small for this corpus: --kind=sentencepiece needs at "
               "least 33"),
    # SentencePiece skips sentences over 16384 characters: here all of them.
    ("x" * 20000 + "\n", 100, "no sentence"),
])
def test_sentencepiece_failures_on_a_corpus_are_one_line(tmp_path, text, vocab_size, message):
    corpus_path = tmp_path / "corpus.txt"
    if text is None:
        _write_corpus(corpus_path, 4000)
    else:
        corpus_path.write_text(text)
    output = tmp_path / "out" / "spm"
    result = _train_vocab("sentencepiece", vocab_size, corpus_path, output)
    assert message in _one_error_line(result)
    assert not os.path.exists(f"{output}.model") and not os.path.exists(f"{output}.vocab")


# ---------------------------------------------------------------------------------------------
# A preparation killed with SIGKILL
# ---------------------------------------------------------------------------------------------


def _processes() -> dict[int, tuple[int, str]]:
    """pid → (parent pid, state) of every process, from /proc (Linux)."""
    found = {}
    for path in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(path) as f:
                text = f.read()
        except OSError:
            continue  # Exited meanwhile.
        # Field 2, the command name, is in parentheses and may hold spaces: split after it.
        state, ppid = text[text.rindex(")") + 2:].split()[:2]
        found[int(path.split("/")[2])] = (int(ppid), state)
    return found


def _descendants(pid: int) -> set[int]:
    processes, found, todo = _processes(), set(), [pid]
    while todo:
        parent = todo.pop()
        children = {p for p, (ppid, _) in processes.items() if ppid == parent}
        todo.extend(children - found)
        found |= children
    return found


def _running(pids) -> set[int]:
    """Those of `pids` still alive (a zombie has exited: it only waits to be reaped)."""
    processes = _processes()
    return {p for p in pids if p in processes and processes[p][1] != "Z"}


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)
    return value


def _prepared(directory: str):
    """Everything a prepared directory holds but the preparation's timing."""
    dataset = records.PreparedDataset(directory)
    manifest = {k: v for k, v in dataset.manifest.items() if k != "preparation"}
    splits = {}
    for name in records.SPLITS:
        part = dataset.split(name)
        rows = part.read(part.data_source(), list(range(part.num_records)))
        splits[name] = [r.tolist() for r in rows]
    return json.dumps(manifest, sort_keys=True), splits, dataset.token_counts().tolist()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_killed_preparation_takes_its_workers_along_and_a_rerun_cleans_up(tmp_path, vocab_path):
    text = _write_corpus(tmp_path / "corpus.txt", 8 << 20)
    out = tmp_path / "out"
    fields = dict(source="text", paths=text, unit_bytes=1 << 20)  # 8 units of ~0.3 s each.
    command = _prepare_command(vocab_path, out, "--workers=2",
                               *(f"--config.data.{k}={v}" for k, v in fields.items()))
    with open(tmp_path / "stderr.txt", "w") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                                   stderr=log)
        try:
            # A worker has started a unit when its temporary shard appears.
            _wait_for(lambda: out.is_dir() and any(".array_record.tmp" in name
                                                   for name in os.listdir(out)),
                      120, "a worker to start writing")
            children = _descendants(process.pid)
            workers = {p for p in children if "spawn_main" in _cmdline(p)}
            assert workers, [_cmdline(p) for p in children]
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
        finally:
            process.kill()
    assert not (out / records.MANIFEST).exists()  # Killed mid-way, not after it finished.
    try:
        _wait_for(lambda: not _running(children), 10, f"the workers {sorted(children)} to exit")
    finally:
        for pid in _running(children):  # Failed: do not leave them running after the test.
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    # Besides the killed workers' half-written shards, leftovers of processes that no longer
    # exist in the names of an earlier version are removed; one of another host sharing the
    # directory is left to that host.
    (out / "train-00007.array_record.tmp999999").write_bytes(b"half a shard")
    (out / "train-00007.lengths.npy.tmp.npy").write_bytes(b"half an array")
    (out / "train-00006.array_record.tmp999999-elsewhere").write_bytes(b"in flight there")
    c = load_config(os.path.join(ROOT, "configs/quickstart_teacher.py:tiny"))
    c.data.tokenizer, c.data.dir = vocab_path, str(out)
    for key, value in fields.items():
        setattr(c.data, key, value)
    prepare.prepare(c.data, workers=1)
    assert [name for name in os.listdir(out) if ".tmp" in name] == [
        "train-00006.array_record.tmp999999-elsewhere"]

    clean = c.copy_and_resolve_references()
    clean.data.dir = str(tmp_path / "clean")
    prepare.prepare(clean.data, workers=1)
    assert _prepared(str(out)) == _prepared(clean.data.dir)
    assert np.array_equal(np.load(out / "train-00000.lengths.npy"),
                          np.load(tmp_path / "clean" / "train-00000.lengths.npy"))
