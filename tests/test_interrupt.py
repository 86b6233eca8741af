"""Ctrl-C: a real SIGINT to a `bdclean` process mid-run exits 130 with a one-line message and leaves
no output files (complete or partial) and no temp files behind."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from backdoor_cli.cli import app
from helpers import make_npz_dataset

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """Enough toy data that tuning takes many seconds, and a small model to tune (trained in-process)."""
    root = tmp_path_factory.mktemp("interrupt")
    data = make_npz_dataset(root / "data", n_train=1500, n_test=60)
    model = root / "bd.safetensors"
    result = runner.invoke(
        app,
        [
            "train",
            "--arch",
            "test_tiny",
            "--data",
            str(data),
            "--out",
            str(model),
            "--trigger",
            "badnets",
            "--poison-rate",
            "0.1",
            "--epochs",
            "1",
            "--train-limit",
            "240",
            "--device",
            "cpu",
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    return {"root": root, "data": data, "model": model}


def _start(args: list[str]) -> tuple[subprocess.Popen, queue.Queue]:
    """Start `bdclean ARGS` in its own process; stderr lines arrive on the returned queue."""
    command = [
        sys.executable,
        "-c",
        "import sys; from backdoor_cli.cli import main; sys.argv[0] = 'bdclean'; main()",
        *args,
    ]
    # A shell that starts jobs in the background (nohup, `&` without job control) passes SIGINT on as
    # ignored, and Python then never raises KeyboardInterrupt: restore the default as a terminal would.
    proc = subprocess.Popen(
        command,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "COLUMNS": "200", "BDCLEAN_DEBUG": ""},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    lines: queue.Queue = queue.Queue()

    def pump():
        for line in proc.stderr:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return proc, lines


def _wait_for(lines: queue.Queue, needle: str, seen: list[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            break
        if line is None:
            break
        seen.append(line)
        if needle in line:
            return
    pytest.fail(f"never saw {needle!r} on stderr:\n{''.join(seen)}")


def _interrupt(proc: subprocess.Popen, lines: queue.Queue, seen: list[str]) -> tuple[int, str, str]:
    proc.send_signal(signal.SIGINT)
    stdout = ""
    try:
        code = proc.wait(timeout=60)
        stdout = proc.stdout.read()
    finally:
        if proc.poll() is None:  # pragma: no cover - only when the process ignored SIGINT
            proc.kill()
            pytest.fail("the process did not stop within 60 s of SIGINT")
    while True:
        line = lines.get(timeout=10)
        if line is None:
            break
        seen.append(line)
    return code, stdout, "".join(seen)


def _leftovers(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def test_sigint_during_purify_tuning(toy, tmp_path):
    out = tmp_path / "out"
    proc, lines = _start(
        [
            "purify",
            str(toy["model"]),
            "--data",
            str(toy["data"]),
            "--out",
            str(out),
            "--clean-count",
            "1500",
            "--epochs",
            "300",
            "--batch-size",
            "16",
            "--device",
            "cpu",
        ]
    )
    seen: list[str] = []
    try:
        _wait_for(lines, "epoch 1/300", seen)  # one epoch done, so we are mid-tuning, not loading
    except BaseException:
        proc.kill()
        raise
    code, stdout, stderr = _interrupt(proc, lines, seen)
    assert code == 130, stderr
    assert "interrupted" in stderr.lower() and "Traceback" not in stderr, stderr
    tail = stderr[stderr.lower().index("interrupted") :].strip().splitlines()
    assert len(tail) <= 3, stderr
    assert stdout == ""
    assert _leftovers(out) == [], "outputs or temp files were left behind"


def test_sigint_during_train(toy, tmp_path):
    model = tmp_path / "model.safetensors"
    proc, lines = _start(
        [
            "train",
            "--arch",
            "test_tiny",
            "--data",
            str(toy["data"]),
            "--out",
            str(model),
            "--epochs",
            "300",
            "--batch-size",
            "16",
            "--device",
            "cpu",
        ]
    )
    seen: list[str] = []
    try:
        _wait_for(lines, "epoch 1/300", seen)
    except BaseException:
        proc.kill()
        raise
    code, stdout, stderr = _interrupt(proc, lines, seen)
    assert code == 130, stderr
    assert "interrupted" in stderr.lower() and "Traceback" not in stderr, stderr
    assert stdout == ""
    assert _leftovers(tmp_path) == []


def test_ctrl_c_while_writing_outputs_leaves_no_partial_set(toy, tmp_path, monkeypatch):
    """Ctrl-C landing between two output files (simulated in-process at the report step)."""
    import backdoor_cli.usecases.purify as purify

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(purify, "stage_purify_report", interrupted)
    out = tmp_path / "out"
    result = runner.invoke(
        app,
        [
            "purify",
            str(toy["model"]),
            "--data",
            str(toy["data"]),
            "--out",
            str(out),
            "--clean-count",
            "30",
            "--epochs",
            "1",
            "--device",
            "cpu",
            "--quiet",
        ],
    )
    assert result.exit_code == 130, result.output
    assert "interrupted" in result.stderr
    assert _leftovers(out) == []
