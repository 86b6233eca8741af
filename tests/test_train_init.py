"""`bdclean train --init CKPT`: fine-tune a trained checkpoint (e.g. poison a published clean model)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from backdoor_cli.checkpoint import read_checkpoint
from backdoor_cli.cli import app
from helpers import train_toy_model


def run(*args):
    return CliRunner().invoke(app, [*map(str, args), "--device", "cpu", "--quiet"])


def test_init_fine_tunes_the_given_weights_and_records_them(tmp_path):
    toy = train_toy_model(tmp_path, name="clean.safetensors", epochs=1)
    start = read_checkpoint(toy["model"])
    out = tmp_path / "poisoned.safetensors"
    result = run(
        "train",
        "--init",
        toy["model"],
        "--data",
        toy["data"],
        "--out",
        out,
        "--epochs",
        "1",
        "--trigger",
        "badnets",
        "--poison-rate",
        "0.2",
        "--lr",
        "0.01",
        "--json",
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["arch"] == "test_tiny"  # from the starting checkpoint, not the simple_cnn default
    assert report["init"]["sha256"] == start.sha256
    assert 0 <= report["init"]["metrics"]["clean_acc"]["value"] <= 1
    meta = read_checkpoint(out).metadata
    assert meta["init"]["sha256"] == start.sha256 and meta["poison_rate"] == 0.2
    assert meta["normalization"] == start.metadata["normalization"]  # inherited, not the dataset default
    # It really started there: one epoch at a small lr stays close to the starting weights.
    tuned = read_checkpoint(out).state_dict
    assert all(tuned[k].shape == v.shape for k, v in start.state_dict.items())
    drift = max(float((tuned[k] - v).abs().max()) for k, v in start.state_dict.items() if v.is_floating_point())
    assert 0 < drift < 1.0


def test_init_with_the_wrong_architecture_fails_with_the_key_diff(tmp_path):
    toy = train_toy_model(tmp_path, name="clean.safetensors", epochs=1)
    result = run(
        "train",
        "--init",
        toy["model"],
        "--arch",
        "simple_cnn",
        "--data",
        toy["data"],
        "--out",
        tmp_path / "x.safetensors",
        "--epochs",
        "1",
    )
    assert result.exit_code == 2
    assert "checkpoint does not fit the model" in result.output


def test_init_is_never_overwritten(tmp_path):
    toy = train_toy_model(tmp_path, name="clean.safetensors", epochs=1)
    before = toy["model"].read_bytes()
    result = run(
        "train", "--init", toy["model"], "--data", toy["data"], "--out", toy["model"], "--epochs", "1", "--force"
    )
    assert result.exit_code == 2
    assert toy["model"].read_bytes() == before


def test_init_missing_file(tmp_path):
    toy = train_toy_model(tmp_path, name="clean.safetensors", epochs=1)
    result = run("train", "--init", tmp_path / "nope.pt", "--data", toy["data"], "--out", tmp_path / "x.safetensors")
    assert result.exit_code == 2 and "checkpoint not found" in result.output
