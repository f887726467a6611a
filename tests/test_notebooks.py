"""The notebooks run, top to bottom, at tiny size, so they cannot rot.

Each is executed with nbclient in a fresh kernel; as papermill does, a cell with the test's values
is inserted after the cell tagged `parameters`. The committed notebooks carry no outputs.
"""

import json
import os

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = ("quickstart", "ablations", "embeddings")


def _read(name: str) -> nbformat.NotebookNode:
    return nbformat.read(os.path.join(ROOT, "notebooks", f"{name}.ipynb"), as_version=4)


def _execute(name: str, cwd, **parameters) -> nbformat.NotebookNode:
    notebook = _read(name)
    tagged = [i for i, cell in enumerate(notebook.cells)
              if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{name}.ipynb needs exactly one cell tagged 'parameters'"
    injected = nbformat.v4.new_code_cell(
        "\n".join(f"{key} = {value!r}" for key, value in parameters.items()))
    notebook.cells.insert(tagged[0] + 1, injected)
    # A cell error raises CellExecutionError with the cell's source and traceback.
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(cwd)}}).execute()
    return notebook


def _outputs(notebook, tag: str) -> list:
    cell = next(c for c in notebook.cells if tag in c.metadata.get("tags", []))
    return cell.outputs


def _images(notebook) -> int:
    return sum("image/png" in out.get("data", {})
               for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebooks_have_no_outputs(name):
    for cell in _read(name).cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("jax_cache"))


@pytest.fixture
def kernel_env(monkeypatch, compilation_cache):
    """The kernel inherits this environment: one CPU device, not the tests' eight, and a
    persistent compilation cache, so programs the quickstart compiled (the tiny student with
    the full recipe) are not compiled again by the ablation's rows."""
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", compilation_cache)
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


def test_quickstart_pretrains_distils_exports_and_fills_a_mask(tmp_path, kernel_env, vocab_path):
    workdir = tmp_path / "quickstart"
    notebook = _execute("quickstart", tmp_path, SIZE="tiny", REPO_DIR=ROOT,
                        WORKDIR=str(workdir), VOCAB=vocab_path)
    # It pretrained its own teacher, distilled the student from it, and exported the student.
    for run in ("teacher", "student"):
        assert (workdir / run / "metrics.jsonl").is_file()
    with open(workdir / "student" / "config.json") as f:
        assert json.load(f)["teacher"]["checkpoint"] == str(workdir / "teacher")
    assert {"config.json", "model.safetensors", "vocab.txt"} <= set(os.listdir(workdir / "hf"))
    assert _images(notebook) == 1
    lines = "".join(out.text for out in _outputs(notebook, "fill-mask")
                    if out.output_type == "stream" and out.name == "stdout").splitlines()
    assert lines[-6].startswith("DistilBertForMaskedLM")
    scores = [float(line.split()[0]) for line in lines[-5:]]
    assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1.0001


def test_ablations_run_rows_with_the_same_steps_and_seed(tmp_path, kernel_env, teacher_workdir):
    workdir = tmp_path / "ablations"
    steps = 20  # The tiny preset's, as the quickstart's student: its compiled step is reused.
    # Four of the six rows keep CI short; they cover an ablated loss term, random init and the
    # teacher-free baseline (the two rows left out differ from no_ce only by which α is 0).
    run = ["full", "no_ce", "random_init", "mlm_only"]
    notebook = _execute("ablations", tmp_path, SIZE="tiny", REPO_DIR=ROOT, WORKDIR=str(workdir),
                        TEACHER_WORKDIR=teacher_workdir, STUDENT_STEPS=steps,
                        STUDENT_OVERRIDES={"train.eval_batches": 2}, ROWS_TO_RUN=tuple(run))
    assert not (workdir / "teacher").exists()  # The given teacher was reused, not retrained.
    with open(workdir / "ablation.json") as f:
        report = json.load(f)
    rows = {row["folder"]: row for row in report["rows"]}
    assert list(rows) == run
    expected = {  # (α_ce, α_mlm, α_cos, init.from_teacher) of each row's saved config.
        "full": (5.0, 2.0, 1.0, True), "no_cos": (5.0, 2.0, 0.0, True),
        "no_ce": (0.0, 2.0, 1.0, True), "no_mlm": (5.0, 0.0, 1.0, True),
        "random_init": (5.0, 2.0, 1.0, False), "mlm_only": (0.0, 2.0, 0.0, False)}
    for folder, row in rows.items():
        with open(workdir / folder / "config.json") as f:
            c = json.load(f)
        assert (c["loss"]["alpha_ce"], c["loss"]["alpha_mlm"], c["loss"]["alpha_cos"],
                c["init"]["from_teacher"]) == expected[folder], folder
        assert c["train"]["num_steps"] == steps and c["seed"] == 0
        assert c["teacher"]["checkpoint"] == teacher_workdir
        assert 0 <= row["accuracy"] <= 1 and row["perplexity"] > 1
        # Agreement needs the teacher in the run: every row but the MLM-only baseline.
        assert (row["agreement"] is None) == (folder == "mlm_only")
    assert rows["full"]["delta_accuracy"] == 0
    assert sorted(report["paper_order"]) == sorted(report["our_order"])
    assert report["paper_order"] == ["random init", "− L_ce"]
    assert _images(notebook) == 1
