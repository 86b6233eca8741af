"""The recommended recipe and its path selection: a point on the line back to the input, chosen from
held-out clean images only, within the accuracy budget."""

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
from backdoor_cli.selection.path_select import DEFAULT_BUDGET, FLOOR, grid, memorised_warning, select_on_path
from backdoor_cli.selection.recipe import (
    CAVEAT,
    RECOMMENDED_HOLDOUT,
    RECOMMENDED_METHOD,
    RECOMMENDED_PARAMS,
    fit_to_clean_data,
    resolve_recipe,
)
from helpers import train_toy_model

MEAN, STD = torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1)


def _images(n=40, classes=4):
    y = torch.arange(n) % classes
    x = (y * 60).to(torch.uint8).view(n, 1, 1, 1).expand(n, 2, 2, 1).contiguous()
    return ImageSet(x, y)


class Fading(torch.nn.Module):
    """Class c is right while `right` > c / 4: accuracy falls one class at a time as `right` goes 1 -> 0."""

    def __init__(self, right=1.0):
        super().__init__()
        self.right = torch.nn.Parameter(torch.tensor(float(right)))

    def forward(self, x):
        classes = (x[:, 0, 0, 0] * 255 / 60).round().long()
        ok = self.right > classes.float() / 4
        pred = torch.where(ok, classes, torch.zeros_like(classes))
        return torch.nn.functional.one_hot(pred, 4).float() + 0 * self.right


def _tuned_to(right: float) -> tuple[Fading, dict]:
    start = Fading(1.0).state_dict()
    model = Fading(right)
    return model, {k: v.clone() for k, v in start.items()}


def test_grid_runs_from_the_tuned_model_down_to_the_floor():
    assert grid(0.5) == [1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5]
    assert grid() == grid(FLOOR) and FLOOR == 0.8 and grid(0.8, 0.1) == [1.0, 0.9, 0.8]
    assert grid(0.72) == [1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.72] and grid(1.0) == [1.0]


def test_the_point_nearest_the_tuned_model_within_the_budget_is_loaded():
    # tuned: right = 0 (25% held-out: only class 0). On the line right = 1 - t, so accuracy is
    # 25% for t >= 0.75, 50% for t in [0.5, 0.75), 75% for t in [0.25, 0.5), 100% below.
    images = _images()
    model, start = _tuned_to(0.0)
    choice = select_on_path(model, start, images, base_acc=1.0, budget=0.5, mean=MEAN, std=STD, floor=0.5)
    accs = {row["t"]: row["holdout_acc"] for row in choice.curve}
    assert accs[1.0] == 0.25 and accs[0.7] == 0.5 and accs[0.5] == 0.5
    assert choice.chosen_t == 0.7  # the largest t whose accuracy (50%) is within 50 points of 100%
    assert all(not row["within_budget"] for row in choice.curve if row["t"] > 0.7)
    assert float(model.right.detach()) == pytest.approx(0.3)  # (1 - 0.7)·1 + 0.7·0
    assert "t = 0.70" in choice.reason and choice.to_dict()["chosen_t"] == 0.7


def test_a_tuned_model_within_the_budget_is_kept_as_it_is():
    images = _images()
    model, start = _tuned_to(0.9)  # every class right: 100%
    choice = select_on_path(model, start, images, 1.0, DEFAULT_BUDGET, MEAN, STD)
    assert choice.chosen_t == 1.0 and "kept as tuned" in choice.reason
    assert float(model.right.detach()) == pytest.approx(0.9)


def test_no_point_above_the_floor_within_the_budget_keeps_the_floor_and_says_so():
    images = _images()
    model, start = _tuned_to(0.0)
    choice = select_on_path(model, start, images, 1.0, 0.1, MEAN, STD, floor=0.5)  # 100% only below t = 0.25
    assert choice.chosen_t == 0.5 and choice.reason.startswith("no point with t >= 0.5")
    assert "the budget is not met" in choice.reason
    assert float(model.right.detach()) == pytest.approx(0.5) and min(r["t"] for r in choice.curve) == 0.5


def test_memorised_held_out_images_are_named():
    assert memorised_warning(0.92) is None
    assert "training data" in memorised_warning(0.995)


def test_recipe_defaults_and_refusals():
    rec = resolve_recipe(None, None, None, None)
    assert (rec.method, rec.holdout_fraction, rec.select, rec.budget, rec.recommended) == (
        RECOMMENDED_METHOD,
        RECOMMENDED_HOLDOUT,
        "last",
        None,
        True,
    )  # the held-out images verify, not select
    assert resolve_recipe(None, None, None, 0.01).budget == 0.01
    assert resolve_recipe(None, None, None, 0.01).select == "epoch"
    paper = resolve_recipe("fst", None, None, None)
    assert (paper.method, paper.holdout_fraction, paper.select, paper.budget, paper.recommended) == (
        "fst",
        0.0,
        "last",
        None,
        False,
    )
    assert resolve_recipe("fst", 0.2, None, 0.03).select == "epoch"  # a selection budget asks for a selection
    assert resolve_recipe("fst", 0.2, None, None).select == "last"
    assert resolve_recipe("fst", 0.2, "path", None).budget == DEFAULT_BUDGET
    assert resolve_recipe("fst", 0.2, "epoch", None).budget == DEFAULT_BUDGET
    assert resolve_recipe(None, 0.0, None, None).select == "last"  # the recipe without a held-out part
    with pytest.raises(ConfigError, match="none are held out"):
        resolve_recipe("fst", None, "path", None)
    with pytest.raises(ConfigError, match="--select-budget applies to a selection"):
        resolve_recipe("fst", None, None, 0.05)  # no held-out part: nothing to select by


def test_the_test_set_gate_is_not_the_selection_budget(toy, tmp_path):
    """--max-acc-drop gates the test-set figures only: it neither sets the selection's budget nor
    switches a --method run to a selection (it did both once, under one flag)."""
    report, _ = _purify(toy, tmp_path / "g", *PATH, "--max-acc-drop", "50%")
    assert report["method"]["recipe"]["budget"] == DEFAULT_BUDGET
    assert any(g["gate"] == "max-acc-drop" for g in report["gates"])
    plain, _ = _purify(toy, tmp_path / "h", "--method", "fst", "--holdout-fraction", "0.2", "--max-acc-drop", "50%")
    assert plain["method"]["recipe"]["select"] == "last"


def test_too_few_clean_images_turn_the_default_held_out_part_off_and_say_so():
    rec = resolve_recipe(None, None, None, None)
    kept, warning = fit_to_clean_data(rec, images=100, num_classes=10)  # 20 held out: 2 per class
    assert kept == rec and warning is None
    small, warning = fit_to_clean_data(rec, images=99, num_classes=10)
    assert (small.holdout_fraction, small.select, small.budget) == (0.0, "last", None)
    assert "only 99 clean images" in warning and small.to_dict()["note"] == warning
    asked = resolve_recipe(None, 0.2, None, None)  # the user's own fraction is never dropped
    assert fit_to_clean_data(asked, 20, 10) == (asked, None)


# --- through the CLI ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return train_toy_model(tmp_path_factory.mktemp("path-select"), epochs=2)


PATH = ("--method", "fst-kd", "--holdout-fraction", "0.2", "--select", "path")  # the path selection, asked for


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
            "--epochs",
            "3",
            "--clean-count",
            "100",
            "--device",
            "cpu",
            "--quiet",
            "--json",
            *extra,
        ],
    )
    assert result.exit_code in (0, 1), result.output
    return json.loads(result.stdout), read_checkpoint(out / "purified.safetensors")


def test_default_purify_scans_unlearns_and_verifies_on_held_out_images(toy, tmp_path):
    report, ckpt = _purify(toy, tmp_path / "a")
    assert report["method"]["name"] == RECOMMENDED_METHOD == "unlearn" and RECOMMENDED_PARAMS == {}
    assert report["method"]["recipe"] == {
        "method": RECOMMENDED_METHOD,
        "recommended": True,
        "holdout_fraction": 0.2,
        "select": "last",
        "budget": None,
        "floor": None,
        "note": None,
        "caveat": CAVEAT,
    }
    held = report["clean_data"]["holdout"]
    assert held["images"] == 20 and report["clean_data"]["tuned_on"] == 80 and held["path"] is None
    assert report["scan"]["proxy_images"] == "held-out clean images"
    assert ckpt.metadata["purification"]["path_t"] is None
    md = (tmp_path / "a" / "report.md").read_text()
    assert "bdclean's default" in md and "**Note:** the default removes the trigger a scan reconstructs" in md


def test_path_selection_on_request(toy, tmp_path):
    report, ckpt = _purify(toy, tmp_path / "a", *PATH, "--select-budget", "10%")
    path = report["clean_data"]["holdout"]["path"]
    assert [row["t"] for row in path["curve"]] == grid() and path["budget"] == 0.1
    within = [row["t"] for row in path["curve"] if path["input_acc"] - row["holdout_acc"] <= 0.1]
    assert path["chosen_t"] == (within[0] if within else FLOOR)  # the largest t within the budget
    assert ckpt.metadata["purification"]["path_t"] == path["chosen_t"]
    assert "## Path selection (held-out images only)" in (tmp_path / "a" / "report.md").read_text()


@pytest.mark.parametrize("extra", [(), PATH], ids=["default", "path"])
def test_selection_never_reads_the_test_set_or_the_trigger(toy, tmp_path, extra):
    first, a = _purify(toy, tmp_path / "a", *extra)
    other = tmp_path / "data"
    shutil.copytree(toy["data"], other)
    with np.load(other / "test.npz") as f:
        x, y = f["x"], f["y"]
    np.savez(other / "test.npz", x=255 - x, y=(y + 1) % 3)
    second, b = _purify(toy, tmp_path / "b", *extra, "--target", "1", data=other)
    assert first["clean_data"]["holdout"]["path"] == second["clean_data"]["holdout"]["path"]
    assert first.get("scan") == second.get("scan")
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
    assert (first["trigger"]["target"], second["trigger"]["target"]) == (0, 1)


def test_the_users_value_beats_the_recipes_and_a_named_method_keeps_its_own(toy, tmp_path):
    mine, _ = _purify(toy, tmp_path / "mine", *PATH, "--distill", "0.5")
    assert mine["method"]["params"]["distill"] == 0.5
    named, _ = _purify(toy, tmp_path / "named", "--method", "fst-kd")
    assert named["method"]["params"]["distill"] == 1.0 and named["method"]["recipe"]["recommended"] is False


def test_named_method_runs_as_published(toy, tmp_path):
    report, ckpt = _purify(toy, tmp_path / "fst", "--method", "fst")
    assert report["method"]["recipe"]["recommended"] is False and report["method"]["recipe"]["select"] == "last"
    assert report["method"]["recipe"]["caveat"] is None
    assert report["clean_data"]["holdout"] is None and report["clean_data"]["tuned_on"] == 100
    assert ckpt.metadata["purification"]["path_t"] is None


def test_path_floor_is_the_smallest_t_tried(toy, tmp_path):
    report, ckpt = _purify(toy, tmp_path / "f", *PATH, "--path-floor", "0.8", "--select-budget", "0")
    path = report["clean_data"]["holdout"]["path"]
    assert [row["t"] for row in path["curve"]] == [1.0, 0.95, 0.9, 0.85, 0.8]
    assert path["floor"] == 0.8 and report["method"]["recipe"]["floor"] == 0.8 and path["chosen_t"] >= 0.8


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--method", "fst", "--path-floor", "0.7"], "--path-floor applies to the path selection only"),
        (["--path-floor", "1.5"], "--path-floor must be in"),
        (["--method", "fst", "--select", "path"], "none are held out"),
        (["--holdout-fraction", "0", "--select", "epoch"], "none are held out"),
        (["--select", "best"], "--select must be one of"),
    ],
)
def test_selection_errors_exit_2(toy, tmp_path, extra, message):
    result = CliRunner().invoke(
        app, ["purify", str(toy["model"]), "--data", str(toy["data"]), "--out", str(tmp_path / "x"), "--quiet", *extra]
    )
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "x").exists()


def test_a_cost_equal_to_the_budget_is_within_it():
    model, start = _tuned_to(0.6)  # 75% held-out
    assert 0.78 - 0.75 > 0.03  # what floating point says; 3 points are within a 3-point budget
    assert select_on_path(model, start, _images(), 0.78, 0.03, MEAN, STD).chosen_t == 1.0
