"""`bdclean demo`: the offline story on the bundled MNIST sample."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

import backdoor_cli.usecases.demo as demo
from backdoor_cli.cli import app
from backdoor_cli.evaluation.metrics import Rate

runner = CliRunner()


def test_sample_is_bundled_and_small():
    sample = demo.sample_dir()
    sizes = {p.name: p.stat().st_size for p in sample.glob("*.npz")}
    assert set(sizes) == {"train.npz", "test.npz"} and sum(sizes.values()) < 8_000_000


def test_demo_runs_end_to_end_with_tiny_settings(tmp_path, monkeypatch):
    """The whole pipeline of the demo (train, purify ft+fst, compare, story), shrunk to seconds."""
    monkeypatch.setattr(demo, "DEMO_TRAIN", dict(arch="test_tiny", epochs=1, lr=0.05, batch_size=256, augment=False))
    monkeypatch.setattr(demo, "DEMO_CLEAN_COUNT", 60)
    monkeypatch.setattr(demo, "DEMO_TUNE", dict(lr=0.01, epochs=1))
    result = runner.invoke(app, ["demo", "--out", str(tmp_path / "d"), "--device", "cpu", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "What happened" in result.stdout and "FST" in result.stdout
    assert result.stdout.count("; removal ") == 3  # each purify line carries its removal verdict
    for name in (
        "backdoored.safetensors",
        "clean.safetensors",
        "compare.md",
        "compare.json",
        "ft/purified.safetensors",
        "fst/purified.safetensors",
        "fst/report.json",
        "recommended/purified.safetensors",
        "recommended/report.md",
    ):
        assert (tmp_path / "d" / name).is_file(), name
    recommended = json.loads((tmp_path / "d" / "recommended" / "report.json").read_text())
    assert recommended["options"]["clean-reference"] == str(tmp_path / "d" / "clean.safetensors")
    fst = json.loads((tmp_path / "d" / "fst" / "report.json").read_text())
    assert fst["options"]["clean-reference"] is None  # only the default reads it; fst would refuse it


def _report(acc_before, acc_after, asr_after, flagged=(0,), verdict="verified", unlearnt=None, own=None):
    evidence = {"source": "scan"} if not flagged else ({"scan": own} if own else {})
    return SimpleNamespace(
        before=SimpleNamespace(clean_acc=Rate(int(acc_before * 100), 100)),
        after=SimpleNamespace(clean_acc=Rate(int(acc_after * 100), 100), asr=Rate(int(asr_after * 100), 100)),
        scan={"flagged": list(flagged), "unlearnt": list(flagged) if unlearnt is None else list(unlearnt)},
        removal={"verdict": verdict, "evidence": evidence},
    )


def test_story_follows_the_measured_figures():
    lines = demo.story(0.98, 0.9, _report(0.98, 0.95, 0.20), _report(0.98, 0.87, 0.01))
    assert "left an ASR of 20.0%" in lines[1] and "removed the backdoor" in lines[2] and "11.0 points" in lines[2]
    lines = demo.story(0.98, 0.9, _report(0.98, 0.95, 0.02), _report(0.98, 0.87, 0.40))
    assert "brought the ASR down to 2.0%" in lines[1] and "did not remove" in lines[2]
    assert len(lines) == 3  # no recommended run, no line for it


def test_story_tells_the_default_from_its_own_figures():
    lines = demo.story(0.98, 0.9, _report(0.98, 0.95, 0.20), _report(0.98, 0.87, 0.01), _report(0.98, 0.95, 0.02))
    assert "bdclean's default" in lines[3] and "removed the backdoor (ASR 2.0%)" in lines[3]
    assert "cost of 3.0 points" in lines[3] and "against FST's 11.0" in lines[3]
    assert "flagged class 0" in lines[3] and "removal verdict: verified (from the trigger recorded" in lines[3]
    lines = demo.story(
        0.98,
        0.9,
        _report(0.98, 0.95, 0.20),
        _report(0.98, 0.87, 0.01),
        _report(0.98, 0.95, 0.02, flagged=(), verdict="not_verified", unlearnt=[3]),
    )
    assert "flagged no class" in lines[3] and "(class 3) was unlearnt" in lines[3]
    assert "not verified (from the scan's evidence alone)" in lines[3]
    nothing = _report(0.98, 0.98, 0.90, flagged=(), verdict="not_verified", unlearnt=[])
    assert "flagged no class, so nothing was unlearnt" in demo.story(0.98, 0.9, nothing, nothing, nothing)[3]
    shortcut = _report(0.98, 0.98, 0.90, flagged=(2,), verdict="failed", unlearnt=[])
    assert "a shortcut the clean reference shares, so nothing was unlearnt" in demo.story(0.98, 0.9, *[shortcut] * 3)[3]
    own = {"verdict": "verified", "reason": "the trigger the scan found is gone"}
    lines = demo.story(0.98, 0.9, *[_report(0.98, 0.95, 0.02, own=own)] * 3)
    assert (
        lines[4].startswith("Without the recorded trigger, the default's own verdict")
        and "is verified: the" in lines[4]
    )
    lines = demo.story(0.98, 0.9, _report(0.98, 0.95, 0.20), _report(0.98, 0.87, 0.01), _report(0.98, 0.97, 0.50))
    assert "did not remove the backdoor (ASR 50.0%)" in lines[3]
    lines = demo.story(0.98, 0.9, _report(0.98, 0.95, 0.20), _report(0.98, 0.87, 0.01), _report(0.98, 0.97, 0.08))
    assert "but not to the removal verdict's 5% bound (ASR 8.0%)" in lines[3]  # between the verdict's bounds


@pytest.mark.slow
def test_real_demo_shows_the_papers_effect(tmp_path):
    """The shipped settings (about 2 minutes on 2 CPU cores): FST's ASR low, FT's visibly higher."""
    from rich.console import Console

    outcome = demo.run_demo(tmp_path / "d", force=True, device="cpu", console=Console(file=open("/dev/null", "w")))
    ft, fst = outcome["purified"]["ft"], outcome["purified"]["fst"]
    assert fst.after.asr.value <= demo.LOW_ASR < ft.after.asr.value
