"""Multi-host for real, on one machine: two JAX processes on localhost train one model together.

The test starts two copies of this file as processes that meet through
`jax.distributed.initialize(coordinator_address="127.0.0.1:PORT", ...)`, each with two simulated
CPU devices, so the mesh spans 4 devices over 2 hosts, every step all-reduces across processes,
and each host reads only its half of every batch. Both run the tiny student config through the
real `train_and_evaluate`, stop at a checkpoint, resume from it, and finish; then each restores the
final checkpoint and writes the copies of the parameters it holds. The parent checks that every
copy on both hosts is identical and that the run matches a single-process run of the same config
(which fails if the hosts read the same or the wrong rows, or if a restore lost state). Another
test sends SIGTERM to one host mid-run, as a scheduler's preemption notice would: both hosts must
stop after the same step, save it together and exit 0, and a rerun must resume from it.

Run as a script (`python tests/test_multihost.py --process_id=0 ...`) it is one of those hosts.
"""

import argparse
import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import traceback

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_PROCESSES = 2
LOCAL_DEVICES = 2
# Each two-host run, start to exit: about 40 s on 2 quiet cores, a few minutes on 2 cores that
# other jobs keep busy. Every wait inside a host is given as long (a starved host is late, not
# dead; a dead one exits, which `_wait` sees at once).
TIMEOUT_S = 900
PREEMPTION_STEPS = 60
STEP_FLOOR_S = 0.05  # The least a step of the SIGTERM test takes: 3 s for the whole run.


def _student_config(vocab_path: str, teacher_workdir: str):
    from distil_flax.training.config_files import load_config

    c = load_config(os.path.join(ROOT, "configs/quickstart.py:tiny"))
    c.data.tokenizer = vocab_path
    c.teacher.checkpoint = teacher_workdir
    c.train.num_steps = 8
    c.train.checkpoint_every = 4
    c.train.log_every = 2
    c.train.eval_every = 0
    # Gradients accumulated over 2 micro-batches of 8: with 2 hosts, each holds half of every
    # micro-batch, which must still hold the same rows as in a one-process run.
    c.train.batch_size = 16
    c.train.micro_batch_size = 8
    return c


def _preemption_config(vocab_path: str, teacher_workdir: str):
    """A run long enough for SIGTERM to land mid-run, whose only checkpoint is the preemption's.

    With `STEP_FLOOR_S` per step, the steps after the first outlast by far the second or so that
    the notice needs to take effect (see `_with_step_floor`).
    """
    c = _student_config(vocab_path, teacher_workdir)
    c.train.num_steps = PREEMPTION_STEPS
    c.train.checkpoint_every = 10 * PREEMPTION_STEPS  # Only the forced saves.
    c.train.log_every = 1  # A metrics.jsonl record per step tells the test the run is training.
    c.train.micro_batch_size = 0  # No accumulation: shorter steps.
    c.train.eval_batches = 2
    return c


def _with_step_floor(train_module, seconds: float) -> None:
    """Makes each training step of `train_module.train_and_evaluate` take at least `seconds`.

    JAX's notifier looks for SIGTERM once a second (`kListenInterval` in XLA's
    preemption_notifier.cc) and the hosts then agree on a step through the coordinator; a tiny
    step can take a few ms on a fast machine, where 60 of them would end before that.
    """
    make_trainer = train_module.make_trainer

    def slowed(*args, **kwargs):
        trainer = make_trainer(*args, **kwargs)
        step = trainer.step

        def step_at_least(state, batch):
            time.sleep(seconds)  # On the host, outside the compiled step: trains the same.
            return step(state, batch)

        return dataclasses.replace(trainer, step=step_at_least)

    train_module.make_trainer = slowed


def _flat(tree) -> dict:
    import jax

    return {jax.tree_util.keystr(path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _restore_final_params(c, workdir: str):
    """The latest checkpoint's parameters, read into `c`'s mesh over all processes' devices."""
    from distil_flax import model as model_lib
    from distil_flax.model import make_encoder
    from distil_flax.training import partitioning
    from distil_flax.training.checkpoint import restore_params

    mesh = partitioning.make_mesh(c.mesh)
    rules = partitioning.rules_from_config(c.mesh.rules)
    abstract = partitioning.abstract_params(model_lib.init_fn(make_encoder(c.model)), mesh, rules)
    params, step = restore_params(workdir, abstract)
    return params, step, mesh


# ---------------------------------------------------------------------------------- one host


def _connect_collectives() -> None:
    """Connects the hosts' Gloo collectives, for every group of devices the runs use, at once.

    Gloo gives the hosts 30 s to meet the first time a group of devices runs a collective
    (`kTimeoutDefault` in gloo/context.cc; XLA never sets another and no flag reaches it), then
    keeps that connection for the life of the process. Left to the run, that first time is its
    first checkpoint barrier or step, which each host reaches after compiling on its own: on a
    loaded machine one can be more than 30 s behind ("Gloo context initialization failed:
    DEADLINE_EXCEEDED"). Here each host compiles first, the hosts meet at a barrier of the
    coordination service (which waits as long as it is told), and only then run one collective
    per group: the devices of all hosts (the steps' all-reduce) and each local device with its
    peers on the other hosts (Orbax's barriers, `multihost_utils.process_allgather`).
    """
    import jax
    from jax._src import distributed  # Its client's barrier, as Orbax uses it.
    from jax.sharding import NamedSharding, PartitionSpec

    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(NUM_PROCESSES, LOCAL_DEVICES),
                             ("hosts", "local"))
    spec = PartitionSpec("hosts", "local")
    ones = jax.make_array_from_process_local_data(NamedSharding(mesh, spec),
                                                  np.ones((1, LOCAL_DEVICES), np.float32))
    sums = [jax.jit(jax.shard_map(lambda x, axes=axes: jax.lax.psum(x, axes), mesh=mesh,
                                  in_specs=spec, out_specs=spec)).lower(ones).compile()
            for axes in ("hosts", ("hosts", "local"))]
    distributed.global_state.client.wait_at_barrier("connect_collectives", TIMEOUT_S * 1000)
    for compiled in sums:
        compiled(ones).block_until_ready()


def _host(args: argparse.Namespace) -> None:
    """One process of the 2-host run; writes what it holds to `args.out/process_{i}.*`."""
    import jax
    from absl import logging

    logging.set_verbosity(logging.INFO)  # The log is shown if a host fails.
    jax.distributed.initialize(coordinator_address=args.coordinator,
                               num_processes=NUM_PROCESSES, process_id=args.process_id,
                               initialization_timeout=TIMEOUT_S,
                               heartbeat_timeout_seconds=TIMEOUT_S,
                               shutdown_timeout_seconds=TIMEOUT_S)
    _connect_collectives()
    from distil_flax.distill import train

    if args.preemption:  # One run, which the test may stop with SIGTERM: no restore here.
        _with_step_floor(train, STEP_FLOOR_S)
        final = train.train_and_evaluate(_preemption_config(args.vocab, args.teacher),
                                         args.workdir)
        with open(os.path.join(args.out, f"process_{args.process_id}.json"), "w") as f:
            json.dump({"final": final}, f)
        jax.distributed.shutdown()
        return
    c = _student_config(args.vocab, args.teacher)
    # Preempted at step 4 (checkpoint written by both hosts), then resumed from it on both.
    assert train.train_and_evaluate(c, args.workdir, stop_at_step=4) == {}
    final = train.train_and_evaluate(c, args.workdir)

    params, step, mesh = _restore_final_params(c, args.workdir)
    copies = {}
    for name, leaf in _flat(params).items():
        for shard in leaf.addressable_shards:
            copies[f"{name}@{shard.device.id}"] = np.asarray(shard.data)
    prefix = os.path.join(args.out, f"process_{args.process_id}")
    np.savez(prefix + ".npz", **copies)
    with open(prefix + ".json", "w") as f:
        json.dump({"process_index": jax.process_index(), "process_count": jax.process_count(),
                   "local_devices": jax.local_device_count(), "devices": jax.device_count(),
                   "mesh": dict(mesh.shape), "step": step, "final": final}, f)
    jax.distributed.shutdown()


# ---------------------------------------------------------------------------------- the test


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: str, lines: int = 40) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])


def _check(hosts, deadline: float) -> None:
    """Raises, with the logs that tell why, once a host failed or the deadline passed."""
    failed = [log for proc, log in hosts if proc.poll() not in (None, 0)]
    if failed or time.monotonic() > deadline:
        reason = "failed" if failed else f"did not finish within {TIMEOUT_S} s"
        shown = failed or [log for _, log in hosts]  # Without a failure, all may tell.
        logs = "\n".join(f"--- {log}\n{_tail(log)}" for log in shown)
        raise AssertionError(f"a host {reason}:\n{logs}")


def _start_hosts(tmp_path, vocab_path, teacher_workdir, *, out=None, preemption: bool = False
                 ) -> list[tuple[subprocess.Popen, str]]:
    """Starts the hosts on the workdir `tmp_path/run`; their logs and outputs go to `out`."""
    out = out or tmp_path
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           # Not the 8 devices the test process simulates: each host has its own two. A host's
           # devices must meet at each collective within 40 s (else it aborts), and a
           # collective waits 30 min for the other host: both as long as the harness waits.
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={LOCAL_DEVICES} "
                        f"--xla_cpu_collective_call_terminate_timeout_seconds={TIMEOUT_S} "
                        f"--xla_cpu_collective_timeout_seconds={TIMEOUT_S}",
           # The resumed run compiles the same programs again: read them from disk instead.
           "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "compilation_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    coordinator = f"127.0.0.1:{_free_port()}"
    hosts = []
    for i in range(NUM_PROCESSES):
        log = str(out / f"process_{i}.log")
        with open(log, "w") as log_file:
            proc = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), f"--process_id={i}",
                 f"--coordinator={coordinator}", f"--vocab={vocab_path}",
                 f"--teacher={teacher_workdir}", f"--workdir={tmp_path / 'run'}",
                 f"--out={out}"] + (["--preemption"] if preemption else []),
                cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
        hosts.append((proc, log))
    return hosts


def _wait(hosts, deadline: float) -> None:
    """Waits for every host; the first failure or the deadline ends all of them."""
    try:
        while any(proc.poll() is None for proc, _ in hosts):
            _check(hosts, deadline)
            time.sleep(0.2)
        _check(hosts, float("inf"))  # All have exited: did one fail?
    finally:
        for proc, _ in hosts:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def test_two_processes_train_identical_replicas_and_match_one_process(
        tmp_path, vocab_path, teacher_workdir):
    import jax

    from distil_flax.distill import train
    from distil_flax.training.metric_writers import read_metrics

    deadline = time.monotonic() + TIMEOUT_S
    hosts = _start_hosts(tmp_path, vocab_path, teacher_workdir)
    try:
        # The same run in this process (8 local devices, no interruption), while the hosts work.
        reference = str(tmp_path / "reference")
        c = _student_config(vocab_path, teacher_workdir)
        expected_final = train.train_and_evaluate(c, reference)
        params, _, _ = _restore_final_params(c, reference)
        expected = _flat(jax.device_get(params))
    finally:
        _wait(hosts, deadline)

    infos = []
    for i in range(NUM_PROCESSES):
        with open(tmp_path / f"process_{i}.json") as f:
            infos.append(json.load(f))
    for i, info in enumerate(infos):
        assert info["process_index"] == i and info["process_count"] == NUM_PROCESSES
        assert info["local_devices"] == LOCAL_DEVICES
        assert info["devices"] == NUM_PROCESSES * LOCAL_DEVICES
        assert info["mesh"] == {"data": NUM_PROCESSES * LOCAL_DEVICES, "fsdp": 1, "tensor": 1}
        assert info["step"] == 8
        with open(tmp_path / f"process_{i}.log") as f:
            assert "Resuming from step 4" in f.read()  # Both hosts restored the checkpoint.
    # Evaluation is one global computation: both hosts report the same numbers.
    assert infos[0]["final"] == infos[1]["final"]

    # Every copy of every parameter, on every device of both hosts, is the same array.
    copies = [dict(np.load(tmp_path / f"process_{i}.npz")) for i in range(NUM_PROCESSES)]
    assert set(copies[0]).isdisjoint(copies[1])  # Each host saw only its own devices.
    by_param: dict[str, list[np.ndarray]] = {}
    for host_copies in copies:
        for key, value in host_copies.items():
            by_param.setdefault(key.rsplit("@", 1)[0], []).append(value)
    assert set(by_param) == set(expected)
    for name, values in by_param.items():
        assert len(values) == NUM_PROCESSES * LOCAL_DEVICES, name
        for value in values[1:]:
            np.testing.assert_array_equal(value, values[0], err_msg=name)
        # The 2-host run (with a restart) trained on the same global batches as one process:
        # only the order of the cross-device sums differs.
        np.testing.assert_allclose(values[0], expected[name], rtol=1e-4, atol=1e-5,
                                   err_msg=name)

    # Only process 0 writes metrics, once per log step, though both ran the loop.
    losses = [r["train/loss"] for r in read_metrics(str(tmp_path / "run")) if "train/loss" in r]
    expected_losses = [r["train/loss"] for r in read_metrics(reference) if "train/loss" in r]
    assert len(losses) == len(expected_losses) == 4
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-5)
    for key, value in expected_final.items():
        assert np.isclose(infos[0]["final"][key], value, rtol=1e-4), key


def _wait_for_training(workdir: str, hosts, deadline: float) -> int:
    """Waits for process 0's first `metrics.jsonl` record; returns its step.

    A record is written after a whole step, so both hosts are past start-up (JAX's preemption
    notifier is in place) and inside the loop, where every step is a collective of both.
    """
    from distil_flax.training.metric_writers import read_metrics

    while True:
        _check(hosts, deadline)
        for proc, log in hosts:
            if proc.poll() is not None:
                raise AssertionError(f"a host ended (status {proc.returncode}) before training:"
                                     f"\n{_tail(log)}")
        try:
            steps = [r["step"] for r in read_metrics(workdir) if "train/loss" in r]
        except FileNotFoundError:
            steps = []
        if steps:
            return steps[-1]
        time.sleep(0.05)


def _stopping_steps(log: str) -> list[int]:
    """The steps at which a host's loop logged that a signal stopped it."""
    with open(log) as f:
        return [int(m) for m in re.findall(r"Stopping at step (\d+) \(SIGTERM\)", f.read())]


def test_sigterm_to_one_host_stops_both_at_the_same_step_and_resumes(
        tmp_path, vocab_path, teacher_workdir):
    """A preemption notice reaches one host: both save the same step, exit 0, and resume from it.

    The signal goes to process 1, which neither holds `run.lock` nor writes metrics, so process 0
    learns of it only through JAX's preemption service.
    """
    from distil_flax.training.checkpoint import TMP_SUFFIX, checkpoint_dir
    from distil_flax.training.checksums import verify_step
    from distil_flax.training.metric_writers import read_metrics
    from distil_flax.training.workdir_lock import LOCK_NAME

    workdir = tmp_path / "run"
    first, rerun = tmp_path / "first", tmp_path / "rerun"
    first.mkdir()
    rerun.mkdir()
    deadline = time.monotonic() + TIMEOUT_S
    hosts = _start_hosts(tmp_path, vocab_path, teacher_workdir, out=first, preemption=True)
    try:
        signalled_after = _wait_for_training(str(workdir), hosts, deadline)
        hosts[1][0].send_signal(signal.SIGTERM)
    finally:
        _wait(hosts, deadline)  # Both must exit 0: a preempted run is not a failed one.

    stops = [_stopping_steps(log) for _, log in hosts]
    assert len(stops[0]) == 1 and stops[0] == stops[1], stops  # Once, at the same step.
    step = stops[0][0]
    assert signalled_after < step < PREEMPTION_STEPS, (
        f"SIGTERM after step {signalled_after} stopped the run at step {step} of "
        f"{PREEMPTION_STEPS}: not mid-run")
    for i in range(NUM_PROCESSES):
        with open(first / f"process_{i}.json") as f:
            assert json.load(f)["final"] == {}  # Stopped: no final evaluation.
    # The only checkpoint is the preemption's, committed whole, and the lock is gone.
    checkpoints = checkpoint_dir(workdir)
    names = os.listdir(checkpoints)
    assert [n for n in names if n.isdigit()] == [str(step)], names
    assert not [n for n in names if n.endswith(TMP_SUFFIX)], names
    assert verify_step(checkpoints, step)  # Checksums present and matching every file.
    assert not (workdir / LOCK_NAME).exists()
    assert [r["step"] for r in read_metrics(str(workdir)) if "train/loss" in r][-1] == step

    # The same command again: both hosts resume from that step and finish the run.
    deadline = time.monotonic() + TIMEOUT_S
    hosts = _start_hosts(tmp_path, vocab_path, teacher_workdir, out=rerun, preemption=True)
    _wait(hosts, deadline)
    finals = []
    for i, (_, log) in enumerate(hosts):
        with open(log) as f:
            assert f"Resuming from step {step} (" in f.read(), _tail(log)
        with open(rerun / f"process_{i}.json") as f:
            finals.append(json.load(f)["final"])
    assert finals[0] and finals[0] == finals[1]  # The final evaluation, the same on both.
    assert max(int(n) for n in os.listdir(checkpoints) if n.isdigit()) == PREEMPTION_STEPS
    assert verify_step(checkpoints, PREEMPTION_STEPS)
    assert not (workdir / LOCK_NAME).exists()
    # Every step logged exactly once across the two runs: none lost, none trained twice.
    steps = [r["step"] for r in read_metrics(str(workdir)) if "train/loss" in r]
    assert steps == list(range(1, PREEMPTION_STEPS + 1))


def test_run_config_and_teacher_workdir_on_object_storage(tmp_path, vocab_path):
    """Pod runs keep workdirs on GCS: config.json and the teacher check go through etils.epath."""
    import pytest
    from etils.epath import testing as epath_testing

    from distil_flax.distill import config as config_lib
    from distil_flax.training import config_files

    def local(path) -> str:  # gs://bucket/x → tmp_path/bucket/x: a stand-in object store.
        return os.fspath(path).replace("gs://", f"{tmp_path}/", 1)

    (tmp_path / "bucket" / "run").mkdir(parents=True)
    (tmp_path / "bucket" / "teacher").mkdir()
    c = _student_config(vocab_path, "gs://bucket/teacher")
    with epath_testing.mock_epath(open=lambda fn, p, mode: fn(local(p), mode),
                                  exists=lambda fn, p: fn(local(p))):
        config_lib.validate(c)
        config_files.save_json(c, "gs://bucket/run/config.json")
        loaded = config_files.load_json("gs://bucket/run/config.json")
        assert loaded.to_dict() == json.loads(c.to_json_best_effort())  # Tuples become lists.
        with pytest.raises(FileNotFoundError, match="gs://bucket/run/missing.json"):
            config_files.load_json("gs://bucket/run/missing.json")
        (tmp_path / "bucket" / "run" / "truncated.json").write_text('{"seed": ')
        with pytest.raises(ValueError, match="gs://bucket/run/truncated.json is not valid JSON"):
            config_files.load_json("gs://bucket/run/truncated.json")
        c.teacher.checkpoint = "gs://bucket/no_teacher"
        with pytest.raises(ValueError, match="teacher.checkpoint='gs://bucket/no_teacher'"):
            config_lib.validate(c)
    assert (tmp_path / "bucket" / "run" / "config.json").is_file()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag in ("coordinator", "vocab", "teacher", "workdir", "out"):
        parser.add_argument(f"--{flag}", required=True)
    parser.add_argument("--process_id", type=int, required=True)
    parser.add_argument("--preemption", action="store_true",
                        help="run the long config once (the SIGTERM test), not the restart run")
    try:
        _host(parser.parse_args())
    except Exception:
        # Exit now: on the way out JAX's client would first wait at the shutdown barrier for the
        # other host (`shutdown_timeout_seconds`), which a failed run never reaches, and the
        # harness would see a host that does not finish rather than one that failed, and why.
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
