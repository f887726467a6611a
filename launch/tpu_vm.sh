#!/usr/bin/env bash
# Cloud TPU VMs, one host or a pod slice: create the TPU, install this repository on every
# worker, and run a config on all workers at once (`gcloud compute tpus tpu-vm ssh --worker=all`),
# with the workdir on Cloud Storage so that every host reads and writes the same checkpoints.
#
#   export TPU_NAME=distil ZONE=us-central2-b ACCELERATOR_TYPE=v4-32 RUNTIME_VERSION=tpu-ubuntu2204-base
#   launch/tpu_vm.sh create
#   launch/tpu_vm.sh install                     # this working tree → every worker, venv, jax[tpu]
#   launch/tpu_vm.sh copy vocab.txt data/corpus  # → REMOTE_DIR/assets/ on every worker
#   launch/tpu_vm.sh run configs/distil6.py gs://BUCKET/runs/distil6 \
#       --config.teacher.checkpoint=gs://BUCKET/runs/bert_base \
#       --config.data.tokenizer=assets/vocab.txt --config.data.dir=assets/corpus
#   launch/tpu_vm.sh stop                        # SIGTERM on every worker: checkpoint, then exit
#   launch/tpu_vm.sh delete
#
# The tokenizer and the prepared data (`python -m distil_flax.data.prepare ... --config.data.dir=
# data/corpus`, once, beforehand) are read from each worker's disk: `copy` puts them there.
# Checkpoints, events and a teacher workdir may live on gs://.
# `run` passes --config.distributed=True: `jax.distributed.initialize()` finds the slice's hosts
# by itself. Running `run` again on the same workdir resumes from the latest checkpoint (also after
# a Spot TPU was preempted and recreated). Extra arguments after WORKDIR are `--config.x=y`
# overrides. With DETACH=1 the run keeps going after the ssh session ends; `logs` shows worker 0.
#
# Variables:
#   TPU_NAME          (required) the TPU VM or slice.
#   ZONE              (required) a zone that offers ACCELERATOR_TYPE.
#   ACCELERATOR_TYPE  (create) e.g. v4-8 or v5litepod-8 (one host), v4-32 (4 hosts), v5litepod-64.
#   RUNTIME_VERSION   (create) the TPU software version for that type, e.g. tpu-ubuntu2204-base
#                     (v4), v2-alpha-tpuv5-lite (v5e).
#   PROJECT           the Google Cloud project; default: gcloud's configured one.
#   SPOT              1: create a Spot TPU (cheaper, preemptible; runs resume from checkpoints).
#   REMOTE_DIR        where the repository goes on every worker (default: distil_flax, in $HOME).
#   JAX_SPEC          the JAX installed on the workers (default: jax[tpu]).
#   DETACH            1: `run` starts the job in the background on every worker and returns.
# Nothing here names a project or bucket: WORKDIR (and a gs:// teacher) are arguments.
set -euo pipefail

REMOTE_DIR="${REMOTE_DIR:-distil_flax}"
JAX_SPEC="${JAX_SPEC:-jax[tpu]}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LOG="distil_flax_run.log"  # In $HOME of every worker (DETACH=1).
PIDFILE="distil_flax_run.pid"

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
  exit "${1:-2}"
}

case "${1:-}" in
  create | install | copy | run | logs | stop | delete) ;;
  -h | --help | help) usage 0 ;;
  *) usage ;;
esac
: "${TPU_NAME:?set TPU_NAME (see launch/tpu_vm.sh --help)}"
: "${ZONE:?set ZONE (see launch/tpu_vm.sh --help)}"
GCLOUD_ARGS=(--zone="$ZONE")
[[ -n "${PROJECT:-}" ]] && GCLOUD_ARGS+=(--project="$PROJECT")

# Runs a shell command on every worker of the slice, all at the same time.
on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${GCLOUD_ARGS[@]}" --worker=all --command="$1"
}

cmd_create() {
  : "${ACCELERATOR_TYPE:?set ACCELERATOR_TYPE, e.g. v4-8 or v4-32}"
  : "${RUNTIME_VERSION:?set RUNTIME_VERSION, e.g. tpu-ubuntu2204-base}"
  local extra=()
  [[ "${SPOT:-0}" == 1 ]] && extra+=(--spot)
  gcloud compute tpus tpu-vm create "$TPU_NAME" "${GCLOUD_ARGS[@]}" \
    --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" "${extra[@]}"
}

cmd_install() {
  # The working tree as it is (uncommitted edits included), without local runs and environments.
  local archive
  archive="$(mktemp -t distil_flax.XXXXXX).tar.gz"
  trap 'rm -f "$archive"' RETURN
  tar -C "$REPO" --exclude=./.git --exclude=./.venv --exclude=./runs --exclude='*.egg-info' \
    --exclude='__pycache__' -czf "$archive" .
  gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME:distil_flax.tar.gz" "${GCLOUD_ARGS[@]}" \
    --worker=all
  # gcs: gcsfs (etils.epath) and google-cloud-storage (TensorBoard events) for gs:// workdirs;
  # Orbax writes gs:// checkpoints through TensorStore by itself.
  on_all_workers "set -e; mkdir -p $(printf %q "$REMOTE_DIR") && cd $(printf %q "$REMOTE_DIR") \
    && tar -xzf ~/distil_flax.tar.gz && rm ~/distil_flax.tar.gz \
    && python3 -m venv .venv && .venv/bin/pip install -q -U pip \
    && .venv/bin/pip install -q -e '.[gcs]' && .venv/bin/pip install -q -U $(printf %q "$JAX_SPEC") \
    && .venv/bin/python -c 'import jax; print(jax.process_count(), jax.devices())'"
}

cmd_copy() {
  (($# >= 1)) || usage
  on_all_workers "mkdir -p $(printf %q "$REMOTE_DIR")/assets"
  gcloud compute tpus tpu-vm scp --recurse "$@" "$TPU_NAME:$REMOTE_DIR/assets/" \
    "${GCLOUD_ARGS[@]}" --worker=all
}

cmd_run() {
  (($# >= 2)) || usage
  local config="$1" workdir="$2"
  shift 2
  if [[ "$workdir" != gs://* ]]; then
    echo "warning: WORKDIR=$workdir is local to each worker; on a pod slice every host must see" \
      "the same checkpoints: use gs://BUCKET/..." >&2
  fi
  local main
  main="cd $(printf %q "$REMOTE_DIR") && exec .venv/bin/python -m distil_flax.main"
  main+=" --config=$(printf %q "$config") --workdir=$(printf %q "$workdir") --config.distributed=True"
  (($#)) && main+=" $(printf '%q ' "$@")"
  if [[ "${DETACH:-0}" == 1 ]]; then
    on_all_workers "nohup bash -c $(printf %q "$main") > ~/$LOG 2>&1 < /dev/null & echo \$! > ~/$PIDFILE"
    echo "Started on every worker; launch/tpu_vm.sh logs shows worker 0's log."
  else
    on_all_workers "$main"
  fi
}

cmd_logs() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${GCLOUD_ARGS[@]}" --worker=0 \
    --command="tail -n ${LINES_SHOWN:-40} ~/$LOG"
}

cmd_stop() {
  # SIGTERM, as a preemption: the loop saves a checkpoint and exits; `run` resumes from it.
  on_all_workers "[ -f ~/$PIDFILE ] && kill -TERM \$(cat ~/$PIDFILE) && rm ~/$PIDFILE || true"
}

cmd_delete() {
  gcloud compute tpus tpu-vm delete "$TPU_NAME" "${GCLOUD_ARGS[@]}" --quiet
}

command="$1"
shift
"cmd_$command" "$@"
