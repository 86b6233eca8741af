"""`bdclean convert`: a foreign checkpoint, loaded with its flags, written as a bdclean .safetensors that needs
none; checked on the test split and read back before it is written; usable as a --clean-reference of another
architecture than the model's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from backdoor_cli.checkpoint import read_checkpoint, safetensors_bytes
from backdoor_cli.cli import app
from backdoor_cli.errors import InputError
from backdoor_cli.usecases.conversion import check_round_trip, default_converted_name
from helpers import make_template_dataset, train_small_cnn

runner = CliRunner()
# Enough of a scan to flag the planted class (tests/test_scan.py's full flags), so the reference is applied.
SCAN = ["--steps", "100", "--batch-size", "32", "--clean-count", "160", "--device", "cpu", "--quiet"]


def _foreign(bdclean_file: Path, out: Path) -> Path:
    """The same weights with bdclean's metadata stripped: what a checkpoint from elsewhere looks like."""
    save_file({k: v.contiguous() for k, v in read_checkpoint(str(bdclean_file)).state_dict.items()}, str(out))
    return out


def _train_other_arch(data: Path, out: Path) -> Path:
    result = runner.invoke(
        app,
        ["train", "--arch", "simple_cnn", "--data", str(data), "--out", str(out), "--epochs", "3", "--lr", "0.05"]
        + ["--device", "cpu", "--quiet"],
    )
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("convert")
    data = make_template_dataset(root / "data")
    backdoored = train_small_cnn(data, root / "bd.safetensors", "--trigger", "badnets", "--poison-rate", "0.1")
    other = _train_other_arch(data, root / "other.safetensors")  # clean, simple_cnn (full width)
    return {
        "root": root,
        "data": data,
        "suspect": _foreign(backdoored, root / "suspect.safetensors"),  # simple_cnn_half, needs --arch
        "other": _foreign(other, root / "other-foreign.safetensors"),  # simple_cnn, needs --arch
    }


def _convert(path, data, *args):
    return runner.invoke(app, ["convert", str(path), "--data", str(data), "--device", "cpu", "--quiet", *args])


def _metadata(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["bdclean"])


def _evaluate(path, data, *args) -> dict:
    result = runner.invoke(app, ["evaluate", str(path), "--data", str(data), "--device", "cpu", "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_a_converted_checkpoint_loads_without_flags_and_scores_as_the_input(models, tmp_path):
    out = tmp_path / "other.safetensors"
    result = _convert(models["other"], models["data"], "--arch", "simple_cnn", "--out", str(out), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["kind"] == "convert" and report["written"] is True and report["out"] == str(out)
    assert report["round_trip"]["weights_equal"] and report["round_trip"]["logits_equal"]
    assert report["checkpoint"]["resolved_from"]["arch"] == "flag"
    meta = _metadata(out)
    source = read_checkpoint(str(models["other"]))
    assert meta["arch"] == "simple_cnn" and meta["converted_from"]["sha256"] == source.sha256
    assert meta["converted_from"]["resolved_from"]["arch"] == "flag"
    assert meta["test_metrics"]["clean_acc"]["value"] == report["metrics"]["clean_acc"]["value"]
    converted = read_checkpoint(str(out))
    assert converted.state_dict.keys() == source.state_dict.keys()
    assert all(torch.equal(converted.state_dict[k], v) for k, v in source.state_dict.items())
    without_flags = _evaluate(out, models["data"])
    with_flags = _evaluate(models["other"], models["data"], "--arch", "simple_cnn")
    assert without_flags["metrics"]["clean_acc"] == with_flags["metrics"]["clean_acc"]
    assert without_flags["checkpoint"]["resolved_from"]["arch"] == "metadata"


def test_the_recorded_normalisation_replaces_the_flags(models, tmp_path):
    out = tmp_path / "norm.safetensors"
    norm = ["--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25", "--min-acc", "0"]
    result = _convert(models["other"], models["data"], "--arch", "simple_cnn", "--out", str(out), *norm)
    assert result.exit_code == 0, result.output
    assert _metadata(out)["normalization"] == {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    loaded = _evaluate(out, models["data"])["checkpoint"]
    assert loaded["normalization"]["std"] == [0.25, 0.25, 0.25] and loaded["resolved_from"]["std"] == "metadata"


def test_without_out_the_name_is_the_input_stem_in_the_current_directory(models, tmp_path, monkeypatch):
    assert default_converted_name("ckpts/resnet20-12fca82f.th") == "resnet20-12fca82f.bdclean.safetensors"
    monkeypatch.chdir(tmp_path)
    result = _convert(models["other"], models["data"], "--arch", "simple_cnn")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "other-foreign.bdclean.safetensors").is_file()
    again = _convert(models["other"], models["data"], "--arch", "simple_cnn")
    assert again.exit_code == 2 and "--force" in again.output


@pytest.fixture(scope="module")
def random_model(models) -> Path:
    """Random weights: they load under any flags, and score at chance."""
    state = read_checkpoint(str(models["other"])).state_dict
    generator = torch.Generator().manual_seed(0)
    path = models["root"] / "random.safetensors"
    save_file({k: torch.randn(v.shape, generator=generator) * 1e-3 for k, v in state.items()}, str(path))
    return path


def test_a_model_at_chance_level_is_refused_and_nothing_is_written(models, random_model, tmp_path):
    """An accuracy at chance says the conversion is wrong (flags), not the file: refused unless --min-acc says."""
    out = tmp_path / "random-out.safetensors"
    refused = _convert(random_model, models["data"], "--arch", "simple_cnn", "--out", str(out))
    said = " ".join(refused.output.split())
    assert refused.exit_code == 2 and "chance level" in said and "nothing was written" in said, said
    assert "--min-acc 0" in said and not out.exists()
    forced = _convert(random_model, models["data"], "--arch", "simple_cnn", "--out", str(out), "--min-acc", "0")
    assert forced.exit_code == 0, forced.output
    assert out.is_file()


def test_a_min_acc_gate_that_fails_writes_nothing_and_exits_1(models, random_model, tmp_path):
    out = tmp_path / "gated.safetensors"
    result = _convert(random_model, models["data"], "--arch", "simple_cnn", "--out", str(out), "--min-acc", "50%")
    assert result.exit_code == 1, result.output
    assert "gate min-acc FAILED" in result.output and "nothing written" in result.output and not out.exists()
    as_json = _convert(
        random_model, models["data"], "--arch", "simple_cnn", "--out", str(out), "--min-acc", "0.5", "--json"
    )
    report = json.loads(as_json.stdout)
    assert as_json.exit_code == 1 and report["written"] is False and report["sha256"] is None
    assert report["gates"][0]["gate"] == "min-acc" and not report["gates"][0]["passed"]
    passed = _convert(models["other"], models["data"], "--arch", "simple_cnn", "--out", str(out), "--min-acc", "0.5")
    assert passed.exit_code == 0 and "gate min-acc passed" in passed.output and out.is_file()


@pytest.mark.parametrize(
    "out, said",
    [("model.pt", "a converted checkpoint is a .safetensors file"), (".", "is a directory")],
)
def test_a_wrong_out_is_refused(models, tmp_path, out, said):
    result = _convert(models["other"], models["data"], "--arch", "simple_cnn", "--out", str(tmp_path / out))
    assert result.exit_code == 2 and said in " ".join(result.output.split())


def test_a_wrong_arch_is_an_input_error(models, tmp_path):
    result = _convert(models["other"], models["data"], "--arch", "resnet20", "--out", str(tmp_path / "x.safetensors"))
    assert result.exit_code == 2 and not (tmp_path / "x.safetensors").exists()


def test_a_copy_that_would_not_load_as_the_input_is_never_written(models):
    """The read-back compares weights bit for bit: bytes of other weights under the same metadata fail."""
    from backdoor_cli.data.datasets import load_dataset
    from backdoor_cli.runtime import prepare_model
    from backdoor_cli.subject import load_subject

    bundle = load_dataset(str(models["data"]), None, need_train=False)
    subject = load_subject(str(models["other"]), bundle, arch="simple_cnn")
    model = prepare_model(subject.model, torch.device("cpu"))  # as convert runs it
    tampered = {k: v + 1e-3 if v.is_floating_point() else v for k, v in subject.model.state_dict().items()}
    meta = {"arch": "simple_cnn", "num_classes": subject.num_classes, "in_channels": 3, "head": subject.head}
    meta["normalization"] = {"mean": list(subject.mean), "std": list(subject.std)}
    blob = safetensors_bytes(tampered, {"schema": "bdclean.checkpoint/1", **meta})
    with pytest.raises(InputError, match="would not load as the input did"):
        check_round_trip(blob, Path("x.safetensors"), subject, model, bundle, torch.device("cpu"))
    good = safetensors_bytes(subject.model.state_dict(), {"schema": "bdclean.checkpoint/1", **meta})
    assert check_round_trip(good, Path("x.safetensors"), subject, model, bundle, torch.device("cpu"))["logits_equal"]


def test_a_converted_model_of_another_architecture_serves_as_clean_reference(models, tmp_path):
    """The suspect needs --arch simple_cnn_half; a foreign clean simple_cnn cannot be its reference (it would be
    loaded with the suspect's --arch), but its converted copy loads as it records."""
    suspect = ["--arch", "simple_cnn_half", *SCAN]
    foreign = runner.invoke(
        app,
        ["scan", str(models["suspect"]), "--data", str(models["data"]), "--clean-reference", str(models["other"])]
        + suspect,
    )
    said = " ".join(foreign.output.split())
    assert foreign.exit_code == 2 and "bdclean convert" in said, said
    converted = tmp_path / "reference.safetensors"
    assert _convert(models["other"], models["data"], "--arch", "simple_cnn", "--out", str(converted)).exit_code == 0
    result = runner.invoke(
        app,
        ["scan", str(models["suspect"]), "--data", str(models["data"]), "--clean-reference", str(converted), "--json"]
        + suspect,
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["checkpoint"]["arch"] == "simple_cnn_half"
    reference = report["reference"]
    assert reference["checkpoint"] == str(converted)
    assert report["flagged_classes"], report  # the planted class, so the reference was applied to it
    assert reference["accuracy"] > 0.5 and reference["usable"] is True
