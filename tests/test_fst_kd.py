"""fst-kd: FST plus distillation of the input model's clean-data outputs."""

from __future__ import annotations

import copy

import pytest
import torch
from typer.testing import CliRunner

from backdoor_cli.cli import app
from backdoor_cli.defenses import DefenseParams, get_defense
from backdoor_cli.defenses.distill import as_logits, distillation_term
from backdoor_cli.errors import ConfigError
from backdoor_cli.models.output_kind import LossAdapter
from helpers import MEAN, STD, Tiny, train_ended_toy
from helpers import run_purify_ok as run_ok
from helpers import tiny_data as _data


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """train_ended_toy's model, data and arch.py (one per module)."""
    return train_ended_toy(tmp_path_factory.mktemp("outkind"))


def _tune(name: str, **overrides):
    torch.manual_seed(0)
    model = Tiny()
    with torch.no_grad():  # confident, varied predictions, so there is something to keep
        model.fc.weight.mul_(10)
    teacher = copy.deepcopy(model).eval()
    params = DefenseParams.of(name, **{"lr": 0.05, "epochs": 3, "batch_size": 16, **overrides})
    get_defense(name).run(model, "fc", _data(), MEAN, STD, params, torch.device("cpu"), flip=True)
    return model, teacher


def test_without_distillation_it_is_exactly_fst():
    fst, _ = _tune("fst")
    kd, _ = _tune("fst-kd", distill=0.0)
    assert all(torch.equal(a, b) for a, b in zip(fst.state_dict().values(), kd.state_dict().values()))


def test_ft_kd_without_distillation_is_exactly_ft():
    ft, _ = _tune("ft")
    kd, _ = _tune("ft-kd", distill=0.0)
    assert all(torch.equal(a, b) for a, b in zip(ft.state_dict().values(), kd.state_dict().values()))
    with_kd, _ = _tune("ft-kd", distill=1.0)
    assert not all(torch.equal(a, b) for a, b in zip(ft.state_dict().values(), with_kd.state_dict().values()))


@pytest.mark.parametrize("name", ["fst", "fst-kd", "ft"])
def test_label_smoothing_reaches_every_tuning_method(name):
    """--label-smoothing was once read only by pam and ft-sam, and silently ignored elsewhere."""
    plain, _ = _tune(name)
    smoothed, _ = _tune(name, label_smoothing=0.2)
    assert not all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), smoothed.state_dict().values()))
    zero, _ = _tune(name, label_smoothing=0.0)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), zero.state_dict().values()))


def test_distillation_keeps_the_clean_predictions_closer_to_the_input_model():
    x = (_data().x.permute(0, 3, 1, 2).float() / 255 - MEAN) / STD

    def gap(model, teacher):
        model.eval()
        with torch.no_grad():
            return float(
                torch.nn.functional.kl_div(
                    torch.log_softmax(model(x), 1),
                    torch.log_softmax(teacher(x), 1),
                    log_target=True,
                    reduction="batchmean",
                )
            )

    assert gap(*_tune("fst-kd", distill=5.0)) < gap(*_tune("fst")) / 3


def test_the_term_is_zero_when_student_equals_teacher_and_uses_the_temperature():
    teacher = torch.nn.Linear(4, 3).requires_grad_(False)
    inputs = torch.randn(8, 4)
    term = distillation_term(teacher, 1.0, 2.0)
    assert float(term(inputs, teacher(inputs))) == pytest.approx(0.0, abs=1e-6)
    other = torch.randn(8, 3)
    inputs.requires_grad_(False)
    hot, cold = distillation_term(teacher, 1.0, 1.0), distillation_term(teacher, 1.0, 4.0)
    assert float(hot(inputs, other)) != pytest.approx(float(cold(inputs, other)))


def test_probabilities_are_taken_to_logits_before_distilling():
    logits = torch.randn(5, 4)
    probs = torch.softmax(logits, 1)
    assert torch.allclose(torch.log_softmax(as_logits(probs, "probs"), 1), torch.log_softmax(logits, 1), atol=1e-5)
    softmax_teacher = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Softmax(dim=1)).requires_grad_(False)
    inputs = torch.randn(6, 4)
    term = distillation_term(
        softmax_teacher, 1.0, 2.0, LossAdapter(kind="probs", source="normaliser-input", module="1")
    )
    assert float(term(inputs, softmax_teacher[0](inputs))) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("field, value", [("distill", -1.0), ("distill_temperature", 0.0)])
def test_bad_values_are_refused(field, value):
    with pytest.raises(ConfigError, match=field.replace("_", "-")):
        DefenseParams.of("fst-kd", **{field: value}).validate()


def test_cli_runs_fst_kd_records_its_params_and_refuses_bad_values(toy, tmp_path):
    report, _ = run_ok(
        toy, tmp_path / "kd", "plain", "--method", "fst-kd", "--distill", "2", "--distill-temperature", "3"
    )
    assert report["method"]["name"] == "fst-kd"
    assert report["method"]["params"]["distill"] == 2.0 and report["method"]["params"]["distill_temperature"] == 3.0
    bad = CliRunner().invoke(
        app,
        [
            "purify",
            str(toy["model"]),
            "--data",
            str(toy["data"]),
            "--method",
            "fst-kd",
            "--distill",
            "-1",
            "--out",
            str(tmp_path / "bad"),
            "--device",
            "cpu",
        ],
    )
    assert bad.exit_code == 2 and "--distill must be in" in bad.output
    assert not (tmp_path / "bad").exists()


def test_a_softmax_ended_model_distils_like_its_logits_twin(toy, tmp_path):
    _, plain = run_ok(toy, tmp_path / "plain", "plain", "--method", "fst-kd")
    _, soft = run_ok(toy, tmp_path / "soft", "softmax", "--method", "fst-kd")
    assert plain.keys() == soft.keys()
    assert all(torch.allclose(plain[k].float(), soft[k].float(), atol=1e-4) for k in plain)
