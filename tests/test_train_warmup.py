"""`bdclean train --warmup-epochs`: a linear warm-up of the rate, and the warning when a run did not learn."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from backdoor_cli.checkpoint import read_checkpoint
from backdoor_cli.cli import app
from backdoor_cli.data.datasets import ImageSet
from backdoor_cli.errors import ConfigError
from backdoor_cli.models import build_model
from backdoor_cli.tuning import loop
from backdoor_cli.tuning.loop import TuneSettings, tune
from backdoor_cli.tuning.sgd import SgdSettings
from helpers import make_npz_dataset


def run(*args):
    return CliRunner().invoke(app, [*map(str, args), "--device", "cpu", "--quiet"])


def _tiny_set(n: int = 32) -> ImageSet:
    gen = torch.Generator().manual_seed(0)
    return ImageSet(torch.randint(0, 256, (n, 8, 8, 3), generator=gen, dtype=torch.uint8), torch.arange(n) % 3)


def _rates_of(monkeypatch, settings: TuneSettings) -> list[float]:
    """Every rate the loop gives the optimiser, in order."""
    seen: list[float] = []

    class Recording(loop.Sgd):
        def set_lr(self, lr: float) -> None:
            seen.append(lr)
            super().set_lr(lr)

    monkeypatch.setattr(loop, "Sgd", Recording)
    model = build_model("test_tiny", 3, 3)
    mean, std = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)
    tune(model, _tiny_set(), mean, std, settings, torch.device("cpu"), precision="fp32")
    return seen


def test_warmup_ramps_the_rate_over_its_steps_then_follows_the_schedule(monkeypatch):
    # 32 images in batches of 8: 4 steps an epoch; one warm-up epoch ramps 1/4, 2/4, 3/4, 4/4 of the rate.
    sgd = SgdSettings(epochs=3, lr=0.1, batch_size=8, augment=False, warmup_epochs=1)
    rates = _rates_of(monkeypatch, TuneSettings(sgd))
    assert rates[:4] == pytest.approx([0.025, 0.05, 0.075, 0.1])
    # then only the cosine schedule's per-epoch rates (0.075 after epoch 1 of 3, 0.025 after epoch 2)
    assert sorted(set(round(r, 6) for r in rates[4:])) == pytest.approx([0.0, 0.025, 0.075])
    plain = _rates_of(monkeypatch, TuneSettings(SgdSettings(epochs=3, lr=0.1, batch_size=8, augment=False)))
    assert plain == pytest.approx([0.075, 0.025, 0.0])  # no warm-up: the schedule alone, as before


def test_a_warmup_of_half_an_epoch_ends_mid_epoch(monkeypatch):
    sgd = SgdSettings(epochs=2, lr=0.2, batch_size=8, augment=False, warmup_epochs=0.5)
    rates = _rates_of(monkeypatch, TuneSettings(sgd))
    assert rates[:3] == pytest.approx([0.1, 0.2, 0.2])  # 2 warm-up steps, then the epoch's own rate


def test_tune_refuses_a_warmup_longer_than_the_run():
    sgd = SgdSettings(epochs=1, lr=0.1, batch_size=8, warmup_epochs=2)
    model = build_model("test_tiny", 3, 3)
    with pytest.raises(ConfigError, match="warm-up epochs"):
        tune(
            model, _tiny_set(), torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1), TuneSettings(sgd), torch.device("cpu")
        )


def train_tiny(data, out, *extra):
    """`bdclean train` a test_tiny model on `data` into `out` (extra: more flags)."""
    return run("train", "--arch", "test_tiny", "--data", data, "--out", out, *extra)


def test_train_refuses_a_warmup_longer_than_the_run_by_name(tmp_path):
    result = train_tiny(
        make_npz_dataset(tmp_path / "data"), tmp_path / "m.safetensors", "--epochs", "1", "--warmup-epochs", "2"
    )
    assert result.exit_code == 2, result.output
    assert "--warmup-epochs" in result.output
    assert not (tmp_path / "m.safetensors").exists()


def test_train_records_the_warmup_and_a_model_that_learns_has_no_warning(tmp_path):
    data = make_npz_dataset(tmp_path / "data", n_train=480, n_test=300)
    out = tmp_path / "m.safetensors"
    result = train_tiny(data, out, "--epochs", "4", "--lr", "0.05", "--warmup-epochs", "1", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["warnings"] == []
    assert report["metrics"]["clean_acc"]["value"] > 0.6
    assert read_checkpoint(out).metadata["training"]["warmup_epochs"] == 1


def _noise_dataset(root, classes: int = 10, n_train: int = 200, n_test: int = 600):
    """Images with no signal: nothing can learn the labels, so any model scores chance on the test split."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
        np.savez(root / f"{split}.npz", x=x, y=(np.arange(n) % classes).astype(np.uint8))
    return root


def test_a_run_at_chance_level_says_so_with_a_true_hint(tmp_path):
    data = _noise_dataset(tmp_path / "noise")
    out = tmp_path / "m.safetensors"
    result = train_tiny(data, out, "--epochs", "1", "--lr", "0.5", "--json")
    assert result.exit_code == 0, result.output  # the weights are written, with the figures: a warning, not a refusal
    report = json.loads(result.stdout)
    (warning,) = report["warnings"]
    assert "chance level (10.0%)" in warning and "did not learn" in warning
    assert "lower --lr (it was 0.5)" in warning and "--warmup-epochs 1" in warning
    assert "chance level" in result.stderr
    assert out.exists()
    terminal = train_tiny(data, out, "--epochs", "1", "--warmup-epochs", "1", "--force")
    assert terminal.exit_code == 0, terminal.output
    assert "warning: the trained model scores" in terminal.stdout
    assert "--warmup-epochs 1" not in terminal.stdout.split("did not learn")[1]  # already warmed up: not suggested
