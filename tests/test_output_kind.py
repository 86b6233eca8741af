"""models/output_kind.py: detecting logits / probs / log-probs, the loss each gets, and purify on
softmax-ended models giving exactly what the same weights without the softmax give."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

from backdoor_cli.checkpoint import read_checkpoint
from backdoor_cli.cli import app
from backdoor_cli.errors import ConfigError, InputError
from backdoor_cli.models.output_kind import (
    LOGITS,
    LossAdapter,
    attach_loss,
    classify_rows,
    mismatch_warning,
    parse_output_kind,
    probe_outputs,
    resolve_output_kind,
)
from helpers import purify_with_arch_file as purify
from helpers import run_purify_ok as run_ok
from helpers import train_ended_toy

runner = CliRunner()


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """train_ended_toy's model, data and arch.py (the same TinyNet weights behind four endings)."""
    return train_ended_toy(tmp_path_factory.mktemp("outkind"))


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- detection


class Positive(nn.Module):
    """A logits model whose outputs all happen to be positive (but rows do not sum to 1)."""

    def forward(self, x):
        return F.softplus(x) + 0.01


class NearlyProbs(nn.Module):
    """Non-negative rows summing to 1 +- 0.01: still not probabilities at the 1e-3 tolerance."""

    def forward(self, x):
        return F.softmax(x, 1) * (1 + 0.01 * torch.sign(x[:, :1]))


class MiddleSoftmax(nn.Module):
    """A softmax that is not the end: its output feeds a Linear, so the model returns logits."""

    def __init__(self):
        super().__init__()
        self.soft = nn.Softmax(dim=1)
        self.fc = nn.Linear(5, 5)

    def forward(self, x):
        return self.fc(self.soft(x))


@pytest.mark.parametrize(
    "model, kind, trailing",
    [
        (nn.Identity(), "logits", None),
        (Positive(), "logits", None),
        (NearlyProbs(), "logits", None),
        (MiddleSoftmax(), "logits", None),
        (nn.Sequential(nn.Linear(5, 5), nn.Softmax(dim=1)), "probs", "1"),
        (nn.Sequential(nn.Linear(5, 5), nn.Softmax(dim=-1)), "probs", "1"),
        (nn.Sequential(nn.Linear(5, 5), nn.LogSoftmax(dim=1)), "log-probs", "1"),
        (nn.Softmax(dim=1), "probs", ""),
    ],
)
def test_detection(model, kind, trailing):
    probe = probe_outputs(model, torch.randn(16, 5, generator=torch.Generator().manual_seed(0)) * 3)
    assert probe.detected == kind and probe.images == 16
    assert probe.trailing_module == trailing
    assert {"logits": "not distributions", "probs": "sums to 1", "log-probs": "logsumexp 0"}[kind] in probe.reason()


def test_positive_logits_evidence_says_why():
    probe = probe_outputs(Positive(), torch.randn(8, 4))
    assert probe.min_value > 0 and probe.max_sum_error > 1e-3
    assert "not distributions" in probe.reason()


class FunctionalSoftmax(nn.Module):
    def forward(self, x):
        return F.softmax(x, dim=1)


def test_functional_softmax_is_probs_without_a_module():
    probe = probe_outputs(FunctionalSoftmax(), torch.randn(4, 5))
    assert probe.detected == "probs" and probe.trailing_module is None
    adapter = resolve_output_kind("auto", probe).adapter
    assert adapter.source == "log-of-output" and "not a module" in adapter.describe()


def test_probe_restores_training_mode_and_rejects_non_scores():
    model = nn.Sequential(nn.Linear(5, 5), nn.BatchNorm1d(5), nn.Softmax(dim=1)).train()
    model[1].eval()  # a mixed state is restored exactly
    probe_outputs(model, torch.randn(4, 5))
    assert model.training and model[0].training and not model[1].training
    with pytest.raises(InputError, match="not a tensor"):
        probe_outputs(TupleOut(), torch.randn(2, 5))
    for bad in (torch.randn(4), torch.randn(0, 3), torch.ones(3, 2, dtype=torch.long)):
        with pytest.raises(InputError, match="batch, classes"):
            classify_rows(bad)


class TupleOut(nn.Module):
    def forward(self, x):
        return x, x


def test_classify_rows_tolerance_and_log_probs():
    p = torch.softmax(torch.randn(32, 10), 1)
    assert classify_rows(p).detected == "probs" and classify_rows(p).max_sum_error < 1e-6
    assert classify_rows(p.log()).detected == "log-probs"
    assert classify_rows(p * 1.01).detected == "logits"
    assert classify_rows(p.log() - 0.01).detected == "logits"
    assert classify_rows(torch.full((3, 4), float("nan"))).detected == "logits"


# ---------------------------------------------------------------- the loss


def test_adapters_match_cross_entropy_on_the_logits():
    logits = torch.randn(8, 5, generator=torch.Generator().manual_seed(1))
    y = torch.arange(8) % 5
    expected = F.cross_entropy(logits, y)
    cases = [
        (LOGITS, nn.Identity(), 0.0),
        (LossAdapter("probs", "log-of-output"), nn.Softmax(1), 1e-6),
        (LossAdapter("log-probs", "output"), nn.LogSoftmax(1), 1e-6),
    ]
    for adapter, ending, tol in cases:
        with attach_loss(ending, adapter) as loss_fn:
            loss, scores = loss_fn(ending(logits), y)
        assert torch.allclose(loss, expected, atol=tol, rtol=0), adapter


def test_trailing_softmax_loss_is_exact_and_hook_removed():
    model = nn.Sequential(nn.Linear(5, 5), nn.Softmax(dim=1))
    x, y = torch.randn(6, 5), torch.arange(6) % 5
    adapter = resolve_output_kind("auto", probe_outputs(model, x)).adapter
    assert adapter.source == "normaliser-input" and adapter.module == "1" and "exact" in adapter.describe()
    with attach_loss(model, adapter) as loss_fn:
        loss, scores = loss_fn(model(x), y)
    assert torch.equal(loss, F.cross_entropy(model[0](x), y)) and torch.equal(scores, model[0](x))
    assert not model[1]._forward_hooks


class SkipsSoftmaxWhenTraining(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.soft = nn.Linear(5, 5), nn.Softmax(dim=1)

    def forward(self, x):
        return self.fc(x) if self.training else self.soft(self.fc(x))


def test_output_not_from_the_softmax_in_training_is_an_error():
    model = SkipsSoftmaxWhenTraining()
    adapter = resolve_output_kind("auto", probe_outputs(model, torch.randn(4, 5))).adapter
    assert adapter.source == "normaliser-input"
    with attach_loss(model.train(), adapter) as loss_fn, pytest.raises(InputError, match="no longer comes"):
        loss_fn(model(torch.randn(4, 5)), torch.zeros(4, dtype=torch.long))


def test_flag_overrides_detection_and_warns_on_mismatch():
    probe = classify_rows(torch.softmax(torch.randn(4, 3), 1))
    forced = resolve_output_kind("logits", probe)
    assert forced.kind == "logits" and forced.decided_by == "flag" and forced.adapter == LOGITS
    assert "almost no gradient" in forced.warning
    assert resolve_output_kind("auto", probe).warning is None
    assert resolve_output_kind("log-probs", probe).adapter.source == "output"
    assert "look like logits" in mismatch_warning("probs", classify_rows(torch.randn(4, 3) + 5))
    assert resolve_output_kind("probs", probe).to_dict()["decided_by"] == "flag"


@pytest.mark.parametrize("text, value", [(None, "auto"), ("PROBS", "probs"), (" log-probs ", "log-probs")])
def test_parse_output_kind(text, value):
    assert parse_output_kind(text) == value


def test_parse_output_kind_rejects_unknown():
    with pytest.raises(ConfigError, match="softmax") as info:
        parse_output_kind("softmax")
    assert "log-probs" in info.value.hint


# ---------------------------------------------------------------- purify through the CLI


@pytest.mark.parametrize("method", ["ft", "fst"])
def test_softmax_ended_model_purifies_exactly_like_its_logits_twin(toy, tmp_path, method):
    """Fails on the old code, which took cross-entropy of the probabilities."""
    plain, plain_weights = run_ok(toy, tmp_path / "plain", "plain", "--method", method)
    soft, soft_weights = run_ok(toy, tmp_path / "soft", "softmax", "--method", method)
    assert plain["output_kind"]["kind"] == "logits" and soft["output_kind"]["kind"] == "probs"
    assert soft["output_kind"]["decided_by"] == "detected" and soft["output_kind"]["loss_module"] == "ending"
    assert same_weights(plain_weights, soft_weights)
    assert soft["history"] == [{**h, "seconds": s["seconds"]} for h, s in zip(plain["history"], soft["history"])]
    for key in ("clean_acc", "asr", "ra"):
        assert soft["after"][key]["k"] == plain["after"][key]["k"]


def test_log_softmax_ended_model_purifies_exactly_too(toy, tmp_path):
    _, plain_weights = run_ok(toy, tmp_path / "plain", "plain", "--method", "ft")
    report, weights = run_ok(toy, tmp_path / "log", "log_softmax", "--method", "ft")
    assert report["output_kind"]["kind"] == "log-probs" and report["output_kind"]["loss_source"] == "normaliser-input"
    assert same_weights(plain_weights, weights)


def test_functional_softmax_trains_on_log_probabilities(toy, tmp_path):
    _, plain_weights = run_ok(toy, tmp_path / "plain", "plain", "--method", "ft")
    report, weights = run_ok(toy, tmp_path / "fn", "functional", "--method", "ft")
    assert report["output_kind"]["kind"] == "probs" and report["output_kind"]["loss_source"] == "log-of-output"
    assert "NLL" in report["output_kind"]["loss"]
    for key in plain_weights:  # log(softmax) differs from log_softmax only by rounding
        assert torch.allclose(weights[key], plain_weights[key], atol=1e-4), key


def test_forcing_logits_on_a_softmax_model_warns_and_reproduces_the_old_bug(toy, tmp_path):
    _, plain_weights = run_ok(toy, tmp_path / "plain", "plain", "--method", "ft")
    result = purify(toy, tmp_path / "forced", "softmax", "--method", "ft", "--output-kind", "logits")
    assert result.exit_code == 0, result.output
    assert "almost no gradient" in result.stderr
    report = json.loads(result.stdout)
    assert report["output_kind"]["kind"] == "logits" and report["output_kind"]["decided_by"] == "flag"
    assert report["output_kind"]["detected"] == "probs" and "almost no gradient" in report["output_kind"]["warning"]
    forced = read_checkpoint(tmp_path / "forced" / "purified.safetensors").state_dict
    assert not same_weights(plain_weights, forced)


def test_report_files_and_config_record_the_output_kind(toy, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("output-kind: probs\n")
    result = runner.invoke(
        app,
        [
            "purify",
            str(toy["model"]),
            "--arch",
            f"{toy['arch']}:softmax",
            "--data",
            str(toy["data"]),
            "--out",
            str(tmp_path / "o"),
            "--clean-count",
            "30",
            "--epochs",
            "1",
            "--device",
            "cpu",
            "--config",
            str(config),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "model output: probs (flag" in result.stdout and "loss: cross-entropy on the input" in result.stdout
    out = tmp_path / "o"
    saved = json.loads((out / "report.json").read_text())["output_kind"]
    assert saved["kind"] == "probs" and saved["warning"] is None and saved["evidence"]["trailing_type"] == "Softmax"
    assert "- Model output: probs (flag" in (out / "report.md").read_text()
    assert "output-kind: probs" in (out / "config.yaml").read_text()


def test_detected_logits_on_the_builtin_model(toy, tmp_path):
    result = runner.invoke(
        app,
        [
            "purify",
            str(toy["model"]),
            "--data",
            str(toy["data"]),
            "--out",
            str(tmp_path),
            "--clean-count",
            "30",
            "--epochs",
            "1",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "model output: logits (detected: rows of 30 probe outputs are not distributions" in result.stdout
    assert "cross-entropy on the output" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize("value", ["softmax", "", "logit"])
def test_bad_output_kind_exits_2_before_any_work(toy, tmp_path, value):
    result = purify(toy, tmp_path / "o", "softmax", "--output-kind", value)
    assert result.exit_code == 2, result.output
    assert "is not a kind of model output" in result.output and "hint: choose one of" in result.output
    assert not (tmp_path / "o").exists()
