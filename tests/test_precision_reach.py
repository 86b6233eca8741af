"""--precision fp32 reaches every forward pass of a purify: the output-kind probe, both evaluations, the
tuning steps, the held-out selection along the path and the retuning check; of evaluate and compare (the
evaluations, the retuning check and its clean reference); and of train. The model itself checks: its
forward refuses to run under autocast or on a non-fp32 input while the test asks it to."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from backdoor_cli.cli import app
from helpers import make_npz_dataset

runner = CliRunner()

ARCH = '''
import os
import torch
from torch import nn

FORWARDS = {"n": 0}


class Checked(nn.Module):
    """A small CNN whose forward counts itself and refuses anything but fp32 arithmetic when
    BDCLEAN_TEST_REQUIRE_FP32 is set."""

    def __init__(self, num_classes):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.linear = nn.Linear(8, num_classes)

    def forward(self, x):
        FORWARDS["n"] += 1
        if os.environ.get("BDCLEAN_TEST_REQUIRE_FP32"):
            if torch.is_autocast_enabled(x.device.type) or x.dtype != torch.float32:
                raise RuntimeError(f"non-fp32 forward: autocast {torch.is_autocast_enabled(x.device.type)}, {x.dtype}")
        h = torch.relu(self.bn(self.conv(x)))
        return self.linear(h.mean(dim=(2, 3)))


def build(num_classes=3, in_channels=3):
    return Checked(num_classes)
'''


@pytest.fixture(scope="module")
def subject(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp32")
    data = make_npz_dataset(root / "data", n_train=200, n_test=60)
    arch = root / "checked.py"
    arch.write_text(ARCH)
    namespace: dict = {}
    exec(ARCH, namespace)  # the same definition, to write a checkpoint whose keys match
    torch.manual_seed(0)
    save_file(namespace["build"](3).state_dict(), str(root / "model.safetensors"))
    return {"data": str(data), "arch": f"{arch}:build", "model": str(root / "model.safetensors")}


def _purify(subject, out, precision, monkeypatch, *extra):
    monkeypatch.setenv("BDCLEAN_TEST_REQUIRE_FP32", "1")
    return runner.invoke(
        app,
        [
            "purify",
            subject["model"],
            "--arch",
            subject["arch"],
            "--data",
            subject["data"],
            "--trigger",
            "badnets",
            "--target",
            "0",
            "--clean-count",
            "90",
            "--epochs",
            "2",
            "--batch-size",
            "16",
            "--retune-check",
            "--retune-poisoned",
            "4",
            "--retune-epochs",
            "1",
            "--precision",
            precision,
            "--out",
            str(out),
            "--device",
            "cpu",
            "--json",
            "--quiet",
            *extra,
        ],
    )


def test_fp32_reaches_every_forward_of_a_purify(subject, tmp_path, monkeypatch):
    # --precaution: the random model flags nothing, and the default then tunes nothing; every stage must run here
    result = _purify(subject, tmp_path / "fp32", "fp32", monkeypatch, "--precaution")
    assert result.exit_code in (0, 1), result.output  # 1: a gate; anything else would be the model refusing
    report = json.loads(result.stdout)
    assert report["environment"]["compute"]["precision"]["tune"] == "fp32"
    assert report["scan"]["classes"] and report["scan"]["proxy_asr"]  # the default's scan and checks ran theirs
    assert report["retune_check"] is not None
    path = _purify(
        subject,
        tmp_path / "path",
        "fp32",
        monkeypatch,
        "--method",
        "fst-kd",
        "--holdout-fraction",
        "0.2",
        "--select",
        "path",
    )
    assert path.exit_code in (0, 1), path.output
    assert json.loads(path.stdout)["clean_data"]["holdout"]["path"]["curve"]  # the path selection ran its forwards


def test_the_model_does_refuse_a_bf16_forward(subject, tmp_path, monkeypatch):
    """The check has teeth: with bf16 tuning the same model stops the run."""
    result = _purify(subject, tmp_path / "bf16", "bf16", monkeypatch)
    assert result.exit_code != 0
    assert "non-fp32 forward" in result.output or "non-fp32 forward" in repr(result.exception)


def _run(monkeypatch, *args):
    monkeypatch.setenv("BDCLEAN_TEST_REQUIRE_FP32", "1")
    return runner.invoke(app, [*args, "--precision", "fp32", "--device", "cpu", "--json", "--quiet"])


RETUNE = ["--trigger", "badnets", "--target", "0", "--retune-check", "--retune-poisoned", "4", "--retune-epochs", "1"]


def test_fp32_reaches_every_forward_of_evaluate_and_compare(subject, monkeypatch):
    """The evaluation, the retuning check and its clean reference: in evaluate, and in compare for each checkpoint."""
    common = ["--arch", subject["arch"], "--data", subject["data"], *RETUNE, "--retune-clean-count", "60"]
    evaluate = _run(monkeypatch, "evaluate", subject["model"], *common, "--clean-reference", subject["model"])
    assert evaluate.exit_code in (0, 1), evaluate.output
    assert json.loads(evaluate.stdout)["retune_check"]["reference_asr_after_retuning"] is not None
    compare = _run(monkeypatch, "compare", subject["model"], subject["model"], *common)
    assert compare.exit_code in (0, 1), compare.output
    assert all(row["retune_check"] is not None for row in json.loads(compare.stdout)["rows"])


def test_the_linear_path_evaluates_in_the_runs_precision(subject, monkeypatch):
    """compare A B --path N: each point's evaluation in fp32 when asked (the model refuses anything else),
    and the report records the precision it ran in."""
    args = ["--arch", subject["arch"], "--data", subject["data"], "--path", "3"]
    path = _run(monkeypatch, "compare", subject["model"], subject["model"], *args)
    assert path.exit_code == 0, path.output
    report = json.loads(path.stdout)
    assert len(report["points"]) == 3
    assert report["environment"]["compute"]["precision"]["evaluate"] == "fp32"


def test_fp32_reaches_every_forward_of_train(subject, tmp_path, monkeypatch):
    """train --init: the evaluation before and after, and the tuning steps."""
    out = tmp_path / "trained.safetensors"
    args = ["--init", subject["model"], "--arch", subject["arch"], "--data", subject["data"], "--epochs", "1"]
    result = _run(monkeypatch, "train", *args, "--out", str(out))
    assert result.exit_code == 0, result.output
    assert out.is_file()
