"""Smoke test of benchmarks/bench_purify.py: --quick on the bundled MNIST sample, JSON shape only.

No timing assertions: the figures depend on the machine and on whoever else is using it.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
STAGES = ("load", "evaluate_before", "tune", "evaluate_after", "write")


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_purify", REPO / "benchmarks" / "bench_purify.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def _run_quick(bench, tmp_path, *extra: str) -> tuple[int, dict]:
    """bench --quick on the bundled MNIST sample: (exit code, the JSON it wrote)."""
    out = tmp_path / "bench.json"
    code = bench.main(
        [
            "--quick",
            "--device",
            "cpu",
            "--data",
            str(REPO / "backdoor_cli" / "assets" / "mnist_sample"),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--json-out",
            str(out),
            *extra,
        ]
    )
    return code, json.loads(out.read_text())


def test_quick_benchmark_writes_both_pipelines_and_ratio(tmp_path, capsys):
    bench = _load_bench()
    code, result = _run_quick(bench, tmp_path, "--repeat", "2")
    repeats = result["repeats"]
    assert repeats["count"] == 2 and len(repeats["totals"]) == 2 and len(repeats["total_ratios"]) == 2
    assert min(repeats["total_ratios"]) <= repeats["median_total_ratio"] <= max(repeats["total_ratios"])
    first = repeats["totals"][0]
    assert first["bdclean"] == round(result["bdclean"]["total"], 3)  # the reported stages are the first pair's
    # Exit code follows the comparability check; both outcomes are legitimate for a 1-epoch toy run.
    assert code == (0 if result["check"]["passed"] else 1)
    for name in ("bdclean", "reference"):
        run = result[name]
        assert set(STAGES) <= set(run["stages"]), name
        assert all(run["stages"][s] >= 0 for s in STAGES)
        assert run["total"] > 0
        assert run["after"]["clean_acc"]["n"] == run["before"]["clean_acc"]["n"] > 0
        assert run["after"]["asr"] is not None
        assert set(run["throughput"]) == {
            "evaluate_before_images_per_s",
            "evaluate_after_images_per_s",
            "tune_images_per_s",
        }
    assert result["speedup"]["total"] > 0
    assert set(STAGES) <= set(result["speedup"])
    assert result["device"]["name"]
    assert result["settings"]["transforms"]
    # Same checkpoint, same images: the two pipelines must agree before tuning.
    assert result["check"]["same_eval_images"] is True
    assert result["bdclean"]["before"]["clean_acc"]["n"] == result["reference"]["before"]["clean_acc"]["n"]
    printed = capsys.readouterr().out
    assert "speed-up (reference / bdclean)" in printed and "total ratio over 2 repeats: median" in printed


def test_profile_step_counts_arithmetic_and_groups_the_time(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("profile_step", REPO / "benchmarks" / "profile_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "profile.json"
    assert (
        module.main(
            [
                "--arch",
                "test_tiny",
                "--device",
                "cpu",
                "--batch-size",
                "8",
                "--size",
                "8",
                "--steps",
                "2",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    # TinyNet: a 3->4 3x3 conv on 8x8 (8*8*4*27 MACs) and a 4->10 linear head
    assert result["macs_per_image"] == 8 * 8 * 4 * 27 + 4 * 10
    shares = result["profile_channels_last"]
    assert abs(sum(shares.values()) - 1.0) < 0.01
    assert "convolution forward" in shares and "convolution backward" in shares
    for fmt in ("contiguous", "channels_last"):
        assert result[fmt]["step_ms"] > 0 and result[fmt]["eval_images_per_s"] > 0
    assert "share of a channels_last training step" in capsys.readouterr().out


def test_repeat_must_be_positive(capsys):
    bench = _load_bench()
    assert bench.main(["--quick", "--device", "cpu", "--repeat", "0"]) == 2
    assert "--repeat" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the reference half

EXAMPLES = REPO / "examples" / "triggers"
# Every trigger kind, at fixed and named positions, with picture patches and a masked picture:
# the reference builds its triggered test set image by image and must get bdclean's pixels.
POISON_SPECS = [
    ({"type": "patch", "target": 0, "size": 3, "position": "bottom-right", "color": 255}, (1, 3)),
    ({"type": "patch", "target": 3, "size": 4, "position": [2, 5], "color": [255, 255, 0]}, (3,)),
    ({"type": "patch", "target": 1, "size": 5, "position": "center", "color": 0}, (1, 3)),
    ({"type": "patch", "target": 2, "image": "trigger.png", "position": "top-left"}, (1, 3)),
    ({"type": "blend", "target": 0, "alpha": 0.2, "pattern": "noise", "seed": 0}, (1, 3)),
    ({"type": "blend", "target": 0, "alpha": 0.1, "image": "trigger.png"}, (3,)),
    ({"type": "sig", "target": 0, "amplitude": 40.0, "frequency": 6.0}, (1, 3)),
    ({"type": "wanet", "target": 0, "k": 4, "s": 0.5, "seed": 0, "grid_rescale": 1.0}, (3,)),
    ({"type": "image", "target": 4, "image": "trigger.png", "mask": "mask.png", "position": [20, 3]}, (1, 3)),
]


@pytest.mark.parametrize("spec, channels", POISON_SPECS, ids=lambda v: v.get("type", "") if isinstance(v, dict) else "")
def test_per_image_poisoned_set_equals_bdclean_trigger(spec, channels):
    from backdoor_cli.triggers import build_trigger, make_poisoned_eval_set, parse_trigger_spec

    bench = _load_bench()
    for c in channels:
        rng = np.random.default_rng(c)
        x = rng.integers(0, 256, size=(40, 32, 32, c), dtype=np.uint8)
        y = (np.arange(40) % 10).astype(np.int64)
        trigger = build_trigger(parse_trigger_spec(dict(spec), EXAMPLES, source="test"), (32, 32, c))
        px, py = bench.poison_test_set_per_image(trigger, x, y)
        ex, ey, _ = make_poisoned_eval_set(trigger, torch.from_numpy(x), torch.from_numpy(y))
        assert px.dtype == np.uint8 and px.shape == tuple(ex.shape), (spec, c)
        assert np.array_equal(px, ex.numpy()), (spec, c)
        assert np.array_equal(py, ey.numpy()) and trigger.target not in set(py.tolist())
        assert not np.array_equal(px, x[y != trigger.target])  # the trigger changed something


def _tiny_job(bench, tmp_path, **overrides):
    values = dict(
        checkpoint=tmp_path / "none",
        data_dir=tmp_path,
        arch="test_tiny",
        num_classes=10,
        in_channels=3,
        head="fc",
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        flip=True,
        trigger_spec={},
        clean_indices=np.arange(20),
        eval_indices=None,
        lr=0.05,
        epochs=3,
        alpha=0.2,
        batch_size=8,
        momentum=0.9,
        weight_decay=0.0,
        augment=True,
        seed=0,
        num_workers=0,
        out_dir=tmp_path,
    )
    values.update(overrides)
    return bench.ReferenceJob(**values)


def _tiny_model():
    from backdoor_cli.models import build_model

    torch.manual_seed(0)
    return build_model("test_tiny", 10, 3), "fc"


def test_reference_fst_follows_the_official_loop(tmp_path):
    """Head weight and bias re-initialised; W rescaled to ||W_orig|| after every step (the bias
    never); every parameter trained; BatchNorm in train mode; cosine schedule stepped per epoch."""
    bench = _load_bench()
    model, head_name = _tiny_model()
    head = model.get_submodule(head_name)
    original_w, original_b = head.weight.detach().clone(), head.bias.detach().clone()
    norm = float(original_w.norm())
    body_before = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith(head_name)}
    job = _tiny_job(bench, tmp_path, head=head_name)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(20, 8, 8, 3), dtype=np.uint8)
    y = (np.arange(20) % 10).astype(np.int64)
    train_tf, _, _ = bench.build_transforms(8, True, job.mean, job.std, True)
    loader = bench._loader(bench.PilDataset(x, y, train_tf), job.batch_size, True, 0, torch.device("cpu"), seed=0)

    seen = []

    def on_step(step):
        seen.append((step, float(head.weight.detach().norm())))

    torch.manual_seed(0)
    history = bench.reference_fst(model, head, loader, job, torch.device("cpu"), on_step=on_step)
    assert len(seen) == job.epochs * 3  # 20 images, batch 8: 8 + 8 + 4, no batch dropped
    for _, w_norm in seen:
        assert abs(w_norm - norm) < 1e-4 * norm
    assert not torch.allclose(head.bias, original_b)  # re-initialised, then trained ...
    assert float(head.bias.detach().norm()) != pytest.approx(float(original_b.norm()))  # ... and never projected
    assert not torch.allclose(head.weight, original_w)
    # the lr each epoch ran at: cosine annealing with T_max = epochs, stepped once per epoch
    expected = [0.5 * job.lr * (1 + math.cos(math.pi * e / job.epochs)) for e in range(job.epochs)]
    assert [h["lr"] for h in history] == pytest.approx(expected)
    body_after = model.state_dict()
    moved = [k for k, v in body_before.items() if v.is_floating_point() and not torch.equal(v, body_after[k])]
    assert any("running_mean" in k for k in moved)  # BatchNorm statistics moved: train mode
    assert any(k.endswith("weight") and "running" not in k for k in moved)  # the body is tuned too


def test_reference_head_reinit_is_uniform_in_the_official_bound():
    bench = _load_bench()
    head = torch.nn.Linear(64, 10)
    torch.nn.init.constant_(head.weight, 5.0)
    torch.nn.init.constant_(head.bias, 5.0)
    torch.manual_seed(1)
    bench.reinitialise_head_as_official(head)
    bound = 1 / 8
    weight, bias = head.weight.detach(), head.bias.detach()
    assert float(weight.abs().max()) <= bound and float(bias.abs().max()) <= bound
    assert float(weight.std()) > 0.5 * bound / 3**0.5  # spread over the interval, not collapsed


def _run(value, asr):
    return {
        "before": {"clean_acc": {"value": 0.9}, "asr": {"value": 0.98}},
        "after": {"clean_acc": {"value": value}, "asr": {"value": asr}, "ra": {"value": 0.1}},
    }


def test_comparability_compares_the_seeds_medians_not_one_unlucky_seed():
    bench = _load_bench()
    args = bench.parse_args([])
    # one reference seed left the backdoor in (FST is unstable), the medians agree: PASS
    bd = [_run(0.80, 0.02), _run(0.81, 0.01), _run(0.79, 0.03)]
    ref = [_run(0.80, 0.45), _run(0.80, 0.02), _run(0.81, 0.015)]
    check = bench.compare_results(bd, ref, args)
    assert check["passed"], check["reasons"]
    assert check["seeds"] == 3 and check["reference_after"]["asr"]["max"] == pytest.approx(45.0)
    # the reference's median ASR is far off: FAIL, and the reason names the medians
    ref = [_run(0.80, 0.45), _run(0.80, 0.30), _run(0.81, 0.015)]
    check = bench.compare_results(bd, ref, args)
    assert not check["passed"] and any("median" in r for r in check["reasons"])
    # a single pair still works as before
    assert bench.compare_results(_run(0.8, 0.02), _run(0.79, 0.05), args)["passed"]


def test_quick_benchmark_over_seeds_reports_each_seed_and_the_spread(tmp_path, capsys):
    bench = _load_bench()
    code, result = _run_quick(bench, tmp_path, "--seeds", "3,5")
    assert code == (0 if result["check"]["passed"] else 1)
    assert [s["seed"] for s in result["seeds"]] == [3, 5] and result["settings"]["seeds"] == [3, 5]
    assert all(s["same_eval_images"] for s in result["seeds"]) and result["check"]["same_eval_images"] is True
    assert result["repeats"]["count"] == 2 and result["check"]["seeds"] == 2
    for half in ("bdclean", "reference"):
        spread = result["check"][f"{half}_after"]["asr"]
        values = [100 * s[half]["after"]["asr"]["value"] for s in result["seeds"]]
        assert spread["values"] == pytest.approx(values, abs=1e-3)
        assert spread["min"] <= spread["median"] <= spread["max"]
    # the first seed's pair is the one whose stages and figures are shown
    assert result["bdclean"]["after"]["asr"]["value"] == result["seeds"][0]["bdclean"]["after"]["asr"]["value"]
    printed = capsys.readouterr().out
    assert "per seed" in printed and "seed 5" in printed


def test_seeds_option_is_parsed():
    bench = _load_bench()
    assert bench.parse_seeds("0,1, 2") == [0, 1, 2]
    with pytest.raises(ValueError):
        bench.parse_seeds("0,,x")
    with pytest.raises(ValueError):
        bench.parse_seeds("1,1")
