"""Reports: dataclasses -> JSON (versioned schema, docs/report-schema.md), Markdown, rich tables, plot.

The same facts everywhere: every rate as k/n with its 95% Wilson interval, the definitions of the
metrics, the seed, the versions and the device.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..evaluation.gates import GateResult
from ..evaluation.measure import EvalResult
from ..evaluation.paired import PairedChange, outcome_changes

SCHEMA_VERSION = "bdclean.report/1"
DEFINITIONS = {
    "clean_acc": "accuracy on the clean test set",
    "asr": "fraction of non-target-class test images classified as the target when the trigger is applied",
    "asr_no_trigger": (
        "fraction of the same non-target-class test images classified as the target WITHOUT the trigger: the part "
        "of the ASR the model's own errors give; the trigger's own effect is ASR minus this"
    ),
    "ra": "fraction of the same triggered images classified as their true class (robust accuracy)",
    "der": "defense effectiveness rating (BackdoorBench): (max(0, dASR) - max(0, dC-Acc) + 1) / 2",
    "ci95": "95% Wilson score interval",
}


# The rates every results table shows, in order: (label, EvalResult attribute).
RATE_ROWS = (("C-Acc", "clean_acc"), ("ASR", "asr"), ("ASR without trigger", "asr_no_trigger"), ("RA", "ra"))


def trigger_lift_line(result: EvalResult, target) -> str | None:
    """What the trigger itself does, beside the model's own rate into the target; None without both rates."""
    lift = result.trigger_lift
    if lift is None:
        return None
    where = f"class {target}" if target is not None else "the target"
    effect = (
        f"the trigger adds {lift * 100:.2f} points"
        if lift >= 0
        else f"the trigger lowers it by {-lift * 100:.2f} points"
    )
    return (
        f"without the trigger the model sends {result.asr_no_trigger.value:.2%} of the non-target images to {where}; "
        + effect
    )


def _lift_lines(before: EvalResult, after: EvalResult, trigger: dict | None) -> list[tuple[str, str]]:
    target = (trigger or {}).get("target")
    pairs = (("before", trigger_lift_line(before, target)), ("after", trigger_lift_line(after, target)))
    return [(when, line) for when, line in pairs if line is not None]


def pct(rate) -> str:
    return "-" if rate is None else f"{rate.value:.2%}"


def interval(rate) -> str:
    return "-" if rate is None else f"[{rate.low:.2%}, {rate.high:.2%}]"


def counts(rate) -> str:
    return "-" if rate is None else f"{rate.k}/{rate.n}"


def signed_points(delta: float | None) -> str:
    return "-" if delta is None else f"{delta * 100:+.2f} pp"


def change_interval(change: PairedChange | None) -> str:
    """A paired change's 95% interval in points ("-" without per-image outcomes)."""
    if change is None:
        return "-"
    low, high = change.interval
    return f"[{low * 100:+.2f}, {high * 100:+.2f}]"


def paired_words(name: str, change: PairedChange) -> str:
    """A paired change, its interval and what it is made of, e.g.
    "C-Acc -3.45 pp, 95% CI [-4.64, -2.29] (107 of 2000 images lost, 38 gained)"."""
    return (
        f"{name} {signed_points(change.value)}, 95% CI {change_interval(change)} "
        f"({change.lost} of {change.n} images lost, {change.gained} gained)"
    )


@dataclass
class EvaluateReport:
    subject: dict
    data: dict
    trigger: dict | None
    result: EvalResult
    gates: list[GateResult]
    timings: dict
    environment: dict
    options: dict
    retune: dict | None = None  # retune.RetuneResult.to_dict(), with --retune-check

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA_VERSION,
            "kind": "evaluate",
            "checkpoint": self.subject,
            "data": self.data,
            "trigger": self.trigger,
            "metrics": self.result.to_dict(),
            "retune_check": self.retune,
            "gates": [g.to_dict() for g in self.gates],
            "passed": all(g.passed for g in self.gates),
            "timings": _round(self.timings),
            "environment": self.environment,
            "options": self.options,
            "definitions": DEFINITIONS,
        }


@dataclass
class PurifyReport:
    subject: dict
    data: dict
    trigger: dict | None
    method: dict
    clean: dict
    before: EvalResult
    after: EvalResult
    der: float | None
    history: list[dict]
    gates: list[GateResult]
    timings: dict
    environment: dict
    options: dict
    outputs: dict = field(default_factory=dict)
    output_kind: dict | None = None  # models.output_kind.OutputKind.to_dict(): what the model returns, the loss
    retune: dict | None = None  # retune.RetuneResult.to_dict() of the purified model, with --retune-check
    removal: dict | None = None  # removal.RemovalVerdict.to_dict(): is there evidence the backdoor is gone?
    scan: dict | None = (
        None  # scan_guided.ScanEvidence.to_dict(): the scan a scan-guided method removed and checked with
    )

    @property
    def acc_delta(self) -> float:
        return self.after.clean_acc.value - self.before.clean_acc.value

    @property
    def asr_delta(self) -> float | None:
        return self.after.asr.value - self.before.asr.value if self.before.asr and self.after.asr else None

    @property
    def paired(self) -> dict[str, PairedChange]:
        """The changes of C-Acc and ASR image by image (the same images before and after), with their intervals;
        empty where an evaluation kept no per-image outcomes."""
        return outcome_changes(self.before.outcomes, self.after.outcomes) or {}

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA_VERSION,
            "kind": "purify",
            "checkpoint": self.subject,
            "data": self.data,
            "trigger": self.trigger,
            "method": self.method,
            "output_kind": self.output_kind,
            "clean_data": self.clean,
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
            "delta": {
                "clean_acc": self.acc_delta,
                "asr": self.asr_delta,
                "paired": {name: change.to_dict() for name, change in self.paired.items()} or None,
            },
            "der": self.der,
            "removal": self.removal,
            "scan": self.scan,
            "retune_check": self.retune,
            "history": self.history,
            "gates": [g.to_dict() for g in self.gates],
            "passed": all(g.passed for g in self.gates),
            "outputs": self.outputs,
            "timings": _round(self.timings),
            "environment": self.environment,
            "options": self.options,
            "definitions": DEFINITIONS,
        }


@dataclass
class CompareRow:
    path: str
    sha256: str
    arch: str
    method: str | None
    result: EvalResult
    acc_drop: float
    der: float | None
    drift: dict
    gates: list[GateResult]
    is_reference: bool
    retune: dict | None = None  # retune.RetuneResult.to_dict(), with --retune-check
    # the change from the reference image by image (the same images): {"clean_acc", "asr"}; empty for the reference
    paired: dict[str, PairedChange] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "sha256": self.sha256,
            "arch": self.arch,
            "method": self.method,
            "reference": self.is_reference,
            "metrics": self.result.to_dict(),
            "retune_check": self.retune,
            "acc_drop": self.acc_drop,
            "paired": {name: change.to_dict() for name, change in self.paired.items()} or None,
            "der": self.der,
            "drift": self.drift,
            "gates": [g.to_dict() for g in self.gates],
            "passed": all(g.passed for g in self.gates),
        }


@dataclass
class CompareReport:
    rows: list[CompareRow]
    reference: str
    data: dict
    trigger: dict | None
    environment: dict
    options: dict

    @property
    def passed(self) -> bool:
        return all(g.passed for row in self.rows for g in row.gates)

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA_VERSION,
            "kind": "compare",
            "reference": self.reference,
            "data": self.data,
            "trigger": self.trigger,
            "rows": [r.to_dict() for r in self.rows],
            "passed": self.passed,
            "environment": self.environment,
            "options": self.options,
            "definitions": DEFINITIONS,
        }


@dataclass
class TrainReport:
    out: str
    sha256: str
    arch: str
    data: str
    result: EvalResult
    history: list[dict]
    poisoned: int
    trigger: dict | None
    timings: dict
    environment: dict
    init: dict | None = None  # --init: {"path", "sha256", "metrics": EvalResult of the starting model}
    warnings: list[str] = field(default_factory=list)  # e.g. a run that did not learn (usecases.training)
    stamped_after_augment: bool = False  # --stamp-after-augment: the trigger stamped in each batch after crop+flip

    def to_dict(self) -> dict:
        init = None if self.init is None else {**self.init, "metrics": self.init["metrics"].to_dict()}
        return {
            "schema": SCHEMA_VERSION,
            "kind": "train",
            "out": self.out,
            "sha256": self.sha256,
            "arch": self.arch,
            "data": self.data,
            "poisoned_images": self.poisoned,
            "stamped_after_augment": self.stamped_after_augment,
            "trigger": self.trigger,
            "init": init,
            "metrics": self.result.to_dict(),
            "history": self.history,
            "warnings": self.warnings,
            "timings": _round(self.timings),
            "environment": self.environment,
            "definitions": DEFINITIONS,
        }


def _round(timings: dict) -> dict:
    return {k: round(v, 3) for k, v in timings.items()}


def to_json(report) -> str:
    return json.dumps(report.to_dict(), indent=2, sort_keys=False, default=str)


# ---------------------------------------------------------------- weight drift (compare)


def weight_drift(reference: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> dict:
    """Per-tensor L2 distance and cosine similarity for weights present in both with equal shapes."""
    layers = {}
    for key, ref in reference.items():
        cand = other.get(key)
        if cand is None or cand.shape != ref.shape or not ref.is_floating_point() or not key.endswith("weight"):
            continue
        a, b = ref.detach().double().flatten(), cand.detach().double().flatten()
        distance = float(torch.linalg.vector_norm(a - b))
        denom = float(torch.linalg.vector_norm(a) * torch.linalg.vector_norm(b))
        cosine = float(a @ b) / denom if denom > 0 else 1.0
        layers[key] = {
            "l2": distance,
            "relative_l2": distance / max(float(torch.linalg.vector_norm(a)), 1e-12),
            "cosine": cosine,
        }
    total = sum(v["l2"] ** 2 for v in layers.values()) ** 0.5
    most = max(layers, key=lambda k: layers[k]["relative_l2"]) if layers else None
    return {"total_l2": total, "most_changed": most, "layers": layers}


# ---------------------------------------------------------------- Markdown


def purify_markdown(report: PurifyReport) -> str:
    d = report.to_dict()
    subject, method = d["checkpoint"], d["method"]
    lines = [
        f"# bdclean purification report ({method['name']})",
        "",
        f"- Input: `{subject['path']}` (sha256 `{subject['sha256'][:16]}...`, {subject['arch']}, "
        f"{subject['num_classes']} classes, head `{subject['head']}`)",
        f"- Data: {d['data']['name']} ({d['data']['source']}), {d['data']['test_images']} test images",
        f"- Trigger: {_trigger_line(report.trigger)}",
        f"- Method: `{method['name']}` - {method['summary']}",
        *([f"- Recipe: {recipe_line(method['recipe'])}"] if method.get("recipe") else []),
        *([f"- **Note:** {method['recipe']['caveat']}"] if (method.get("recipe") or {}).get("caveat") else []),
        "- Hyper-parameters: " + ", ".join(f"{k}={v}" for k, v in method["params"].items()),
        # what the run did beyond its parameters (a stopped or rerun unlearning, an undone candidate): the
        # terminal said it; the report must too
        *[f"- Tuning: {note}" for note in method.get("notes") or []],
        f"- Model output: {output_kind_line(report.output_kind)}",
        *([f"- **Warning:** {report.output_kind['warning']}"] if (report.output_kind or {}).get("warning") else []),
        f"- Clean data: {report.clean['images']} images from {report.clean['source']}"
        + (
            f" (indices sha256 `{report.clean['indices_sha256'][:16]}...`)"
            if report.clean.get("indices_sha256")
            else ""
        ),
        *(
            [
                f"- Held out: {held['images']} of them (input model {held['input_acc']:.2%} on them)"
                + (f"; kept: {held['selection']}" if held.get("selection") else "")
            ]
            if (held := report.clean.get("holdout"))
            else []
        ),
        "",
        "## Results",
        "",
        "| metric | before | after | change | change, 95% CI (paired) |",
        "|---|---|---|---|---|",
    ]
    paired = report.paired
    for name, key in RATE_ROWS:
        b, a = getattr(report.before, key), getattr(report.after, key)
        if b is None and a is None:
            continue
        change = signed_points(a.value - b.value) if a is not None and b is not None else "-"
        lines.append(f"| {name} | {_rate_md(b)} | {_rate_md(a)} | {change} | {change_interval(paired.get(key))} |")
    if paired:
        lines += [
            "",
            "The same images were scored before and after, so a change is counted image by image (Newcombe's paired"
            " interval): "
            + "; ".join(paired_words(name, paired[key]) for name, key in RATE_ROWS if key in paired)
            + ".",
        ]
    lines += ["", f"DER: {report.der:.4f}" if report.der is not None else "DER: - (no trigger)", ""]
    if lifts := _lift_lines(report.before, report.after, report.trigger):
        lines += [f"- {when}: {line}." for when, line in lifts] + [""]
    if report.removal:
        lines += [
            "## Removal verdict",
            "",
            f"**{report.removal['verdict'].replace('_', ' ')}**: {report.removal['reason']}",
            "",
        ]
    lines += scan_markdown(report.scan)
    lines += path_markdown((report.clean.get("holdout") or {}).get("path"))
    lines += retune_markdown(report.retune)
    if report.gates:
        lines += ["## Gates", ""] + [f"- {g.describe()}" for g in report.gates] + [""]
    curve = {c["epoch"]: c["holdout_acc"] for c in (report.clean.get("holdout") or {}).get("curve", [])}
    lines += [
        "## Tuning",
        "",
        "| epoch | loss | train acc | held-out acc | lr | seconds |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {h['epoch']} | {h['loss']:.4f} | {h['train_acc']:.2%} | {_held_cell(curve, h['epoch'])} | "
        f"{h['lr']:.4g} | {h['seconds']:.2f} |"
        for h in report.history
    ]
    env = report.environment
    lines += [
        "",
        "## Reproducibility",
        "",
        f"- seed {report.method['params']['seed']}; bdclean {env['bdclean']}, torch {env['torch']}, "
        f"python {env['python']}; device {env['device_name']}",
        *([f"- {compute_line(env['compute'])}"] if env.get("compute") else []),
        "- timings: " + ", ".join(f"{k} {v:.2f}s" for k, v in report.timings.items()),
        "",
        "## Definitions",
        "",
    ] + [f"- **{k}**: {v}" for k, v in DEFINITIONS.items()]
    return "\n".join(lines) + "\n"


def recipe_line(recipe: dict) -> str:
    text = (
        "bdclean's default (scan, unlearn, verify)"
        if recipe.get("recommended")
        else f"--method {recipe['method']} as published"
    )
    if recipe.get("holdout_fraction"):
        text += f"; {recipe['holdout_fraction']:.0%} of the clean images held out"
    text += f"; selection: {recipe['select']}"
    if recipe.get("budget") is not None:
        text += f" within {recipe['budget']:.1%} of held-out accuracy"
    return text


def path_markdown(path: dict | None) -> list[str]:
    """The path selection: held-out accuracy at each t of the line from the input (0) to the tuned model (1)."""
    if not path:
        return []
    lines = ["## Path selection (held-out images only)", "", f"{path['reason']}.", ""]
    if path.get("warning"):
        lines += [f"**Warning:** {path['warning']}.", ""]
    lines += ["| t | held-out acc | cost vs input | within budget |", "|---|---|---|---|"]
    for row in path["curve"]:
        mark = " (kept)" if row["t"] == path["chosen_t"] else ""
        lines.append(
            f"| {row['t']:.2f}{mark} | {row['holdout_acc']:.2%} | "
            f"{signed_points(row['holdout_acc'] - path['input_acc'])} | {'yes' if row['within_budget'] else 'no'} |"
        )
    return lines + [""]


def scan_markdown(scan: dict | None) -> list[str]:
    """The scan a scan-guided purify removed and checked with: per class its mask and anomaly index, the
    unlearnt classes' proxy ASR before and after, and the re-scan of each flagged class."""
    if not scan:
        return []
    lines = [
        "## Scan (trigger inversion on the clean tuning images)",
        "",
        f"Flagged: {', '.join(map(str, scan['flagged'])) or 'none'}. {scan['choice'][0].upper()}{scan['choice'][1:]}.",
        f"Rule: {scan['rule']}.",
        "",
        "| class | mask L1 | anomaly index | success |",
        "|---|---|---|---|",
    ]
    full = [c for c in scan["classes"] if c.get("searched", "full") == "full"]
    lines += [
        f"| {c['class']}{' (flagged)' if c['class'] in scan['flagged'] else ''} | {c['mask_l1']:g} | "
        f"{c['anomaly_index']:.2f} | {c['success']:.0%} |"
        for c in full
    ]
    if len(full) < len(scan["classes"]):
        lines += [
            "",
            f"{len(scan['classes']) - len(full)} more classes were screened out by a short search "
            "(report.json lists them): only the candidates and a random reference sample were searched in full.",
        ]
    lines += [
        "",
        f"Proxy ASR: the share of {scan['proxy_images']} of other classes that the input's reconstructed "
        "trigger sends to its class.",
        "",
        "| class | proxy ASR before | after | re-scan mask L1 (input -> purified) | re-scan anomaly index |",
        "|---|---|---|---|---|",
    ]
    for cls, proxy in scan["proxy_asr"].items():
        again = scan["rescan"].get(cls)
        after = _rate_dict_md(proxy["after"]) if proxy.get("after") else "-"
        lines.append(
            f"| {cls} | {_rate_dict_md(proxy['before'])} | {after} | "
            + (
                f"{again['input_mask_l1']:g} -> {again['mask_l1']:g} | {again['anomaly_index']:.2f}"
                f"{' (still flagged)' if again['flagged'] else ''}"
                + (
                    f"; on the clean reference {again['reference_rate']['value']:.1%}"
                    + (": the data's shortcut" if again["shortcut"] else ": the backdoor")
                    if "reference_rate" in again
                    else ""
                )
                + " |"
                if again
                else "- (not flagged) | - |"
            )
        )
    return lines + [""] + reference_markdown(scan.get("reference"))


def _reference_call(reference: dict, cls: int) -> str:
    if not reference["usable"]:
        return "not used"
    return "shortcut of the data" if cls in reference["natural"] else "planted"


def reference_markdown(reference: dict | None) -> list[str]:
    """--clean-reference: each flagged class's reconstruction on the clean model, and whether it was used."""
    if not reference:
        return []
    lines = [
        f"Clean reference `{reference['checkpoint']}`: {reference['accuracy']:.1%} of the held-out images right "
        f"(the model: {reference['input_accuracy']:.1%})"
        + (
            "; a flagged class whose reconstruction sends at least "
            f"{reference['threshold']:.0%} of its other-class images there is a shortcut of the data."
            if reference["usable"]
            else f"; more than {reference['margin'] * 100:.0f} points below the model, so it was not used as evidence."
        ),
        "",
        "| class | on the clean reference | |",
        "|---|---|---|",
    ]
    lines += [
        f"| {cls} | {_rate_dict_md(rate)} | {_reference_call(reference, int(cls))} |"
        for cls, rate in reference["rates"].items()
    ]
    return lines + [""]


def retune_markdown(retune: dict | None) -> list[str]:
    if not retune:
        return []
    s = retune["settings"]
    ref = retune.get("reference_asr_after_retuning")
    return [
        "## Retuning check",
        "",
        f"**{retune['verdict']}**",
        "",
        f"- ASR after retuning: {_rate_dict_md(retune['asr_after_retuning'])}"
        + (f"; clean reference: {_rate_dict_md(ref)}" if ref else ""),
        f"- C-Acc after retuning: {_rate_dict_md(retune['clean_acc_after_retuning'])}",
        f"- protocol: {s['poisoned']} poisoned images (not augmented) in the clean tuning set, SGD lr {s['lr']}, "
        f"momentum {s['momentum']}, constant lr, batch {s['batch_size']}, {s['epochs']} epochs; the retuned copy "
        "is not saved",
        "",
    ]


def _rate_of(rate: dict):
    from ..evaluation.metrics import Rate

    return Rate(rate["k"], rate["n"])


def _rate_dict_md(rate: dict) -> str:
    lo, hi = rate["ci95"]
    return f"{rate['value']:.2%} [{lo:.2%}, {hi:.2%}] ({rate['k']}/{rate['n']})"


def compute_line(compute: dict) -> str:
    """precision and memory format per stage, and the CPU kind they were chosen for (environment.compute)."""
    cpu = f"CPU {compute['cpu']['kind']}; " if compute.get("cpu") else ""
    prec = compute["precision"]
    formats = ", ".join(f"{stage} {c['format']}" for stage, c in compute["memory_format"].items())
    return (
        f"compute: {cpu}precision tune {prec['tune']}, evaluate {prec['evaluate']} ({prec['requested']}); "
        f"memory format {formats}"
    )


def _held_cell(curve: dict, epoch: int) -> str:
    return f"{curve[epoch]:.2%}" if epoch in curve else "-"


def output_kind_line(found: dict | None) -> str:
    """`probs (detected: every row ... sums to 1 ...); loss: cross-entropy on ...` for the report and terminal."""
    if not found:
        return "not probed"
    how = found["reason"] if found["decided_by"] == "detected" else f"--output-kind; detection said {found['detected']}"
    return f"{found['kind']} ({found['decided_by']}: {how}); loss: {found['loss']}"


def _rate_md(rate) -> str:
    return "-" if rate is None else f"{rate.value:.2%} {interval(rate)} ({counts(rate)})"


def _trigger_line(trigger: dict | None) -> str:
    if not trigger:
        return "none (ASR not measured)"
    params = ", ".join(f"{k}={v}" for k, v in trigger.items() if k not in ("type", "target"))
    return f"{trigger.get('type')} -> class {trigger.get('target')}" + (f" ({params})" if params else "")


def compare_markdown(report: CompareReport) -> str:
    retuned = any(row.retune for row in report.rows)
    lines = [
        "| checkpoint | method | C-Acc | ASR | ASR without trigger | RA |"
        + (" ASR after retuning | retuning verdict |" if retuned else "")
        + " DER | drift (L2) |",
        "|---|---|---|---|---|---|" + ("---|---|" if retuned else "") + "---|---|",
    ]
    for row in report.rows:
        r = row.result
        name = Path(row.path).name + (" (ref)" if row.is_reference else "")
        check = (
            (
                f" {_rate_dict_md(row.retune['asr_after_retuning'])} | {row.retune['status']} |"
                if row.retune
                else " - | - |"
            )
            if retuned
            else ""
        )
        lines.append(
            f"| {name} | {row.method or '-'} | {_rate_md(r.clean_acc)} | {_rate_md(r.asr)} | "
            f"{_rate_md(r.asr_no_trigger)} | {_rate_md(r.ra)} |"
            f"{check} {'-' if row.der is None else f'{row.der:.3f}'} | {row.drift['total_l2']:.3f} |"
        )
    return "\n".join(lines + _paired_against_reference(report)) + "\n"


def _paired_against_reference(report: CompareReport) -> list[str]:
    """One line per compared checkpoint: its change from the reference, counted on the same images."""
    names = display_names([row.path for row in report.rows])
    lines = [
        f"- {name}: " + "; ".join(paired_words(label, row.paired[key]) for label, key in RATE_ROWS if key in row.paired)
        for name, row in zip(names, report.rows)
        if row.paired
    ]
    return ["", "Against the reference, image by image (paired 95% intervals):", *lines] if lines else []


# ---------------------------------------------------------------- files


def stage_purify_report(outputs, report: PurifyReport) -> None:
    """Stage report.md, report.png and report.json in an OutputSet."""
    report.outputs.setdefault("report.json", "report.json")
    report.outputs.setdefault("report.md", "report.md")
    outputs.stage("report.png", purify_plot_png(report))
    report.outputs["report.png"] = "report.png"
    outputs.stage("report.md", purify_markdown(report).encode())
    outputs.stage("report.json", to_json(report).encode())


def purify_plot_png(report: PurifyReport) -> bytes:
    """Before/after bars per metric with 95% interval whiskers (bar_chart.py: Pillow, no matplotlib)."""
    from .bar_chart import Bar, Series, bar_chart_png

    keys = [(n, k) for n, k in (("C-Acc", "clean_acc"), ("ASR", "asr"), ("RA", "ra")) if getattr(report.before, k)]

    def bars(result) -> list[Bar]:
        rates = [getattr(result, key) for _, key in keys]
        return [Bar(r.value * 100, r.low * 100, r.high * 100) for r in rates]

    return bar_chart_png(
        f"bdclean {report.method['name']}: before vs after (95% CI)",
        [n for n, _ in keys],
        [Series("before", "#c0504d", bars(report.before)), Series("after", "#4f81bd", bars(report.after))],
    )


# ---------------------------------------------------------------- terminal (rich)


def metric_table(title: str, columns: list[str]):
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i == 0 else "right")
    return table


def render_evaluate(report: EvaluateReport, console) -> None:
    s = report.subject
    console.print(f"[bold]{s['path']}[/bold]  {s['arch']}, {s['num_classes']} classes, sha256 {s['sha256'][:12]}")
    console.print(f"trigger: {_trigger_line(report.trigger)}")
    table = metric_table("evaluation", ["metric", "value", "95% CI", "k/n"])
    for name, key in RATE_ROWS:
        if (rate := getattr(report.result, key)) is not None:
            table.add_row(name, pct(rate), interval(rate), counts(rate))
    if report.retune:
        after = _rate_of(report.retune["asr_after_retuning"])
        table.add_row("ASR after retuning", pct(after), interval(after), counts(after))
    console.print(table)
    if (line := trigger_lift_line(report.result, (report.trigger or {}).get("target"))) is not None:
        console.print(line, highlight=False, markup=False)
    if report.retune:
        console.print(f"retuning check: {report.retune['verdict']}", highlight=False, markup=False)
    render_gates(report.gates, console)


def render_purify(report: PurifyReport, console) -> None:
    s = report.subject
    recipe = report.method.get("recipe") or {}
    console.print(
        f"[bold]{s['path']}[/bold] -> purified with [bold]{report.method['name']}[/bold]"
        + (" (the default: scan, unlearn, verify)" if recipe.get("recommended") else "")
        + f" on {report.clean['images']} clean images"
    )
    console.print(f"trigger: {_trigger_line(report.trigger)}")
    console.print(f"model output: {output_kind_line(report.output_kind)}", highlight=False, markup=False)
    if report.output_kind and report.output_kind.get("warning"):
        console.print(f"warning: {report.output_kind['warning']}", style="bold yellow", highlight=False, markup=False)
    table = metric_table("before / after", ["metric", "before", "95% CI", "after", "95% CI", "change"])
    for name, key in RATE_ROWS:
        b, a = getattr(report.before, key), getattr(report.after, key)
        if b is None or a is None:
            continue
        table.add_row(
            name,
            f"{pct(b)} ({counts(b)})",
            interval(b),
            f"{pct(a)} ({counts(a)})",
            interval(a),
            signed_points(a.value - b.value),
        )
    console.print(table)
    paired = report.paired
    for name, key in RATE_ROWS:
        if key in paired:  # the same images before and after: the change's own interval, much tighter than two
            console.print(f"paired change: {paired_words(name, paired[key])}", highlight=False, markup=False)
    for when, line in _lift_lines(report.before, report.after, report.trigger):
        console.print(f"{when}: {line}", highlight=False, markup=False)
    if report.der is not None:
        console.print(
            f"DER {report.der:.3f}   ΔC-Acc {signed_points(report.acc_delta)}   ΔASR {signed_points(report.asr_delta)}"
        )
    path = (report.clean.get("holdout") or {}).get("path")
    if path:
        console.print(f"path selection: {path['reason']}", highlight=False, markup=False)
        if path.get("warning"):
            console.print(f"warning: {path['warning']}", style="bold yellow", highlight=False, markup=False)
    if report.retune:
        render_retune(report.retune, console)
    if report.removal:
        style = {"verified": "green", "failed": "bold red"}.get(report.removal["verdict"], "bold yellow")
        console.print(
            f"removal: {report.removal['verdict'].replace('_', ' ').upper()}: {report.removal['reason']}",
            style=style,
            highlight=False,
            markup=False,
        )
    if report.outputs:
        console.print("outputs: " + ", ".join(sorted(report.outputs)))
    render_gates(report.gates, console)


def render_retune(retune: dict, console) -> None:
    after = retune["asr_after_retuning"]
    console.print(
        f"retuning check: ASR after retuning {after['value']:.2%} ({after['k']}/{after['n']}) - {retune['verdict']}",
        highlight=False,
        markup=False,
    )


def display_names(paths: list[str]) -> list[str]:
    """Shortest distinguishing names: paths relative to their common folder (ft/purified.safetensors)."""
    import os

    resolved = [os.path.abspath(p) for p in paths]
    try:
        common = os.path.commonpath([os.path.dirname(p) for p in resolved])
    except ValueError:
        return list(paths)
    return [os.path.relpath(p, common) for p in resolved]


def render_compare(report: CompareReport, console) -> None:
    wide = console.width >= 120
    retuned = any(row.retune for row in report.rows)
    columns = (
        ["checkpoint", "method", "C-Acc", "ASR", "RA"]
        + (["ASR retuned"] if retuned else [])
        + ["DER", "drift L2"]
        + (["most changed"] if wide else [])
    )
    table = metric_table("compare", columns)
    names = display_names([row.path for row in report.rows])
    for name, row in zip(names, report.rows):
        r = row.result
        cells = [name + (" (ref)" if row.is_reference else ""), row.method or "-"]
        # value over its interval: narrow enough for an 80-column terminal
        cells += [
            "-" if rate is None else f"{pct(rate)}\n[dim]{interval(rate)}[/dim]" for rate in (r.clean_acc, r.asr, r.ra)
        ]
        if retuned:
            after = _rate_of(row.retune["asr_after_retuning"]) if row.retune else None
            cells.append("-" if after is None else f"{pct(after)}\n[dim]{row.retune['status']}[/dim]")
        cells += ["-" if row.der is None else f"{row.der:.3f}", f"{row.drift['total_l2']:.3f}"]
        if wide:
            cells.append(row.drift["most_changed"] or "-")
        table.add_row(*cells)
    console.print(table)
    for line in _paired_against_reference(report)[1:]:
        console.print(line, highlight=False, markup=False)
    render_gates([g for row in report.rows for g in row.gates], console)


def render_train(report: TrainReport, console) -> None:
    r = report.result
    console.print(f"saved [bold]{report.out}[/bold] ({report.arch}, sha256 {report.sha256[:12]})")
    start = report.init["metrics"] if report.init else None
    columns = ["metric"] + (["initial model"] if start else []) + ["value", "95% CI", "k/n"]
    table = metric_table("trained model" + (f" (from {report.init['path']})" if start else ""), columns)
    for name, rate, first in (
        ("C-Acc", r.clean_acc, start and start.clean_acc),
        ("ASR", r.asr, start and start.asr),
        ("RA", r.ra, start and start.ra),
    ):
        if rate is not None:
            table.add_row(
                name,
                *([pct(first) if first is not None else "-"] if start else []),
                pct(rate),
                interval(rate),
                counts(rate),
            )
    console.print(table)
    for warning in report.warnings:
        console.print(f"[bold yellow]warning: {warning}[/bold yellow]", highlight=False)


def render_gates(gates: list[GateResult], console) -> None:
    for gate in gates:
        style = "green" if gate.passed else "bold red"
        console.print(f"[{style}]{gate.describe()}[/{style}]")
