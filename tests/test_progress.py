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
