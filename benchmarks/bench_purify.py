"""Speed benchmark: bdclean's FST purification against a reference-style pipeline, same run, same machine.

    .venv/bin/python benchmarks/bench_purify.py            # what `make bench` runs
    .venv/bin/python benchmarks/bench_purify.py --quick    # smoke test in a few seconds

One process runs the same Feature Shift Tuning job twice, on the same checkpoint, clean subset,
epochs, batch size, hyper-parameters, seed and evaluation images:

1. **bdclean**: `backdoor_cli.usecases.purify.purify_checkpoint`, exactly what `bdclean purify --method fst`
   runs (uint8 tensors kept on the device, batched augmentation, no per-step host sync). Its own
   stage timings (load, evaluate_before, tune, evaluate_after, write) are reported.
2. **reference**: the pipeline as the original research code writes it: a torch `Dataset` returning
   PIL images with per-sample transforms (RandomCrop(pad 4), RandomHorizontalFlip, ToTensor,
   Normalize) through a `DataLoader`, fp32 NCHW, `.item()` on every step, the triggered test set
   built image by image, `torch.save` of the state_dict. Its tuning loop is the official FST loop
   (`reference_fst`; the facts it follows are listed in benchmarks/README.md): re-initialise the
   head's weight and bias, loss + alpha * <W, W_orig>, step, then rescale W (not the bias) to
   ||W_orig|| after every step, SGD over all parameters, cosine schedule stepped per epoch, the
   whole model in train mode. torchvision.transforms are used when `import torchvision` works;
   otherwise (CPU-only torch, where torchvision's wheel cannot load) a per-sample PIL/numpy
   re-implementation with the same semantics. Which one ran is recorded.

It prints per-stage times, images/s and the ratio reference / bdclean, writes the same facts as
JSON, and checks that both pipelines reach comparable results (exit 1 when they do not). With
`--seeds 0,1,2` the pair runs once per seed and the check compares the two halves' medians.
See benchmarks/README.md for how to read the output.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a plain script from any directory
    sys.path.insert(0, str(REPO))

SCHEMA = "bdclean.bench_purify/1"
# choose_format: bdclean's start-up timing of the memory formats (precision.py; only with --memory-format timed since
# 2026-12-06, near zero with the default auto); the reference has none.
STAGES = ("load", "choose_format", "evaluate_before", "tune", "evaluate_after", "write")
SHARED_CIFAR10 = REPO.parent / "shared" / "data" / "cifar10"
MNIST_SAMPLE = REPO / "backdoor_cli" / "assets" / "mnist_sample"
DEFAULT_CACHE = REPO / "benchmarks" / ".cache"
DEFAULT_RESULTS = REPO / "benchmarks" / "results"

# The reference pipeline is timed with bdclean's own stage timer, so both halves are measured alike.
from backdoor_cli.runtime import Stopwatch, synchronize  # noqa: E402

# Settings per situation. CUDA: the FST paper's CIFAR-10 setting (1,000 clean images = 2% of the
# training split, 10 epochs, full test set). CPU: sized so the whole benchmark stays within about
# ten minutes on a 2-core machine (the reference pipeline is the slow half). Quick: a smoke test.
PROFILES = {
    "cuda": {"arch": "resnet18", "clean_count": 1000, "epochs": 10, "eval_limit": None, "num_workers": 4},
    "cpu": {"arch": "simple_cnn", "clean_count": 1000, "epochs": 10, "eval_limit": 2000, "num_workers": 0},
    "quick": {
        "arch": "test_tiny",
        "clean_count": 100,
        "epochs": 1,
        "eval_limit": 300,
        "num_workers": 0,
        "batch_size": 32,
    },
}
# The subject model when --model is not given: a Blended backdoor planted by `bdclean train`, cached.
# Blended, not BadNets: in the CPU budget below a 5% BadNets patch was not learned (ASR 7.4%, which
# left the comparability check's ASR half with nothing to test), while Blended reached ASR 99.5%.
TRAIN_TRIGGER = "blended"
TRAIN_POISON_RATE = 0.05
TRAIN_SETTINGS = {
    "cuda": {"epochs": 15, "lr": 0.05, "train_limit": None},
    # simple_cnn trains at roughly 300 images/s on 2 CPU cores: 10,000 images x 4 epochs is about two
    # minutes, once. Measured: C-Acc 49.4%, ASR 99.5% (a modest model, but a planted backdoor).
    "cpu": {"epochs": 4, "lr": 0.05, "train_limit": 10000},
    "quick": {"epochs": 1, "lr": 0.05, "train_limit": 1000},
}


# ----------------------------------------------------------------------------- the machine


def device_description(device: torch.device) -> dict:
    """What ran the benchmark: GPU name, or CPU model + core count (figures mean nothing without it)."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {
            "type": "cuda",
            "name": torch.cuda.get_device_name(device),
            "memory_gib": round(props.total_memory / 2**30, 1),
            "cuda": torch.version.cuda,
            "cpu_cores": os.cpu_count(),
        }
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    from backdoor_cli.precision import cpu_capability

    # The capability decides the arithmetic (bf16 where native), so it belongs beside the name.
    capability = cpu_capability()
    return {
        "type": "cpu",
        "name": f"{model}, {cores} cores, {capability.kind}",
        "cpu_model": model,
        "cpu_cores": cores,
        "cpu_capability": capability.to_dict(),
        "torch_threads": torch.get_num_threads(),
    }


def slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def load_average() -> list[float] | None:
    """1/5/15-minute load: other users of a shared machine slow both pipelines; keep the evidence."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


# ----------------------------------------------------------------------------- reference-style transforms
# Stand-ins for torchvision.transforms when torchvision cannot be imported, with the same semantics:
# they take and return PIL images one sample at a time and draw their randomness from torch's
# global RNG, as torchvision does.


class PilRandomCrop:
    """transforms.RandomCrop(size, padding): zero-pad each side, then crop at a uniform random offset."""

    def __init__(self, size: int, padding: int):
        self.size, self.padding = size, padding

    def __call__(self, img: Image.Image) -> Image.Image:
        arr = np.asarray(img)
        p = self.padding
        pad = ((p, p), (p, p)) + (((0, 0),) if arr.ndim == 3 else ())
        arr = np.pad(arr, pad, mode="constant", constant_values=0)
        h, w = arr.shape[:2]
        i = int(torch.randint(0, h - self.size + 1, size=(1,)).item())
        j = int(torch.randint(0, w - self.size + 1, size=(1,)).item())
        return Image.fromarray(arr[i : i + self.size, j : j + self.size])


class PilRandomHorizontalFlip:
    """transforms.RandomHorizontalFlip(p)."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        if torch.rand(1).item() < self.p:
            return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return img


class PilToTensor:
    """transforms.ToTensor(): PIL (H, W, C) uint8 -> float (C, H, W) in [0, 1]."""

    def __call__(self, img: Image.Image) -> torch.Tensor:
        arr = np.array(img, dtype=np.uint8, copy=True)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous().to(torch.float32).div(255)


class TensorNormalize:
    """transforms.Normalize(mean, std): per-channel (x - mean) / std."""

    def __init__(self, mean, std):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        return (t - self.mean) / self.std


class Compose:
    def __init__(self, steps):
        self.steps = list(steps)

    def __call__(self, x):
        for step in self.steps:
            x = step(x)
        return x


def build_transforms(size: int, flip: bool, mean, std, augment: bool) -> tuple[object, object, str]:
    """(train transform, test transform, which implementation): torchvision's when it imports."""
    try:
        import torchvision.transforms as T  # lazily: its wheel fails to load with CPU-only torch builds

        train = [T.RandomCrop(size, padding=4)] if augment else []
        train += [T.RandomHorizontalFlip()] if augment and flip else []
        tail = [T.ToTensor(), T.Normalize(mean, std)]
        return T.Compose(train + tail), T.Compose(tail), "torchvision"
    except Exception:  # ImportError, or RuntimeError/OSError from a torchvision built for another torch
        sys.modules.pop("torchvision", None)
        train = [PilRandomCrop(size, padding=4)] if augment else []
        train += [PilRandomHorizontalFlip()] if augment and flip else []
        tail = [PilToTensor(), TensorNormalize(mean, std)]
        return Compose(train + tail), Compose(tail), "pil-numpy (torchvision not importable)"


class PilDataset(torch.utils.data.Dataset):
    """Images held as a uint8 numpy array; each item becomes a PIL image and goes through `transform`,
    the way torchvision's CIFAR10 dataset serves samples."""

    def __init__(self, x: np.ndarray, y: np.ndarray, transform):
        self.x = x[..., 0] if x.shape[-1] == 1 else x  # PIL wants (H, W) for grayscale
        self.y = [int(v) for v in y]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.x[i])), self.y[i]


# ----------------------------------------------------------------------------- reference pipeline


@dataclasses.dataclass
class ReferenceJob:
    """Everything the reference pipeline needs, resolved from the same sources as bdclean's run."""

    checkpoint: Path
    data_dir: Path
    arch: str
    num_classes: int
    in_channels: int
    head: str
    mean: tuple
    std: tuple
    flip: bool
    trigger_spec: dict
    clean_indices: np.ndarray
    eval_indices: np.ndarray | None  # None: the full test split
    lr: float
    epochs: int
    alpha: float
    batch_size: int
    momentum: float
    weight_decay: float
    augment: bool
    seed: int
    num_workers: int
    out_dir: Path


def _read_reference_state(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}


def poison_test_set_per_image(trigger, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The triggered copies of the non-target test images, built one image at a time as research
    code does (a loop over the dataset). Patch triggers are pasted with numpy; other trigger types
    go through bdclean's trigger on a batch of one image (still per image)."""
    state = trigger.state()
    xs, ys = [], []
    for i in range(len(y)):
        if int(y[i]) == trigger.target:
            continue
        img = np.array(Image.fromarray(x[i][..., 0] if x.shape[-1] == 1 else x[i]))
        if img.ndim == 2:
            img = img[:, :, None]
        if "patch" in state:
            patch = state["patch"].numpy()
            row, col = (int(v) for v in state["origin"])
            img[row : row + patch.shape[0], col : col + patch.shape[1], :] = patch
        else:
            img = trigger.apply(torch.from_numpy(img)[None])[0].numpy()
        xs.append(img)
        ys.append(int(y[i]))
    if not xs:
        return np.empty((0,) + x.shape[1:], dtype=np.uint8), np.empty(0, dtype=np.int64)
    return np.stack(xs), np.array(ys, dtype=np.int64)


def _loader(dataset, batch_size: int, shuffle: bool, num_workers: int, device: torch.device, seed: int | None = None):
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        generator=generator,
    )


def reference_evaluate(model, clean_loader, poison_loader, target: int, device: torch.device) -> dict:
    """C-Acc / ASR / RA with a `.item()` per batch, as research evaluation loops do."""
    model.eval()
    correct = total = hits = robust = n_poison = 0
    with torch.no_grad():
        for x, y in clean_loader:
            x, y = x.to(device), y.to(device)
            pred = model(x).argmax(1)
            correct += (pred == y).sum().item()
            total += y.size(0)
        for x, y in poison_loader:
            x, y = x.to(device), y.to(device)
            pred = model(x).argmax(1)
            hits += (pred == target).sum().item()
            robust += (pred == y).sum().item()
            n_poison += y.size(0)
    return {
        "clean_acc": _rate(correct, total),
        "asr": _rate(hits, n_poison),
        "ra": _rate(robust, n_poison),
        "images": total + n_poison,
    }


def _rate(k: int, n: int) -> dict:
    return {"k": int(k), "n": int(n), "value": k / n if n else float("nan")}


def reinitialise_head_as_official(head: torch.nn.Linear) -> None:
    """The official FST script's re-initialisation of the classifier: weight and bias each drawn
    uniformly from [-1/sqrt(fan_in), 1/sqrt(fan_in)] with torch's global RNG (seeded per run)."""
    bound = 1.0 / math.sqrt(head.weight.size(-1))
    with torch.no_grad():
        head.weight.uniform_(-bound, bound)
        if head.bias is not None:
            head.bias.uniform_(-bound, bound)


def project_head_norm(head: torch.nn.Linear, norm: torch.Tensor) -> None:
    """W <- W * C / ||W||_F on the head's weight only (the bias is left alone), as the official loop
    does after every optimiser step."""
    with torch.no_grad():
        head.weight.copy_(head.weight * norm / torch.norm(head.weight))


def reference_fst(
    model, head: torch.nn.Linear, loader, job: ReferenceJob, device: torch.device, on_step=None
) -> list[dict]:
    """FST as the official training loop runs it (Min et al. 2023; see benchmarks/README.md for the
    facts this follows), with a `.item()` every step as research code does.

    Before anything changes, keep W_orig and C = ||W_orig||_F; re-initialise the head (weight and
    bias); SGD over every parameter (momentum, weight decay as the job says; the official script
    uses momentum 0.9 and no weight decay); cosine schedule with T_max = epochs, stepped once per
    epoch; the whole model in train mode (BatchNorm statistics move); each step: cross-entropy +
    alpha * <W, W_orig>, backward, step, zero the gradients, then rescale W to norm C.
    `on_step(step)` runs after each projection (tests)."""
    original = head.weight.detach().clone()
    norm = torch.norm(original)
    reinitialise_head_as_official(head)
    optimizer = torch.optim.SGD(model.parameters(), lr=job.lr, momentum=job.momentum, weight_decay=job.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=job.epochs)
    optimizer.zero_grad()
    history, step = [], 0
    for epoch in range(job.epochs):
        model.train()
        start = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        running_loss, correct, total = 0.0, 0, 0
        for x, y in loader:
            if y.size(0) < 2:  # BatchNorm cannot train on one sample (bdclean skips such a batch too)
                continue
            x, y = x.to(device), y.to(device)
            outputs = model(x)
            ce = F.cross_entropy(outputs, y)
            loss = ce + job.alpha * torch.sum(head.weight * original)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            project_head_norm(head, norm)
            step += 1
            if on_step is not None:
                on_step(step)
            running_loss += ce.item() * y.size(0)
            correct += outputs.argmax(1).eq(y).sum().item()
            total += y.size(0)
        scheduler.step()
        history.append(
            {
                "epoch": epoch + 1,
                "loss": running_loss / max(total, 1),
                "train_acc": correct / max(total, 1),
                "lr": lr,
                "seconds": round(time.perf_counter() - start, 3),
            }
        )
    return history


def run_reference(job: ReferenceJob, device: torch.device) -> dict:
    """The reference-style pipeline, timed stage by stage."""
    from backdoor_cli.models import build_model
    from backdoor_cli.triggers import build_trigger, parse_trigger_spec

    torch.manual_seed(job.seed)
    np.random.seed(job.seed)
    timer = Stopwatch(device)
    with timer.stage("load"):
        with np.load(job.data_dir / "train.npz", allow_pickle=False) as f:
            train_x, train_y = f["x"], f["y"]
        with np.load(job.data_dir / "test.npz", allow_pickle=False) as f:
            test_x, test_y = f["x"], f["y"]
        if train_x.ndim == 3:
            train_x, test_x = train_x[..., None], test_x[..., None]
        model = build_model(job.arch, job.num_classes, job.in_channels)
        model.load_state_dict(_read_reference_state(job.checkpoint), strict=True)
        model = model.to(device)
        head = model.get_submodule(job.head)
        height, width, channels = test_x.shape[1:]
        if job.eval_indices is not None:
            test_x, test_y = test_x[job.eval_indices], test_y[job.eval_indices]
        trigger = build_trigger(
            parse_trigger_spec(job.trigger_spec, None, source="benchmark"), (height, width, channels)
        )
        poison_x, poison_y = poison_test_set_per_image(trigger, test_x, test_y)
        train_tf, test_tf, transforms_impl = build_transforms(height, job.flip, job.mean, job.std, job.augment)
        clean_set = PilDataset(train_x[job.clean_indices], train_y[job.clean_indices], train_tf)
        test_loader = _loader(PilDataset(test_x, test_y, test_tf), job.batch_size, False, job.num_workers, device)
        poison_loader = _loader(PilDataset(poison_x, poison_y, test_tf), job.batch_size, False, job.num_workers, device)
        train_loader = _loader(clean_set, job.batch_size, True, job.num_workers, device, seed=job.seed)
    with timer.stage("evaluate_before"):
        before = reference_evaluate(model, test_loader, poison_loader, trigger.target, device)
    with timer.stage("tune"):
        history = reference_fst(model, head, train_loader, job, device)
    with timer.stage("evaluate_after"):
        after = reference_evaluate(model, test_loader, poison_loader, trigger.target, device)
    with timer.stage("write"):
        torch.save(model.state_dict(), job.out_dir / "reference_purified.pt")
    timer.stages.setdefault("choose_format", 0.0)  # fp32 NCHW, as research code runs: nothing to choose
    return {
        "stages": timer.stages,
        "before": before,
        "after": after,
        "history": history,
        "transforms": transforms_impl,
        "num_workers": job.num_workers,
        "eval_images": {"clean": int(len(test_y)), "poisoned": int(len(poison_y))},
        "tune_images": int(len(clean_set)) * job.epochs,
        "_poisoned_x": poison_x,
        "_clean_y": test_y,
    }


# ----------------------------------------------------------------------------- bdclean pipeline


def run_bdclean(args, checkpoint: Path, data_dir: Path, out_dir: Path, seed: int | None = None) -> tuple[dict, object]:
    """`bdclean purify --method fst` through the library, with its own stage timings."""
    from backdoor_cli.config import PurifyOptions
    from backdoor_cli.usecases.purify import purify_checkpoint

    opts = PurifyOptions(
        checkpoint=str(checkpoint),
        data=str(data_dir),
        method="fst",
        out=str(out_dir),
        force=True,
        device=args.device,
        seed=args.seed if seed is None else seed,
        clean_count=args.clean_count,
        epochs=args.epochs,
        batch_size=args.batch_size,
        eval_limit=args.eval_limit,
        arch=args.arch if args.model else None,
        trigger=args.trigger,
        precision=args.precision,
        memory_format=args.memory_format,
    )
    start = time.perf_counter()
    report = purify_checkpoint(opts)
    wall = time.perf_counter() - start
    stages = {name: report.timings.get(name, 0.0) for name in STAGES}
    return {
        "stages": stages,
        "wall": wall,
        "compute": report.environment.get("compute"),
        "before": _bd_metrics(report.before),
        "after": _bd_metrics(report.after),
        "history": report.history,
        "eval_images": {
            "clean": report.before.clean_acc.n,
            "poisoned": report.before.asr.n if report.before.asr else 0,
        },
        "tune_images": report.clean["images"] * report.method["params"]["epochs"],
    }, report


def _bd_metrics(result) -> dict:
    out = {
        "clean_acc": {"k": result.clean_acc.k, "n": result.clean_acc.n, "value": result.clean_acc.value},
        "images": result.images,
    }
    for name in ("asr", "ra"):
        rate = getattr(result, name)
        out[name] = {"k": rate.k, "n": rate.n, "value": rate.value} if rate is not None else None
    return out


# ----------------------------------------------------------------------------- the subject model


def default_model(args, data_dir: Path, profile: str) -> Path:
    """A BadNets-backdoored model trained by bdclean's own `train` pipeline, cached across runs."""
    from backdoor_cli.config import TrainOptions
    from backdoor_cli.progress import StderrReporter
    from backdoor_cli.usecases.training import train_model

    settings = TRAIN_SETTINGS[profile]
    name = (
        f"{slugify(data_dir.name)}-{args.arch}-{TRAIN_TRIGGER}-p{TRAIN_POISON_RATE:g}-e{settings['epochs']}"
        f"-n{settings['train_limit'] or 'all'}-s{args.seed}.safetensors"
    )
    path = Path(args.cache_dir) / name
    if path.exists():
        log(f"subject model: {path} (cached)")
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    log(
        f"subject model: training {args.arch} on {data_dir} with a {TRAIN_TRIGGER} trigger on "
        f"{TRAIN_POISON_RATE:.0%} of the images, {settings['epochs']} epochs (once; cached in {path.parent})"
    )
    start = time.perf_counter()
    report = train_model(
        TrainOptions(
            arch=args.arch,
            data=str(data_dir),
            out=str(path),
            trigger=TRAIN_TRIGGER,
            poison_rate=TRAIN_POISON_RATE,
            epochs=settings["epochs"],
            lr=settings["lr"],
            train_limit=settings["train_limit"],
            device=args.device,
            seed=args.seed,
            augment=False,
        ),
        None if args.quick else StderrReporter(),
    )
    r = report.result
    log(
        f"subject model trained in {time.perf_counter() - start:.0f}s: clean accuracy {r.clean_acc.value:.2%}, "
        f"ASR {r.asr.value:.2%}"
    )
    return path


# ----------------------------------------------------------------------------- results


def _spread(values: list[float]) -> dict:
    """Median, min, max and every value, in percent."""
    pct = [round(v * 100, 3) for v in values]
    return {"median": round(statistics.median(pct), 3), "min": min(pct), "max": max(pct), "values": pct}


def compare_results(bd, ref, args) -> dict:
    """Do both pipelines reach comparable results? `bd` and `ref` are one run each or lists of runs,
    one per seed, in the same seed order.

    Same model and images before tuning, so every seed's 'before' figures must agree closely. After
    tuning the random streams differ (augmentation draws, head init, shuffling) and FST itself can be
    unstable over seeds (one seed may leave the backdoor in), so the after-FST figures are compared as
    distributions: the two halves' medians over the seeds, with the same tolerances as for one run."""
    bd_runs = bd if isinstance(bd, list) else [bd]
    ref_runs = ref if isinstance(ref, list) else [ref]
    if len(bd_runs) != len(ref_runs) or not bd_runs:
        raise ValueError("compare_results needs one reference run per bdclean run")
    reasons = []
    pts = lambda a, b: (a - b) * 100  # noqa: E731
    value = lambda run, phase, metric: run[phase][metric]["value"]  # noqa: E731
    several = len(bd_runs) > 1
    what = "median " if several else ""

    def worst_before(metric: str) -> float:
        diffs = [pts(value(b, "before", metric), value(r, "before", metric)) for b, r in zip(bd_runs, ref_runs)]
        return max(diffs, key=abs)

    before_acc = worst_before("clean_acc")
    if abs(before_acc) > args.before_tol:
        reasons.append(
            f"C-Acc before tuning differs by {before_acc:+.2f} points (> {args.before_tol}): "
            "the two pipelines do not see the same model or images"
        )
    bd_acc = _spread([value(b, "after", "clean_acc") for b in bd_runs])
    ref_acc = _spread([value(r, "after", "clean_acc") for r in ref_runs])
    after_acc = bd_acc["median"] - ref_acc["median"]
    if abs(after_acc) > args.acc_tol:
        reasons.append(f"{what}C-Acc after FST differs by {after_acc:+.2f} points (> {args.acc_tol})")
    result = {
        "seeds": len(bd_runs),
        "clean_acc_before_diff_points": round(before_acc, 3),
        "clean_acc_after_diff_points": round(after_acc, 3),
        "bdclean_after": {"clean_acc": bd_acc},
        "reference_after": {"clean_acc": ref_acc},
    }
    if all(b["after"].get("asr") is not None for b in bd_runs):
        before_asr = worst_before("asr")
        bd_asr = _spread([value(b, "after", "asr") for b in bd_runs])
        ref_asr = _spread([value(r, "after", "asr") for r in ref_runs])
        both_low = bd_asr["median"] <= args.asr_low and ref_asr["median"] <= args.asr_low
        if abs(before_asr) > args.before_tol:
            reasons.append(f"ASR before tuning differs by {before_asr:+.2f} points (> {args.before_tol})")
        diff = bd_asr["median"] - ref_asr["median"]
        if not both_low and abs(diff) > args.asr_tol:
            reasons.append(
                f"{what}ASR after FST: bdclean {bd_asr['median']:.2f}% vs reference {ref_asr['median']:.2f}%"
                f"{f' over {len(bd_runs)} seeds' if several else ''} "
                f"(neither both <= {args.asr_low}% nor within {args.asr_tol} points)"
            )
        result.update(
            {
                "asr_before_diff_points": round(before_asr, 3),
                "asr_after_diff_points": round(diff, 3),
                "asr_after_both_low": both_low,
            }
        )
        result["bdclean_after"]["asr"], result["reference_after"]["asr"] = bd_asr, ref_asr
    result.update(
        {
            "passed": not reasons,
            "reasons": reasons,
            "tolerances": {
                "clean_acc_after_points": args.acc_tol,
                "asr_after_points": args.asr_tol,
                "asr_low_percent": args.asr_low,
                "before_points": args.before_tol,
            },
        }
    )
    return result


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2]: distinct non-negative integers."""
    seeds = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit():
            raise ValueError(f"--seeds wants comma-separated non-negative integers, got {text!r}")
        seeds.append(int(part))
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds has a seed twice: {text!r}")
    return seeds


def throughput(run: dict) -> dict:
    n_eval = run["eval_images"]["clean"] + run["eval_images"]["poisoned"]
    st = run["stages"]
    per_s = lambda n, s: round(n / s, 1) if s > 0 else None  # noqa: E731
    return {
        "evaluate_before_images_per_s": per_s(n_eval, st["evaluate_before"]),
        "evaluate_after_images_per_s": per_s(n_eval, st["evaluate_after"]),
        "tune_images_per_s": per_s(run["tune_images"], st["tune"]),
    }


def speedups(bd: dict, ref: dict) -> dict:
    ratio = lambda r, b: round(r / b, 2) if b > 0 and r > 0 else None  # noqa: E731
    out = {name: ratio(ref["stages"][name], bd["stages"][name]) for name in STAGES}
    ev_bd = bd["stages"]["evaluate_before"] + bd["stages"]["evaluate_after"]
    ev_ref = ref["stages"]["evaluate_before"] + ref["stages"]["evaluate_after"]
    out["evaluate"] = ratio(ev_ref, ev_bd)
    out["total"] = ratio(ref["total"], bd["total"])
    return out


def print_summary(result: dict) -> None:
    s, bd, ref, sp = result["settings"], result["bdclean"], result["reference"], result["speedup"]
    print(f"\nbdclean purification benchmark (FST) on {result['device']['name']}")
    print(
        f"  torch {result['environment']['torch']}, {s['dataset']} ({s['data']}), {s['arch']}, "
        f"{s['clean_count']} clean images x {s['epochs']} epochs, batch {s['batch_size']}, "
        f"eval {s['eval_images']['clean']} clean + {s['eval_images']['poisoned']} triggered images, seed {s['seed']}"
    )
    print(f"  reference: DataLoader num_workers={s['num_workers']}, transforms: {s['transforms']}, fp32 NCHW")
    if bd.get("compute"):
        from backdoor_cli.reports.report import compute_line

        print(f"  bdclean {compute_line(bd['compute'])}")
    print(f"  load average before/after: {result['load_average']['start']} / {result['load_average']['end']}")
    print(f"\n  {'stage':<16}{'bdclean s':>11}{'reference s':>13}{'ratio':>9}")
    for name in STAGES + ("total",):
        b = bd["total"] if name == "total" else bd["stages"][name]
        r = ref["total"] if name == "total" else ref["stages"][name]
        ratio = sp.get(name)
        print(f"  {name:<16}{b:>11.3f}{r:>13.3f}{(f'{ratio:.2f}x' if ratio else '-'):>9}")
    print(f"\n  {'images/s':<24}{'bdclean':>11}{'reference':>13}")
    for key, label in (
        ("evaluate_before_images_per_s", "evaluate (before)"),
        ("evaluate_after_images_per_s", "evaluate (after)"),
        ("tune_images_per_s", "tune"),
    ):
        print(f"  {label:<24}{bd['throughput'][key] or 0:>11.1f}{ref['throughput'][key] or 0:>13.1f}")
    print(f"\n  speed-up (reference / bdclean): total {sp['total']}x, evaluate {sp['evaluate']}x, tune {sp['tune']}x")
    rep = result.get("repeats")
    if rep and rep["count"] > 1:
        pairs = "repeats" if len(result["settings"].get("seeds") or [0]) == 1 else "pairs (seeds x repeats)"
        print(
            f"  total ratio over {rep['count']} {pairs}: median {rep['median_total_ratio']}x "
            f"(all: {', '.join(f'{r}x' for r in rep['total_ratios'])})"
        )
    print(f"\n  {'result':<22}{'bdclean':>12}{'reference':>12}")
    for phase in ("before", "after"):
        for metric in ("clean_acc", "asr", "ra"):
            b, r = bd[phase].get(metric), ref[phase].get(metric)
            if b is None or r is None:
                continue
            print(f"  {metric + ' ' + phase:<22}{b['value']:>11.2%} {r['value']:>11.2%}")
    seeds = result.get("seeds") or []
    if len(seeds) > 1:
        print(f"\n  after FST, per seed (C-Acc / ASR){'':<4}{'bdclean':>18}{'reference':>20}")

        def cell(m: dict) -> str:
            return (
                f"{m['clean_acc']['value']:.2%} / {m['asr']['value']:.2%}"
                if m.get("asr")
                else (f"{m['clean_acc']['value']:.2%}")
            )

        for run in seeds:
            b, r = run["bdclean"]["after"], run["reference"]["after"]
            print(f"  {'seed ' + str(run['seed']):<38}{cell(b):>18}{cell(r):>20}")
        check = result["check"]
        for metric in ("clean_acc", "asr"):
            b, r = check["bdclean_after"].get(metric), check["reference_after"].get(metric)
            if b and r:
                print(
                    f"  {metric + ' median [min, max]':<38}{b['median']:>7.2f}% [{b['min']:.1f}, {b['max']:.1f}]"
                    f"{r['median']:>9.2f}% [{r['min']:.1f}, {r['max']:.1f}]"
                )
    check = result["check"]
    print(
        f"\n  comparable results: {'PASS' if check['passed'] else 'FAIL'}"
        + "".join(f"\n    - {reason}" for reason in check["reasons"])
    )


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- main


def parse_args(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model",
        help="checkpoint to purify (default: a backdoored model trained once by bdclean "
        "train and cached in --cache-dir)",
    )
    p.add_argument(
        "--data",
        help="directory with train.npz/test.npz (default: ../shared/data/cifar10 when present, "
        "else the bundled MNIST sample; --quick: the MNIST sample)",
    )
    p.add_argument("--arch", help="architecture (default: simple_cnn on CPU, resnet18 on CUDA)")
    p.add_argument("--trigger", help="trigger spec (default: the one recorded in the checkpoint)")
    p.add_argument("--clean-count", type=int, help="clean images to tune on (1000: the paper's 2%% of CIFAR-10)")
    p.add_argument("--epochs", type=int, help="FST epochs (10, the paper's)")
    p.add_argument("--batch-size", type=int, help="tuning batch size (128)")
    p.add_argument(
        "--eval-limit",
        type=int,
        help="evaluate on a stratified subset of N test images (CPU 2000, CUDA: full test set); 0 = full test set",
    )
    p.add_argument("--num-workers", type=int, help="reference DataLoader workers (CPU 0, CUDA 4)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--seeds",
        help="run the pair once per seed, e.g. 0,1,2 (both halves get each seed: clean subset, "
        "evaluation subset, head init, shuffling, augmentation) and compare the two "
        "halves' medians over the seeds; default: --seed alone",
    )
    p.add_argument("--threads", type=int, help="torch threads for both pipelines (default: torch's, one per core)")
    p.add_argument("--precision", default="auto", help="bdclean's --precision (auto, fp32, bf16)")
    p.add_argument("--memory-format", default="auto", help="bdclean's --memory-format")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test in seconds")
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run the bdclean/reference pair this many times and report the median total ratio too "
        "(the first pair's stage times are the ones shown)",
    )
    p.add_argument("--json-out", help="JSON result (default: benchmarks/results/bench-<device>.json)")
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help="where the default subject model is cached")
    p.add_argument("--acc-tol", type=float, default=3.0, help="max C-Acc difference after FST, points")
    p.add_argument("--asr-tol", type=float, default=10.0, help="max ASR difference after FST, points...")
    p.add_argument("--asr-low", type=float, default=20.0, help="...unless both ASRs are at most this (percent)")
    p.add_argument(
        "--before-tol",
        type=float,
        default=1.0,
        help="max C-Acc/ASR difference before tuning, points (same model, same images)",
    )
    return p.parse_args(argv)


def resolve_defaults(args, device: torch.device) -> str:
    profile = "quick" if args.quick else ("cuda" if device.type == "cuda" else "cpu")
    defaults = PROFILES[profile]
    if args.data is None:
        args.data = str(SHARED_CIFAR10 if (SHARED_CIFAR10 / "train.npz").exists() and not args.quick else MNIST_SAMPLE)
    if not args.model:  # with --model the architecture comes from the checkpoint unless --arch names it
        args.arch = args.arch or defaults["arch"]
    args.clean_count = args.clean_count or defaults["clean_count"]
    args.epochs = args.epochs or defaults["epochs"]
    args.batch_size = args.batch_size or defaults.get("batch_size", 128)
    if args.eval_limit is None:
        args.eval_limit = defaults["eval_limit"]
    elif args.eval_limit <= 0:
        args.eval_limit = None
    if args.num_workers is None:
        args.num_workers = defaults["num_workers"]
    return profile


def warm_up(paths, arch: str, num_classes: int, in_channels: int, size: tuple[int, int], device: torch.device) -> None:
    """Untimed: read the input files once (page cache) and run one training step, so neither
    pipeline pays first-touch disk reads or one-time kernel set-up that the other then skips."""
    from backdoor_cli.models import build_model

    for path in paths:
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass
    model = build_model(arch, num_classes, in_channels).to(device)
    x = torch.randn(8, in_channels, *size, device=device)
    F.cross_entropy(model(x), torch.zeros(8, dtype=torch.long, device=device)).backward()
    model.eval()
    with torch.no_grad():
        model(x)
    synchronize(device)


def main(argv=None) -> int:
    args = parse_args(argv)
    from backdoor_cli.data.datasets import load_dataset, stratified_limit
    from backdoor_cli.runtime import environment, resolve_device

    if args.repeat < 1:
        log("error: --repeat must be at least 1")
        return 2
    try:
        seeds = parse_seeds(args.seeds) if args.seeds else [args.seed]
    except ValueError as exc:
        log(f"error: {exc}")
        return 2
    args.seed = seeds[0]  # the default subject model and the first pair's details use the first seed
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    args.device = str(device)
    profile = resolve_defaults(args, device)
    data_dir = Path(args.data).resolve()
    if not ((data_dir / "train.npz").exists() and (data_dir / "test.npz").exists()):
        log(f"error: --data {data_dir} must be a directory holding train.npz and test.npz")
        return 2
    described = device_description(device)
    log(
        f"device: {described['name']}; settings: {args.clean_count} clean images, {args.epochs} epochs, batch "
        f"{args.batch_size}, eval {'full test set' if args.eval_limit is None else f'{args.eval_limit} test images'}"
        f", {data_dir}"
    )

    checkpoint = Path(args.model).resolve() if args.model else default_model(args, data_dir, profile)
    # Facts both pipelines share, resolved untimed: the test labels (for the evaluation subset) and
    # the dataset's flip rule.
    test_bundle = load_dataset(str(data_dir), None, need_train=False)
    height, width, channels = test_bundle.test.image_shape

    def eval_indices_for(seed: int):  # bdclean's --eval-limit subset for that seed
        if args.eval_limit is not None and args.eval_limit < test_bundle.test.num_images:
            return stratified_limit(test_bundle.test.y, args.eval_limit, seed).numpy()
        return None

    warm_up(
        [checkpoint, data_dir / "train.npz", data_dir / "test.npz"],
        _arch_of(checkpoint, args.arch),
        test_bundle.num_classes,
        channels,
        (height, width),
        device,
    )

    load_start = load_average()
    outcomes, per_seed, same_images = [], [], True
    for seed in seeds:
        eval_indices = eval_indices_for(seed)
        for i in range(args.repeat):
            parts = ([f"seed {seed}"] if len(seeds) > 1 else []) + (
                [f"repeat {i + 1}/{args.repeat}"] if args.repeat > 1 else []
            )
            outcome = _run_pair(
                args,
                device,
                checkpoint,
                data_dir,
                test_bundle,
                eval_indices,
                f" ({', '.join(parts)})" if parts else "",
                seed,
            )
            bd_i, report_i, ref_i = outcome[:3]
            same = _same_eval_images(test_bundle, eval_indices, report_i, ref_i, seed)
            same_images = same_images and same
            ref_i.pop("_poisoned_x"), ref_i.pop("_clean_y")  # only for the check above
            outcomes.append(outcome)
            if i == 0:  # the seed's results: its first pair
                per_seed.append(
                    {
                        "seed": seed,
                        "same_eval_images": same,
                        "bdclean": {k: bd_i[k] for k in ("before", "after", "history")},
                        "reference": {k: ref_i[k] for k in ("before", "after", "history")},
                        "totals": {"bdclean": round(bd_i["total"], 3), "reference": round(ref_i["total"], 3)},
                    }
                )
    load_end = load_average()
    bd, report, ref, job, clean_indices = outcomes[0]  # the first pair's details are the ones reported
    result_repeats = _repeat_summary([(o[0]["total"], o[2]["total"]) for o in outcomes])

    for run in (bd, ref):
        run["throughput"] = throughput(run)
    check = compare_results([s["bdclean"] for s in per_seed], [s["reference"] for s in per_seed], args)
    if not same_images:
        check["passed"] = False
        check["reasons"].append("the reference pipeline's evaluation images differ from bdclean's")
    check["same_eval_images"] = same_images
    env = environment(device)
    result = {
        "schema": SCHEMA,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": described,
        "environment": env,
        "load_average": {"start": load_start, "end": load_end},
        "settings": {
            "profile": profile,
            "model": str(checkpoint),
            "model_sha256": report.subject["sha256"],
            "data": str(data_dir),
            "dataset": report.data["name"],
            "arch": job.arch,
            "head": job.head,
            "trigger": report.trigger,
            "method": "fst",
            "clean_count": len(clean_indices),
            "epochs": job.epochs,
            "batch_size": job.batch_size,
            "lr": job.lr,
            "alpha": job.alpha,
            "momentum": job.momentum,
            "weight_decay": job.weight_decay,
            "eval_limit": args.eval_limit,
            "eval_images": bd["eval_images"],
            "seed": args.seed,
            "seeds": seeds,
            "num_workers": args.num_workers,
            "transforms": ref["transforms"],
            "quick": args.quick,
            "threads": torch.get_num_threads(),
            "precision": args.precision,
            "memory_format": args.memory_format,
        },
        "bdclean": bd,
        "reference": ref,
        "speedup": speedups(bd, ref),
        "repeats": result_repeats,
        "seeds": per_seed,
        "check": check,
    }
    print_summary(result)
    out = (
        Path(args.json_out)
        if args.json_out
        else (DEFAULT_RESULTS / f"bench-{slugify(described['name'])}{'-quick' if args.quick else ''}.json")
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_jsonable(result), indent=2) + "\n")
    print(f"\n  JSON: {out}")
    return 0 if check["passed"] else 1


def _run_pair(
    args,
    device: torch.device,
    checkpoint: Path,
    data_dir: Path,
    test_bundle,
    eval_indices,
    tag: str,
    seed: int | None = None,
):
    """One bdclean run, then one reference run of the same job (`seed`, default --seed, for both):
    (bd, report, ref, job, clean_indices)."""
    seed = args.seed if seed is None else seed
    with tempfile.TemporaryDirectory(prefix="bdclean-bench-") as tmp:
        tmp = Path(tmp)
        log(f"running bdclean (purify_checkpoint, method fst){tag}...")
        start = time.perf_counter()
        bd, report = run_bdclean(args, checkpoint, data_dir, tmp / "bdclean", seed)
        bd["total"] = time.perf_counter() - start
        log(f"bdclean done in {bd['total']:.1f}s: {_figures(bd['after'])} after FST")
        params = report.method["params"]
        clean_indices = np.array(
            [int(line) for line in (tmp / "bdclean" / "clean_indices.txt").read_text().split()], dtype=np.int64
        )
        job = ReferenceJob(
            checkpoint=checkpoint,
            data_dir=data_dir,
            arch=report.subject["arch"],
            num_classes=report.subject["num_classes"],
            in_channels=report.subject["in_channels"],
            head=report.subject["head"],
            mean=tuple(report.subject["normalization"]["mean"]),
            std=tuple(report.subject["normalization"]["std"]),
            flip=test_bundle.augment_flip,
            trigger_spec=report.trigger,
            clean_indices=clean_indices,
            eval_indices=eval_indices,
            lr=params["lr"],
            epochs=params["epochs"],
            alpha=params["alpha"],
            batch_size=params["batch_size"],
            momentum=params["momentum"],
            weight_decay=params["weight_decay"],
            augment=params["augment"],
            seed=seed,
            num_workers=args.num_workers,
            out_dir=tmp,
        )
        log(f"running the reference-style pipeline (DataLoader, num_workers={args.num_workers}){tag}...")
        start = time.perf_counter()
        ref = run_reference(job, device)
        ref["total"] = time.perf_counter() - start
        log(f"reference done in {ref['total']:.1f}s: {_figures(ref['after'])} after FST")
    return bd, report, ref, job, clean_indices


def _figures(metrics: dict) -> str:
    asr = metrics.get("asr")
    return f"C-Acc {metrics['clean_acc']['value']:.2%}" + (f", ASR {asr['value']:.2%}" if asr else "")


def _repeat_summary(pairs: list[tuple[float, float]]) -> dict:
    """Total-time ratio of every repeat and their median: on a shared machine one pair can be unlucky."""
    ratios = sorted(ref / bd for bd, ref in pairs)
    return {
        "count": len(pairs),
        "totals": [{"bdclean": round(bd, 3), "reference": round(ref, 3)} for bd, ref in pairs],
        "total_ratios": [round(r, 3) for r in ratios],
        "median_total_ratio": round(statistics.median(ratios), 3),
    }


def _arch_of(checkpoint: Path, arch: str | None) -> str:
    if arch:
        return arch
    from backdoor_cli.checkpoint import read_checkpoint
    from backdoor_cli.models import guess_architecture

    ckpt = read_checkpoint(checkpoint)
    found = ckpt.metadata.get("arch") or guess_architecture(ckpt.state_dict).arch
    if not found:
        raise SystemExit(f"cannot tell the architecture of {checkpoint}; pass --arch")
    return found


def _same_eval_images(test_bundle, eval_indices, report, ref: dict, seed: int) -> bool:
    """Rebuild bdclean's evaluation sets (untimed) and compare them with the reference's, pixel for pixel."""
    from backdoor_cli.evaluation.measure import build_eval_sets
    from backdoor_cli.triggers import build_trigger, parse_trigger_spec

    trigger = build_trigger(parse_trigger_spec(report.trigger, None, source="benchmark"), test_bundle.test.image_shape)
    limit = len(eval_indices) if eval_indices is not None else None
    sets = build_eval_sets(test_bundle.test, trigger, torch.device("cpu"), limit, seed)
    return torch.equal(sets.clean.y, torch.from_numpy(ref["_clean_y"].astype(np.int64))) and torch.equal(
        sets.poisoned.x, torch.from_numpy(ref["_poisoned_x"])
    )


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items() if not k.startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float):
        return round(obj, 6) if math.isfinite(obj) else None
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    return obj


if __name__ == "__main__":
    sys.exit(main())
