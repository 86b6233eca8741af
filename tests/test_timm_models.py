"""timm model directories: inspect/evaluate/purify/compare through the CLI, predictions equal to timm's
own forward, and the purified copy readable by timm.

Tiny randomly initialised timm test models (test_vit, test_efficientnet, test_convnext) are built
offline and saved with timm's own save_for_hf, so config.json is exactly what timm writes
(architecture, num_classes, model_args, pretrained_cfg). timm needs a torchvision that imports beside
the installed torch; where it does not (CPU-only torch 2.13 with PyPI's torchvision) the file is
skipped: `make test-timm` runs it in an environment where it does."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from backdoor_cli.cli import app
from backdoor_cli.data.datasets import load_dataset, normalize
from backdoor_cli.subject import load_subject
from helpers import bdclean_logits, check_compare_of_purified_dir, make_npz_dataset


def _import_timm():
    # A broken torchvision raises RuntimeError, not ImportError, which importorskip would not catch.
    try:
        return pytest.importorskip("timm", reason="timm is not installed (bdclean[timm]); run `make test-timm`")
    except (RuntimeError, AttributeError, OSError) as exc:
        pytest.skip(
            f"timm cannot be imported here ({exc.__class__.__name__}: {str(exc)[:80]}); run `make test-timm`",
            allow_module_level=True,
        )


timm = _import_timm()
from timm.models._hub import save_for_hf  # noqa: E402 - only importable once timm is

runner = CliRunner()
SIZE = 32  # the timm test models default to 160 px; 32 px keeps the toy data and tuning fast
CLASSES = 3
# name -> (timm architecture, create_model arguments). ViT's position embedding fixes its input size,
# so it gets img_size; the CNNs take any size, and only their saved pretrained_cfg says 32 px.
ARCHS = {
    "vit": ("test_vit", {"img_size": SIZE}),
    "efficientnet": ("test_efficientnet", {}),
    "convnext": ("test_convnext", {}),
}


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def _spread(model):
    """A head of unit scale, so the untrained models' predictions differ between images (timm's small
    head init gives every image nearly the same logits, which would make equal argmaxes trivial)."""
    torch.nn.init.normal_(model.get_classifier().weight)
    return model


def _save(arch: str, kwargs: dict, directory: Path, safetensors: bool = True) -> Path:
    model = _spread(timm.create_model(arch, pretrained=False, num_classes=CLASSES, **kwargs))
    # data_config: the exported pretrained_cfg then names the size the model is fed, as a user exporting
    # a model fine-tuned at 32 px would record it (without it timm keeps the 160 px of the source config).
    _save_sized(model, directory, safetensors)
    return directory


def _save_sized(model, directory: Path, safetensors: bool) -> None:
    """save_for_hf with the 32 px input size in the exported pretrained_cfg. timm releases before
    `data_config` existed (e.g. 1.0.x, as on the GPU machine) get the same field written into the
    config.json that timm itself produced, so every supported timm yields the same file."""
    if "data_config" in inspect.signature(save_for_hf).parameters:
        save_for_hf(model, directory, safe_serialization=safetensors, data_config={"input_size": (3, SIZE, SIZE)})
        return
    save_for_hf(model, directory, safe_serialization=safetensors)
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    config.setdefault("pretrained_cfg", {})["input_size"] = [3, SIZE, SIZE]
    config_path.write_text(json.dumps(config, indent=2))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("timm")
    torch.manual_seed(0)
    dirs = {name: _save(arch, kwargs, root / name) for name, (arch, kwargs) in ARCHS.items()}
    dirs["vit_bin"] = _save(*ARCHS["vit"], root / "vit_bin", safetensors=False)
    return {
        "root": root,
        "data": make_npz_dataset(root / "data", classes=CLASSES, size=SIZE, n_train=120, n_test=60),
        **dirs,
    }


@pytest.fixture(scope="module")
def purified(models):
    """purify's --out for a model name, run once per name (the ViT, and the BatchNorm EfficientNet whose
    running statistics and num_batches_tracked buffers must reach the written directory too)."""
    done = {}

    def run(name: str) -> dict:
        if name not in done:
            out = models["root"] / f"out-{name}"
            result = invoke(
                "purify",
                models[name],
                "--data",
                models["data"],
                "--out",
                out,
                "--epochs",
                "1",
                "--device",
                "cpu",
                "--quiet",
                "--json",
                # a random model has no flagged class, and the default then tunes nothing: unlearn anyway
                "--precaution",
            )
            assert result.exit_code == 0, result.output
            done[name] = {"out": out, "report": json.loads(result.stdout)}
        return done[name]

    return run


def _test_images(data) -> torch.Tensor:
    return load_dataset(str(data), None, need_train=False).test.x


def _timm_model(path):
    """The directory as timm itself reads it: config.json's model_args and pretrained_cfg, then the weights."""
    return timm.create_model(f"local-dir:{path}", pretrained=True).eval()


def _timm_logits(path, data) -> torch.Tensor:
    """timm's own model and forward, fed as its pretrained_cfg says (mean/std of [0, 1] pixels)."""
    model = _timm_model(path)
    cfg, shape = model.pretrained_cfg, (1, 3, 1, 1)
    assert tuple(cfg["input_size"]) == (3, SIZE, SIZE)
    with torch.no_grad():
        return model(
            normalize(_test_images(data), torch.tensor(cfg["mean"]).view(shape), torch.tensor(cfg["std"]).view(shape))
        )


@pytest.mark.parametrize("name", ["vit", "efficientnet", "convnext", "vit_bin"])
def test_predictions_equal_timms_own_forward(models, name):
    bundle = load_dataset(str(models["data"]), None, need_train=False)
    subject = load_subject(str(models[name]), bundle)
    cfg = json.loads((models[name] / "config.json").read_text())["pretrained_cfg"]
    assert subject.mean == pytest.approx(tuple(cfg["mean"])) and subject.std == pytest.approx(tuple(cfg["std"]))
    assert subject.head == cfg["classifier"] and subject.sources["mean"] == "pretrained_cfg"
    ours, theirs = bdclean_logits(models[name], models["data"]), _timm_logits(models[name], models["data"])
    assert torch.equal(ours.argmax(1), theirs.argmax(1)) and len(ours.argmax(1).unique()) > 1
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert subject.describe()["hub"] == f"timm {ARCHS[name.removesuffix('_bin')][0]}, from config.json"


def test_inspect_timm_dir_table_and_json(models):
    result = invoke("inspect", models["convnext"])
    assert result.exit_code == 0, result.output
    assert "test_convnext" in result.output and "model.safetensors" in result.output
    info = json.loads(invoke("inspect", models["vit_bin"], "--json").stdout)
    assert info["hub"] == "timm test_vit, from config.json" and info["format"] == "torch-zip"
    assert info["guess"] == {
        "arch": "timm:test_vit",
        "arch_from": "config.json",
        "num_classes": CLASSES,
        "in_channels": 3,
        "head": "head",
    }


def test_evaluate_cli_reports_timms_accuracy(models):
    result = invoke(
        "evaluate", models["efficientnet"], "--data", models["data"], "--device", "cpu", "--json", "--quiet"
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    labels = load_dataset(str(models["data"]), None, need_train=False).test.y
    correct = int((_timm_logits(models["efficientnet"], models["data"]).argmax(1) == labels).sum())
    assert report["metrics"]["clean_acc"]["k"] == correct
    assert report["checkpoint"]["hub"] == "timm test_efficientnet, from config.json"
    assert report["checkpoint"]["resolved_from"]["mean"] == "pretrained_cfg"


@pytest.mark.parametrize("name", ["vit", "efficientnet"])
def test_purified_dir_loads_in_timm_with_purified_safetensors_predictions(models, purified, name):
    from safetensors.torch import load_file

    run = purified(name)
    out = run["out"]
    assert {p.name for p in (out / "purified-hf").iterdir()} == {"config.json", "model.safetensors"}
    assert {"purified-hf/config.json", "purified-hf/model.safetensors"} <= set(run["report"]["outputs"])
    assert json.loads((out / "purified-hf" / "config.json").read_text()) == json.loads(
        (models[name] / "config.json").read_text()
    )
    theirs = _timm_logits(out / "purified-hf", models["data"])
    ours = bdclean_logits(out / "purified.safetensors", models["data"])
    assert torch.equal(ours.argmax(1), theirs.argmax(1)) and torch.allclose(ours, theirs, atol=1e-5)
    assert not torch.allclose(bdclean_logits(models[name], models["data"]), ours)  # it was tuned
    assert set(load_file(out / "purified-hf" / "model.safetensors")) == set(_timm_model(models[name]).state_dict())


def test_a_converted_timm_dir_is_one_file_with_timms_predictions(models, tmp_path):
    """`bdclean convert` of a hub directory: one .safetensors carrying the hub configuration, read back by the
    same loader, with timm's own predictions (a random model is at chance: --min-acc 0 writes it anyway)."""
    out = tmp_path / "vit.safetensors"
    args = ("--data", models["data"], "--out", out, "--device", "cpu", "--quiet", "--json")
    result = invoke("convert", models["vit"], *args, "--min-acc", "0")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["written"] and report["round_trip"]["logits_equal"] and report["checkpoint"]["hub"]
    ours, theirs = bdclean_logits(out, models["data"]), _timm_logits(models["vit"], models["data"])
    assert torch.equal(ours.argmax(1), theirs.argmax(1)) and torch.allclose(ours, theirs, atol=1e-5)


def test_compare_timm_dirs_and_purified_file(models, purified):
    check_compare_of_purified_dir(models["vit"], purified("vit")["out"], models["data"], "timm:test_vit")


def test_model_args_num_classes_must_agree(models):
    """save_for_hf repeats num_classes in model_args; bdclean accepts it only when it agrees."""
    from backdoor_cli.errors import InputError
    from backdoor_cli.models.hub_config import parse_config

    config = json.loads((models["vit"] / "config.json").read_text())
    assert config["model_args"]["num_classes"] == CLASSES and parse_config(config, "c") == ("timm", "test_vit")
    with pytest.raises(InputError, match="model_args.num_classes 5 contradicts num_classes 3"):
        parse_config({**config, "model_args": {**config["model_args"], "num_classes": 5}}, "c")


def test_export_without_data_config_names_both_sizes(models, tmp_path):
    """Saved without data_config, a 32 px ViT's config keeps the source's 160 px pretrained_cfg: no data fits
    it, and the error names both sizes instead of sending the user from one refusal to the other."""
    directory = tmp_path / "vit160"
    save_for_hf(timm.create_model("test_vit", num_classes=CLASSES, img_size=SIZE), directory, safe_serialization=True)
    result = invoke("evaluate", directory, "--data", models["data"], "--device", "cpu", "--quiet")
    assert result.exit_code == 2, result.output
    assert "160x160 (pretrained_cfg input_size) but 32x32 (model_args img_size)" in result.output
    assert "data_config" in result.output
