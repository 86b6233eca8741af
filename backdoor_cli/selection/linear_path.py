"""The linear-path diagnostic: C-Acc and ASR of the models on the straight line between two checkpoints.

Min et al. (NeurIPS 2024) explain superficial safety by the loss landscape: a purified model that
still sits in the backdoored model's basin keeps a low-ASR surface over a backdoor that a little
retuning revives, and along the segment from the backdoored weights to it the ASR falls only near
the end. A model driven out of that basin (PAM, or one trained clean) shows a barrier instead. The
table and plot let a user see which case a purification is.

Every floating tensor of the state dict is interpolated, BatchNorm running statistics included
(integer counters such as num_batches_tracked come from the first model); the two checkpoints must
share an architecture and their tensor names and shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError, InputError
from ..evaluation.measure import EvalResult, evaluate_model


def interpolate_states(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], t: float) -> dict[str, torch.Tensor]:
    """(1 - t)·a + t·b for floating tensors; other tensors from `a`."""
    if a.keys() != b.keys():
        missing = sorted(set(a) ^ set(b))[:3]
        raise InputError(
            "the two checkpoints do not have the same tensors, so there is no straight line between them",
            hint=f"they differ in e.g. {', '.join(missing)}; --path needs two models of one architecture",
        )
    out = {}
    for name, left in a.items():
        right = b[name]
        if left.shape != right.shape:
            raise InputError(
                f"tensor {name} is {tuple(left.shape)} in one checkpoint and {tuple(right.shape)} in the other",
                hint="--path needs two models of one architecture",
            )
        out[name] = torch.lerp(left.float(), right.float(), t).to(left.dtype) if left.is_floating_point() else left
    return out


def path_points(count: int) -> list[float]:
    if not 2 <= count <= 101:
        raise ConfigError(f"--path must be between 2 and 101 points, got {count}")
    return [i / (count - 1) for i in range(count)]


@dataclass
class PathPoint:
    t: float
    result: EvalResult

    def to_dict(self) -> dict:
        return {"t": round(self.t, 6), **self.result.to_dict()}


def walk_path(
    model: torch.nn.Module,
    start: dict[str, torch.Tensor],
    end: dict[str, torch.Tensor],
    count: int,
    sets,
    mean,
    std,
    device,
    batch_size: int,
    on_point=None,
    precision: str | None = None,
) -> list[PathPoint]:
    """Evaluate `model` loaded with each interpolated state (t = 0 is `start`, t = 1 is `end`);
    `on_point(done)` after each, with the number of points done so far. `precision`: the evaluation's
    (None: exact fp32)."""
    points = []
    for t in path_points(count):
        model.load_state_dict(interpolate_states(start, end, t))
        result = evaluate_model(model.eval(), sets, mean, std, device, batch_size, precision=precision)
        points.append(PathPoint(t, result))
        if on_point is not None:
            on_point(len(points))
    return points


def path_markdown(points: list[PathPoint], start: str, end: str) -> str:
    lines = [f"Linear path from `{start}` (t = 0) to `{end}` (t = 1)", "", "| t | C-Acc | ASR |", "|---|---|---|"]
    for p in points:
        r = p.result
        lines.append(f"| {p.t:.2f} | {r.clean_acc.value:.2%} | {'-' if r.asr is None else f'{r.asr.value:.2%}'} |")
    return "\n".join(lines) + "\n"


def path_plot_png(points: list[PathPoint], start: str, end: str) -> bytes:
    """C-Acc and ASR along the path, with 95% interval bands."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ts = [p.t for p in points]
    for key, label, color in (("clean_acc", "C-Acc", "#4f81bd"), ("asr", "ASR", "#c0504d")):
        rates = [getattr(p.result, key) for p in points]
        if any(r is None for r in rates):
            continue
        ax.plot(ts, [r.value * 100 for r in rates], marker="o", color=color, label=label)
        ax.fill_between(ts, [r.low * 100 for r in rates], [r.high * 100 for r in rates], color=color, alpha=0.2)
    ax.set_xlabel(f"t  (0: {start}, 1: {end})")
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


@dataclass
class PathReport:
    start: dict  # Subject.describe() of each end
    end: dict
    points: list[PathPoint]
    data: dict
    trigger: dict | None
    environment: dict
    options: dict
    outputs: dict

    def to_dict(self) -> dict:
        from ..reports.report import SCHEMA_VERSION

        return {
            "schema": SCHEMA_VERSION,
            "kind": "path",
            "start": self.start,
            "end": self.end,
            "data": self.data,
            "trigger": self.trigger,
            "points": [p.to_dict() for p in self.points],
            "outputs": self.outputs,
            "environment": self.environment,
            "options": self.options,
        }


def render_path(report: PathReport, console) -> None:
    from ..reports.report import interval, metric_table, pct

    table = metric_table(
        f"linear path: {report.start['path']} (t=0) -> {report.end['path']} (t=1)",
        ["t", "C-Acc", "95% CI", "ASR", "95% CI"],
    )
    for p in report.points:
        r = p.result
        table.add_row(
            f"{p.t:.2f}", pct(r.clean_acc), interval(r.clean_acc), pct(r.asr), interval(r.asr) if r.asr else "-"
        )
    console.print(table)
    if report.outputs.get("plot"):
        console.print(f"plot: {report.outputs['plot']}")
