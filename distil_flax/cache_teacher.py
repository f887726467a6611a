"""Runs a teacher once over a run's prepared data and writes its targets for every packed
segment, so that distillation reads them instead of running the teacher
(`--config.teacher.cache=DIR`): its pooled sentence embeddings (--targets=embeddings) or its
top-k MLM logits at E static masks (--targets=logits).

    python -m distil_flax.cache_teacher --config=configs/embed_minilm.py --output=runs/cache

The config's data section, data.seq_len, teacher.checkpoint (or --teacher), teacher.param_dtype,
loss.embeddings.pooling (embeddings) or its masking section and loss.temperature (logits) say
what to compute, exactly as a live teacher of that run would. The cache is sharded like the
prepared data (one file per unit), checksummed, and named by a manifest (the teacher's parameter
digest, the data, tokenizer, seq_len, the kind's options) that training checks. A teacher with
another tokenizer reads each segment's text (embeddings; logits need the data's vocabulary).
Stopped at any moment (kill -9 included), the same command resumes and writes the same bytes;
--units=K/N builds one host's part, and a last run without it writes the manifest. A bad flag,
config or teacher ends in one `error:` line.
"""

import functools

from absl import app, flags
from ml_collections import config_flags

from distil_flax.data import teacher_targets
from distil_flax.data.prepare import parse_units
from distil_flax.distill import logit_cache
from distil_flax.embeddings import teacher_cache
from distil_flax.training import cli


def _define_flags() -> dict:
    """Defined only when run as a program, so that this module imports beside the others."""
    return {
        "config": config_flags.DEFINE_config_file(
            "config", None, "Distillation config: its data, teacher and pooling.",
            lock_config=True),
        "output": flags.DEFINE_string("output", None, "The cache directory.", required=True),
        "teacher": flags.DEFINE_string("teacher", "", "The teacher (default: teacher.checkpoint)."),
        "targets": flags.DEFINE_enum("targets", teacher_targets.KIND,
                                     [teacher_targets.KIND, teacher_targets.LOGITS],
                                     "What to cache: pooled embeddings, or top-k MLM logits."),
        "precision": flags.DEFINE_string("precision", "float32", "float32 | bfloat16."),
        "batch_size": flags.DEFINE_integer("batch_size", 0,
                                           "Packed rows per teacher pass (0: 64, logits 32)."),
        "top_k": flags.DEFINE_integer("top_k", 64, "Logits kept per masked position."),
        "maskings": flags.DEFINE_integer("maskings", 4, "Static maskings per segment (logits)."),
        "mask_seed": flags.DEFINE_integer("mask_seed", None, "Seed of the masks (default: seed)."),
        "units": flags.DEFINE_string("units", "", "K/N: build only units K, K+N, ... (one of N)."),
    }


def main(argv, flag_values: dict):
    cli.start(argv, distributed=False)
    v = {name: holder.value for name, holder in flag_values.items()}
    if v["config"] is None:
        raise app.UsageError("--config is required")

    def job():
        common = dict(teacher=v["teacher"], precision=v["precision"],
                      units=parse_units(v["units"]))
        if v["targets"] == teacher_targets.LOGITS:
            return logit_cache.build(v["config"], v["output"], top_k=v["top_k"],
                                     maskings=v["maskings"], seed=v["mask_seed"],
                                     batch_size=v["batch_size"] or 32, **common)
        return teacher_cache.build(v["config"], v["output"], batch_size=v["batch_size"] or 64,
                                   **common)

    manifest = cli.run(job, sigterm_aborts=True,
                       interrupted="interrupted; rerun the same command to continue (finished "
                                   "shards are kept)")
    if manifest:
        build = manifest["build"]
        what = (f"top-{manifest['top_k']} logits at {manifest['maskings']} static maskings"
                if manifest["kind"] == teacher_targets.LOGITS else
                f"width {manifest['width']} ({manifest['pooling']} pooling)")
        print(f"Teacher cache in {v['output']}: "
              + ", ".join(f"{name} {s['segments']} segments" for name, s in
                          manifest["splits"].items())
              + f", {what}, {manifest['precision']}, {manifest['bytes'] / 1e6:.1f} MB = "
              f"{manifest['bytes_per_million_tokens'] / 1e6:.1f} MB per million tokens; this run "
              f"built {build['units']} units, {build['tokens_per_second']} tokens/s.")


if __name__ == "__main__":
    cli.main(functools.partial(main, flag_values=_define_flags()))
