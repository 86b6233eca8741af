"""models.py: the architecture registry, key compatibility, head detection, strict loading,
architecture guessing, user factory files, and the ResNet-20 example on real CIFAR-10."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from backdoor_cli.errors import InputError
from backdoor_cli.models import ARCHITECTURES, ArchGuess, build_model, find_head, guess_architecture, load_strict

REPO = Path(__file__).resolve().parents[1]
RESNET20 = f"{REPO / 'examples' / 'models' / 'resnet20.py'}:resnet20"
HEADS = {
    "resnet18": "linear",
    "resnet20": "linear",
    "resnet32": "linear",
    "resnet44": "linear",
    "resnet56": "linear",
    "preactresnet18": "linear",
    "vgg16_bn": "classifier",
    "simple_cnn": "fc",
    "simple_cnn_half": "fc",
    "test_tiny": "fc",
}
SMALL = ("simple_cnn", "simple_cnn_half", "test_tiny")
BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def meta_state(arch: str, num_classes: int, in_channels: int = 3) -> dict[str, torch.Tensor]:
    """A state_dict with the right keys and shapes but no memory (guessing only reads shapes)."""
    with torch.device("meta"):
        return build_model(arch, num_classes, in_channels).state_dict()


# ----------------------------------------------------------------------------- building


def test_registry_holds_the_documented_names():
    assert set(ARCHITECTURES) == set(HEADS)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_each_architecture_runs_on_rgb_32(arch):
    torch.manual_seed(0)
    model = build_model(arch, 10, 3).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


@pytest.mark.parametrize("arch", SMALL)
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (3, 12, 12), (3, 40, 24)])
def test_small_architectures_take_any_image_size(arch, shape):
    model = build_model(arch, 7, shape[0])
    out = model(torch.randn(4, *shape))  # train mode too: BN needs > 1 value per channel, 4 images suffice
    out.sum().backward()
    assert out.shape == (4, 7)


def test_vgg_takes_28x28_grayscale():
    # Five 2x2 pools would shrink 28 -> 0 without ceil_mode.
    model = build_model("vgg16_bn", 10, 1).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_simple_cnn_is_small_and_has_one_linear_head():
    model = build_model("simple_cnn", 10)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert [n for n, _ in linears] == ["fc"] and linears[0][1].weight.shape == (10, 128)
    assert 150_000 < sum(p.numel() for p in model.parameters()) < 300_000


def test_resnet18_keys_match_the_fst_reference_layout():
    expected = {
        "conv1.weight": (64, 3, 3, 3),
        **{f"bn1.{k}": None for k in BN},
        "linear.weight": (10, 512),
        "linear.bias": (10,),
    }
    in_planes = 64
    for stage, width in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            prefix = f"layer{stage}.{block}"
            expected[f"{prefix}.conv1.weight"] = (width, in_planes, 3, 3)
            expected[f"{prefix}.conv2.weight"] = (width, width, 3, 3)
            expected.update({f"{prefix}.bn{i}.{k}": None for i in (1, 2) for k in BN})
            if in_planes != width:
                expected[f"{prefix}.shortcut.0.weight"] = (width, in_planes, 1, 1)
                expected.update({f"{prefix}.shortcut.1.{k}": None for k in BN})
            in_planes = width
    state = meta_state("resnet18", 10)
    assert set(state) == set(expected)
    assert all(tuple(state[k].shape) == s for k, s in expected.items() if s is not None)


def test_preactresnet18_keys_match_backdoorbench_layout():
    # BackdoorBench's PreActResNet18: no stem BN, no final BN, bias-free 1x1 conv shortcut only.
    expected = {"conv1.weight": (64, 3, 3, 3), "linear.weight": (10, 512), "linear.bias": (10,)}
    in_planes = 64
    for stage, width in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            prefix = f"layer{stage}.{block}"
            expected.update({f"{prefix}.bn1.{k}": None for k in BN})
            expected.update({f"{prefix}.bn2.{k}": None for k in BN})
            expected[f"{prefix}.conv1.weight"] = (width, in_planes, 3, 3)
            expected[f"{prefix}.conv2.weight"] = (width, width, 3, 3)
            if in_planes != width:
                expected[f"{prefix}.shortcut.0.weight"] = (width, in_planes, 1, 1)
            in_planes = width
    state = meta_state("preactresnet18", 10)
    assert set(state) == set(expected)
    assert all(tuple(state[k].shape) == s for k, s in expected.items() if s is not None)
    assert state["layer1.0.bn1.weight"].shape == (64,) and state["layer2.0.bn1.weight"].shape == (64,)


def test_vgg16_bn_keys_follow_the_common_cifar_layout():
    state = meta_state("vgg16_bn", 10)
    convs = sorted({int(k.split(".")[1]) for k, v in state.items() if k.startswith("features.") and v.dim() == 4})
    assert convs == [0, 3, 7, 10, 14, 17, 20, 24, 27, 30, 34, 37, 40]
    assert state["features.0.bias"].shape == (64,) and state["features.1.running_var"].shape == (64,)
    assert state["features.40.weight"].shape == (512, 512, 3, 3)
    assert state["classifier.weight"].shape == (10, 512)
    assert len(state) == 13 * 2 + 13 * 5 + 2


def test_build_model_rejects_unknown_names_and_bad_sizes():
    with pytest.raises(InputError, match="unknown architecture 'resnet99'") as err:
        build_model("resnet99", 10)
    assert "resnet18" in err.value.hint and "torchvision:NAME" in err.value.hint
    for bad in (0, -1, 2.5, True, "10"):
        with pytest.raises(InputError, match="positive integer"):
            build_model("test_tiny", bad)
    with pytest.raises(InputError, match="input channels"):
        build_model("test_tiny", 3, 0)
    with pytest.raises(InputError, match="factory"):
        build_model("mynet.py", 10)


def test_torchvision_unusable_is_a_clear_input_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # makes `import torchvision` raise ImportError
    with pytest.raises(InputError, match="torchvision is not usable here") as err:
        build_model("torchvision:resnet18", 10)
    assert "built-in" in err.value.hint
    with pytest.raises(InputError, match="needs a model name"):
        build_model("torchvision:", 10)
    with pytest.raises(InputError, match="3-channel"):
        build_model("torchvision:resnet18", 10, 1)


def test_torchvision_models_are_built_without_weights(monkeypatch):
    calls = []

    def get_model(name, **kwargs):
        calls.append((name, kwargs))
        if name != "resnet18":
            raise ValueError(f"Unknown model {name}")
        return nn.Linear(2, kwargs["num_classes"])

    fake = types.ModuleType("torchvision")
    fake.models = types.SimpleNamespace(get_model=get_model, list_models=lambda: ["resnet18", "vgg11"])
    monkeypatch.setitem(sys.modules, "torchvision", fake)
    assert isinstance(build_model("torchvision:resnet18", 5), nn.Linear)
    assert calls == [("resnet18", {"num_classes": 5, "weights": None})]
    with pytest.raises(InputError, match="cannot build 'nope'") as err:
        build_model("torchvision:nope", 5)
    assert "resnet18" in err.value.hint


# ----------------------------------------------------------------------------- user files


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_factory_file_with_and_without_in_channels(tmp_path):
    plain = write(
        tmp_path / "plain.py",
        "import torch.nn as nn\n"
        "def build(num_classes):\n    return nn.Sequential(nn.Flatten(), nn.Linear(12, num_classes))\n",
    )
    model = build_model(f"{plain}:build", 4, 1)
    assert model[1].out_features == 4
    chans = write(
        tmp_path / "chans.py",
        "import torch.nn as nn\nSEEN = []\n"
        "def build(num_classes, in_channels=3):\n    SEEN.append(in_channels)\n"
        "    return nn.Conv2d(in_channels, num_classes, 1)\n",
    )
    model = build_model(f"{chans}:build", 6, 2)
    assert model.in_channels == 2 and model.out_channels == 6
    kwargs = write(
        tmp_path / "kw.py",
        "import torch.nn as nn\ndef build(**kw):\n    return nn.Conv2d(kw['in_channels'], kw['num_classes'], 1)\n",
    )
    assert build_model(f"{kwargs}:build", 3, 5).in_channels == 5


def test_two_files_with_the_same_name_do_not_collide(tmp_path):
    for sub, classes in (("a", 2), ("b", 3)):
        (tmp_path / sub).mkdir()
        write(
            tmp_path / sub / "net.py",
            f"import torch.nn as nn\ndef build(num_classes):\n    return nn.Linear(1, {classes})\n",
        )
    assert build_model(f"{tmp_path / 'a' / 'net.py'}:build", 9).out_features == 2
    assert build_model(f"{tmp_path / 'b' / 'net.py'}:build", 9).out_features == 3


@pytest.mark.parametrize(
    "source, factory, words",
    [
        (None, "build", ["not found"]),
        (
            "import torch.nn as nn\ndef other(num_classes):\n    return nn.Linear(1, 1)\n",
            "build",
            ["no function 'build'"],
        ),
        ("def build(num_classes:\n", "build", ["importing", "SyntaxError"]),
        ("raise RuntimeError('boom at import')\n", "build", ["importing", "boom at import"]),
        (
            "def build(num_classes):\n    raise ValueError('bad width')\n",
            "build",
            ["failed", "ValueError", "bad width"],
        ),
        ("def build():\n    return None\n", "build", ["failed", "TypeError"]),
        ("def build(num_classes):\n    return 42\n", "build", ["returned int", "nn.Module"]),
        ("build = 3\n", "build", ["not callable"]),
        ("def build(num_classes):\n    pass\n", "not-a-name", ["not a Python function name"]),
    ],
)
def test_factory_file_errors_name_the_file(tmp_path, source, factory, words):
    path = tmp_path / "user_net.py"
    if source is not None:
        path.write_text(source)
    with pytest.raises(InputError) as err:
        build_model(f"{path}:{factory}", 10)
    message = str(err.value)
    assert "user_net.py" in message
    for word in words:
        assert word in message
    assert "\n" not in err.value.message


def test_missing_factory_hint_lists_the_functions(tmp_path):
    path = write(
        tmp_path / "nets.py", "import torch\ndef small(num_classes):\n    pass\ndef large(num_classes):\n    pass\n"
    )
    with pytest.raises(InputError) as err:
        build_model(f"{path}:medium", 10)
    assert err.value.hint == "functions defined there: large, small"


def test_directory_is_not_an_architecture_file(tmp_path):
    (tmp_path / "pkg.py").mkdir()
    with pytest.raises(InputError, match="is a directory"):
        build_model(f"{tmp_path / 'pkg.py'}:build", 10)


# ----------------------------------------------------------------------------- head


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_find_head_of_each_architecture(arch):
    model = build_model(arch, 10, 3)
    assert find_head(model) == HEADS[arch]
    assert model.training  # the dummy pass ran in eval mode and the mode was put back


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_builtin_definition_order_gives_the_forward_order_head_and_stem(arch):
    """read_shape_facts reads a built-in's head and stem in definition order, without a forward pass
    (on a GPU run that pass would be CPU work done only for this): that order must name the same
    head (last nn.Linear) and stem (first convolution) as a forward pass does."""
    from backdoor_cli.models.head import modules_in_forward_order
    from backdoor_cli.models.shapes import read_shape_facts

    model = build_model(arch, 10, 3)
    modules = dict(model.named_modules())
    called = modules_in_forward_order(model, (3, 32, 32))
    head = [n for n in called if isinstance(modules[n], nn.Linear)][-1]
    stem = next(n for n in called if isinstance(modules[n], nn.modules.conv._ConvNd))
    facts = read_shape_facts(arch, model.state_dict(), (3, 32, 32), 10, model=model)
    assert (facts.head, facts.stem) == (head, stem) == (HEADS[arch], facts.stem)
    assert (facts.num_classes, facts.in_channels) == (10, 3)


class HeadFirst(nn.Module):
    """Defines its head before an inner projection: definition order would pick the wrong Linear."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(8, 3)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Dropout(0.5))

    def forward(self, x):
        return self.head(self.body(x))


def test_find_head_follows_forward_order_and_restores_state():
    model = HeadFirst()
    model.body[3].eval()  # mixed modes must come back exactly
    assert find_head(model, input_shape=(3, 2, 2)) == "head"
    assert model.training and not model.body[3].training and model.body[1].training
    assert not any(m._forward_hooks for m in model.modules())


def test_find_head_falls_back_to_definition_order_when_forward_fails():
    model = HeadFirst()
    assert find_head(model, input_shape=(3, 5, 5)) == "body.1"  # 75 features do not fit Linear(12, 8)
    assert not any(m._forward_hooks for m in model.modules())


def test_find_head_works_on_the_models_dtype():
    model = build_model("test_tiny", 3).double()
    assert find_head(model, input_shape=(3, 8, 8)) == "fc"


def test_find_head_override_and_its_errors():
    model = HeadFirst()
    assert find_head(model, "body.1") == "body.1"
    with pytest.raises(InputError, match="'nope' .* not a module") as err:
        find_head(model, "nope")
    assert "head" in err.value.hint and "body.1" in err.value.hint
    with pytest.raises(InputError, match="is a ReLU, not an nn.Linear"):
        find_head(model, "body.2")
    with pytest.raises(InputError, match="no nn.Linear"):
        find_head(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()))


# ----------------------------------------------------------------------------- strict loading


def tiny_pair(num_classes: int = 3) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    source = build_model("test_tiny", num_classes)
    return build_model("test_tiny", num_classes), {k: v.clone() for k, v in source.state_dict().items()}


def test_load_strict_loads_everything():
    model, state = tiny_pair()
    load_strict(model, state)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_load_strict_ignores_batchnorm_counters_either_way():
    model, state = tiny_pair()
    load_strict(model, {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")})
    assert torch.equal(model.fc.weight, state["fc.weight"])
    load_strict(model, {**state, "extra_bn.num_batches_tracked": torch.tensor(3)})
    load_strict(model, {**state, "bn.num_batches_tracked": torch.tensor([1.5, 2.0])})  # malformed: kept as is


def test_load_strict_casts_half_precision_weights():
    model, state = tiny_pair()
    load_strict(model, {k: (v.half() if v.is_floating_point() else v) for k, v in state.items()})
    assert model.fc.weight.dtype == torch.float32
    assert torch.allclose(model.fc.weight, state["fc.weight"], atol=1e-3)


def test_load_strict_lists_missing_unexpected_and_reshaped_keys():
    model, state = tiny_pair()
    state.pop("fc.bias")
    state["extra.weight"] = torch.zeros(2)
    state["fc.weight"] = state["fc.weight"].reshape(-1, 1)
    with pytest.raises(InputError) as err:
        load_strict(model, state)
    message = err.value.message
    assert "missing 1: fc.bias" in message
    assert "unexpected 1: extra.weight" in message
    assert "wrong shape 1: fc.weight: model (3, 4) vs checkpoint (12, 1)" in message
    assert "\n" not in message and "--arch" in err.value.hint and "--num-classes" in err.value.hint


def test_load_strict_abbreviates_long_lists():
    model = build_model("simple_cnn", 10)
    with pytest.raises(InputError) as err:
        load_strict(model, build_model("test_tiny", 10).state_dict())
    message = err.value.message
    missing = sum(1 for k in model.state_dict() if not k.endswith("num_batches_tracked")) - 2  # fc.* shared
    assert f"missing {missing}: " in message and f"(+{missing - 5} more)" in message
    assert "unexpected 6: conv.weight" in message
    assert "wrong shape 1: fc.weight: model (10, 128) vs checkpoint (10, 4)" in message


def test_load_strict_refuses_integer_weights():
    model, state = tiny_pair()
    state["fc.weight"] = torch.ones_like(state["fc.weight"], dtype=torch.int64)
    with pytest.raises(InputError, match=r"wrong dtype 1: fc.weight \(int64 where the model has float32\)"):
        load_strict(model, state)


def test_load_strict_wrong_class_count():
    model = build_model("test_tiny", 10)
    with pytest.raises(InputError, match=r"fc.weight: model \(10, 4\) vs checkpoint \(3, 4\)"):
        load_strict(model, tiny_pair(3)[1])


# ----------------------------------------------------------------------------- guessing


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
@pytest.mark.parametrize("num_classes, in_channels", [(10, 3), (43, 1)])
def test_guess_architecture_round_trip(arch, num_classes, in_channels):
    state = meta_state(arch, num_classes, in_channels)
    assert guess_architecture(state) == ArchGuess(arch, num_classes, in_channels, HEADS[arch])
    # Old checkpoints without BN counters and alphabetically ordered keys (safetensors) still match.
    legacy = {k: state[k] for k in sorted(state) if not k.endswith("num_batches_tracked")}
    assert guess_architecture(legacy) == ArchGuess(arch, num_classes, in_channels, HEADS[arch])


def test_guess_architecture_of_a_real_tiny_checkpoint():
    state = build_model("test_tiny", 5, 1).state_dict()
    assert guess_architecture(state) == ArchGuess("test_tiny", 5, 1, "fc")


def test_guess_architecture_names_nothing_unless_everything_matches():
    state = {"extra.weight": torch.empty(3, 3, device="meta"), **meta_state("resnet18", 10)}
    guess = guess_architecture(state)
    assert guess.arch is None and guess.num_classes == 10 and guess.in_channels == 3 and guess.head == "linear"
    state = dict(meta_state("preactresnet18", 10))
    state["layer4.1.conv2.weight"] = torch.empty(512, 512, 1, 1, device="meta")  # same keys, one shape differs
    assert guess_architecture(state).arch is None


def test_guess_architecture_of_a_foreign_layout():
    state = build_model(RESNET20, 10).state_dict()  # (not on meta: its kaiming init is slow to set up there)
    # The example file is key-compatible with the built-in resnet20, so it is named.
    assert guess_architecture(state) == ArchGuess("resnet20", 10, 3, "linear")
    del state["linear.bias"]  # no longer any built-in: the sizes are still read from names and shapes
    assert guess_architecture(state) == ArchGuess(None, 10, 3, "linear")


@pytest.mark.parametrize(
    "state",
    [
        {},
        {"w": torch.zeros(())},
        {"a.weight": torch.zeros(0, 3), "b.weight": torch.zeros(2, 0, 3, 3)},
        {"fc.weight": torch.empty(2**40, 4, device="meta"), "conv.weight": torch.empty(4, 2**33, 3, 3, device="meta")},
    ],
)
def test_guess_architecture_survives_odd_state_dicts(state):
    guess = guess_architecture(state)
    assert guess.arch is None
    assert guess.num_classes is None and guess.in_channels is None and guess.head is None


# ----------------------------------------------------------------------------- ResNet-20 example (real data)


def resnet20_state(shared_dir: Path) -> dict[str, torch.Tensor]:
    checkpoint = torch.load(shared_dir / "checkpoints" / "resnet20-12fca82f.th", weights_only=True, map_location="cpu")
    return {k.removeprefix("module."): v for k, v in checkpoint["state_dict"].items()}


def test_resnet20_example_loads_the_shared_checkpoint_strictly(shared_dir):
    state = resnet20_state(shared_dir)
    model = build_model(RESNET20, 10)
    assert set(model.state_dict()) - set(state) == {k for k in model.state_dict() if "num_batches" in k}
    load_strict(model, state)
    assert find_head(model) == "linear"
    assert guess_architecture(state) == ArchGuess("resnet20", 10, 3, "linear")
    assert sum(p.numel() for p in model.parameters()) == 269_722


@pytest.mark.slow  # 9 s on an idle 2-core CPU, but 40 s when the machine is shared
def test_resnet20_example_scores_its_published_accuracy(shared_dir):
    import numpy as np

    model = build_model(RESNET20, 10)
    load_strict(model, resnet20_state(shared_dir))
    model.eval()
    with np.load(shared_dir / "cifar10" / "test.npz", allow_pickle=False) as f:
        x, y = torch.from_numpy(f["x"]), torch.from_numpy(f["y"].astype(np.int64))
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(y), 250):
            batch = (x[i : i + 250].permute(0, 3, 1, 2).float() / 255 - mean) / std
            correct += int((model(batch).argmax(1) == y[i : i + 250]).sum())
    assert correct == 9173  # 91.73%, the accuracy akamaster/pytorch_resnet_cifar10 publishes
