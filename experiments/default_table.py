"""Tabulate experiments/default_grid.sh's runs as Markdown: per subject and method, clean accuracy and
ASR before and after (with the ASR without the trigger after, where recorded), the scan's flagged classes and proxy ASR (with the share its densest window keeps,
where measured), the removal verdict and the time.
    python experiments/default_table.py runs/grid"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path


def row(path: Path, walls: dict) -> str:
    report = json.loads(path.read_text())
    before, after = report["before"], report["after"]
    asr = f"{before['asr']['value']:.2%} → {after['asr']['value']:.2%}" if before.get("asr") else "-"
    if after.get("asr_no_trigger"):  # what the purified model sends to the target untriggered (since 3fdd44f)
        asr += f" ({after['asr_no_trigger']['value']:.2%} untriggered)"
    scan = report.get("scan")
    if scan:
        unlearnt = ", ".join(map(str, scan["unlearnt"])) or "nothing"
        flagged = ", ".join(map(str, scan["flagged"])) or f"none (unlearnt: {unlearnt})"
    else:
        flagged = "-"
    proxy = "-"
    if scan:
        proxy = "; ".join(
            f"{c}: {p['before']['value']:.1%} → {p['after']['value']:.1%}"
            # the share of it the reconstruction's densest window keeps (local triggers only verify), when measured
            + (f" (local {p['local_share']:.2f})" if "local_share" in p else "")
            for c, p in scan["proxy_asr"].items()
        )
    reference = "-"
    if scan and scan.get("reference"):
        ref = scan["reference"]
        natural = set(ref.get("natural", []))
        reference = "; ".join(
            f"{c}: {r['value']:.1%} ({'shortcut' if int(c) in natural else 'planted'})" for c, r in ref["rates"].items()
        ) + ("" if ref.get("usable", True) else " (reference too weak: unused)")
    cost = (before["clean_acc"]["value"] - after["clean_acc"]["value"]) * 100
    removal = report["removal"]
    # the scan's own verdict (what the default concluded without the trigger), where a trigger was known too
    # (runs before it was recorded show "-"; without a trigger the verdict is the scan's alone)
    alone = removal["evidence"].get("scan", {}).get("verdict", "-") if report.get("trigger") else removal["verdict"]
    retune = report.get("retune_check")
    again = "-"
    if retune:
        ref = retune.get("reference_asr_after_retuning")
        again = f"{retune['asr_after_retuning']['value']:.1%}" + (f" (clean {ref['value']:.1%})" if ref else "")
    return (
        f"| {path.stem} | {before['clean_acc']['value']:.2%} → {after['clean_acc']['value']:.2%} | {cost:.2f} | "
        f"{asr} | {flagged} | {reference} | {proxy} | {removal['verdict']} | {alone} | {again} | "
        f"{walls.get(path.stem, '-')} |"
    )


def main(folder: str) -> None:
    root = Path(folder)
    walls = {}
    summary = root / "summary.txt"
    if summary.exists():
        for line in summary.read_text().splitlines():
            m = re.match(r"(\S+) (\S+) rc=\d+ wall=([\d.]+)s", line)
            if m:
                walls[f"{m[1]}-{m[2]}"] = f"{float(m[3]):.0f} s"
    print(
        "| run | C-Acc | cost (points) | ASR | flagged | on the clean reference | proxy ASR | verdict | scan's verdict | "
        "ASR after retuning | wall |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for path in sorted(root.glob("*.json")):
        if path.stat().st_size:  # a run still going has an empty file
            print(row(path, walls))


if __name__ == "__main__":
    main(sys.argv[1])
