"""Start-up benchmark: the wall time of whole `bdclean` commands against plain torch, same run, same machine.

    .venv/bin/python benchmarks/bench_startup.py                    # ResNet-20 .th on /work/shared CIFAR-10
    .venv/bin/python benchmarks/bench_startup.py --device cuda      # on a GPU machine
    .venv/bin/python benchmarks/bench_startup.py --quick            # smoke test: its own tiny checkpoint and data

Every command runs as a fresh subprocess (what a user or a CI job pays), `--repeat` times, and the
median is reported:

| bdclean | baseline (plain torch, same run) |
|---|---|
| `bdclean --help`, `bdclean purify --help` | `python -c "import torch"` (bdclean's help must stay far below it: no torch) |
| `bdclean evaluate CKPT --eval-limit N` | a plain-torch script: `torch.load` + `build_model` + `load_state_dict`, the same N test images (bdclean's stratified subset) and their triggered copies, evaluated in batches of 1024 |
| `bdclean purify CKPT --method fst --epochs 1 --clean-count C` | the same plain-torch evaluation (purify also evaluates twice and tunes, so its ratio is an upper bound on its start-up overhead) |
| `load_subject` of the checkpoint, in-process | `torch.load` + build + `load_state_dict` of the same file, in the same process (order alternated per repeat) |

The commands' own JSON reports give their stage timings (load, evaluate, tune, ...); wall time minus
their sum is start-up and exit (imports, option parsing, report writing outside the stages).
Results go to benchmarks/results/startup-<device>.json (-quick appended for --quick).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS = REPO / "benchmarks" / "results"
SHARED = Path("/work/shared/data")
DEFAULT_CHECKPOINT = SHARED / "checkpoints" / "resnet20-12fca82f.th"
DEFAULT_DATA = SHARED / "cifar10"
# The legacy CIFAR checkpoints (akamaster format) were trained with ImageNet's normalisation.
IMAGENET_MEAN, IMAGENET_STD = "0.485,0.456,0.406", "0.229,0.224,0.225"
TARGET = 0
EVAL_BATCH = 1024


# ----------------------------------------------------------------------------- the plain-torch baseline


def plain_evaluate(
    checkpoint: str, data: str, arch: str, mean: str, std: str, limit: int, device: str, seed: int = 0
) -> dict:
    """What a user's own script does to evaluate the same file on the same images: no checks, no
    metadata, fp32, batches of EVAL_BATCH. Returns its stage times and accuracies."""
    times = {}
    start = time.perf_counter()
    import numpy as np
    import torch

    from backdoor_cli.data.datasets import stratified_limit
    from backdoor_cli.models import build_model

    times["import"] = time.perf_counter() - start
    mark = time.perf_counter()
    dev = torch.device(device)
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    head = next(k for k in reversed(list(state)) if k.endswith(".weight") and state[k].dim() == 2)
    model = build_model(arch, int(state[head].shape[0]), int(next(v for v in state.values() if v.dim() == 4).shape[1]))
    model.load_state_dict(state)
    model.to(dev).eval()
    times["load"] = time.perf_counter() - mark
    mark = time.perf_counter()
    with np.load(Path(data) / "test.npz") as archive:
        x, y = torch.from_numpy(archive["x"]), torch.from_numpy(archive["y"].astype(np.int64))
    if x.dim() == 3:
        x = x[..., None]
    if limit and limit < len(y):
        keep = stratified_limit(y, limit, seed)
        x, y = x[keep], y[keep]
    x, y = x.to(dev), y.to(dev)
    triggered = x[y != TARGET].clone()
    triggered[:, -4:-1, -4:-1, :] = 255  # a BadNets-style 3x3 white patch (timing only: not bdclean's exact trigger)
    m = torch.tensor([float(v) for v in mean.split(",")], device=dev).view(1, -1, 1, 1)
    s = torch.tensor([float(v) for v in std.split(",")], device=dev).view(1, -1, 1, 1)
    times["data"] = time.perf_counter() - mark
    mark = time.perf_counter()

    def predict(images):
        out = []
        with torch.inference_mode():
            for i in range(0, len(images), EVAL_BATCH):
                batch = (images[i : i + EVAL_BATCH].permute(0, 3, 1, 2).float() / 255 - m) / s
                out.append(model(batch).argmax(1))
        return torch.cat(out)

    clean_acc = (predict(x) == y).float().mean().item()
    asr = (predict(triggered) == TARGET).float().mean().item() if len(triggered) else None
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    times["evaluate"] = time.perf_counter() - mark
    return {"times": times, "clean_acc": clean_acc, "asr": asr, "images": len(y) + len(triggered)}


def load_pair(checkpoint: str, data: str, arch: str, mean: str, std: str, bdclean_first: bool) -> dict:
    """In one process: bdclean's load_subject of the file, and torch.load + build + load_state_dict."""
    import torch

    from backdoor_cli.data.datasets import load_dataset
    from backdoor_cli.models import build_model
    from backdoor_cli.subject import load_subject

    bundle = load_dataset(data, None, need_train=False)

    def plain():
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        state = {k.removeprefix("module."): v for k, v in state.get("state_dict", state).items()}
        build_model(arch, bundle.num_classes, bundle.test.image_shape[2]).load_state_dict(state)

    def bdclean():
        load_subject(
            checkpoint,
            bundle,
            arch=arch,
            mean=tuple(map(float, mean.split(","))),
            std=tuple(map(float, std.split(","))),
        )

    result = {}
    for name, fn in (
        (("bdclean", bdclean), ("plain", plain)) if bdclean_first else (("plain", plain), ("bdclean", bdclean))
    ):
        mark = time.perf_counter()
        fn()
        result[name] = time.perf_counter() - mark
    result["dynamo_imported"] = "torch._dynamo" in sys.modules
    return result


# ----------------------------------------------------------------------------- the machine


def device_description(device: str) -> dict:
    """GPU name, or CPU model + cores + capability (how benchmarks/bench_purify.py describes it)."""
    import torch

    if device.startswith("cuda"):
        dev = torch.device(device)
        props = torch.cuda.get_device_properties(dev)
        return {
            "type": "cuda",
            "name": torch.cuda.get_device_name(dev),
            "memory_gib": round(props.total_memory / 2**30, 1),
            "cuda": torch.version.cuda,
            "cpu_cores": os.cpu_count(),
        }
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    from backdoor_cli.precision import cpu_capability

    capability = cpu_capability()
    return {
        "type": "cpu",
        "name": f"{model}, {cores} cores, {capability.kind}",
        "cpu_model": model,
        "cpu_cores": cores,
        "cpu_capability": capability.to_dict(),
        "torch_threads": torch.get_num_threads(),
    }


def code_version() -> str | None:
    """The commit the measured bdclean is at (+ "-dirty" with uncommitted changes), when REPO is a git checkout."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO, timeout=30
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "backdoor_cli"], capture_output=True, text=True, cwd=REPO, timeout=30
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit + ("-dirty" if dirty else "")) or None


def slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


# ----------------------------------------------------------------------------- running commands


def run(argv: list[str], env: dict | None = None) -> tuple[float, str]:
    """(wall seconds, stdout) of one subprocess; raises with its stderr when it fails."""
    start = time.perf_counter()
    out = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=env, timeout=1800)
    wall = time.perf_counter() - start
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:6])} ... exited {out.returncode}:\n{out.stderr[-3000:]}")
    return wall, out.stdout


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def commands(args, out_dir: Path) -> dict[str, list[str]]:
    py, bd = sys.executable, [sys.executable, "-m", "backdoor_cli.cli"]
    common = [
        "--arch",
        args.arch,
        "--mean",
        args.mean,
        "--std",
        args.std,
        "--data",
        args.data,
        "--eval-limit",
        str(args.eval_limit),
        "--trigger",
        "badnets",
        "--target",
        str(TARGET),
        "--device",
        args.device,
        "--json",
        "--quiet",
    ]
    me = str(Path(__file__).resolve())
    plain = [
        py,
        me,
        "--_plain",
        "--checkpoint",
        args.checkpoint,
        "--data",
        args.data,
        "--arch",
        args.arch,
        "--mean",
        args.mean,
        "--std",
        args.std,
        "--eval-limit",
        str(args.eval_limit),
        "--device",
        args.device,
    ]
    return {
        "python": [py, "-c", "pass"],
        "import_torch": [py, "-c", "import torch"],
        "help": bd + ["--help"],
        "purify_help": bd + ["purify", "--help"],
        "plain_evaluate": plain,
        "evaluate": bd + ["evaluate", args.checkpoint] + common,
        "purify": bd
        + [
            "purify",
            args.checkpoint,
            "--method",
            "fst",
            "--epochs",
            "1",
            "--clean-count",
            str(args.clean_count),
            "--out",
            str(out_dir / "purified"),
            "--force",
        ]
        + common,
    }


def measure(args) -> dict:
    env = _env()
    walls: dict[str, list[float]] = {}
    stages: dict[str, list[dict]] = {}
    loads: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        cmds = {k: v for k, v in commands(args, Path(tmp)).items() if not args.only or k in args.only}
        for i in range(args.repeat):  # interleaved: a burst of load on a shared machine hits every command alike
            for name, argv in cmds.items():
                wall, stdout = run(argv, env)
                walls.setdefault(name, []).append(wall)
                if name in ("evaluate", "purify", "plain_evaluate"):
                    report = json.loads(stdout.strip().splitlines()[-1] if name == "plain_evaluate" else stdout)
                    stages.setdefault(name, []).append(
                        report
                        if name == "plain_evaluate"
                        else {"timings": report["timings"], "result": _result(report)}
                    )
            if not args.only or "load_pair" in args.only:
                _, stdout = run(
                    [
                        sys.executable,
                        str(Path(__file__).resolve()),
                        "--_load-pair",
                        "--checkpoint",
                        args.checkpoint,
                        "--data",
                        args.data,
                        "--arch",
                        args.arch,
                        "--mean",
                        args.mean,
                        "--std",
                        args.std,
                    ]
                    + (["--_bdclean-first"] if i % 2 == 0 else []),
                    env,
                )
                loads.append(json.loads(stdout.strip().splitlines()[-1]))
    med = {name: statistics.median(v) for name, v in walls.items()}
    load_med = {k: statistics.median(r[k] for r in loads) for k in ("bdclean", "plain")} if loads else {}
    pairs = {
        "help / import_torch": ("help", "import_torch"),
        "help / python": ("help", "python"),
        "evaluate / plain_evaluate": ("evaluate", "plain_evaluate"),
        "purify / plain_evaluate": ("purify", "plain_evaluate"),
    }
    ratios = {label: med[a] / med[b] for label, (a, b) in pairs.items() if a in med and b in med}
    if load_med:
        ratios["load_subject / plain load"] = load_med["bdclean"] / max(load_med["plain"], 1e-9)
    return {
        "wall_seconds": {k: {"median": round(v, 3), "runs": [round(x, 3) for x in walls[k]]} for k, v in med.items()},
        "ratios": {k: round(v, 2) for k, v in ratios.items()},
        "checkpoint_load_seconds": {
            "median": {k: round(v, 4) for k, v in load_med.items()},
            "runs": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in loads],
        },
        "stages": {name: _median_stages(runs) for name, runs in stages.items()},
        "commands": {k: " ".join(v) for k, v in cmds.items()},
    }


def _result(report: dict) -> dict:
    result = report.get("result") or report.get("after") or {}
    return {k: (result.get(k) or {}).get("value") for k in ("clean_acc", "asr")}


def _median_stages(runs: list[dict]) -> dict:
    key = "times" if "times" in runs[0] else "timings"
    names = runs[0][key].keys()
    return {
        "median": {n: round(statistics.median(r[key][n] for r in runs), 3) for n in names},
        "result": runs[0].get("result") or {k: runs[0].get(k) for k in ("clean_acc", "asr", "images")},
    }


# ----------------------------------------------------------------------------- quick mode


def make_quick_inputs(root: Path) -> tuple[str, str]:
    """A legacy-format ResNet-20 .th (3 classes) and a 32x32 npz dataset: the real load path, tiny work."""
    import numpy as np
    import torch

    from backdoor_cli.models import build_model

    rng = np.random.default_rng(0)
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 60), ("test", 60)):
        y = np.arange(n) % 3
        x = np.clip((60 + 60 * y).reshape(-1, 1, 1, 1) + rng.normal(0, 20, (n, 32, 32, 3)), 0, 255).astype(np.uint8)
        np.savez(data / f"{split}.npz", x=x, y=y.astype(np.uint8))
    torch.manual_seed(0)
    checkpoint = root / "resnet20-quick.th"
    torch.save(
        {"state_dict": {f"module.{k}": v for k, v in build_model("resnet20", 3).state_dict().items()}},
        checkpoint,
        _use_new_zipfile_serialization=False,
    )  # akamaster's layout: DataParallel keys, legacy format
    return str(checkpoint), str(data)


# ----------------------------------------------------------------------------- main


def parse_args(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (passed to every command)")
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT), help="a checkpoint (default: the ResNet-20 .th)")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="a directory with test.npz (and train.npz for purify)")
    p.add_argument("--arch", default="resnet20")
    p.add_argument("--mean", default=IMAGENET_MEAN)
    p.add_argument("--std", default=IMAGENET_STD)
    p.add_argument("--eval-limit", type=int, default=500, help="test images evaluated (and their triggered copies)")
    p.add_argument("--clean-count", type=int, default=200, help="purify: clean images tuned on (one epoch)")
    p.add_argument("--repeat", type=int, default=3, help="runs of each command (the median is reported)")
    p.add_argument("--quick", action="store_true", help="its own tiny checkpoint and data, one run: a smoke test")
    p.add_argument(
        "--only",
        type=lambda text: [t.strip() for t in text.split(",") if t.strip()],
        default=None,
        help="comma-separated subset: python, import_torch, help, purify_help, plain_evaluate, evaluate, "
        "purify, load_pair (default: all)",
    )
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/startup-<device>.json)")
    p.add_argument("--_plain", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_load-pair", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_bdclean-first", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args._plain:
        print(
            json.dumps(
                plain_evaluate(args.checkpoint, args.data, args.arch, args.mean, args.std, args.eval_limit, args.device)
            )
        )
        return 0
    if args._load_pair:
        print(json.dumps(load_pair(args.checkpoint, args.data, args.arch, args.mean, args.std, args._bdclean_first)))
        return 0
    sys.path.insert(0, str(REPO))
    with tempfile.TemporaryDirectory() as tmp:
        if args.quick:
            args.checkpoint, args.data = make_quick_inputs(Path(tmp))
            args.eval_limit, args.clean_count, args.repeat = 30, 30, 1
        for path in (args.checkpoint, args.data):
            if not Path(path).exists():
                print(f"not found: {path} (pass --checkpoint / --data)", file=sys.stderr)
                return 2
        described = device_description(args.device)
        print(f"device: {described['name']}; {args.repeat} run(s) of each command, medians", file=sys.stderr)
        results = measure(args)
    results = {
        "device": described,
        "code": code_version(),
        "quick": args.quick,
        "repeat": args.repeat,
        "checkpoint": None if args.quick else args.checkpoint,
        "data": None if args.quick else args.data,
        "eval_limit": args.eval_limit,
        "clean_count": args.clean_count,
        "load_average": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "python": sys.version.split()[0],
        **results,
    }
    for name, wall in results["wall_seconds"].items():
        stages = results["stages"].get(name, {}).get("median")
        print(f"{name:16s} {wall['median']:7.2f} s" + (f"   stages: {stages}" if stages else ""), file=sys.stderr)
    for name, ratio in results["ratios"].items():
        print(f"{name:28s} {ratio:6.2f}x", file=sys.stderr)
    loads = results["checkpoint_load_seconds"]["median"]
    if loads:
        print(
            f"checkpoint load in-process: bdclean {loads['bdclean']:.3f} s, plain {loads['plain']:.3f} s",
            file=sys.stderr,
        )
    out = (
        Path(args.out)
        if args.out
        else (DEFAULT_RESULTS / f"startup-{slugify(described['name'])}{'-quick' if args.quick else ''}.json")
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
