"""Start-up cost: what bdclean imports, and the memory-format timing it skips when it cannot pay back.

issue 24: on a GPU most of a purify's wall time was start-up: torch._dynamo, sympy and
torch.distributed.fsdp imported by a meta-device model build, format timing, a progress-bar thread.
`import torch` itself does not import torch._dynamo (checked in the first test), so an evaluation
must not either. A tuning does: torch.optim's optimisers import it on construction.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from backdoor_cli.models import build_model
from backdoor_cli.usecases.setup import FORMAT_PAYBACK, untimed_format
from helpers import make_npz_dataset

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def _imported_modules(args: list[str]) -> set[str]:
    """Every module `python -X importtime ARGS` imported (read from its import-time log on stderr)."""
    out = subprocess.run(
        [sys.executable, "-X", "importtime", *args], capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return {line.rsplit("|", 1)[1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}


def test_import_torch_alone_does_not_import_dynamo():
    """The premise of the evaluate test below (true of torch 2.13 here and the GPU machine's 2.11)."""
    code = "import sys, torch; print('torch._dynamo' in sys.modules, 'sympy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.split() == ["False", "False"], out.stderr


def test_importing_the_cli_and_its_help_do_not_import_torch():
    assert "torch" not in _imported_modules(["-c", "import backdoor_cli.cli"])
    assert "torch" not in _imported_modules(["-m", "backdoor_cli.cli", "--help"])
    assert "torch" not in _imported_modules(["-m", "backdoor_cli.cli", "purify", "--help"])


def test_an_evaluation_imports_no_dynamo_sympy_or_torchvision(tmp_path):
    """A legacy .th ResNet-20 (the path that built a meta-device copy and imported torch._dynamo)."""
    data = make_npz_dataset(tmp_path / "data", classes=3, size=32, n_train=12, n_test=30)
    checkpoint = tmp_path / "resnet20.th"
    torch.manual_seed(0)
    torch.save(build_model("resnet20", 3).state_dict(), checkpoint, _use_new_zipfile_serialization=False)
    args = [
        "evaluate",
        str(checkpoint),
        "--arch",
        "resnet20",
        "--data",
        str(data),
        "--trigger",
        "badnets",
        "--target",
        "0",
        "--device",
        "cpu",
        "--json",
        "--quiet",
    ]
    code = (
        "import sys; from typer.testing import CliRunner; from backdoor_cli.cli import app; "
        f"r = CliRunner().invoke(app, {args!r}); assert r.exit_code == 0, r.output; "
        "print(sorted(m for m in ('torch._dynamo', 'sympy', 'torch.distributed.fsdp', 'torchvision', "
        "'matplotlib') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def _opts(memory_format="timed"):
    return SimpleNamespace(memory_format=memory_format)


def test_format_timing_is_skipped_when_the_run_is_too_small_to_repay_it():
    model = build_model("test_tiny", 3).to(memory_format=torch.contiguous_format)
    choice = untimed_format(_opts(), model, CPU, work=FORMAT_PAYBACK * 6 - 1, cost=6, unit="steps")
    assert choice.format == "channels_last" and choice.reason.startswith("default (not timed")
    assert choice.seconds is None and "steps" in choice.reason


@pytest.mark.parametrize(
    "opts, device, work",
    [
        (_opts(), CPU, FORMAT_PAYBACK * 6),  # enough work: time both formats
        (_opts("contiguous"), CPU, 1),  # the user chose
        (_opts("channels-last"), CPU, 1),
        (_opts(None), CPU, 1),  # auto: channels_last untimed (precision.choose_memory_format), whatever the work
        (_opts("auto"), CPU, 1),
        (_opts(), torch.device("cuda"), 1),  # not timed on CUDA anyway (precision.choose_memory_format)
    ],
)
def test_format_timing_is_left_to_choose_memory_format(opts, device, work):
    assert untimed_format(opts, build_model("test_tiny", 3), device, work=work, cost=6, unit="steps") is None
