"""The retuning check: the poisoned tuning set, the verdict rule, and --retune-check on purify."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from backdoor_cli.cli import app
from backdoor_cli.data.datasets import ImageSet
from backdoor_cli.evaluation.metrics import Rate
from backdoor_cli.triggers import build_trigger, load_trigger_spec
from backdoor_cli.verdicts.retune import RetuneResult, RetuneSettings, judge, poisoned_tuning_set
from helpers import make_npz_dataset, train_badnets_model

runner = CliRunner()


def _clean(n=40, classes=4):
    g = torch.Generator().manual_seed(0)
    return ImageSet(torch.randint(0, 256, (n, 12, 12, 3), generator=g, dtype=torch.uint8), torch.arange(n) % classes)


def test_the_poisoned_set_replaces_exactly_n_non_target_images_with_triggered_ones():
    clean = _clean()
    trigger = build_trigger(load_trigger_spec("badnets"), (12, 12, 3))
    tuned, mask = poisoned_tuning_set(clean, trigger, RetuneSettings(poisoned=5))
    assert int(mask.sum()) == 5
    assert bool((clean.y[mask] != trigger.target).all()) and bool((tuned.y[mask] == trigger.target).all())
    assert torch.equal(tuned.x[mask], trigger.apply(clean.x[mask]))
    assert torch.equal(tuned.x[~mask], clean.x[~mask]) and torch.equal(tuned.y[~mask], clean.y[~mask])
    again, mask2 = poisoned_tuning_set(clean, trigger, RetuneSettings(poisoned=5))
    assert torch.equal(mask, mask2)  # seeded: a clean reference gets the same images


def test_too_few_non_target_images_is_a_clear_error():
    from backdoor_cli.errors import ConfigError

    clean = ImageSet(torch.zeros(6, 12, 12, 3, dtype=torch.uint8), torch.tensor([0, 0, 0, 0, 1, 1]))
    trigger = build_trigger(load_trigger_spec("badnets"), (12, 12, 3))
    with pytest.raises(ConfigError, match="needs 5 clean images outside the target class"):
        poisoned_tuning_set(clean, trigger, RetuneSettings(poisoned=5))


def _result(before: tuple[int, int], after: tuple[int, int]) -> RetuneResult:
    return RetuneResult(
        asr_before=Rate(*before),
        asr_after=Rate(*after),
        clean_acc_after=Rate(90, 100),
        settings=RetuneSettings(),
        seconds=1.0,
    )


@pytest.mark.parametrize(
    "before, after, reference, status",
    [
        ((2, 1000), (870, 1000), (60, 1000), "dormant"),
        ((2, 1000), (80, 1000), (60, 1000), "not-revived"),  # within the margin of the clean model
        ((2, 1000), (300, 1000), None, "dormant"),
        ((2, 1000), (100, 1000), None, "not-revived"),
        ((950, 1000), (990, 1000), None, "active"),
    ],
)
def test_the_verdict_rule(before, after, reference, status):
    ref = _result((0, 1000), reference) if reference else None
    judged = judge(_result(before, after), ref)
    assert judged.status == status
    assert f"{after[0] / 10:.2f}%" in judged.verdict
    if reference:
        assert f"a clean model: {reference[0] / 10:.2f}%" in judged.verdict
    else:
        assert "no clean reference" in judged.verdict


@pytest.fixture(scope="module")
def toys(tmp_path_factory):
    root = tmp_path_factory.mktemp("retune")
    data = make_npz_dataset(root / "data", classes=4, n_train=320, n_test=120)
    train_badnets_model(data, root / "bd.safetensors", 3, 0.1)
    train_badnets_model(data, root / "clean.safetensors", 3, 0.0)
    return {"data": data, "bd": root / "bd.safetensors", "clean": root / "clean.safetensors"}


def _purify(toys, out, *args):
    return runner.invoke(
        app,
        [
            "purify",
            str(toys["bd"]),
            "--data",
            str(toys["data"]),
            "--out",
            str(out),
            "--method",
            "ft",
            "--clean-count",
            "80",
            "--epochs",
            "1",
            "--batch-size",
            "16",
            "--trigger",
            "badnets",
            "--device",
            "cpu",
            "--json",
            "--quiet",
            *args,
        ],
    )


def test_purify_reports_the_check_beside_the_asr_and_never_saves_the_copy(toys, tmp_path):
    result = _purify(
        toys,
        tmp_path / "p",
        "--retune-check",
        "--clean-reference",
        str(toys["clean"]),
        "--retune-epochs",
        "2",
        "--retune-poisoned",
        "8",
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    check = report["retune_check"]
    assert check["asr"] == report["after"]["asr"]
    after, ref = check["asr_after_retuning"], check["reference_asr_after_retuning"]
    assert after["n"] == report["after"]["asr"]["n"] and ref["n"] == after["n"]
    assert check["reference_asr"]["n"] == after["n"]
    assert (
        check["status"] in ("dormant", "not-revived", "active")
        and "retuning with 8 poisoned images" in check["verdict"]
    )
    assert check["settings"] == {
        "poisoned": 8,
        "epochs": 2,
        "lr": 0.01,
        "momentum": 0.9,
        "batch_size": 128,
        "augment": True,
        "seed": 0,
        "schedule": "constant",
        "poisoned_augmented": False,
    }
    assert "## Retuning check" in (tmp_path / "p" / "report.md").read_text()
    assert sorted(p.name for p in (tmp_path / "p").iterdir() if p.suffix == ".safetensors") == ["purified.safetensors"]
    assert "retune_check" in report["timings"]


def test_retuning_with_many_poisoned_images_plants_the_trigger_in_a_clean_model(toys, tmp_path):
    """The check can fail: with enough poisoned images and lr, the clean model's ASR must rise."""
    result = runner.invoke(
        app,
        [
            "purify",
            str(toys["clean"]),
            "--data",
            str(toys["data"]),
            "--out",
            str(tmp_path / "c"),
            "--method",
            "lp",
            "--clean-count",
            "80",
            "--epochs",
            "1",
            "--batch-size",
            "16",
            "--trigger",
            "badnets",
            "--device",
            "cpu",
            "--json",
            "--quiet",
            "--retune-check",
            "--retune-poisoned",
            "40",
            "--retune-epochs",
            "8",
            "--retune-lr",
            "0.05",
        ],
    )
    assert result.exit_code == 0, result.output
    check = json.loads(result.stdout)["retune_check"]
    assert check["asr_after_retuning"]["value"] > check["asr"]["value"] + 0.3


def test_the_check_needs_a_trigger_and_valid_settings(toys, tmp_path):
    plain = tmp_path / "plain.safetensors"
    trained = runner.invoke(
        app,
        [
            "train",
            "--arch",
            "test_tiny",
            "--data",
            str(toys["data"]),
            "--out",
            str(plain),
            "--epochs",
            "1",
            "--device",
            "cpu",
            "--quiet",
        ],
    )
    assert trained.exit_code == 0, trained.output
    no_trigger = runner.invoke(
        app,
        [
            "purify",
            str(plain),
            "--data",
            str(toys["data"]),
            "--out",
            str(tmp_path / "n"),
            "--method",
            "ft",
            "--epochs",
            "1",
            "--device",
            "cpu",
            "--clean-count",
            "80",
            "--retune-check",
            "--quiet",
        ],
    )
    assert no_trigger.exit_code == 2 and "--retune-check needs a trigger" in no_trigger.output
    bad = _purify(toys, tmp_path / "b", "--retune-check", "--retune-poisoned", "0")
    assert bad.exit_code == 2 and "--retune-poisoned" in bad.output


def test_evaluate_and_compare_carry_the_check(toys):
    common = [
        "--data",
        str(toys["data"]),
        "--trigger",
        "badnets",
        "--device",
        "cpu",
        "--quiet",
        "--retune-check",
        "--retune-epochs",
        "1",
        "--retune-clean-count",
        "80",
        "--clean-reference",
        str(toys["clean"]),
    ]
    evaluated = runner.invoke(app, ["evaluate", str(toys["bd"]), *common, "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    check = json.loads(evaluated.stdout)["retune_check"]
    assert check["asr"] == json.loads(evaluated.stdout)["metrics"]["asr"]
    assert check["reference_asr_after_retuning"]["n"] == check["asr_after_retuning"]["n"]
    table = runner.invoke(app, ["evaluate", str(toys["bd"]), *common])
    assert table.exit_code == 0 and "ASR after retuning" in table.stdout and "retuning check:" in table.stdout

    compared = runner.invoke(app, ["compare", str(toys["bd"]), str(toys["clean"]), *common, "--json"])
    assert compared.exit_code == 0, compared.output
    rows = json.loads(compared.stdout)["rows"]
    assert all(row["retune_check"]["status"] in ("dormant", "not-revived", "active") for row in rows)
    # the clean reference is the second checkpoint too: the same images and steps give the same figure
    assert rows[1]["retune_check"]["asr_after_retuning"] == rows[1]["retune_check"]["reference_asr_after_retuning"]
    md = runner.invoke(app, ["compare", str(toys["bd"]), str(toys["clean"]), *common, "--markdown"])
    assert md.exit_code == 0 and "| ASR after retuning | retuning verdict |" in md.stdout
    shown = runner.invoke(app, ["compare", str(toys["bd"]), str(toys["clean"]), *common])
    assert shown.exit_code == 0 and "retuned" in shown.stdout  # the column header (rich may wrap it)


def test_evaluate_check_without_a_trigger_exits_2(toys, tmp_path):
    plain = tmp_path / "plain.safetensors"
    assert (
        runner.invoke(
            app,
            [
                "train",
                "--arch",
                "test_tiny",
                "--data",
                str(toys["data"]),
                "--out",
                str(plain),
                "--epochs",
                "1",
                "--device",
                "cpu",
                "--quiet",
            ],
        ).exit_code
        == 0
    )
    result = runner.invoke(
        app, ["evaluate", str(plain), "--data", str(toys["data"]), "--device", "cpu", "--retune-check"]
    )
    assert result.exit_code == 2 and "--retune-check needs a trigger" in result.output


def test_an_audit_of_a_folder_refuses_the_check_and_names_compare(toys):
    result = runner.invoke(
        app,
        [
            "evaluate",
            str(toys["bd"].parent),
            "--data",
            str(toys["data"]),
            "--trigger",
            "badnets",
            "--device",
            "cpu",
            "--retune-check",
            "--jsonl",
            str(toys["bd"].parent / "a.jsonl"),
        ],
    )
    assert result.exit_code == 2 and "compare DIR --retune-check" in result.output
