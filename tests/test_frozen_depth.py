"""The unlearning holds a model's early layers at the input's weights (models/depth.py, defenses/unlearn.py
`frozen_depth`): which layers, that a run leaves them and their BatchNorm statistics byte-identical while the rest
is tuned, what the note says, and the flag through the CLI (recorded, refused out of range or for another method)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from backdoor_cli.data.datasets import ImageSet
from backdoor_cli.defenses.base import DefenseParams
from backdoor_cli.defenses.finetune import select_trainable
from backdoor_cli.defenses.unlearn import (
    FROZEN_DEPTH,
    SPREAD_OUT,
    UNLEARN,
    UnlearnParams,
    holds_early_layers,
)
from backdoor_cli.models.building import build_model
from backdoor_cli.models.depth import MIN_TRAINED, early_layers
from backdoor_cli.models.head import find_head
from helpers import class_trigger, purify_toy_one_epoch

SHAPE = (3, 32, 32)


def head_of(model: nn.Sequential) -> str:
    return str(len(model) - 1)


def deep_cnn(convs: int, classes: int = 3) -> nn.Sequential:
    """`convs` conv + BatchNorm + ReLU blocks, then the head (index -1)."""
    layers: list[nn.Module] = []
    for i in range(convs):
        layers += [nn.Conv2d(3 if i == 0 else 4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, classes))


@pytest.mark.parametrize(
    ("arch", "held", "total", "last"),
    [("resnet20", 13, 20, "layer2.2.bn2"), ("resnet32", 21, 32, "layer2.4.bn2"), ("resnet56", 37, 56, "layer2.8.bn2")],
)
def test_two_thirds_of_a_cifar_resnet_are_its_first_two_stages(arch, held, total, last):
    model = build_model(arch, 10)
    early = early_layers(model, SHAPE, FROZEN_DEPTH, find_head(model))
    assert (early.held, early.total) == (held, total) and early.names[0] == "conv1" and early.names[-1] == last
    assert not any(n.startswith("layer3") or n == "linear" for n in early.names)
    assert early.describe().startswith(f"the first {held} of {total} weight layers in forward order held")


def test_forward_order_decides_which_layers_are_early_not_the_order_of_definition():
    class Reversed(nn.Module):
        def __init__(self):
            super().__init__()
            self.late = nn.Conv2d(4, 4, 3, padding=1)  # defined first, called second
            self.early = nn.Conv2d(3, 4, 3, padding=1)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.late(self.early(x)).mean((2, 3)))

    early = early_layers(Reversed(), SHAPE, 0.5, "head", keep=1)
    assert early.names == ["early"] and early.held == 1 and early.total == 3


def test_at_least_six_weight_layers_before_the_head_train():
    assert MIN_TRAINED == 6
    nine, eight = deep_cnn(9), deep_cnn(8)
    assert early_layers(nine, SHAPE, FROZEN_DEPTH, head_of(nine)).held == 3  # two thirds would be 6; 6 must train
    assert early_layers(eight, SHAPE, 0.9, head_of(eight)).held == 2
    shallow = early_layers(build_model("simple_cnn_half", 4), SHAPE, FROZEN_DEPTH, "fc")
    assert shallow.names == [] and "too few to hold any" in shallow.describe()
    none = early_layers(build_model("resnet20", 10), SHAPE, 0.0, "linear")
    assert none.names == [] and none.describe() == "every layer trained"


def test_held_modules_neither_train_nor_update_their_statistics():
    model = deep_cnn(9)
    held = [model[0], model[1]]
    trainable, frozen = select_trainable(model, model[-1], "all", held)
    assert all(not p.requires_grad for m in held for p in m.parameters())
    assert all(any(m is f for f in frozen) for m in held)
    assert {id(p) for p in trainable} == {id(p) for p in model.parameters()} - {
        id(p) for m in held for p in m.parameters()
    }


def unlearn_deep_cnn(local: bool, **values) -> tuple[nn.Sequential, dict, list[str], list[str]]:
    """One epoch of the unlearning on a nine-convolution CNN: (model, its weights before, the run's notes). `local`:
    the scan's locality test called the reconstruction local (it is passed as a window, whose search is off here)."""
    torch.manual_seed(0)
    model = deep_cnn(9)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    clean = ImageSet(
        torch.randint(0, 256, (64, 32, 32, 3), dtype=torch.uint8, generator=generator), torch.arange(64) % 3
    )
    mean, std = torch.full((1, 3, 1, 1), 0.5), torch.full((1, 3, 1, 1), 0.25)
    params = DefenseParams.of("unlearn", epochs=1, batch_size=16, seed=0, window_step=0.0, **values)
    trigger = class_trigger(1, size=32)
    outcome = UNLEARN.run(
        model,
        head_of(model),
        clean,
        mean,
        std,
        params,
        torch.device("cpu"),
        flip=False,
        triggers=[trigger],
        windows=[trigger] if local else [],
    )
    assert all(p.requires_grad for p in model.parameters())  # the run gives every parameter back
    return model, start, outcome.notes, (outcome.held.names if outcome.held is not None else [])


def test_a_local_trigger_leaves_the_early_layers_byte_identical_and_tunes_the_rest():
    model, start, notes, held_names = unlearn_deep_cnn(local=True)
    held = {"0", "1", "3", "4", "6", "7"}  # the first three conv + BatchNorm pairs of nine
    for name, value in model.state_dict().items():
        if name.split(".")[0] in held:
            assert torch.equal(value, start[name]), name  # weights, running statistics and batch counts alike
        elif name.endswith("weight"):
            assert not torch.equal(value, start[name]), name
    assert any("the first 3 of 10 weight layers in forward order held" in note and "(0 to 7)" in note for note in notes)
    # purify's dormancy check runs on the output of a run that held layers (tests/test_dormancy.py): it reads them here
    assert held_names == ["0", "1", "3", "4", "6", "7"]


@pytest.mark.parametrize(
    ("local", "values", "said"), [(False, {}, SPREAD_OUT), (True, {"frozen_depth": 0.0}, "every layer trained")]
)
def test_a_spread_out_trigger_or_frozen_depth_zero_tunes_every_layer(local, values, said):
    model, start, notes, held_names = unlearn_deep_cnn(local=local, **values)
    assert not torch.equal(model[0].weight, start["0.weight"]) and not torch.equal(
        model[1].running_mean, start["1.running_mean"]
    )
    assert any(note.endswith(said) for note in notes) and held_names == []
    assert UnlearnParams().frozen_depth == FROZEN_DEPTH == 2 / 3


def test_the_early_layers_are_held_only_when_every_reconstruction_is_local():
    patch, blend = class_trigger(1), class_trigger(2)
    assert holds_early_layers([patch], [patch]) and holds_early_layers([patch, blend], [patch, blend])
    assert not holds_early_layers([patch, blend], [patch]) and not holds_early_layers([blend], [])
    assert not holds_early_layers([], [])


def test_the_default_reads_frozen_depth_and_records_it(toy_model, tmp_path):
    result = purify_toy_one_epoch(toy_model, tmp_path / "out", "--frozen-depth", "0.5")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "out" / "report.json").read_text())["method"]["params"]["frozen_depth"] == 0.5
    default = purify_toy_one_epoch(toy_model, tmp_path / "out2")
    assert json.loads(default.stdout)["method"]["params"]["frozen_depth"] == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "fst", "--frozen-depth", "0.5"], "--frozen-depth does not apply to --method fst"),
        (["--frozen-depth", "1"], "--frozen-depth"),
        (["--frozen-depth", "-0.1"], "--frozen-depth"),
    ],
)
def test_a_frozen_depth_that_cannot_act_is_refused_by_name(toy_model, tmp_path, args, message):
    result = purify_toy_one_epoch(toy_model, tmp_path / "out", *args)
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "out").exists()
