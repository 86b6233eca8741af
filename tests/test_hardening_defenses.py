"""pam, ft-sam and nad: the mechanics on tiny models, and the CLI."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from backdoor_cli.data.datasets import augment_batch, normalize
from backdoor_cli.defenses.nad import attention_loss, stage_ends
from backdoor_cli.defenses.perturbations import sharpness_ascent, toward_origin
from backdoor_cli.models import build_model
from backdoor_cli.models.output_kind import smoothed_nll
from backdoor_cli.tuning.loop import TuneSettings, _augment, tune
from backdoor_cli.tuning.sgd import SgdSettings
from helpers import MEAN, STD, Tiny, train_ended_toy
from helpers import purify_with_arch_file as purify
from helpers import run_purify_ok as run_ok
from helpers import run_tiny as _run
from helpers import tiny_data as _data

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """train_ended_toy's model, data and arch.py (one per module)."""
    return train_ended_toy(tmp_path_factory.mktemp("outkind"))


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("name", ["pam", "ft-sam"])
def test_rho_zero_is_plain_fine_tuning_step_for_step(name):
    ft, _ = _run("ft")
    other, _ = _run(name, rho=0.0, label_smoothing=0.0)
    assert _same(ft, other)


def test_nad_with_zero_attention_weight_is_plain_fine_tuning():
    ft, _ = _run("ft")
    nad, outcome = _run("nad", nad_beta=(0.0,))
    # Up to float rounding: the zero-weighted branch still joins the backward graph.
    assert all(
        torch.allclose(x.float(), y.float(), atol=1e-6)
        for x, y in zip(ft.state_dict().values(), nad.state_dict().values())
    )
    assert "attention at bn" in outcome.notes[0]


def test_pam_and_ft_sam_move_the_weights_differently_from_ft():
    ft, _ = _run("ft", epochs=3)
    pam, _ = _run("pam", epochs=3, rho=0.5)
    sam, _ = _run("ft-sam", epochs=3)
    assert not _same(ft, pam) and not _same(ft, sam)


def _one_full_batch_step(model, perturb_with):
    """One SGD step (no momentum, no augmentation, the whole set as one batch) through tune()."""
    data = _data(n=16)
    params = list(model.parameters())
    tune(
        model,
        data,
        MEAN,
        STD,
        TuneSettings(SgdSettings(epochs=1, lr=0.1, batch_size=16, momentum=0.0, augment=False)),
        CPU,
        perturb=perturb_with(params),
    )
    return data


def _loss_grads(model, data, shift=None):
    """Gradients of the mean cross-entropy on `data` at the model's weights + `shift`."""
    probe = copy.deepcopy(model).train()
    with torch.no_grad():
        for p, s in zip(probe.parameters(), shift or [0] * len(list(probe.parameters()))):
            p.add_(s)
    loss = F.cross_entropy(probe(normalize(data.x, MEAN, STD)), data.y)
    return torch.autograd.grad(loss, list(probe.parameters()))


def test_pam_takes_the_gradient_toward_the_origin_and_applies_it_at_theta():
    torch.manual_seed(1)
    model, origin_model = Tiny(), Tiny()  # theta and a different theta_0
    start = copy.deepcopy(model)
    origin = [p.detach().clone() for p in origin_model.parameters()]
    rho = 0.3
    direction = [o - p.detach() for o, p in zip(origin, start.parameters())]
    norm = torch.sqrt(sum((d**2).sum() for d in direction))
    shift = [rho * d / norm for d in direction]
    data = _one_full_batch_step(model, lambda params: toward_origin(params, origin, rho))
    expected_grads = _loss_grads(start, data, shift)
    for p, p0, g in zip(model.parameters(), start.parameters(), expected_grads):
        assert torch.allclose(p, p0 - 0.1 * g, atol=1e-5)
    plain_grads = _loss_grads(start, data)
    assert any(not torch.allclose(a, b, atol=1e-4) for a, b in zip(expected_grads, plain_grads))


def test_adaptive_sam_ascends_along_the_scaled_gradient_first():
    torch.manual_seed(2)
    model = Tiny()
    start = copy.deepcopy(model)
    rho, eta = 0.5, 0.01
    data = _data(n=16)
    g = _loss_grads(start, data)
    scales = [p.detach().abs() + eta for p in start.parameters()]
    norm = torch.sqrt(sum(((s * gi) ** 2).sum() for s, gi in zip(scales, g)))
    shift = [s * s * gi * rho / norm for s, gi in zip(scales, g)]
    _one_full_batch_step(model, lambda params: sharpness_ascent(params, rho, adaptive=True, eta=eta))
    expected = _loss_grads(start, data, shift)
    for p, p0, ge in zip(model.parameters(), start.parameters(), expected):
        assert torch.allclose(p, p0 - 0.1 * ge, atol=1e-5)


def test_the_perturbation_is_undone_exactly():
    model = Tiny()
    before = [p.detach().clone() for p in model.parameters()]
    origin = [torch.randn_like(p) for p in before]
    restore = toward_origin(list(model.parameters()), origin, 0.5)(None)
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
    restore()
    assert all(torch.allclose(p, b, atol=1e-6) for p, b in zip(model.parameters(), before))


def test_stage_ends_of_the_built_in_resnets():
    x = torch.zeros(2, 3, 32, 32)
    assert stage_ends(build_model("resnet20", 10, 3), x) == ["layer1", "layer2", "layer3"]
    assert stage_ends(build_model("resnet18", 10, 3), x) == ["layer2", "layer3", "layer4"]


def test_attention_loss_is_zero_for_equal_maps_and_ignores_scale():
    a = torch.randn(4, 8, 5, 5)
    assert float(attention_loss(a, a, 2.0)) == 0.0
    assert float(attention_loss(a, 3 * a, 2.0)) == pytest.approx(0.0, abs=1e-7)
    assert float(attention_loss(a, torch.randn(4, 8, 5, 5), 2.0)) > 0


def test_smoothed_nll_matches_cross_entropy_with_label_smoothing():
    logits, targets = torch.randn(6, 5), torch.tensor([0, 1, 2, 3, 4, 0])
    assert torch.allclose(
        smoothed_nll(torch.log_softmax(logits, 1), targets, 0.1),
        F.cross_entropy(logits, targets, label_smoothing=0.1),
        atol=1e-6,
    )


def test_images_marked_no_augment_stay_as_they_are():
    x = torch.randint(0, 256, (6, 8, 8, 3), dtype=torch.uint8)
    keep = torch.tensor([True, False, True, False, False, False])
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    out = _augment(x, g1, True, keep)
    plain = augment_batch(x, g2, flip=True)
    assert torch.equal(out[keep], x[keep]) and torch.equal(out[~keep], plain[~keep])


def test_constant_schedule_keeps_the_learning_rate():
    history = tune(
        Tiny(),
        _data(),
        MEAN,
        STD,
        TuneSettings(SgdSettings(epochs=3, lr=0.02, batch_size=16, schedule="constant")),
        CPU,
    )
    assert [h.lr for h in history] == [0.02, 0.02, 0.02]


@pytest.mark.parametrize(
    "method, args, note",
    [
        ("pam", ["--rho", "0.4"], "rho 0.4"),
        ("ft-sam", ["--rho", "1.5", "--label-smoothing", "0.05"], "label smoothing 0.05"),
        ("nad", ["--teacher-epochs", "1", "--nad-beta", "100"], "teacher fine-tuned 1 epochs"),
    ],
)
def test_cli_runs_each_method_and_records_what_it_did(toy, tmp_path, method, args, note):
    report, _ = run_ok(toy, tmp_path / method, "plain", "--method", method, *args)
    assert report["method"]["name"] == method
    assert any(note in n for n in report["method"]["notes"])
    params = report["method"]["params"]
    if method == "nad":  # only what the method read is recorded
        assert "rho" not in params and params["teacher_epochs"] == 1 and "alpha" not in params
    else:
        assert params["rho"] == float(args[1])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "pam", "--rho", "-1"], "--rho"),
        (["--method", "ft-sam", "--label-smoothing", "1"], "--label-smoothing"),
        (["--method", "nad", "--nad-layers", "nope"], "no module 'nope'"),
        (["--method", "nad", "--nad-beta", "1,2,3,4", "--nad-layers", "conv"], "1 layers"),
    ],
)
def test_cli_refuses_bad_values_with_exit_2(toy, tmp_path, args, message):
    result = purify(toy, tmp_path / "bad", "plain", *args)
    assert result.exit_code == 2, result.output
    assert message in result.output
