"""What a model's forward returns (logits, probabilities or log-probabilities), and the loss that fits.

Many published classifiers end in `nn.Softmax`. Cross-entropy on probabilities treats them as
logits: the gradient nearly vanishes, so tuning silently does the wrong thing (FST wrecks clean
accuracy, FT leaves the backdoor). So before tuning we look at the outputs of a probe batch and
pick the loss that trains the model as if it returned logits:

| kind      | loss                                                                        |
|-----------|-----------------------------------------------------------------------------|
| logits    | cross-entropy on the output                                                 |
| log-probs | cross-entropy on the input of a trailing nn.LogSoftmax, else NLL on the output |
| probs     | cross-entropy on the input of a trailing nn.Softmax (exact), else NLL on log(p) |
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, InputError
from .probing import probe_forward

OUTPUT_KINDS = ("logits", "probs", "log-probs")
CHOICES = OUTPUT_KINDS + ("auto",)
# Rows of a softmax sum to 1 up to float32 rounding (~1e-7 per class); a logits model hitting 1 within
# 1e-3 on every probe row by chance is not a realistic risk, while bf16 activations still pass.
TOLERANCE = 1e-3
PROBE_IMAGES = 32
# The module whose input is the logits when it produces the model's output, per kind.
NORMALISERS = {"probs": nn.Softmax, "log-probs": nn.LogSoftmax}
LossFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class OutputProbe:
    """What a probe batch showed: the evidence the detected kind rests on."""

    images: int
    detected: str
    min_value: float
    max_value: float
    max_sum_error: float  # max over rows of |sum(row) - 1|
    max_logsumexp_error: float  # max over rows of |logsumexp(row)|
    trailing_module: str | None = None  # the nn.Softmax / nn.LogSoftmax whose output IS the model's output
    trailing_type: str | None = None

    def reason(self) -> str:
        if self.detected == "probs":
            return f"every row of {self.images} probe outputs is >= 0 and sums to 1 within {self.max_sum_error:.1e}"
        if self.detected == "log-probs":
            return (
                f"every row of {self.images} probe outputs is <= 0 with logsumexp 0 within "
                f"{self.max_logsumexp_error:.1e}"
            )
        return (
            f"rows of {self.images} probe outputs are not distributions (row sums off by up to "
            f"{self.max_sum_error:.2g}, logsumexp off by up to {self.max_logsumexp_error:.2g})"
        )


@dataclass(frozen=True)
class LossAdapter:
    """How the tuning loss is formed from the model's output. `source` says which tensor it uses."""

    kind: str = "logits"
    source: str = "output"  # 'output' | 'normaliser-input' | 'log-of-output'
    module: str | None = None  # the trailing normaliser, for source 'normaliser-input'

    def describe(self) -> str:
        if self.source == "normaliser-input":
            return (
                f"cross-entropy on the input of the trailing {NORMALISERS[self.kind].__name__} "
                f"`{self.module}` (its logits): exact"
            )
        if self.source == "log-of-output":
            return "NLL on log(output clamped to the smallest float): the softmax is not a module, so its input is out of reach"
        return "NLL on the output (log-probabilities)" if self.kind == "log-probs" else "cross-entropy on the output"


LOGITS = LossAdapter()


@dataclass(frozen=True)
class OutputKind:
    """The kind tuning assumes, how it was decided, and the loss it leads to."""

    kind: str
    decided_by: str  # 'detected' | 'flag'
    probe: OutputProbe
    adapter: LossAdapter
    warning: str | None = None

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "decided_by": self.decided_by,
            "detected": self.probe.detected,
            "reason": self.probe.reason(),
            "evidence": asdict(self.probe),
            "loss": self.adapter.describe(),
            "loss_source": self.adapter.source,
            "loss_module": self.adapter.module,
            "warning": self.warning,
        }


def parse_output_kind(text: str | None) -> str:
    """The --output-kind value, checked: a wrong kind must stop the run, not fall back to a guess."""
    value = "auto" if text is None else str(text).strip().lower()
    if value not in CHOICES:
        raise ConfigError(
            f"--output-kind {text!r} is not a kind of model output",
            hint=f"choose one of: {', '.join(CHOICES)} (auto detects it from a probe batch)",
        )
    return value


def classify_rows(output: torch.Tensor) -> OutputProbe:
    """Decide logits / probs / log-probs from a (batch, classes) output, in float64."""
    if output.ndim != 2 or output.shape[0] == 0 or output.shape[1] < 2 or not output.is_floating_point():
        raise InputError(
            f"the model returned a {tuple(output.shape)} {output.dtype} tensor, not (batch, classes) scores"
        )
    rows = output.detach().double()
    sum_error = float((rows.sum(1) - 1).abs().max())
    lse_error = float(torch.logsumexp(rows, 1).abs().max())
    low, high = float(rows.min()), float(rows.max())
    finite = bool(torch.isfinite(rows).all())
    detected = "logits"
    if finite and low >= 0 and sum_error <= TOLERANCE:
        detected = "probs"
    elif finite and high <= 0 and lse_error <= TOLERANCE:
        detected = "log-probs"
    return OutputProbe(
        images=rows.shape[0],
        detected=detected,
        min_value=low,
        max_value=high,
        max_sum_error=sum_error,
        max_logsumexp_error=lse_error,
    )


@torch.no_grad()
def probe_outputs(model: nn.Module, batch: torch.Tensor) -> OutputProbe:
    """Run one normalised batch in eval mode; classify the output and find a trailing normaliser module.

    A forward hook records each nn.Softmax / nn.LogSoftmax call; the one whose output tensor *is* the
    model's output is trailing (identity, not equality: a softmax in the middle is not the end).
    """
    calls: list[tuple[str, nn.Module, torch.Tensor]] = []
    hooks = [
        (m, lambda mod, _i, out, n=n: calls.append((n, mod, out)))
        for n, m in model.named_modules()
        if isinstance(m, tuple(NORMALISERS.values()))
    ]
    output = probe_forward(model, batch, hooks)
    if not isinstance(output, torch.Tensor):
        raise InputError(f"the model returned a {type(output).__name__}, not a tensor of class scores")
    probe = classify_rows(output)
    for name, module, out in reversed(calls):
        if out is output and module.dim in (1, -1, None):  # None: the implicit dim of a 2-D input is 1
            return replace(probe, trailing_module=name, trailing_type=type(module).__name__)
    return probe


def choose_adapter(kind: str, probe: OutputProbe) -> LossAdapter:
    """The loss for `kind`: the normaliser's input when a matching trailing module produced the output."""
    if kind == "logits":
        return LOGITS
    if probe.trailing_type == NORMALISERS[kind].__name__:
        return LossAdapter(kind, "normaliser-input", probe.trailing_module)
    return LossAdapter(kind, "output" if kind == "log-probs" else "log-of-output")


def resolve_output_kind(flag: str, probe: OutputProbe) -> OutputKind:
    """`--output-kind` over detection; warn when they disagree."""
    kind = probe.detected if flag == "auto" else flag
    return OutputKind(
        kind=kind,
        decided_by="detected" if flag == "auto" else "flag",
        probe=probe,
        adapter=choose_adapter(kind, probe),
        warning=mismatch_warning(kind, probe),
    )


def mismatch_warning(kind: str, probe: OutputProbe) -> str | None:
    if kind == probe.detected:
        return None
    text = f"--output-kind {kind} was given, but the model's outputs look like {probe.detected}: {probe.reason()}."
    if kind == "logits" and probe.detected == "probs":
        text += (
            " Cross-entropy on probabilities has almost no gradient: FST will likely wreck clean accuracy and "
            "FT leave the backdoor in place. Drop --output-kind (auto) unless you are sure."
        )
    return text


@contextlib.contextmanager
def attach_loss(model: nn.Module, adapter: LossAdapter, label_smoothing: float = 0.0) -> Iterator[LossFn]:
    """A function (output, targets) -> (loss, scores) for the length of a tuning run.

    `scores` are what accuracy is counted on: the logits when they are reachable. For a trailing
    normaliser, a forward hook keeps its input; the loss then never touches the softmax, so the
    gradients are the ones the same model without it would get.
    """
    if adapter.source != "normaliser-input":
        yield _output_loss(adapter, label_smoothing)
        return
    captured: dict[str, torch.Tensor] = {}
    module = model.get_submodule(adapter.module)
    handle = module.register_forward_hook(lambda _m, inputs, out: captured.update(logits=inputs[0], output=out))

    def loss(output: torch.Tensor, targets: torch.Tensor):
        if captured.get("output") is not output:
            raise InputError(
                f"in training mode the model's output no longer comes from `{adapter.module}`",
                hint="pass --output-kind to choose the loss yourself",
            )
        logits = captured.pop("logits")
        captured.clear()
        return F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing), logits

    try:
        yield loss
    finally:
        handle.remove()


def _output_loss(adapter: LossAdapter, label_smoothing: float = 0.0) -> LossFn:
    if adapter.kind == "logits":
        return lambda output, targets: (
            F.cross_entropy(output.float(), targets, label_smoothing=label_smoothing),
            output,
        )
    if adapter.kind == "log-probs":
        return lambda output, targets: (smoothed_nll(output.float(), targets, label_smoothing), output)
    tiny = torch.finfo(torch.float32).tiny  # log(0) would be -inf; the clamp keeps the loss finite
    return lambda output, targets: (
        smoothed_nll(output.float().clamp_min(tiny).log(), targets, label_smoothing),
        output,
    )


def smoothed_nll(log_probs: torch.Tensor, targets: torch.Tensor, smoothing: float) -> torch.Tensor:
    """NLL with label smoothing, the same target distribution F.cross_entropy uses for logits."""
    nll = F.nll_loss(log_probs, targets)
    if smoothing == 0:
        return nll
    return (1 - smoothing) * nll - smoothing * log_probs.mean(1).mean()


def sample_losses(
    scores: torch.Tensor, targets: torch.Tensor, adapter: LossAdapter, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Per-image tuning loss: the loss attach_loss forms (its mean), without the mean.

    `scores` are what attach_loss hands back: the logits for a logits model or a trailing normaliser's
    input, else the model's output (log-probabilities, or probabilities taken to their clamped log)."""
    if adapter.kind == "logits" or adapter.source == "normaliser-input":
        return F.cross_entropy(scores.float(), targets, label_smoothing=label_smoothing, reduction="none")
    log_probs = scores.float()
    if adapter.kind == "probs":
        log_probs = log_probs.clamp_min(torch.finfo(torch.float32).tiny).log()
    nll = -log_probs.gather(1, targets[:, None]).squeeze(1)
    return nll if label_smoothing == 0 else (1 - label_smoothing) * nll - label_smoothing * log_probs.mean(1)
