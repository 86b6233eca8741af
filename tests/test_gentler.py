"""The default's gentler rerun (selection/gentler.py, usecases/default_unlearning.py): when the unlearning costs the
held-out images more than GENTLER_DROP, it runs again from the input at a third of the rate and keeps the
gentler weights only when they still remove what the scan found and cost less; otherwise the first run's
weights are restored exactly. When its first epoch costs more than FIRST_EPOCH_DROP, it is stopped there and
the gentler run starts at once; a gentler run that is not kept sends the default back to its own rate, run in
full."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from backdoor_cli.cli import app
from backdoor_cli.evaluation.metrics import Rate
from backdoor_cli.selection import gentler
from backdoor_cli.selection.gentler import (
    CANDIDATE_COST,
    FIRST_EPOCH_DROP,
    GENTLER_DROP,
    GentlerRun,
    candidate_too_costly,
    needs_gentler,
    removed,
    too_hot,
)


def _run(first_acc=0.79, acc=0.88, proxy: Rate | None = None, first_proxy: Rate | None = None) -> GentlerRun:
    return GentlerRun(
        input_acc=0.91,
        first_lr=0.01,
        first_acc=first_acc,
        first_proxy={0: first_proxy or Rate(3, 180)},
        lr=0.01 / 3,
        acc=acc,
        proxy={0: proxy or Rate(2, 180)},
    )


def test_only_a_fall_beyond_the_threshold_asks_for_a_gentler_run():
    assert not needs_gentler(0.91, 0.91 - GENTLER_DROP)  # exactly the threshold: not beyond it
    assert needs_gentler(0.91, 0.91 - GENTLER_DROP - 0.005)
    assert not needs_gentler(0.80, 0.85)  # a rise is no cost


def test_only_a_first_epoch_fall_beyond_its_threshold_stops_the_run():
    assert not too_hot(0.86, 0.86 - FIRST_EPOCH_DROP)
    assert too_hot(0.86, 0.67)  # the VGG-16-BN on fresh images: 19 points after its first epoch
    assert not too_hot(0.995, 0.92)  # the worst ResNet measured: 7.5 points
    assert FIRST_EPOCH_DROP > GENTLER_DROP  # one epoch in, the run has not yet recovered what it will


def _stopped(acc=0.85, proxy: Rate | None = None, first_acc=None, first_proxy: Rate | None = None) -> GentlerRun:
    return GentlerRun(
        input_acc=0.86,
        first_lr=0.01,
        first_acc=first_acc,
        first_proxy={0: first_proxy or Rate(3, 180)} if first_acc is not None else None,
        lr=0.01 / 3,
        acc=acc,
        proxy={0: proxy or Rate(2, 180)},
        cause="first_epoch",
        stopped_acc=0.67,
    )


def test_a_stopped_run_keeps_the_gentler_one_when_it_removes_and_costs_less_than_the_stopped_epoch():
    kept = _stopped()
    assert kept.kept_gentler and "in its first epoch" in kept.reason() and "the gentler run is kept" in kept.reason()
    doc = kept.to_dict()
    assert doc["cause"] == "first_epoch" and doc["first_epoch_threshold"] == FIRST_EPOCH_DROP
    assert doc["first"]["stopped_after_first_epoch"] and doc["first"]["stopped_holdout_acc"] == 0.67
    assert doc["first"]["holdout_acc"] is None and doc["first"]["proxy_asr"] is None  # never run in full
    left = _stopped(proxy=Rate(40, 180), first_acc=0.78)
    assert not left.kept_gentler
    assert "did not remove what the scan found, so the unlearning was run in full at lr 0.01" in left.reason()
    assert left.to_dict()["first"]["holdout_acc"] == 0.78 and left.to_dict()["kept"] == "first"
    assert not _stopped(acc=0.60, first_acc=0.80).kept_gentler  # below the stopped epoch: it cost more


def test_a_candidate_may_cost_the_held_out_images_at_most_candidate_cost():
    assert not candidate_too_costly(0.905, 0.905 - CANDIDATE_COST)
    assert candidate_too_costly(0.905, 0.87)  # the clean VGG-16-BN's candidate: 3.5 points
    assert not candidate_too_costly(0.96, 0.965)  # the planted ResNet-20's: none


def test_removed_needs_every_class_within_both_bounds():
    assert removed({0: Rate(2, 180), 3: Rate(0, 180)})
    assert not removed({0: Rate(2, 180), 3: Rate(12, 180)})  # 6.7% > 5%
    assert not removed({0: Rate(1, 10)})  # 10% on 10 images: the upper bound is far above 10%


def test_the_gentler_run_is_kept_only_when_it_removes_and_costs_less():
    kept = _run()
    assert kept.kept_gentler and "the gentler run is kept" in kept.reason()
    assert kept.to_dict()["kept"] == "gentler" and kept.to_dict()["gentler"]["lr"] == pytest.approx(0.01 / 3)
    left = _run(proxy=Rate(40, 180))
    assert not left.kept_gentler and "did not remove what the scan found" in left.reason()
    costly = _run(acc=0.78)
    assert not costly.kept_gentler and "it cost no less" in costly.reason()
    doc = costly.to_dict()
    assert doc["first"]["holdout_acc"] == 0.79 and doc["first"]["proxy_asr"]["0"]["k"] == 3
    assert doc["threshold"] == GENTLER_DROP and doc["kept"] == "first" and doc["cause"] == "last_epoch"
    assert not doc["first"]["stopped_after_first_epoch"]


def test_where_neither_run_removes_the_cheaper_gentler_one_is_kept_if_no_worse():
    # the second VGG-16-BN's false flag: 7.2% after the gentler run, 5.6% after the full one
    neither = _run(proxy=Rate(13, 180), first_proxy=Rate(10, 180))
    assert neither.neither_removes and neither.kept_gentler and neither.to_dict()["kept"] == "gentler"
    said = " ".join(neither.reason().split())
    assert "neither run removed what the scan found (the first: 79.0%, proxy ASR class 0 5.6% (upper bound" in said
    assert "the gentler run is kept (at less cost)" in said
    worse = _run(proxy=Rate(30, 180), first_proxy=Rate(10, 180))  # 16.7%: above the full run's upper bound
    assert not worse.neither_removes and not worse.kept_gentler and "did not remove" in worse.reason()
    assert not _run(acc=0.78, proxy=Rate(13, 180), first_proxy=Rate(10, 180)).kept_gentler  # it cost more
    assert not _run(proxy=Rate(13, 180)).neither_removes  # the full run removed it: worth its cost
    stopped = _stopped(proxy=Rate(13, 180), first_acc=0.80, first_proxy=Rate(10, 180))
    assert stopped.kept_gentler and stopped.to_dict()["kept"] == "gentler"
    said = " ".join(stopped.reason().split())
    assert "so the unlearning was run in full at lr 0.01 (80.0%, proxy ASR class 0 5.6%" in said
    assert "which did not either: the gentler run is kept" in said
    assert not _stopped(proxy=Rate(13, 180)).neither_removes  # not yet run in full: nothing to compare with


@pytest.fixture(scope="module")
def planted(planted_template) -> dict:
    return planted_template  # conftest.py: trained once per session


def _default(planted, out, *args):
    return CliRunner().invoke(
        app,
        [
            "purify",
            str(planted["model"]),
            "--data",
            str(planted["data"]),
            "--out",
            str(out),
            "--clean-count",
            "400",
            "--epochs",
            "3",
            "--device",
            "cpu",
            "--json",
            *args,
        ],
    )


@pytest.fixture(scope="module")
def plain_run(planted) -> dict:
    """The default with a threshold no fall reaches: one unlearning run, the reference for the forced ones."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gentler, "GENTLER_DROP", 1.0)
        patch.setattr(gentler, "FIRST_EPOCH_DROP", 1.0)
        result = _default(planted, planted["root"] / "plain")
    assert result.exit_code in (0, 1), result.output
    return json.loads(result.stdout)


def test_no_fall_beyond_the_threshold_no_rerun(plain_run):
    holdout = plain_run["clean_data"]["holdout"]
    assert holdout["gentler"] is None and len(holdout["curve"]) == 3
    assert not any("again" in note for note in plain_run["method"]["notes"])


def test_a_kept_first_run_is_restored_exactly(planted, plain_run, monkeypatch, tmp_path):
    monkeypatch.setattr(gentler, "FIRST_EPOCH_DROP", 1.0)  # no run is stopped after its first epoch
    monkeypatch.setattr(gentler, "GENTLER_DROP", -1.0)  # but every run "falls" by its last
    monkeypatch.setattr(gentler, "PROXY_REMOVED", -1.0)  # and no gentler run removes anything: the first is kept
    monkeypatch.setattr(GentlerRun, "neither_removes", property(lambda self: False))  # as the first run removes
    result = _default(planted, tmp_path / "o")
    assert result.exit_code in (0, 1), result.output
    report = json.loads(result.stdout)
    retry = report["clean_data"]["holdout"]["gentler"]
    assert retry["kept"] == "first" and retry["gentler"]["lr"] == pytest.approx(retry["first"]["lr"] / 3)
    assert len(retry["gentler"]["curve"]) == 3  # the gentler run's own held-out curve, epoch by epoch
    assert (
        retry["first"]["curve"]
        == report["clean_data"]["holdout"]["curve"]
        == plain_run["clean_data"]["holdout"]["curve"]
    )
    assert "running it again from the input at lr" in " ".join(result.stderr.split())
    assert any("the first run is kept" in note for note in report["method"]["notes"])
    assert report["method"]["params"]["lr"] == retry["first"]["lr"]
    ours = load_file(str(tmp_path / "o" / "purified.safetensors"))
    theirs = load_file(str(planted["root"] / "plain" / "purified.safetensors"))
    assert ours.keys() == theirs.keys() and all((ours[k] == theirs[k]).all() for k in ours)
    assert report["after"]["clean_acc"] == plain_run["after"]["clean_acc"]


def test_a_kept_gentler_run_records_the_rate_it_was_tuned_at(planted, monkeypatch, tmp_path):
    monkeypatch.setattr(gentler, "FIRST_EPOCH_DROP", 1.0)
    monkeypatch.setattr(gentler, "GENTLER_DROP", -1.0)
    monkeypatch.setattr(gentler, "PROXY_REMOVED", 1.0)  # anything counts as removed
    monkeypatch.setattr(gentler, "PROXY_REMOVED_HIGH", 1.0)
    monkeypatch.setattr(GentlerRun, "kept_gentler", property(lambda self: True))  # and it always costs less
    result = _default(planted, tmp_path / "o")
    assert result.exit_code in (0, 1), result.output
    report = json.loads(result.stdout)
    retry = report["clean_data"]["holdout"]["gentler"]
    assert retry["kept"] == "gentler"
    assert report["method"]["params"]["lr"] == pytest.approx(retry["gentler"]["lr"])
    assert any("the gentler run is kept" in note for note in report["method"]["notes"])


def test_a_run_stopped_after_its_first_epoch_keeps_a_gentler_run_that_removes(planted, monkeypatch, tmp_path):
    monkeypatch.setattr(gentler, "FIRST_EPOCH_DROP", -1.0)  # every first epoch "falls"
    monkeypatch.setattr(gentler, "PROXY_REMOVED", 1.0)  # anything counts as removed
    monkeypatch.setattr(gentler, "PROXY_REMOVED_HIGH", 1.0)
    monkeypatch.setattr(GentlerRun, "kept_gentler", property(lambda self: True))
    result = _default(planted, tmp_path / "o")
    assert result.exit_code in (0, 1), result.output
    report = json.loads(result.stdout)
    holdout = report["clean_data"]["holdout"]
    retry = holdout["gentler"]
    assert retry["cause"] == "first_epoch" and retry["first"]["stopped_after_first_epoch"]
    assert len(retry["first"]["curve"]) == 1  # the stopped run: one epoch
    assert len(retry["gentler"]["curve"]) == 3 and retry["kept"] == "gentler"
    assert holdout["curve"] == retry["gentler"]["curve"]  # the report's curve is the kept run's, as its history
    assert retry["first"]["holdout_acc"] is None  # the default's rate was never run in full
    assert report["method"]["params"]["lr"] == pytest.approx(retry["first"]["lr"] / 3)
    assert "stopping it and running from the input at lr" in " ".join(result.stderr.split())
    md = (tmp_path / "o" / "report.md").read_text()  # the report says why its rate is not the default's
    assert "- Tuning: the unlearning at lr 0.01 cost the held-out images" in md and "in its first epoch" in md


def test_a_stopped_run_whose_gentler_run_fails_is_run_in_full_at_the_default_rate(
    planted, plain_run, monkeypatch, tmp_path
):
    monkeypatch.setattr(gentler, "FIRST_EPOCH_DROP", -1.0)
    monkeypatch.setattr(gentler, "GENTLER_DROP", 1.0)
    monkeypatch.setattr(gentler, "PROXY_REMOVED", -1.0)  # no gentler run removes anything
    monkeypatch.setattr(GentlerRun, "neither_removes", property(lambda self: False))  # and the full run is worth it
    result = _default(planted, tmp_path / "o")
    assert result.exit_code in (0, 1), result.output
    report = json.loads(result.stdout)
    holdout = report["clean_data"]["holdout"]
    retry = holdout["gentler"]
    assert retry["cause"] == "first_epoch" and retry["kept"] == "first"
    assert len(holdout["curve"]) == 3 and holdout["curve"] == plain_run["clean_data"]["holdout"]["curve"]
    assert retry["first"]["holdout_acc"] == holdout["curve"][-1]["holdout_acc"]
    assert retry["first"]["curve"] == holdout["curve"]  # the full run's, not the stopped epoch alone
    assert any("run in full at lr" in note for note in report["method"]["notes"])
    assert report["method"]["params"]["lr"] == retry["first"]["lr"]
    ours = load_file(str(tmp_path / "o" / "purified.safetensors"))
    theirs = load_file(str(planted["root"] / "plain" / "purified.safetensors"))
    assert ours.keys() == theirs.keys() and all((ours[k] == theirs[k]).all() for k in ours)


def test_a_full_run_that_removes_no_more_gives_way_to_the_gentler_run_before_it(planted, monkeypatch, tmp_path):
    monkeypatch.setattr(gentler, "FIRST_EPOCH_DROP", -1.0)  # every first epoch "falls"
    monkeypatch.setattr(GentlerRun, "kept_gentler", property(lambda self: True))
    result = _default(planted, tmp_path / "at-once")  # the gentler run, kept at once
    assert result.exit_code in (0, 1), result.output
    # now the gentler run is kept only once the full run has been measured and removed no more
    monkeypatch.setattr(GentlerRun, "kept_gentler", property(lambda self: self.first_proxy is not None))
    monkeypatch.setattr(GentlerRun, "neither_removes", property(lambda self: self.first_proxy is not None))
    result = _default(planted, tmp_path / "o")
    assert result.exit_code in (0, 1), result.output
    report = json.loads(result.stdout)
    holdout = report["clean_data"]["holdout"]
    retry = holdout["gentler"]
    assert retry["kept"] == "gentler" and retry["first"]["holdout_acc"] is not None  # the full run was made
    assert len(retry["first"]["curve"]) == 3 and holdout["curve"] == retry["gentler"]["curve"]
    assert report["method"]["params"]["lr"] == pytest.approx(retry["first"]["lr"] / 3)
    assert any("which did not either: the gentler run is kept" in note for note in report["method"]["notes"])
    ours = load_file(str(tmp_path / "o" / "purified.safetensors"))
    theirs = load_file(str(tmp_path / "at-once" / "purified.safetensors"))
    assert ours.keys() == theirs.keys() and all((ours[k] == theirs[k]).all() for k in ours)


def test_a_named_method_is_never_rerun(planted, monkeypatch, tmp_path):
    monkeypatch.setattr(gentler, "FIRST_EPOCH_DROP", -1.0)
    monkeypatch.setattr(gentler, "GENTLER_DROP", -1.0)
    result = _default(planted, tmp_path / "o", "--method", "fst", "--holdout-fraction", "0.2")
    assert result.exit_code in (0, 1), result.output
    holdout = json.loads(result.stdout)["clean_data"]["holdout"]
    assert holdout is None or holdout.get("gentler") is None
