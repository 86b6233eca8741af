"""augmentation.py: purify decides crop and flip from the data (none for single-channel images), says
so in one line and in report.json, and --augment / --no-augment still override (issue 21)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from backdoor_cli.cli import app
from backdoor_cli.data.augmentation import decide_augmentation
from backdoor_cli.data.datasets import load_dataset
from helpers import make_npz_dataset, train_toy_model

runner = CliRunner()


@pytest.fixture(scope="module")
def gray(tmp_path_factory) -> dict:
    """A BadNets test_tiny model on single-channel toy data (an unknown name: no dataset defaults)."""
    return train_toy_model(tmp_path_factory.mktemp("gray"), epochs=1, channels=1)


def purify(made: dict, out, *args):
    return runner.invoke(
        app,
        [
            "purify",
            str(made["model"]),
            "--data",
            str(made["data"]),
            "--out",
            str(out),
            "--method",
            "ft",
            "--epochs",
            "1",
            "--clean-count",
            "40",
            "--device",
            "cpu",
            *args,
        ],
    )


@pytest.mark.parametrize(
    "args, crop, by", [((), False, "data"), (("--augment",), True, "flag"), (("--no-augment",), False, "flag")]
)
def test_single_channel_data_is_not_augmented_unless_asked(gray, tmp_path, args, crop, by):
    result = purify(gray, tmp_path / "out", *args)
    assert result.exit_code == 0, result.output
    rule = json.loads((tmp_path / "out" / "report.json").read_text())["method"]["augmentation"]
    assert (rule["crop"], rule["flip"], rule["decided_by"]) == (crop, False, by)  # never a flip for digits
    said = [line for line in result.output.splitlines() if "augmentation:" in line]
    assert len(said) == 1 and ("none" in said[0]) == (not crop)


def test_colour_data_keeps_crop_and_flip(toy_model, tmp_path):
    result = purify(toy_model, tmp_path / "out")
    assert result.exit_code == 0, result.output
    rule = json.loads((tmp_path / "out" / "report.json").read_text())["method"]["augmentation"]
    assert (rule["crop"], rule["flip"], rule["decided_by"]) == (True, True, "data")


def test_a_named_dataset_without_flips_keeps_the_crop(tmp_path):
    bundle = load_dataset(str(make_npz_dataset(tmp_path / "gtsrb", classes=43, channels=3, n_train=86, n_test=86)))
    rule = decide_augmentation(None, bundle)
    assert rule.crop and not rule.flip and "gtsrb" in rule.reason
