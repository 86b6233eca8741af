"""Third-party checkpoints in any file order: the same weights as .pt, .safetensors (which sorts its
tensors by name) and a safetensors file written with a shuffled header give identical results, for
every built-in architecture and for user architecture files. Sizes must come from the architecture,
never from the order of tensors in the file."""

from __future__ import annotations

import json
import random
import struct
import textwrap
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from backdoor_cli.cli import app
from backdoor_cli.data.datasets import load_dataset
from backdoor_cli.models import ARCHITECTURES, build_model, guess_architecture
from backdoor_cli.subject import load_subject
from helpers import make_npz_dataset

REPO = Path(__file__).resolve().parents[1]
RESNET20 = f"{REPO / 'examples' / 'models' / 'resnet20.py'}:resnet20"

# A foreign model whose stem sorts *after* its body ("stem" > "body"): in safetensors' sorted order
# the first 4-D weight is a 16 -> 16 body conv, and the last 2-D weight is not the head.
STEM_LAST = textwrap.dedent("""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self, num_classes, in_channels=3):
            super().__init__()
            self.stem = nn.Conv2d(in_channels, 16, 3, padding=1)
            self.body = nn.Sequential(nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
            self.a_head = nn.Linear(16, num_classes)          # the real head, sorted first
            self.z_proj = nn.Linear(16, 16)                   # an embedding projection, sorted last

        def forward(self, x):
            x = self.body(self.stem(x)).mean((2, 3))
            return self.a_head(torch.relu(self.z_proj(x)))

    def build(num_classes, in_channels=3):
        return Net(num_classes, in_channels)
""")


def write_shuffled_safetensors(path: Path, state: dict[str, torch.Tensor], seed: int = 0) -> None:
    """A valid safetensors file whose header lists the tensors in a random order (written by hand,
    so the test does not depend on what order the safetensors library itself writes)."""
    names = list(state)
    random.Random(seed).shuffle(names)
    header, chunks, offset = {}, [], 0
    for name in names:
        tensor = state[name].detach().contiguous().cpu()
        raw = tensor.numpy().tobytes() if tensor.dtype != torch.bfloat16 else tensor.view(torch.int16).numpy().tobytes()
        dtype = {torch.float32: "F32", torch.int64: "I64", torch.float16: "F16"}[tensor.dtype]
        header[name] = {"dtype": dtype, "shape": list(tensor.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + b"".join(chunks))


def three_files(root: Path, state: dict[str, torch.Tensor]) -> list[Path]:
    from safetensors.torch import save_file

    pt, st, shuffled = root / "w.pt", root / "w.safetensors", root / "w-shuffled.safetensors"
    torch.save(state, pt)
    save_file({k: v.contiguous() for k, v in state.items()}, str(st))
    write_shuffled_safetensors(shuffled, state)
    return [pt, st, shuffled]


def seeded_state(arch: str, classes: int, channels: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = build_model(arch, classes, channels)
    with torch.no_grad():  # non-trivial BN statistics, so a mix-up of buffers would show
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model.state_dict()


def outputs_of(path: Path, bundle, arch: str | None) -> tuple:
    subject = load_subject(str(path), bundle, arch=arch)
    x = bundle.test.x[:16].permute(0, 3, 1, 2).float() / 255
    subject.model.eval()
    with torch.no_grad():
        logits = subject.model(x)
    return subject.arch, subject.num_classes, subject.in_channels, subject.head, logits


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("order")
    return {
        c: load_dataset(
            str(make_npz_dataset(root / f"c{c}", classes=5, size=12, channels=c, n_train=10, n_test=20)),
            None,
            need_train=False,
        )
        for c in (1, 3)
    }


# The big CIFAR nets in one channel setting only: each load builds them for real (seconds on 2 cores).
BIG = {"resnet18", "preactresnet18", "vgg16_bn"}


@pytest.mark.parametrize("arch, channels", [(a, c) for a in ARCHITECTURES for c in (3, 1) if a not in BIG or c == 3])
def test_every_builtin_gives_identical_results_in_every_file_order(arch, channels, toy, tmp_path):
    files = three_files(tmp_path, seeded_state(arch, 5, channels))
    for arch_flag in (None, arch):  # guessed from the weights, and named with --arch
        results = [outputs_of(f, toy[channels], arch_flag) for f in files]
        for got in results[1:]:
            assert got[:4] == results[0][:4] == (arch, 5, channels, results[0][3])
            assert torch.equal(got[4], results[0][4])


@pytest.mark.parametrize("source", ["resnet20", "stem_last"])
def test_user_architecture_files_give_identical_results_in_every_file_order(source, toy, tmp_path):
    if source == "resnet20":
        arch = RESNET20
    else:
        (tmp_path / "stem_last.py").write_text(STEM_LAST)
        arch = f"{tmp_path / 'stem_last.py'}:build"
    files = three_files(tmp_path, seeded_state(arch, 5, 3))
    results = [outputs_of(f, toy[3], arch) for f in files]
    for got in results:
        assert got[1:3] == (5, 3)
        assert torch.equal(got[4], results[0][4])


def test_guesses_without_an_architecture_do_not_depend_on_file_order(tmp_path):
    (tmp_path / "stem_last.py").write_text(STEM_LAST)
    state = build_model(f"{tmp_path / 'stem_last.py'}:build", 7, 1).state_dict()
    names = list(state)
    guesses = set()
    for seed in range(6):
        random.Random(seed).shuffle(names)
        guesses.add(tuple(vars(guess_architecture({k: state[k] for k in names})).values()))
    assert len(guesses) == 1
    assert guesses.pop() == (None, 7, 1, "a_head")


def test_cli_evaluates_a_sorted_order_safetensors_of_a_foreign_model(tmp_path):
    """Failed before: the class count and channels were read from the first/last tensors in the
    file, so safetensors' sorted order gave '16-channel images' and a 16-class head."""
    (tmp_path / "stem_last.py").write_text(STEM_LAST)
    arch = f"{tmp_path / 'stem_last.py'}:build"
    data = make_npz_dataset(tmp_path / "data", classes=3, size=12, n_train=30, n_test=30)
    outputs = []
    for path in three_files(tmp_path, seeded_state(arch, 3, 3)):
        result = CliRunner().invoke(
            app, ["evaluate", str(path), "--arch", arch, "--data", str(data), "--device", "cpu", "--json", "--quiet"]
        )
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        assert report["checkpoint"]["num_classes"] == 3 and report["checkpoint"]["in_channels"] == 3
        assert report["checkpoint"]["resolved_from"]["num_classes"] == "weights"
        outputs.append(report["metrics"]["clean_acc"])
    assert outputs[0] == outputs[1] == outputs[2]


def test_cli_names_the_tensor_a_wrong_class_count_was_read_from(tmp_path):
    (tmp_path / "stem_last.py").write_text(STEM_LAST)
    arch = f"{tmp_path / 'stem_last.py'}:build"
    data = make_npz_dataset(tmp_path / "data", classes=3, size=12, n_train=30, n_test=30)
    path = three_files(tmp_path, seeded_state(arch, 4, 3))[2]
    result = CliRunner().invoke(app, ["evaluate", str(path), "--arch", arch, "--data", str(data), "--device", "cpu"])
    assert result.exit_code == 2
    assert "4 classes but the data has 3 (from the checkpoint's a_head.weight)" in result.output
