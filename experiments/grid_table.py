"""The issue-12 grid as a Markdown table, from the purify reports that experiments/recipe_grid.sh wrote.

.venv/bin/python experiments/grid_table.py runs/grid/*.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

GOAL_ASR, GOAL_COST = 0.05, 0.03


def row(report: dict) -> str:
    recipe = report["method"].get("recipe") or {}
    name = "recommended (" + report["method"]["name"] + ")" if recipe.get("recommended") else report["method"]["name"]
    before, after = report["before"], report["after"]
    cost = before["clean_acc"]["value"] - after["clean_acc"]["value"]
    asr_b = before["asr"]["value"] if before.get("asr") else None
    asr_a = after["asr"]["value"] if after.get("asr") else None
    path = ((report["clean_data"].get("holdout") or {}).get("path")) or {}
    held = ""
    if path:
        point = next(r for r in path["curve"] if r["t"] == path["chosen_t"])
        held = f"{path['chosen_t']:.2f} ({(path['input_acc'] - point['holdout_acc']) * 100:.1f})"
    planted = asr_b is not None and asr_b >= 0.5
    met = ("yes" if asr_a <= GOAL_ASR and cost <= GOAL_COST else "no") if planted else "(clean model)"
    pct = lambda v: "-" if v is None else f"{v:.2%}"  # noqa: E731
    return (
        f"| {Path(report['checkpoint']['path']).name} | {name} | {pct(before['clean_acc']['value'])} / {pct(asr_b)} | "
        f"{pct(after['clean_acc']['value'])} / {pct(asr_a)} | {cost * 100:.1f} | {held or '-'} | {met} |"
    )


def main(files: list[str]) -> None:
    print(
        "| subject | method | input C-Acc / ASR | after C-Acc / ASR | cost (points) | t kept (held-out cost) | goal met |"
    )
    print("|---|---|---|---|---|---|---|")
    for file in files:
        text = Path(file).read_text()
        if text.strip():
            print(row(json.loads(text)))


if __name__ == "__main__":
    main(sys.argv[1:])
