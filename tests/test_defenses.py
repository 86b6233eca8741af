"""defenses/: FST mechanics and what each baseline freezes, re-initialises and keeps, on a tiny model."""

from __future__ import annotations

import copy

import pytest
import torch

from backdoor_cli.defenses import DEFENSES, DefenseParams, default_params, get_defense
from backdoor_cli.defenses.fst import feature_shift_penalty
from backdoor_cli.errors import ConfigError
from helpers import MEAN, STD, Tiny
from helpers import tiny_data as _data


def _run(name, model=None, **overrides):
    torch.manual_seed(0)
    model = model or Tiny()
    original = copy.deepcopy(model.state_dict())
    params = DefenseParams.of(name, **{"lr": 0.05, "epochs": 2, "batch_size": 16, **overrides})
    outcome = get_defense(name).run(model, "fc", _data(), MEAN, STD, params, torch.device("cpu"), flip=True)
    return model, original, outcome


def _changed(model, original, prefix):
    state = model.state_dict()
    return any(not torch.equal(state[k], original[k]) for k in original if k.startswith(prefix))


def test_registry_has_the_papers_methods():
    assert {"ft", "lp", "fe-tuning", "ft-init", "fst"} <= set(DEFENSES)
    with pytest.raises(ConfigError, match="unknown --method"):
        get_defense("nope")


def test_ft_trains_everything_from_original_head():
    model, original, outcome = _run("ft")
    assert _changed(model, original, "conv") and _changed(model, original, "fc")
    assert len(outcome.history) == 2


def test_lp_changes_only_the_head_and_keeps_bn_statistics():
    model, original, _ = _run("lp")
    assert _changed(model, original, "fc")
    for key in original:
        if not key.startswith("fc"):
            assert torch.equal(model.state_dict()[key], original[key]), f"lp changed {key}"


def test_fe_tuning_reinitialises_and_freezes_head():
    torch.manual_seed(0)
    model = Tiny()
    original_fc = model.fc.weight.detach().clone()
    # The head after fe-tuning must equal a fresh seeded re-initialisation (frozen), not the original.
    from backdoor_cli.defenses.finetune import reinitialise_head

    probe = Tiny()
    reinitialise_head(probe.fc, seed=0)
    model, original, _ = _run("fe-tuning", model=model)
    assert torch.equal(model.fc.weight, probe.fc.weight)
    assert not torch.equal(model.fc.weight, original_fc)
    assert _changed(model, original, "conv")


def test_ft_init_reinitialises_then_trains_head():
    from backdoor_cli.defenses.finetune import reinitialise_head

    probe = Tiny()
    reinitialise_head(probe.fc, seed=0)
    model, original, _ = _run("ft-init")
    assert not torch.equal(model.fc.weight, probe.fc.weight) and not torch.equal(model.fc.weight, original["fc.weight"])
    assert _changed(model, original, "conv")


def test_fst_penalty_is_alpha_inner_product():
    w, w0 = torch.randn(3, 4), torch.randn(3, 4)
    assert torch.allclose(feature_shift_penalty(w, w0, 0.2), 0.2 * (w * w0).sum())


def test_fst_head_norm_held_after_every_step_and_head_reinitialised():
    torch.manual_seed(0)
    model = Tiny()
    target = float(model.fc.weight.norm())
    norms = []
    params = DefenseParams.of("fst", lr=0.05, epochs=2, alpha=0.2, batch_size=16)
    outcome = get_defense("fst").run(
        model,
        "fc",
        _data(),
        MEAN,
        STD,
        params,
        torch.device("cpu"),
        on_step=lambda step: norms.append(float(model.fc.weight.norm())),
    )
    assert len(norms) == 6  # 48 images / 16 per batch * 2 epochs
    assert all(abs(n - target) < 1e-4 * target for n in norms)
    assert outcome.head_norm == pytest.approx(target)


def test_fst_loss_includes_penalty():
    """With a huge alpha the head is driven to anti-align with the original head (cosine < 0)."""
    torch.manual_seed(0)
    model = Tiny()
    w0 = model.fc.weight.detach().clone()
    params = DefenseParams.of("fst", lr=0.05, epochs=3, alpha=50.0, batch_size=16)
    get_defense("fst").run(model, "fc", _data(), MEAN, STD, params, torch.device("cpu"))
    cosine = float((model.fc.weight * w0).sum() / (model.fc.weight.norm() * w0.norm()))
    assert cosine < -0.5


def test_only_fst_holds_the_norm():
    torch.manual_seed(0)
    model = Tiny()
    target = float(model.fc.weight.norm())
    _run("ft-init", model=model, lr=0.5)
    assert abs(float(model.fc.weight.norm()) - target) > 1e-3


def test_defaults_per_dataset():
    assert default_params("cifar10") == {"lr": 0.01, "epochs": 10, "alpha": 0.2, "clean_fraction": 0.02}
    assert default_params("gtsrb")["alpha"] == 0.1 and default_params("gtsrb")["epochs"] == 15
    assert default_params("cifar100")["lr"] == 0.001 and default_params("tiny-imagenet")["clean_fraction"] == 0.05
    assert default_params("mnist") == default_params("cifar10")


@pytest.mark.parametrize("bad", [dict(lr=0), dict(epochs=0), dict(alpha=-1), dict(momentum=1.0), dict(batch_size=0)])
def test_invalid_params(bad):
    with pytest.raises(ConfigError):
        DefenseParams.of("fst", **bad).validate()


def test_cpu_runs_are_deterministic():
    a, _, _ = _run("fst")
    b, _, _ = _run("fst")
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key])
