"""Checkpoints per minute: one `bdclean evaluate DIR` against N separate `bdclean evaluate FILE` processes.

    python benchmarks/bench_audit.py                      # 8 checkpoints, CIFAR-10 from ../shared/data
    python benchmarks/bench_audit.py --n 16 --eval-limit 2000 --device cuda
    python benchmarks/bench_audit.py --quick              # a smoke run on synthetic data (seconds)

Both sides run in this one invocation, one after the other, on the same checkpoints, data, trigger and
settings, through the real command line (`python -m backdoor_cli.cli`), so each side pays what a user
pays: interpreter and torch start-up, data load, triggered-set construction, evaluation. An untimed
warm-up first reads every file once (page cache) so neither side is charged for cold disk reads.

The checkpoints are N copies of the shared CIFAR-10 ResNet-20, each with its own small seeded weight
perturbation (so they are N different files with N different sha256s, as in a zoo of fine-tunes);
with --quick, N untrained test_tiny models on synthetic 12x12 data. The benchmark checks that both
sides measured the same counts for every checkpoint, and reports the audit's resident memory after
each checkpoint (the first and the last), which a leak would make grow.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
SHARED = REPO.parent / "shared" / "data"
RESNET20 = SHARED / "checkpoints" / "resnet20-12fca82f.th"


def make_zoo(folder: Path, n: int, quick: bool) -> Path:
    """N checkpoints and the data they are evaluated on; returns the data path."""
    import torch
    from safetensors.torch import save_file

    from backdoor_cli.checkpoint import read_checkpoint
    from backdoor_cli.models import build_model

    folder.mkdir(parents=True)
    if quick:
        from helpers import make_npz_dataset

        data = make_npz_dataset(folder.parent / "data")
        base = build_model("test_tiny", 3).state_dict()
    else:
        data = SHARED / "cifar10"
        base = read_checkpoint(RESNET20).state_dict
    for i in range(n):
        generator = torch.Generator().manual_seed(i)
        state = {}
        for key, tensor in base.items():
            if tensor.is_floating_point() and key.endswith("weight"):
                noise = (
                    torch.randn(tensor.shape, generator=generator)
                    * 0.01
                    * float(tensor.std() if tensor.numel() > 1 else 0)
                )
                tensor = tensor + noise
            state[key] = tensor.contiguous()
        save_file(state, str(folder / f"model-{i:03d}.safetensors"))
    return data


def bdclean(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, "-m", "backdoor_cli.cli", *args], capture_output=True, text=True, env=env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8, help="number of checkpoints")
    parser.add_argument("--eval-limit", type=int, default=1000, help="test images per checkpoint (stratified)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="synthetic data and tiny models (a smoke run)")
    parser.add_argument("--out", type=Path, help="write the result JSON here")
    args = parser.parse_args()
    if not args.quick and not RESNET20.exists():
        sys.exit(f"{RESNET20} not found: pass --quick, or put the shared data beside the repository")

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        zoo = Path(tmp) / "zoo"
        data = make_zoo(zoo, args.n, args.quick)
        files = sorted(str(p) for p in zoo.iterdir())
        common = [
            "--data",
            str(data),
            "--trigger",
            "badnets",
            "--eval-limit",
            str(args.eval_limit),
            "--device",
            args.device,
            "--quiet",
        ]
        for path in files + [str(p) for p in Path(data).glob("*.npz")]:
            Path(path).read_bytes()  # warm-up: the page cache, for both sides alike

        jsonl = Path(tmp) / "audit.jsonl"
        start = time.perf_counter()
        audit = bdclean("evaluate", str(zoo), *common, "--jsonl", str(jsonl))
        audit_seconds = time.perf_counter() - start
        if audit.returncode != 0:
            sys.exit(f"the audit failed ({audit.returncode}): {audit.stderr[-2000:]}")
        rows = {r["path"]: r for r in map(json.loads, jsonl.read_text().splitlines())}

        start = time.perf_counter()
        separate = {}
        for path in files:
            run = bdclean("evaluate", path, *common, "--json")
            if run.returncode != 0:
                sys.exit(f"evaluate {path} failed ({run.returncode}): {run.stderr[-2000:]}")
            separate[path] = json.loads(run.stdout)["metrics"]
        separate_seconds = time.perf_counter() - start

    def counts(metrics: dict) -> dict:
        return {k: metrics[k] for k in ("clean_acc", "asr", "ra")}

    mismatched = [p for p in files if counts(rows[p]["metrics"]) != counts(separate[p])]
    if mismatched:
        sys.exit(f"the two sides measured different counts for {mismatched}")
    rss = [rows[p]["rss_mb"] for p in files]
    per_minute = {"one_audit": 60 * args.n / audit_seconds, "separate": 60 * args.n / separate_seconds}
    result = {
        "benchmark": "bench_audit",
        "checkpoints": args.n,
        "eval_limit": args.eval_limit,
        "data": "synthetic 12x12 (--quick)" if args.quick else "CIFAR-10 test split (../shared/data)",
        "models": "test_tiny" if args.quick else "ResNet-20 (CIFAR), perturbed copies",
        "seconds": {"one_audit": round(audit_seconds, 2), "separate": round(separate_seconds, 2)},
        "checkpoints_per_minute": {k: round(v, 2) for k, v in per_minute.items()},
        "ratio": round(per_minute["one_audit"] / per_minute["separate"], 2),
        "audit_rss_mb": {"after_first": rss[0], "after_last": rss[-1], "max": max(rss)},
        "same_counts_both_sides": True,
        "device": args.device,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "niceness": os.nice(0),
        },
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
    }
    if args.device.startswith("cuda"):
        result["device_name"] = torch.cuda.get_device_name()
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
