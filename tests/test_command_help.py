"""Every command's `--help` says in one short paragraph what the command does, then shows one
example invocation of it: absl prints the `__main__` module's docstring, then the flags.

`python -m distil_flax.main --help` runs for real, in one interpreter; every other command's
docstring goes through the same absl code (`app.usage`) in this process, read from its file
without importing it — an interpreter per command would cost seconds each.
"""

import ast
import os
import subprocess
import sys

import pytest
from absl import app

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Every command, as `python -m distil_flax.<name>` runs it.
COMMANDS = ("main", "finetune", "glue", "export_hf", "export_onnx", "evaluate_embeddings",
            "data.prepare", "data.train_vocab", "cache_teacher")
EXAMPLE = "python -m distil_flax."
SHORT = 4  # Lines of the first paragraph, at most.


def _docstring(command: str) -> str:
    """The command module's docstring, as its `__doc__` (read with `ast`, nothing imported)."""
    path = os.path.join(ROOT, "distil_flax", *command.split(".")) + ".py"
    assert os.path.isfile(path), f"{path} is missing: no command distil_flax.{command}"
    with open(path) as f:
        doc = ast.get_docstring(ast.parse(f.read()), clean=False)
    assert doc, f"{path} has no docstring: its --help would say nothing"
    return doc


def _problems(help_text: str, doc: str, command: str) -> list[str]:
    """What is wrong with a command's --help: [] when it opens with a short paragraph saying
    what it does, then one example invocation of this very command, and shows no other."""
    summary, _, rest = doc.partition("\n\n")
    example = rest.split("\n\n")[0]
    problems = []
    if not help_text.startswith(summary):
        problems.append("--help does not open with the docstring's first paragraph")
    if len(summary.splitlines()) > SHORT or summary.startswith(" ") or EXAMPLE in summary:
        problems.append(f"the first paragraph is not one short paragraph (≤ {SHORT} lines) "
                        f"saying what it does, before the example:\n{summary}")
    lines = example.splitlines()
    if not (lines and all(line.startswith("    ") for line in lines)
            and lines[0].strip().startswith(f"{EXAMPLE}{command} ")):
        problems.append(f"the second paragraph is not an indented example of "
                        f"`{EXAMPLE}{command}`:\n{example}")
    if help_text.count(EXAMPLE) != 1:
        problems.append(f"--help shows {help_text.count(EXAMPLE)} invocations, not one")
    return problems


def test_main_help_opens_with_what_it_does_and_one_example():
    result = subprocess.run([sys.executable, "-m", "distil_flax.main", "--help"], cwd=ROOT,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True,
                            text=True, timeout=120)
    assert "flags:" in result.stdout and "--workdir" in result.stdout, result.stderr[-2000:]
    assert _problems(result.stdout, _docstring("main"), "main") == []


@pytest.mark.parametrize("command", [c for c in COMMANDS if c != "main"])
def test_every_command_help_opens_with_what_it_does_and_one_example(command, monkeypatch,
                                                                    capsys):
    doc = _docstring(command)
    # What absl's --help prints for a `__main__` module with this docstring (`app.usage`).
    monkeypatch.setattr(sys.modules["__main__"], "__doc__", doc)
    monkeypatch.setattr(sys, "argv", [f"distil_flax/{command.replace('.', '/')}.py"])
    app.usage(shorthelp=True, writeto_stdout=True)
    assert _problems(capsys.readouterr().out, doc, command) == []
