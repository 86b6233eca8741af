"""evaluate.py, gates.py and weight drift: the metric definitions of DESIGN.md section 4, on models
whose answers are known in advance."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from backdoor_cli.data.datasets import ImageSet
from backdoor_cli.evaluation.gates import check_gates
from backdoor_cli.evaluation.measure import build_eval_sets, evaluate_model
from backdoor_cli.reports.report import weight_drift
from backdoor_cli.triggers import build_trigger, parse_trigger_spec

CPU = torch.device("cpu")
MEAN, STD = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)


class BrightCornerIsZero(nn.Module):
    """Predicts class 0 when the bottom-right pixel is white (the BadNets patch), else the class
    written in the top-left pixel: a model with a perfect, known backdoor."""

    def forward(self, x):
        corner_white = x[:, 0, -1, -1] > 0.99
        label = (x[:, 0, 0, 0] * 255).round().long()
        out = torch.nn.functional.one_hot(torch.where(corner_white, torch.zeros_like(label), label), 4).float()
        return out


def _test_set():
    y = torch.arange(40) % 4
    x = torch.zeros(40, 8, 8, 3, dtype=torch.uint8)
    x[:, 0, 0, 0] = y.to(torch.uint8)  # the class, readable by the model above
    return ImageSet(x, y)


def _badnets(target=0):
    spec = parse_trigger_spec({"type": "patch", "size": 2, "target": target}, None, source="test")
    return build_trigger(spec, (8, 8, 3))


def test_asr_excludes_target_class_images_and_ra_counts_true_labels():
    sets = build_eval_sets(_test_set(), _badnets(), CPU)
    assert sets.poisoned.num_images == 30  # the 10 images of class 0 are left out
    result = evaluate_model(BrightCornerIsZero(), sets, MEAN, STD, CPU, batch_size=7)
    assert (result.clean_acc.k, result.clean_acc.n) == (40, 40)
    assert (result.asr.k, result.asr.n) == (30, 30)
    assert (result.ra.k, result.ra.n) == (0, 30)


def test_a_model_without_the_backdoor_has_zero_asr_and_full_ra():
    sets = build_eval_sets(_test_set(), _badnets(target=3), CPU)

    class Honest(nn.Module):
        def forward(self, x):
            return torch.nn.functional.one_hot((x[:, 0, 0, 0] * 255).round().long(), 4).float()

    result = evaluate_model(Honest(), sets, MEAN, STD, CPU)
    assert result.asr.k == 0 and result.ra.k == result.ra.n == 30


def test_eval_limit_is_stratified_and_flagged():
    sets = build_eval_sets(_test_set(), None, CPU, limit=20, seed=0)
    assert sets.limited and sets.poisoned is None
    assert torch.bincount(sets.clean.y).tolist() == [5, 5, 5, 5]


def test_gates():
    gates = check_gates(asr=0.2, acc=0.9, acc_drop=0.03, max_asr=0.1, min_acc=0.85, max_acc_drop=0.02)
    assert [(g.name, g.passed) for g in gates] == [("max-asr", False), ("min-acc", True), ("max-acc-drop", False)]
    assert check_gates(asr=None, acc=0.5) == []
    assert "FAILED" in gates[0].describe() and "passed" in gates[1].describe()


def test_weight_drift():
    ref = {"a.weight": torch.ones(4), "a.bias": torch.ones(2), "b.weight": torch.ones(3)}
    other = {"a.weight": torch.ones(4) * 2, "a.bias": torch.zeros(2), "b.weight": torch.ones(3)}
    drift = weight_drift(ref, other)
    assert drift["layers"]["a.weight"]["l2"] == pytest.approx(2.0)
    assert drift["layers"]["a.weight"]["cosine"] == pytest.approx(1.0)
    assert "a.bias" not in drift["layers"] and drift["most_changed"] == "a.weight"
    assert drift["total_l2"] == pytest.approx(2.0)
