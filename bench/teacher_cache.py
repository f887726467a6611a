"""Steps per second of a distillation run with its teacher live against the same run reading
the teacher's targets from a cache (`teacher.cache`), in one process, alternated.

    python -m distil_flax.cache_teacher --config=configs/embed_minilm.py \
        --output=runs/bench_cache/minilm_128                      # once; prints its throughput
    python bench/teacher_cache.py --config=configs/embed_minilm.py \
        --cache=runs/bench_cache/minilm_128 --steps=60 --repeats=2 \
        --workdir=runs/bench_cache/runs --output=bench/results/teacher_cache.json

The DistilBERT recipe at a size that fits a CPU, from a logits cache (top-k at static masks):

    python -m distil_flax.cache_teacher --config=configs/quickstart.py:masked_ce \
        --targets=logits --output=runs/quickstart/teacher_logits
    python bench/teacher_cache.py --config=configs/quickstart.py:masked_ce \
        --cache=runs/quickstart/teacher_logits --steps=150 --repeats=2 \
        --workdir=runs/bench_cache/quickstart --output=bench/results/logit_cache.json

Each repeat runs `python -m distil_flax.main` live, then cached (a fresh workdir each, no
evaluation until the end); a run's step time is the median `train/step_time_s` after its first
logged interval (which holds compilation). Printed: a markdown table of the median step time
of each side over the repeats, steps per second and their ratio, and the cache's size and build
throughput from its manifest. With a logits cache, also what the truncation costs: on held-out
batches at the cache's static masks, the last cached student's L_ce (T² · KL) against the live
teacher's full distribution and against the cached top k, their gap and its bound
(`losses.top_k_gap_bound`), the tail's mass, and the held-out metrics of both runs.
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


def kl_gap(config: str, cache: str, workdir: str, batches: int = 20) -> dict[str, float]:
    """Held-out L_ce of the student in `workdir` against the full and the top-k teacher."""
    import jax

    from distil_flax import data, losses
    from distil_flax.distill import train
    from distil_flax.interop import sources
    from distil_flax.model import make_encoder
    from distil_flax.training import partitioning
    from distil_flax.training.config_files import load_config

    c = load_config(config)
    c.teacher.cache = cache
    setup = train.build(c)
    mesh = partitioning.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])

    def model(spec):
        source = sources.open_source(spec)
        params = sources.encoder_params(source, mesh, partitioning.DEFAULT_RULES)[0]
        return make_encoder(source.model_cfg), jax.device_get(params)

    (teacher, teacher_params), (student, student_params) = model(c.teacher.checkpoint), model(
        workdir)

    @jax.jit
    def sums(batch):
        def logits(m, p):
            return m.apply({"params": p}, batch["input_ids"], batch["segment_ids"],
                           batch["positions"], logits_at=batch["mlm_positions"])[0]
        t, s = logits(teacher, teacher_params), logits(student, student_params)
        w, temperature = batch["mlm_weights"], c.loss.temperature
        top_k = (batch["teacher_top_ids"], batch["teacher_top_logits"], batch["teacher_log_z"])
        n = w.sum()
        kl_top_k, tail_mass = losses.top_k_kl(s, top_k, w, temperature)
        return {"predictions": n,
                "full": losses.soft_target_kl(s, t, w, temperature) * n,
                "top_k": kl_top_k * n, "tail_mass": tail_mass * n,
                "bound": (losses.top_k_gap_bound(s, top_k, temperature) * w).sum(),
                "cached_logit_error": (abs(jax.numpy.take_along_axis(
                    t, batch["teacher_top_ids"], -1) - batch["teacher_top_logits"]).max(-1)
                    * w).max()}

    totals: dict[str, float] = {}
    for batch in data.eval_batches(setup.eval_rows, 32, max_batches=batches):
        for k, v in jax.device_get(sums(batch)).items():
            totals[k] = max(totals.get(k, 0.0), float(v)) if k == "cached_logit_error" else (
                totals.get(k, 0.0) + float(v))
    n = max(totals.pop("predictions"), 1.0)
    out = {k: (v if k == "cached_logit_error" else v / n) for k, v in totals.items()}
    out["gap"] = out["full"] - out["top_k"]
    out["predictions"] = n
    return out


def _final_eval(workdir: str) -> dict[str, float]:
    from distil_flax.training.metric_writers import read_metrics

    rows = [r for r in read_metrics(workdir) if any(k.startswith("eval/") for k in r)]
    return {k: v for k, v in (rows[-1] if rows else {}).items() if k.startswith("eval/")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--cache", required=True)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--output", default="")
    parser.add_argument("--eval", type=int, default=1, help="Held-out batches at the end.")
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
                     "--config.train.eval_every=0", f"--config.train.eval_batches={args.eval}",
                     f"--config.train.checkpoint_every={args.steps}"]
            if side == "cached":
                flags.append(f"--config.teacher.cache={args.cache}")
            _run([sys.executable, "-m", "distil_flax.main", f"--config={args.config}",
                  f"--workdir={workdir}", *flags], workdir + ".log")
            times[side].append(step_seconds(workdir))
    evals = {side: _final_eval(os.path.join(args.workdir, f"{side}{args.repeats - 1}"))
             for side in times}
    live, cached = (statistics.median(times[s]) for s in ("live", "cached"))
    build = manifest["build"]
    result = {"config": args.config, "steps": args.steps, "repeats": args.repeats,
              "step_time_s": times, "live_steps_per_s": 1 / live, "cached_steps_per_s": 1 / cached,
              "speedup": live / cached, "cache_bytes_per_million_tokens":
              manifest["bytes_per_million_tokens"], "cache_precision": manifest["precision"],
              "cache_build_tokens_per_s": build["tokens_per_second"],
              "cache_tokens": manifest["tokens"], "cache_bytes": manifest["bytes"],
              "held_out": evals}
    print("| teacher | step time (s, median) | steps/s | ratio |\n|---|---|---|---|")
    print(f"| live | {live:.3f} | {1 / live:.2f} | 1.00 |")
    print(f"| cached | {cached:.3f} | {1 / cached:.2f} | {live / cached:.2f} |")
    print(f"\nCache: {manifest['tokens']:,} tokens, {manifest['bytes'] / 1e6:.1f} MB "
          f"({manifest['precision']}) = {manifest['bytes_per_million_tokens'] / 1e6:.1f} MB per "
          f"million tokens; built at {build['tokens_per_second']:,} tokens/s in "
          f"{build['seconds']:.0f} s.")
    print("\nHeld-out, last repeat: " + "; ".join(
        f"{side}: " + ", ".join(f"{k.removeprefix('eval/')} {v:.4f}" for k, v in sorted(
            values.items())) for side, values in evals.items()))
    if manifest["kind"] == "logits":
        gap = kl_gap(args.config, args.cache,
                     os.path.join(args.workdir, f"cached{args.repeats - 1}"))
        result["kl_gap"] = gap
        print(f"\nTop-{manifest['top_k']} L_ce on {gap['predictions']:.0f} held-out predictions "
              f"(T² · KL, the cached student): full {gap['full']:.4f}, top-k {gap['top_k']:.4f}, "
              f"gap {gap['gap']:.4f} (bound {gap['bound']:.4f}), tail mass "
              f"{gap['tail_mass']:.4f}; cached against live teacher logits: max error "
              f"{gap['cached_logit_error']:.2e}.")
    if args.output:
        os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
