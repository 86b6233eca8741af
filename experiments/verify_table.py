"""Tabulate purification verified with a scan's reconstructed trigger against the true trigger (docs/scan.md).

    .venv/bin/python experiments/verify_table.py runs/purify/NAME-METHOD ...

Each NAME-METHOD.json is `bdclean purify --trigger runs/scan/NAME/classN-trigger.yaml --json` (ASR before
and after with the reconstructed trigger); NAME-METHOD-true.json is `bdclean compare SUBJECT PURIFIED
--trigger TRUE --json` (the same two models with the true trigger, on the same test images).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def pct(rate: dict | None) -> str:
    return "-" if rate is None else f"{rate['value']:.1%}"


def main(stems: list[str]) -> None:
    print(
        "| subject, method | C-Acc before -> after | ASR, reconstructed trigger: before -> after | "
        "ASR, true trigger: before -> after | purify time |"
    )
    print("|---|---|---|---|---|")
    for stem in stems:
        purify = json.loads(Path(f"{stem}.json").read_text())
        true = json.loads(Path(f"{stem}-true.json").read_text())
        before, after = (row["metrics"] for row in true["rows"])
        print(
            f"| {Path(stem).name} | {pct(purify['before']['clean_acc'])} -> {pct(purify['after']['clean_acc'])} | "
            f"{pct(purify['before']['asr'])} -> {pct(purify['after']['asr'])} | "
            f"{pct(before['asr'])} -> {pct(after['asr'])} | {sum(purify['timings'].values()):.0f} s |"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
