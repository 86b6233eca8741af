"""`bdclean demo`: the whole story offline, on the MNIST sample shipped in the package.

1. train a small CNN on the sample with a BadNets trigger at a low poisoning rate (the backdoor), and
   the same CNN without it (a clean model of the task: the default's --clean-reference);
2. purify it with plain fine-tuning (FT), Feature Shift Tuning (FST, the paper's) and bdclean's
   default (what `bdclean purify` runs with no --method: scan, unlearn, verify) on a little clean data;
3. compare the four on the same test images and tell what happened.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ..config import CompareOptions, PurifyOptions, TrainOptions
from ..defenses import get_defense
from ..outputs import atomic_write_text, prepare_out_dir
from ..progress import Reporter
from ..reports.report import compare_markdown, render_compare, to_json
from ..selection.recipe import RECOMMENDED_METHOD
from ..verdicts.removal import FAILED_ASR, VERIFIED_ASR
from .compare import compare_checkpoints
from .purify import purify_checkpoint
from .training import train_model

# Chosen by trying them on the sample (2-core CPU, see docs/demo.md): 1% poisoning is low enough for
# fine-tuning to leave part of the backdoor, and 5 epochs without augmentation (the usual MNIST
# recipe; random crops would push the corner patch out of view) make the backdoor take hold.
DEMO_TRIGGER = "badnets"
DEMO_POISON_RATE = 0.01
DEMO_TRAIN = dict(arch="simple_cnn", epochs=5, lr=0.05, batch_size=128, augment=False)
DEMO_CLEAN_COUNT = 600  # 10% of the sample's training split
DEMO_TUNE = dict(lr=0.01, epochs=10)  # the FST paper's CIFAR-10 settings
DEMO_ALPHA = 0.2  # and its alpha, given only to the methods that read it (the others refuse it)
LOW_ASR = VERIFIED_ASR  # what the story calls "removed": the removal verdict's bound (verdicts/removal.py)
# (output folder, --method): None is the default, scan -> unlearn -> verify (selection/recipe.py)
DEMO_RUNS = (("ft", "ft"), ("fst", "fst"), ("recommended", None))


def _removal_words(asr: float) -> str:
    """The story's words for an ASR after purification, in step with the removal verdict's bounds."""
    if asr <= LOW_ASR:
        return "removed the backdoor"
    if asr > FAILED_ASR:
        return "did not remove the backdoor"
    return f"lowered the ASR, but not to the removal verdict's {LOW_ASR:.0%} bound"


def reads_alpha(method: str | None) -> bool:
    return "alpha" in get_defense(method or RECOMMENDED_METHOD).own_params


def sample_dir() -> Path:
    """The bundled MNIST sample (train.npz/test.npz); see assets/mnist_sample/README.md for provenance."""
    return Path(str(resources.files("backdoor_cli") / "assets" / "mnist_sample"))


def run_demo(out: Path, force: bool, device: str, console, reporter: Reporter | None = None) -> dict:
    reporter = reporter or Reporter()
    data = str(sample_dir())
    out = prepare_out_dir(
        Path(out), ["backdoored.safetensors", "clean.safetensors", "compare.md", "compare.json"], [], force
    )
    console.print(
        f"[bold]bdclean demo[/bold]: offline, on {data} (6,000 MNIST training / 2,000 test images; about 2 minutes on a 2-core CPU)"
    )

    console.print(
        f"\n[bold]1. The backdoor.[/bold] Training {DEMO_TRAIN['arch']} with a {DEMO_TRIGGER} trigger "
        f"(3x3 white patch -> class 0) on {DEMO_POISON_RATE:.0%} of the training images..."
    )
    trained = train_model(
        TrainOptions(
            data=data,
            out=str(out / "backdoored.safetensors"),
            force=force,
            trigger=DEMO_TRIGGER,
            poison_rate=DEMO_POISON_RATE,
            device=device,
            **DEMO_TRAIN,
        ),
        reporter,
    )
    r = trained.result
    console.print(
        f"   clean accuracy {r.clean_acc.value:.1%}, attack success rate {r.asr.value:.1%} "
        f"({trained.poisoned} poisoned images were enough)"
    )
    console.print(
        "   and the same network without the trigger: a clean model of the task, which the default uses as "
        "--clean-reference to tell a planted trigger from a shortcut of the data..."
    )
    clean = train_model(
        TrainOptions(data=data, out=str(out / "clean.safetensors"), force=force, device=device, **DEMO_TRAIN),
        reporter,
    )
    console.print(f"   clean accuracy {clean.result.clean_acc.value:.1%}")

    purified = {}
    for name, method in DEMO_RUNS:
        title = method.upper() if method else "bdclean's default (no --method: scan, unlearn, verify)"
        console.print(f"\n[bold]2. Purify with {title}[/bold] on {DEMO_CLEAN_COUNT} clean images...")
        report = purify_checkpoint(
            PurifyOptions(
                checkpoint=str(out / "backdoored.safetensors"),
                data=data,
                method=method,
                out=str(out / name),
                force=force,
                clean_count=DEMO_CLEAN_COUNT,
                device=device,
                **DEMO_TUNE,
                alpha=DEMO_ALPHA if reads_alpha(method) else None,
                clean_reference=None if method else str(out / "clean.safetensors"),
            ),
            reporter,
        )
        purified[name] = report
        console.print(
            f"   ASR {report.before.asr.value:.1%} -> {report.after.asr.value:.1%}, "
            f"clean accuracy {report.before.clean_acc.value:.1%} -> {report.after.clean_acc.value:.1%}; "
            f"removal {report.removal['verdict'].replace('_', ' ')}",
            highlight=False,
            markup=False,
        )

    console.print("\n[bold]3. Side by side[/bold] (same test images, same trigger):")
    comparison = compare_checkpoints(
        CompareOptions(
            checkpoints=(
                str(out / "backdoored.safetensors"),
                *(str(out / name / "purified.safetensors") for name, _ in DEMO_RUNS),
            ),
            data=data,
            device=device,
        ),
        reporter,
    )
    render_compare(comparison, console)
    atomic_write_text(out / "compare.md", compare_markdown(comparison))
    atomic_write_text(out / "compare.json", to_json(comparison))

    console.print("\n[bold]What happened[/bold]")
    for line in story(r.clean_acc.value, r.asr.value, purified["ft"], purified["fst"], purified["recommended"]):
        console.print(f"- {line}")
    console.print(f"\nEverything is in {out}/ (weights, report.json/.md per method, compare.md).")
    return {"trained": trained, "purified": purified, "compare": comparison}


def story(clean_acc: float, asr: float, ft, fst, recommended=None) -> list[str]:
    """The demo's conclusions, written from the measured figures (never assumed)."""
    lines = [
        f"The poisoned model obeys the trigger {asr:.1%} of the time while looking healthy "
        f"({clean_acc:.1%} clean accuracy)."
    ]
    ft_asr, fst_asr = ft.after.asr.value, fst.after.asr.value
    if ft_asr > LOW_ASR:
        lines.append(
            f"Fine-tuning (FT) on clean data left an ASR of {ft_asr:.1%}: at a low poisoning rate the "
            "backdoor features survive plain tuning, as the FST paper found."
        )
    else:
        lines.append(f"Fine-tuning (FT) brought the ASR down to {ft_asr:.1%} on this run.")
    verdict = _removal_words(fst_asr)
    lines.append(
        f"FST re-initialised the head and kept it away from the original one, shifting the features: it "
        f"{verdict} (ASR {fst_asr:.1%}) at a clean-accuracy cost of "
        f"{(fst.before.clean_acc.value - fst.after.clean_acc.value) * 100:.1f} points "
        f"({fst.after.clean_acc.value:.1%})."
    )
    if recommended is not None:
        rec_asr = recommended.after.asr.value
        rec_cost = (recommended.before.clean_acc.value - recommended.after.clean_acc.value) * 100
        fst_cost = (fst.before.clean_acc.value - fst.after.clean_acc.value) * 100
        verdict = _removal_words(rec_asr)
        lines.append(
            f"bdclean's default ({scan_words(recommended.scan)}; the real trigger is never used) {verdict} "
            f"(ASR {rec_asr:.1%}) at a cost of {rec_cost:.1f} points "
            f"({recommended.after.clean_acc.value:.1%}), against FST's {fst_cost:.1f}. Its removal verdict: "
            f"{recommended.removal['verdict'].replace('_', ' ')} ({verdict_source(recommended.removal)})."
        )
        own = recommended.removal.get("evidence", {}).get("scan")
        if own:
            lines.append(
                "Without the recorded trigger, the default's own verdict (its scan, the held-out images and the "
                f"clean reference) is {own['verdict'].replace('_', ' ')}: {own['reason']}."
            )
    return lines


def verdict_source(removal: dict) -> str:
    """What the verdict rests on: the scan alone, or the trigger recorded in the checkpoint (scan beside it)."""
    if removal.get("evidence", {}).get("source") == "scan":
        return "from the scan's evidence alone"
    return "from the trigger recorded in the checkpoint, the scan's evidence beside it"


def scan_words(scan: dict | None) -> str:
    """What the default's scan found and unlearnt, in the story's words."""
    if not scan:
        return "no scan ran"
    unlearnt = ", ".join(str(c) for c in scan["unlearnt"])
    flagged = ", ".join(map(str, scan["flagged"]))
    if scan["flagged"] and scan["unlearnt"]:
        return f"a trigger-inversion scan of the clean images flagged class {flagged}, and its reconstructed trigger was unlearnt"
    if scan["flagged"]:
        return (
            f"a trigger-inversion scan flagged class {flagged}, a shortcut the clean reference shares, so nothing "
            "was unlearnt"
        )
    if scan["unlearnt"]:
        return f"a trigger-inversion scan flagged no class; the smallest reconstructed trigger (class {unlearnt}) was unlearnt"
    return "a trigger-inversion scan flagged no class, so nothing was unlearnt"
