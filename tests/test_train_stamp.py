"""`bdclean train --augment --stamp-after-augment`: poisoned images stay clean in the data and get their trigger
in each batch after crop+flip, so the trigger never moves; refused by name where it cannot act."""

from __future__ import annotations

import json

import torch
from torch import nn
from typer.testing import CliRunner

from backdoor_cli.checkpoint import read_checkpoint
from backdoor_cli.cli import app
from backdoor_cli.data.datasets import ImageSet
from backdoor_cli.triggers import build_trigger, parse_trigger_spec, poison_training_set
from backdoor_cli.tuning.loop import TuneSettings, tune
from backdoor_cli.tuning.sgd import SgdSettings
from backdoor_cli.usecases.training import stamp_after_augment
from helpers import make_npz_dataset

CPU = torch.device("cpu")


def _patch():
    spec = parse_trigger_spec({"type": "patch", "size": 2, "target": 0, "position": "bottom-right"}, None, source="t")
    return build_trigger(spec, (8, 8, 3))


class Recording(nn.Module):
    """A linear model that keeps every input batch it sees in training."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8 * 8 * 3, 2)
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        if self.training:
            self.seen.append(x.detach().clone())
        return self.fc(x.flatten(1))


def _corners_of_poisoned(after: bool) -> list[float]:
    """The bottom-right 2x2 mean of every poisoned image the model saw (poisoned images are mid-grey, clean
    ones black, so a row's centre pixel tells which it is), stamped after augmentation or before it."""
    trigger = _patch()
    x = torch.zeros(16, 8, 8, 3, dtype=torch.uint8)
    x[:8] = 100
    y = torch.zeros(16, dtype=torch.long)
    x, y, poisoned = poison_training_set(trigger, x, y, 0.0, 0)  # labels only matter for the loss here
    index = torch.arange(8)
    if not after:
        x[index] = trigger.apply(x[index])
    model = Recording()
    settings = TuneSettings(SgdSettings(epochs=6, lr=0.01, batch_size=8, augment=True, seed=0))
    hook = stamp_after_augment(trigger, index, 16, CPU) if after else None
    tune(model, ImageSet(x, y), torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1), settings, CPU, after_augment=hook)
    batches = torch.cat(model.seen)
    grey = batches[:, 0, 4, 4] > 0.2
    return batches[grey][:, :, -2:, -2:].mean(dim=(1, 2, 3)).tolist()


def test_the_trigger_stamped_after_augmentation_never_moves_and_before_it_does():
    after = _corners_of_poisoned(after=True)
    assert len(after) > 20 and all(abs(v - 1.0) < 1e-6 for v in after)
    before = _corners_of_poisoned(after=False)
    assert any(abs(v - 1.0) > 1e-3 for v in before)  # crop or flip moved it at least once: the control


def test_poisoning_can_relabel_without_stamping():
    trigger = _patch()
    x = torch.full((10, 8, 8, 3), 50, dtype=torch.uint8)
    y = torch.arange(10) % 3 + 1
    same_x, new_y, idx = poison_training_set(trigger, x, y, 0.5, 0, stamp=False)
    stamped_x, stamped_y, stamped_idx = poison_training_set(trigger, x, y, 0.5, 0)
    assert torch.equal(same_x, x) and torch.equal(new_y, stamped_y) and torch.equal(idx, stamped_idx)
    assert (new_y[idx] == 0).all() and not torch.equal(stamped_x, x)


def run(*args):
    return CliRunner().invoke(app, [*map(str, args), "--device", "cpu", "--quiet"])


def test_train_records_it_and_refuses_it_where_it_cannot_act(tmp_path):
    data = make_npz_dataset(tmp_path / "data")
    out = tmp_path / "m.safetensors"
    base = ["train", "--arch", "test_tiny", "--data", data, "--out", out, "--epochs", "1"]
    refused = run(*base, "--trigger", "badnets", "--poison-rate", "0.1", "--stamp-after-augment")
    assert refused.exit_code == 2 and "--stamp-after-augment changes nothing without --augment" in refused.output
    refused = run(*base, "--augment", "--stamp-after-augment")
    assert refused.exit_code == 2 and "--stamp-after-augment stamps poisoned images" in refused.output
    assert not out.exists()
    done = run(*base, "--trigger", "badnets", "--poison-rate", "0.1", "--augment", "--stamp-after-augment", "--json")
    assert done.exit_code == 0, done.output
    report = json.loads(done.stdout)
    assert report["poisoned_images"] == 24 and report["stamped_after_augment"] is True
    meta = read_checkpoint(out).metadata
    assert meta["stamped_after_augment"] is True and meta["training"]["augment"] is True
    plain = run(*base, "--trigger", "badnets", "--poison-rate", "0.1", "--force")
    assert plain.exit_code == 0 and read_checkpoint(out).metadata["stamped_after_augment"] is False
