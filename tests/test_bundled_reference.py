"""The clean reference bdclean ships for CIFAR-10: when a scan uses it on its own, how it is named or refused,
and that the shipped file is the one recorded."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from backdoor_cli.checkpoint import read_checkpoint
from backdoor_cli.cli import app
from backdoor_cli.models import bundled_references
from backdoor_cli.models.bundled_references import BUNDLED_REFERENCES
from backdoor_cli.scanning.guided import TRIED_FLOOR
from helpers import make_template_dataset
from helpers import train_small_cnn as train

QUICK = ["--steps", "10", "--batch-size", "16", "--clean-count", "40", "--device", "cpu"]
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"


def _cifar_like(root: Path) -> Path:
    """Random 32x32x3 images in 10 classes, in a folder named cifar10: the built-in dataset's name and shape."""
    rng = np.random.default_rng(0)
    data = root / "cifar10"
    data.mkdir(parents=True)
    for split, n in (("train", 200), ("test", 100)):
        x = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
        np.savez(data / f"{split}.npz", x=x, y=np.arange(n, dtype=np.uint8) % 10)
    return data


@pytest.fixture(scope="module")
def cifar_like(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("ships")
    data = _cifar_like(root)
    model = root / "tiny.safetensors"
    result = CliRunner().invoke(
        app,
        ["train", "--arch", "test_tiny", "--data", str(data), "--out", str(model), "--epochs", "1", "--quiet"],
    )
    assert result.exit_code == 0, result.output
    return {"root": root, "data": data, "model": model}


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("template")
    data = make_template_dataset(root / "data", n_train=320, n_test=80)
    return {"data": data, "model": train(data, root / "clean.safetensors")}


def scan(model: Path, data: Path, *args: str):
    return CliRunner().invoke(app, ["scan", str(model), "--data", str(data), *QUICK, *args])


def test_the_shipped_files_are_the_recorded_ones_a_cifar10_resnet20_and_resnet56():
    refs = BUNDLED_REFERENCES["cifar10"]
    for ref, arch in zip(refs, ("resnet20", "resnet56"), strict=True):
        checkpoint = read_checkpoint(ref.path)
        assert checkpoint.sha256 == ref.sha256 and ref.label == f"bundled:cifar10-{arch}"
        assert checkpoint.metadata["arch"] == arch and checkpoint.metadata["num_classes"] == 10
        assert "akamaster" in checkpoint.metadata["converted_from"]  # its provenance, not a local path
    assert (refs[0].path.parent / "README.md").read_text().count("Yerlan Idelbayev") == 1  # the BSD-2 notice


@pytest.mark.parametrize(
    ("arch", "chosen"),
    [("resnet20", "resnet56"), ("resnet56", "resnet20"), ("resnet32", "resnet20"), (None, "resnet20")],
)
def test_the_reference_is_of_another_architecture_than_the_model_so_never_its_parent(arch, chosen):
    from backdoor_cli.models.architectures import ARCHITECTURES

    model = ARCHITECTURES[arch](10) if arch else None
    assert bundled_references.bundled_reference("cifar10", model).file == f"cifar10-{chosen}.safetensors"
    assert bundled_references.bundled_reference("mnist", model) is None


@pytest.mark.skipif(not (SHARED / "test.npz").exists(), reason="needs ../shared/data/cifar10 (the real CIFAR-10)")
def test_the_bundled_reference_is_a_strong_model_of_real_cifar10(tmp_path):
    """On the first 1,000 real test images; its published figure on all 10,000 is 91.73%."""
    path = BUNDLED_REFERENCES["cifar10"][0].path
    result = CliRunner().invoke(
        app,
        ["evaluate", str(path), "--data", str(SHARED), "--eval-limit", "1000", "--device", "cpu", "--json"],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["metrics"]["clean_acc"]["value"] >= 0.88


def test_a_scan_of_cifar10_images_uses_the_bundled_reference_and_says_so(cifar_like):
    result = scan(cifar_like["model"], cifar_like["data"], "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["reference"]["checkpoint"] == "bundled:cifar10-resnet20"
    said = " ".join(result.stderr.split())
    assert "bundled clean CIFAR-10 ResNet-20" in said and "of another architecture than the model's" in said


def test_none_goes_without_the_bundled_reference(cifar_like):
    result = scan(cifar_like["model"], cifar_like["data"], "--json", "--clean-reference", "none")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["reference"] is None
    assert "clean reference" not in result.stderr


def test_other_data_gets_no_reference_unasked(template):
    result = scan(template["model"], template["data"], "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["reference"] is None


@pytest.mark.parametrize(
    ("value", "said"),
    [
        ("bundled", "bdclean ships no clean reference for 'data'"),
        ("bundled:cifar10", "takes 10-class 32x32x3 images; these are 8-class 16x16x3"),
        ("bundled:imagenet", "bdclean ships no clean reference for 'imagenet'"),
    ],
)
def test_a_bundled_reference_that_does_not_fit_is_refused_by_name(template, value, said):
    result = scan(template["model"], template["data"], "--clean-reference", value)
    assert result.exit_code == 2, result.output
    assert said in " ".join(result.output.split())


def _renamed(data: Path, root: Path) -> Path:
    """The same images under a name that is no built-in dataset's."""
    renamed = root / "my-images"
    renamed.mkdir()
    for split in ("train", "test"):
        (renamed / f"{split}.npz").write_bytes((data / f"{split}.npz").read_bytes())
    return renamed


def test_data_of_another_name_tries_the_bundled_reference_and_its_accuracy_decides(cifar_like, tmp_path):
    renamed = _renamed(cifar_like["data"], tmp_path)
    unnamed = scan(cifar_like["model"], renamed, "--json")
    assert unnamed.exit_code == 0, unnamed.output
    said = " ".join(unnamed.stderr.split())
    assert "these images are not the built-in cifar10" in said
    assert "tries bdclean's bundled clean CIFAR-10 ResNet-20" in said and f"at least {TRIED_FLOOR:.0%}" in said
    # random images are no task's: the reference gets about a tenth of their labels right, under the floor, so it
    # is not used, and the verdict, which is what a report keeps, says why
    doc = json.loads(unnamed.stdout)
    reference = doc["reference"]
    assert reference["checkpoint"] == "bundled:cifar10-resnet20" and reference["floor"] == TRIED_FLOOR
    assert reference["accuracy"] < TRIED_FLOOR and reference["usable"] is False
    verdict = " ".join(doc["verdict"].split())
    assert "tried because these images are not its built-in dataset" in verdict
    assert "not a model of their task, so it was not used" in verdict
    # named, the bundled reference is the user's choice: no trial, no floor
    result = scan(cifar_like["model"], renamed, "--json", "--clean-reference", "bundled:cifar10")
    assert result.exit_code == 0, result.output
    named = json.loads(result.stdout)["reference"]
    assert named["checkpoint"] == "bundled:cifar10-resnet20" and named["floor"] == 0.0
    assert "these images are not the built-in" not in result.stderr
    # declined, nothing is tried
    declined = scan(cifar_like["model"], renamed, "--json", "--clean-reference", "none")
    assert json.loads(declined.stdout)["reference"] is None and "tries" not in declined.stderr
    # data no bundled reference fits (8 classes of 16x16 images) gets no such line
    other = make_template_dataset(tmp_path / "other", n_train=80, n_test=40)
    model = train(other, tmp_path / "other.safetensors")
    assert "bundled" not in scan(model, other, "--json").stderr


@pytest.mark.skipif(not (SHARED / "test.npz").exists(), reason="needs ../shared/data/cifar10 (the real CIFAR-10)")
def test_real_cifar10_images_of_another_name_are_recognised_by_the_tried_reference(tmp_path):
    """A user's own CIFAR-10 images (here 600 real ones in a folder of another name): the tried reference gets
    their labels right, so the purify's shortcut test uses it, as it would the built-in data's."""
    with np.load(SHARED / "test.npz") as real:
        x, y = real["x"], real["y"]
    mine = tmp_path / "my-cifar"
    mine.mkdir()
    np.savez(mine / "train.npz", x=x[:400], y=y[:400])
    np.savez(mine / "test.npz", x=x[400:600], y=y[400:600])
    subject = BUNDLED_REFERENCES["cifar10"][0].path  # a clean ResNet-20: the tried reference is the ResNet-56
    report = quick_purify(subject, mine, tmp_path / "out", "--clean-count", "200", "--precaution")
    reference = report["scan"]["reference"]
    assert reference["checkpoint"] == "bundled:cifar10-resnet56" and reference["floor"] == TRIED_FLOOR
    assert reference["accuracy"] >= 0.8 and reference["usable"] is True


def test_a_bundled_file_that_is_not_the_shipped_one_is_refused(cifar_like, monkeypatch):
    changed = tuple(dataclasses.replace(ref, sha256="0" * 64) for ref in BUNDLED_REFERENCES["cifar10"])
    monkeypatch.setitem(bundled_references.BUNDLED_REFERENCES, "cifar10", changed)
    result = scan(cifar_like["model"], cifar_like["data"])
    assert result.exit_code == 2, result.output
    assert "is not the file bdclean shipped" in " ".join(result.output.split())


def test_the_default_purify_uses_it_and_a_method_without_a_scan_refuses_it(cifar_like, tmp_path):
    out = tmp_path / "purified"
    base = ["purify", str(cifar_like["model"]), "--data", str(cifar_like["data"]), "--device", "cpu"]
    result = CliRunner().invoke(app, [*base, "--scan-steps", "5", "--epochs", "1", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert "bundled clean CIFAR-10 ResNet-20" in " ".join(result.stderr.split())
    assert "bundled:cifar10-resnet20" in json.dumps(report["scan"])
    refused = CliRunner().invoke(
        app, [*base, "--method", "fst", "--clean-reference", "bundled", "--out", str(tmp_path / "o2")]
    )
    assert refused.exit_code == 2 and "--clean-reference is used by --retune-check" in refused.output
    # `none` names no reference, so it is not refused where none is read
    kept = CliRunner().invoke(
        app, [*base, "--method", "fst", "--epochs", "1", "--clean-reference", "none", "--out", str(tmp_path / "o3")]
    )
    assert kept.exit_code == 0, kept.output


def test_the_retuning_check_compares_with_the_bundled_reference_only_where_named(cifar_like):
    base = ["evaluate", str(cifar_like["model"]), "--data", str(cifar_like["data"]), "--trigger", "badnets"]
    args = [*base, "--device", "cpu", "--json", "--retune-check", "--retune-epochs", "1", "--retune-poisoned", "4"]
    named = CliRunner().invoke(app, [*args, "--clean-reference", "bundled"])
    assert named.exit_code == 0, named.output
    assert "retuning check on the clean reference bundled:cifar10-resnet20" in " ".join(named.stderr.split())
    assert json.loads(named.stdout)["retune_check"]["reference_asr_after_retuning"] is not None
    unnamed = CliRunner().invoke(app, args)
    assert unnamed.exit_code == 0, unnamed.output
    assert json.loads(unnamed.stdout)["retune_check"]["reference_asr_after_retuning"] is None


def quick_purify(model: Path, data: Path, out: Path, *args: str) -> dict:
    """A default purify of a few steps; its report.json."""
    argv = ["purify", str(model), "--data", str(data), "--device", "cpu", "--scan-steps", "5", "--epochs", "1"]
    result = CliRunner().invoke(app, [*argv, *args, "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads((out / "report.json").read_text())


def test_a_purify_on_data_of_another_name_says_in_its_verdict_why_the_tried_reference_was_not_used(
    cifar_like, tmp_path
):
    renamed = _renamed(cifar_like["data"], tmp_path)
    report = quick_purify(cifar_like["model"], renamed, tmp_path / "a", "--precaution")
    removal = report["removal"]
    scan_reason = removal["evidence"]["scan"]["reason"] if "scan" in removal["evidence"] else removal["reason"]
    assert removal["verdict"] != "verified" and report["scan"]["reference"]["usable"] is False
    assert "tried because these images are not its built-in dataset" in scan_reason
    # the report.md says it too, where the user reads the verdict
    assert "not a model of their task" in " ".join((tmp_path / "a" / "report.md").read_text().split())
    # a user who said `none` chose to go without: nothing tried, nothing said
    declined = quick_purify(cifar_like["model"], renamed, tmp_path / "b", "--clean-reference", "none")
    assert declined["scan"]["reference"] is None and "tried because" not in json.dumps(declined)


def test_a_usable_reference_or_none_that_fits_adds_nothing_to_the_verdict(cifar_like, template, tmp_path):
    used = quick_purify(cifar_like["model"], cifar_like["data"], tmp_path / "c")
    assert used["scan"]["reference"] is not None and "tried because" not in json.dumps(used)
    other = quick_purify(template["model"], template["data"], tmp_path / "d")
    assert other["scan"]["reference"] is None and "bundled" not in json.dumps(other["removal"])
