"""Steps per second of a distillation run with its teacher live against the same run reading
the teacher's embeddings from a cache (`teacher.cache`), in one process, alternated.

    python -m distil_flax.cache_teacher --config=configs/embed_minilm.py \
        --output=runs/bench_cache/minilm_128                      # once; prints its throughput
    python bench/teacher_cache.py --config=configs/embed_minilm.py \
        --cache=runs/bench_cache/minilm_128 --steps=60 --repeats=2 \
        --workdir=runs/bench_cache/runs --output=bench/results/teacher_cache.json

Each repeat runs `python -m distil_flax.main` live, then cached (a fresh workdir each, no
evaluation until the end); a run's step time is the median `train/step_time_s` after its first
logged interval (which holds compilation). Printed: a markdown table of the median step time
of each side over the repeats, steps per second and their ratio, and the cache's size and build
throughput from its manifest.
"""

import argparse
import json
import os
import shutil
import statistics
import sys

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [BENCH, os.path.dirname(BENCH)]

from embedding_peer import step_seconds  # noqa: E402
from recipes import _run  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--cache", required=True)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--output", default="")
    args = parser.parse_args()
    with open(os.path.join(args.cache, "manifest.json")) as f:
        manifest = json.load(f)
    times = {"live": [], "cached": []}
    for repeat in range(args.repeats):
        for side in times:
            workdir = os.path.join(args.workdir, f"{side}{repeat}")
            shutil.rmtree(workdir, ignore_errors=True)
            os.makedirs(args.workdir, exist_ok=True)
            flags = [f"--config.train.num_steps={args.steps}", "--config.train.log_every=5",
                     "--config.train.eval_every=0", "--config.train.eval_batches=1",
                     f"--config.train.checkpoint_every={args.steps}"]
            if side == "cached":
                flags.append(f"--config.teacher.cache={args.cache}")
            _run([sys.executable, "-m", "distil_flax.main", f"--config={args.config}",
                  f"--workdir={workdir}", *flags], workdir + ".log")
            times[side].append(step_seconds(workdir))
    live, cached = (statistics.median(times[s]) for s in ("live", "cached"))
    build = manifest["build"]
    result = {"config": args.config, "steps": args.steps, "repeats": args.repeats,
              "step_time_s": times, "live_steps_per_s": 1 / live, "cached_steps_per_s": 1 / cached,
              "speedup": live / cached, "cache_bytes_per_million_tokens":
              manifest["bytes_per_million_tokens"], "cache_precision": manifest["precision"],
              "cache_build_tokens_per_s": build["tokens_per_second"],
              "cache_tokens": manifest["tokens"], "cache_bytes": manifest["bytes"]}
    print("| teacher | step time (s, median) | steps/s | ratio |\n|---|---|---|---|")
    print(f"| live | {live:.3f} | {1 / live:.2f} | 1.00 |")
    print(f"| cached | {cached:.3f} | {1 / cached:.2f} | {live / cached:.2f} |")
    print(f"\nCache: {manifest['tokens']:,} tokens, {manifest['bytes'] / 1e6:.1f} MB "
          f"({manifest['precision']}) = {manifest['bytes_per_million_tokens'] / 1e6:.1f} MB per "
          f"million tokens; built at {build['tokens_per_second']:,} tokens/s in "
          f"{build['seconds']:.0f} s.")
    if args.output:
        os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
