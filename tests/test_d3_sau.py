"""d3 and sau: the mechanics on tiny models, a planted backdoor removed through the CLI, and the flags."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from backdoor_cli.cli import app
from backdoor_cli.data.datasets import normalize
from backdoor_cli.defenses.d3 import distance_term, hinge_term, loss_scale, warm_start
from backdoor_cli.defenses.distill import frozen_copy
from backdoor_cli.defenses.sau import js_divergence, log_one_minus_prob, shared_adversarial, statistics_kept
from backdoor_cli.models.output_kind import LOGITS, LossAdapter, attach_loss, sample_losses
from helpers import MEAN, STD, Tiny, make_template_dataset
from helpers import run_tiny as _run
from helpers import tiny_data as _data
from helpers import train_small_cnn as train

CPU = torch.device("cpu")


# ---------------------------------------------------------------- d3


def test_d3_hinge_is_zero_within_the_budget_and_counts_only_the_excess():
    losses = torch.tensor([0.01, 0.05, 0.09], requires_grad=True)
    hinge = hinge_term(losses, 10.0, 0.1)
    hinge.backward()
    assert hinge.item() == 0 and torch.equal(losses.grad, torch.zeros(3))
    mixed = hinge_term(torch.tensor([0.05, 0.3, 1.0]), 2.0, 0.1)
    assert mixed.item() == pytest.approx(2.0 * (0.0 + 0.2 + 0.9) / 3)
    assert loss_scale(10.0) == 11.0 and loss_scale(0.5) == 1.0 and loss_scale(1.0) == 1.0


def test_d3_distance_gradient_points_away_from_the_original():
    original = torch.randn(3, 4)
    weight = (original + 0.1 * torch.randn(3, 4)).requires_grad_(True)
    distance_term(weight, original).backward()
    away = (weight - original).detach()
    assert torch.allclose(weight.grad, -away / away.norm(), atol=1e-6)  # unit norm, straight away from W0
    stepped = weight.detach() - 0.05 * weight.grad
    assert (stepped - original).norm() > away.norm()


def test_d3_warm_start_is_seeded_and_norm_matched():
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    norm = torch.tensor(2.5)
    warm_start(norm)(a, 7)
    warm_start(norm)(b, 7)
    assert torch.equal(a.weight, b.weight) and a.weight.norm().item() == pytest.approx(2.5, rel=1e-5)
    warm_start(norm)(b, 8)
    assert not torch.equal(a.weight, b.weight)


def test_d3_with_every_image_within_budget_only_the_distance_acts():
    """ε above every image's loss: the hinge gives no gradient, so the body's weights stay as they were and
    the head moves away from the original (from its warm start), its norm held at ||W0||."""
    torch.manual_seed(0)
    model = Tiny()
    original = copy.deepcopy(model)
    start = copy.deepcopy(model.fc)
    warm_start(original.fc.weight.detach().norm())(start, 0)
    model, outcome = _run("d3", model, d3_eps=100.0)
    for name in ("conv.weight", "conv.bias", "bn.weight", "bn.bias"):
        assert torch.equal(model.state_dict()[name], original.state_dict()[name]), name
    w0 = original.fc.weight.detach()
    assert (model.fc.weight - w0).norm() > (start.weight - w0).norm() + 1e-3
    assert model.fc.weight.norm().item() == pytest.approx(w0.norm().item(), rel=1e-5)
    assert outcome.head_norm == pytest.approx(w0.norm().item(), rel=1e-6)
    assert "lambda 10, epsilon 100" in outcome.notes[0]


def test_d3_with_the_hinge_active_tunes_the_body_too():
    model, _ = _run("d3", d3_eps=0.0)
    torch.manual_seed(0)
    assert not torch.equal(model.conv.weight, Tiny().conv.weight)


@pytest.mark.parametrize("adapter", [LOGITS, LossAdapter("log-probs", "output"), LossAdapter("probs", "log-of-output")])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_per_image_losses_average_to_the_tuning_loss(adapter, smoothing):
    logits = torch.randn(6, 4)
    output = {"logits": logits, "log-probs": F.log_softmax(logits, 1), "probs": F.softmax(logits, 1)}[adapter.kind]
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    with attach_loss(torch.nn.Identity(), adapter, smoothing) as loss_fn:
        loss, scores = loss_fn(output, labels)
    assert torch.allclose(sample_losses(scores, labels, adapter, smoothing).mean(), loss, atol=1e-6)


# ---------------------------------------------------------------- sau


def _trained_tiny():
    model, _ = _run("ft", epochs=3)
    return model


def test_shared_adversarial_examples_stay_in_the_ball_and_the_pixel_range_and_raise_the_loss():
    model = _trained_tiny().train()
    model.zero_grad(set_to_none=True)
    reference = frozen_copy(model)
    data = _data()
    inputs, labels = normalize(data.x[:24], MEAN, STD), data.y[:24]
    adv = shared_adversarial(model, reference, inputs, labels, MEAN, STD, eps=0.1, steps=5)
    pixels, adv_pixels = inputs * STD + MEAN, adv * STD + MEAN
    assert (adv_pixels - pixels).abs().max() <= 0.1 + 1e-5
    assert adv_pixels.min() >= -1e-5 and adv_pixels.max() <= 1 + 1e-5
    assert (adv_pixels - pixels).abs().max() > 0.05  # it did move
    assert all(p.grad is None for p in model.parameters())  # the attack leaves no parameter gradient
    assert model.training and model.bn.training  # and the modes as they were
    with torch.no_grad():
        model.eval()
        assert F.cross_entropy(model(adv), labels) > F.cross_entropy(model(inputs), labels)


def test_js_divergence_and_the_shared_term_are_exact_and_finite():
    a, b = torch.randn(5, 4), torch.randn(5, 4)
    assert torch.allclose(js_divergence(a, a), torch.zeros(5), atol=1e-6)
    assert torch.allclose(js_divergence(a, b), js_divergence(b, a), atol=1e-6)
    extreme = torch.tensor([[50.0, -50.0], [-50.0, 50.0]])
    assert torch.allclose(js_divergence(extreme[:1], extreme[1:]), torch.tensor([math.log(2)]), atol=1e-5)
    labels = torch.tensor([0, 1, 2, 3, 0])
    naive = torch.log(1 - F.softmax(a, 1).gather(1, labels[:, None]).squeeze(1))
    assert torch.allclose(log_one_minus_prob(a, labels), naive, atol=1e-5)
    confident = log_one_minus_prob(torch.tensor([[100.0, 0.0, 0.0]]), torch.tensor([0]))
    assert torch.isfinite(confident).all() and confident.item() == pytest.approx(-100 + math.log(2), abs=1e-3)


def test_perturbed_batches_leave_the_running_statistics_alone():
    model = Tiny().train()
    before = copy.deepcopy(model.bn.state_dict())
    x = torch.randn(8, 3, 8, 8) * 3 + 1
    with statistics_kept(model):
        inside = model(x)
    assert all(torch.equal(before[k], v) for k, v in model.bn.state_dict().items())
    assert model.bn.momentum == 0.1 and torch.allclose(inside, model(x))  # batch statistics, as in train mode
    assert not torch.equal(model.bn.running_mean, before["running_mean"])  # outside, they update again


def test_sau_without_its_adversarial_terms_steps_like_fine_tuning():
    """λ = (1, 0, 0): the attack and the perturbed forwards still run but add nothing to the gradient and leave
    the BatchNorm statistics alone, so every weight and buffer matches plain fine-tuning step for step."""
    ft, _ = _run("ft")
    sau, outcome = _run("sau", sau_lambda=(1.0, 0.0, 0.0), sau_steps=2)
    assert all(torch.equal(a, b) for a, b in zip(ft.state_dict().values(), sau.state_dict().values()))
    assert "lambda clean 1, adversarial 0, shared 0" in outcome.notes[0]


def test_sau_unlearning_moves_the_weights():
    ft, _ = _run("ft")
    sau, _ = _run("sau", sau_steps=2)
    assert not all(torch.equal(a, b) for a, b in zip(ft.parameters(), sau.parameters()))


# ---------------------------------------------------------------- a planted backdoor, through the CLI


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> dict:
    """A BadNets patch (3x3 white, 10% poisoned, target 0) in a small CNN on 8 template classes."""
    root = tmp_path_factory.mktemp("d3sau")
    data = make_template_dataset(root / "data")
    return {"data": data, "model": train(data, root / "bd.safetensors", "--trigger", "badnets", "--poison-rate", "0.1")}


def _purify(planted, out, *args):
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
            "160",
            "--batch-size",
            "32",
            "--device",
            "cpu",
            "--precision",
            "fp32",
            "--quiet",
            "--json",
            *args,
        ],
    )


@pytest.mark.parametrize(
    "method, args, params, note",
    [
        (
            "d3",
            ["--epochs", "10", "--lr", "0.05", "--d3-eps", "0.1"],
            {"d3_eps": 0.1, "d3_lambda": None},
            "lambda 10, epsilon 0.1",
        ),
        (
            "sau",
            ["--epochs", "4", "--sau-steps", "5", "--sau-lambda", "1,0,1"],
            {"sau_steps": 5, "sau_lambda": [1.0, 0.0, 1.0], "sau_eps": None},
            "PGD L-inf 0.2",
        ),
    ],
)
def test_cli_lowers_a_planted_backdoor_and_records_the_parameters(planted, tmp_path, method, args, params, note):
    """Measured (fp32, seed 0): d3 C-Acc 1.0 -> 1.0, ASR 0.93 -> 0.00; sau 1.0 -> 0.875, ASR 0.93 -> 0.29."""
    result = _purify(planted, tmp_path / method, "--method", method, *args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    before, after = report["before"], report["after"]
    assert before["asr"]["value"] > 0.8
    assert after["asr"]["value"] < 0.5, (method, after["asr"])
    assert after["clean_acc"]["value"] > before["clean_acc"]["value"] - 0.2, (method, after["clean_acc"])
    recorded = report["method"]["params"]
    assert {k: recorded[k] for k in params} == params
    other = "sau" if method == "d3" else "d3"
    assert not {"alpha", "rho", f"{other}_eps"} & set(recorded)  # only what the method read
    assert any(note in n for n in report["method"]["notes"])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "fst", "--d3-lambda", "5"], "--d3-lambda does not apply to --method fst (it is read by d3)"),
        (["--method", "ft", "--d3-eps", "0.2"], "--d3-eps does not apply to --method ft (it is read by d3)"),
        (["--method", "d3", "--sau-eps", "0.1"], "--sau-eps does not apply to --method d3 (it is read by sau)"),
        (
            ["--method", "fst", "--sau-lambda", "1,0,1"],
            "--sau-lambda does not apply to --method fst (it is read by sau)",
        ),
        (["--method", "d3", "--d3-lambda", "0"], "--d3-lambda"),
        (["--method", "sau", "--sau-eps", "1.5"], "--sau-eps"),
        (["--method", "sau", "--sau-steps", "0"], "--sau-steps"),
        (["--method", "sau", "--sau-lambda", "1,2"], "--sau-lambda must be three weights"),
    ],
)
def test_cli_refuses_inapplicable_and_bad_values_with_exit_2(planted, tmp_path, args, message):
    result = _purify(planted, tmp_path / "out", *args)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert not (tmp_path / "out").exists()
