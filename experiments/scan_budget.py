"""How the scan's verdict depends on its step budget, from one scan per subject.

    python experiments/scan_budget.py OUT.json [name=value ...] -- <bdclean scan arguments>

name=value pairs override InversionParams fields inside the search (e.g. patience=5 batch_size=16), to
compare search schedules on the same subject.

A scan stopped after s steps is the same search as a longer one up to step s (same seed, same draws, the
budget changes no earlier step), so one 120-step scan gives every shorter budget's masks: this script
records each class's smallest succeeding mask at every penalty check (every `patience` steps) by reading
the search's own state, then computes the anomaly indices a scan of that budget would have reported.
The search's state is read from its frame (an experiment's instrument, not an interface of the package).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time

from typer.testing import CliRunner

from backdoor_cli.cli import app
from backdoor_cli.scanning import inversion


def main() -> None:
    split = sys.argv.index("--")
    out, args = sys.argv[1], sys.argv[split + 1 :]
    overrides = {}
    for pair in sys.argv[2:split]:
        name, value = pair.split("=")
        kind = type(getattr(inversion.InversionParams(), name))
        overrides[name] = kind(value)
    checks: dict[int, list[float]] = {}
    original = inversion.invert_classes

    def spying(*a, **kw):
        on_step = a[9] if len(a) > 9 else kw.get("on_step")

        def spy(step: int) -> None:
            state = sys._getframe(1).f_locals
            params = state["params"]
            if step % params.patience == 0:
                sizes = []
                for k in range(len(state["targets"])):
                    best = state["best"][k]
                    sizes.append(best[0] if best is not None else float(state["mask_logit"][k].sigmoid().sum()))
                checks[step] = sizes
            if on_step is not None:
                on_step(step)

        a = (*a[:7], dataclasses.replace(a[7], **overrides), *a[8:])
        if len(a) > 9:
            a = (*a[:9], spy, *a[10:])
        else:
            kw["on_step"] = spy
        return original(*a, **kw)

    inversion.invert_classes = spying
    start = time.perf_counter()
    result = CliRunner().invoke(app, ["scan", *args, "--json"])
    wall = time.perf_counter() - start
    report = json.loads(result.stdout[result.stdout.index("{") :])
    budgets = {}
    last = max(checks)
    for step, sizes in sorted(checks.items()):
        # a class that stopped early keeps its last recorded size
        logs = [math.log(max(s, inversion.MIN_L1)) for s in sizes]
        index, median, mad = inversion.anomaly_indices(logs)
        budgets[step] = {
            "l1": [round(s, 2) for s in sizes],
            "anomaly": [round(v, 2) for v in index],
            "flagged": [c for c, v in enumerate(index) if v > inversion.ANOMALY_THRESHOLD],
        }
    json.dump(
        {
            "args": args,
            "overrides": overrides,
            "wall_s": round(wall, 1),
            "exit": result.exit_code,
            "last": last,
            "budgets": budgets,
            "scan": report.get("scan", report),
        },
        open(out, "w"),
        indent=1,
    )
    for step, b in budgets.items():
        top = max(range(len(b["anomaly"])), key=lambda c: b["anomaly"][c])
        print(f"{step:4d} flagged {b['flagged']} top class {top} index {b['anomaly'][top]:.2f} l1 {b['l1'][top]}")


if __name__ == "__main__":
    main()
