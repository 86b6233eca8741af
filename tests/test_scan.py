"""bdclean scan: the inversion mechanics on tiny planted and clean models, the outlier test, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from backdoor_cli.cli import app
from backdoor_cli.scanning.inversion import anomaly_indices
from backdoor_cli.triggers import build_trigger, load_trigger_spec
from backdoor_cli.usecases.scan import class_output_names
from helpers import CLASSES, SIZE, make_template_dataset
from helpers import train_small_cnn as train

SCAN_FLAGS = ["--steps", "100", "--batch-size", "32", "--clean-count", "160", "--device", "cpu", "--quiet"]
QUICK_FLAGS = ["--steps", "10", "--batch-size", "16", "--clean-count", "40", "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def subjects(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("scan")
    data = make_template_dataset(root / "data")
    # A strong BadNets patch (3x3 white, bottom-right, 10% poisoned, target 0) and the same model without it.
    backdoored = train(data, root / "bd.safetensors", "--trigger", "badnets", "--poison-rate", "0.1")
    clean = train(data, root / "clean.safetensors")
    return {"root": root, "data": data, "backdoored": backdoored, "clean": clean}


def run_scan(path: Path, data: Path, *args: str):
    return CliRunner().invoke(app, ["scan", str(path), "--data", str(data), *args])


@pytest.fixture(scope="module")
def backdoored_scan(subjects) -> dict:
    """One full scan of the planted model through the CLI, with the gate, --json and --out."""
    out = subjects["root"] / "scan-out"
    result = run_scan(
        subjects["backdoored"], subjects["data"], "--out", str(out), "--json", "--fail-on-detect", *SCAN_FLAGS
    )
    return {"result": result, "out": out, "doc": json.loads(result.stdout) if result.stdout.strip() else None}


@pytest.fixture(scope="module")
def clean_scan(subjects):
    return run_scan(subjects["clean"], subjects["data"], "--json", "--fail-on-detect", *SCAN_FLAGS)


def test_anomaly_index_is_the_robust_z_score_on_the_small_side():
    norms = [100.0, 110.0, 90.0, 105.0, 95.0, 20.0]
    anomaly, median, mad = anomaly_indices(norms)
    assert median == pytest.approx(97.5)
    assert mad == pytest.approx(7.5)  # |deviations| 2.5 12.5 7.5 7.5 2.5 77.5 -> median 7.5
    assert anomaly[5] == pytest.approx((97.5 - 20) / (1.4826 * 7.5))
    assert anomaly[1] < 0  # larger than typical: negative, never flagged


def test_zero_spread_flags_nothing_instead_of_everything():
    anomaly, _, mad = anomaly_indices([10.0, 10.0, 10.0, 10.0, 1.0])
    assert mad == 0 and anomaly == [0.0] * 5


def test_planted_patch_is_found_and_the_gate_fails(backdoored_scan):
    result, doc = backdoored_scan["result"], backdoored_scan["doc"]
    assert result.exit_code == 1, result.output  # --fail-on-detect
    assert doc["kind"] == "scan" and doc["flagged_classes"] == [0], [c["mask_l1"] for c in doc["classes"]]
    assert len(doc["classes"]) == CLASSES and doc["classes"][0]["flagged"]
    found, others = doc["classes"][0], doc["classes"][1:]
    assert found["success"] >= 0.9
    assert found["mask_l1"] < 0.5 * min(c["mask_l1"] for c in others)
    assert (
        found["verdict"].startswith("class 0 is a likely backdoor target") and "pixel pattern sends" in found["verdict"]
    )
    assert doc["backdoor_suspected"] and "flagged when" in doc["decision_rule"]
    # how local the flagged reconstruction is: measured for flagged classes only, and said in words
    assert 0 <= found["local_share"] <= 1.5 and all("local_share" not in c for c in others)
    assert ("; local: its densest window keeps" in found["verdict"]) != ("spread over the image" in found["verdict"])
    assert "locality" in doc["timings"]


def test_locality_is_said_in_words_for_a_flagged_class():
    from backdoor_cli.reports.scan_report import locality_words

    assert locality_words(None, 0) == "" and locality_words({1: 0.9}, 0) == ""
    assert (
        locality_words({0: 0.97}, 0) == "; local: its densest window keeps 97% of its effect, as a patch trigger's does"
    )
    spread = locality_words({0: 0.2}, 0)
    assert "spread over the image: its densest window keeps only 20% of its effect" in spread
    assert "blend, signal or warp" in spread


def test_reconstruction_is_a_compact_bright_patch(backdoored_scan):
    from PIL import Image

    names = class_output_names(0)
    mask = torch.from_numpy(np.asarray(Image.open(backdoored_scan["out"] / names["mask"]), dtype=np.float32) / 255)
    pattern = torch.from_numpy(np.asarray(Image.open(backdoored_scan["out"] / names["image"]), dtype=np.float32) / 255)
    assert mask.shape == (SIZE, SIZE) and pattern.shape == (SIZE, SIZE, 3)
    # Like the planted 3x3 white patch: a few strong, white pixels, not a faint wash over the image. (Not
    # necessarily in its corner: global pooling makes this model respond to the patch anywhere; a 16-px
    # mask of two white blobs, one near the corner, is what this test saw.)
    heavy = mask > 0.5
    assert 1 <= int(heavy.sum()) <= 18, int(heavy.sum())
    assert pattern[heavy].mean() > 0.8
    assert mask[mask > 0.1].sum() / mask.sum() > 0.6


def test_reconstructed_trigger_is_a_working_bdclean_spec(subjects, backdoored_scan):
    out, names = backdoored_scan["out"], class_output_names(0)
    for name in list(names.values()) + ["scan.json"]:
        assert (out / name).is_file(), name
    assert not (out / class_output_names(1)["spec"]).exists()  # only flagged classes get files
    spec = load_trigger_spec(str(out / names["spec"]))
    assert spec.type == "image" and spec.target == 0
    trigger = build_trigger(spec, (SIZE, SIZE, 3))
    assert trigger.apply(torch.zeros(2, SIZE, SIZE, 3, dtype=torch.uint8)).shape == (2, SIZE, SIZE, 3)
    # evaluate --trigger with it: the 8-bit saved trigger still fires on the backdoored model's test images.
    evaluated = CliRunner().invoke(
        app,
        [
            "evaluate",
            str(subjects["backdoored"]),
            "--data",
            str(subjects["data"]),
            "--trigger",
            str(out / names["spec"]),
            "--device",
            "cpu",
            "--json",
            "--quiet",
        ],
    )
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout)["metrics"]["asr"]["value"] > 0.8


def test_existing_out_is_refused_before_any_work(subjects, backdoored_scan):
    again = run_scan(subjects["backdoored"], subjects["data"], "--out", str(backdoored_scan["out"]), *SCAN_FLAGS)
    assert again.exit_code == 2, again.output
    assert "--force" in again.output


def test_clean_model_flags_nothing_and_passes_the_gate(clean_scan):
    assert clean_scan.exit_code == 0, clean_scan.output
    doc = json.loads(clean_scan.stdout)
    assert doc["flagged_classes"] == [], [(c["mask_l1"], c["anomaly_index"]) for c in doc["classes"]]
    assert not doc["backdoor_suspected"] and doc["verdict"].startswith("no class flagged")
    # what a clean verdict cannot rule out, the SIG family among it (docs/purification.md, twelfth session)
    assert "does not rule out warping, signal (SIG), sample-specific or full-image blended triggers" in doc["verdict"]


def test_text_report_states_verdicts_and_the_rule(subjects):
    result = run_scan(subjects["backdoored"], subjects["data"], *QUICK_FLAGS)  # format only: 10 steps
    assert result.exit_code == 0, result.output  # no --fail-on-detect: a finding is not a failure
    assert "trigger inversion per class" in result.stdout
    assert "verdict:" in result.stdout and "rule:" in result.stdout and "anomaly index" in result.stdout
    assert "local" in result.stdout  # the table's locality column


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "--data is required"),
        (["--steps", "0"], "--steps"),
        (["--anomaly-threshold", "0"], "--anomaly-threshold"),
        (["--clean-count", "5", "--clean-data", "x.npz"], "cannot be combined"),
    ],
)
def test_bad_input_exits_2(subjects, args, message):
    data = [] if not args else ["--data", str(subjects["data"])]
    result = CliRunner().invoke(app, ["scan", str(subjects["backdoored"]), *data, *args, "--device", "cpu", "--quiet"])
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_missing_checkpoint_exits_2(subjects, tmp_path):
    result = run_scan(tmp_path / "nope.safetensors", subjects["data"], "--quiet")
    assert result.exit_code == 2, result.output


def test_clean_data_replaces_the_training_split(subjects):
    flags = [f for f in QUICK_FLAGS if f not in ("--clean-count", "40")]
    result = run_scan(
        subjects["backdoored"], subjects["data"], "--clean-data", str(subjects["data"] / "train.npz"), "--json", *flags
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["data"]["scan_source"].endswith("train.npz") and doc["data"]["scan_images"] == 1600
    assert doc["data"]["indices_sha256"] is None


# --- --clean-reference: a shortcut of the data or a planted trigger --------------------------------------


def test_a_clean_reference_that_ignores_the_reconstruction_keeps_the_backdoor_suspected(subjects):
    ref = ["--clean-reference", str(subjects["clean"])]
    result = run_scan(subjects["backdoored"], subjects["data"], "--json", "--fail-on-detect", *ref, *SCAN_FLAGS)
    assert result.exit_code == 1, result.output  # the gate fails on a suspected backdoor
    doc = json.loads(result.stdout)
    reference = doc["reference"]
    assert doc["suspected_classes"] == [0] and doc["backdoor_suspected"]
    assert doc["co_flags"] == [] and not any(c["co_flag"] for c in doc["classes"])  # one flag: nothing beside it
    assert reference["usable"] and reference["natural"] == [] and reference["rates"]["0"]["value"] < 0.35
    assert "the clean reference ignores its reconstruction" in doc["verdict"]


def test_a_class_the_clean_reference_follows_too_is_a_shortcut_not_a_backdoor(subjects):
    """The model is its own reference here, so its flagged class is "followed" by the reference: the
    plumbing, not the threshold, is under test (the threshold's measurements are in docs/purification.md)."""
    ref = ["--clean-reference", str(subjects["backdoored"])]
    result = run_scan(subjects["backdoored"], subjects["data"], "--json", "--fail-on-detect", *ref, *SCAN_FLAGS)
    assert result.exit_code == 0, result.output  # nothing suspected: the gate passes
    doc = json.loads(result.stdout)
    assert doc["flagged_classes"] == [0] and doc["suspected_classes"] == [] and not doc["backdoor_suspected"]
    assert doc["reference"]["natural"] == [0]
    assert doc["verdict"].startswith("no backdoor suspected") and "shortcut of the data" in doc["verdict"]
    assert "shortcut of the data" in doc["classes"][0]["verdict"] and doc["classes"][0]["flagged"]
    text = run_scan(subjects["backdoored"], subjects["data"], *ref, *SCAN_FLAGS)
    assert (
        text.exit_code == 0 and "shortcut" in text.stdout and "no backdoor suspected" in " ".join(text.stdout.split())
    )


def test_a_clean_reference_with_nothing_flagged_is_used_only_on_a_candidate(subjects):
    ref = ["--clean-reference", str(subjects["backdoored"])]
    result = run_scan(subjects["clean"], subjects["data"], "--json", *ref, *SCAN_FLAGS)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["flagged_classes"] == []
    top = max(doc["classes"], key=lambda c: c["anomaly_index"])
    if top["anomaly_index"] < 1.0:  # nothing stands out: the reference is recorded and not used
        assert doc["candidate"] is None and doc["reference"] == {"checkpoint": ref[1], "rates": {}}
    else:  # the smallest mask is the candidate, tried on the reference alone
        assert doc["candidate"]["class"] == top["class"] and list(doc["reference"]["rates"]) == [str(top["class"])]


def test_a_candidate_below_the_threshold_the_reference_ignores_is_named_but_not_gated(subjects):
    """With a threshold nothing reaches, the planted class is the smallest mask: the clean reference ignores its
    reconstruction, so the verdict names it as a possible backdoor; --fail-on-detect gates on flags alone."""
    ref = ["--clean-reference", str(subjects["clean"]), "--anomaly-threshold", "50"]
    result = run_scan(subjects["backdoored"], subjects["data"], "--json", "--fail-on-detect", *ref, *SCAN_FLAGS)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["flagged_classes"] == [] and not doc["backdoor_suspected"]
    assert doc["candidate"]["class"] == 0 and doc["candidate"]["planted"]
    assert doc["reference"]["rates"]["0"]["value"] < 0.35
    assert (
        "may be a backdoor the outlier test misses" in doc["verdict"] and "purify --clean-reference" in doc["verdict"]
    )
    own = ["--clean-reference", str(subjects["backdoored"]), "--anomaly-threshold", "50"]
    followed = run_scan(subjects["backdoored"], subjects["data"], *own, *SCAN_FLAGS)
    assert followed.exit_code == 0, followed.output
    assert "follows its reconstruction too" in " ".join(followed.stdout.split())


def test_a_missing_clean_reference_is_named_before_the_scan(subjects, tmp_path):
    missing = tmp_path / "nope.safetensors"
    result = run_scan(subjects["backdoored"], subjects["data"], "--clean-reference", str(missing), *QUICK_FLAGS)
    assert result.exit_code == 2, result.output
    assert "--clean-reference" in result.output and "nope.safetensors" in result.output


def test_a_clean_reference_of_another_task_is_refused_by_name(subjects, tmp_path):
    """A reference with one class more (its head and its recorded class count): not a model of this task."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(subjects["clean"]), "pt") as f:
        meta = f.metadata()
        state = {k: f.get_tensor(k) for k in f.keys()}
    bdclean = json.loads(meta["bdclean"])
    bdclean["num_classes"] = CLASSES + 1
    head = [k for k, v in state.items() if v.shape[:1] == (CLASSES,)]
    for key in head:  # the head's weight and bias grow by one class
        state[key] = torch.cat([state[key], state[key][:1]])
    other = tmp_path / "other-task.safetensors"
    save_file(state, str(other), metadata={**meta, "bdclean": json.dumps(bdclean)})
    result = run_scan(subjects["backdoored"], subjects["data"], "--clean-reference", str(other), *QUICK_FLAGS)
    assert result.exit_code == 2, result.output
    said = " ".join(result.output.split())
    assert "the model has 9 classes but the data has 8" in said and "a clean model of the same task" in said, said
