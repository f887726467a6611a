"""The GLUE suite (`downstream/glue_suite.py`, `python -m distil_flax.glue`): the table and its
arithmetic on made-up results of all nine tasks, then the suite on the fixture files at tiny
size — two tasks with data, one without, a teacher — its rerun after a stop, a teacher read
from an earlier glue.json, and the command line."""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from distil_flax.downstream import glue_suite
from distil_flax.downstream.tasks.metrics import GLUE_TASKS, glue_score
from distil_flax.training.config_files import load_config, read_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "glue")


def _entry(score: float, task: str) -> dict:
    return {"score": score, "metrics": {"dev/accuracy": score}, "step": 3,
            "workdir": f"runs/{task}"}


def test_table_of_nine_tasks_and_retention():
    student = {t: 0.5 + 0.04 * i for i, t in enumerate(GLUE_TASKS)}
    teacher = {t: 0.6 + 0.03 * i for i, t in enumerate(GLUE_TASKS)}
    teacher["wnli"] = 0.0  # A ratio to a score of 0 has no value.
    rows = [glue_suite.make_row(name, f"runs/{name}", {t: _entry(s, t) for t, s in scores.items()})
            for name, scores in (("student", student), ("teacher", teacher))]
    assert rows[0]["score"] == pytest.approx(glue_score(student))
    assert rows[0]["score"] == pytest.approx(sum(student.values()) / 9)
    assert list(rows[0]["tasks"]) == list(GLUE_TASKS) and rows[0]["missing"] == []
    report = glue_suite.make_report(rows)
    assert report["tasks"] == list(GLUE_TASKS)
    kept = report["retention"]
    assert kept["cola"] == pytest.approx(100 * 0.5 / 0.6)
    assert kept["mnli"] == pytest.approx(100 * (0.5 + 0.2) / (0.6 + 0.15))
    assert kept["wnli"] is None
    assert kept["score"] == pytest.approx(100 * sum(student.values()) / sum(teacher.values()))

    table = glue_suite.format_table(report).splitlines()
    assert table[0] == ("| Model | Score | CoLA | MNLI | MRPC | QNLI | QQP | RTE | SST-2 | STS-B "
                        "| WNLI |")
    cells = lambda line: [c.strip() for c in line.strip("|").split("|")]  # noqa: E731
    student_cells, teacher_cells, retention_cells = map(cells, table[2:5])
    assert student_cells[0] == "student (runs/student)"
    assert student_cells[1] == f"{100 * rows[0]['score']:.1f}"
    assert student_cells[2:] == [f"{100 * student[t]:.1f}" for t in glue_suite.TABLE_ORDER]
    assert teacher_cells[-1] == "0.0"
    assert retention_cells[0] == "retention (%)" and retention_cells[-1] == "n/a"
    assert retention_cells[2] == f"{100 * 0.5 / 0.6:.1f}"  # CoLA.

    # Without RTE's data: marked missing, no macro-score, and the table says why.
    partial = glue_suite.make_row("student", "m", {t: _entry(student[t], t) for t in GLUE_TASKS
                                                   if t != "rte"}, missing=["rte"])
    assert partial["score"] is None and partial["missing"] == ["rte"]
    report = glue_suite.make_report([partial, rows[1]])
    assert "rte" not in report["retention"] and report["retention"]["score"] is None
    text = glue_suite.format_table(report)
    assert cells(text.splitlines()[2])[1] == "n/a" and cells(text.splitlines()[2])[7] == "missing"
    assert "Score not computed" in text and "missing data: RTE" in text


def test_task_names_and_data_folders(tmp_path):
    assert glue_suite.select_tasks(None) == GLUE_TASKS
    assert glue_suite.select_tasks(["STS-B", "mrpc", "CoLA"]) == ("cola", "mrpc", "stsb")
    with pytest.raises(ValueError, match="'mrcp' is no GLUE task"):
        glue_suite.select_tasks(["mrcp"])
    assert all(glue_suite.missing_files(FIXTURES, t) == "" for t in GLUE_TASKS)
    (tmp_path / "MNLI").mkdir()
    shutil.copy(os.path.join(FIXTURES, "MNLI", "train.tsv"), tmp_path / "MNLI")
    assert glue_suite.missing_files(str(tmp_path), "mnli") == (
        "MNLI/ has no dev_matched.tsv, dev_mismatched.tsv")
    assert glue_suite.missing_files(str(tmp_path), "rte") == "no folder RTE/"


def _config():
    c = load_config(os.path.join(ROOT, "configs/glue.py:preset=tiny"))
    c.train.num_steps = 2  # MRPC's 16 rows: one epoch; STS-B's 8: two, evaluated after each.
    return c


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory):
    """MRPC and STS-B; RTE has no folder."""
    folder = tmp_path_factory.mktemp("glue_data")
    for name in ("MRPC", "STS-B"):
        shutil.copytree(os.path.join(FIXTURES, name), folder / name)
    return str(folder)


@pytest.fixture(scope="module")
def suite(tmp_path_factory, glue_dir, teacher_workdir):
    """MRPC and RTE (no data) from the tiny pretrained BERT, with itself as the teacher."""
    workdir = str(tmp_path_factory.mktemp("suite"))
    report = glue_suite.run_suite(_config(), init=teacher_workdir, data_dir=glue_dir,
                                  workdir=workdir, teacher=teacher_workdir, tasks=["mrpc", "RTE"])
    return workdir, report


def _results(workdir: str, row: str, task: str) -> dict:
    return read_json(os.path.join(workdir, row, task, "results.json"))


def test_report_is_each_tasks_results(suite, teacher_workdir):
    workdir, report = suite
    assert read_json(os.path.join(workdir, "glue.json")) == report
    assert [r["name"] for r in report["rows"]] == ["student", "teacher"]
    for row in report["rows"]:
        assert row["model"] == teacher_workdir and row["missing"] == ["rte"]
        assert row["score"] is None and list(row["tasks"]) == ["mrpc"]
        best = _results(workdir, row["name"], "mrpc")["best"]
        assert row["tasks"]["mrpc"] == {
            "score": best["score"], "step": best["step"],
            "workdir": os.path.join(workdir, row["name"], "mrpc"),
            "metrics": {f"dev/{k}": v for k, v in best["metrics"]["dev"].items()}}
        assert set(row["tasks"]["mrpc"]["metrics"]) == {"dev/f1", "dev/accuracy", "dev/loss"}
    student, teacher = (r["tasks"]["mrpc"]["score"] for r in report["rows"])
    assert report["retention"] == {"mrpc": pytest.approx(100 * student / teacher), "score": None}
    table = open(os.path.join(workdir, "glue.md")).read()
    assert table == glue_suite.format_table(report)
    lines = table.splitlines()
    assert lines[2].startswith(f"| student ({teacher_workdir}) | n/a |")
    assert lines[3].startswith(f"| teacher ({teacher_workdir}) | n/a |")
    assert lines[4].startswith("| retention (%) | n/a |") and "missing" in lines[2]


def test_a_rerun_skips_finished_tasks_and_resumes_a_stopped_one(suite, glue_dir, teacher_workdir,
                                                                 tmp_path):
    workdir = str(tmp_path / "suite")
    shutil.copytree(suite[0], workdir)  # Times kept: the finished runs are as they were.
    untouched = {f: os.stat(os.path.join(workdir, "student", "mrpc", f)).st_mtime_ns
                 for f in ("results.json", "metrics.jsonl")}
    run = lambda **kw: glue_suite.run_suite(  # noqa: E731
        _config(), init=teacher_workdir, data_dir=glue_dir, workdir=workdir,
        teacher=teacher_workdir, tasks=["mrpc", "stsb", "rte"], **kw)
    assert run(stop_at_step=1) is None  # Stopped in student/stsb, as by SIGTERM.
    stsb = os.path.join(workdir, "student", "stsb")
    assert not os.path.exists(os.path.join(stsb, "results.json"))
    assert not os.path.exists(os.path.join(workdir, "teacher", "stsb"))  # The suite stopped.

    report = run()
    assert {f: os.stat(os.path.join(workdir, "student", "mrpc", f)).st_mtime_ns
            for f in untouched} == untouched
    steps = [r["step"] for r in map(json.loads, open(os.path.join(stsb, "metrics.jsonl")))
             if "train/loss" in r]
    assert steps == [1, 2]  # Step 1 once: resumed, not restarted.
    assert _results(workdir, "student", "stsb")["last"]["step"] == 2
    for row in report["rows"]:
        assert list(row["tasks"]) == ["mrpc", "stsb"] and row["missing"] == ["rte"]
        for task in ("mrpc", "stsb"):
            assert row["tasks"][task]["score"] == (
                _results(workdir, row["name"], task)["best"]["score"])
    assert read_json(os.path.join(workdir, "glue.json")) == report


def test_a_signal_between_tasks_stops_the_suite(suite, glue_dir, teacher_workdir, tmp_path,
                                                monkeypatch):
    workdir = str(tmp_path / "suite")
    shutil.copytree(suite[0], workdir)
    os.remove(os.path.join(workdir, "glue.json"))
    read = glue_suite.finetune_task

    def then_sigterm(*args, **kwargs):  # SIGTERM after the student's task, outside any run.
        results = read(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        return results

    monkeypatch.setattr(glue_suite, "finetune_task", then_sigterm)
    before = signal.getsignal(signal.SIGTERM)
    assert glue_suite.run_suite(_config(), init=teacher_workdir, data_dir=glue_dir,
                                workdir=workdir, teacher=teacher_workdir, tasks=["mrpc"]) is None
    assert not os.path.exists(os.path.join(workdir, "glue.json"))
    assert signal.getsignal(signal.SIGTERM) == before  # The suite's handler is gone.


def test_a_task_that_cannot_run_is_named_in_the_error(teacher_workdir, tmp_path):
    """QQP's fixture has 4 training rows, fewer than the tiny preset's batch of 8."""
    workdir = tmp_path / "suite"
    with pytest.raises(ValueError, match=r"^student qqp \(.*student/qqp\): 4 training rows are "
                                         r"fewer than one batch of 8"):
        glue_suite.run_suite(_config(), init=teacher_workdir, data_dir=FIXTURES,
                             workdir=str(workdir), tasks=["qqp"])


def test_a_teacher_read_from_its_glue_json(suite, glue_dir, teacher_workdir, tmp_path):
    earlier, earlier_report = suite
    workdir = tmp_path / "student_suite"
    shutil.copytree(os.path.join(earlier, "student"), workdir / "student")  # MRPC: done.
    report = glue_suite.run_suite(_config(), init=teacher_workdir, data_dir=glue_dir,
                                  workdir=str(workdir), tasks=["mrpc"],
                                  teacher=os.path.join(earlier, "glue.json"))
    assert report["rows"][1] == {**earlier_report["rows"][0], "name": "teacher"}
    assert not (workdir / "teacher").exists()
    assert report["retention"] == {"mrpc": pytest.approx(100.0), "score": None}
    (tmp_path / "other.json").write_text('{"rows": []}')
    with pytest.raises(ValueError, match="is not a glue.json"):
        glue_suite.run_suite(_config(), init=teacher_workdir, data_dir=glue_dir,
                             workdir=str(workdir), teacher=str(tmp_path / "other.json"))


def test_the_command_line(suite, glue_dir, teacher_workdir, tmp_path):
    """A finished suite, rerun by the command (nothing trains), and a --data_dir that is not
    there; both at once."""
    workdir = str(tmp_path / "suite")
    shutil.copytree(suite[0], workdir)
    command = [sys.executable, "-m", "distil_flax.glue", f"--init={teacher_workdir}",
               f"--teacher={teacher_workdir}", "--config=configs/glue.py:preset=tiny",
               "--config.train.num_steps=2"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cases = {"rerun": [*command, f"--data_dir={glue_dir}", f"--workdir={workdir}",
                       "--tasks=mrpc,rte", "--config.train.learning_rate=0.02"],
             "no data": [*command, f"--data_dir={tmp_path / 'nowhere'}",
                         f"--workdir={tmp_path / 'out'}"]}
    running = {name: subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True)
               for name, argv in cases.items()}
    (out, err), (_, no_data) = (p.communicate(timeout=300) for p in running.values())
    assert running["rerun"].returncode == 0, err[-2000:]
    assert out == open(os.path.join(workdir, "glue.md")).read()
    assert out.splitlines()[0].startswith("| Model | Score | CoLA |")
    assert "No data for rte" in err and "done (results.json)" in err
    # The override reached every task's config: the finished ones say they ran with another.
    assert "train.learning_rate=0.01 (now 0.02)" in err
    assert running["no data"].returncode == 1
    assert no_data.strip().splitlines()[-1] == (
        f"error: --data_dir='{tmp_path / 'nowhere'}' does not exist")
    assert not os.path.exists(tmp_path / "out")
