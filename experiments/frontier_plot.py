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
    ap.add_argument(
        "--base",
        nargs="*",
        default=[],
        help="STEM=ACC: the subject's C-Acc on the line's images, for lines measured without t = 0",
    )
    ap.add_argument("--only", nargs="*", default=None, help="draw only lines whose purified path contains one of these")
    ap.add_argument("--xmax", type=float, default=12.0)
    ap.add_argument("--xmin", type=float, default=-0.5, help="below 0 when a method gained accuracy")
    ap.add_argument(
        "--xlabel",
        default="clean-accuracy cost (points; lines: 3,000-4,000 evaluation images, stars: 9,000)",
        help="the x axis's label (say how many evaluation images the points rest on)",
    )
    ap.add_argument("--title", default="Cost against ASR (CIFAR-10 ResNets, trigger unknown to every decision)")
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
        bases = dict(item.split("=") for item in args.base)
        for purified, rows in lines.items():
            if args.only is not None and not any(key in purified for key in args.only):
                continue
            rows.sort(key=lambda r: r["t"])
            stem = Path(rows[0]["subject"]).stem
            base = rows[0]["c_acc"] if rows[0]["t"] == 0 else float(bases[stem])  # t = 0 is the subject itself
            source = "training-split" if "robust" in purified else "fresh"  # runs/robust: the earlier protocol
            label = f"{stem}: line to {Path(purified).parent.name} (tuned on {source} images)"
            ax.plot([(base - r["c_acc"]) * 100 for r in rows], [r["asr"] * 100 for r in rows], marker=".", label=label)
            for r in rows:
                if r["t"] in (0.5, 0.8):
                    ax.annotate(
                        f"t={r['t']:g}",
                        ((base - r["c_acc"]) * 100, r["asr"] * 100),
                        fontsize=7,
                        textcoords="offset points",
                        xytext=(3, 3),
                    )
    # the default is "recommended" in its report; which default it was is in the method's name
    markers = {
        "recommended": ("*", "previous default (fst-kd + path selection)"),
        "default": ("*", "default: scan -> unlearn -> verify"),
        "fst": ("x", "fst (paper)"),
    }
    seen, off_chart = set(), 0
    for file in args.grid:
        text = Path(file).read_text()
        if not text.strip():
            continue  # a run still in progress
        report = json.loads(text)
        kind = report["method"]["name"]
        if report["method"].get("recipe", {}).get("recommended"):
            kind = "default" if kind == "unlearn" else "recommended"
        marker, label = markers.get(kind, ("o", kind))
        cost = (report["before"]["clean_acc"]["value"] - report["after"]["clean_acc"]["value"]) * 100
        if not report["after"].get("asr") or (report["before"]["asr"]["value"] < 0.5):
            continue  # a clean model: no backdoor to plot
        asr = report["after"]["asr"]["value"] * 100
        if cost > args.xmax:
            ax.text(
                0.98,
                0.30 - 0.05 * off_chart,
                f"off the chart: {label} on {Path(report['checkpoint']['path']).stem}: {cost:.0f} points, "
                f"ASR {asr:.1f}%",
                transform=ax.transAxes,
                ha="right",
                fontsize=6,
                color="grey",
            )
            off_chart += 1
            continue
        ax.scatter(
            [cost],
            [asr],
            marker=marker,
            s=80,
            color="black" if kind in ("recommended", "default") else "grey",
            label=None if kind in seen else label,
            zorder=3,
        )
        seen.add(kind)
        ax.annotate(
            Path(report["checkpoint"]["path"]).stem, (cost, asr), fontsize=6, textcoords="offset points", xytext=(4, -8)
        )
    ax.axvspan(0, 3, ymax=1, color="green", alpha=0.06)
    ax.axhline(5, color="green", lw=0.8, ls="--")
    ax.axvline(3, color="green", lw=0.8, ls="--", label="goal: ASR <= 5% at <= 3 points")
    ax.set_xlabel(args.xlabel)
    ax.set_ylabel("ASR (%)")
    ax.set_yscale("symlog", linthresh=1)
    ax.set_xlim(args.xmin, args.xmax)
    ax.set_ylim(0, 100)
    ax.set_title(args.title)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
