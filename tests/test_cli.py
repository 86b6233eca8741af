"""The CLI end to end through typer's CliRunner (and a subprocess where the process matters):
every command, JSON output, gates, and every error path with its exit code."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from backdoor_cli.cli import app
from helpers import make_npz_dataset

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A toy dataset and a backdoored test_tiny model trained on it through `bdclean train`."""
    root = tmp_path_factory.mktemp("toy")
    data = make_npz_dataset(root / "data")
    model = root / "bd.safetensors"
    result = invoke(
        "train",
        "--arch",
        "test_tiny",
        "--data",
        data,
        "--out",
        model,
        "--trigger",
        "badnets",
        "--poison-rate",
        "0.1",
        "--epochs",
        "3",
        "--lr",
        "0.05",
        "--device",
        "cpu",
        "--quiet",
    )
    assert result.exit_code == 0, result.output
    return {"root": root, "data": data, "model": model}


def test_help_is_fast_and_does_not_import_torch():
    code = (
        "import sys; from typer.testing import CliRunner; from backdoor_cli.cli import app; "
        "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output; "
        "assert 'purify' in r.output; print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_each_command_has_help():
    for command in ("inspect", "evaluate", "purify", "compare", "scan", "train", "demo"):
        result = invoke(command, "--help")
        assert result.exit_code == 0 and "Usage" in result.output


def test_inspect_table_and_json(toy):
    result = invoke("inspect", toy["model"])
    assert result.exit_code == 0 and "test_tiny" in result.output and "sha256" in result.output
    info = json.loads(invoke("inspect", toy["model"], "--json").stdout)
    assert info["format"] == "safetensors" and info["guess"]["arch"] == "test_tiny"
    assert info["bdclean_metadata"]["trigger"]["type"] == "patch"
    assert info["bdclean_metadata"]["poison_rate"] == 0.1


def test_inspect_refuses_pickle_payload(tmp_path):
    marker = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"state_dict": Payload()}))
    result = invoke("inspect", tmp_path / "evil.pth")
    assert result.exit_code == 3 and "refused" in result.output
    assert not marker.exists()
    assert "Traceback" not in result.output


def test_evaluate_uses_metadata_and_reports_json(toy):
    result = invoke("evaluate", toy["model"], "--data", toy["data"], "--json", "--quiet")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["schema"] == "bdclean.report/1"
    metrics = report["metrics"]
    assert metrics["clean_acc"]["n"] == 90
    assert metrics["asr"]["n"] == 60  # target-class images excluded from ASR
    assert report["checkpoint"]["resolved_from"]["arch"] == "metadata"
    lo, hi = metrics["clean_acc"]["ci95"]
    assert lo <= metrics["clean_acc"]["value"] <= hi


def test_evaluate_table_on_stdout(toy):
    result = invoke("evaluate", toy["model"], "--data", toy["data"], "--quiet")
    assert result.exit_code == 0 and "C-Acc" in result.stdout and "ASR" in result.stdout


def test_evaluate_gates_exit_1(toy):
    result = invoke("evaluate", toy["model"], "--data", toy["data"], "--min-acc", "100%", "--quiet")
    assert result.exit_code == 1 and "gate min-acc FAILED" in result.output
    result = invoke("evaluate", toy["model"], "--data", toy["data"], "--min-acc", "0.0", "--max-asr", "1", "--quiet")
    assert result.exit_code == 0


def test_evaluate_eval_limit(toy):
    report = json.loads(invoke("evaluate", toy["model"], "--data", toy["data"], "--eval-limit", "30", "--json").stdout)
    assert report["metrics"]["clean_acc"]["n"] == 30 and report["data"]["eval_limited"]


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["--data", "{data}", "--trigger", "nosuchtrigger"], 2, "trigger"),
        (["--data", "{data}", "--device", "cuda:7"], 2, "device"),
        (["--data", "{data}", "--device", "tpu"], 2, "device"),
        (["--data", "{root}/nope"], 2, "nope"),
        (["--data", "{data}", "--arch", "resnet18"], 2, "missing"),
        (["--data", "{data}", "--max-asr", "7"], 2, "out of range"),
        (["--data", "{data}", "--target", "9"], 2, "target"),
        (["--data", "{data}", "--mean", "0.5,0.5"], 2, "normalisation"),
        ([], 2, "--data is required"),
    ],
)
def test_evaluate_error_paths(toy, args, code, message):
    if "cuda" in " ".join(args) and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    args = [a.format(data=toy["data"], root=toy["root"]) for a in args]
    result = invoke("evaluate", toy["model"], *args, "--quiet")
    assert result.exit_code == code, result.output
    assert message.lower() in result.output.lower()
    assert "Traceback" not in result.output


def test_evaluate_wrong_class_count(toy, tmp_path):
    other = make_npz_dataset(tmp_path / "five", classes=5)
    result = invoke("evaluate", toy["model"], "--data", other, "--quiet")
    assert result.exit_code == 2 and "3 classes but the data has 5" in result.output


def test_evaluate_bad_trigger_yaml(toy, tmp_path):
    spec = tmp_path / "t.yaml"
    spec.write_text("type: patch\nsize: 99\n")
    result = invoke("evaluate", toy["model"], "--data", toy["data"], "--trigger", spec, "--quiet")
    assert result.exit_code == 2 and "size" in result.output
    spec.write_text("type: [unclosed\n")
    assert invoke("evaluate", toy["model"], "--data", toy["data"], "--trigger", spec).exit_code == 2


def test_evaluate_bad_config(toy, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("!!python/object/apply:os.system ['echo hi']\n")
    result = invoke("evaluate", toy["model"], "--data", toy["data"], "--config", cfg)
    assert result.exit_code == 2 and "YAML" in result.output


def test_evaluate_config_file_supplies_options(toy, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"data: {toy['data']}\neval-limit: 45\ndevice: cpu\n")
    report = json.loads(invoke("evaluate", toy["model"], "--config", cfg, "--json").stdout)
    assert report["metrics"]["clean_acc"]["n"] == 45


def test_evaluate_missing_and_corrupt_checkpoint(toy, tmp_path):
    assert invoke("evaluate", tmp_path / "missing.pt", "--data", toy["data"]).exit_code == 2
    (tmp_path / "bad.pt").write_bytes(b"\x80\x04garbage")
    result = invoke("evaluate", tmp_path / "bad.pt", "--data", toy["data"])
    assert result.exit_code == 2 and "Traceback" not in result.output


@pytest.mark.parametrize("method", ["ft", "lp", "fe-tuning", "ft-init", "fst"])
def test_purify_each_method_writes_outputs(toy, tmp_path, method):
    out = tmp_path / method
    result = invoke(
        "purify",
        toy["model"],
        "--method",
        method,
        "--data",
        toy["data"],
        "--out",
        out,
        "--clean-count",
        "60",
        "--epochs",
        "2",
        "--batch-size",
        "16",
        "--json",
        "--quiet",
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["method"]["name"] == method and len(report["history"]) == 2
    for name in ("purified.safetensors", "report.json", "report.md", "config.yaml", "clean_indices.txt"):
        assert (out / name).exists(), name
    assert len((out / "clean_indices.txt").read_text().split()) == 60
    from backdoor_cli.checkpoint import read_checkpoint

    purified, original = read_checkpoint(out / "purified.safetensors"), read_checkpoint(toy["model"])
    assert {k: v.shape for k, v in purified.state_dict.items()} == {k: v.shape for k, v in original.state_dict.items()}
    meta = purified.metadata
    assert meta["purification"]["method"] == method and meta["purification"]["input_sha256"] == original.sha256
    assert meta["arch"] == "test_tiny" and meta["normalization"]["mean"]
    # The purified weights evaluate with no architecture or normalisation flags.
    again = invoke("evaluate", out / "purified.safetensors", "--data", toy["data"], "--json")
    assert again.exit_code == 0
    assert json.loads(again.stdout)["metrics"]["asr"]["k"] == report["after"]["asr"]["k"]


def test_purify_refuses_existing_outputs_then_force(toy, tmp_path):
    args = [
        "purify",
        toy["model"],
        "--data",
        toy["data"],
        "--out",
        tmp_path,
        "--clean-count",
        "30",
        "--epochs",
        "1",
        "--quiet",
    ]
    assert invoke(*args).exit_code == 0
    result = invoke(*args)
    assert result.exit_code == 2 and "--force" in result.output
    assert invoke(*args, "--force").exit_code == 0


def test_purify_never_overwrites_input(toy, tmp_path):
    import shutil

    src = tmp_path / "purified.safetensors"
    shutil.copy(toy["model"], src)
    before = src.read_bytes()
    result = invoke("purify", src, "--data", toy["data"], "--out", tmp_path, "--force", "--clean-count", "30")
    assert result.exit_code == 2 and "overwrite the input" in result.output
    assert src.read_bytes() == before


def test_purify_gate_fails_after_writing(toy, tmp_path):
    result = invoke(
        "purify",
        toy["model"],
        "--data",
        toy["data"],
        "--out",
        tmp_path,
        "--clean-count",
        "30",
        "--epochs",
        "1",
        "--min-acc",
        "100%",
        "--max-acc-drop",
        "0%",
        "--quiet",
    )
    assert result.exit_code == 1 and "FAILED" in result.output
    assert (tmp_path / "purified.safetensors").exists() and (tmp_path / "report.json").exists()
    assert json.loads((tmp_path / "report.json").read_text())["passed"] is False


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "magic"], "unknown --method"),
        (["--clean-count", "1"], "class"),
        (["--lr", "-1"], "lr"),
        (["--clean-count", "20", "--clean-fraction", "0.1"], "both"),
    ],
)
def test_purify_error_paths(toy, tmp_path, args, message):
    result = invoke("purify", toy["model"], "--data", toy["data"], "--out", tmp_path / "o", *args, "--quiet")
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "o" / "purified.safetensors").exists()


def test_purify_requires_out(toy):
    result = invoke("purify", toy["model"], "--data", toy["data"])
    assert result.exit_code == 2 and "--out" in result.output


def test_purify_with_own_clean_data(toy, tmp_path):
    clean = make_npz_dataset(tmp_path / "clean", n_train=30, n_test=30, seed=5)
    result = invoke(
        "purify",
        toy["model"],
        "--data",
        toy["data"],
        "--out",
        tmp_path / "o",
        "--clean-data",
        clean / "train.npz",
        "--epochs",
        "1",
        "--json",
        "--quiet",
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["clean_data"]["images"] == 30


def test_compare_table_json_markdown(toy, tmp_path):
    invoke(
        "purify",
        toy["model"],
        "--data",
        toy["data"],
        "--out",
        tmp_path / "fst",
        "--clean-count",
        "30",
        "--epochs",
        "1",
        "--method",
        "fst",
        "--quiet",
    )
    purified = tmp_path / "fst" / "purified.safetensors"
    result = invoke("compare", toy["model"], purified, "--data", toy["data"], "--json", "--quiet")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [r["reference"] for r in report["rows"]] == [True, False]
    assert report["rows"][1]["method"] == "fst" and report["rows"][1]["der"] is not None
    assert report["rows"][0]["drift"]["total_l2"] == 0 and report["rows"][1]["drift"]["total_l2"] > 0
    md = invoke("compare", toy["model"], purified, "--data", toy["data"], "--markdown", "--quiet")
    assert md.exit_code == 0 and md.stdout.startswith("| checkpoint")
    assert "| ASR without trigger |" in md.stdout.splitlines()[0]
    assert report["rows"][1]["metrics"]["asr_no_trigger"]["n"] == report["rows"][1]["metrics"]["asr"]["n"]
    # the change from the reference, counted on the same images, for every compared row
    ref, row = report["rows"][0], report["rows"][1]
    assert ref["paired"] is None
    acc = row["paired"]["clean_acc"]
    assert acc["gained"] - acc["lost"] == row["metrics"]["clean_acc"]["k"] - ref["metrics"]["clean_acc"]["k"]
    assert row["paired"]["asr"]["n"] == row["metrics"]["asr"]["n"] and acc["ci95"][0] <= acc["value"]
    assert "Against the reference, image by image" in md.stdout and "purified.safetensors: C-Acc " in md.stdout
    table = invoke("compare", toy["model"], purified, "--data", toy["data"], "--quiet")
    assert "DER" in table.stdout and "purified.safetensors: C-Acc " in table.stdout
    gated = invoke("compare", toy["model"], purified, "--data", toy["data"], "--min-acc", "100%", "--quiet")
    assert gated.exit_code == 1
    assert invoke("compare", toy["model"], "--data", toy["data"]).exit_code == 2


def test_train_error_paths(toy, tmp_path):
    result = invoke("train", "--data", toy["data"], "--out", tmp_path / "m.safetensors", "--poison-rate", "0.1")
    assert result.exit_code == 2 and "--trigger" in result.output
    result = invoke("train", "--data", toy["data"], "--out", tmp_path / "m.safetensors", "--arch", "nosuch")
    assert result.exit_code == 2
    result = invoke("train", "--data", toy["data"], "--out", toy["model"], "--arch", "test_tiny", "--epochs", "1")
    assert result.exit_code == 2 and "--force" in result.output


def test_train_clean_model_json(toy, tmp_path):
    result = invoke(
        "train",
        "--arch",
        "test_tiny",
        "--data",
        toy["data"],
        "--out",
        tmp_path / "clean.safetensors",
        "--epochs",
        "1",
        "--holdout-fraction",
        "0.1",
        "--json",
        "--quiet",
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["metrics"]["asr"] is None and report["poisoned_images"] == 0
    from backdoor_cli.checkpoint import read_checkpoint

    meta = read_checkpoint(tmp_path / "clean.safetensors").metadata
    assert len(meta["holdout_indices"]) == 24


def test_train_without_out_names_the_file_after_the_run(toy, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke(
        "train",
        "--arch",
        "test_tiny",
        "--data",
        toy["data"],
        "--trigger",
        "badnets",
        "--poison-rate",
        "0.1",
        "--epochs",
        "1",
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "test_tiny-data-badnets-p0.1.safetensors").is_file()
    assert "test_tiny-data-badnets-p0.1.safetensors" in result.stderr
    again = invoke(
        "train",
        "--arch",
        "test_tiny",
        "--data",
        toy["data"],
        "--trigger",
        "badnets",
        "--poison-rate",
        "0.1",
        "--epochs",
        "1",
    )
    assert again.exit_code == 2 and "--force" in again.stderr  # a second run never silently replaces the first


def test_alpha_advice_only_for_alpha_methods_past_the_threshold():
    from backdoor_cli.usecases.purify import ALPHA_ADVICE_DROP, alpha_advice

    assert alpha_advice(True, 0.2, ALPHA_ADVICE_DROP + 0.05).startswith("clean accuracy fell by 15.0 points")
    assert "--alpha" in alpha_advice(True, 0.2, 0.3)
    assert alpha_advice(True, 0.2, ALPHA_ADVICE_DROP) is None  # at the threshold: no advice
    assert alpha_advice(False, None, 0.5) is None  # ft, lp, ...: alpha does not apply


@pytest.mark.parametrize("method,advised", [("fst", True), ("ft", False)])
def test_purify_warns_about_alpha_when_fst_costs_accuracy(toy, tmp_path, monkeypatch, method, advised):
    import backdoor_cli.usecases.purify as purify

    monkeypatch.setattr(purify, "ALPHA_ADVICE_DROP", -1.0)  # any change in accuracy counts as a large drop
    result = invoke(
        "purify",
        toy["model"],
        "--method",
        method,
        "--data",
        toy["data"],
        "--out",
        tmp_path / "o",
        "--clean-count",
        "30",
        "--epochs",
        "1",
        "--quiet",
    )
    assert result.exit_code == 0, result.output
    assert ("smaller --alpha" in " ".join(result.output.split())) is advised


def test_version_prints_the_package_version_and_exits_0():
    from backdoor_cli import __version__

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"bdclean {__version__}"
