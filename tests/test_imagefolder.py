"""ImageNet-style folders: --image-size (resize + centre-crop), the mixed-size error, and the streamed
test split (same metrics as resident, bounded number of batches in flight, same safety checks)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from backdoor_cli.cli import app
from backdoor_cli.config import EvaluateOptions, parse_image_size, resolve_options
from backdoor_cli.data import datasets as data_module
from backdoor_cli.data import imagefolder
from backdoor_cli.data.datasets import load_clean_folder, load_dataset
from backdoor_cli.data.imagefolder import centre_box, resized_size
from backdoor_cli.data.streaming import FolderStream
from backdoor_cli.errors import ConfigError, InputError
from helpers import make_npz_dataset, train_badnets_model

runner = CliRunner()
CLASSES = ("a", "b", "c")


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def _mixed_folder(root, per_class=(8, 6), seed=0):
    """train/ and test/ of 3 classes, random 20-40 px sizes, JPEG and PNG, a brightness band per class."""
    rng = np.random.default_rng(seed)
    for split, count in zip(("train", "test"), per_class):
        for label, cls in enumerate(CLASSES):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for j in range(count):
                w, h = (int(v) for v in rng.integers(20, 41, 2))
                pixels = np.clip(40 + 85 * label + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
                suffix = ".jpg" if j % 2 else ".png"
                Image.fromarray(pixels).save(folder / f"{j}{suffix}")
    return root


@pytest.fixture(scope="module")
def folder_model(tmp_path_factory):
    """A mixed-size folder and a BadNets test_tiny model trained on it at 16 px through the CLI."""
    root = tmp_path_factory.mktemp("imagefolder")
    data = _mixed_folder(root / "data", per_class=(12, 9))
    model = root / "bd.safetensors"
    train_badnets_model(data, model, 3, 0.2, "--image-size", "16")
    return {"root": root, "data": data, "model": model}


# ---------------------------------------------------------------- the transform


def test_resized_size_is_the_imagenet_eval_transform():
    assert resized_size(500, 375, (224, 224)) == (341, 256)  # shorter side 256 = round(224 / 0.875)
    assert resized_size(375, 500, (224, 224)) == (256, 341)
    assert resized_size(40, 20, (16, 16)) == (36, 18)  # round(16 / 0.875) = 18
    assert resized_size(20, 20, (16, 24)) == (27, 27)  # covers 18 x 27 (H x W)
    assert centre_box(341, 256, (224, 224)) == (58, 16, 282, 240)


def test_resize_and_crop_match_pil(tmp_path):
    root = tmp_path / "f"
    rng = np.random.default_rng(1)
    originals = {}
    for cls, (w, h), suffix in (("a", (40, 20), ".png"), ("b", (20, 30), ".png"), ("c", (33, 37), ".jpg")):
        (root / "test" / cls).mkdir(parents=True)
        path = root / "test" / cls / f"0{suffix}"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        originals[cls] = path
    # Resize sizes and crop boxes worked out by hand: cover 18 x 18, then the centred 16 x 16.
    expected_ops = {"a": ((36, 18), (10, 1, 26, 17)), "b": ((18, 27), (1, 5, 17, 21)), "c": ((18, 20), (1, 2, 17, 18))}
    bundle = load_dataset(str(root), image_size=(16, 16))
    assert bundle.test.image_shape == (16, 16, 3)
    for label, cls in enumerate(CLASSES):
        size, box = expected_ops[cls]
        with Image.open(originals[cls]) as image:
            reference = np.asarray(image.convert("RGB").resize(size, Image.Resampling.BILINEAR).crop(box))
        assert np.array_equal(bundle.test.x[label].numpy(), reference), cls


def test_non_square_size_and_grayscale(tmp_path):
    root = _mixed_folder(tmp_path / "f")
    Image.new("L", (25, 31), 90).save(root / "test" / "a" / "gray.png")
    bundle = load_dataset(str(root), image_size=(16, 24))
    assert bundle.test.image_shape == (16, 24, 3) and bundle.train.image_shape == (16, 24, 3)
    gray_index = [i for i, f in enumerate(sorted((root / "test" / "a").iterdir())) if f.name == "gray.png"][0]
    assert bundle.test.x[gray_index].flatten().unique().tolist() == [90]  # replicated to RGB


def test_mixed_sizes_need_image_size(tmp_path):
    root = _mixed_folder(tmp_path / "f")
    with pytest.raises(InputError, match="image is") as info:
        load_dataset(str(root))
    assert "--image-size" in info.value.hint
    result = invoke("evaluate", tmp_path / "nope.safetensors", "--data", root, "--quiet")
    assert result.exit_code == 2 and "--image-size" in result.output and "Traceback" not in result.output


def test_same_size_folder_without_image_size_is_unchanged(tmp_path):
    root = tmp_path / "f"
    for label, cls in enumerate(CLASSES):
        (root / "test" / cls).mkdir(parents=True)
        Image.new("RGB", (12, 10), (30 * label,) * 3).save(root / "test" / cls / "0.png")
    bundle = load_dataset(str(root))
    assert bundle.test.image_shape == (10, 12, 3) and isinstance(bundle.test.x, torch.Tensor)
    assert bundle.test.x[:, 0, 0, 0].tolist() == [0, 30, 60]


def test_npz_with_image_size(tmp_path):
    data = make_npz_dataset(tmp_path / "d", size=12)
    assert load_dataset(str(data), image_size=(12, 12)).test.image_shape == (12, 12, 3)
    with pytest.raises(InputError, match="--image-size"):
        load_dataset(str(data), image_size=(16, 16))
    with pytest.raises(InputError, match="--image-size"):
        load_clean_folder(str(data), image_size=(16, 16))


def test_clean_folder_is_resized(tmp_path):
    root = _mixed_folder(tmp_path / "f")
    clean = load_clean_folder(str(root), image_size=(16, 16))
    assert clean.image_shape == (16, 16, 3) and clean.num_images == 24


# ---------------------------------------------------------------- the option


@pytest.mark.parametrize(
    "value, expected",
    [
        ("224", (224, 224)),
        ("224,192", (224, 192)),
        (" 16 , 24 ", (16, 24)),
        (32, (32, 32)),
        ([16, 24], (16, 24)),
        (None, None),
    ],
)
def test_parse_image_size(value, expected):
    assert parse_image_size(value, "--image-size") == expected


@pytest.mark.parametrize("value", ["", "abc", "1,2,3", "0", "1", "5000", "-4", "16.5", True, [16, True], 2.5, "²"])
def test_parse_image_size_rejects(value):
    with pytest.raises(ConfigError, match="image-size"):
        parse_image_size(value, "--image-size")


def test_image_size_from_yaml(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("image-size: 64\n")
    assert resolve_options(EvaluateOptions, {}, str(config)).image_size == (64, 64)
    config.write_text("image_size: [48, 64]\n")
    assert resolve_options(EvaluateOptions, {}, str(config)).image_size == (48, 64)


@pytest.mark.parametrize("command", ["evaluate", "purify", "compare", "train"])
def test_cli_rejects_bad_image_size(tmp_path, command):
    args = {
        "evaluate": ["evaluate", "m"],
        "purify": ["purify", "m", "--out", tmp_path / "o"],
        "compare": ["compare", "m", "n"],
        "train": ["train", "--out", tmp_path / "m.safetensors"],
    }[command]
    result = invoke(*args, "--data", tmp_path, "--image-size", "big", "--quiet")
    assert result.exit_code == 2 and "--image-size" in result.output and "Traceback" not in result.output


# ---------------------------------------------------------------- streaming


def _evaluate_json(folder_model, *extra):
    result = invoke(
        "evaluate",
        folder_model["model"],
        "--data",
        folder_model["data"],
        "--image-size",
        "16",
        "--batch-size",
        "4",
        "--json",
        "--quiet",
        *extra,
    )
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.parametrize("trigger", ["badnets", "patch5"])
def test_streamed_metrics_equal_resident(folder_model, monkeypatch, tmp_path, trigger):
    if trigger == "patch5":  # BadNets' white bottom-right square, large enough to move this toy model
        trigger = tmp_path / "patch5.yaml"
        trigger.write_text("type: patch\ntarget: 2\nsize: 5\nposition: bottom-right\ncolor: 255\n")
    resident = _evaluate_json(folder_model, "--trigger", trigger)
    assert resident["data"]["streamed"] is False and resident["data"]["image_size"] == [16, 16]
    monkeypatch.setattr(data_module, "STREAM_MIN_BYTES", 0)
    assert isinstance(load_dataset(str(folder_model["data"]), image_size=(16, 16)).test, FolderStream)
    streamed = _evaluate_json(folder_model, "--trigger", trigger)
    assert streamed["data"]["streamed"] is True
    for key in ("clean_acc", "asr", "ra"):
        assert streamed["metrics"][key]["k"] == resident["metrics"][key]["k"], key
        assert streamed["metrics"][key]["n"] == resident["metrics"][key]["n"] == (27 if key == "clean_acc" else 18)
    if trigger != "badnets":
        assert 0 < resident["metrics"]["asr"]["k"] < 18  # a partial ASR: the equality is not vacuous
    limited = _evaluate_json(folder_model, "--eval-limit", "10")
    assert limited["metrics"]["clean_acc"]["n"] == 10 and limited["data"]["eval_limited"]


def test_streamed_compare_and_purify(folder_model, monkeypatch, tmp_path):
    monkeypatch.setattr(data_module, "STREAM_MIN_BYTES", 0)  # test and train splits both stay on disk
    model, data = folder_model["model"], folder_model["data"]
    result = invoke("compare", model, model, "--data", data, "--image-size", "16", "--json", "--quiet")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["data"]["streamed"] is True
    out = tmp_path / "out"
    result = invoke(
        "purify",
        model,
        "--data",
        data,
        "--out",
        out,
        "--image-size",
        "16",
        "--clean-count",
        "9",
        "--epochs",
        "1",
        "--device",
        "cpu",
        "--json",
        "--quiet",
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["data"]["streamed"] is True and (out / "purified.safetensors").exists()
    paired = report["delta"]["paired"]["clean_acc"]  # the streamed evaluation keeps its images' outcomes too
    assert paired["n"] == report["before"]["clean_acc"]["n"]
    assert paired["gained"] - paired["lost"] == report["after"]["clean_acc"]["k"] - report["before"]["clean_acc"]["k"]
    assert yaml.safe_load((out / "config.yaml").read_text())["image-size"] == [16, 16]


def test_stream_decodes_at_most_k_batches_ahead(tmp_path, monkeypatch):
    root = _mixed_folder(tmp_path / "f", per_class=(1, 10))
    monkeypatch.setattr(data_module, "STREAM_MIN_BYTES", 0)
    stream = load_dataset(str(root), need_train=False, image_size=(16, 16)).test
    decoded = []
    real = imagefolder.decode_image
    monkeypatch.setattr(imagefolder, "decode_image", lambda *a: decoded.append(a[0]) or real(*a))
    batch, ahead = 4, 2
    seen = []
    for i, (x, y) in enumerate(stream.batches(batch, workers=2, ahead=ahead)):
        assert len(decoded) <= (i + 1 + ahead) * batch  # never more than `ahead` batches past this one
        assert x.dtype == torch.uint8 and x.shape[1:] == (16, 16, 3)
        seen += y.tolist()
    assert seen == stream.y.tolist() and len(decoded) == 30
    decoded.clear()
    first = next(iter(stream.batches(batch, workers=1, ahead=ahead)))  # abandoned after one batch
    assert len(first[0]) == batch and len(decoded) <= (1 + ahead) * batch


def test_stream_rechecks_files_while_decoding(tmp_path, monkeypatch):
    root = _mixed_folder(tmp_path / "f", per_class=(1, 3))
    monkeypatch.setattr(data_module, "STREAM_MIN_BYTES", 0)
    stream = load_dataset(str(root), need_train=False, image_size=(16, 16)).test
    victim = stream.files[4]
    victim.write_bytes(b"\x89PNG\r\n\x1a\nnot really")  # replaced after its header was checked
    with pytest.raises(InputError, match=victim.name):
        list(stream.batches(4))
    Image.new("RGB", (imagefolder.MAX_IMAGE_SIDE + 1, 1)).save(victim)
    with pytest.raises(InputError, match="limit"):
        list(stream.batches(4))


def test_decompression_bomb_refused(tmp_path, monkeypatch):
    (tmp_path / "f" / "test" / "a").mkdir(parents=True)
    Image.new("RGB", (25, 30)).save(tmp_path / "f" / "test" / "a" / "0.png")  # 750 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # over it, under twice it: PIL only warns
    with pytest.warns(Image.DecompressionBombWarning), pytest.raises(InputError, match="decompression-bomb"):
        load_dataset(str(tmp_path / "f"), image_size=(16, 16))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)  # over twice it: PIL refuses to open it
    with pytest.raises(InputError, match="decompression bomb"):
        load_dataset(str(tmp_path / "f"), image_size=(16, 16))


def test_benchmark_smoke(tmp_path):
    """benchmarks/bench_imagefolder.py end to end on a tiny folder: JSON shape and identical metrics only."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_imagefolder.py"
    spec = importlib.util.spec_from_file_location("bench_imagefolder", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    code = bench.main(
        [
            "--images",
            "24",
            "--min-side",
            "20",
            "--max-side",
            "40",
            "--image-size",
            "16",
            "--batch-size",
            "8",
            "--loaders",
            "--json-out",
            str(out),
        ]
    )
    result = json.loads(out.read_text())
    assert code == 0 and result["metrics_identical"]
    runs = result["runs"]
    assert runs["resident"]["streamed"] is False and runs["streamed"]["streamed"] is True
    assert runs["decode-threads"]["images"] == runs["decode-dataloader"]["images"] == 24
    assert result["machine"]["cpu_capability"] and result["streamed_over_resident"]["max_rss"] > 0
