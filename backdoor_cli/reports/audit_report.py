"""The audit's summary, worst first: a rich table for the terminal, Markdown for CI pages, JSON.

The table holds only what the checkpoint and the settings decide (no timings, no memory), so the
same checkpoints give the same table whether one process measured them or several shards did and
`bdclean merge` joined them.
"""

from __future__ import annotations

import json
import sys

from .audit_log import AuditRow, audit_exit_code, sort_rows
from .report import display_names  # the names compare shows: paths relative to their common folder

COLUMNS = ["checkpoint", "arch", "C-Acc", "ASR", "RA", "gates", "exit", "note"]
ERROR_WIDTH = 90


def _rate(metrics: dict | None, key: str, with_interval: bool) -> str:
    rate = (metrics or {}).get(key)
    if not rate:
        return "-"
    low, high = rate["ci95"]
    text = f"{rate['value']:.2%}"
    return f"{text} [{low:.2%}, {high:.2%}]" if with_interval else text


def _gates(row: AuditRow) -> str:
    if not row.gates:
        return "-"
    return (
        "passed"
        if all(g["passed"] for g in row.gates)
        else "FAILED " + ",".join(g["gate"] for g in row.gates if not g["passed"])
    )


def _note(row: AuditRow, name: str) -> str:
    if row.error:  # messages name the file by its full path; the first column already says which
        return _short(row.error.replace(row.path, name))
    if row.purified:
        p = row.purified
        if p.get("error"):
            return _short(f"purify failed: {p['error']}")
        return f"purified ({p['method']}): ASR {_rate(p.get('after'), 'asr', False)} -> {p['out']}"
    return ""


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= ERROR_WIDTH else text[: ERROR_WIDTH - 3] + "..."


def table_cells(rows: list[AuditRow]) -> list[list[str]]:
    """One list of cells per row, worst first: the content of every rendering."""
    rows = sort_rows(rows)
    names = display_names([r.path for r in rows])
    return [
        [
            name,
            row.architecture or "-",
            _rate(row.metrics, "clean_acc", True),
            _rate(row.metrics, "asr", True),
            _rate(row.metrics, "ra", True),
            _gates(row),
            str(row.exit_code),
            _note(row, name),
        ]
        for name, row in zip(names, rows)
    ]


def _summary(rows: list[AuditRow]) -> str:
    measured = sum(r.metrics is not None for r in rows)
    failed = sum(r.exit_code == 1 for r in rows)
    return (
        f"{len(rows)} checkpoint(s): {measured} measured, {failed} failed a gate, {len(rows) - measured} "
        f"not measured; exit code {audit_exit_code(rows)}"
    )


def render_audit(rows: list[AuditRow], console) -> None:
    from rich.table import Table

    table = Table(title="audit (worst first)", title_justify="left")
    for column in COLUMNS:
        table.add_column(
            column, justify="right" if column in ("C-Acc", "ASR", "RA", "exit") else "left", overflow="fold"
        )
    for cells in table_cells(rows):
        table.add_row(*cells)
    console.print(table)
    console.print(_summary(rows), highlight=False)


def audit_markdown(rows: list[AuditRow]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|") or " "

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(c) for c in cells) + " |" for cells in table_cells(rows)]
    return "\n".join(lines) + "\n\n" + _summary(rows) + "\n"


def audit_json(rows: list[AuditRow], extra: dict | None = None) -> str:
    from .report import SCHEMA_VERSION

    body = {
        "schema": SCHEMA_VERSION,
        "kind": "audit",
        "rows": [r.to_dict() for r in sort_rows(rows)],
        "exit_code": audit_exit_code(rows),
        **(extra or {}),
    }
    return json.dumps(body, indent=2, default=str)


def emit_audit(rows: list[AuditRow], json_output: bool, markdown: bool, console_factory, extra: dict | None = None):
    """Write the summary to stdout in the requested form (shared by `evaluate DIR` and `merge`)."""
    if json_output:
        sys.stdout.write(audit_json(rows, extra) + "\n")
    elif markdown:
        sys.stdout.write(audit_markdown(rows))
    else:
        render_audit(rows, console_factory())
