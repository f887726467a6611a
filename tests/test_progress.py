"""Progress of long commands: the moving-window rate and ETA, plain lines off a terminal, a bar
on one, and what training logs (steps/s and ETA without compilation or evaluation)."""

import io
import logging as py_logging
import os

import pytest
from absl import logging

from distil_flax.distill import train
from distil_flax.training import progress
from distil_flax.training.config_files import load_config
from distil_flax.training.metric_writers import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(progress.time, "perf_counter", clock)
    return clock


def _lines(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno == py_logging.INFO]


def test_rate_is_the_mean_over_the_window_of_intervals():
    rate = progress.Rate(window=2)
    assert rate.per_second() is None and rate.eta(10) is None
    rate.add(10, 10.0)  # 1/s, then pushed out of the window.
    rate.add(4, 1.0)
    rate.add(6, 1.0)
    assert rate.per_second() == pytest.approx(5.0)
    assert rate.eta(20) == pytest.approx(4.0)
    rate.add(0, 5.0)  # An interval without progress (a pause) is not a measurement.
    assert rate.per_second() == pytest.approx(5.0)


def test_plain_lines_carry_count_rate_eta_and_info(clock, monkeypatch, caplog):
    monkeypatch.setenv(progress.SECONDS_ENV, "10")
    caplog.set_level(py_logging.INFO)
    with progress.Progress("prepare", 40, "units") as shown:
        clock.now += 2
        shown.update(4, documents=1204, tokens=310552)  # 2 units/s; not 10 s since the start.
        assert _lines(caplog) == []
        clock.now += 9
        shown.update(2)
        clock.now += 50  # A pause the caller leaves out of the rate.
        shown.set(6, measure=False)
        clock.now += 1
        shown.update(2)
    first, during_pause, last = _lines(caplog)
    # (4 + 2) units in (2 + 9) s; 34 left.
    assert first == during_pause == ("prepare: 6/40 units (15%) | 0.545 units/s | ETA 1m02s | "
                                     "documents 1,204, tokens 310,552")
    # The pause is out of the window: 8 units in 12 s.
    assert last.startswith("prepare: 8/40 units (20%) | 0.667 units/s | ETA 48s | documents")
    assert last.endswith("| done in 1m02s")


def test_every_update_logs_at_zero_seconds_and_an_unknown_total_has_no_eta(clock, monkeypatch,
                                                                            caplog):
    monkeypatch.setenv(progress.SECONDS_ENV, "0")
    caplog.set_level(py_logging.INFO)
    shown = progress.Progress("read", None, "documents")
    for _ in progress.track(["a", "b", "c"], shown):
        clock.now += 0.5
    lines = _lines(caplog)
    assert lines[:3] == ["read: 1 documents | 2 documents/s", "read: 2 documents | 2 documents/s",
                         "read: 3 documents | 2 documents/s"]
    assert lines[3] == "read: 3 documents | 2 documents/s | done in 2s"  # track closes it.


def test_a_stopped_command_says_so_and_another_process_shows_nothing(clock, caplog):
    caplog.set_level(py_logging.INFO)
    with pytest.raises(KeyboardInterrupt):
        with progress.Progress("evaluate", 10, "sentences") as shown:
            shown.update(3)
            raise KeyboardInterrupt
    assert _lines(caplog)[-1].endswith("| stopped after 0s")
    with progress.Progress("evaluate", 10, "sentences", enabled=False) as shown:
        shown.update(10)
    assert len(_lines(caplog)) == 1


def test_a_terminal_gets_a_bar_and_log_lines_above_it(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    monkeypatch.setattr(progress.sys, "stderr", terminal)
    handler = logging.get_absl_handler().python_handler
    before, log = handler.stream, io.StringIO()
    handler.setStream(log)
    try:
        with progress.Progress("train", 8, "steps") as shown:
            assert handler.stream is not log  # Lines go through tqdm, above the bar.
            shown.update(4, loss=1.5)
            handler.stream.write("a line while the bar is drawn\n")
        assert handler.stream is log
    finally:
        handler.setStream(before)
    text = terminal.getvalue()
    assert "train:" in text and "4/8" in text and "loss 1.5" in text
    assert log.getvalue() == "a line while the bar is drawn\n"


def test_training_logs_steps_per_second_and_an_eta_without_compilation(tmp_path, vocab_path,
                                                                       teacher_workdir, caplog):
    c = load_config(os.path.join(ROOT, "configs/quickstart.py:tiny"))
    c.data.tokenizer, c.teacher.checkpoint = vocab_path, teacher_workdir
    c.train.num_steps, c.train.log_every, c.train.eval_every = 12, 3, 6
    caplog.set_level(py_logging.INFO)
    train.train_and_evaluate(c, str(tmp_path))
    logged = [r for r in read_metrics(str(tmp_path)) if "train/loss" in r]
    assert [r["step"] for r in logged] == [3, 6, 9, 12]
    for record in logged:
        # The first interval is measured from the end of the compiling step, so it is a rate.
        rate, eta = record["train/steps_per_s"], record["train/eta_s"]
        assert rate > 0 and eta == pytest.approx((12 - record["step"]) / rate, rel=1e-6)
        # The window holds only training intervals: its rate is no slower than the slowest.
        assert rate >= 0.99 / max(r["train/step_time_s"] for r in logged)
    lines = [m for m in _lines(caplog) if m.startswith("[train/] step 9/12")]
    assert len(lines) == 1 and " | steps/s " in lines[0] and " | ETA " in lines[0]


def test_fast_rates_are_whole_numbers(clock):
    shown = progress.Progress("read", None, "documents", enabled=False)
    clock.now += 0.01
    shown.update(12)
    assert shown.line() == "read: 12 documents | 1,200 documents/s"
