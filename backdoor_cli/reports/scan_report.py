"""The scan's report: dataclass -> JSON, plain-words verdicts, a rich table, trigger pictures and specs."""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
import torch

from ..scanning.guided import LOCAL_SHARE, ReferenceCheck, co_flag_classes
from ..scanning.inversion import ClassTrigger, ScanResult
from .report import SCHEMA_VERSION

PREVIEW_SCALE = 4  # nearest-neighbour upscaling of the preview: a 32x32 trigger is otherwise a speck


@dataclass
class ScanReport:
    subject: dict
    data: dict
    method: dict
    result: ScanResult
    timings: dict
    environment: dict
    options: dict
    outputs: dict = field(default_factory=dict)
    output_kind: dict | None = None
    reference: ReferenceCheck | None = None  # --clean-reference applied to the flagged classes' reconstructions
    reference_path: str | None = None  # --clean-reference as given (also when nothing was flagged to check)
    # flagged class -> the share of its reconstruction's effect on the scan images its densest window keeps
    local: dict[int, float] = field(default_factory=dict)
    # With --clean-reference and no class flagged: the smallest mask's class, tried on the reference too
    candidate: int | None = None

    @property
    def flagged(self) -> list[int]:
        return list(self.result.flagged)

    @property
    def natural(self) -> dict:
        """Flagged classes whose reconstruction the clean reference follows too: shortcuts of the data."""
        return self.reference.shortcuts(self.flagged) if self.reference is not None else {}

    @property
    def vouched(self) -> bool:
        """Whether the clean reference ignores the sub-threshold candidate's reconstruction: possibly planted."""
        return self.candidate is not None and self.reference is not None and self.candidate in self.reference.planted

    @property
    def suspected(self) -> list[int]:
        """The flagged classes taken for planted triggers (every flagged class without a usable reference)."""
        return [c for c in self.flagged if c not in self.natural]

    @property
    def co_flags(self) -> list[int]:
        """Suspected classes far weaker than the strongest and spread out (scanning.guided.co_flag_classes): likelier
        the data's shortcuts than second backdoors; purify's default unlearns them only where that is cheap."""
        return co_flag_classes(self.result.anomaly, self.suspected, self.local)

    def class_verdicts(self) -> list[str]:
        co_flags = self.co_flags
        return [
            class_verdict(self.result, i, self.natural, self.local, co_flags) for i in range(len(self.result.triggers))
        ]

    def verdict(self) -> str:
        """The verdict in words; a reference the scan could not use is named with why, since only a usable one
        tells a planted trigger from a shortcut of the data."""
        text = self.findings()
        if self.reference is not None and not self.reference.usable:
            text += f" ({self.reference.unusable_reason()})"
        return text

    def findings(self) -> str:
        r = self.result
        shortcuts = "; ".join(
            f"class {c} set aside: the clean reference follows its reconstruction too ({rate.value:.1%} of its "
            "images), a shortcut of the data, not a planted trigger"
            for c, rate in self.natural.items()
        )
        if self.suspected:
            names = ", ".join(str(c) for c in self.suspected)
            planted = (
                "; the clean reference ignores its reconstruction"
                if self.reference is not None and self.reference.usable
                else ""
            )
            return (
                f"BACKDOOR SUSPECTED: class {names} needs a far smaller trigger than the other classes "
                f"(anomaly index {', '.join(f'{r.anomaly[c]:.2f}' for c in self.suspected)} > {r.threshold:g})"
                + planted
                + (f"; {shortcuts}" if shortcuts else "")
            )
        limits = (
            "This finds patch-like all-to-one backdoors; it does not rule out warping, signal (SIG), sample-specific or "
            "full-image blended triggers"
        )
        if shortcuts:
            return f"no backdoor suspected: {shortcuts}. {limits}"
        top = max((i for i in range(len(r.anomaly)) if r.searched_in_full(i)), key=lambda i: r.anomaly[i])
        text = (
            f"no class flagged: the smallest trigger (class {top}, anomaly index {r.anomaly[top]:.2f}) is within "
            f"{r.threshold:g} robust standard deviations of the median"
        )
        if self.candidate is not None and self.reference is not None and self.reference.usable:
            rate = self.reference.rates[self.candidate]
            if self.vouched:
                return (
                    f"{text}, but the clean reference sends only {rate.value:.1%} of its images there with its "
                    f"reconstruction (below {self.reference.threshold:.0%}): it may be a backdoor the outlier test "
                    "misses (a patch backdoor at anomaly index 1.73 was one); `bdclean purify --clean-reference` "
                    f"unlearns it. {limits}"
                )
            return f"{text}, and the clean reference follows its reconstruction too ({rate.value:.1%}): a shortcut of the data. {limits}"
        return f"{text}. {limits}"

    def to_dict(self) -> dict:
        r = self.result
        co_flags = self.co_flags
        classes = [
            {
                **t.to_dict(),
                "anomaly_index": round(a, 4),
                "anomaly_index_raw_l1": round(raw, 4),
                "flagged": t.target in r.flagged,
                "co_flag": t.target in co_flags,
                **({"local_share": round(self.local[t.target], 4)} if t.target in self.local else {}),
                "verdict": v,
                "searched": "full" if r.searched_in_full(t.target) else "screen",
            }
            for t, a, raw, v in zip(r.triggers, r.anomaly, r.anomaly_raw, self.class_verdicts())
        ]
        return {
            "schema": SCHEMA_VERSION,
            "kind": "scan",
            "checkpoint": self.subject,
            "data": self.data,
            "method": self.method,
            "output_kind": self.output_kind,
            "classes": classes,
            "median_mask_l1": round(r.median_l1, 3),
            "mad_log_mask_l1": round(r.mad, 4),
            "flagged_classes": self.flagged,
            "suspected_classes": self.suspected,
            "co_flags": co_flags,
            "backdoor_suspected": bool(self.suspected),
            "candidate": (
                {"class": self.candidate, "anomaly_index": round(r.anomaly[self.candidate], 4), "planted": self.vouched}
                if self.candidate is not None
                else None
            ),
            "reference": (
                self.reference.to_dict()
                if self.reference is not None
                else ({"checkpoint": self.reference_path, "rates": {}} if self.reference_path else None)
            ),
            "screen": ({"candidates": list(r.candidates), "reference": list(r.reference)} if r.screened else None),
            "cached": r.cached,
            "verdict": self.verdict(),
            "decision_rule": r.rule,
            "outputs": self.outputs,
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            "environment": self.environment,
            "options": self.options,
        }


def class_verdict(
    result: ScanResult,
    index: int,
    natural: dict | None = None,
    local: dict | None = None,
    co_flags: list[int] | None = None,
) -> str:
    """One sentence per class, in pixels and percentages; `natural`: flagged classes the clean reference
    follows too (class -> Rate); `local`: flagged class -> the share of its effect its densest window keeps;
    `co_flags`: flagged classes far weaker than the strongest and spread out (ScanReport.co_flags)."""
    t = result.triggers[index]
    others = [o.l1 for o in result.triggers if o.target != t.target]
    if natural and t.target in natural:
        return (
            f"class {t.target}: a {t.l1:.0f}-pixel pattern sends {t.success:.0%} of clean images there (flagged), "
            f"but it sends {natural[t.target].value:.0%} of a clean model's images there too: a shortcut of the "
            "data, not a planted trigger"
        )
    if t.target in result.flagged:
        return (
            f"class {t.target} is a likely backdoor target: a {t.l1:.0f}-pixel pattern sends {t.success:.0%} of "
            f"clean images there; the other classes need >= {min(others):.0f}"
            + locality_words(local, t.target)
            + (CO_FLAG_WORDS if co_flags and t.target in co_flags else "")
        )
    if not result.searched_in_full(t.target):
        return (
            f"class {t.target}: screened out (a short search needed {t.l1:.0f} pixels, more than the "
            f"{len(result.candidates)} candidates searched in full)"
        )
    tail = "" if t.reached else "; the search never reached its success target, so this size is an upper bound"
    return (
        f"class {t.target}: a {t.l1:.0f}-pixel pattern sends {t.success:.0%} of clean images there "
        f"(anomaly index {result.anomaly[index]:.2f}, not an outlier){tail}"
    )


CO_FLAG_WORDS = (
    "; a co-flag: far weaker than the strongest flag and spread out, so likelier the data's shortcut to the class "
    "than a second backdoor (an all-to-one backdoor has one target); purify's default unlearns it only where that "
    "is cheap"
)


def locality_words(local: dict | None, target: int) -> str:
    """How local a flagged reconstruction is, in words (scanning.guided.localize), or nothing unmeasured."""
    if not local or target not in local:
        return ""
    share = local[target]
    if share >= LOCAL_SHARE:
        return f"; local: its densest window keeps {share:.0%} of its effect, as a patch trigger's does"
    return (
        f"; spread over the image: its densest window keeps only {share:.0%} of its effect, so it may approximate "
        "a blend, signal or warp trigger, which unlearning this reconstruction may only partly remove"
    )


def trigger_pixels(trigger: ClassTrigger) -> tuple[np.ndarray, np.ndarray]:
    """(pattern uint8 (H, W, C), mask uint8 (H, W)): what a bdclean `type: image` spec reads back."""
    pattern = (trigger.pattern.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    mask = (trigger.mask.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    return pattern, mask


def png_bytes(pixels: np.ndarray) -> bytes:
    from PIL import Image

    image = Image.fromarray(pixels[:, :, 0] if pixels.ndim == 3 and pixels.shape[2] == 1 else pixels)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def preview_png(trigger: ClassTrigger) -> bytes:
    """Pattern | mask | mask x pattern side by side, upscaled: what a person looks at."""
    pattern, mask = trigger_pixels(trigger)
    rgb = pattern if pattern.shape[2] == 3 else np.repeat(pattern, 3, axis=2)
    mask_rgb = np.repeat(mask[:, :, None], 3, axis=2)
    applied = (rgb.astype(np.float32) * (mask[:, :, None] / 255.0)).round().astype(np.uint8)
    gap = np.full((rgb.shape[0], 2, 3), 128, dtype=np.uint8)
    strip = np.concatenate([rgb, gap, mask_rgb, gap, applied], axis=1)
    strip = strip.repeat(PREVIEW_SCALE, axis=0).repeat(PREVIEW_SCALE, axis=1)
    return png_bytes(strip)


def trigger_spec_yaml(target: int, image_name: str, mask_name: str, image_sha: str, mask_sha: str) -> bytes:
    """A `type: image` trigger spec naming the pictures beside it (relative paths resolve against the spec)."""
    import yaml

    spec = {
        "type": "image",
        "target": int(target),
        "name": f"bdclean scan reconstruction, class {target}",
        "image": image_name,
        "image_sha256": image_sha,
        "mask": mask_name,
        "mask_sha256": mask_sha,
        "position": [0, 0],
    }
    return yaml.safe_dump(spec, sort_keys=False).encode()


def render_scan(report: ScanReport, console) -> None:
    from rich.markup import escape
    from rich.table import Table

    s = report.subject
    console.print(
        f"[bold]{escape(s['path'])}[/bold]  {s['arch']}, {s['num_classes']} classes, sha256 {s['sha256'][:12]}"
    )
    m = report.method
    console.print(
        f"scan: {m['name']} on {report.data['scan_images']} clean images ({report.data['scan_source']}), "
        f"{m['params']['steps']} steps per class",
        highlight=False,
        markup=False,
    )
    r = report.result
    if r.screened:
        console.print(
            f"pre-screen: {len(r.triggers)} classes searched for {m['params']['screen_steps']} steps; the "
            f"{len(r.candidates)} smallest masks and {len(r.reference)} random classes searched in full",
            highlight=False,
            markup=False,
        )
    table = Table(title="trigger inversion per class", title_justify="left")
    for col in ("class", "mask L1 (pixels)", "success", "anomaly index", "flagged", "local"):
        table.add_column(col, justify="right")
    for t, a in zip(r.triggers, r.anomaly):
        if not r.searched_in_full(t.target):
            continue  # screened out: listed in the JSON, not in the table (a 1,000-row table helps nobody)
        flagged = t.target in r.flagged
        shortcut = t.target in report.natural
        table.add_row(
            str(t.target),
            f"{t.l1:.1f}" + ("" if t.reached else "*"),
            f"{t.success:.0%}",
            f"{a:.2f}",
            "shortcut" if shortcut else ("[bold red]yes[/bold red]" if flagged else "no"),
            f"{report.local[t.target]:.0%}" if t.target in report.local else "-",
        )
    console.print(table)
    if not all(t.reached for t in r.triggers):
        console.print(
            "* the search never reached its success target for this class: the size is an upper bound",
            markup=False,
            highlight=False,
        )
    for t, verdict in zip(r.triggers, report.class_verdicts()):
        if t.target in r.flagged:
            style = "yellow" if t.target in report.natural else "bold red"
            console.print(verdict, style=style, markup=False, highlight=False)
    # a reference the scan could not use is said once, in the verdict (ScanReport.verdict)
    console.print(f"median mask L1 {r.median_l1:.1f} pixels, MAD of log L1 {r.mad:.3f}", markup=False, highlight=False)
    console.print(
        f"verdict: {report.verdict()}",
        style="bold red" if report.suspected else ("yellow" if report.vouched else "bold green"),
        markup=False,
        highlight=False,
    )
    console.print(f"rule: {r.rule}", markup=False, highlight=False)
    if report.outputs:
        console.print("outputs: " + ", ".join(sorted(report.outputs)), markup=False, highlight=False)
