"""The unlearning's search in a reconstruction's densest window (defenses/window_search.py)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from backdoor_cli.defenses.unlearn import UnlearnParams, trigger_stamp, window_words
from backdoor_cli.defenses.window_search import DEFAULT_STEP, search_share, window_searches
from backdoor_cli.errors import ConfigError
from backdoor_cli.evaluation.metrics import Rate
from backdoor_cli.scanning.guided import ScanEvidence, densest_window, localize, window_side
from helpers import class_trigger, purify_toy_one_epoch

MEAN = torch.tensor([0.4, 0.5, 0.6])
STD = torch.tensor([0.2, 0.25, 0.3])
CPU = torch.device("cpu")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 4)
    )


def _images(n: int = 64) -> torch.Tensor:
    x01 = torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    return (x01 - MEAN.view(1, 3, 1, 1)) / STD.view(1, 3, 1, 1)


def test_the_window_is_the_locality_tests_a_quarter_of_the_side_where_the_mask_is_densest():
    assert window_side(32, 32) == 8 and window_side(28, 28) == 7 and window_side(8, 8) == 2 and window_side(3, 3) == 1
    mask = torch.zeros(32, 32)
    mask[20:24, 3:7] = 1.0
    mask[0, 31] = 0.9  # a stray pixel outweighed by the square
    top, left = densest_window(mask, 8)
    assert top <= 20 and top + 8 >= 24 and left <= 3 and left + 8 >= 7
    core = localize(class_trigger(0, size=32)).mask  # the locality test cuts to the same window
    assert core.sum() == class_trigger(0, size=32).mask.sum()


def test_a_step_moves_the_pattern_toward_the_target_inside_the_window_and_leaves_the_model_alone():
    model = _model().train()
    trigger = class_trigger(2)
    (search,) = window_searches([trigger], MEAN, STD, CPU, step=0.1)
    assert search.window.sum() == 4 and search.window[0, 0, -2:, -2:].sum() == 4  # the 2x2 mask's window
    torch.testing.assert_close(
        search.pattern, ((trigger.pattern.permute(2, 0, 1)[None] - MEAN.view(1, 3, 1, 1)) / STD.view(1, 3, 1, 1))
    )
    images = _images()
    before_stats = model[1].running_mean.clone()
    loss = nn.CrossEntropyLoss()

    def target_loss() -> float:
        with torch.no_grad():
            model.eval()
            value = loss(model(search.stamp(images)), torch.full((len(images),), 2)).item()
            model.train()
            return value

    start = target_loss()
    outside = search.pattern * (1 - search.window)
    for _ in range(10):
        search.advance(model, images)
    assert target_loss() < start  # each step ascends toward the target
    assert model.training and all(m.training for m in model.modules())  # the train mode is given back
    assert torch.equal(model[1].running_mean, before_stats)  # BatchNorm's statistics untouched
    assert all(p.grad is None for p in model.parameters())  # no parameter gradient written
    assert (search.pattern >= search.low - 1e-6).all() and (search.pattern <= search.high + 1e-6).all()
    assert torch.equal(search.pattern * (1 - search.window), outside)  # what lies outside the window is never used
    stamped = search.stamp(images)
    assert torch.equal(stamped[..., :6, :], images[..., :6, :])  # the window is opaque, the rest untouched
    torch.testing.assert_close(stamped[..., -2:, -2:], search.pattern.expand(len(images), -1, -1, -1)[..., -2:, -2:])


def test_half_of_the_stamped_images_get_the_searched_window_and_the_rest_the_reconstruction():
    model = _model().train()
    trigger = class_trigger(1)
    trigger.mask.mul_(0.5)  # a soft reconstruction: the window stamp is the opaque one
    inputs = _images(800)
    searches = window_searches([trigger], MEAN, STD, CPU)
    stamp = trigger_stamp([trigger], 0.4, MEAN, STD, CPU, searches=searches, model=model)
    out = stamp(inputs, torch.Generator().manual_seed(3))
    changed = (out != inputs).flatten(1).any(1)
    assert 0.3 < changed.float().mean() < 0.5
    corner = out[changed][..., -2:, -2:]
    soft = (
        inputs[changed] * 0.5
        + 0.5 * ((trigger.pattern.permute(2, 0, 1)[None] - MEAN.view(1, 3, 1, 1)) / STD.view(1, 3, 1, 1))
    )[..., -2:, -2:]
    is_soft = (corner - soft).flatten(1).abs().amax(1) < 1e-5
    assert 0.35 < is_soft.float().mean() < 0.65  # the two kinds of stamp share the stamped images
    window = corner[~is_soft]
    assert torch.allclose(window, window[:1].expand_as(window))  # one searched pattern, opaque


def test_only_local_reconstructions_get_a_window_and_the_note_says_which():
    """The window search needs a local trigger: the scan's locality test (densest window keeps >= 60% of the
    proxy ASR on the input) decides, as it does for the trigger-free verdict."""
    patch, blend = class_trigger(1), class_trigger(2)
    evidence = ScanEvidence(
        result=None,
        params=None,
        chosen=[patch, blend],
        choice="",
        proxy_images="held-out clean images",
        proxy_before={1: Rate(90, 100), 2: Rate(90, 100)},
        proxy_local={1: Rate(85, 100), 2: Rate(20, 100)},
    )
    assert [t.target for t in evidence.local_triggers()] == [1]
    searches = window_searches(evidence.local_triggers(), MEAN, STD, CPU)
    words = window_words(searches, [patch, blend], DEFAULT_STEP)
    assert "densest 2x2 window of class 1" in words and "class 2" not in words
    assert "no window was searched" in window_words([], [blend], DEFAULT_STEP)
    assert window_words(searches, [patch], 0.0) == ""
    with pytest.raises(ConfigError, match="needs the model"):
        trigger_stamp([patch], 0.2, MEAN, STD, CPU, searches=searches)
    assert UnlearnParams().window_step == DEFAULT_STEP == 0.05


def test_the_search_looks_at_the_share_of_the_batch_it_stamps():
    assert search_share(128, 0.2) == 13 and search_share(10, 0.2) == 1 and search_share(1, 0.01) == 1


def test_the_default_reads_window_step_and_records_it(toy_model, tmp_path):
    result = purify_toy_one_epoch(toy_model, tmp_path / "out", "--window-step", "0.1")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["method"]["params"]["window_step"] == 0.1
    default = purify_toy_one_epoch(toy_model, tmp_path / "out2")
    assert json.loads(default.stdout)["method"]["params"]["window_step"] == DEFAULT_STEP


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "fst", "--window-step", "0.1"], "--window-step does not apply to --method fst"),
        (["--window-step", "2"], "--window-step"),
        (["--window-step", "-0.1"], "--window-step"),
    ],
)
def test_a_window_step_that_cannot_act_is_refused_by_name(toy_model, tmp_path, args, message):
    result = purify_toy_one_epoch(toy_model, tmp_path / "out", *args)
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "out").exists()
