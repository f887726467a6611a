"""Every command, fed what a careless user feeds it — a missing file, an empty one, a garbled one,
a misspelt flag — stops with exit status 1 and one `error:` line that names what is wrong, and
never a traceback. Run alone with `pytest -m fault`.

The four cases of a command run at once (each is a fresh interpreter that fails during start-up).
"""

import os
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.fault

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLUE = os.path.join(ROOT, "tests", "fixtures", "glue")
MRPC = os.path.join(GLUE, "MRPC")
TEACHER = "configs/quickstart_teacher.py:tiny"


def _garbage(size: int = 4096) -> bytes:
    """Bytes no reader of this project accepts: not UTF-8, not JSON, not safetensors."""
    return b"\xff\xfe\x00" + np.random.default_rng(0).bytes(size)


def _bad_inputs(tmp_path, kind: str) -> dict[str, str]:
    """A missing, an empty and a garbled input of `kind` ("file", "config" or "folder")."""
    missing = tmp_path / f"missing.{'py' if kind == 'config' else 'txt'}"
    empty = tmp_path / f"empty.{'py' if kind == 'config' else 'txt'}"
    garbled = tmp_path / f"garbled.{'py' if kind == 'config' else 'txt'}"
    if kind == "folder":
        empty.mkdir()
        garbled.mkdir()
        for name in ("config.json", "model.safetensors", "vocab.txt"):
            (garbled / name).write_bytes(_garbage())
    else:
        empty.write_text("")
        garbled.write_bytes(_garbage())
    return {"missing": str(missing), "empty": str(empty), "garbled": str(garbled)}


def _commands(tmp_path, vocab_path, teacher_workdir):
    """Per command: (the kind of its input, argv given that input, a misspelt flag's argv).

    Each case writes (if it wrongly got that far) to its own `out`, named after its input.
    """
    out = str(tmp_path / "out")
    return {
        "main": ("config",
                 lambda f: ["distil_flax.main", f"--config={f}", f"--workdir={f}.out"],
                 ["distil_flax.main", f"--config={TEACHER}", f"--workdir={out}",
                  "--config.train.num_stepz=3"]),
        "finetune": ("folder",
                     lambda f: ["distil_flax.finetune", "--config=configs/glue.py:task=mrpc,"
                                "preset=tiny", f"--workdir={f}.out", f"--config.data.dir={MRPC}",
                                f"--config.init.checkpoint={f}"],
                     ["distil_flax.finetune", "--config=configs/glue.py:task=mrpc,preset=tiny",
                      f"--workdir={out}", "--config.train.learning_rat=0.1"]),
        "glue": ("folder",
                 lambda f: ["distil_flax.glue", "--config=configs/glue.py:preset=tiny",
                            f"--init={f}", f"--data_dir={GLUE}", f"--workdir={f}.out"],
                 ["distil_flax.glue", "--config=configs/glue.py:preset=tiny",
                  f"--init={teacher_workdir}", f"--data_dir={GLUE}", f"--workdir={out}",
                  "--config.train.learning_rat=0.1"]),
        "data.prepare": ("file",
                         lambda f: ["distil_flax.data.prepare", f"--config={TEACHER}",
                                    "--config.data.source=text", f"--config.data.paths={f}",
                                    f"--config.data.tokenizer={vocab_path}",
                                    f"--config.data.dir={f}.out"],
                         ["distil_flax.data.prepare", f"--config={TEACHER}",
                          "--config.data.sourec=text"]),
        "data.train_vocab": ("file",
                             lambda f: ["distil_flax.data.train_vocab", "--source=text",
                                        f"--paths={f}", "--vocab_size=100",
                                        f"--output={f}.out.txt"],
                             ["distil_flax.data.train_vocab", "--vocab_szie=100",
                              f"--output={out}.txt"]),
        "export_hf": ("folder",
                      lambda f: ["distil_flax.export_hf", f"--workdir={f}", f"--output={f}.out"],
                      ["distil_flax.export_hf", f"--wrokdir={teacher_workdir}",
                       f"--output={out}"]),
        "export_onnx": ("folder",
                        lambda f: ["distil_flax.export_onnx", f"--model={f}",
                                   f"--output={f}.out.onnx"],
                        ["distil_flax.export_onnx", f"--modle={teacher_workdir}",
                         f"--output={out}.onnx"]),
        "cache_teacher": ("config",
                          lambda f: ["distil_flax.cache_teacher", f"--config={f}",
                                     f"--output={f}.out"],
                          ["distil_flax.cache_teacher", f"--config={TEACHER}",
                           f"--output={out}", "--precisoin=float32"]),
        "evaluate_embeddings": ("file",
                                lambda f: ["distil_flax.evaluate_embeddings",
                                           f"--student={teacher_workdir}",
                                           f"--teacher={teacher_workdir}", f"--sts={f}"],
                                ["distil_flax.evaluate_embeddings",
                                 f"--studnet={teacher_workdir}", f"--text={vocab_path}"]),
    }


COMMANDS = ("main", "finetune", "glue", "data.prepare", "data.train_vocab", "export_hf",
            "export_onnx", "evaluate_embeddings", "cache_teacher")


@pytest.mark.parametrize("command", COMMANDS)
def test_bad_inputs_and_misspelt_flags_end_in_one_error_line(command, tmp_path, vocab_path,
                                                              teacher_workdir):
    kind, with_input, misspelt = _commands(tmp_path, vocab_path, teacher_workdir)[command]
    cases = {name: (with_input(path), path)
             for name, path in _bad_inputs(tmp_path, kind).items()}
    flag = next(a for a in misspelt if a.startswith("--") and a.split("=")[0].split(".")[-1]
                in ("num_stepz", "learning_rat", "sourec", "--vocab_szie", "--wrokdir",
                    "--modle", "--studnet", "--precisoin"))
    cases["misspelt flag"] = (misspelt, flag.split("=")[0].split(".")[-1].lstrip("-"))
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    running = {name: subprocess.Popen([sys.executable, "-m", *argv], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for name, (argv, _) in cases.items()}
    problems = []
    for name, process in running.items():
        stdout, stderr = process.communicate(timeout=300)
        named = cases[name][1]
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]
        if (process.returncode != 1 or len(errors) != 1 or "Traceback" in stdout + stderr
                or named not in errors[0]):
            problems.append(f"{name}: exit {process.returncode}, error lines {errors} (should "
                            f"name {named!r}); stderr ends:\n{stderr[-1500:]}")
    assert not problems, "\n\n".join(problems)
