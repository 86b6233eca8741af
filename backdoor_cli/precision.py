"""Which arithmetic a run uses: the CPU's capability, the precision (fp32 or bf16 autocast) of tuning
and of evaluation, and the memory format of the model, chosen by timing both.

Why per capability: on a CPU with native bf16 (AVX512-BF16 or AMX), oneDNN runs bf16 convolutions
1.5-3x faster than fp32; on an AVX2-only CPU bf16 is emulated and was ~30x slower. So `auto` turns
bf16 on only where the CPU has it. Tuning keeps fp32 master weights (autocast casts per op; the
optimiser steps the fp32 parameters) and the loss in fp32, as on CUDA.

Evaluation decides the reported figures, and an audit's figures must be the model's own, the same on
any machine: `auto` evaluates in fp32 everywhere (on CUDA with TF32 off, see `exact_fp32`). bf16
evaluation changed 13-52 of 10,000 predictions in the precision study (benchmarks/precision_study.py)
and flipped a near-tied BackdoorBench-layout model's count (49 correct against the fp32 forward's 46),
so it is used only when asked for (`--precision bf16`), and the report says so. Tuning keeps bf16
where the device has it: its outcome was measured equal (benchmarks/README.md).

Memory format: channels_last was faster for simple_cnn on every CPU measured, but slower for
ResNet-18 training in bf16 on an AMX CPU (issue 16), so no fixed rule is fastest everywhere. The two
formats run different kernels, so they round differently, and a tuning run's weights (bf16 most of all)
follow the format from the first step on. `auto` (the default) therefore keeps channels_last untimed: a
format chosen by timing follows the machine's load (a loaded 2-core machine chose contiguous for a
VGG-16-BN whose idle timing favours channels_last by 9%, and the same purify moved by half a point), and
a run must be the same from its seed, whatever else the machine is doing. `timed` times a few steps in
each format at start-up and keeps the faster, for a user who wants the speed and accepts that; the
report records the choice and the timings either way.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from .config import CHOICES
from .errors import ConfigError
from .models.probing import probe_forward

PRECISIONS: tuple[str, ...] = CHOICES["precision"]
MEMORY_FORMATS: tuple[str, ...] = CHOICES["memory_format"]
# auto evaluation on a native-bf16 CPU. The precision study (benchmarks/README.md) found bf16 moved no
# C-Acc or ASR by more than 0.14 of its 95% interval, but it did change up to 0.52% of the predictions:
# counts that differ from the model's own fp32 forward, and from the same file evaluated on another
# machine. An audit reports the model's own figures, so auto evaluates in fp32 (--precision bf16 asks).
EVAL_BF16_ON_CPU = False
# The evaluation precision of `auto` on a native-bf16 CPU: bf16 with every image whose answer bf16
# could have changed re-run in fp32 (evaluation/checked.py), so the predictions are fp32's. Measured
# image for image against the fp32 forward in docs/performance.md. `BDCLEAN_CHECKED_BF16=0`: plain fp32.
CHECKED_BF16 = "bf16-checked"
# Keep channels_last (the format data.normalize's batches already have) unless contiguous is faster
# by more than this: a close call would otherwise flip with machine load from run to run, and with
# it the last bits of the results.
FORMAT_MARGIN = 0.10
# Why `auto` is not timed, as the report states it.
AUTO_FORMAT_REASON = (
    "default (auto: not timed, so the run does not depend on the machine's load; --memory-format timed keeps "
    "the faster of the two)"
)
# A model with fewer multiply-accumulates per image than this is too small for its format to matter
# (test_tiny: ~30k; simple_cnn on 32x32: tens of millions). Not timing it keeps its start-up free and
# its results independent of timing noise. Counted, not timed, so the decision is the same every run.
FORMAT_MIN_MACS = 5_000_000
# Timed rounds (one step per format each) after one untimed step per format; each format keeps its
# best. Two rounds for training too: a single timed step put simple_cnn's bf16 training in the slower
# format once on the loaded shared machine. Each training step on the copy is work the run does not keep.
FORMAT_TIMED_STEPS = {"eval": 2, "train": 2}
# Evaluation is timed on a batch of this many 32x32 images, fewer for larger ones (the same pixels):
# the real batches are larger, but a forward pass of 1024 images costs a second or more on 2 cores.
FORMAT_EVAL_BATCH = 128


@dataclass(frozen=True)
class CpuCapability:
    """What the CPU offers for bf16, from torch's dispatch level and the kernel's CPU flags."""

    torch_capability: str  # torch.backends.cpu.get_cpu_capability(): DEFAULT, AVX2, AVX512, ...
    avx512_bf16: bool
    amx_bf16: bool

    @property
    def native_bf16(self) -> bool:
        return self.avx512_bf16 or self.amx_bf16

    @property
    def kind(self) -> str:
        """The label benchmarks and reports print: AMX, AVX512-BF16, AVX512, AVX2, ..."""
        if self.amx_bf16:
            return "AMX"
        if self.avx512_bf16:
            return "AVX512-BF16"
        return self.torch_capability

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "torch_capability": self.torch_capability,
            "avx512_bf16": self.avx512_bf16,
            "amx_bf16": self.amx_bf16,
            "native_bf16": self.native_bf16,
        }


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The first processor's flags (Linux); empty elsewhere, which reads as no native bf16."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


@lru_cache(maxsize=1)
def cpu_capability() -> CpuCapability:
    # torch reports AVX512 for both AVX512 kinds (and for AMX machines), so the bf16 units come
    # from the flags: avx512_bf16 (Cooper Lake, Zen 4 and later), amx_bf16 (Sapphire Rapids and later).
    flags = cpu_flags()
    return CpuCapability(torch.backends.cpu.get_cpu_capability(), "avx512_bf16" in flags, "amx_bf16" in flags)


def parse_choice(value: str | None, allowed: tuple[str, ...], option: str) -> str:
    text = (value or "auto").strip().lower().replace("_", "-")
    canonical = {a.replace("_", "-"): a for a in allowed}
    if text not in canonical:
        raise ConfigError(f"unknown {option} {value!r}", hint=f"use one of: {', '.join(allowed)}")
    return canonical[text]


@dataclass(frozen=True)
class PrecisionPlan:
    """The precision of each stage that runs the model, and why."""

    requested: str  # auto | fp32 | bf16
    tune: str  # fp32 | bf16
    evaluate: str
    reason: str

    def to_dict(self) -> dict:
        return {"requested": self.requested, "tune": self.tune, "evaluate": self.evaluate, "reason": self.reason}


def resolve_precision(spec: str | None, device: torch.device, capability: CpuCapability | None = None) -> PrecisionPlan:
    """--precision -> the precision of tuning and of evaluation on this device."""
    requested = parse_choice(spec, PRECISIONS, "--precision")
    if requested != "auto":
        reason = "requested"
        if requested == "bf16" and device.type == "cpu" and not (capability or cpu_capability()).native_bf16:
            reason = "requested; this CPU has no native bf16 (emulated: much slower than fp32)"
        return PrecisionPlan(requested, requested, requested, reason)
    if device.type == "cuda":
        return PrecisionPlan(
            "auto",
            "bf16",
            "fp32",
            "CUDA: bf16 autocast for tuning; evaluation in exact fp32 (TF32 off), the model's own",
        )
    cap = capability or cpu_capability()
    if not cap.native_bf16:
        return PrecisionPlan("auto", "fp32", "fp32", f"CPU {cap.kind}: no native bf16")
    if EVAL_BF16_ON_CPU:
        evaluate, why = "bf16", "bf16 (it moved no figure of the precision study by more than 0.14 of its interval)"
    elif checked_bf16_enabled():
        evaluate = CHECKED_BF16
        why = "bf16 with every near-tie re-run in fp32: the fp32 forward's predictions (plain bf16 changed up to 0.52%)"
    else:
        evaluate, why = "fp32", "exact fp32, the model's own predictions (bf16 changed up to 0.52% of them)"
    return PrecisionPlan("auto", "bf16", evaluate, f"CPU {cap.kind}: native bf16 for tuning; evaluation in {why}")


def checked_bf16_enabled() -> bool:
    return os.environ.get("BDCLEAN_CHECKED_BF16", "1").strip().lower() not in ("0", "false", "no", "off")


def default_precision(device: torch.device) -> str:
    """What library calls without a precision get: bf16 on CUDA and fp32 on CPU, bdclean's behaviour
    before --precision existed (the CLI resolves --precision itself)."""
    return "bf16" if device.type == "cuda" else "fp32"


def autocast(device: torch.device, precision: str, cache: bool = True):
    """bf16 autocast (fp32 master weights, per-op casts) or nothing. `cache=False` for a step that a CUDA
    graph captures: the cast-weight cache would outlive the capture."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=cache)
    return contextlib.nullcontext()


@contextlib.contextmanager
def exact_fp32(device: torch.device):
    """fp32 that is fp32: on CUDA, cuDNN convolutions default to TF32 (10-bit mantissa products), which
    changes near-tied predictions; inside this block TF32 is off for convolutions and matrix products.
    The previous settings are restored on exit. On CPU there is nothing to change."""
    if device.type != "cuda":
        yield
        return
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def evaluation_arithmetic(device: torch.device, precision: str):
    """The context every evaluation forward runs in: bf16 autocast when asked for, else exact fp32."""
    return autocast(device, precision) if precision == "bf16" else exact_fp32(device)


def torch_format(name: str) -> torch.memory_format:
    return torch.channels_last if name == "channels_last" else torch.contiguous_format


def as_format(x: torch.Tensor, name: str) -> torch.Tensor:
    """Batches from data.normalize are NHWC in memory (channels_last strides); a contiguous model
    gets a contiguous copy, else the convolution would run in channels_last after all."""
    return x.contiguous(memory_format=torch_format(name)) if x.dim() == 4 else x


@dataclass(frozen=True)
class FormatChoice:
    """The memory format a stage runs in, and the measurement behind it (seconds per step)."""

    format: str  # channels_last | contiguous
    reason: str
    seconds: dict[str, float] | None = None
    # a timed training step: each format's forward half alone (what an evaluation of the same
    # precision runs), so the evaluation's format can be chosen without timing it again
    forward_seconds: dict[str, float] | None = None

    def to_dict(self) -> dict:
        return {
            "format": self.format,
            "reason": self.reason,
            "seconds_per_step": {k: round(v, 5) for k, v in self.seconds.items()} if self.seconds else None,
        }


def choose_memory_format(
    model: torch.nn.Module,
    example: torch.Tensor,
    device: torch.device,
    precision: str,
    train: bool,
    spec: str | None = "auto",
    loss: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> FormatChoice:
    """`spec`: a format by name, `auto` (channels_last, untimed: see the module's docstring), or `timed`:
    time `model` on `example` (a normalised float batch) in each format, FORMAT_TIMED_STEPS
    alternating rounds, and keep the faster; a training step (forward + backward) when `train`, else a forward
    pass. Training is timed on a copy, so the model's weights, grads and BatchNorm statistics are
    untouched. Leaves `model` in the chosen format."""
    requested = parse_choice(spec, MEMORY_FORMATS, "--memory-format")
    if requested == "auto":
        return _apply(model, FormatChoice("channels_last", AUTO_FORMAT_REASON))
    if requested != "timed":
        return _apply(model, FormatChoice(requested, "requested"))
    if device.type != "cpu" or example.dim() != 4:
        # CUDA: channels_last is what tensor cores want; non-image inputs have no format to choose.
        return _apply(model, FormatChoice("channels_last", "default (not timed on this device)"))
    try:
        if conv_macs(model, example[:1]) < FORMAT_MIN_MACS:
            return _apply(model, FormatChoice("channels_last", "default (too little convolution work to matter)"))
    except Exception as exc:  # a model that cannot run a plain forward pass here: keep the default, say why
        return _apply(model, FormatChoice("channels_last", f"default (not timed: {type(exc).__name__})"))
    subject = copy.deepcopy(model) if train else model
    was_training = subject.training
    subject.train(train)
    inputs = {name: as_format(example, name) for name in ("channels_last", "contiguous")}
    seconds = {name: float("inf") for name in inputs}
    forward = {name: float("inf") for name in inputs}
    try:
        # One untimed step per format (oneDNN builds its primitives on the first call of each shape and
        # format), then timed rounds that alternate the formats, keeping each one's best: on a shared
        # machine a burst of load then hits both formats alike instead of the one being timed.
        for name, x in inputs.items():
            _time_format(subject, x, device, precision, train, name, loss)
        for _ in range(FORMAT_TIMED_STEPS["train" if train else "eval"]):
            for name, x in inputs.items():
                step, ahead = _time_format(subject, x, device, precision, train, name, loss)
                seconds[name], forward[name] = min(seconds[name], step), min(forward[name], ahead)
    except Exception as exc:  # a model that cannot run a plain step here: keep the default, say why
        return _apply(model, FormatChoice("channels_last", f"default (not timed: {type(exc).__name__})"))
    finally:
        subject.train(was_training)
    choice = _faster(seconds, "measured")
    if train:
        choice = dataclasses.replace(choice, forward_seconds=forward)
    return _apply(model, choice)


def _faster(seconds: dict[str, float], how: str) -> FormatChoice:
    if seconds["contiguous"] < seconds["channels_last"] * (1 - FORMAT_MARGIN):
        return FormatChoice("contiguous", f"{how}: faster by more than {FORMAT_MARGIN:.0%}", dict(seconds))
    return FormatChoice(
        "channels_last", f"{how}: contiguous not faster by more than {FORMAT_MARGIN:.0%}", dict(seconds)
    )


def evaluation_format_from_tuning(tune: FormatChoice, model: torch.nn.Module) -> FormatChoice | None:
    """The evaluation's format from a timed training step's forward halves (same precision: the caller
    checks), so the evaluation is not timed again; None when the training step was not timed."""
    if tune.forward_seconds is None:
        return None
    return _apply(model, _faster(tune.forward_seconds, "measured on the tuning step's forward pass"))


def working_precision(precision: str) -> str:
    """The arithmetic most of a stage runs in: a checked bf16 evaluation runs bf16 (fp32 for a few images)."""
    return "bf16" if precision in ("bf16", CHECKED_BF16) else "fp32"


def conv_macs(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of the convolutions in one forward pass of `x` (one image): the work
    whose speed the memory format changes. Runs in eval mode without grads; the modes are restored."""
    total = 0

    def hook(module, _inputs, output):
        nonlocal total
        kernel = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
        total += output[0].numel() * kernel

    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    if not convs:
        return 0
    probe_forward(model, x, [(m, hook) for m in convs])
    return total


def _apply(model: torch.nn.Module, choice: FormatChoice) -> FormatChoice:
    model.to(memory_format=torch_format(choice.format))
    return choice


def _scores(output) -> torch.Tensor:
    # Models from hubs may return an object or a tuple; the first tensor is the scores.
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    return logits if isinstance(logits, torch.Tensor) else output[0]


def _time_format(model, x, device, precision: str, train: bool, name: str, loss) -> tuple[float, float]:
    """(seconds of one step, seconds of its forward pass) in format `name`: forward + backward when
    `train`, else a forward pass (both figures the same)."""
    model.to(memory_format=torch_format(name))
    precision = working_precision(precision)
    start = time.perf_counter()
    if train:
        with autocast(device, precision):
            out = model(x)
        value = loss(out) if loss is not None else _scores(out).float().logsumexp(1).mean()
        ahead = time.perf_counter() - start  # on CPU the forward has run by now (no asynchronous queue)
        value.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start, ahead
    with torch.inference_mode(), autocast(device, precision):
        model(x)
    seconds = time.perf_counter() - start
    return seconds, seconds


def eval_timing_batch(image_shape: tuple[int, int, int]) -> int:
    h, w, _ = image_shape
    return max(2, FORMAT_EVAL_BATCH * 32 * 32 // (h * w))


def example_batch(image_shape: tuple[int, int, int], batch_size: int, device: torch.device) -> torch.Tensor:
    """A normalised-looking float batch (N, C, H, W) of the model's input size, from its own seeded
    generator: the timing does not depend on pixel values, and the run's RNG streams stay untouched."""
    h, w, c = image_shape
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch_size, c, h, w, generator=generator).to(device)


@dataclass
class Compute:
    """How a run computes: the CPU, the precision plan and each stage's memory format."""

    device: torch.device
    plan: PrecisionPlan
    formats: dict[str, FormatChoice]

    def to_dict(self) -> dict:
        return {
            "cpu": cpu_capability().to_dict() if self.device.type == "cpu" else None,
            "precision": self.plan.to_dict(),
            "memory_format": {stage: choice.to_dict() for stage, choice in self.formats.items()},
        }

    def replayable(self) -> dict:
        """For checkpoint metadata: what was chosen, no timings (a replay must give the same bytes)."""
        return {
            "precision": {"tune": self.plan.tune, "evaluate": self.plan.evaluate},
            "memory_format": {stage: choice.format for stage, choice in self.formats.items()},
        }

    def describe(self) -> str:
        formats = ", ".join(f"{stage} {choice.format}" for stage, choice in self.formats.items())
        return f"precision: tune {self.plan.tune}, evaluate {self.plan.evaluate} ({self.plan.reason}); memory format: {formats}"
