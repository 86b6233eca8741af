#!/usr/bin/env python3
"""Where does a tuning step's time go? Profile bdclean's training step and forward pass by operator.

    .venv/bin/python benchmarks/profile_step.py                     # simple_cnn, CIFAR-sized batch of 128
    .venv/bin/python benchmarks/profile_step.py --arch resnet18 --device cuda

It answers the question `make bench` leaves open when the speed-up is small: is the step bound by
the model's own arithmetic (convolutions forward and backward), or by overheads the fast path could
remove (data handling, host syncs, optimiser)? It prints the step time in both memory formats, the
model's multiply-accumulates per image, the achieved GFLOP/s, and the operators that take the time,
grouped, and writes the same as JSON (--json).

Inputs are random tensors of the model's input size: the arithmetic does not depend on the values.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from backdoor_cli.models import build_model  # noqa: E402
from backdoor_cli.precision import autocast, cpu_capability  # noqa: E402
from backdoor_cli.runtime import device_name, resolve_device, synchronize  # noqa: E402

PRECISION = "fp32"  # set by --precision: bf16 runs every forward pass under bf16 autocast, as bdclean tunes

# Operator name fragments -> group. Checked in order; the first match wins.
GROUPS = (
    ("convolution backward", ("convolution_backward", "mkldnn_convolution_backward", "cudnn_convolution_backward")),
    ("convolution forward", ("convolution", "conv2d", "mkldnn_convolution", "cudnn_convolution")),
    ("batch norm", ("batch_norm", "native_batch_norm")),
    ("relu / pooling", ("relu", "threshold", "max_pool", "avg_pool", "adaptive", "mean")),
    ("linear head + loss", ("addmm", "mm", "linear", "cross_entropy", "log_softmax", "nll_loss")),
    ("optimiser", ("sgd", "foreach", "_fused")),
    ("element-wise (grads, optimiser, zeroing)", ("add", "mul", "fill", "copy", "zero", "sum", "div")),
)


def count_macs(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass per image, from the conv and linear layers' output shapes."""
    total = 0

    def hook(module, _inputs, output):
        nonlocal total
        if isinstance(module, torch.nn.Conv2d):
            kernel = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            total += output[0].numel() * kernel
        elif isinstance(module, torch.nn.Linear):
            total += output[0].numel() * module.in_features

    handles = [
        m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
    ]
    with torch.no_grad():
        model(x[:1])
    for h in handles:
        h.remove()
    return total


def group_of(name: str) -> str:
    if not name.startswith("aten::"):
        # autograd nodes, profiler ranges, Python-side dispatch: their self time is framework overhead
        return "framework overhead"
    lowered = name.lower()
    for group, fragments in GROUPS:
        if any(f in lowered for f in fragments):
            return group
    return "other"


def time_steps(model, x, y, optimizer, steps: int, device) -> float:
    """Mean seconds per SGD step (forward, backward, update), after two warm-up steps."""

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast(x.device, PRECISION):
            out = model(x)
        F.cross_entropy(out.float(), y).backward()
        optimizer.step()

    for _ in range(2):
        step()
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return (time.perf_counter() - t0) / steps


def time_forward(model, x, repeats: int, device) -> float:
    model.eval()
    with torch.inference_mode(), autocast(x.device, PRECISION):
        model(x)
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            model(x)
        synchronize(device)
    model.train()
    return (time.perf_counter() - t0) / repeats


def profile_groups(model, x, y, optimizer, steps: int) -> dict[str, float]:
    """Self time per operator group over `steps` training steps, as fractions of the total."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if x.is_cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            with autocast(x.device, PRECISION):
                out = model(x)
            F.cross_entropy(out.float(), y).backward()
            optimizer.step()
    totals: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        # On CUDA the kernels' device time is what counts; on CPU the operators' own CPU time.
        spent = event.self_device_time_total if x.is_cuda else event.self_cpu_time_total
        totals[group_of(event.key)] += spent
    whole = sum(totals.values()) or 1.0
    return {k: round(v / whole, 4) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="simple_cnn")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--json", default=None, help="also write the figures here")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="bf16: under bf16 autocast")
    args = parser.parse_args(argv)
    global PRECISION
    PRECISION = args.precision

    torch.manual_seed(0)
    device = resolve_device(args.device)
    x = torch.randn(args.batch_size, args.channels, args.size, args.size, device=device)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    result: dict = {
        "device": device_name(device),
        "arch": args.arch,
        "batch_size": args.batch_size,
        "precision": args.precision,
        "cpu_capability": cpu_capability().kind,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    for fmt in ("contiguous", "channels_last"):
        memory_format = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
        model = build_model(args.arch, num_classes=10, in_channels=args.channels).to(
            device, memory_format=memory_format
        )
        xf = x.contiguous(memory_format=memory_format)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, foreach=True)
        macs = count_macs(model, xf)
        step = time_steps(model, xf, y, optimizer, args.steps, device)
        forward = time_forward(model, xf, args.steps, device)
        result[fmt] = {
            "step_ms": round(step * 1e3, 1),
            "forward_ms": round(forward * 1e3, 1),
            # a training step is about 3x the forward arithmetic (forward, input grads, weight grads)
            "train_gflops": round(3 * 2 * macs * args.batch_size / step / 1e9, 1),
            "eval_images_per_s": round(args.batch_size / forward),
            "eval_gflops": round(2 * macs * args.batch_size / forward / 1e9, 1),
        }
        result["macs_per_image"] = macs
        if fmt == "channels_last":
            result["profile_channels_last"] = profile_groups(model, xf, y, optimizer, max(2, args.steps // 2))

    print(
        f"{result['device']} ({result['cpu_capability']}), torch {result['torch']}, {result['threads']} threads; "
        f"{args.arch}, batch {args.batch_size}, {args.precision}, "
        f"{result['macs_per_image'] / 1e6:.1f} M multiply-accumulates per image"
    )
    for fmt in ("contiguous", "channels_last"):
        r = result[fmt]
        print(
            f"  {fmt:13s} train step {r['step_ms']:7.1f} ms ({r['train_gflops']} GFLOP/s)   "
            f"forward {r['forward_ms']:6.1f} ms ({r['eval_images_per_s']} images/s, {r['eval_gflops']} GFLOP/s)"
        )
    print("  share of a channels_last training step by operator group:")
    for group, share in result["profile_channels_last"].items():
        print(f"    {group:22s} {share * 100:5.1f}%")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
