"""The default purify, scan -> unlearn -> verify: the stamp's mechanics, the scan-based verdict (never
`verified` while the backdoor works), and the whole default through the CLI on tiny planted and clean models."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from backdoor_cli.checkpoint import read_checkpoint
from backdoor_cli.cli import app
from backdoor_cli.data.datasets import ImageSet
from backdoor_cli.defenses.unlearn import trigger_stamp
from backdoor_cli.evaluation.metrics import Rate
from backdoor_cli.models.output_kind import LOGITS
from backdoor_cli.scanning.guided import (
    NATURAL_RATE,
    CleanReference,
    ReferenceCheck,
    choose_triggers,
    proxy_asr,
    rescan,
    set_aside_natural,
)
from backdoor_cli.scanning.inversion import ClassTrigger, InversionParams, ScanResult, compose
from backdoor_cli.verdicts.removal import FAILED_ASR, combine_verdicts, judge_removal, judge_removal_by_scan
from helpers import class_trigger as _trigger
from helpers import make_template_dataset, train_small_cnn
from helpers import scan_result as _result

runner = CliRunner()
MEAN = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)
STD = torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)


def test_the_stamp_is_the_composed_trigger_in_normalised_space_on_about_the_fraction():
    x01 = torch.rand(400, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    inputs = (x01 - MEAN) / STD
    trigger = _trigger(3)
    stamp = trigger_stamp([trigger], 0.25, MEAN.flatten(), STD.flatten(), torch.device("cpu"))
    out = stamp(inputs, torch.Generator().manual_seed(1))
    changed = (out != inputs).flatten(1).any(1)
    assert 0.18 < changed.float().mean() < 0.32
    expected = (compose(x01, trigger.mask[None, None], trigger.pattern.permute(2, 0, 1)[None]) - MEAN) / STD
    torch.testing.assert_close(out[changed], expected[changed])
    torch.testing.assert_close(out[~changed], inputs[~changed])
    again = stamp(inputs, torch.Generator().manual_seed(1))
    assert torch.equal(again, out)  # the draws come from the tuning generator: a seed reproduces the run


def test_several_triggers_share_the_stamped_images():
    inputs = torch.zeros(600, 3, 8, 8)
    triggers = [_trigger(1), _trigger(2)]
    triggers[1].mask.zero_()
    triggers[1].mask[:2, :2] = 1.0  # top-left: the two stamps touch different pixels
    out = trigger_stamp(triggers, 0.5, MEAN.flatten(), STD.flatten(), torch.device("cpu"))(
        inputs, torch.Generator().manual_seed(0)
    )
    first = (out[:, :, -2:, -2:] != 0).flatten(1).any(1)
    second = (out[:, :, :2, :2] != 0).flatten(1).any(1)
    assert first.sum() > 100 and second.sum() > 100 and not (first & second).any()


def test_flagged_classes_are_unlearnt_and_otherwise_nothing_unless_as_a_precaution():
    chosen, why = choose_triggers(_result([0.1, 3.5, -0.4, 2.6], [1, 3]))
    assert [t.target for t in chosen] == [1, 3] and "flagged" in why
    chosen, why = choose_triggers(_result([0.1, 3.5, -0.4, 2.6], [1, 3]), precaution=True)
    assert [t.target for t in chosen] == [1, 3]  # flagged classes decide; the precaution adds nothing
    chosen, why = choose_triggers(_result([0.1, 1.4, -0.4, 0.2], []))
    assert chosen == [] and "left unchanged" in why and "class 1" in why and "--precaution" in why
    chosen, why = choose_triggers(_result([0.1, 1.4, -0.4, 0.2], []), precaution=True)
    assert [t.target for t in chosen] == [1] and "precaution" in why and "1.40" in why


def test_proxy_asr_counts_only_images_of_other_classes_sent_to_the_class():
    class PatchDetector(torch.nn.Module):
        """Class 2 when the bottom-right corner is bright, else the label-free class 0."""

        def forward(self, x):
            corner = x[:, :, -2:, -2:].mean((1, 2, 3))
            out = torch.zeros(x.shape[0], 3)
            out[:, 2] = (corner > 2.0).float()
            out[:, 0] = 0.5
            return out

    images = ImageSet(torch.full((30, 8, 8, 3), 10, dtype=torch.uint8), torch.arange(30) % 3)
    trigger = _trigger(2)
    trigger.pattern.fill_(1.0)
    rate = proxy_asr(PatchDetector(), images, trigger, MEAN, STD)
    assert rate == Rate(20, 20)  # the 10 images of class 2 do not count


def _by_scan(after: Rate, rescanned_flag: bool, flagged=(0,)):
    rescan = {
        c: {"mask_l1": 30.0, "input_mask_l1": 4.0, "flagged": rescanned_flag, "anomaly_index": 0.5} for c in flagged
    }
    return judge_removal_by_scan(list(flagged), list(flagged) or [0], {0: Rate(190, 200)}, {0: after}, rescan)


@pytest.mark.parametrize("k", range(0, 201, 5))
@pytest.mark.parametrize("still_flagged", [False, True])
def test_the_scan_verdict_is_never_verified_while_the_reconstruction_works_or_the_class_is_flagged(k, still_flagged):
    verdict = _by_scan(Rate(k, 200), still_flagged)
    if k / 200 > FAILED_ASR:
        assert verdict.verdict == "failed"
    elif still_flagged:  # no reference tested the re-scanned trigger: the backdoor or the data's shortcut
        assert verdict.verdict == "not_verified" and "only a clean reference" in verdict.reason
    # the scan alone never verifies (a SIG backdoor hid behind a removed false positive); it says what it saw
    assert verdict.verdict != "verified"
    removed = verdict.evidence["found_trigger_removed"]
    assert removed == (k / 200 <= 0.05 and Rate(k, 200).high <= 0.10 and not still_flagged)
    if removed:
        assert "the trigger the scan found is gone" in verdict.reason and "--trigger" in verdict.reason


def test_with_nothing_flagged_the_scan_cannot_verify_and_says_why():
    verdict = judge_removal_by_scan([], [4], {4: Rate(30, 180)}, {4: Rate(2, 180)}, {})
    assert verdict.verdict == "not_verified" and "flagged no class" in verdict.reason and "--trigger" in verdict.reason
    assert verdict.evidence["source"] == "scan" and verdict.evidence["unlearnt"] == [4]
    # the families measured to hide from the inversion are named (SIG: 12 of 12 runs of the twelfth session's grid)
    assert "blend, SIG, warp and sample-specific triggers can hide" in verdict.reason
    # and the way to remove one the scan cannot find, at its price
    assert "--method fst" in verdict.reason and "points of clean accuracy" in verdict.reason


def test_a_failed_scan_overrides_a_verified_trigger_and_nothing_else():
    trigger = {"type": "patch", "target": 0}
    by_trigger = judge_removal(trigger, Rate(880, 900), Rate(3, 900))
    assert combine_verdicts(by_trigger, _by_scan(Rate(150, 200), False)).verdict == "failed"
    combined = combine_verdicts(by_trigger, _by_scan(Rate(0, 200), False))
    assert combined.verdict == "verified" and combined.evidence["scan"]["source"] == "scan"
    # the scan's own verdict is kept beside the trigger's: what the trigger-free default concluded alone
    assert combined.evidence["scan"]["verdict"] == "not_verified" and combined.evidence["scan"]["found_trigger_removed"]
    worked_not = judge_removal(trigger, Rate(10, 900), Rate(3, 900))
    assert combine_verdicts(worked_not, _by_scan(Rate(0, 200), False)).verdict == "not_verified"


# --- the default through the CLI on tiny models -------------------------------------------------------


@pytest.fixture(scope="module")
def subjects(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("unlearn")
    data = make_template_dataset(root / "data")
    backdoored = train_small_cnn(data, root / "bd.safetensors", "--trigger", "badnets", "--poison-rate", "0.1")
    plain = root / "bd-plain.safetensors"  # the same weights without bdclean's metadata: no trigger recorded
    save_file({k: v.contiguous() for k, v in read_checkpoint(str(backdoored)).state_dict.items()}, str(plain))
    clean = train_small_cnn(data, root / "clean.safetensors")
    return {"root": root, "data": data, "backdoored": backdoored, "plain": plain, "clean": clean}


def _default(path, data, out, *args, quiet: bool = True):
    return runner.invoke(
        app,
        [
            "purify",
            str(path),
            "--data",
            str(data),
            "--out",
            str(out),
            "--clean-count",
            "400",
            "--device",
            "cpu",
            *(["--quiet"] if quiet else []),
            "--json",
            *args,
        ],
    )


@pytest.fixture(scope="module")
def purified(subjects) -> dict:
    """The default on the planted model: its recorded trigger measures the truth beside the scan's verdict."""
    result = _default(subjects["backdoored"], subjects["data"], subjects["root"] / "out")
    assert result.exit_code in (0, 1), result.output
    return json.loads(result.stdout)


def test_the_default_scans_unlearns_the_planted_class_and_removes_the_backdoor(purified):
    assert purified["method"]["name"] == "unlearn" and purified["method"]["recipe"]["recommended"]
    scan = purified["scan"]
    assert 0 in scan["flagged"] and scan["unlearnt"] == scan["flagged"]
    assert purified["before"]["asr"]["value"] > 0.9
    assert purified["after"]["asr"]["value"] < 0.1
    # a toy model of 4 epochs on 1,600 images moves more under 10 epochs of tuning than a converged one
    # (measured here: 100% -> 94.7-95%); the costs on CIFAR-10 ResNets are in docs/purification.md
    assert purified["before"]["clean_acc"]["value"] - purified["after"]["clean_acc"]["value"] < 0.08
    proxy = scan["proxy_asr"]["0"]
    assert proxy["before"]["value"] > 0.5 and proxy["after"]["value"] < proxy["before"]["value"]
    assert scan["proxy_images"] == "held-out clean images" and scan["rescan"]["0"]["mask_l1"] > 0
    assert purified["timings"]["scan"] > 0 and purified["timings"]["verify"] > 0
    # the planted patch is local, so its window was searched as well (defenses/window_search.py)
    assert scan["proxy_asr"]["0"]["local_share"] >= 0.6
    assert any(re.search(r"densest \d+x\d+ window of class 0", note) for note in purified["method"]["notes"])


def test_the_verdict_agrees_with_the_true_trigger(purified):
    """The recorded trigger decides; the scan's evidence rides along; never verified above 20% true ASR."""
    removal = purified["removal"]
    assert removal["evidence"]["scan"]["source"] == "scan"
    if purified["after"]["asr"]["value"] > FAILED_ASR:
        assert removal["verdict"] == "failed"
    assert removal["verdict"] != "verified" or purified["after"]["asr"]["value"] <= 0.05


def test_without_a_trigger_the_scan_verdict_stands_and_gates(subjects):
    result = _default(
        subjects["plain"],
        subjects["data"],
        subjects["root"] / "plain-out",
        "--arch",
        "simple_cnn_half",
        "--require-verified",
    )
    report = json.loads(result.stdout)
    assert report["trigger"] is None
    removal = report["removal"]
    # without a trigger the scan can say what it removed, never `verified`, so --require-verified fails the run
    assert removal["evidence"]["source"] == "scan" and removal["verdict"] in ("not_verified", "failed")
    assert removal["evidence"]["found_trigger_removed"] and "pass --trigger, or --clean-reference" in removal["reason"]
    assert result.exit_code == 1
    md = (subjects["root"] / "plain-out" / "report.md").read_text()
    assert "Scan" in md and "proxy" in md


def test_on_a_clean_model_the_default_flags_nothing_changes_nothing_and_does_not_verify(subjects):
    out = subjects["root"] / "clean-out"
    result = _default(subjects["clean"], subjects["data"], out)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["scan"]["flagged"] == [] and report["scan"]["unlearnt"] == []
    assert "left unchanged" in report["scan"]["choice"] and "--precaution" in report["scan"]["choice"]
    assert report["after"] == report["before"] and report["history"] == []
    assert report["removal"]["verdict"] == "not_verified" and "flagged no class" in report["removal"]["reason"]
    # the output holds the input's weights, bit for bit
    before, after = read_checkpoint(str(subjects["clean"])), read_checkpoint(str(out / "purified.safetensors"))
    assert all(torch.equal(after.state_dict[k], v) for k, v in before.state_dict.items())
    assert "nothing was tuned" in " ".join(report["method"]["notes"])


def test_precaution_unlearns_the_smallest_mask_class_of_a_clean_model(subjects):
    result = _default(subjects["clean"], subjects["data"], subjects["root"] / "clean-precaution", "--precaution")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["scan"]["flagged"] == [] and len(report["scan"]["unlearnt"]) == 1
    assert "precaution" in report["scan"]["choice"] and len(report["history"]) > 0
    assert report["before"]["clean_acc"]["value"] - report["after"]["clean_acc"]["value"] <= 0.02
    assert report["removal"]["verdict"] == "not_verified"
    assert report["options"]["precaution"] is True


def test_unlearn_needs_its_scan_and_takes_its_own_flag_only(subjects, tmp_path):
    refused = _default(
        subjects["backdoored"], subjects["data"], tmp_path / "o", "--method", "fst", "--unlearn-fraction", "0.3"
    )
    assert refused.exit_code == 2 and "--unlearn-fraction does not apply to --method fst" in refused.output
    bad = _default(subjects["backdoored"], subjects["data"], tmp_path / "o2", "--unlearn-fraction", "1.5")
    assert bad.exit_code == 2 and "unlearn-fraction" in bad.output
    no_scan = _default(subjects["backdoored"], subjects["data"], tmp_path / "o3", "--method", "ft", "--scan-steps", "5")
    assert no_scan.exit_code == 2 and "--scan-steps does not apply to --method ft" in no_scan.output
    no_scan = _default(subjects["backdoored"], subjects["data"], tmp_path / "o4", "--method", "fst", "--precaution")
    assert no_scan.exit_code == 2 and "--precaution does not apply to --method fst" in no_scan.output


def test_method_unlearn_distils_the_inputs_clean_outputs_when_asked(subjects, tmp_path):
    result = _default(
        subjects["backdoored"],
        subjects["data"],
        tmp_path / "o",
        "--method",
        "unlearn",
        "--distill",
        "2",
        "--epochs",
        "2",
    )
    assert result.exit_code in (0, 1), result.output
    report = json.loads(result.stdout)
    assert report["method"]["params"]["distill"] == 2.0 and report["method"]["params"]["distill_temperature"] == 2.0
    assert "the input model's outputs distilled on the unstamped images (weight 2, temperature 2)" in " ".join(
        report["method"]["notes"]
    )
    bad = _default(subjects["backdoored"], subjects["data"], tmp_path / "o2", "--method", "unlearn", "--distill", "-1")
    assert bad.exit_code == 2 and "distill" in bad.output


def test_a_clean_reference_keeps_a_planted_trigger_and_says_so(subjects):
    """The planted class's reconstruction does not work on a clean model of the same task: it is unlearnt."""
    result = _default(
        subjects["backdoored"], subjects["data"], subjects["root"] / "ref-out", "--clean-reference", subjects["clean"]
    )
    assert result.exit_code in (0, 1), result.output
    scan = json.loads(result.stdout)["scan"]
    reference = scan["reference"]
    assert reference["checkpoint"] == str(subjects["clean"]) and reference["threshold"] == NATURAL_RATE
    assert reference["natural"] == [] and reference["rates"]["0"]["value"] < NATURAL_RATE
    assert 0 in scan["unlearnt"] and "the clean reference follows none of them" in scan["choice"]
    md = (subjects["root"] / "ref-out" / "report.md").read_text()
    assert f"Clean reference `{subjects['clean']}`" in md and "| 0 |" in md and "| planted |" in md


def test_a_shortcut_the_clean_reference_shares_is_left_alone(subjects):
    """A flagged class whose reconstruction the clean reference follows too is a shortcut of the data: not
    unlearnt, the weights stay the input's, and the verdict says why. (The model is its own reference here,
    which makes every flagged class "shared": the plumbing, not the threshold, is under test.)"""
    out = subjects["root"] / "shared-out"
    args = ["--arch", "simple_cnn_half", "--clean-reference", subjects["plain"]]
    result = _default(subjects["plain"], subjects["data"], out, *args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    scan = report["scan"]
    assert scan["flagged"] and scan["unlearnt"] == [] and scan["reference"]["natural"] == scan["flagged"]
    assert "shortcuts of the data, not planted triggers" in scan["choice"]
    assert report["history"] == [] and report["after"] == report["before"]
    removal = report["removal"]
    assert removal["verdict"] == "not_verified" and "shortcuts the clean reference shares" in removal["reason"]
    assert set(removal["evidence"]["natural_shortcuts"]) == {str(c) for c in scan["flagged"]}
    assert "clean reference follows" in " ".join(report["method"]["notes"])
    before, after = read_checkpoint(str(subjects["plain"])), read_checkpoint(str(out / "purified.safetensors"))
    assert all(torch.equal(after.state_dict[k], v) for k, v in before.state_dict.items())


def _nothing_flagged(monkeypatch) -> None:
    """Purify's scan with a flagging threshold nothing reaches: the planted class becomes a sub-threshold candidate."""
    import functools

    from backdoor_cli.usecases import purify

    monkeypatch.setattr(purify, "InversionParams", functools.partial(InversionParams, threshold=50.0))


def test_a_candidate_below_the_threshold_the_reference_vouches_for_is_unlearnt(subjects, monkeypatch):
    """Nothing flagged, but the smallest mask's reconstruction is ignored by the clean reference: it is
    unlearnt, the true trigger goes, and the scan's verdict stays `not_verified` (a candidate, not a finding)."""
    from backdoor_cli.selection import gentler

    _nothing_flagged(monkeypatch)
    # a 4-epoch toy moves under tuning far more than a converged model: its candidate's cost is not the point here
    monkeypatch.setattr(gentler, "CANDIDATE_COST", 1.0)
    out = subjects["root"] / "candidate-out"
    args = ["--arch", "simple_cnn_half", "--clean-reference", subjects["clean"]]
    result = _default(subjects["plain"], subjects["data"], out, *args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    scan = report["scan"]
    assert scan["flagged"] == [] and scan["unlearnt"] == [0]
    assert "taken for this model's own trigger and unlearnt" in scan["choice"]
    assert scan["reference"]["rates"]["0"]["value"] < NATURAL_RATE
    assert report["history"]  # tuned
    removal = report["removal"]
    assert removal["verdict"] == "not_verified" and "a candidate, not a finding" in removal["reason"]
    # the recorded trigger, measured on the written weights, is gone: the candidate was the backdoor
    measured = runner.invoke(
        app,
        ["evaluate", str(out / "purified.safetensors"), "--data", str(subjects["data"]), "--device", "cpu"]
        + ["--trigger", "badnets", "--json", "--quiet"],
    )
    assert measured.exit_code == 0, measured.output
    assert json.loads(measured.stdout)["metrics"]["asr"]["value"] < 0.2


def test_a_candidate_that_costs_the_held_out_images_too_much_is_undone(subjects, monkeypatch):
    """selection.gentler.CANDIDATE_COST: a guess below the threshold must be cheap; here any cost is too much, so
    the unlearnt candidate is undone and the input's weights are written back, said in the report."""
    from backdoor_cli.selection import gentler

    _nothing_flagged(monkeypatch)
    monkeypatch.setattr(gentler, "CANDIDATE_COST", -1.0)
    out = subjects["root"] / "candidate-undone"
    args = ["--arch", "simple_cnn_half", "--clean-reference", subjects["clean"]]
    result = _default(subjects["plain"], subjects["data"], out, *args, quiet=False)
    assert result.exit_code == 0, result.output
    assert " ".join(result.stderr.split()).count("so it was undone") == 1  # the warning, not repeated after it
    report = json.loads(result.stdout)
    scan = report["scan"]
    assert scan["flagged"] == [] and scan["unlearnt"] == [] and "so it was undone" in scan["choice"]
    assert any("so it was undone" in note for note in report["method"]["notes"])
    assert report["after"]["clean_acc"] == report["before"]["clean_acc"]
    assert report["removal"]["verdict"] == "not_verified"
    before, after = read_checkpoint(str(subjects["plain"])), read_checkpoint(str(out / "purified.safetensors"))
    assert all(torch.equal(after.state_dict[k], v) for k, v in before.state_dict.items())


def test_a_candidate_the_reference_follows_is_left_alone(subjects, monkeypatch):
    """The model as its own reference follows every reconstruction: the candidate is a "shortcut", nothing is
    tuned and the weights are the input's."""
    _nothing_flagged(monkeypatch)
    out = subjects["root"] / "candidate-shared"
    result = _default(
        subjects["plain"], subjects["data"], out, "--arch", "simple_cnn_half", "--clean-reference", subjects["plain"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["scan"]["unlearnt"] == [] and "follows its reconstruction too" in report["scan"]["choice"]
    assert report["history"] == [] and report["removal"]["verdict"] == "not_verified"
    before, after = read_checkpoint(str(subjects["plain"])), read_checkpoint(str(out / "purified.safetensors"))
    assert all(torch.equal(after.state_dict[k], v) for k, v in before.state_dict.items())


def test_a_clean_reference_nothing_uses_is_refused(subjects, tmp_path):
    ref = ["--clean-reference", str(subjects["clean"])]
    fst = _default(subjects["backdoored"], subjects["data"], tmp_path / "o", "--method", "fst", *ref)
    assert fst.exit_code == 2 and "--clean-reference is used by --retune-check" in fst.output
    evaluate = runner.invoke(
        app, ["evaluate", str(subjects["backdoored"]), "--data", str(subjects["data"]), "--device", "cpu", *ref]
    )
    assert evaluate.exit_code == 2 and "--clean-reference" in evaluate.output and "--retune-check" in evaluate.output


def test_with_a_clean_reference_the_scan_alone_verifies_a_removed_planted_trigger(subjects):
    """No trigger known: the single flagged class's reconstruction is ignored by a clean model of the task
    (the model's own trigger), its proxy ASR is gone and the re-scan no longer flags it: `verified`, and the
    true trigger, measured afterwards, is gone too (never `verified` above 20%)."""
    out = subjects["root"] / "ref-verified"
    args = ["--arch", "simple_cnn_half", "--clean-reference", subjects["clean"], "--require-verified"]
    result = _default(subjects["plain"], subjects["data"], out, *args)
    report = json.loads(result.stdout)
    removal = report["removal"]
    assert report["trigger"] is None and report["scan"]["flagged"] == [0], report["scan"]
    assert removal["verdict"] == "verified" and result.exit_code == 0, removal
    assert removal["evidence"]["reference_rates"]["0"]["value"] < NATURAL_RATE
    assert "planted trigger, not a shortcut of the data" in removal["reason"]
    assert "hides from inversion" in removal["reason"]  # what the verdict does not cover, said
    assert "approximates the trigger" in removal["reason"]
    assert report["scan"]["reference"]["usable"] is True
    truth = runner.invoke(
        app,
        [
            "evaluate",
            str(out / "purified.safetensors"),
            "--data",
            str(subjects["data"]),
            "--trigger",
            "badnets",
            "--device",
            "cpu",
            "--json",
        ],
    )
    assert truth.exit_code == 0, truth.output
    assert json.loads(truth.stdout)["metrics"]["asr"]["value"] <= FAILED_ASR


def test_a_reference_far_weaker_than_the_model_is_reported_and_not_used(subjects):
    """A wrongly normalised or weak reference follows no shortcut of the data, so every reconstruction would
    look planted to it: with random weights (chance accuracy) it is not used, and nothing verifies."""
    weak = subjects["root"] / "weak.safetensors"
    generator = torch.Generator().manual_seed(0)
    state = read_checkpoint(str(subjects["plain"])).state_dict
    save_file({k: torch.randn(v.shape, generator=generator) * 0.01 for k, v in state.items()}, str(weak))
    args = ["--arch", "simple_cnn_half", "--clean-reference", weak]
    result = _default(subjects["plain"], subjects["data"], subjects["root"] / "weak-out", *args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    reference = report["scan"]["reference"]
    assert reference["usable"] is False and reference["accuracy"] < reference["input_accuracy"] - 0.15
    assert reference["natural"] == [] and 0 in report["scan"]["unlearnt"]
    assert "too weak a model of the task" in " ".join(report["scan"]["choice"].split())
    assert report["removal"]["verdict"] != "verified" and "reference_rates" not in report["removal"]["evidence"]
    md = (subjects["root"] / "weak-out" / "report.md").read_text()
    assert "more than 15 points below the model, so it was not used as evidence" in md and "| not used |" in md


def test_a_clean_reference_of_another_architecture_says_how_it_is_loaded(subjects, tmp_path):
    """The reference is loaded with the model's --arch: the usual hint (change --arch) would break the model."""
    from backdoor_cli.models.architectures import ARCHITECTURES

    other = tmp_path / "tiny.safetensors"
    save_file(ARCHITECTURES["test_tiny"](4).state_dict(), str(other))
    args = ["--arch", "simple_cnn_half", "--clean-reference", str(other)]
    result = _default(subjects["plain"], subjects["data"], tmp_path / "o", *args)
    assert result.exit_code == 2
    said = " ".join(result.output.split())
    assert f"--clean-reference {other}" in said and "same architecture" in said and "bdclean convert" in said


def test_natural_shortcuts_are_set_aside_by_their_rate_on_the_reference():
    chosen = [_trigger(1), _trigger(3)]
    check = ReferenceCheck("ref.safetensors", {1: Rate(80, 200), 3: Rate(20, 200)}, accuracy=0.9, input_accuracy=0.95)
    kept, why = set_aside_natural(chosen, "flagged by the scan: class 1, 3", check)
    assert [t.target for t in kept] == [3] and check.natural == [1]
    assert "class 1 (40.0%)" in why and "not unlearnt" in why
    _, why = set_aside_natural([_trigger(3)], "flagged", check)
    assert "follows none of them" in why
    rescan = {3: {"mask_l1": 30.0, "input_mask_l1": 4.0, "flagged": False, "anomaly_index": 0.5}}
    verdict = judge_removal_by_scan(
        [3], [3], {3: Rate(190, 200)}, {3: Rate(0, 200)}, rescan, natural={1: Rate(80, 200)}
    )
    assert verdict.evidence["natural_shortcuts"]["1"]["k"] == 80 and verdict.evidence["found_trigger_removed"]
    only = judge_removal_by_scan([], [], {}, {}, {}, natural={1: Rate(80, 200)})
    assert only.verdict == "not_verified" and "shortcuts the clean reference shares" in only.reason
    assert "--method fst" in only.reason  # the SIG subjects' case: a trigger-free method is the way left


def test_the_scan_verifies_only_one_flagged_class_the_reference_shows_to_be_planted_and_gone():
    gone = {"mask_l1": 30.0, "input_mask_l1": 4.0, "flagged": False, "anomaly_index": 0.5}
    planted = {0: Rate(12, 180)}
    local = {0: Rate(180, 200)}  # cut to its densest window it keeps 95% of its proxy ASR: a local trigger
    verdict = judge_removal_by_scan(
        [0], [0], {0: Rate(190, 200)}, {0: Rate(1, 200)}, {0: gone}, planted=planted, local=local
    )
    assert verdict.verdict == "verified" and verdict.evidence["reference_rates"]["0"]["k"] == 12
    assert verdict.evidence["local_share"]["0"] == pytest.approx(180 / 190, abs=1e-4)
    assert "a local one (its densest window keeps 95% of its proxy ASR)" in verdict.reason
    # still working: failed; re-flagged with a trigger nobody tested on the reference: never verified
    works = judge_removal_by_scan([0], [0], {0: Rate(190, 200)}, {0: Rate(90, 200)}, {0: gone}, planted=planted)
    assert works.verdict == "failed"
    flagged = {0: {**gone, "flagged": True}}
    assert judge_removal_by_scan(
        [0], [0], {0: Rate(190, 200)}, {0: Rate(1, 200)}, flagged, planted=planted
    ).verdict == ("not_verified")
    # between the bounds, another class checked by the reference, or several flagged: not verified
    for after, rates in ((Rate(14, 200), planted), (Rate(1, 200), {3: Rate(12, 180)})):
        assert judge_removal_by_scan([0], [0], {0: Rate(190, 200)}, {0: after}, {0: gone}, planted=rates).verdict == (
            "not_verified"
        )
    both = {c: gone for c in (0, 3)}
    proxies = {c: Rate(1, 200) for c in (0, 3)}
    several = judge_removal_by_scan(
        [0, 3],
        [0, 3],
        {0: Rate(190, 200), 3: Rate(150, 200)},
        proxies,
        both,
        planted={0: Rate(12, 180), 3: Rate(9, 180)},
    )
    assert several.verdict == "not_verified" and "2 classes were flagged" in several.reason


def test_a_spread_out_reconstruction_is_never_verified_without_the_trigger():
    """Gone, planted by the reference, but its densest window keeps too little of its effect (a blend's
    approximation: a blend ResNet-20 kept 22.2% true ASR): not_verified, the share said; unmeasured: the same."""
    gone = {"mask_l1": 30.0, "input_mask_l1": 4.0, "flagged": False, "anomaly_index": 0.5}
    args = ([0], [0], {0: Rate(160, 180)}, {0: Rate(3, 180)}, {0: gone})
    spread = judge_removal_by_scan(*args, planted={0: Rate(18, 180)}, local={0: Rate(60, 180)})
    assert spread.verdict == "not_verified" and spread.evidence["found_trigger_removed"]
    said = " ".join(spread.reason.split())
    assert "its densest window keeps only 38% of its proxy ASR, below 60%" in said and "--trigger" in said
    unmeasured = judge_removal_by_scan(*args, planted={0: Rate(18, 180)})
    assert unmeasured.verdict == "not_verified" and "was not measured" in unmeasured.reason


def test_localize_keeps_the_densest_window_of_a_quarter_side():
    from backdoor_cli.scanning.guided import localize

    mask = torch.zeros(32, 32)
    mask[28:32, 28:32] = 1.0  # a 4x4 patch in the corner
    mask[0, :] = 0.25  # and a faint line along the top
    trigger = ClassTrigger(2, mask, torch.rand(32, 32, 3), float(mask.sum()), 0.99, True, 10)
    core = localize(trigger)
    assert core.target == 2 and torch.equal(core.pattern, trigger.pattern)
    assert core.mask[28:32, 28:32].sum() == 16 and core.mask.sum() == 16 and core.l1 == 16
    assert core.mask[0].sum() == 0  # the line lies outside the 8x8 window


def test_a_re_scan_flag_counts_by_what_the_clean_reference_makes_of_the_re_scanned_trigger():
    """Re-flagged after unlearning: a trigger the reference ignores is the backdoor still there (failed); one it
    follows too is the data's shortcut to the class (a patch ResNet-56 whose true ASR fell to 2.1% re-flagged
    its airplane class at 2.20), which does not stand in the way of `verified`."""
    again = {"mask_l1": 35.6, "input_mask_l1": 14.5, "flagged": True, "anomaly_index": 2.2}
    planted = {0: Rate(0, 180)}

    def judge(entry):
        return judge_removal_by_scan(
            [0], [0], {0: Rate(180, 180)}, {0: Rate(0, 180)}, {0: entry}, planted=planted, local={0: Rate(175, 180)}
        )

    left = judge({**again, "reference_rate": Rate(20, 180).to_dict(), "shortcut": False})
    assert left.verdict == "failed" and "the clean reference ignores the re-scanned trigger" in left.reason
    shortcut = judge({**again, "reference_rate": Rate(120, 180).to_dict(), "shortcut": True})
    assert shortcut.verdict == "verified" and shortcut.evidence["found_trigger_removed"]
    assert "the data's shortcut to the class" in shortcut.reason and "66.7%" in shortcut.reason
    untested = judge(again)
    assert untested.verdict == "not_verified" and "only a clean reference (--clean-reference)" in untested.reason
    assert not untested.evidence["found_trigger_removed"]


class CornerModel(torch.nn.Module):
    """Class 2's logit grows with the bottom-right corner's brightness (differentiable, so the inversion finds
    a tiny corner mask for class 2); the other classes' logits are constant."""

    def forward(self, x):
        corner = x[:, :, -2:, -2:].mean((1, 2, 3))
        flat = torch.zeros_like(corner)
        return torch.stack([flat + 1.0, flat, 8.0 * corner, flat], 1)


def test_the_re_scanned_trigger_is_tried_on_the_clean_reference_when_still_flagged():
    """guided.rescan: a class still flagged gets the clean reference's rate for its re-scanned trigger, and is a
    shortcut when the reference follows it too (here the reference is the same corner-reading model)."""
    images = ImageSet(torch.full((40, 8, 8, 3), 10, dtype=torch.uint8), torch.arange(40) % 4)
    # the input scan's other classes needed ~40 pixels: the re-scanned tiny corner mask is an outlier
    result = ScanResult(
        triggers=[_trigger(c, l1=40.0) for c in range(4)], anomaly=[0.0] * 4, median_l1=40.0, mad=0.1, threshold=2.0
    )
    params = InversionParams(steps=40, batch_size=8)
    model = CornerModel()
    reference = CleanReference("ref.safetensors", CornerModel(), MEAN, STD)
    args = (model, images, [2], result, MEAN, STD, LOGITS, params, 0)
    found = rescan(*args, reference=reference, reference_images=images)[2]
    assert found["flagged"] and found["mask_l1"] < 20, found
    assert found["reference_rate"]["n"] == 30 and found["reference_rate"]["value"] >= NATURAL_RATE
    assert found["shortcut"] is True
    assert "reference_rate" not in rescan(*args)[2]  # without a reference nothing is claimed


def test_a_weak_reference_sets_nothing_aside_and_vouches_for_nothing():
    check = ReferenceCheck("ref.safetensors", {1: Rate(80, 200), 3: Rate(20, 200)}, accuracy=0.3, input_accuracy=0.9)
    assert not check.usable and check.natural == [] and check.planted == {}
    kept, why = set_aside_natural([_trigger(1), _trigger(3)], "flagged by the scan: class 1, 3", check)
    assert [t.target for t in kept] == [1, 3] and "too weak a model of the task" in why and "30.0%" in why
    assert check.to_dict()["usable"] is False


def test_several_flagged_classes_never_verify_and_are_called_shortcuts_of_the_data():
    """A clean softmax MNIST CNN had 3 classes flagged, and a SIG ResNet-20 had 2 flagged that were not its
    target (true ASR 71.9% after unlearning them): with several classes flagged the scan cannot say which is
    a backdoor, so its evidence never makes a `verified`."""
    rescan = {c: {"mask_l1": 30.0, "input_mask_l1": 4.0, "flagged": False, "anomaly_index": 0.5} for c in (2, 3)}
    rates = {c: Rate(0, 200) for c in (2, 3)}
    verdict = judge_removal_by_scan([2, 3], [2, 3], {2: Rate(150, 200), 3: Rate(160, 200)}, rates, rescan)
    assert verdict.verdict == "not_verified" and "2 classes were flagged" in verdict.reason
    assert "shortcuts of the data" in verdict.reason and "--trigger" in verdict.reason
    assert "classes were flagged" not in _by_scan(Rate(0, 200), False).reason
    still = judge_removal_by_scan(
        [2, 3], [2, 3], {2: Rate(150, 200), 3: Rate(160, 200)}, {2: Rate(0, 200), 3: Rate(90, 200)}, rescan
    )
    assert still.verdict == "failed"  # one of them still works: failed, as with one flagged class


def test_guessed_values_are_said_on_the_terminal_in_one_line_each(subjects):
    """A checkpoint without metadata: its architecture comes from its tensor names and its normalisation
    from the dataset's default; a wrong guess changes every figure, so stderr says so (issue 23)."""
    args = ["evaluate", str(subjects["plain"]), "--data", str(subjects["data"]), "--device", "cpu"]
    guessed = runner.invoke(app, [*args, "--eval-limit", "40"])
    assert guessed.exit_code == 0, guessed.output
    said = " ".join(guessed.stderr.split())  # the console wraps long lines
    assert "architecture simple_cnn_half guessed from its tensor names" in said
    assert "normalisation is the dataset's default" in said and "--mean/--std" in said
    given = runner.invoke(
        app,
        [*args, "--eval-limit", "40", "--arch", "simple_cnn_half", "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25"],
    )
    assert given.exit_code == 0 and "guessed" not in given.stderr and "dataset's default" not in given.stderr
    recorded = runner.invoke(
        app,
        [
            "evaluate",
            str(subjects["backdoored"]),
            "--data",
            str(subjects["data"]),
            "--device",
            "cpu",
            "--eval-limit",
            "40",
        ],
    )
    assert recorded.exit_code == 0 and "guessed" not in recorded.stderr


def test_report_md_shows_what_the_clean_reference_made_of_the_re_scan():
    """The evidence behind a verdict is in report.md: the reference's rates and the re-scan's judgement."""
    from backdoor_cli.reports.report import scan_markdown

    rate = {"k": 0, "n": 180, "value": 0.0, "ci95": [0.0, 0.021]}
    again = {"mask_l1": 34.7, "input_mask_l1": 14.5, "anomaly_index": 2.35, "flagged": True}
    scan = {
        "flagged": [0],
        "choice": "flagged by the scan: class 0",
        "rule": "the rule",
        "classes": [{"class": 0, "mask_l1": 14.5, "anomaly_index": 7.8, "success": 0.99}],
        "proxy_images": "held-out clean images",
        "proxy_asr": {"0": {"before": {**rate, "k": 180, "value": 1.0}, "after": rate}},
        "rescan": {"0": {**again, "reference_rate": {**rate, "k": 115, "value": 0.639}, "shortcut": True}},
        "reference": {
            "checkpoint": "clean.safetensors",
            "threshold": 0.35,
            "accuracy": 0.92,
            "input_accuracy": 0.95,
            "margin": 0.15,
            "usable": True,
            "rates": {"0": rate},
            "natural": [],
        },
    }
    md = "\n".join(scan_markdown(scan))
    assert "2.35 (still flagged); on the clean reference 63.9%: the data's shortcut |" in md
    assert "Clean reference `clean.safetensors`: 92.0% of the held-out images right (the model: 95.0%)" in md
    assert "| 0 | 0.00%" in md and "| planted |" in md
    scan["rescan"]["0"]["shortcut"] = False
    assert "63.9%: the backdoor |" in "\n".join(scan_markdown(scan))
