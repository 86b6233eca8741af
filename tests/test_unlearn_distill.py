"""The unlearning's distillation of the input model's clean outputs (`distill`, defenses/unlearn.py): only the images
a batch did not stamp are distilled (the input's outputs on a stamped image are the backdoor's), and the term keeps
the tuned model's clean outputs nearer the input's. The default's reruns use it (tests/test_dormancy.py)."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from backdoor_cli.data.image_set import ImageSet
from backdoor_cli.defenses.base import DefenseParams
from backdoor_cli.defenses.distill import distillation_term
from backdoor_cli.defenses.unlearn import run_unlearn, trigger_stamp
from helpers import class_trigger

MEAN = torch.tensor([0.5, 0.4, 0.3])
STD = torch.tensor([0.2, 0.25, 0.3])


def test_the_stamp_says_which_rows_of_each_batch_it_left_unstamped():
    inputs = torch.randn(300, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    stamp = trigger_stamp([class_trigger(1)], 0.3, MEAN, STD, torch.device("cpu"))
    generator = torch.Generator().manual_seed(2)
    out = stamp(inputs, generator)
    unchanged = ~(out != inputs).flatten(1).any(1)
    assert torch.equal(stamp.unstamped(300).bool(), unchanged) and 0 < unchanged.sum() < 300
    last = stamp(inputs[:40], generator)  # a smaller, last batch reuses the buffer
    assert torch.equal(stamp.unstamped(40).bool(), ~(last != inputs[:40]).flatten(1).any(1))


def test_the_distillation_counts_only_the_rows_it_is_given_over_the_whole_batch():
    teacher = nn.Linear(6, 4).eval()
    inputs = torch.randn(10, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        scores = teacher(inputs)
    scores[5:] += torch.randn(5, 4, generator=torch.Generator().manual_seed(1)) * 3  # rows 5-9 disagree
    first_half = torch.tensor([1.0] * 5 + [0.0] * 5)
    assert distillation_term(teacher, 2.0, 2.0, rows=lambda n: first_half[:n])(inputs, scores).abs() < 1e-6
    every_row = distillation_term(teacher, 2.0, 2.0, rows=lambda n: torch.ones(n))(inputs, scores)
    whole = distillation_term(teacher, 2.0, 2.0)(inputs, scores)  # fst-kd's term, rows not limited
    torch.testing.assert_close(every_row, whole)
    second_half = distillation_term(teacher, 2.0, 2.0, rows=lambda n: 1 - first_half[:n])(inputs, scores)
    torch.testing.assert_close(second_half, whole)  # the agreeing rows add nothing, and the mean is over all 10


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.pool(F.relu(self.bn(self.conv(x)))).flatten(1))


def _drift(distill: float) -> tuple[float, str]:
    """Mean KL(input || tuned) on the clean images after unlearning with random labels (which pull the model away
    from the input's outputs) at the distillation weight `distill`, and the run's note."""
    torch.manual_seed(0)
    model = Net()
    generator = torch.Generator().manual_seed(0)
    clean = ImageSet(
        torch.randint(0, 256, (128, 8, 8, 3), dtype=torch.uint8, generator=generator),
        torch.randint(0, 4, (128,), generator=generator),
    )
    start = copy.deepcopy(model).eval()
    params = DefenseParams.of("unlearn", lr=0.05, epochs=4, batch_size=32, distill=distill)
    mean, std = MEAN.view(1, 3, 1, 1), STD.view(1, 3, 1, 1)
    outcome = run_unlearn(model, "fc", clean, mean, std, params, torch.device("cpu"), triggers=[class_trigger(1)])
    x = (clean.x.permute(0, 3, 1, 2).float() / 255 - mean) / std
    with torch.no_grad():
        kl = F.kl_div(
            F.log_softmax(model.eval()(x), 1), F.log_softmax(start(x), 1), log_target=True, reduction="batchmean"
        )
    return float(kl), outcome.notes[-1]


def test_distilling_keeps_the_tuned_models_clean_outputs_nearer_the_inputs_and_says_so():
    plain, plain_note = _drift(0.0)
    kept, note = _drift(5.0)
    assert kept < plain / 2
    assert "distilled" not in plain_note
    assert "the input model's outputs distilled on the unstamped images (weight 5, temperature 2)" in note
