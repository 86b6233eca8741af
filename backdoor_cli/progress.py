"""Progress reporting for long work. The library calls a Reporter; the CLI passes one that draws on
stderr (stdout is reserved for results), tests and library users get the silent default."""

from __future__ import annotations

import time

REFRESH_SECONDS = 0.25  # the progress bar is redrawn at most this often


class Reporter:
    """Silent reporter: the interface the library calls. Subclasses draw something."""

    def stage(self, message: str) -> None:
        """A step of the pipeline begins (loading, evaluating, tuning, writing)."""

    def info(self, message: str) -> None:
        """A fact worth telling the user (estimated duration, what was picked by default)."""

    def warn(self, message: str) -> None:
        """Something suspicious that does not stop the run."""

    def start_steps(self, description: str, total: int) -> None:
        """A loop of `total` steps begins (tuning or training batches)."""

    def advance(self, step: int) -> None:
        """`step` steps of the current loop are done."""

    def epoch(self, message: str) -> None:
        """One epoch finished; `message` carries its loss and accuracy."""

    def finish_steps(self) -> None:
        """The current loop ended."""


def _escape(text: str) -> str:
    """Messages carry user paths and option names like bdclean[plot]: never parse them as rich markup."""
    from rich.markup import escape

    return escape(text)


class StderrReporter(Reporter):
    """Rich progress bar + messages on stderr. `quiet` keeps warnings only."""

    def __init__(self, quiet: bool = False):
        from rich.console import Console

        self.console = Console(stderr=True)
        self.quiet = quiet
        self._progress = None
        self._task = None
        self._drawn = 0.0
        self._started = time.perf_counter()

    def _elapsed(self) -> str:
        return f"[dim]{time.perf_counter() - self._started:6.1f}s[/dim]"

    def stage(self, message: str) -> None:
        if not self.quiet:
            self.console.print(f"{self._elapsed()} {_escape(message)}", highlight=False)

    def info(self, message: str) -> None:
        if not self.quiet:
            self.console.print(f"{self._elapsed()} [cyan]{_escape(message)}[/cyan]", highlight=False)

    def warn(self, message: str) -> None:
        from rich.markup import escape

        self.console.print(f"[yellow]warning:[/yellow] {escape(message)}", highlight=False)

    def start_steps(self, description: str, total: int) -> None:
        # No bar when stderr is a file or a pipe: a transient bar leaves nothing there anyway.
        if self.quiet or not self.console.is_terminal:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        # auto_refresh=False: no refresh thread. It woke 10 times a second to take the GIL from the loop
        # it reports on (a launch-bound GPU loop feels that), and stop() had to wait for it. The bar
        # is redrawn from advance() instead, at most every REFRESH_SECONDS.
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
            auto_refresh=False,
        )
        self._progress.start()
        self._task = self._progress.add_task(description, total=total)
        self._drawn = time.perf_counter()

    def advance(self, step: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=step)
            now = time.perf_counter()
            if now - self._drawn >= REFRESH_SECONDS:
                self._progress.refresh()
                self._drawn = now

    def epoch(self, message: str) -> None:
        if self._progress is not None:
            self._progress.console.print(f"{self._elapsed()}   {message}", highlight=False)
        elif not self.quiet:
            self.console.print(f"{self._elapsed()}   {message}", highlight=False)

    def finish_steps(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


WARMUP_STEPS = 1  # the first step pays for allocation and kernel selection; it says little about the rest
SAMPLE_STEPS = 5


def step_callback(reporter: Reporter, what: str, total: int):
    """An on_step hook that advances the progress bar and, after a few timed steps, tells the user
    how long the whole loop will take, before they wait for it."""
    marks: dict[str, float] = {"start": time.perf_counter()}

    def on_step(step: int) -> None:
        reporter.advance(step)
        if step == WARMUP_STEPS:
            marks["warm"] = time.perf_counter()
        elif step == WARMUP_STEPS + SAMPLE_STEPS and total > step and "warm" in marks:  # short loops need none
            now = time.perf_counter()
            per_step = (now - marks["warm"]) / (step - WARMUP_STEPS)
            estimate = (now - marks["start"]) + per_step * (total - step)
            reporter.info(f"estimated {what} time: {estimate:.0f}s ({total} steps, {per_step * 1000:.0f} ms/step)")

    return on_step
