"""examples/ci/gate.sh, run as a CI step would run it (a subprocess with the installed `bdclean`)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from backdoor_cli.cli import app
from helpers import BDCLEAN, NEEDS_BDCLEAN_AND_BASH, make_npz_dataset

REPO = Path(__file__).resolve().parents[1]
GATE = REPO / "examples" / "ci" / "gate.sh"
pytestmark = NEEDS_BDCLEAN_AND_BASH


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("gate")
    data = make_npz_dataset(root / "data")
    model = root / "model.safetensors"
    result = CliRunner().invoke(
        app,
        [
            "train",
            "--arch",
            "test_tiny",
            "--data",
            str(data),
            "--out",
            str(model),
            "--epochs",
            "3",
            "--device",
            "cpu",
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    return root, data, model


def _trigger(root: Path, target: int) -> Path:
    # A patch covering the whole 12x12 image turns it white, which this toy model reads as its brightest
    # class (2): a trigger that "works" on every model, so both gate outcomes are reproducible in seconds.
    path = root / f"white-{target}.yaml"
    path.write_text(f"type: patch\nsize: 12\ncolor: 255\ntarget: {target}\n")
    return path


def _gate(root, data, model, trigger, work, purify_args=""):
    env = {
        **os.environ,
        "BDCLEAN": str(BDCLEAN),
        "BDCLEAN_ARGS": f"--trigger {trigger} --device cpu",
        "BDCLEAN_PURIFY_ARGS": f"--clean-count 30 --epochs 1 {purify_args}",
    }
    return subprocess.run(
        ["bash", str(GATE), str(model), str(data), str(work)], capture_output=True, text=True, env=env, timeout=300
    )


def test_gate_passes_a_model_the_trigger_does_not_move(toy, tmp_path):
    root, data, model = toy
    proc = _gate(root, data, model, _trigger(tmp_path, target=0), tmp_path / "w")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "passes" in proc.stdout and not (tmp_path / "w" / "purify.json").exists()
    assert json.loads((tmp_path / "w" / "suspect.json").read_text())["metrics"]["asr"]["value"] <= 0.10


def test_gate_blocks_then_purifies(toy, tmp_path):
    root, data, model = toy
    proc = _gate(root, data, model, _trigger(tmp_path, target=2), tmp_path / "w")
    assert "BLOCKED" in proc.stdout, proc.stdout + proc.stderr
    assert json.loads((tmp_path / "w" / "suspect.json").read_text())["metrics"]["asr"]["value"] > 0.10
    report = json.loads((tmp_path / "w" / "purify.json").read_text())
    passed = all(g["passed"] for g in report["gates"])
    # The verdict printed and the exit code must be the ones the purification report implies.
    assert (proc.returncode, "PASSED" in proc.stdout) == ((0, True) if passed else (1, False)), proc.stdout
    assert (tmp_path / "w" / "purified" / "purified.safetensors").is_file()


def test_gate_fails_the_build_when_purification_misses_a_gate(toy, tmp_path):
    root, data, model = toy
    proc = _gate(root, data, model, _trigger(tmp_path, target=2), tmp_path / "w", purify_args="--min-acc 100%")
    assert proc.returncode == 1 and "FAILED" in proc.stdout, proc.stdout + proc.stderr
    assert (tmp_path / "w" / "purified" / "purified.safetensors").is_file()  # written even when a gate fails


def test_gate_passes_through_tool_errors(toy, tmp_path):
    root, data, _ = toy
    proc = _gate(root, data, tmp_path / "missing.safetensors", _trigger(tmp_path, target=0), tmp_path / "w")
    assert proc.returncode == 2 and "failed with exit code 2" in proc.stdout
