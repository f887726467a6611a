"""The launch scripts start `distil_flax.main` with the right arguments on every host.

`gcloud`, `srun` and the interpreter are stand-ins that record what they were given, so the
tests check the commands the scripts build (quoting included), not the clouds they would reach.
"""

import json
import os
import stat
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = ["--config.data.paths=my corpus/*.txt", "--config.train.num_steps=10"]


def _executable(path, text: str) -> str:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


@pytest.fixture
def fake_python(tmp_path):
    """An interpreter that prints its arguments and the device variables it was started with."""
    return _executable(tmp_path / "python", f"""#!{sys.executable}
import json, os, sys
print(json.dumps({{"argv": sys.argv[1:], "cwd": os.getcwd(),
                  "local_device_ids": os.environ.get("JAX_LOCAL_DEVICE_IDS"),
                  "cuda_visible": os.environ.get("CUDA_VISIBLE_DEVICES")}}))
""")


def _run(args, env, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=60)


def _main_argv(config, workdir, *extra):
    return ["-m", "distil_flax.main", f"--config={config}", f"--workdir={workdir}", *extra]


def test_tpu_vm_run_starts_main_on_all_workers_with_quoted_overrides(tmp_path, fake_python):
    calls = tmp_path / "gcloud_calls.jsonl"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _executable(bin_dir / "gcloud", f"""#!{sys.executable}
import json, sys
with open({str(calls)!r}, "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
""")
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "TPU_NAME": "my-tpu", "ZONE": "zone-a",
           "PROJECT": "my-project"}
    result = _run([f"{ROOT}/launch/tpu_vm.sh", "run", "configs/distil6.py", "gs://bucket/run",
                   *OVERRIDES], env)
    assert result.returncode == 0, result.stderr
    (call,) = [json.loads(line) for line in calls.read_text().splitlines()]
    assert call[:5] == ["compute", "tpus", "tpu-vm", "ssh", "my-tpu"]
    assert {"--zone=zone-a", "--project=my-project", "--worker=all"} <= set(call)
    command = next(a for a in call if a.startswith("--command="))[len("--command="):]

    # What every worker runs, executed here against the stand-in interpreter.
    worker_home = tmp_path / "home"
    (worker_home / "distil_flax" / ".venv" / "bin").mkdir(parents=True)
    os.symlink(fake_python, worker_home / "distil_flax" / ".venv" / "bin" / "python")
    ran = _run(["bash", "-c", command], {"HOME": str(worker_home)}, cwd=worker_home)
    assert ran.returncode == 0, ran.stderr
    assert json.loads(ran.stdout)["argv"] == _main_argv(
        "configs/distil6.py", "gs://bucket/run", "--config.distributed=True", *OVERRIDES)


def test_tpu_vm_needs_its_variables_and_warns_about_local_workdirs(tmp_path):
    missing = _run([f"{ROOT}/launch/tpu_vm.sh", "run", "c.py", "w"],
                   {"TPU_NAME": "", "ZONE": "zone-a"})
    assert missing.returncode != 0 and "set TPU_NAME" in missing.stderr
    assert _run([f"{ROOT}/launch/tpu_vm.sh", "--help"], {}).stdout.startswith("Cloud TPU VMs")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _executable(bin_dir / "gcloud", "#!/bin/sh\nexit 0\n")
    local = _run([f"{ROOT}/launch/tpu_vm.sh", "run", "c.py", "runs/local"],
                 {"PATH": f"{bin_dir}:{os.environ['PATH']}", "TPU_NAME": "t", "ZONE": "z"})
    assert local.returncode == 0 and "use gs://BUCKET" in local.stderr


@pytest.mark.parametrize("tasks_per_node, expected_ids", [("1", "0,1,2,3"), ("4", None)])
def test_slurm_gives_a_process_per_node_all_gpus_and_per_gpu_one(
        tmp_path, fake_python, tasks_per_node, expected_ids):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # srun without a cluster: drop its options, run the task here once.
    _executable(bin_dir / "srun",
                "#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\nexec \"$@\"\n")
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": fake_python,
           "SLURM_SUBMIT_DIR": str(tmp_path), "SLURM_NTASKS_PER_NODE": tasks_per_node,
           "SLURM_GPUS_ON_NODE": "4", "SLURM_JOB_ID": "42"}
    result = _run(["bash", f"{ROOT}/launch/slurm_gpu.sbatch", "configs/distil6.py",
                   "/shared/run", *OVERRIDES], env)
    assert result.returncode == 0, result.stderr
    started = json.loads(result.stdout.splitlines()[-1])
    assert started["argv"] == _main_argv("configs/distil6.py", "/shared/run",
                                         "--config.distributed=True", *OVERRIDES)
    assert started["cwd"] == str(tmp_path)  # Relative config paths are the submit directory's.
    assert started["local_device_ids"] == expected_ids


def test_local_gpus_runs_one_process_on_the_chosen_gpus(fake_python):
    result = _run([f"{ROOT}/launch/local_gpus.sh", "configs/quickstart.py", "runs/x", *OVERRIDES],
                  {"PYTHON": fake_python, "GPUS": "0,2"})
    assert result.returncode == 0, result.stderr
    started = json.loads(result.stdout)
    assert started["argv"] == _main_argv("configs/quickstart.py", "runs/x", *OVERRIDES)
    assert started["cuda_visible"] == "0,2"
    usage = _run([f"{ROOT}/launch/local_gpus.sh", "configs/quickstart.py"], {})
    assert usage.returncode == 2 and "usage:" in usage.stderr
