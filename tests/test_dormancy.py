"""The trigger-free dormancy check (verdicts/dormancy.py) and what the default does with it
(usecases/default_unlearning.py `unlearn_unless_dormant`): a held-layer output is retuned, on a copy, with the
scan's reconstruction, made opaque, stamped on 5 images; when that stamp comes back, the unlearning is run again from
the input with every layer, and a reconstruction that still comes back fails the removal verdict."""

from __future__ import annotations

import dataclasses
import functools
import json

import pytest
import torch
from typer.testing import CliRunner

from backdoor_cli.checkpoint import read_checkpoint
from backdoor_cli.cli import app
from backdoor_cli.defenses import unlearn
from backdoor_cli.defenses.base import DefenseOutcome, DefenseParams
from backdoor_cli.defenses.unlearn import FROZEN_DEPTH
from backdoor_cli.evaluation.metrics import Rate
from backdoor_cli.models import depth
from backdoor_cli.models.depth import EarlyLayers, early_layers
from backdoor_cli.progress import Reporter
from backdoor_cli.scanning.guided import ScanEvidence, proxy_asr
from backdoor_cli.scanning.inversion import InversionParams
from backdoor_cli.selection.gentler import GENTLER_FACTOR
from backdoor_cli.selection.holdout import HoldoutMonitor
from backdoor_cli.usecases.default_unlearning import (
    RERUN_DEPTHS,
    RERUN_DISTILL,
    RERUN_RATE,
    UnlearningSetup,
    held_layers_checked,
    rerun_depths,
    unlearn_unless_dormant,
)
from backdoor_cli.verdicts import dormancy
from backdoor_cli.verdicts.dormancy import (
    DormancyCheck,
    DormancyRecord,
    ReconstructionStamp,
    check_dormancy,
    dormancy_settings,
    make_opaque,
)
from backdoor_cli.verdicts.removal import judge_removal_by_scan
from backdoor_cli.verdicts.retune import DORMANT_MARGIN, PROTOCOL
from helpers import MEAN, STD, Tiny, class_trigger, scan_result, tiny_data


def test_the_stamp_writes_the_pattern_where_the_mask_is_one_and_leaves_the_rest():
    trigger = class_trigger(2, size=8)
    x = torch.randint(0, 256, (5, 8, 8, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    y = ReconstructionStamp(trigger).apply(x)
    assert y.dtype == torch.uint8 and y.shape == x.shape
    assert torch.equal(y[:, :-2], x[:, :-2]) and torch.equal(y[:, :, :-2], x[:, :, :-2])  # mask 0: untouched
    expected = (trigger.pattern[-2:, -2:] * 255).round().to(torch.uint8)
    assert all(torch.equal(y[i, -2:, -2:], expected) for i in range(5))  # mask 1: the pattern, in pixel values


def test_a_half_mask_blends_and_rounds_as_the_built_triggers_do():
    trigger = dataclasses.replace(class_trigger(0, size=4), mask=torch.full((4, 4), 0.5))
    trigger.pattern.fill_(1.0)
    x = torch.full((1, 4, 4, 3), 101, dtype=torch.uint8)
    assert torch.equal(ReconstructionStamp(trigger).apply(x), torch.full((1, 4, 4, 3), 178, dtype=torch.uint8))


def test_the_opaque_copy_puts_the_reconstructions_mass_on_its_heaviest_pixels():
    soft = torch.tensor([[0.9, 0.1, 0.0, 0.0], [0.6, 0.7, 0.05, 0.0], [0.0, 0.0, 0.3, 0.0], [0.0, 0.0, 0.0, 0.2]])
    trigger = dataclasses.replace(class_trigger(3, size=4), mask=soft, l1=float(soft.sum()))  # 3.05
    copy = make_opaque(trigger)
    expected = torch.zeros(4, 4)
    expected[0, 0] = expected[1, 0] = expected[1, 1] = 1.0  # the 3 heaviest: 0.9, 0.7, 0.6
    assert torch.equal(copy.mask, expected) and copy.l1 == 3.0
    assert copy.pattern is trigger.pattern and copy.target == 3 and torch.equal(trigger.mask, soft)  # input untouched


def test_the_opaque_copy_breaks_ties_by_position_and_keeps_at_least_one_pixel():
    flat = dataclasses.replace(class_trigger(0, size=4), mask=torch.full((4, 4), 0.125), l1=2.0)
    assert make_opaque(flat).mask.flatten().tolist() == [1.0, 1.0] + [0.0] * 14  # the first two in row order
    faint = dataclasses.replace(class_trigger(0, size=4), mask=torch.full((4, 4), 0.01), l1=0.16)
    assert make_opaque(faint).mask.sum() == 1 and make_opaque(faint).l1 == 1.0
    whole = dataclasses.replace(class_trigger(0, size=2), l1=9.0)  # more mass than pixels: every pixel
    assert make_opaque(whole).mask.sum() == 4


def _check(before: tuple[int, int], after: tuple[int, int], target: int = 0) -> DormancyCheck:
    return DormancyCheck(target, Rate(*before), Rate(*after), dormancy_settings(0, True), 1.0)


def test_dormant_means_more_than_the_margin_up_with_the_intervals_apart():
    assert DORMANT_MARGIN == 0.10
    assert _check((10, 900), (300, 900)).dormant  # 1.1% -> 33%: the VGG-16-BN's held-layer output
    assert _check((10, 900), (130, 900)).dormant  # 1.1% -> 14.4%
    assert not _check((10, 900), (54, 900)).dormant  # 1.1% -> 6.0%: the worst ResNet output measured
    assert not _check((10, 900), (99, 900)).dormant  # 9.9 points up: not more than the margin
    assert not _check((2, 20), (6, 20)).dormant  # 20 points up on 20 images: the intervals overlap
    doc = _check((10, 900), (300, 900)).to_dict()
    assert doc["dormant"] and doc["margin"] == DORMANT_MARGIN and doc["settings"]["poisoned"] == 5
    assert "dormant: it comes back" in _check((10, 900), (300, 900)).describe()


def test_the_settings_are_the_authors_protocol_seeded_by_the_run():
    settings = dormancy_settings(7, augment=False)
    assert settings.poisoned == 5 and settings.sgd.seed == 7 and not settings.sgd.augment
    assert dataclasses.replace(settings.sgd, seed=PROTOCOL.seed, augment=PROTOCOL.augment) == PROTOCOL


def test_the_check_retunes_a_copy_and_leaves_the_model_untouched():
    torch.manual_seed(0)
    model = Tiny()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    images = tiny_data(n=60)
    triggers = [class_trigger(1), class_trigger(2)]
    settings = dormancy_settings(0, augment=True)
    checks = check_dormancy(model, images, images, triggers, MEAN, STD, settings, torch.device("cpu"), flip=True)
    assert [c.target for c in checks] == [1, 2]
    assert all(torch.equal(v, start[k]) for k, v in model.state_dict().items())
    assert all(c.proxy.n == 40 and c.proxy_retuned.n == 40 and c.seconds > 0 for c in checks)  # other-class images
    for check, trigger in zip(checks, triggers):  # the stamp is the opaque copy, measured the same way
        assert check.pixels == 4 and check.to_dict()["stamp"] == {"opaque_pixels": 4}
        assert check.proxy == proxy_asr(model, images, make_opaque(trigger), MEAN, STD)
    again = check_dormancy(model, images, images, triggers, MEAN, STD, settings, torch.device("cpu"), flip=True)
    assert [c.to_dict()["proxy_asr_after_retuning"] for c in again] == [
        c.to_dict()["proxy_asr_after_retuning"] for c in checks
    ]  # seeded: the same copy, the same answer


# --- what the default does with the check (fakes for the tuning and the check) ---


class FakeRuns:
    """A `tune` that records each run's frozen depth and says the run held layers when the depth is above 0,
    and a `check` that answers from a list (one answer per call)."""

    def __init__(self, answers: list[list[DormancyCheck]]):
        self.depths: list[float] = []
        self.distills: list[float] = []
        self.rates: list[float] = []
        self.answers = answers
        self.checked = 0

    def tune(self, params, monitor, stop_first_epoch=None):
        self.depths.append(params.own.frozen_depth)
        self.distills.append(params.own.distill)
        self.rates.append(params.sgd.lr)
        monitor.curve.append({"epoch": params.sgd.epochs, "holdout_acc": monitor.base_acc, "within_budget": True})
        held = EarlyLayers(["0", "1"], 2, 3, params.own.frozen_depth)
        return DefenseOutcome(held=held if params.own.frozen_depth > 0 else None)

    def check(self):
        self.checked += 1
        return self.answers.pop(0)


def _setup(runs: FakeRuns, model: torch.nn.Module) -> UnlearningSetup:
    evidence = ScanEvidence(scan_result([3.0, 0.5, 0.2], flagged=[0]), InversionParams(), [class_trigger(0)], "", "")
    return UnlearningSetup(
        runs.tune,
        model,
        {k: torch.zeros_like(v) for k, v in model.state_dict().items()},
        MEAN,
        STD,
        Reporter(),
        HoldoutMonitor(tiny_data(), 0.9),
        evidence,
    )


def test_a_dormant_held_layer_output_is_unlearnt_again_from_the_input_holding_a_third():
    runs = FakeRuns([[_check((10, 900), (300, 900))], [_check((10, 900), (20, 900))]])
    model = Tiny()
    params = DefenseParams.of("unlearn", epochs=3)
    outcome, kept, gentler, record = unlearn_unless_dormant(_setup(runs, model), params, runs.check, may_rerun=True)
    assert runs.depths == [FROZEN_DEPTH, FROZEN_DEPTH / 2] and runs.checked == 2  # a third not dormant: no more
    assert kept.own.frozen_depth == FROZEN_DEPTH / 2 and gentler is None and outcome.held is not None
    assert all(not v.any() for v in model.state_dict().values() if v.is_floating_point())  # from the input's weights
    assert record.kept == "rerun" and record.held_layers == 2 and record.dormant == {}
    assert [r.held_layers for r in record.reruns] == [2]
    assert "run again from the input holding the first 2 weight layers" in record.note
    assert record.note in outcome.notes and "retuning does not bring it back there" in record.note
    doc = record.to_dict()
    assert doc["held"][0]["dormant"] and doc["reruns"][0]["dormant"] == [] and doc["dormant"] == []
    assert doc["reruns"][0]["frozen_depth"] == round(FROZEN_DEPTH / 2, 4) and doc["kept"] == "rerun"
    assert doc["every_layer"] is None  # no rerun trained every layer


def test_the_reruns_start_gentler_and_distil_and_a_given_distill_applies_to_every_run():
    answers = [[_check((10, 900), (300, 900))], [_check((10, 900), (200, 900))], [_check((10, 900), (20, 900))]]
    runs = FakeRuns(answers)
    params = DefenseParams.of("unlearn", epochs=3)
    lr = params.sgd.lr
    _, kept, _, record = unlearn_unless_dormant(_setup(runs, Tiny()), params, runs.check, may_rerun=True)
    assert runs.distills == [0.0, RERUN_DISTILL, RERUN_DISTILL] and kept.own.distill == RERUN_DISTILL == 1.0
    assert runs.rates == pytest.approx([lr, lr * RERUN_RATE, lr * RERUN_RATE]) and RERUN_RATE == GENTLER_FACTOR
    assert kept.sgd.lr == pytest.approx(lr * RERUN_RATE)  # the report records the rate the output was tuned at
    doc = record.to_dict()
    assert [r["distill"] for r in doc["reruns"]] == [1.0, 1.0]
    assert [r["lr"] for r in doc["reruns"]] == pytest.approx([lr * RERUN_RATE] * 2)
    assert (
        f"holding the first 2 weight layers (dormant too), then with every layer trained, at lr {lr * RERUN_RATE:g}, "
        "distilling" in record.note
    )
    assert "distilling the input model's outputs on the images it does not stamp (weight 1)" in record.note
    runs = FakeRuns([[_check((10, 900), (300, 900))], [_check((10, 900), (20, 900))]])
    params = DefenseParams.of("unlearn", epochs=3, distill=0.5)
    _, kept, _, record = unlearn_unless_dormant(
        _setup(runs, Tiny()), params, runs.check, may_rerun=True, rerun_distill=None
    )  # purify passes None when the user gave --distill: their weight, in every run
    assert runs.distills == [0.5, 0.5] and kept.own.distill == 0.5 and record.reruns[0].distill == 0.5
    assert "distilling the input model's outputs on the images it does not stamp (weight 0.5)" in record.note


def test_a_third_that_is_dormant_too_is_unlearnt_again_with_every_layer():
    answers = [[_check((10, 900), (300, 900))], [_check((10, 900), (200, 900))], [_check((10, 900), (20, 900))]]
    runs = FakeRuns(answers)
    outcome, kept, _, record = unlearn_unless_dormant(
        _setup(runs, Tiny()), DefenseParams.of("unlearn", epochs=3), runs.check, may_rerun=True
    )
    assert runs.depths == [FROZEN_DEPTH, FROZEN_DEPTH / 2, 0.0] and outcome.held is None
    assert [r.held_layers for r in record.reruns] == [2, 0] and [r.dormant for r in record.reruns] == [True, False]
    assert record.kept == "every_layer" and record.dormant == {} and kept.own.frozen_depth == 0.0
    doc = record.to_dict()
    assert doc["every_layer"] == doc["reruns"][1]["checks"]  # schema 1's field: the every-layer rerun's checks
    assert "holding the first 2 weight layers (dormant too), then with every layer trained" in record.note


def test_an_output_that_stays_dormant_with_every_layer_says_so():
    runs = FakeRuns([[_check((10, 900), (300, 900))]] + [[_check((10, 900), (250, 900))]] * 2)
    _, _, _, record = unlearn_unless_dormant(
        _setup(runs, Tiny()), DefenseParams.of("unlearn", epochs=3), runs.check, may_rerun=True
    )
    assert record.kept == "every_layer" and set(record.dormant) == {0} and len(record.reruns) == 2
    assert "still dormant there for class 0" in record.note


def test_a_rerun_must_hold_fewer_layers_than_the_run_before_it():
    assert rerun_depths(7, {FROZEN_DEPTH / 2: 4, 0.0: 0}.get) == [FROZEN_DEPTH / 2, 0.0]  # the VGG-16-BN: 7, 4, 0
    # a network whose six-layer floor holds as many at a third as at two thirds goes straight to every layer
    assert rerun_depths(3, {FROZEN_DEPTH / 2: 3, 0.0: 0}.get) == [0.0]
    assert rerun_depths(2, None) == [FROZEN_DEPTH / 2, 0.0]  # without a count, each is taken to hold fewer
    assert RERUN_DEPTHS[-1] == 0.0  # the last rerun trains every layer


def test_a_held_layer_output_that_does_not_come_back_is_kept():
    runs = FakeRuns([[_check((10, 900), (30, 900))]])
    outcome, kept, _, record = unlearn_unless_dormant(
        _setup(runs, Tiny()), DefenseParams.of("unlearn", epochs=3), runs.check, may_rerun=True
    )
    assert len(runs.depths) == 1 and record.kept == "held" and record.reruns == []
    assert (
        kept.own.frozen_depth > 0
        and "did not take that stamp back (the dormancy check: a proxy for the trigger, which can miss"
        in outcome.notes[-1]
    )


def test_a_frozen_depth_the_user_chose_is_not_overridden_but_the_dormancy_is_said():
    runs = FakeRuns([[_check((10, 900), (300, 900))]])
    outcome, kept, _, record = unlearn_unless_dormant(
        _setup(runs, Tiny()), DefenseParams.of("unlearn", epochs=3, frozen_depth=0.5), runs.check, may_rerun=False
    )
    assert runs.depths == [0.5] and record.kept == "held" and set(record.dormant) == {0}
    assert "(--frozen-depth)" in record.note and "--frozen-depth 0 trains every layer" in outcome.notes[-1]


def test_no_layer_held_means_no_check():
    runs = FakeRuns([])
    _, _, _, record = unlearn_unless_dormant(
        _setup(runs, Tiny()), DefenseParams.of("unlearn", epochs=3, frozen_depth=0.0), runs.check, may_rerun=True
    )
    assert record is None and runs.checked == 0


def test_an_undone_unlearning_leaves_no_dormant_class_on_the_output():
    record = DormancyRecord(2, [_check((10, 900), (300, 900))], kept="input")
    assert record.dormant == {} and record.to_dict()["kept"] == "input"  # the output holds the input's weights


def test_method_unlearn_is_checked_and_never_rerun():
    outcome = DefenseOutcome(held=EarlyLayers(["0"], 1, 3, 0.5))
    record = held_layers_checked(outcome, lambda: [_check((10, 900), (300, 900))], Reporter())
    assert record.kept == "held" and "(--method unlearn)" in record.note and record.note in outcome.notes


def _verdict(dormant: dict | None):
    return judge_removal_by_scan(
        [0],
        [0],
        {0: Rate(890, 900)},
        {0: Rate(9, 900)},
        {0: {"flagged": False, "input_mask_l1": 16.0, "mask_l1": 60.0, "anomaly_index": 0.4}},
        planted={0: Rate(40, 900)},
        local={0: Rate(880, 900)},
        dormant=dormant,
        dormancy=DormancyRecord(2, [_check((9, 900), (300, 900))]).to_dict() if dormant else None,
    )


def test_a_reconstruction_that_comes_back_fails_the_scan_verdict():
    assert _verdict(None).verdict == "verified"  # the same evidence without the check's finding
    failed = _verdict({0: Rate(300, 900)})
    assert failed.verdict == "failed" and "brings it back to 33.3% (dormant)" in failed.reason
    assert failed.evidence["dormancy"]["held"][0]["dormant"]


# --- through the CLI: the planted toy of tests/test_gentler.py, with the six-layer floor lowered so that its five
# convolutions can hold three (the floor keeps every real subject of the grid above it; the logic is the same) ---


@pytest.fixture(scope="module")
def planted(planted_template) -> dict:
    return planted_template  # conftest.py: trained once per session


def _held_default(planted, out, monkeypatch, dormant: bool, *args):
    lowered = functools.partial(early_layers, keep=2)
    monkeypatch.setattr(unlearn, "early_layers", lowered)
    monkeypatch.setattr(depth, "early_layers", lowered)  # the count purify gives the reruns
    monkeypatch.setattr(dormancy, "is_dormant", lambda after, reference: dormant)
    return CliRunner().invoke(
        app,
        ["purify", str(planted["model"]), "--data", str(planted["data"]), "--out", str(out), "--clean-count", "400"]
        + ["--epochs", "3", "--device", "cpu", "--json", *args],
    )


def _started_at_a_third(rates: list[float], first: float) -> bool:
    """Each rerun's kept rate is a third of the first run's, or a third of that where the gentler-rate rules took
    the rerun gentler again (they watch every rerun; selection/gentler.py)."""
    return all(min(abs(r - first / 3), abs(r - first / 9)) < 1e-12 for r in rates)


def _first_conv_unchanged(planted, out) -> bool:
    start = read_checkpoint(str(planted["model"])).state_dict
    purified = read_checkpoint(str(out / "purified.safetensors")).state_dict
    return torch.equal(start["features.0.0.weight"], purified["features.0.0.weight"])


def test_the_default_checks_a_held_layer_output_and_keeps_it_when_nothing_comes_back(planted, monkeypatch, tmp_path):
    result = _held_default(planted, tmp_path / "o", monkeypatch, False)
    assert result.exit_code in (0, 1), result.output
    report = json.loads(result.stdout)
    record = report["scan"]["dormancy"]
    assert (
        record["held_layers"] == 3
        and record["kept"] == "held"
        and record["reruns"] == []
        and record["every_layer"] is None
    )
    assert [c["class"] for c in record["held"]] == report["scan"]["unlearnt"] and record["dormant"] == []
    assert record["held"][0]["settings"]["poisoned"] == 5 and record["held"][0]["proxy_asr_after_retuning"]["n"] > 0
    assert (
        record["note"] in report["method"]["notes"]
        and "did not take that stamp back (the dormancy check: a proxy for the trigger, which can miss"
        in record["note"]
    )
    assert "dormancy check: class" in " ".join(result.stderr.split())
    assert _first_conv_unchanged(planted, tmp_path / "o")  # the held layers are the input's
    assert report["removal"]["evidence"]["scan"]["dormancy"] == record


def test_a_dormant_output_is_unlearnt_again_with_fewer_layers_held_and_fails_the_verdict(
    planted, monkeypatch, tmp_path
):
    result = _held_default(planted, tmp_path / "o", monkeypatch, True, "--require-verified")
    assert result.exit_code == 1, result.output  # `failed`: --require-verified exits 1
    report = json.loads(result.stdout)
    record = report["scan"]["dormancy"]
    assert record["kept"] == "every_layer" and [r["held_layers"] for r in record["reruns"]] == [2, 0]  # a third, none
    assert record["every_layer"] == record["reruns"][1]["checks"]
    assert all(len(r["checks"]) == len(record["held"]) for r in record["reruns"])
    assert record["dormant"] == report["scan"]["unlearnt"]  # still "dormant" (forced): said, and failed
    by_scan = report["removal"]["evidence"]["scan"]  # the toy's checkpoint records its trigger, which decides
    assert by_scan["verdict"] == "failed" and "(dormant)" in by_scan["reason"] and by_scan["dormancy"] == record
    assert report["removal"]["verdict"] == "failed"
    said = " ".join(result.stderr.split())
    assert "unlearning again from the input holding the first 2 weight layers" in said
    assert "unlearning again from the input with every layer trained" in said
    assert not _first_conv_unchanged(planted, tmp_path / "o")  # every layer was trained
    assert report["method"]["params"]["frozen_depth"] == 0.0  # the kept run's parameters
    assert report["method"]["params"]["distill"] == 1.0 and [r["distill"] for r in record["reruns"]] == [1.0, 1.0]
    rates = [r["lr"] for r in record["reruns"]]
    assert rates[-1] == report["method"]["params"]["lr"]  # the output's rate is the last rerun's
    assert _started_at_a_third(rates, 0.01)
    assert "still dormant there" in report["method"]["notes"][-1]


def test_a_distill_the_user_gives_is_the_weight_of_every_run_reruns_included(planted, monkeypatch, tmp_path):
    result = _held_default(planted, tmp_path / "o", monkeypatch, True, "--distill", "0.5", "--lr", "0.03")
    assert result.exit_code in (0, 1), result.output
    report = json.loads(result.stdout)
    record = report["scan"]["dormancy"]
    assert [r["distill"] for r in record["reruns"]] == [0.5, 0.5] and report["method"]["params"]["distill"] == 0.5
    assert _started_at_a_third([r["lr"] for r in record["reruns"]], 0.03)  # of the --lr given
    assert "distilling the input model's outputs on the images it does not stamp (weight 0.5)" in record["note"]


def test_a_chosen_frozen_depth_is_kept_and_the_dormancy_said(planted, monkeypatch, tmp_path):
    result = _held_default(planted, tmp_path / "o", monkeypatch, True, "--frozen-depth", "0.6")
    assert result.exit_code in (0, 1), result.output
    report = json.loads(result.stdout)
    record = report["scan"]["dormancy"]
    assert record["kept"] == "held" and record["reruns"] == [] and record["every_layer"] is None and record["dormant"]
    assert "(--frozen-depth)" in record["note"] and report["removal"]["evidence"]["scan"]["verdict"] == "failed"
    assert _first_conv_unchanged(planted, tmp_path / "o")
