"""Distillation (fst-kd, ft-kd) on models that end in a softmax (issue 21): the term sees the same
logits, gives the same gradients as the logits twin of the network, and a short run does not collapse."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from backdoor_cli.data.datasets import ImageSet
from backdoor_cli.defenses import DefenseParams
from backdoor_cli.defenses.distill import distillation_term, frozen_copy, run_fst_kd, run_ft_kd
from backdoor_cli.models.output_kind import LOGITS, LossAdapter, attach_loss

CLASSES, SIZE = 4, 6
MEAN, STD = torch.tensor([0.5]), torch.tensor([0.5])


class Net(nn.Module):
    """flatten - fc 16 - relu - fc (the head `fc2`); `ending` is applied to the logits."""

    def __init__(self, ending: str = "logits"):
        super().__init__()
        self.fc1 = nn.Linear(SIZE * SIZE, 16)
        self.fc2 = nn.Linear(16, CLASSES)
        self.ending = ending
        self.out = nn.Softmax(dim=1) if ending == "module" else nn.Identity()

    def forward(self, x):
        logits = self.fc2(F.relu(self.fc1(x.flatten(1))))
        return F.softmax(logits, dim=1) if self.ending == "functional" else self.out(logits)


ADAPTERS = {
    "module": LossAdapter("probs", "normaliser-input", "out"),
    "functional": LossAdapter("probs", "log-of-output"),
}


def twins(ending: str, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """(softmax-ended net, the same weights returning logits)."""
    torch.manual_seed(seed)
    soft = Net(ending)
    plain = Net("logits")
    plain.load_state_dict(soft.state_dict())
    return soft, plain


def term_and_grads(model: nn.Module, teacher: nn.Module, adapter: LossAdapter, x: torch.Tensor):
    """The distillation term on the scores tuning hands over, and d term / d weights."""
    term = distillation_term(teacher, 2.0, 2.0, adapter)
    y = torch.zeros(len(x), dtype=torch.long)
    with attach_loss(model, adapter) as loss_fn:
        _, scores = loss_fn(model(x), y)
        value = term(x, scores)
    model.zero_grad()
    value.backward()
    return float(value.detach()), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("ending", ["module", "functional"])
def test_the_term_is_zero_when_the_student_is_the_teacher(ending):
    soft, _ = twins(ending)
    x = torch.randn(8, SIZE * SIZE)
    value, grads = term_and_grads(soft, frozen_copy(soft), ADAPTERS[ending], x)
    assert value == pytest.approx(0.0, abs=1e-6)
    assert all(g.abs().max() < 1e-5 for g in grads.values())


@pytest.mark.parametrize("ending", ["module", "functional"])
def test_the_gradient_is_the_logits_twins(ending):
    soft, plain = twins(ending)
    teacher_soft, teacher_plain = frozen_copy(soft), frozen_copy(plain)
    with torch.no_grad():  # the student moves away from the teacher, the same way in both twins
        for a, b in zip(soft.parameters(), plain.parameters()):
            step = 0.3 * torch.randn(a.shape, generator=torch.Generator().manual_seed(a.numel()))
            a.add_(step), b.add_(step)
    x = 3 * torch.randn(8, SIZE * SIZE, generator=torch.Generator().manual_seed(1))
    soft_value, soft_grads = term_and_grads(soft, teacher_soft, ADAPTERS[ending], x)
    plain_value, plain_grads = term_and_grads(plain, teacher_plain, LOGITS, x)
    assert soft_value > 1e-3 and soft_value == pytest.approx(plain_value, rel=1e-4)
    for name, grad in plain_grads.items():
        assert torch.allclose(soft_grads[name], grad, rtol=1e-4, atol=1e-6), name


def learnable_images(n: int = 160, seed: int = 0) -> ImageSet:
    """Single-channel 6x6 images whose class is the bright quadrant."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % CLASSES
    x = torch.randint(0, 60, (n, SIZE, SIZE, 1), generator=g)
    for k in range(CLASSES):
        r, c = divmod(k, 2)
        x[y == k, 3 * r : 3 * r + 3, 3 * c : 3 * c + 3] += 180
    return ImageSet(x.to(torch.uint8), y)


def accuracy(model: nn.Module, images: ImageSet) -> float:
    with torch.no_grad():
        scores = model.eval()((images.x.permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5)
    return float((scores.argmax(1) == images.y).float().mean())


@pytest.mark.parametrize("run", [run_fst_kd, run_ft_kd], ids=["fst-kd", "ft-kd"])
@pytest.mark.parametrize("ending", ["module", "functional"])
def test_a_short_distilled_run_keeps_a_softmax_model_like_its_twin(ending, run):
    train, test = learnable_images(), learnable_images(80, seed=1)
    soft, _ = twins(ending)
    method, own = ("fst-kd", {"alpha": 0.0}) if run is run_fst_kd else ("ft-kd", {})
    params = DefenseParams.of(method, lr=0.05, epochs=30, batch_size=32, augment=False, distill=2.0, **own)
    with attach_loss(soft, ADAPTERS[ending]) as loss_fn:  # a learnt input model: plain tuning first
        opt = torch.optim.SGD(soft.parameters(), lr=0.5)
        for _ in range(200):
            loss, _ = loss_fn(soft(((train.x.permute(0, 3, 1, 2).float() / 255) - 0.5) / 0.5), train.y)
            opt.zero_grad(), loss.backward(), opt.step()
    assert accuracy(soft, test) >= 0.95
    plain = Net("logits")
    plain.load_state_dict(soft.state_dict())
    cpu = torch.device("cpu")
    run(soft, "fc2", train, MEAN, STD, params, cpu, flip=False, loss_adapter=ADAPTERS[ending], precision="fp32")
    run(plain, "fc2", train, MEAN, STD, copy.copy(params), cpu, flip=False, precision="fp32")
    assert accuracy(soft, test) >= 0.9
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(soft.state_dict().values(), plain.state_dict().values()))
