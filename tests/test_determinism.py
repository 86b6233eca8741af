"""Same seed, same CPU, same inputs -> byte-identical weights; every report records what is needed to replay."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from backdoor_cli.cli import app
from helpers import train_toy_model

runner = CliRunner()


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return train_toy_model(tmp_path_factory.mktemp("determinism"))


def tensor_hashes(path: Path) -> dict[str, str]:
    """sha256 of every tensor's raw bytes (plus dtype and shape), independent of the file's metadata."""
    from safetensors import safe_open

    hashes = {}
    with safe_open(str(path), "pt") as f:
        for key in sorted(f.keys()):
            t = f.get_tensor(key).contiguous()
            digest = hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
            hashes[key] = digest.hexdigest()
    return hashes


def purify(toy, out: Path, seed: int):
    result = runner.invoke(
        app,
        [
            "purify",
            str(toy["model"]),
            "--method",
            "fst",
            "--data",
            str(toy["data"]),
            "--out",
            str(out),
            "--clean-count",
            "60",
            "--epochs",
            "2",
            "--batch-size",
            "16",
            "--seed",
            str(seed),
            "--device",
            "cpu",
            "--json",
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    return json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def runs(toy, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    reports = {name: purify(toy, root / name, seed) for name, seed in (("a", 7), ("b", 7), ("c", 8))}
    return root, reports


def test_same_seed_gives_identical_weights(runs):
    root, _ = runs
    a, b = tensor_hashes(root / "a" / "purified.safetensors"), tensor_hashes(root / "b" / "purified.safetensors")
    assert a == b
    assert (root / "a" / "clean_indices.txt").read_bytes() == (root / "b" / "clean_indices.txt").read_bytes()


def test_same_seed_gives_identical_metrics(runs):
    _, reports = runs
    for key in ("before", "after"):
        for metric in ("clean_acc", "asr", "ra"):
            assert reports["a"][key][metric]["k"] == reports["b"][key][metric]["k"], (key, metric)
    assert [h["loss"] for h in reports["a"]["history"]] == [h["loss"] for h in reports["b"]["history"]]


def test_other_seed_changes_the_weights(runs):
    """The seed really drives the run (head re-init, subset, batch order, augmentation)."""
    root, reports = runs
    assert tensor_hashes(root / "a" / "purified.safetensors") != tensor_hashes(root / "c" / "purified.safetensors")
    assert reports["a"]["clean_data"]["indices_sha256"] != reports["c"]["clean_data"]["indices_sha256"]


def test_same_seed_gives_identical_files(runs):
    root, _ = runs
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert digest(root / "a" / "purified.safetensors") == digest(root / "b" / "purified.safetensors")


def test_report_records_seed_versions_device(runs):
    root, reports = runs
    report = reports["a"]
    assert report["options"]["seed"] == 7
    assert report["method"]["params"]["seed"] == 7
    env = report["environment"]
    for key in ("bdclean", "torch", "numpy", "python"):
        assert env.get(key), key
    assert env["device"] == "cpu" and env["device_name"]
    assert report["clean_data"]["indices_sha256"]
    from backdoor_cli.checkpoint import read_checkpoint

    meta = read_checkpoint(root / "a" / "purified.safetensors").metadata
    assert meta["purification"]["params"]["seed"] == 7
    assert meta["purification"]["clean_indices_sha256"] == report["clean_data"]["indices_sha256"]
    assert meta["tool_version"] == env["bdclean"]
    written = (root / "a" / "config.yaml").read_text()
    assert "seed: 7" in written


def test_train_same_seed_gives_identical_weights(toy, tmp_path):
    paths = []
    for name in ("x", "y"):
        path = tmp_path / f"{name}.safetensors"
        result = runner.invoke(
            app,
            [
                "train",
                "--arch",
                "test_tiny",
                "--data",
                str(toy["data"]),
                "--out",
                str(path),
                "--trigger",
                "blended",
                "--poison-rate",
                "0.05",
                "--epochs",
                "1",
                "--seed",
                "3",
                "--device",
                "cpu",
                "--quiet",
            ],
        )
        assert result.exit_code == 0, result.output
        paths.append(path)
    assert tensor_hashes(paths[0]) == tensor_hashes(paths[1])
