"""examples/ci/scan_gate.sh, run as a CI step would run it: a model whose trigger nobody knows, a clean model
of the same task, the installed `bdclean` in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from backdoor_cli.checkpoint import read_checkpoint
from helpers import BDCLEAN, NEEDS_BDCLEAN_AND_BASH, make_template_dataset, train_small_cnn

REPO = Path(__file__).resolve().parents[1]
GATE = REPO / "examples" / "ci" / "scan_gate.sh"
pytestmark = NEEDS_BDCLEAN_AND_BASH


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("scan-gate")
    data = make_template_dataset(root / "data")
    backdoored = train_small_cnn(data, root / "bd.safetensors", "--trigger", "badnets", "--poison-rate", "0.1")
    suspect = root / "suspect.safetensors"  # the weights only: no trigger recorded, nothing to lean on
    save_file({k: v.contiguous() for k, v in read_checkpoint(str(backdoored)).state_dict.items()}, str(suspect))
    clean = train_small_cnn(data, root / "clean.safetensors")
    return {"root": root, "data": data, "suspect": suspect, "clean": clean}


def _gate(suspect, reference, data, work):
    env = {
        **os.environ,
        "BDCLEAN": str(BDCLEAN),
        "BDCLEAN_ARGS": "--device cpu --arch simple_cnn_half",
        "BDCLEAN_SCAN_ARGS": "--clean-count 160 --steps 100",
        "BDCLEAN_PURIFY_ARGS": "--clean-count 400",
    }
    command = ["bash", str(GATE), str(suspect), str(reference), str(data), str(work)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


def test_a_planted_trigger_is_caught_removed_and_verified_without_it(models, tmp_path):
    proc = _gate(models["suspect"], models["clean"], models["data"], tmp_path / "w")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "BLOCKED - a backdoor is suspected" in proc.stdout and "PASSED - removal verified" in proc.stdout
    scan = json.loads((tmp_path / "w" / "scan.json").read_text())
    assert scan["suspected_classes"] == [0]
    purified = json.loads((tmp_path / "w" / "purify.json").read_text())
    assert purified["trigger"] is None and purified["removal"]["verdict"] == "verified"
    assert (tmp_path / "w" / "purified" / "purified.safetensors").is_file()


def test_a_clean_model_passes_at_the_scan(models, tmp_path):
    proc = _gate(models["clean"], models["clean"], models["data"], tmp_path / "w")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no backdoor suspected" in proc.stdout and not (tmp_path / "w" / "purify.json").exists()


def test_a_removal_nothing_can_verify_fails_the_gate(models, tmp_path):
    """A reference with random weights is too weak to be evidence: the scan still suspects the backdoor, the
    purify cannot verify its removal, and the gate fails with exit 1."""
    weak = tmp_path / "weak.safetensors"
    generator = torch.Generator().manual_seed(0)
    state = read_checkpoint(str(models["suspect"])).state_dict
    save_file({k: torch.randn(v.shape, generator=generator) * 0.01 for k, v in state.items()}, str(weak))
    proc = _gate(models["suspect"], weak, models["data"], tmp_path / "w")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAILED - the removal could not be verified" in proc.stdout
    purified = json.loads((tmp_path / "w" / "purify.json").read_text())
    assert purified["removal"]["verdict"] != "verified" and not purified["scan"]["reference"]["usable"]


def test_a_scan_that_cannot_run_stops_the_gate_with_its_exit_code(models, tmp_path):
    proc = _gate(tmp_path / "missing.safetensors", models["clean"], models["data"], tmp_path / "w")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "the scan failed with exit code 2" in proc.stdout
