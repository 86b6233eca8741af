"""The frontier of issue 12: clean-accuracy cost against ASR, for the lines from a subject to its
purified copies (experiments/path_selection.py) and for the grid's purify runs
(experiments/recipe_grid.sh, their report JSON on stdout).

    .venv/bin/python experiments/frontier_plot.py --path runs/path-selection-h.jsonl \
        --grid runs/grid/*.json --out docs/img/frontier.png
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--path", nargs="*", default=[])
    ap.add_argument("--grid", nargs="*", default=[])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    for file in args.path:
        lines = defaultdict(list)
        for row in map(json.loads, Path(file).read_text().splitlines()):
            if not row.get("recalibrated"):  # the BatchNorm-recalibration rows are a separate (negative) result
                lines[row["purified"]].append(row)
        for purified, rows in lines.items():
            rows.sort(key=lambda r: r["t"])
            base = rows[0]["c_acc"]  # t = 0: the subject itself
            source = "training-split" if "robust" in purified else "fresh"  # runs/robust: the earlier protocol
            label = f"line to {Path(purified).parent.name} (tuned on {source} images)"
            ax.plot([(base - r["c_acc"]) * 100 for r in rows], [r["asr"] * 100 for r in rows], marker=".", label=label)
            for r in rows:
                if r["t"] in (0.5, 0.8, 1.0):
                    ax.annotate(f"t={r['t']:g}", ((base - r["c_acc"]) * 100, r["asr"] * 100), fontsize=7,
                                textcoords="offset points", xytext=(3, 3))
    markers = {"recommended": ("*", "recommended recipe"), "fst": ("x", "fst (paper)")}
    seen = set()
    for file in args.grid:
        report = json.loads(Path(file).read_text())
        kind = "recommended" if report["method"].get("recipe", {}).get("recommended") else report["method"]["name"]
        marker, label = markers.get(kind, ("o", kind))
        cost = (report["before"]["clean_acc"]["value"] - report["after"]["clean_acc"]["value"]) * 100
        asr = report["after"]["asr"]["value"] * 100
        ax.scatter([cost], [asr], marker=marker, s=80, color="black" if kind == "recommended" else "grey",
                   label=None if kind in seen else label, zorder=3)
        seen.add(kind)
        ax.annotate(Path(report["checkpoint"]["path"]).stem, (cost, asr), fontsize=6, textcoords="offset points",
                    xytext=(4, -8))
    ax.axvspan(0, 3, ymax=1, color="green", alpha=0.06)
    ax.axhline(5, color="green", lw=0.8, ls="--")
    ax.axvline(3, color="green", lw=0.8, ls="--", label="goal: ASR <= 5% at <= 3 points")
    ax.set_xlabel("clean-accuracy cost (points, 9,000 evaluation images)")
    ax.set_ylabel("ASR (%)")
    ax.set_yscale("symlog", linthresh=1)
    ax.set_title("Cost against ASR (CIFAR-10 ResNets, trigger unknown to every decision)")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
