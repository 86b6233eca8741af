"""Tabulate `bdclean scan --json` results (docs/scan.md): one Markdown row per scan report.

    .venv/bin/python experiments/scan_table.py runs/scan/NAME.json[=TRUE_TARGET] ...

TRUE_TARGET is the planted target class (omit it for a clean model). It is used here, for the table
only: the scan itself never sees a trigger.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backdoor_cli.scanning.inversion import ANOMALY_THRESHOLD, anomaly_indices  # noqa: E402


def row(path: str, truth: int | None) -> str:
    doc = json.loads(Path(path).read_text())
    classes = doc["classes"]
    # Both indices recomputed from the mask sizes, so reports written before the log-scale test
    # (which stored the raw index only) are read the same way: `flagged` follows today's rule.
    norms = [c["mask_l1"] for c in classes]
    log_index = anomaly_indices([math.log(max(n, 1e-3)) for n in norms])[0]
    raw_index = anomaly_indices(norms)[0]
    for c, a, r in zip(classes, log_index, raw_index):
        c["anomaly_index"], c["anomaly_index_raw_l1"] = a, r
    flagged = [c["class"] for c in classes if c["anomaly_index"] > ANOMALY_THRESHOLD]
    raw_flagged = [c["class"] for c in classes if c["anomaly_index_raw_l1"] > ANOMALY_THRESHOLD]
    smallest = min(classes, key=lambda c: c["mask_l1"])
    others = [c["mask_l1"] for c in classes if c["class"] != smallest["class"]]
    if truth is None:
        outcome = "no false positive" if not flagged else f"FALSE POSITIVE {flagged}"
    else:
        outcome = (
            "detected"
            if flagged == [truth]
            else f"detected + false positive {[c for c in flagged if c != truth]}"
            if truth in flagged
            else f"missed (flagged {flagged})"
            if flagged
            else "missed"
        )
    top = max(classes, key=lambda c: c["anomaly_index"])
    target_cell = (
        "-"
        if truth is None
        else (
            f"{classes[truth]['mask_l1']:.1f} / {classes[truth]['anomaly_index']:.2f} / "
            f"{classes[truth]['anomaly_index_raw_l1']:.2f}"
        )
    )
    params = doc["method"]["params"]
    return (
        f"| {Path(path).stem} | {'-' if truth is None else truth} | {flagged or '[]'} | {outcome} | {target_cell} | "
        f"class {smallest['class']}: {smallest['mask_l1']:.1f} (others >= {min(others):.1f}, median "
        f"{doc['median_mask_l1']:.1f}) | class {top['class']}: {top['anomaly_index']:.2f} | "
        f"{raw_flagged or '[]'} | {params['steps']}, {doc['data']['scan_images']} | {doc['timings']['scan']:.0f} s |"
    )


def main(args: list[str]) -> None:
    print(
        "| scan | true target | flagged | outcome | target: L1 / index (log) / index (raw L1, NC) | smallest mask "
        "(pixels) | highest index | raw-L1 rule would flag | steps, images | scan time |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for arg in args:
        path, _, truth = arg.partition("=")
        print(row(path, int(truth) if truth else None))


if __name__ == "__main__":
    main(sys.argv[1:])
