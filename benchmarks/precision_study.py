#!/usr/bin/env python3
"""Does bf16 evaluation change bdclean's reported figures? fp32 against bf16 autocast, same model, same images.

    .venv/bin/python benchmarks/precision_study.py                      # the models below, full CIFAR-10 test set
    .venv/bin/python benchmarks/precision_study.py --model x.safetensors:blended --model y.th@resnet20

For each model it predicts the whole CIFAR-10 test set (and, with a trigger, the triggered copies of
its non-target images, as `bdclean evaluate` builds them) twice, in fp32 and in bf16 autocast, in
channels_last, and reports: how many predictions changed, C-Acc and ASR in each precision, the
difference in points, and that difference as a fraction of the 95% interval's half-width (the
figure a report prints next to the value). It also times both passes (images/s).

The answer sets precision.EVAL_BF16_ON_CPU: bf16 evaluation is the CPU default only if no reported
figure moves by more than a small fraction of its interval. Results: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from backdoor_cli.data.datasets import load_dataset  # noqa: E402
from backdoor_cli.evaluation.checked import CheckedStats  # noqa: E402
from backdoor_cli.evaluation.measure import build_eval_sets, predict  # noqa: E402
from backdoor_cli.evaluation.metrics import Rate  # noqa: E402
from backdoor_cli.precision import CHECKED_BF16, cpu_capability  # noqa: E402
from backdoor_cli.runtime import prepare_model  # noqa: E402
from backdoor_cli.subject import load_subject, normalization_tensors  # noqa: E402
from backdoor_cli.triggers import build_trigger, load_trigger_spec  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
IMAGENET_NORM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# name, checkpoint, arch, normalisation (None: from its metadata), trigger
DEFAULT_MODELS = (
    ("resnet20 (clean, shared)", SHARED / "checkpoints" / "resnet20-12fca82f.th", "resnet20", IMAGENET_NORM, None),
    ("resnet56 (clean, shared)", SHARED / "checkpoints" / "resnet56-4bfd9763.th", "resnet56", IMAGENET_NORM, None),
    (
        "resnet20 Blended 1% subject",
        REPO.parent / "main" / "runs" / "subjects" / "r20-blended-0.01.safetensors",
        None,
        None,
        "blended",
    ),
    (
        "simple_cnn Blended 5% (make bench's subject)",
        REPO / "benchmarks" / ".cache" / "cifar10-simple_cnn-blended-p0.05-e4-n10000-s0.safetensors",
        None,
        None,
        "blended",
    ),
)


def parse_model(text: str):
    """path[@arch][:trigger]"""
    path, _, trigger = text.partition(":") if not Path(text).exists() else (text, "", "")
    path, _, arch = path.partition("@")
    return (Path(path).name, Path(path), arch or None, None, trigger or None)


def timed_predict(model, x, mean, std, device, precision: str, batch_size: int, stats=None):
    predict(model, x[:batch_size], mean, std, device, batch_size, precision=precision)  # untimed: oneDNN set-up
    start = time.perf_counter()
    preds = predict(model, x, mean, std, device, batch_size, precision=precision, stats=stats)
    return preds, time.perf_counter() - start


def interval_fraction(a: Rate, b: Rate) -> float:
    """|a - b| as a fraction of the half-width of a's 95% Wilson interval."""
    half = (a.high - a.low) / 2
    return abs(a.value - b.value) / half if half > 0 else 0.0


def study(name, path: Path, arch, norm, trigger_name, bundle, device, batch_size: int) -> dict:
    mean_flag, std_flag = norm if norm else (None, None)
    subject = load_subject(str(path), bundle, arch=arch, mean=mean_flag, std=std_flag)
    model = prepare_model(subject.model, device).eval()
    mean, std = normalization_tensors(subject, device)
    trigger = None
    if trigger_name:
        trigger = build_trigger(load_trigger_spec(trigger_name), bundle.test.image_shape)
    sets = build_eval_sets(bundle.test, trigger, device)
    row = {"model": name, "checkpoint": str(path), "arch": subject.arch, "images": sets.clean.num_images}
    preds, seconds = {}, {}
    checked = CheckedStats()
    for precision in ("fp32", "bf16", CHECKED_BF16):
        stats = checked if precision == CHECKED_BF16 else None
        clean, t_clean = timed_predict(model, sets.clean.x, mean, std, device, precision, batch_size, stats)
        preds[precision] = {"clean": clean}
        seconds[precision] = t_clean
        if sets.poisoned is not None:
            poisoned, t_poison = timed_predict(model, sets.poisoned.x, mean, std, device, precision, batch_size, stats)
            preds[precision]["poisoned"] = poisoned
            seconds[precision] += t_poison
    n_images = sets.clean.num_images + (sets.poisoned.num_images if sets.poisoned is not None else 0)
    row["images_per_s"] = {p: round(n_images / s, 1) for p, s in seconds.items()}
    row["eval_speedup_bf16"] = round(seconds["fp32"] / seconds["bf16"], 2)
    # bf16 with the near-ties re-run in fp32 (evaluation/checked.py): must change nothing against fp32
    row["eval_speedup_checked"] = round(seconds["fp32"] / seconds[CHECKED_BF16], 2)
    row["checked"] = checked.to_dict()
    row["checked_changed_vs_fp32"] = sum(
        int((preds["fp32"][part] != preds[CHECKED_BF16][part]).sum()) for part in preds["fp32"]
    )
    preds.pop(CHECKED_BF16)
    acc = {p: Rate(int((preds[p]["clean"] == sets.clean.y).sum()), sets.clean.num_images) for p in preds}
    row["changed_clean"] = int((preds["fp32"]["clean"] != preds["bf16"]["clean"]).sum())
    row["clean_acc"] = {p: acc[p].value for p in acc}
    row["clean_acc_diff_points"] = round((acc["bf16"].value - acc["fp32"].value) * 100, 3)
    row["clean_acc_half_width_points"] = round((acc["fp32"].high - acc["fp32"].low) * 50, 3)
    row["clean_acc_interval_fraction"] = round(interval_fraction(acc["fp32"], acc["bf16"]), 3)
    if sets.poisoned is not None:
        n = sets.poisoned.num_images
        asr = {p: Rate(int((preds[p]["poisoned"] == sets.target).sum()), n) for p in preds}
        row["triggered_images"] = n
        row["changed_triggered"] = int((preds["fp32"]["poisoned"] != preds["bf16"]["poisoned"]).sum())
        row["asr"] = {p: asr[p].value for p in asr}
        row["asr_diff_points"] = round((asr["bf16"].value - asr["fp32"].value) * 100, 3)
        row["asr_half_width_points"] = round((asr["fp32"].high - asr["fp32"].low) * 50, 3)
        row["asr_interval_fraction"] = round(interval_fraction(asr["fp32"], asr["bf16"]), 3)
    return row


def markdown(rows: list[dict]) -> str:
    lines = [
        "| model | changed predictions (clean / triggered) | C-Acc fp32 → bf16 (Δ, share of ±CI) | "
        "ASR fp32 → bf16 (Δ, share of ±CI) | eval images/s fp32 → bf16 | checked bf16: changed vs fp32, "
        "images run in fp32, images/s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        changed = f"{r['changed_clean']} / {r['images']}"
        if "asr" in r:
            changed += f"; {r['changed_triggered']} / {r['triggered_images']}"
        acc = (
            f"{r['clean_acc']['fp32']:.2%} → {r['clean_acc']['bf16']:.2%} ({r['clean_acc_diff_points']:+.2f} pt, "
            f"{r['clean_acc_interval_fraction']:.2f} of ±{r['clean_acc_half_width_points']:.2f})"
        )
        asr = (
            (
                f"{r['asr']['fp32']:.2%} → {r['asr']['bf16']:.2%} ({r['asr_diff_points']:+.2f} pt, "
                f"{r['asr_interval_fraction']:.2f} of ±{r['asr_half_width_points']:.2f})"
            )
            if "asr" in r
            else "–"
        )
        speed = f"{r['images_per_s']['fp32']:.0f} → {r['images_per_s']['bf16']:.0f} ({r['eval_speedup_bf16']:.2f}×)"
        c = r["checked"]
        checked = (
            f"**{r['checked_changed_vs_fp32']}**, {c['fp32_images']} of {c['images']} "
            f"({c['fp32_images'] / max(c['images'], 1):.1%}), {r['images_per_s'][CHECKED_BF16]:.0f} "
            f"({r['eval_speedup_checked']:.2f}×)"
        )
        lines.append(f"| {r['model']} | {changed} | {acc} | {asr} | {speed} | {checked} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", help="path[@arch][:trigger]; repeatable (default: the study's models)")
    p.add_argument("--data", default=str(SHARED / "cifar10"))
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json-out", default=str(REPO / "benchmarks" / "results" / "precision-study.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    bundle = load_dataset(args.data, None, need_train=False)
    models = [parse_model(m) for m in args.model] if args.model else DEFAULT_MODELS
    rows = []
    for name, path, arch, norm, trigger in models:
        if not path.exists():
            print(f"[study] skipping {name}: {path} not found", file=sys.stderr)
            continue
        print(f"[study] {name}...", file=sys.stderr, flush=True)
        rows.append(study(name, path, arch, norm, trigger, bundle, device, args.batch_size))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    result = {
        "schema": "bdclean.precision_study/1",
        "cpu": cpu_capability().to_dict(),
        "torch": torch.__version__,
        "threads": args.threads,
        "data": args.data,
        "rows": rows,
    }
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
    sys.stdout.write(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
