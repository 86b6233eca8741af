"""Benchmark: evaluating a large ImageNet-style folder, streamed against resident, in the same run.

    .venv/bin/python benchmarks/bench_imagefolder.py                 # 5,000 JPEGs of 256-500 px at 224 px
    .venv/bin/python benchmarks/bench_imagefolder.py --images 60 --image-size 32 --min-side 40 --max-side 80

It writes test/<class>/*.jpg (random sizes, smooth random content, JPEG quality 90) and a checkpoint
of random weights (test_tiny by default: decoding, not the model, dominates) into a temporary
directory, then runs `bdclean evaluate`'s library call (`evaluate_checkpoint`, with --image-size and
the BadNets trigger) once per path, each in a fresh subprocess:

  * resident: STREAM_MIN_BYTES raised so the split is decoded into memory up front;
  * streamed: STREAM_MIN_BYTES at 0, the path a folder this large takes by default.

Each child reports its wall time, images/s (clean test images / wall time of the whole evaluate
call, decoding included) and peak memory (max RSS from resource.getrusage). A third child measures
the same process without evaluating (imports + checkpoint) as the baseline. With --loaders it also
times decoding alone, through the thread pool bdclean uses and through torch DataLoader worker
processes. Prints JSON; --json-out saves it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
CLASSES = 10


def make_folder(root: Path, images: int, min_side: int, max_side: int, seed: int) -> Path:
    """test/<class>/<i>.jpg: random sizes in [min_side, max_side], photo-like smooth content."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(images):
        folder = root / "test" / f"class{i % CLASSES:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        w, h = (int(v) for v in rng.integers(min_side, max_side + 1, 2))
        coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        noisy = np.asarray(coarse, dtype=np.int16) + rng.integers(-12, 13, (h, w, 3), dtype=np.int16)
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(folder / f"{i:05d}.jpg", quality=90)
    return root


def make_checkpoint(path: Path, arch: str, image_size: int) -> Path:
    import torch

    from backdoor_cli.checkpoint import safetensors_bytes
    from backdoor_cli.models import build_model

    torch.manual_seed(0)
    model = build_model(arch, CLASSES, 3)
    meta = {
        "schema": "bdclean.checkpoint/1",
        "arch": arch,
        "num_classes": CLASSES,
        "in_channels": 3,
        "input_size": [image_size, image_size],
        "normalization": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
    }
    path.write_bytes(safetensors_bytes(dict(model.state_dict()), meta))
    return path


# ----------------------------------------------------------------------------- children (fresh processes)


def child(mode: str, folder: str, checkpoint: str, image_size: int, batch_size: int) -> dict:
    from backdoor_cli.config import EvaluateOptions
    from backdoor_cli.data import datasets as data

    if mode.startswith("decode-"):
        return _decode_only(mode, folder, image_size, batch_size)
    data.STREAM_MIN_BYTES = 0 if mode == "streamed" else 1 << 62
    opts = EvaluateOptions(
        checkpoint=checkpoint,
        data=folder,
        device="cpu",
        trigger="badnets",
        batch_size=batch_size,
        image_size=(image_size, image_size),
    )
    start = time.perf_counter()
    if mode == "baseline":
        from backdoor_cli.checkpoint import read_checkpoint

        read_checkpoint(checkpoint)
        report = None
    else:
        from backdoor_cli.progress import Reporter
        from backdoor_cli.usecases.evaluate import evaluate_checkpoint

        report = evaluate_checkpoint(opts, Reporter())
    seconds = time.perf_counter() - start
    out = {"mode": mode, "seconds": round(seconds, 2), "max_rss_mib": _max_rss_mib()}
    if report is not None:
        result = report.result
        out.update(
            {
                "streamed": report.data["streamed"],
                "test_images": result.clean_acc.n,
                "triggered_images": result.asr.n,
                "clean_correct": result.clean_acc.k,
                "asr_hits": result.asr.k,
                "images_per_s": round(result.clean_acc.n / seconds, 1),
                "stages": {k: round(v, 2) for k, v in report.timings.items()},
            }
        )
    return out


def _decode_only(mode: str, folder: str, image_size: int, batch_size: int) -> dict:
    """Decode the whole split once, without a model: the thread pool, or DataLoader worker processes."""
    import torch

    from backdoor_cli.data import datasets as data
    from backdoor_cli.data.datasets import load_dataset
    from backdoor_cli.data.imagefolder import DECODE_WORKERS, decode_image

    data.STREAM_MIN_BYTES = 0
    stream = load_dataset(folder, need_train=False, image_size=(image_size, image_size)).test
    start = time.perf_counter()
    if mode == "decode-threads":
        count = sum(len(x) for x, _ in stream.batches(batch_size))
    else:
        files, mode_, size = stream.files, stream.mode, stream.image_size

        class Files(torch.utils.data.Dataset):
            def __len__(self):
                return len(files)

            def __getitem__(self, i):
                return torch.from_numpy(decode_image(files[i], mode_, size))

        loader = torch.utils.data.DataLoader(
            Files(), batch_size=batch_size, num_workers=DECODE_WORKERS, prefetch_factor=2
        )
        count = sum(len(x) for x in loader)
    seconds = time.perf_counter() - start
    children = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)  # largest worker
    return {
        "mode": mode,
        "workers": DECODE_WORKERS,
        "images": count,
        "seconds": round(seconds, 2),
        "images_per_s": round(count / seconds, 1),
        "max_rss_mib": _max_rss_mib(),
        "max_rss_worker_mib": children if mode == "decode-dataloader" else None,
    }


def _max_rss_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB


def _run_child(mode: str, args, folder: Path, checkpoint: Path) -> dict:
    command = [
        sys.executable,
        __file__,
        "--child",
        mode,
        "--folder",
        str(folder),
        "--checkpoint",
        str(checkpoint),
        "--image-size",
        str(args.image_size),
        "--batch-size",
        str(args.batch_size),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"child {mode} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def machine() -> dict:
    import torch

    from bench_purify import device_description

    return {
        **device_description(torch.device("cpu")),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "load_average": [round(v, 2) for v in os.getloadavg()],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--min-side", type=int, default=256)
    parser.add_argument("--max-side", type=int, default=500)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--arch", default="test_tiny")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--loaders", action="store_true", help="Also time decoding alone: threads vs DataLoader.")
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.folder, args.checkpoint, args.image_size, args.batch_size)))
        return 0
    with tempfile.TemporaryDirectory(prefix="bdclean-bench-imagefolder-") as tmp:
        start = time.perf_counter()
        folder = make_folder(Path(tmp) / "data", args.images, args.min_side, args.max_side, args.seed)
        checkpoint = make_checkpoint(Path(tmp) / "model.safetensors", args.arch, args.image_size)
        generated = time.perf_counter() - start
        modes = ["baseline", "resident", "streamed"]
        modes += ["decode-threads", "decode-dataloader"] if args.loaders else []
        runs = {mode: _run_child(mode, args, folder, checkpoint) for mode in modes}
    resident, streamed = runs["resident"], runs["streamed"]
    same = all(resident[k] == streamed[k] for k in ("clean_correct", "asr_hits", "test_images", "triggered_images"))
    result = {
        "benchmark": "bench_imagefolder",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("child", "folder", "checkpoint", "json_out")},
        "generate_seconds": round(generated, 1),
        "runs": runs,
        "metrics_identical": same,
        "streamed_over_resident": {
            "images_per_s": round(streamed["images_per_s"] / resident["images_per_s"], 2),
            "max_rss": round(streamed["max_rss_mib"] / resident["max_rss_mib"], 2),
            "max_rss_above_baseline": round(
                (streamed["max_rss_mib"] - runs["baseline"]["max_rss_mib"])
                / max(1.0, resident["max_rss_mib"] - runs["baseline"]["max_rss_mib"]),
                3,
            ),
        },
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json_out:
        args.json_out.write_text(text + "\n")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
