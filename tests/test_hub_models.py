"""Hugging Face (transformers) and timm model directories: inspect/evaluate/purify/compare through the CLI,
predictions equal to the library's own forward, the purified copy in the library's layout, and every
refusal of an untrusted directory with its exit code.

Tiny randomly initialised models are built offline and saved with the library's own save_pretrained;
the toy images are 16x16 so the models' configured input size matches the data."""

from __future__ import annotations

import copy
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from backdoor_cli.cli import app
from backdoor_cli.data.datasets import load_dataset, normalize
from backdoor_cli.errors import InputError
from backdoor_cli.models import hub, hub_config
from backdoor_cli.subject import load_subject
from helpers import bdclean_logits, check_compare_of_purified_dir, make_npz_dataset

transformers = pytest.importorskip("transformers", reason="the hf extra (pip install -e '.[hf]') is not installed")
runner = CliRunner()
SIZE = 16
PREPROCESSOR = {
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.5, 0.4, 0.3],
    "image_processor_type": "ViTImageProcessor",
    "image_std": [0.25, 0.2, 0.3],
    "resample": 2,
    "rescale_factor": 1 / 255,
    "size": {"height": SIZE, "width": SIZE},
}


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def _vit(classes: int = 3):
    config = transformers.ViTConfig(
        image_size=SIZE,
        patch_size=4,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=classes,
    )
    return transformers.AutoModelForImageClassification.from_config(config)


def _resnet(classes: int = 3):
    config = transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=classes
    )
    return transformers.AutoModelForImageClassification.from_config(config)


def _spread(model):
    """A random head of unit scale, so the untrained models' predictions differ between images
    (with transformers' 0.02-scale init every image gets the same class, which would make equal argmaxes trivial)."""
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    torch.nn.init.normal_(head.weight)
    return model


def _save(model, directory: Path, preprocessor: dict | None = None, safetensors: bool = True) -> Path:
    model.save_pretrained(directory, safe_serialization=safetensors)
    if not safetensors and not (directory / "pytorch_model.bin").exists():
        # transformers 5 writes safetensors even when asked for pytorch_model.bin; write the .bin as
        # transformers 4 did (a torch.save'd state_dict), which is what older hub repositories hold.
        (directory / "model.safetensors").unlink()
        torch.save(model.state_dict(), directory / "pytorch_model.bin")
    if preprocessor is not None:
        (directory / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return directory


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    torch.manual_seed(0)
    dirs = {
        "vit": _save(_spread(_vit()), root / "vit", PREPROCESSOR),
        "resnet": _save(_spread(_resnet()), root / "resnet"),
        "resnet_bin": _save(_spread(_resnet()), root / "resnet_bin", safetensors=False),
    }
    return {"root": root, "data": make_npz_dataset(root / "data", size=SIZE), **dirs}


@pytest.fixture(scope="module")
def purified(models):
    out = models["root"] / "out"
    result = invoke(
        "purify",
        models["vit"],
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
        # a random model has no flagged class, and the default then tunes nothing: unlearn its smallest mask anyway
        "--precaution",
    )
    assert result.exit_code == 0, result.output
    return {"out": out, "report": json.loads(result.stdout)}


def _library_logits(path, data, mean, std) -> torch.Tensor:
    """The library's own model and forward on the same images, normalised as its preprocessor says."""
    model = transformers.AutoModelForImageClassification.from_pretrained(str(path)).eval()
    x = load_dataset(str(data), None, need_train=False).test.x
    shape = (1, 3, 1, 1)
    with torch.no_grad():
        return model(pixel_values=normalize(x, torch.tensor(mean).view(shape), torch.tensor(std).view(shape))).logits


@pytest.mark.parametrize("name", ["vit", "resnet", "resnet_bin"])
def test_predictions_equal_the_librarys_own_forward(models, name):
    bundle = load_dataset(str(models["data"]), None, need_train=False)
    subject = load_subject(str(models[name]), bundle)
    mean, std = (PREPROCESSOR["image_mean"], PREPROCESSOR["image_std"]) if name == "vit" else (bundle.mean, bundle.std)
    assert subject.mean == pytest.approx(tuple(mean)) and subject.std == pytest.approx(tuple(std))
    ours, theirs = (
        bdclean_logits(models[name], models["data"]),
        _library_logits(models[name], models["data"], mean, std),
    )
    assert torch.equal(ours.argmax(1), theirs.argmax(1)) and len(ours.argmax(1).unique()) > 1
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert subject.describe()["hub"].startswith(f"transformers {type(subject.model).__name__}")
    assert subject.head == ("classifier" if name == "vit" else "classifier.1")


def test_model_keeps_file_keys_and_survives_deepcopy_and_pickle(models):
    from safetensors.torch import load_file

    bundle = load_dataset(str(models["data"]), None, need_train=False)
    model = load_subject(str(models["vit"]), bundle).model
    file_keys = set(load_file(models["vit"] / "model.safetensors"))
    assert set(model.state_dict()) == file_keys  # transformers 5 renames ViT weights in memory; bdclean does not
    x = torch.randn(2, 3, SIZE, SIZE)
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert torch.equal(twin(x), model(x)) and set(twin.state_dict()) == file_keys
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.classifier.weight.add_(1.0)  # the copy's forward must use the copy's weights
    assert not torch.equal(twin(x), model(x))


def test_inspect_model_dir_table_and_json(models):
    result = invoke("inspect", models["vit"])
    assert result.exit_code == 0, result.output
    assert "ViTForImageClassification" in result.output and "model.safetensors" in result.output
    info = json.loads(invoke("inspect", models["resnet_bin"], "--json").stdout)
    assert info["hub"].startswith("transformers ResNetForImageClassification (model_type resnet)")
    assert info["format"] == "torch-zip" and info["path"] == str(models["resnet_bin"])
    assert info["guess"] == {
        "arch": "transformers:ResNetForImageClassification",
        "arch_from": "config.json",
        "num_classes": 3,
        "in_channels": 3,
        "head": "classifier.1",
    }


def test_evaluate_cli_reports_the_librarys_accuracy(models):
    result = invoke("evaluate", models["vit"], "--data", models["data"], "--device", "cpu", "--json", "--quiet")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    logits = _library_logits(models["vit"], models["data"], PREPROCESSOR["image_mean"], PREPROCESSOR["image_std"])
    labels = load_dataset(str(models["data"]), None, need_train=False).test.y
    assert report["metrics"]["clean_acc"]["k"] == int((logits.argmax(1) == labels).sum())
    assert report["checkpoint"]["hub"] == "transformers ViTForImageClassification (model_type vit), from config.json"
    assert report["checkpoint"]["resolved_from"]["mean"] == "preprocessor_config.json"


def test_purify_writes_the_librarys_layout_beside_purified_safetensors(models, purified):
    out = purified["out"]
    names = {"config.json", "model.safetensors", "preprocessor_config.json"}
    assert {p.name for p in (out / "purified-hf").iterdir()} == names
    assert json.loads((out / "purified-hf" / "preprocessor_config.json").read_text()) == PREPROCESSOR
    assert {f"purified-hf/{n}" for n in names} <= set(purified["report"]["outputs"])
    theirs = _library_logits(out / "purified-hf", models["data"], PREPROCESSOR["image_mean"], PREPROCESSOR["image_std"])
    ours = bdclean_logits(out / "purified.safetensors", models["data"])
    assert torch.equal(ours.argmax(1), theirs.argmax(1)) and torch.allclose(ours, theirs, atol=1e-5)
    before = bdclean_logits(models["vit"], models["data"])
    assert not torch.allclose(before, ours)  # it was tuned
    from safetensors.torch import load_file

    assert set(load_file(out / "purified.safetensors")) == set(load_file(models["vit"] / "model.safetensors"))


def test_compare_model_dirs_and_purified_file(models, purified):
    check_compare_of_purified_dir(
        models["vit"], purified["out"], models["data"], "transformers:ViTForImageClassification"
    )


def test_purify_refuses_to_write_inside_the_model_dir(models):
    result = invoke(
        "purify",
        models["resnet"],
        "--data",
        models["data"],
        "--out",
        models["resnet"] / "out",
        "--device",
        "cpu",
        "--quiet",
    )
    assert result.exit_code == 2 and "inside the input directory" in result.output


# ---- refusals and errors ---------------------------------------------------------------------------


def _model_dir(tmp_path: Path, models, config, name: str = "m") -> Path:
    """A copy of the tiny ResNet directory with config.json replaced by `config` (text or JSON value)."""
    directory = tmp_path / name
    directory.mkdir()
    (directory / "model.safetensors").write_bytes((models["resnet"] / "model.safetensors").read_bytes())
    (directory / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return directory


def _resnet_config(models, **changes) -> dict:
    config = json.loads((models["resnet"] / "config.json").read_text())
    config.update(changes)
    return config


def _evaluate(directory, models):
    return invoke("evaluate", directory, "--data", models["data"], "--device", "cpu", "--quiet")


def test_hub_attention_kernels_are_refused(tmp_path, models):
    config = _resnet_config(models, attn_implementation="kernels-community/flash-attn")
    result = _evaluate(_model_dir(tmp_path, models, config), models)
    assert result.exit_code == 3 and "would load kernel code" in result.output


def test_auto_map_is_refused_and_no_code_runs(tmp_path, models):
    marker = tmp_path / "PWNED"
    config = _resnet_config(models, auto_map={"AutoModelForImageClassification": "modeling_evil.EvilModel"})
    directory = _model_dir(tmp_path, models, config)
    (directory / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    for command in (_evaluate(directory, models), invoke("inspect", directory)):
        assert command.exit_code == 3 and "trust_remote_code" in command.output
    assert not marker.exists()


@pytest.mark.parametrize(
    "config, message",
    [
        ("[1, 2]", "must hold a JSON object, not a list"),
        ("{not json", "is not valid JSON"),
        ('{"model_type": "vit", "x": NaN}', "is not valid JSON"),
        ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, "is not an image classifier bdclean supports"),
        ({"model_type": "resnet", "architectures": ["os.system"]}, "'architectures' must list exactly one class name"),
        ({"model_type": "resnet", "architectures": ["ResNetModel"]}, "is not the image-classification class"),
        ({"architecture": "hf-hub:timm/resnet18", "num_classes": 3}, "must be a timm model name"),
        ({"hello": 1}, "neither a transformers config"),
        (
            {"model_type": "resnet", "architectures": ["ResNetForImageClassification"], "quantization_config": {}},
            "quantized models are not supported",
        ),
        (
            {"model_type": "resnet", "architectures": ["ResNetForImageClassification"], "num_channels": "3"},
            "'num_channels' must be an integer",
        ),
    ],
)
def test_bad_configs_are_input_errors(tmp_path, models, config, message):
    result = _evaluate(_model_dir(tmp_path, models, config), models)
    assert result.exit_code == 2 and message in result.output, result.output
    assert "Traceback" not in result.output


def test_oversized_config_is_refused_before_parsing(tmp_path, models):
    directory = _model_dir(tmp_path, models, '{"pad": "' + "x" * hub_config.MAX_JSON_BYTES + '"}')
    result = invoke("inspect", directory)
    assert result.exit_code == 2 and "limit for a model config" in result.output


def test_directory_errors(tmp_path, models):
    (tmp_path / "empty").mkdir()
    result = _evaluate(tmp_path / "empty", models)
    assert result.exit_code == 2 and "without config.json" in result.output
    directory = _model_dir(tmp_path, models, _resnet_config(models))
    (directory / "model.safetensors").unlink()
    result = _evaluate(directory, models)
    assert result.exit_code == 2 and "no weights" in result.output
    result = invoke("evaluate", models["resnet"], "--data", models["data"], "--arch", "resnet18", "--quiet")
    assert result.exit_code == 2 and "--arch does not apply" in result.output


def test_pickled_weights_go_through_the_safe_reader(tmp_path, models):
    marker = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    directory = tmp_path / "evil"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(_resnet_config(models)))
    (directory / "pytorch_model.bin").write_bytes(pickle.dumps({"w": Payload()}))
    result = _evaluate(directory, models)
    assert result.exit_code == 3 and "refused" in result.output and not marker.exists()


def test_weights_that_do_not_fit_the_config(tmp_path, models):
    directory = _model_dir(tmp_path, models, _resnet_config(models, hidden_sizes=[8, 8]))
    result = _evaluate(directory, models)
    assert result.exit_code == 2 and "does not fit the model" in result.output


def test_config_asking_for_a_huge_model_is_refused_before_allocating(tmp_path, models):
    directory = _model_dir(tmp_path, models, _resnet_config(models, hidden_sizes=[4096, 8192]))
    result = _evaluate(directory, models)
    assert result.exit_code == 2 and "parameters but the weights hold 6,251" in result.output, result.output


def test_size_and_class_mismatches_name_the_remedy(tmp_path, models):
    small = make_npz_dataset(tmp_path / "small", size=12)
    result = invoke("evaluate", models["vit"], "--data", small, "--device", "cpu", "--quiet")
    assert result.exit_code == 2 and "expects 16x16 images (its config)" in result.output
    assert "--image-size" in result.output and "save it at 16x16" in result.output
    four = make_npz_dataset(tmp_path / "four", classes=4, size=SIZE)
    result = invoke("evaluate", models["resnet"], "--data", four, "--device", "cpu", "--quiet")
    assert result.exit_code == 2 and "3 classes but the data has 4" in result.output


def test_preprocessor_with_other_pixel_scale_is_refused(tmp_path, models):
    directory = _model_dir(tmp_path, models, _resnet_config(models))
    (directory / "preprocessor_config.json").write_text(json.dumps({**PREPROCESSOR, "do_rescale": False}))
    result = _evaluate(directory, models)
    assert result.exit_code == 2 and "bdclean feeds pixels / 255" in result.output


def test_missing_transformers_names_the_extra(models, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "transformers", None)  # `import transformers` now fails
    result = _evaluate(models["resnet"], models)
    assert result.exit_code == 2 and 'pip install "bdclean[hf]"' in result.output
    assert invoke("inspect", models["resnet"]).exit_code == 0  # inspect reads JSON and weights only


def test_tampered_hub_metadata_in_a_purified_file_is_refused(tmp_path, models):
    from safetensors.torch import load_file

    from backdoor_cli.checkpoint import write_safetensors

    config = _resnet_config(models, auto_map={"AutoModel": "evil.Model"})
    path = tmp_path / "p.safetensors"
    write_safetensors(
        path,
        load_file(models["resnet"] / "model.safetensors"),
        {"hub": {"library": "transformers", "config": config, "preprocessor": None}},
    )
    assert _evaluate(path, models).exit_code == 3
    write_safetensors(path, load_file(models["resnet"] / "model.safetensors"), {"hub": {"library": "transformers"}})
    result = _evaluate(path, models)
    assert result.exit_code == 2 and "must hold a config object" in result.output


# ---- timm ------------------------------------------------------------------------------------------

TIMM_CONFIG = {
    "architecture": "resnet10t",
    "num_classes": 3,
    "num_features": 512,
    "pretrained_cfg": {"input_size": [3, SIZE, SIZE], "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.2]},
}


def test_timm_config_parsing_and_input_spec():
    model = hub_config.HubModel(
        "timm", hub_config.parse_config(TIMM_CONFIG, "c")[1], TIMM_CONFIG, None, Path("w"), "config.json"
    )
    assert hub_config.parse_config(TIMM_CONFIG, "c") == ("timm", "resnet10t")
    spec = hub_config.input_spec(model)
    assert (spec.channels, spec.sizes, spec.mean, spec.norm_source) == (
        3,
        [((SIZE, SIZE), "pretrained_cfg input_size")],
        [0.5, 0.4, 0.3],
        "pretrained_cfg",
    )
    hub_config.check_input_shape(spec, (SIZE, SIZE, 3))
    with pytest.raises(InputError, match="expects 16x16 images .pretrained_cfg input_size. but the data is 32x32"):
        hub_config.check_input_shape(spec, (32, 32, 3))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"architecture": "../evil"}, "must be a timm model name"),
        ({"num_classes": None}, "needs 'num_classes'"),
        ({"model_args": {"checkpoint_path": "/tmp/x.pth"}}, "are not passed to timm"),
        ({"pretrained_cfg": {"input_size": [3, 16]}}, "input_size must be"),
        ({"pretrained_cfg": {"mean": ["0.5"]}}, "mean must be a list of 1-4 finite numbers"),
    ],
)
def test_timm_config_errors(changes, message):
    with pytest.raises(InputError, match=message):
        hub_config.parse_config({**TIMM_CONFIG, **changes}, "config.json")


def _timm_dir(tmp_path, models) -> Path:
    return _model_dir(tmp_path, models, TIMM_CONFIG, name="timm")


def test_missing_timm_names_the_extra(tmp_path, models, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "timm", None)
    result = _evaluate(_timm_dir(tmp_path, models), models)
    assert result.exit_code == 2 and 'pip install "bdclean[timm]"' in result.output


def test_timm_broken_by_torchvision_says_why(tmp_path, models, monkeypatch):
    def broken_import(name, *args):
        raise RuntimeError("operator torchvision::nms does not exist")

    monkeypatch.setattr(hub.importlib, "import_module", broken_import)
    result = _evaluate(_timm_dir(tmp_path, models), models)
    assert result.exit_code == 2 and "torchvision::nms" in result.output
    assert "timm needs torchvision" in result.output and "bdclean[timm]" in result.output


def test_timm_predictions_equal_timms_own_forward(tmp_path, models):
    timm = pytest.importorskip(
        "timm",
        reason="timm is not installed (extra bdclean[timm]); it needs a torchvision "
        "that imports beside this torch build",
    )
    model = timm.create_model("resnet10t", pretrained=False, num_classes=3).eval()
    directory = tmp_path / "timm"
    directory.mkdir()
    from safetensors.torch import save_file

    save_file(model.state_dict(), directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps(TIMM_CONFIG))
    cfg = TIMM_CONFIG["pretrained_cfg"]
    x = load_dataset(str(models["data"]), None, need_train=False).test.x
    shape = (1, 3, 1, 1)
    with torch.no_grad():
        theirs = model(normalize(x, torch.tensor(cfg["mean"]).view(shape), torch.tensor(cfg["std"]).view(shape)))
    ours = bdclean_logits(directory, models["data"])
    assert torch.equal(ours.argmax(1), theirs.argmax(1)) and torch.allclose(ours, theirs, atol=1e-5)


def test_a_model_directory_resizes_an_image_folder_to_its_configured_size(tmp_path, models):
    """No --image-size: the size in the model's config is used, so a folder of 20-40 px photos is
    resized and centre-cropped to the ViT's 16 px, and the report says so."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for label in range(3):
            folder = tmp_path / "photos" / split / f"c{label}"
            folder.mkdir(parents=True)
            for j in range(4):
                w, h = (int(v) for v in rng.integers(20, 41, 2))
                Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"{j}.png")
    result = runner.invoke(
        app,
        ["evaluate", str(models["vit"]), "--data", str(tmp_path / "photos"), "--device", "cpu", "--quiet", "--json"],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)["data"]
    assert data["image_shape"][:2] == [SIZE, SIZE] and data["image_size"] == [SIZE, SIZE]
