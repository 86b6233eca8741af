"""The audit's record: one JSON line per checkpoint (docs/at-scale.md), written as each one finishes.

The JSONL file is the audit's memory. A rerun with the same file skips checkpoints whose sha256 and
settings it already holds, and `bdclean merge` joins the files of several shards into one table;
both read it back through `read_rows`. Lines are flushed and fsynced one by one, so a killed job
leaves complete lines plus at most one torn last line, which reading skips.

Exit-code rule for many checkpoints (`audit_exit_code`): the largest of the rows' codes, and every
row's code is the one `bdclean evaluate` would give that checkpoint alone:
0 all measured and every gate passed, 1 some gate failed, 2 some file unreadable or otherwise bad
input, 3 some pickle refused as unsafe, 4 an internal error (a bug) on some checkpoint.
So a refused pickle is never hidden behind a gate failure, nor a corrupt file behind a pass.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..errors import InputError

ROW_SCHEMA = "bdclean.audit-row/1"
EXIT_OK, EXIT_GATE, EXIT_INPUT, EXIT_UNSAFE, EXIT_INTERNAL = 0, 1, 2, 3, 4
# Rows a rerun keeps: an internal error may be a transient fault (out of memory), so it is retried.
FINAL_CODES = (EXIT_OK, EXIT_GATE, EXIT_INPUT, EXIT_UNSAFE)


@dataclass
class AuditRow:
    """One checkpoint's outcome: measured (metrics + gates) or not (error + the code it would exit with)."""

    path: str
    sha256: str | None  # of the file's bytes; a model directory: of its files' names and hashes
    settings: str  # hash of everything else the result depends on (audit.audit_settings)
    exit_code: int
    architecture: str | None = None
    format: str | None = None
    num_classes: int | None = None
    trigger: dict | None = None
    metrics: dict | None = None  # EvalResult.to_dict(): k, n, value and ci95 per rate
    gates: list[dict] = field(default_factory=list)
    passed: bool | None = None
    error: str | None = None
    seconds: float | None = None
    rss_mb: float | None = None  # resident memory after the model was freed
    cached: bool = False  # the metrics came from the evaluation cache
    purified: dict | None = None  # --purify: the output folder and its outcome
    bdclean: str | None = None
    schema: str = ROW_SCHEMA

    @property
    def key(self) -> tuple[str | None, str]:
        return self.sha256, self.settings

    @property
    def asr(self) -> float | None:
        rate = (self.metrics or {}).get("asr")
        return rate["value"] if rate else None

    @property
    def worst_code(self) -> int:
        """This row's share of the exit code: its own, or its purification's when that went worse."""
        return max(self.exit_code, (self.purified or {}).get("exit_code", 0))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> AuditRow:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


class AuditLog:
    """Appends rows to a JSONL file, one durable line each."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.exists() and self.path.is_dir():
            raise InputError(f"--jsonl {self.path} is a directory")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.touch()  # a shard with no checkpoints still leaves its (empty) file for merge
        self._torn = _ends_torn(self.path)

    def write(self, row: AuditRow) -> None:
        line = json.dumps(row.to_dict(), sort_keys=False, default=str) + "\n"
        with open(self.path, "a", encoding="utf-8") as handle:
            if self._torn:  # a killed run's half line: start ours on a line of its own
                handle.write("\n")
                self._torn = False
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())


def _ends_torn(path: Path) -> bool:
    if not path.is_file() or path.stat().st_size == 0:
        return False
    with open(path, "rb") as handle:
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) != b"\n"


def read_rows(path: str | Path, strict: bool = False) -> list[AuditRow]:
    """The rows of a JSONL file. An unparsable line is skipped (a killed job's torn line) unless
    `strict`, where only the very last line may be torn: `merge` must not drop a shard's rows silently."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"JSONL file not found: {path}")
    lines = path.read_text("utf-8", errors="replace").splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
            if data.get("schema") != ROW_SCHEMA:
                raise ValueError("not an audit row")
            rows.append(AuditRow.from_dict(data))
        except (ValueError, TypeError, AttributeError):
            if strict and number != len(lines):
                raise InputError(
                    f"{path}:{number} is not a bdclean audit row",
                    hint="merge reads the --jsonl files written by `bdclean evaluate DIR`",
                ) from None
    return rows


def completed(rows: list[AuditRow]) -> dict[tuple, AuditRow]:
    """(sha256, settings) -> the latest final row for it: what a rerun does not measure again."""
    return {row.key: row for row in rows if row.sha256 and row.exit_code in FINAL_CODES}


def merge_rows(groups: list[list[AuditRow]]) -> list[AuditRow]:
    """One row per (path, sha256, settings), the latest written winning, in sorted order."""
    latest: dict[tuple, AuditRow] = {}
    for rows in groups:
        for row in rows:
            latest[(row.path, row.sha256, row.settings)] = row
    return sort_rows(list(latest.values()))


def sort_rows(rows: list[AuditRow]) -> list[AuditRow]:
    """Worst first: checkpoints that could not be measured (refused, unreadable) lead, as they need a
    person; then by ASR, highest first; then those without an ASR; ties by path, so the order is
    the same in every process that sorts the same rows."""

    def rank(row: AuditRow):
        if row.metrics is None:
            return (0, -row.exit_code, 0.0, row.path)
        if row.asr is None:
            return (2, 0, 0.0, row.path)
        return (1, 0, -row.asr, row.path)

    return sorted(rows, key=rank)


def audit_exit_code(rows: list[AuditRow]) -> int:
    """The largest of the rows' codes (the rule in this module's docstring)."""
    return max((row.worst_code for row in rows), default=EXIT_OK)
