"""Held-out clean images: the per-epoch accuracy curve and the trigger-free epoch selection."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from backdoor_cli.checkpoint import read_checkpoint
from backdoor_cli.cli import app
from backdoor_cli.data.datasets import ImageSet
from backdoor_cli.errors import ConfigError
from backdoor_cli.evaluation.measure import top1_accuracy
from backdoor_cli.selection.holdout import HoldoutMonitor, split_holdout
from helpers import train_toy_model

MEAN, STD = torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1)


def _images(n=40, classes=4):
    y = torch.arange(n) % classes
    x = (y * 60).to(torch.uint8).view(n, 1, 1, 1).expand(n, 2, 2, 1).contiguous()
    return ImageSet(x, y)


class Lookup(torch.nn.Module):
    """Predicts class round(pixel * 255 / 60) when `right`, else always class 0."""

    def __init__(self):
        super().__init__()
        self.right = torch.nn.Parameter(torch.tensor(1.0))

    def forward(self, x):
        classes = (x[:, 0, 0, 0] * 255 / 60).round().long()
        good = torch.nn.functional.one_hot(classes, 4).float()
        bad = torch.nn.functional.one_hot(torch.zeros_like(classes), 4).float()
        return self.right * good + (1 - self.right) * bad


def test_split_is_class_balanced_disjoint_and_seeded():
    clean = _images()
    tune, held = split_holdout(clean, 0.25, seed=0, num_classes=4)
    assert tune.num_images + held.num_images == 40 and held.num_images == 10
    counts = torch.bincount(held.y, minlength=4)
    assert int(counts.max() - counts.min()) <= 1
    again = split_holdout(clean, 0.25, seed=0, num_classes=4)[1]
    assert torch.equal(again.x, held.x) and torch.equal(again.y, held.y)
    with pytest.raises(ConfigError, match="holdout-fraction"):
        split_holdout(clean, 1.5, 0, 4)


def test_latest_epoch_within_the_budget_is_kept_and_restored():
    images, model = _images(), Lookup()
    monitor = HoldoutMonitor(images, top1_accuracy(model, images, MEAN, STD), budget=0.1)
    assert monitor.base_acc == 1.0
    for epoch, right in ((1, 1.0), (2, 1.0), (3, 0.0)):  # epoch 3 collapses to class 0 (25%)
        with torch.no_grad():
            model.right.fill_(right)
        monitor.observe(model, epoch, MEAN, STD)
    assert [c["within_budget"] for c in monitor.curve] == [True, True, False]
    assert "epoch 2" in monitor.restore(model, last_epoch=3)
    assert float(model.right.detach()) == 1.0 and monitor.to_dict()["selected_epoch"] == 2


def test_without_a_budget_or_an_acceptable_epoch_the_last_is_kept():
    images, model = _images(), Lookup()
    free = HoldoutMonitor(images, 1.0, budget=None)
    free.observe(model, 1, MEAN, STD)
    assert free.restore(model, 1).startswith("no budget")
    strict = HoldoutMonitor(images, 1.0, budget=0.0)
    with torch.no_grad():
        model.right.fill_(0.0)
    strict.observe(model, 1, MEAN, STD)
    assert "no epoch stayed within" in strict.restore(model, 1) and float(model.right.detach()) == 0.0


def _purify(toy, out, *extra, data=None):
    result = CliRunner().invoke(
        app,
        [
            "purify",
            str(toy["model"]),
            "--data",
            str(data or toy["data"]),
            "--out",
            str(out),
            "--method",
            "ft-init",
            "--epochs",
            "4",
            "--clean-count",
            "120",
            "--holdout-fraction",
            "0.25",
            "--device",
            "cpu",
            "--quiet",
            "--json",
            *extra,
        ],
    )
    assert result.exit_code in (0, 1), result.output
    return json.loads(result.stdout), read_checkpoint(out / "purified.safetensors").state_dict


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return train_toy_model(tmp_path_factory.mktemp("holdout"), epochs=2)


def test_cli_reports_the_curve_and_respects_the_budget(toy, tmp_path):
    report, _ = _purify(toy, tmp_path / "a", "--select-budget", "5%")
    held = report["clean_data"]["holdout"]
    assert held["images"] == 30 and report["clean_data"]["tuned_on"] == 90 and len(held["curve"]) == 4
    within = [c["epoch"] for c in held["curve"] if held["input_acc"] - c["holdout_acc"] <= 0.05]
    assert held["selected_epoch"] == (within[-1] if within else None)
    assert all(c["within_budget"] == (c["epoch"] in within) for c in held["curve"])


def test_selection_never_reads_the_test_set_or_the_trigger(toy, tmp_path):
    """Same clean data, different test images and no trigger: the same epoch and the same weights."""
    first, weights = _purify(toy, tmp_path / "a", "--select-budget", "5%")
    other = tmp_path / "data"
    shutil.copytree(toy["data"], other)
    with np.load(other / "test.npz") as f:
        x, y = f["x"], f["y"]
    np.savez(other / "test.npz", x=255 - x, y=(y + 1) % 3)  # different test images and labels
    second, weights2 = _purify(toy, tmp_path / "b", "--select-budget", "5%", "--target", "1", data=other)
    assert first["clean_data"]["holdout"]["curve"] == second["clean_data"]["holdout"]["curve"]
    assert first["clean_data"]["holdout"]["selected_epoch"] == second["clean_data"]["holdout"]["selected_epoch"]
    assert all(torch.equal(weights[k], weights2[k]) for k in weights)
    assert (first["trigger"]["target"], second["trigger"]["target"]) == (0, 1)  # the trigger really differed
