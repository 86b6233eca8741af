"""Tiny synthetic datasets and models for fast CLI and pipeline tests."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest


def make_npz_dataset(
    root: Path, classes: int = 3, size: int = 12, channels: int = 3, n_train: int = 240, n_test: int = 90, seed: int = 0
) -> Path:
    """A learnable toy dataset: each class has its own brightness band plus noise."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        y = np.arange(n) % classes
        base = (40 + 170 * y / max(classes - 1, 1)).reshape(-1, 1, 1, 1)
        x = np.clip(base + rng.normal(0, 25, (n, size, size, channels)), 0, 255).astype(np.uint8)
        if channels == 1:
            x = x[..., 0]
        np.savez(root / f"{split}.npz", x=x, y=y.astype(np.uint8))
    return root


def train_toy_model(root: Path, name: str = "bd.safetensors", epochs: int = 2, **data_kwargs) -> dict:
    """A toy dataset under root/data and a BadNets-backdoored test_tiny model trained on it through the CLI."""
    data = make_npz_dataset(root / "data", **data_kwargs)
    model = root / name
    train_badnets_model(data, model, epochs)
    return {"root": root, "data": data, "model": model}


def train_badnets_model(data: Path, model: Path, epochs: int = 2, poison_rate: float = 0.1, *extra: str) -> None:
    """`bdclean train` a BadNets-backdoored test_tiny model on `data` into `model` (extra: more flags)."""
    from typer.testing import CliRunner

    from backdoor_cli.cli import app

    result = CliRunner().invoke(
        app,
        [
            "train",
            "--arch",
            "test_tiny",
            "--data",
            str(data),
            "--out",
            str(model),
            "--trigger",
            "badnets",
            "--poison-rate",
            str(poison_rate),
            "--epochs",
            str(epochs),
            "--lr",
            "0.05",
            "--device",
            "cpu",
            "--quiet",
            *extra,
        ],
    )
    assert result.exit_code == 0, result.output


def bdclean_logits(path, data):
    """The test split's logits from the model bdclean loads from `path`, normalised as bdclean resolves it."""
    import torch

    from backdoor_cli.data.datasets import load_dataset, normalize
    from backdoor_cli.subject import load_subject, normalization_tensors

    bundle = load_dataset(str(data), None, need_train=False)
    subject = load_subject(str(path), bundle)
    mean, std = normalization_tensors(subject, torch.device("cpu"))
    with torch.no_grad():
        return subject.model.eval()(normalize(bundle.test.x, mean, std))


def check_compare_of_purified_dir(model_dir: Path, out: Path, data: Path, arch: str) -> None:
    """`bdclean compare` of a model directory, purify's purified-hf/ and purified.safetensors: one arch,
    the two purified copies scoring alike, the purified one drifted from the original."""
    import json

    from typer.testing import CliRunner

    from backdoor_cli.cli import app

    result = CliRunner().invoke(
        app,
        [
            "compare",
            str(model_dir),
            str(out / "purified-hf"),
            str(out / "purified.safetensors"),
            "--data",
            str(data),
            "--device",
            "cpu",
            "--json",
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["rows"]
    assert [r["arch"] for r in rows] == [arch] * 3
    assert rows[1]["method"] is not None and rows[1]["method"] == rows[2]["method"]  # the purified copy, both ways
    assert rows[1]["metrics"]["clean_acc"] == rows[2]["metrics"]["clean_acc"]
    assert rows[1]["drift"]["total_l2"] > 0


CLASSES, SIZE = 8, 16  # the template dataset's


def make_template_dataset(root: Path, n_train: int = 1600, n_test: int = 320, seed: int = 0) -> Path:
    """8 equally distinct classes, so a clean model has no natural shortcut class: each class's template
    is a row of the 8x8 Hadamard matrix (every two rows differ in exactly 4 of 8 signs), repeated over
    48 cells of 4x4 pixels (16 x 16 x 3) under a shared shuffle, as brightness 128 +- 50, plus noise."""
    rng = np.random.default_rng(seed)
    hadamard = np.array([[1]])
    while hadamard.shape[0] < CLASSES:
        hadamard = np.block([[hadamard, hadamard], [hadamard, -hadamard]])
    cells = np.tile(hadamard, (1, 6))[:, rng.permutation(48)]  # pairwise distances stay exactly 24 of 48
    templates = (128 + 50 * cells).reshape(CLASSES, 4, 4, 3).repeat(SIZE // 4, 1).repeat(SIZE // 4, 2)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        y = np.arange(n) % CLASSES
        x = np.clip(templates[y] + rng.normal(0, 30, (n, SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
        np.savez(root / f"{split}.npz", x=x, y=y.astype(np.uint8))
    return root


def train_small_cnn(data: Path, out: Path, *trigger: str) -> Path:
    """`bdclean train` a simple_cnn_half on `data` (4 epochs); `trigger`: extra flags, e.g. a backdoor."""
    from typer.testing import CliRunner

    from backdoor_cli.cli import app

    result = CliRunner().invoke(
        app,
        [
            "train",
            "--arch",
            "simple_cnn_half",
            "--data",
            str(data),
            "--out",
            str(out),
            "--epochs",
            "4",
            "--lr",
            "0.05",
            "--device",
            "cpu",
            "--quiet",
            *trigger,
        ],
    )
    assert result.exit_code == 0, result.output
    return out


def planted_scan_subject(root: Path) -> dict:
    """A simple_cnn_half with a BadNets backdoor (target 0) on the template data, loaded for a scan:
    {"model", "images" (160 training images), "mean", "std"}."""
    import torch

    from backdoor_cli.data.datasets import load_dataset
    from backdoor_cli.subject import load_subject, normalization_tensors

    data = make_template_dataset(root / "data")
    path = train_small_cnn(data, root / "bd.safetensors", "--trigger", "badnets", "--poison-rate", "0.1")
    bundle = load_dataset(str(data))
    subject = load_subject(str(path), bundle)
    mean, std = normalization_tensors(subject, torch.device("cpu"))
    return {"model": subject.model, "images": bundle.train.subset(torch.arange(160)), "mean": mean, "std": std}


# --- a tiny model and data for the defenses' mechanics tests (one definition for every test file) ---


def _tiny_model_class():
    import torch
    from torch import nn

    class Tiny(nn.Module):
        def __init__(self, classes: int = 3):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(4, classes)

        def forward(self, x):
            return self.fc(self.pool(torch.relu(self.bn(self.conv(x)))).flatten(1))

    return Tiny


Tiny = _tiny_model_class()


def tiny_data(n=48, classes=3):
    """n random 8x8 RGB images, labels cycling over `classes`."""
    import torch

    from backdoor_cli.data.datasets import ImageSet

    g = torch.Generator().manual_seed(0)
    return ImageSet(torch.randint(0, 256, (n, 8, 8, 3), generator=g, dtype=torch.uint8), torch.arange(n) % classes)


def _normalisation():
    import torch

    return torch.full((1, 3, 1, 1), 0.5), torch.full((1, 3, 1, 1), 0.25)


MEAN, STD = _normalisation()


def run_tiny(name: str, model=None, **overrides):
    """(model, outcome): defense `name` run on a Tiny (seeded) over tiny_data, lr 0.05, 2 epochs, batch 16."""
    import torch

    from backdoor_cli.defenses import DefenseParams, get_defense

    torch.manual_seed(0)
    model = model or Tiny()
    params = DefenseParams.of(name, **{"lr": 0.05, "epochs": 2, "batch_size": 16, **overrides})
    outcome = get_defense(name).run(model, "fc", tiny_data(), MEAN, STD, params, torch.device("cpu"), flip=True)
    return model, outcome


# The same TinyNet weights behind four endings (a user's architecture file): the checkpoint's keys fit each.
ENDED_ARCH_FILE = """
import torch.nn.functional as F
from torch import nn
from backdoor_cli.models.architectures import TinyNet


class Ended(TinyNet):
    def __init__(self, num_classes, in_channels, ending):
        super().__init__(num_classes, in_channels)
        self.ending = ending

    def forward(self, x):
        return self.ending(super().forward(x))


def plain(num_classes, in_channels=3):
    return TinyNet(num_classes, in_channels)


def softmax(num_classes, in_channels=3):
    return Ended(num_classes, in_channels, nn.Softmax(dim=1))


def log_softmax(num_classes, in_channels=3):
    return Ended(num_classes, in_channels, nn.LogSoftmax(dim=1))


class Functional(TinyNet):
    def forward(self, x):
        return F.softmax(super().forward(x), dim=1)


def functional(num_classes, in_channels=3):
    return Functional(num_classes, in_channels)
"""


def train_ended_toy(root: Path) -> dict:
    """train_toy_model's model and data under root, plus root/arch.py (ENDED_ARCH_FILE) under "arch"."""
    made = train_toy_model(root, epochs=2)
    (root / "arch.py").write_text(ENDED_ARCH_FILE)
    made["arch"] = root / "arch.py"
    return made


def purify_with_arch_file(toy: dict, out: Path, factory: str, *args):
    """`bdclean purify --json` of train_ended_toy's model built by arch.py's `factory`; the CliRunner result."""
    from typer.testing import CliRunner

    from backdoor_cli.cli import app

    # fp32: these tests compare twins bit for bit (or to 1e-4); bf16 autocast, which --precision auto
    # picks on CPUs with native bf16, rounds the twins' different last layers differently.
    return CliRunner().invoke(
        app,
        [
            "purify",
            str(toy["model"]),
            "--arch",
            f"{toy['arch']}:{factory}",
            "--data",
            str(toy["data"]),
            "--out",
            str(out),
            "--clean-count",
            "60",
            "--epochs",
            "2",
            "--batch-size",
            "16",
            "--device",
            "cpu",
            "--precision",
            "fp32",
            "--json",
            *map(str, args),
        ],
    )


def run_purify_ok(toy: dict, out: Path, factory: str, *args) -> tuple[dict, dict]:
    """purify_with_arch_file that must succeed: (its JSON report, the purified state_dict)."""
    import json

    from backdoor_cli.checkpoint import read_checkpoint

    result = purify_with_arch_file(toy, out, factory, "--quiet", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), read_checkpoint(out / "purified.safetensors").state_dict


# The installed console script, for tests that run bdclean as a CI step would (a bash script, a subprocess).
BDCLEAN = Path(sys.executable).parent / "bdclean"
NEEDS_BDCLEAN_AND_BASH = pytest.mark.skipif(
    not BDCLEAN.exists() or not shutil.which("bash"), reason="needs the installed bdclean console script and bash"
)


def purify_toy_one_epoch(toy_model: dict, out: Path, *args: str):
    """`bdclean purify --json` of the toy_model fixture's model for one epoch on the CPU; the CliRunner result."""
    from typer.testing import CliRunner

    from backdoor_cli.cli import app

    return CliRunner().invoke(
        app,
        ["purify", toy_model["model"], "--data", toy_model["data"], "--out", str(out), "--epochs", "1"]
        + ["--device", "cpu", "--quiet", "--json", *args],
    )


def class_trigger(target: int, size: int = 8, l1: float = 4.0):
    """A reconstructed trigger for unit tests: a 2x2 bottom-right mask and a pattern seeded by the class."""
    import torch

    from backdoor_cli.scanning.inversion import ClassTrigger

    mask = torch.zeros(size, size)
    mask[-2:, -2:] = 1.0
    pattern = torch.rand(size, size, 3, generator=torch.Generator().manual_seed(target))
    return ClassTrigger(target=target, mask=mask, pattern=pattern, l1=l1, success=1.0, reached=True, steps=10)


def scan_result(anomaly: list[float], flagged: list[int] | None = None, **screen):
    """A scan's result with these anomaly indices (median mask 20, MAD 0.3, threshold 2) for unit tests."""
    from backdoor_cli.scanning.inversion import ScanResult

    return ScanResult(
        triggers=[class_trigger(c) for c in range(len(anomaly))],
        anomaly=anomaly,
        median_l1=20.0,
        mad=0.3,
        threshold=2.0,
        flagged=flagged or [],
        **screen,
    )


def corner_labelled_eval_sets():
    """Evaluation sets of 40 8x8 images of 4 classes whose class is written in the top-left pixel, with a 2x2
    white bottom-right patch to class 0 as the trigger: models that read the pixel have known answers."""
    import torch

    from backdoor_cli.data.datasets import ImageSet
    from backdoor_cli.evaluation.measure import build_eval_sets
    from backdoor_cli.triggers import build_trigger, parse_trigger_spec

    y = torch.arange(40) % 4
    x = torch.zeros(40, 8, 8, 3, dtype=torch.uint8)
    x[:, 0, 0, 0] = y.to(torch.uint8)
    spec = parse_trigger_spec({"type": "patch", "size": 2, "target": 0}, None, source="test")
    return build_eval_sets(ImageSet(x, y), build_trigger(spec, (8, 8, 3)), torch.device("cpu"))
