#!/usr/bin/env bash
# One machine, all its GPUs (or the ones in GPUS): a single JAX process drives every visible GPU,
# and the mesh (mesh.data=-1) spans them; no jax.distributed needed.
#
#   launch/local_gpus.sh configs/distil6.py runs/distil6 \
#       --config.teacher.checkpoint=runs/bert_base --config.data.tokenizer=vocab.txt
#   GPUS=0,1 launch/local_gpus.sh configs/quickstart.py runs/qs_gpu --config.model.dtype=bfloat16
#
# Rerunning on the same WORKDIR resumes from the latest checkpoint. SIGTERM (`kill PID`) saves a
# checkpoint before exiting; Ctrl-C stops at once, and the rerun resumes from the last periodic
# one. Extra arguments are `--config.x=y` overrides.
#
# Variables:
#   GPUS    comma-separated GPU indices to use (CUDA_VISIBLE_DEVICES); default: all.
#   PYTHON  the interpreter with this package and a CUDA JAX (`pip install -e . "jax[cuda12]"`);
#           default: .venv/bin/python of this repository.
set -euo pipefail

if (($# < 2)); then
  echo "usage: [GPUS=0,1,...] launch/local_gpus.sh CONFIG WORKDIR [--config.field=value ...]" >&2
  exit 2
fi
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
if [[ ! -x "$PYTHON" ]]; then
  echo "PYTHON=$PYTHON is not an interpreter: set PYTHON to the environment with distil_flax" >&2
  exit 2
fi
if [[ -n "${GPUS:-}" ]]; then
  export CUDA_VISIBLE_DEVICES="$GPUS"
fi
config="$1" workdir="$2"
shift 2
exec "$PYTHON" -m distil_flax.main --config="$config" --workdir="$workdir" "$@"
