"""Runs a teacher once over a run's prepared data and writes its pooled sentence embedding of
every packed segment, so that distillation reads them instead of running the teacher
(`--config.teacher.cache=DIR`).

    python -m distil_flax.cache_teacher --config=configs/embed_minilm.py --output=runs/cache

The config's data section, data.seq_len, teacher.checkpoint (or --teacher), teacher.param_dtype
and loss.embeddings.pooling say what to compute, exactly as a live teacher of that run would.
The cache is sharded like the prepared data (one file per unit), checksummed, and named by a
manifest (the teacher's parameter digest, the data, tokenizer, seq_len, pooling, precision) that
training checks. A teacher with another tokenizer reads each segment's text. Stopped at any
moment (kill -9 included), the same command resumes and writes the same bytes; --units=K/N
builds one host's part, and a last run without it writes the manifest. A bad flag, config or
teacher ends in one `error:` line.
"""

import functools

from absl import app, flags
from ml_collections import config_flags

from distil_flax.data.prepare import parse_units
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
        "precision": flags.DEFINE_string("precision", "float32", "float32 | bfloat16."),
        "batch_size": flags.DEFINE_integer("batch_size", 64, "Packed rows per teacher pass."),
        "units": flags.DEFINE_string("units", "", "K/N: build only units K, K+N, ... (one of N)."),
    }


def main(argv, flag_values: dict):
    cli.start(argv, distributed=False)
    v = {name: holder.value for name, holder in flag_values.items()}
    if v["config"] is None:
        raise app.UsageError("--config is required")

    def job():
        return teacher_cache.build(v["config"], v["output"], teacher=v["teacher"],
                                   precision=v["precision"], batch_size=v["batch_size"],
                                   units=parse_units(v["units"]))

    manifest = cli.run(job, sigterm_aborts=True,
                       interrupted="interrupted; rerun the same command to continue (finished "
                                   "shards are kept)")
    if manifest:
        build = manifest["build"]
        print(f"Teacher cache in {v['output']}: "
              + ", ".join(f"{name} {s['segments']} segments" for name, s in
                          manifest["splits"].items())
              + f" of width {manifest['width']} ({manifest['precision']}, {manifest['pooling']} "
              f"pooling), {manifest['bytes'] / 1e6:.1f} MB = "
              f"{manifest['bytes_per_million_tokens'] / 1e6:.1f} MB per million tokens; this run "
              f"built {build['units']} units, {build['tokens_per_second']} tokens/s.")


if __name__ == "__main__":
    cli.main(functools.partial(main, flag_values=_define_flags()))
