"""progress.py: the up-front time estimate and the silent default reporter."""

from __future__ import annotations

from backdoor_cli.progress import Reporter, StderrReporter, step_callback


class Recorder(Reporter):
    def __init__(self):
        self.infos, self.steps = [], []

    def info(self, message):
        self.infos.append(message)

    def advance(self, step):
        self.steps.append(step)


def test_estimate_is_given_once_after_warm_up_for_long_loops():
    reporter = Recorder()
    on_step = step_callback(reporter, "training", total=100)
    for step in range(1, 11):
        on_step(step)
    assert reporter.steps == list(range(1, 11))
    assert len(reporter.infos) == 1 and reporter.infos[0].startswith("estimated training time:")
    assert "100 steps" in reporter.infos[0]


def test_no_estimate_for_short_loops():
    reporter = Recorder()
    on_step = step_callback(reporter, "tuning", total=4)
    for step in range(1, 5):
        on_step(step)
    assert reporter.infos == []


def test_stderr_reporter_prints_markup_literally(capsys):
    StderrReporter().warn("pip install 'bdclean[plot]'")
    assert "bdclean[plot]" in capsys.readouterr().err


def test_no_live_bar_when_stderr_is_not_a_terminal(capsys):
    reporter = StderrReporter()  # pytest captures stderr: not a terminal
    reporter.start_steps("tuning", 5)
    assert reporter._progress is None
    reporter.advance(1)
    reporter.epoch("epoch 1/1: loss 0.1")
    reporter.finish_steps()
    assert "epoch 1/1: loss 0.1" in capsys.readouterr().err


def test_terminal_bar_has_no_refresh_thread_and_stops_at_once():
    import io
    import threading
    import time

    from rich.console import Console

    reporter = StderrReporter()
    reporter.console = Console(file=io.StringIO(), force_terminal=True, width=100)
    threads = threading.active_count()
    reporter.start_steps("tuning", 3)
    assert reporter._progress is not None and threading.active_count() == threads  # nothing polls in the background
    for step in (1, 2, 3):
        reporter.advance(step)
    start = time.perf_counter()
    reporter.finish_steps()
    assert time.perf_counter() - start < 0.2 and reporter._progress is None
    assert "tuning" in reporter.console.file.getvalue()
