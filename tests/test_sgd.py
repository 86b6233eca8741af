"""backdoor_cli.tuning.sgd: the SGD update and schedules are torch's, to the bit, without importing torch.optim's
machinery (which pulls in torch._dynamo)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from backdoor_cli.errors import ConfigError
from backdoor_cli.tuning.sgd import Schedule, Sgd

CPU = torch.device("cpu")


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))


def _train(model, step, zero, next_epoch, epochs=4, skip_bias_every=3):
    """A few epochs of steps; every `skip_bias_every`-th step the first bias gets no gradient
    (a parameter left out of a step must be left alone, momentum included)."""
    g = torch.Generator().manual_seed(1)
    n = 0
    for _ in range(epochs):
        for _ in range(5):
            x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
            zero()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            n += 1
            if n % skip_bias_every == 0:
                model[0].bias.grad = None
            step()
        next_epoch()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
@pytest.mark.parametrize(("momentum", "weight_decay"), [(0.9, 5e-4), (0.9, 0.0), (0.0, 1e-3)])
def test_foreach_update_and_schedule_are_torchs_to_the_bit(schedule, momentum, weight_decay):
    epochs = 4
    ours = _model()
    sgd = Sgd(list(ours.parameters()), 0.05, momentum, weight_decay, CPU)
    sched = Schedule(sgd, schedule, epochs)
    lrs_ours = []
    mine = _train(ours, sgd.step, sgd.zero_grad, lambda: (sched.step(), lrs_ours.append(sgd.lr_value)), epochs)

    theirs = _model()
    opt = torch.optim.SGD(theirs.parameters(), lr=0.05, momentum=momentum, weight_decay=weight_decay, foreach=True)
    lr_sched = (
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
        if schedule == "cosine"
        else torch.optim.lr_scheduler.LambdaLR(opt, lambda _e: 1.0)
    )
    lrs_theirs = []
    reference = _train(
        theirs,
        opt.step,
        lambda: opt.zero_grad(set_to_none=True),
        lambda: (lr_sched.step(), lrs_theirs.append(opt.param_groups[0]["lr"])),
        epochs,
    )
    assert lrs_ours == lrs_theirs  # the same floats
    for a, b in zip(mine, reference):
        assert torch.equal(a, b)


def test_fused_update_with_a_tensor_learning_rate_matches_torchs_fused_sgd():
    """The CUDA path (torch's fused kernel, lr a tensor filled in place), checked here on the CPU kernel."""
    epochs = 3
    ours = _model()
    sgd = Sgd(list(ours.parameters()), 0.05, 0.9, 5e-4, CPU, fused=True)
    assert isinstance(sgd.lr, torch.Tensor)
    sched = Schedule(sgd, "cosine", epochs)
    lr_tensor = sgd.lr
    mine = _train(ours, sgd.step, sgd.zero_grad, sched.step, epochs, skip_bias_every=10**6)
    assert sgd.lr is lr_tensor  # filled in place: a captured step keeps reading the same tensor

    theirs = _model()
    opt = torch.optim.SGD(theirs.parameters(), lr=torch.tensor(0.05), momentum=0.9, weight_decay=5e-4, fused=True)
    lr_sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    reference = _train(
        theirs, opt.step, lambda: opt.zero_grad(set_to_none=True), lr_sched.step, epochs, skip_bias_every=10**6
    )
    for a, b in zip(mine, reference):
        assert torch.allclose(a, b, rtol=0, atol=1e-6)


def test_unknown_schedule_is_refused():
    with pytest.raises(ConfigError, match="cosine or constant"):
        Schedule(Sgd([torch.nn.Parameter(torch.zeros(1))], 0.1, 0.9, 0.0, CPU), "linear", 3)


def test_tuning_does_not_import_dynamo():
    """Creating a torch optimizer imports torch._dynamo (seconds); a bdclean tuning run must not."""
    code = (
        "import sys, torch\n"
        "from backdoor_cli.data.datasets import ImageSet\n"
        "from backdoor_cli.models import build_model\n"
        "from backdoor_cli.tuning.loop import TuneSettings, tune\n"
        "from backdoor_cli.tuning.sgd import SgdSettings\n"
        "m = build_model('test_tiny', 3)\n"
        "x = torch.randint(0, 256, (16, 8, 8, 3), dtype=torch.uint8); y = torch.randint(0, 3, (16,))\n"
        "mean = torch.zeros(1, 3, 1, 1); std = torch.ones(1, 3, 1, 1)\n"
        "tune(m, ImageSet(x, y), mean, std, TuneSettings(SgdSettings(epochs=2, lr=0.01, batch_size=8)), torch.device('cpu'))\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
