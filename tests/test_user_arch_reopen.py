"""A model with the user's own architecture file goes through train -> purify -> evaluate/compare.

The user's `--arch` on the command line is honoured for a checkpoint whose metadata names a file
architecture (the file's own word is never acted on: that would run code a checkpoint names)."""

from __future__ import annotations

import hashlib
import json
import textwrap

import pytest
from typer.testing import CliRunner

from backdoor_cli.checkpoint import read_checkpoint
from backdoor_cli.cli import app
from helpers import make_npz_dataset

MODEL_FILE = textwrap.dedent("""
    import torch
    from torch import nn

    def small(num_classes, in_channels=3):
        return nn.Sequential(nn.Conv2d(in_channels, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, num_classes))
""")


def run(*args):
    result = CliRunner().invoke(app, [*map(str, args), "--device", "cpu", "--quiet"])
    return result


@pytest.fixture(scope="module")
def purified(tmp_path_factory):
    root = tmp_path_factory.mktemp("userarch")
    (root / "my_model.py").write_text(MODEL_FILE)
    arch = f"{root / 'my_model.py'}:small"
    data = make_npz_dataset(root / "data", classes=3, size=12, n_train=120, n_test=60)
    model = root / "bd.safetensors"
    result = run(
        "train",
        "--arch",
        arch,
        "--data",
        data,
        "--out",
        model,
        "--trigger",
        "badnets",
        "--poison-rate",
        "0.1",
        "--epochs",
        "1",
    )
    assert result.exit_code == 0, result.output
    out = root / "purified"
    result = run("purify", model, "--arch", arch, "--data", data, "--out", out, "--method", "ft", "--epochs", "1")
    assert result.exit_code == 0, result.output
    return {"root": root, "arch": arch, "data": data, "model": model, "purified": out / "purified.safetensors"}


def test_purified_user_architecture_reopens_with_arch(purified):
    """Failed before: 'embedded metadata names the architecture ..., which is not built in'."""
    result = run("evaluate", purified["purified"], "--arch", purified["arch"], "--data", purified["data"], "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["checkpoint"]["arch"] == purified["arch"]
    assert report["checkpoint"]["resolved_from"]["arch"] == "flag"
    # The rest of the metadata still applies: the trigger recorded at training is evaluated.
    assert report["trigger"]["target"] == 0 and report["metrics"]["asr"] is not None


def test_compare_input_and_purified_with_a_user_architecture(purified):
    result = run(
        "compare",
        purified["model"],
        purified["purified"],
        "--arch",
        purified["arch"],
        "--data",
        purified["data"],
        "--json",
    )
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["rows"]) == 2


def test_metadata_records_the_factory_and_the_file_hash(purified):
    digest = hashlib.sha256((purified["root"] / "my_model.py").read_bytes()).hexdigest()
    for path in (purified["model"], purified["purified"]):
        meta = read_checkpoint(path).metadata
        assert meta["arch"] == purified["arch"]
        assert meta["arch_source"] == {"file": "my_model.py", "factory": "small", "sha256": digest}


def test_without_arch_the_error_names_the_exact_flag_to_pass(purified):
    result = run("evaluate", purified["purified"], "--data", purified["data"])
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert "will not run code named by a checkpoint" in text
    assert f"pass --arch {purified['arch']}" in text


def test_a_changed_architecture_file_is_warned_about(purified, tmp_path):
    changed = tmp_path / "my_model.py"
    changed.write_text(MODEL_FILE + "\n# edited since the model was made\n")
    result = CliRunner().invoke(
        app,
        [
            "evaluate",
            str(purified["purified"]),
            "--arch",
            f"{changed}:small",
            "--data",
            str(purified["data"]),
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "differs from the one that built" in " ".join(result.output.split())
    same = CliRunner().invoke(
        app,
        [
            "evaluate",
            str(purified["purified"]),
            "--arch",
            purified["arch"],
            "--data",
            str(purified["data"]),
            "--device",
            "cpu",
        ],
    )
    assert "differs from the one that built" not in same.output


def test_the_users_arch_beats_a_built_in_name_in_the_metadata(purified, tmp_path):
    """A built-in name in the metadata is also overridden by --arch (here: with a wrong one, which
    then fails strict loading with the key diff, not silently)."""
    result = run("evaluate", purified["purified"], "--arch", "test_tiny", "--data", purified["data"])
    assert result.exit_code == 2
    assert "checkpoint does not fit the model" in result.output
