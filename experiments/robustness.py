"""Robustness of purification under the retuning check (issue 13), through the CLI.

For one subject, each method purifies it with the same clean images, then `--retune-check` retunes a
copy of the purified model with 5 poisoned images and measures the ASR again; `--clean-reference`
gives a model trained the same way without the backdoor the same treatment. One JSON line per method.

    .venv/bin/python experiments/robustness.py --subject runs/subjects/r20-blended-0.01.safetensors \
        --clean runs/subjects/r20-clean-ft.safetensors --data ../shared/data/cifar10 --trigger blended \
        --methods ft,fst,fst-kd,pam,ft-sam,nad --eval-limit 2000 --out runs/robust/robustness.jsonl

The trigger is used for the measurements only (ASR, the check); no method sees it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def purify(args, method: str, out_dir: Path) -> dict:
    command = [
        sys.executable,
        "-m",
        "backdoor_cli.cli",
        "purify",
        args.subject,
        "--method",
        method,
        "--data",
        args.data,
        "--trigger",
        args.trigger,
        "--out",
        str(out_dir),
        "--force",
        "--retune-check",
        "--clean-reference",
        args.clean,
        "--eval-limit",
        str(args.eval_limit),
        "--json",
        "--quiet",
        *args.extra,
    ]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode not in (0, 1):
        return {"method": method, "error": done.stderr.strip()[-2000:], "returncode": done.returncode}
    report = json.loads(done.stdout)
    check = report["retune_check"]
    return {
        "method": method,
        "command": " ".join(command[1:]),
        "seconds": round(seconds, 1),
        "before": report["before"],
        "after": report["after"],
        "retune": check,
        "params": report["method"]["params"],
        "notes": report["method"]["notes"],
        "timings": report["timings"],
    }


def rate(r: dict) -> str:
    lo, hi = r["ci95"]
    return f"{r['value']:.1%} [{lo:.1%}, {hi:.1%}]"


def table(rows: list[dict]) -> str:
    lines = [
        "| method | C-Acc | ASR | ASR after retuning | clean model after retuning | verdict | time |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['method']} | error: {row['error'][-120:]} |||||")
            continue
        check = row["retune"]
        lines.append(
            f"| {row['method']} | {rate(row['after']['clean_acc'])} | {rate(row['after']['asr'])} | "
            f"{rate(check['asr_after_retuning'])} | {rate(check['reference_asr_after_retuning'])} | "
            f"{check['status']} | {row['seconds']:.0f} s |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subject", required=True)
    parser.add_argument("--clean", required=True, help="a clean model trained the same way (the reference)")
    parser.add_argument("--data", required=True)
    parser.add_argument("--trigger", required=True)
    parser.add_argument("--methods", default="ft,fst,fst-kd,pam,ft-sam,nad")
    parser.add_argument("--eval-limit", type=int, default=2000)
    parser.add_argument("--out", required=True, help="JSON lines; purified models go in its folder")
    parser.add_argument("extra", nargs="*", help="more purify flags, after --")
    args = parser.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for method in args.methods.split(","):
        row = purify(args, method, out.parent / method)
        rows.append(row)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    print(table(rows))


if __name__ == "__main__":
    main()
