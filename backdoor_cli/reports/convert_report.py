"""`bdclean convert`'s report: what was loaded and from where, the check it passed, what was written."""

from __future__ import annotations

from dataclasses import dataclass

from ..evaluation.gates import GateResult
from ..evaluation.measure import EvalResult
from .report import DEFINITIONS, SCHEMA_VERSION, counts, interval, metric_table, pct, render_gates


@dataclass
class ConvertReport:
    out: str
    sha256: str | None  # None when nothing was written (a failed --min-acc gate)
    subject: dict  # the input, as loaded (where each fact came from)
    data: dict
    result: EvalResult
    round_trip: dict
    gates: list[GateResult]
    timings: dict
    environment: dict
    options: dict

    @property
    def written(self) -> bool:
        return self.sha256 is not None

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA_VERSION,
            "kind": "convert",
            "out": self.out,
            "written": self.written,
            "sha256": self.sha256,
            "checkpoint": self.subject,
            "data": self.data,
            "metrics": self.result.to_dict(),
            "round_trip": self.round_trip,
            "gates": [g.to_dict() for g in self.gates],
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            "environment": self.environment,
            "options": self.options,
            "definitions": DEFINITIONS,
        }


def render_convert(report: ConvertReport, console) -> None:
    s = report.subject
    sources = s["resolved_from"]
    norm = s["normalization"]
    table = metric_table(f"{s['path']} ({s['format']}), as loaded", ["fact", "value", "from"])
    table.add_row("architecture", s["arch"], sources.get("arch", "-"))
    table.add_row("classes", str(s["num_classes"]), sources.get("num_classes", "-"))
    table.add_row("head", s["head"], sources.get("head", "-"))
    table.add_row("mean", ", ".join(f"{v:g}" for v in norm["mean"]), sources.get("mean", "-"))
    table.add_row("std", ", ".join(f"{v:g}" for v in norm["std"]), sources.get("std", "-"))
    acc = report.result.clean_acc
    table.add_row("C-Acc", f"{pct(acc)} {interval(acc)}", f"{counts(acc)} test images")
    console.print(table)
    render_gates(report.gates, console)
    if report.written:
        console.print(
            f"wrote [bold]{report.out}[/bold] (sha256 {report.sha256[:12]}): read back with no flags, it gave "
            "the same weights and logits; every command now loads it without --arch/--mean/--std"
        )
    else:
        console.print(f"[bold red]nothing written[/bold red] to {report.out}")
