"""The `bdclean` command line: a thin skin over the use cases in backdoor_cli.usecases.

Each command parses its options, calls ONE library function, renders the result, and maps errors
to exit codes: 0 ok, 1 a gate failed, 2 bad usage or input, 3 unsafe input refused, 4 internal
error (a bug), 130 interrupted. Results go to stdout, progress and messages to stderr.
No torch import at module level: `bdclean --help` must answer instantly.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from .errors import BdcleanError, ConfigError
from .method_catalog import method_help

app = typer.Typer(
    name="bdclean",
    help="Audit and purify image classifiers that may carry a backdoor (Feature Shift Tuning and baselines).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

EXIT_GATE, EXIT_INTERNAL, EXIT_INTERRUPTED = 1, 4, 130


def _print_version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"bdclean {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print bdclean's version and exit."),
    ] = False,
) -> None:
    """Audit and purify image classifiers that may carry a backdoor (Feature Shift Tuning and baselines)."""


# Shared options: one definition each, so names and help stay identical across commands.
Arch = Annotated[
    Optional[str],
    typer.Option(
        rich_help_panel="Model and data",
        help="Architecture: a built-in name (resnet18, resnet20/32/44/56, preactresnet18, vgg16_bn, "
        "simple_cnn, simple_cnn_half, test_tiny), torchvision:NAME, or path/to/file.py:factory. "
        "Default: from bdclean metadata, else guessed from the weights.",
    ),
]
NumClasses = Annotated[
    Optional[int],
    typer.Option(rich_help_panel="Model and data", help="Number of classes (default: from the checkpoint)."),
]
Head = Annotated[
    Optional[str],
    typer.Option(rich_help_panel="Model and data", help="Module path of the linear head (default: auto-detected)."),
]
Data = Annotated[
    Optional[str],
    typer.Option(
        rich_help_panel="Model and data",
        help="Dataset: a name (cifar10, mnist, ...) under --data-dir, or a "
        "directory with train.npz/test.npz or train/ and test/ image folders.",
    ),
]
DataDir = Annotated[Optional[str], typer.Option(rich_help_panel="Model and data", help="Where named datasets live.")]
Trigger = Annotated[
    Optional[str],
    typer.Option(
        rich_help_panel="Model and data",
        help="Trigger: a built-in (badnets, blended, sig, wanet) or a YAML "
        "spec file. Default: the one recorded in the checkpoint, if any.",
    ),
]
Target = Annotated[
    Optional[int],
    typer.Option(rich_help_panel="Model and data", help="Attack target class (overrides the trigger spec)."),
]
Device = Annotated[Optional[str], typer.Option(rich_help_panel="Compute", help="auto, cpu, cuda or cuda:N.")]
Seed = Annotated[Optional[int], typer.Option(rich_help_panel="Compute", help="Random seed (default 0).")]
EvalLimit = Annotated[
    Optional[int],
    typer.Option(rich_help_panel="Model and data", help="Evaluate a seeded, stratified subset of N test images."),
]
Mean = Annotated[
    Optional[str],
    typer.Option(
        rich_help_panel="Model and data", help="Normalisation mean, comma-separated (default: metadata or dataset)."
    ),
]
Std = Annotated[
    Optional[str],
    typer.Option(
        rich_help_panel="Model and data", help="Normalisation std, comma-separated (default: metadata or dataset)."
    ),
]
Config = Annotated[
    Optional[Path], typer.Option(rich_help_panel="Output", help="YAML file of options; flags override it.")
]
Json = Annotated[bool, typer.Option("--json", rich_help_panel="Output", help="Print the result as JSON on stdout.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", rich_help_panel="Output", help="No progress output on stderr.")]
Force = Annotated[Optional[bool], typer.Option("--force", rich_help_panel="Output", help="Replace existing outputs.")]
MaxAsr = Annotated[
    Optional[str],
    typer.Option(
        rich_help_panel="Gates (exit 1 when one fails)", help="Gate: fail (exit 1) if ASR is above this (0.05 or 5%)."
    ),
]
MinAcc = Annotated[
    Optional[str],
    typer.Option(
        rich_help_panel="Gates (exit 1 when one fails)", help="Gate: fail (exit 1) if clean accuracy is below this."
    ),
]
MaxAccDrop = Annotated[
    Optional[str],
    typer.Option(
        rich_help_panel="Gates (exit 1 when one fails)",
        help="Gate: fail (exit 1) if clean accuracy drops by more than this.",
    ),
]
ImageSize = Annotated[
    Optional[str],
    typer.Option(
        rich_help_panel="Model and data",
        help="Model input size N (square) or H,W: image folders are "
        "resized (shorter side to round(N / 0.875), e.g. 256 for 224) and "
        "centre-cropped to it, the ImageNet evaluation transform. Needed when "
        "a folder's images differ in size.",
    ),
]
RetuneCheck = Annotated[
    Optional[bool],
    typer.Option(
        "--retune-check",
        rich_help_panel="Retuning check",
        help="Retune a copy with a few poisoned images (the trigger's) "
        "and report the ASR after retuning: a low ASR that comes back is a "
        "dormant backdoor. The copy is never saved. Needs a trigger.",
    ),
]
CleanReference = Annotated[
    Optional[str],
    typer.Option(
        rich_help_panel="Retuning check",
        help="A clean model of the same task (a bdclean .safetensors loads as it records, any other with the model's --arch/--mean/--std; `bdclean convert` writes one), "
        "`bundled` (bdclean's own for the built-in cifar10; `bundled:cifar10` for your own CIFAR-10 images) or `none`: "
        "--retune-check gives it the same retuning, for the verdict; the default purify applies each flagged class's "
        "reconstructed trigger to it, leaves a class it follows too (>= 35%) alone as a shortcut of the data, and can "
        "verify the removal of a single planted trigger without --trigger. Unset, the default purify's scan uses the "
        "bundled reference when the data is the built-in cifar10, and tries it on 32x32 colour images in 10 classes of "
        "another name (used only if it gets at least half of their labels right).",
    ),
]
RetunePoisoned = Annotated[
    Optional[int], typer.Option(rich_help_panel="Retuning check", help="--retune-check: poisoned images (default 5).")
]
RetuneEpochs = Annotated[
    Optional[int], typer.Option(rich_help_panel="Retuning check", help="--retune-check: epochs (default 5).")
]
RetuneCleanCount = Annotated[
    Optional[int],
    typer.Option(
        rich_help_panel="Retuning check",
        help="--retune-check: clean training images to retune on "
        "(default: those purify would tune on, the paper's fraction).",
    ),
]
RetuneLr = Annotated[
    Optional[float],
    typer.Option(rich_help_panel="Retuning check", help="--retune-check: SGD learning rate, constant (default 0.01)."),
]
Precision = Annotated[
    Optional[str],
    typer.Option(
        rich_help_panel="Compute",
        help="Arithmetic: fp32, bf16 (autocast; fp32 weights and loss), or "
        "auto (default): tuning in bf16 on CUDA and on a CPU with native "
        "bf16 (AMX, AVX512-BF16), fp32 elsewhere; evaluation in exact fp32 "
        "(TF32 off on CUDA) unless bf16 is asked for. Recorded in the "
        "report.",
    ),
]
MemoryFormat = Annotated[
    Optional[str],
    typer.Option(
        rich_help_panel="Compute",
        help="Model memory format: auto (default: channels_last, not timed, "
        "so a run is the same whatever the machine's load), channels_last, "
        "contiguous, or timed (on CPU, time a few steps in each at start-up "
        "and keep the faster: quicker on some models, but the choice, and "
        "with it the last bits of tuned weights, can follow the load). "
        "Recorded in the report.",
    ),
]
Out = Annotated[
    Optional[str], typer.Option(rich_help_panel="Output", help="Output directory (purify) or file (train).")
]
ScanCacheDir = Annotated[
    Optional[str],
    typer.Option(
        rich_help_panel="Output",
        help="Scan cache folder (default $BDCLEAN_CACHE_DIR; off when neither is set): a scan of the same "
        "model, clean images and settings is read back from its scan/ folder, not searched again.",
    ),
]
FromList = Annotated[Optional[str], typer.Option(help="A file of checkpoint paths, one a line (# comments allowed).")]
CacheDir = Annotated[
    Optional[str],
    typer.Option(
        rich_help_panel="Output",
        help="Evaluation cache folder (default $BDCLEAN_CACHE_DIR; off when "
        "neither is set): an evaluation of the same bytes, data, trigger "
        "and settings is read back, not run again (evaluate, then purify); "
        "so is the default purify's scan of the same model, clean images and "
        "settings (in scan/), so a second purify skips the search.",
    ),
]


def _stdout():
    from rich.console import Console

    return Console(soft_wrap=True)


def _stderr():
    from rich.console import Console

    return Console(stderr=True, soft_wrap=True)


def _reporter(quiet: bool, json_output: bool):
    from .progress import StderrReporter

    return StderrReporter(quiet=quiet)


def _guard(action):
    """Run a command body, turning every failure into a message and an exit code."""
    try:
        return action()
    except BdcleanError as exc:
        _stderr().print(f"[bold red]error:[/bold red] {exc.message}", highlight=False, markup=True)
        if exc.hint:
            _stderr().print(f"  hint: {exc.hint}", highlight=False, markup=False)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        _stderr().print("interrupted; no partial outputs were left behind", highlight=False)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except typer.Exit:
        raise
    except Exception as exc:  # a bug: say so plainly, keep the traceback for BDCLEAN_DEBUG=1
        if os.environ.get("BDCLEAN_DEBUG") == "1":
            raise
        _stderr().print(f"internal error: {exc.__class__.__name__}: {str(exc)[:300]}", highlight=False, markup=False)
        _stderr().print("  this is a bug in bdclean; rerun with BDCLEAN_DEBUG=1 for the traceback", markup=False)
        raise typer.Exit(EXIT_INTERNAL) from None


def _emit(report, json_output: bool, render) -> None:
    if json_output:
        from .reports.report import to_json

        sys.stdout.write(to_json(report) + "\n")
    else:
        render(report, _stdout())


def _exit_for_gates(gates) -> None:
    failed = [g for g in gates if not g.passed]
    if failed:
        for gate in failed:
            _stderr().print(f"[bold red]{gate.describe()}[/bold red]", highlight=False)
        raise typer.Exit(EXIT_GATE)


def _floats(text: Optional[str]):
    return None if text is None else text  # parsed and validated by config.coerce (comma-separated)


@app.command()
def inspect(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint file (.safetensors, .pt, .pth, .th, .bin).")],
    json_output: Json = False,
    keys: Annotated[bool, typer.Option("--keys", help="List every tensor (name, shape, dtype).")] = False,
):
    """Show what is in a checkpoint without running anything in it."""

    def body():
        from .usecases.inspection import inspect_checkpoint, render_inspection

        info = inspect_checkpoint(checkpoint)
        if json_output:
            import json

            sys.stdout.write(json.dumps(info, indent=2) + "\n")
        else:
            render_inspection(info, _stdout(), show_keys=keys)

    _guard(body)


@app.command()
def evaluate(
    checkpoints: Annotated[
        Optional[List[str]],
        typer.Argument(
            help="Checkpoint to evaluate; or several: files, folders of checkpoints, globs ('zoo/**/*.pt').",
            show_default=False,
        ),
    ] = None,
    data: Data = None,
    arch: Arch = None,
    num_classes: NumClasses = None,
    head: Head = None,
    data_dir: DataDir = None,
    trigger: Trigger = None,
    target: Target = None,
    mean: Mean = None,
    std: Std = None,
    device: Device = None,
    seed: Seed = None,
    batch_size: Annotated[
        Optional[int], typer.Option(help="Evaluation batch size (default: 128 on CPU, 1024 on CUDA).")
    ] = None,
    eval_limit: EvalLimit = None,
    max_asr: MaxAsr = None,
    min_acc: MinAcc = None,
    image_size: ImageSize = None,
    from_list: FromList = None,
    jsonl: Annotated[
        Optional[str],
        typer.Option(
            help="Many: append one JSON line per checkpoint as it finishes; "
            "a rerun with the same file skips what it already holds."
        ),
    ] = None,
    markdown: Annotated[bool, typer.Option("--markdown", help="Many: print the summary as a Markdown table.")] = False,
    shard: Annotated[
        Optional[str],
        typer.Option(
            help="Many: evaluate share I of N (0-based, e.g. 0/4); default RANK/WORLD_SIZE when a launcher set them."
        ),
    ] = None,
    purify: Annotated[
        Optional[str],
        typer.Option(
            help="Many: purify each checkpoint that fails a gate with this "
            "method (fst, ...), into one folder per checkpoint under --out."
        ),
    ] = None,
    out: Annotated[Optional[str], typer.Option(help="--purify: where the per-checkpoint folders go.")] = None,
    force: Force = None,
    cache_dir: CacheDir = None,
    retune_check: RetuneCheck = None,
    clean_reference: CleanReference = None,
    retune_poisoned: RetunePoisoned = None,
    retune_epochs: RetuneEpochs = None,
    retune_lr: RetuneLr = None,
    retune_clean_count: RetuneCleanCount = None,
    precision: Precision = None,
    memory_format: MemoryFormat = None,
    config: Config = None,
    json_output: Json = False,
    quiet: Quiet = False,
):
    """Measure clean accuracy and the attack success rate of a trigger, with 95% intervals.

    Given a folder, a glob, several paths or --from-list, one process audits them all on the same
    images: a summary worst ASR first, one row per checkpoint, a bad file costing only its own row.
    Exit code of an audit: the largest of its rows' codes (0 all passed, 1 a gate failed, 2 a file
    unreadable, 3 a pickle refused as unsafe, 4 an internal error).
    """
    # Every option by name (tests/test_flags_fields.py: each maps to one field); --json, --quiet,
    # --cache-dir and --markdown steer the command line itself and stay out.
    flags = {
        "checkpoints": checkpoints,
        "data": data,
        "arch": arch,
        "num_classes": num_classes,
        "head": head,
        "data_dir": data_dir,
        "trigger": trigger,
        "target": target,
        "mean": mean,
        "std": std,
        "device": device,
        "seed": seed,
        "batch_size": batch_size,
        "eval_limit": eval_limit,
        "max_asr": max_asr,
        "min_acc": min_acc,
        "image_size": image_size,
        "from_list": from_list,
        "jsonl": jsonl,
        "shard": shard,
        "purify": purify,
        "out": out,
        "force": force,
        "retune_check": retune_check,
        "clean_reference": clean_reference,
        "retune_poisoned": retune_poisoned,
        "retune_epochs": retune_epochs,
        "retune_lr": retune_lr,
        "retune_clean_count": retune_clean_count,
        "precision": precision,
        "memory_format": memory_format,
        "config": config,
    }
    flags.pop("checkpoints")
    config_path = flags.pop("config") and str(config)
    targets = list(checkpoints or [])
    many = bool(from_list or jsonl or markdown or shard or purify)

    def single():
        from .config import EvaluateOptions, resolve_options
        from .evaluation.cache import open_cache
        from .reports.report import render_evaluate
        from .usecases.audit_targets import is_single_target
        from .usecases.evaluate import evaluate_checkpoint

        if not is_single_target(targets):
            return None
        if out or force:
            raise ConfigError("--out and --force go with --purify (auditing several checkpoints)")
        opts = resolve_options(EvaluateOptions, {**flags, "checkpoint": targets[0]}, config_path)
        report = evaluate_checkpoint(opts, _reporter(quiet, json_output), open_cache(cache_dir))
        _emit(report, json_output, render_evaluate)
        return report

    def audit():
        from .config import AuditOptions, resolve_options
        from .evaluation.cache import open_cache
        from .reports.audit_report import emit_audit
        from .usecases.audit import audit_checkpoints

        if not targets and not from_list:
            raise ConfigError(
                "evaluate needs a checkpoint", hint="a file, a folder of checkpoints, a glob, or --from-list FILE"
            )
        opts = resolve_options(AuditOptions, {**flags, "checkpoints": tuple(targets)}, config_path)
        report = audit_checkpoints(opts, _reporter(quiet, json_output), open_cache(cache_dir))
        emit_audit(report.rows, json_output, markdown, _stdout, report.context())
        return report

    report = None if many else _guard(single)
    if report is not None:
        _exit_for_gates(report.gates)
        return
    code = _guard(audit).exit_code
    if code:
        raise typer.Exit(code)


@app.command()
def merge(
    files: Annotated[List[str], typer.Argument(help="JSONL files written by `evaluate DIR --jsonl` (one per shard).")],
    jsonl: Annotated[Optional[str], typer.Option(help="Also write the merged rows to this JSONL file.")] = None,
    markdown: Annotated[bool, typer.Option("--markdown", help="Print a Markdown table.")] = False,
    json_output: Json = False,
):
    """Join the JSONL rows of an audit's shards into one summary (the table one process would print)."""

    def body():
        from .reports.audit_log import AuditLog, merge_rows, read_rows
        from .reports.audit_report import emit_audit

        rows = merge_rows([read_rows(path, strict=True) for path in files])
        if len({row.settings for row in rows}) > 1:
            _stderr().print(
                "warning: these rows were measured with different settings (data, trigger, gates or "
                "version); the table mixes them",
                highlight=False,
                markup=False,
            )
        if jsonl:
            if Path(jsonl).exists():
                raise ConfigError(f"--jsonl {jsonl} exists; merge writes a new file")
            log = AuditLog(jsonl)
            for row in rows:
                log.write(row)
        emit_audit(rows, json_output, markdown, _stdout)
        return rows

    from .reports.audit_log import audit_exit_code  # torch-free

    code = audit_exit_code(_guard(body))
    if code:
        raise typer.Exit(code)


METHOD_HELP = method_help()


@app.command()
def purify(
    checkpoint: Annotated[str, typer.Argument(help="Suspect checkpoint to purify (never modified).")],
    method: Annotated[Optional[str], typer.Option(rich_help_panel="Method", help=METHOD_HELP)] = None,
    data: Data = None,
    out: Out = None,
    arch: Arch = None,
    num_classes: NumClasses = None,
    head: Head = None,
    data_dir: DataDir = None,
    trigger: Trigger = None,
    target: Target = None,
    mean: Mean = None,
    std: Std = None,
    lr: Annotated[
        Optional[float],
        typer.Option(rich_help_panel="Tuning (SGD)", help="Learning rate (default: the paper's for the dataset)."),
    ] = None,
    epochs: Annotated[
        Optional[int],
        typer.Option(rich_help_panel="Tuning (SGD)", help="Tuning epochs (default: the paper's for the dataset)."),
    ] = None,
    alpha: Annotated[
        Optional[float],
        typer.Option(rich_help_panel="Method", help="FST penalty weight (default: the paper's for the dataset)."),
    ] = None,
    distill: Annotated[
        Optional[float],
        typer.Option(
            rich_help_panel="Method",
            help=(
                "fst-kd, ft-kd: weight of the distillation of the input model's clean-data outputs (default 1); "
                "unlearn and the default: on the images not stamped (default 0, and 1 in the default's reruns after a "
                "dormant output; a value given applies to every run)."
            ),
        ),
    ] = None,
    distill_temperature: Annotated[
        Optional[float],
        typer.Option(rich_help_panel="Method", help="fst-kd, ft-kd, unlearn: distillation temperature (default 2)."),
    ] = None,
    rho: Annotated[
        Optional[float],
        typer.Option(
            rich_help_panel="Method",
            help="pam: distance of the gradient point toward the suspect weights "
            "(default 0.5); ft-sam: SAM radius (default 2.0, adaptive).",
        ),
    ] = None,
    label_smoothing: Annotated[
        Optional[float],
        typer.Option(
            rich_help_panel="Method", help="Label smoothing of the tuning loss (ft-sam default 0.1, others 0)."
        ),
    ] = None,
    nad_beta: Annotated[
        Optional[str],
        typer.Option(
            rich_help_panel="Method",
            help="nad: attention-loss weight, one or one per layer, comma-separated (default 500,1000,1000).",
        ),
    ] = None,
    nad_p: Annotated[
        Optional[float], typer.Option(rich_help_panel="Method", help="nad: power p of the attention map (default 2).")
    ] = None,
    nad_layers: Annotated[
        Optional[str],
        typer.Option(
            rich_help_panel="Method",
            help="nad: module paths to distil, comma-separated (default: the end of each of the last three stages).",
        ),
    ] = None,
    clp_u: Annotated[
        Optional[float],
        typer.Option(
            rich_help_panel="Method",
            help="clp: prune channels whose Lipschitz bound is more than U "
            "standard deviations above their layer's mean (default 3).",
        ),
    ] = None,
    teacher_epochs: Annotated[
        Optional[int],
        typer.Option(rich_help_panel="Method", help="nad: epochs of the teacher's fine-tuning (default: --epochs)."),
    ] = None,
    unlearn_fraction: Annotated[
        Optional[float],
        typer.Option(
            rich_help_panel="Method",
            help="unlearn: share of each tuning batch stamped "
            "with the scan's reconstructed trigger, labels kept (default 0.2).",
        ),
    ] = None,
    window_step: Annotated[
        Optional[float],
        typer.Option(
            rich_help_panel="Method",
            help="unlearn: half of the stamped images get the reconstruction's densest window, opaque, with a "
            "pattern moved this far (pixel units) toward the target before each step (default 0.05; 0: stamp "
            "the reconstruction only).",
        ),
    ] = None,
    frozen_depth: Annotated[
        Optional[float],
        typer.Option(
            rich_help_panel="Method",
            help="unlearn: share of the weight layers, first in forward order, held at the input's weights "
            "and BatchNorm statistics when every reconstruction is local, a patch (default 0.667: a CIFAR ResNet's "
            "first two stages; 0: tune every layer).",
        ),
    ] = None,
    scan_steps: Annotated[
        Optional[int],
        typer.Option(
            rich_help_panel="Method",
            help="unlearn: the trigger inversion's optimisation steps "
            "per class at most (default 120; fewer is faster and finds less).",
        ),
    ] = None,
    precaution: Annotated[
        bool,
        typer.Option(
            "--precaution",
            rich_help_panel="Method",
            help="unlearn: when the scan flags no class, unlearn the class with the smallest trigger anyway "
            "(a backdoor below the flagging threshold; costs about 3 points of C-Acc on a clean CIFAR-10 "
            "ResNet-20). Without it such a model is left unchanged.",
        ),
    ] = False,
    d3_lambda: Annotated[
        Optional[float],
        typer.Option(
            rich_help_panel="Method",
            help="d3: weight of the clean-loss hinge against the distance from the original head (default 10).",
        ),
    ] = None,
    d3_eps: Annotated[
        Optional[float],
        typer.Option(rich_help_panel="Method", help="d3: per-image clean-loss budget of the hinge (default 0.1)."),
    ] = None,
    sau_eps: Annotated[
        Optional[float],
        typer.Option(
            rich_help_panel="Method",
            help="sau: L-inf radius of the shared adversarial examples, in [0, 1] pixel units (default 0.2).",
        ),
    ] = None,
    sau_steps: Annotated[
        Optional[int], typer.Option(rich_help_panel="Method", help="sau: PGD steps per batch (default 5).")
    ] = None,
    sau_lambda: Annotated[
        Optional[str],
        typer.Option(
            rich_help_panel="Method",
            help="sau: weights of the clean loss, the adversarial "
            "loss and the shared unlearning term, comma-separated "
            "(default 1,0,1).",
        ),
    ] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Tuning batch size (default 128).")] = None,
    eval_batch_size: Annotated[
        Optional[int],
        typer.Option(rich_help_panel="Compute", help="Evaluation batch size (default: 128 on CPU, 1024 on CUDA)."),
    ] = None,
    momentum: Annotated[
        Optional[float], typer.Option(rich_help_panel="Tuning (SGD)", help="SGD momentum (default 0.9).")
    ] = None,
    weight_decay: Annotated[
        Optional[float], typer.Option(rich_help_panel="Tuning (SGD)", help="Weight decay (default 0).")
    ] = None,
    augment: Annotated[
        Optional[bool],
        typer.Option(
            "--augment/--no-augment",
            rich_help_panel="Tuning (SGD)",
            help="Random crop + flip "
            "while tuning (flip only where it keeps the label). Default: from the data: none for "
            "single-channel images (digits), both for colour images.",
        ),
    ] = None,
    clean_fraction: Annotated[
        Optional[float],
        typer.Option(rich_help_panel="Model and data", help="Fraction of the training split used as clean data."),
    ] = None,
    clean_count: Annotated[
        Optional[int],
        typer.Option(rich_help_panel="Model and data", help="Number of clean training images (class-balanced)."),
    ] = None,
    clean_data: Annotated[
        Optional[str],
        typer.Option(rich_help_panel="Model and data", help="Your own clean images (image folders or npz)."),
    ] = None,
    holdout_fraction: Annotated[
        Optional[float],
        typer.Option(
            rich_help_panel="Selection by held-out images",
            help="Hold this fraction of the clean images out of "
            "tuning and report their accuracy after every epoch "
            "(default 0.2 for the default method, which measures its "
            "removal on them; 0 with --method).",
        ),
    ] = None,
    select: Annotated[
        Optional[str],
        typer.Option(
            rich_help_panel="Selection by held-out images",
            help="What is kept, decided by the held-out images only (never the "
            "test set or the trigger): last (the last epoch), epoch (the latest "
            "epoch within --select-budget), path (the point nearest the purified "
            "model on the line back to the input within --select-budget). "
            "Default: last for the default method; with --method, epoch "
            "when --select-budget and --holdout-fraction are given, else last.",
        ),
    ] = None,
    select_budget: Annotated[
        Optional[str],
        typer.Option(
            rich_help_panel="Selection by held-out images",
            help="Held-out accuracy the selection may give up, as a "
            "fraction or a percentage (default 3%). Not the test-set "
            "gate: that is --max-acc-drop.",
        ),
    ] = None,
    path_floor: Annotated[
        Optional[float],
        typer.Option(
            rich_help_panel="Selection by held-out images",
            help="--select path: the smallest t considered (1 = the tuned "
            "model, 0 = the input). Lower keeps more accuracy and risks "
            "more of the backdoor (default 0.8; docs/purification.md).",
        ),
    ] = None,
    output_kind: Annotated[
        Optional[str],
        typer.Option(
            rich_help_panel="Model and data",
            help="What the model returns: logits, probs, log-probs, or auto (default: detected from a probe batch).",
        ),
    ] = None,
    device: Device = None,
    seed: Seed = None,
    eval_limit: EvalLimit = None,
    require_verified: Annotated[
        Optional[bool],
        typer.Option(
            "--require-verified",
            rich_help_panel="Gates (exit 1 when one fails)",
            help="Exit 1 unless the removal verdict is verified: the "
            "trigger worked on the input and no longer works (the "
            "verdict and its evidence are in every report).",
        ),
    ] = None,
    max_asr: MaxAsr = None,
    min_acc: MinAcc = None,
    max_acc_drop: MaxAccDrop = None,
    image_size: ImageSize = None,
    retune_check: RetuneCheck = None,
    clean_reference: CleanReference = None,
    retune_poisoned: RetunePoisoned = None,
    retune_epochs: RetuneEpochs = None,
    retune_lr: RetuneLr = None,
    precision: Precision = None,
    memory_format: MemoryFormat = None,
    force: Force = None,
    cache_dir: CacheDir = None,
    config: Config = None,
    json_output: Json = False,
    quiet: Quiet = False,
):
    """Remove a backdoor by tuning on clean data; write purified weights and a report to --out."""
    # Every option by name (tests/test_flags_fields.py: each maps to one field); --json, --quiet,
    # --cache-dir and --markdown steer the command line itself and stay out.
    flags = {
        "checkpoint": checkpoint,
        "method": method,
        "data": data,
        "out": out,
        "arch": arch,
        "num_classes": num_classes,
        "head": head,
        "data_dir": data_dir,
        "trigger": trigger,
        "target": target,
        "mean": mean,
        "std": std,
        "lr": lr,
        "epochs": epochs,
        "alpha": alpha,
        "distill": distill,
        "distill_temperature": distill_temperature,
        "rho": rho,
        "label_smoothing": label_smoothing,
        "nad_beta": nad_beta,
        "nad_p": nad_p,
        "nad_layers": nad_layers,
        "clp_u": clp_u,
        "unlearn_fraction": unlearn_fraction,
        "window_step": window_step,
        "frozen_depth": frozen_depth,
        "scan_steps": scan_steps,
        "precaution": precaution or None,
        "teacher_epochs": teacher_epochs,
        "d3_lambda": d3_lambda,
        "d3_eps": d3_eps,
        "sau_eps": sau_eps,
        "sau_steps": sau_steps,
        "sau_lambda": sau_lambda,
        "batch_size": batch_size,
        "eval_batch_size": eval_batch_size,
        "momentum": momentum,
        "weight_decay": weight_decay,
        "augment": augment,
        "clean_fraction": clean_fraction,
        "clean_count": clean_count,
        "clean_data": clean_data,
        "holdout_fraction": holdout_fraction,
        "select": select,
        "select_budget": select_budget,
        "path_floor": path_floor,
        "output_kind": output_kind,
        "device": device,
        "seed": seed,
        "eval_limit": eval_limit,
        "require_verified": require_verified,
        "max_asr": max_asr,
        "min_acc": min_acc,
        "max_acc_drop": max_acc_drop,
        "image_size": image_size,
        "retune_check": retune_check,
        "clean_reference": clean_reference,
        "retune_poisoned": retune_poisoned,
        "retune_epochs": retune_epochs,
        "retune_lr": retune_lr,
        "precision": precision,
        "memory_format": memory_format,
        "force": force,
        "config": config,
    }

    def body():
        from .config import PurifyOptions, resolve_options
        from .evaluation.cache import open_cache
        from .reports.report import render_purify
        from .usecases.purify import purify_checkpoint

        opts = resolve_options(PurifyOptions, flags, flags.pop("config") and str(config))
        report = purify_checkpoint(opts, _reporter(quiet, json_output), open_cache(cache_dir))
        _emit(report, json_output, render_purify)
        return report

    report = _guard(body)
    _exit_for_gates(report.gates)


@app.command()
def compare(
    checkpoints: Annotated[
        Optional[List[str]],
        typer.Argument(help="Two or more checkpoints (files, folders of checkpoints, globs).", show_default=False),
    ] = None,
    data: Data = None,
    arch: Arch = None,
    num_classes: NumClasses = None,
    head: Head = None,
    data_dir: DataDir = None,
    trigger: Trigger = None,
    target: Target = None,
    mean: Mean = None,
    std: Std = None,
    reference: Annotated[
        Optional[str],
        typer.Option(help="Checkpoint that DER and weight drift are measured against (default: the first)."),
    ] = None,
    device: Device = None,
    seed: Seed = None,
    batch_size: Annotated[
        Optional[int], typer.Option(help="Evaluation batch size (default: 128 on CPU, 1024 on CUDA).")
    ] = None,
    eval_limit: EvalLimit = None,
    max_asr: MaxAsr = None,
    min_acc: MinAcc = None,
    max_acc_drop: MaxAccDrop = None,
    image_size: ImageSize = None,
    precision: Precision = None,
    memory_format: MemoryFormat = None,
    markdown: Annotated[bool, typer.Option("--markdown", help="Print a Markdown table.")] = False,
    from_list: FromList = None,
    path: Annotated[
        Optional[int],
        typer.Option(
            help="Linear-path diagnostic: C-Acc and ASR of the models at N evenly "
            "spaced points on the straight line from the first checkpoint to the "
            "second (same architecture)."
        ),
    ] = None,
    path_plot: Annotated[Optional[str], typer.Option(help="--path: also draw it to this PNG file.")] = None,
    retune_check: RetuneCheck = None,
    clean_reference: CleanReference = None,
    retune_poisoned: RetunePoisoned = None,
    retune_epochs: RetuneEpochs = None,
    retune_lr: RetuneLr = None,
    retune_clean_count: RetuneCleanCount = None,
    force: Force = None,
    config: Config = None,
    json_output: Json = False,
    quiet: Quiet = False,
):
    """Put several checkpoints side by side on the same data and trigger."""
    # Every option by name (tests/test_flags_fields.py: each maps to one field); --json, --quiet,
    # --cache-dir and --markdown steer the command line itself and stay out.
    flags = {
        "checkpoints": checkpoints,
        "data": data,
        "arch": arch,
        "num_classes": num_classes,
        "head": head,
        "data_dir": data_dir,
        "trigger": trigger,
        "target": target,
        "mean": mean,
        "std": std,
        "reference": reference,
        "device": device,
        "seed": seed,
        "batch_size": batch_size,
        "eval_limit": eval_limit,
        "max_asr": max_asr,
        "min_acc": min_acc,
        "max_acc_drop": max_acc_drop,
        "image_size": image_size,
        "precision": precision,
        "memory_format": memory_format,
        "from_list": from_list,
        "path": path,
        "path_plot": path_plot,
        "retune_check": retune_check,
        "clean_reference": clean_reference,
        "retune_poisoned": retune_poisoned,
        "retune_epochs": retune_epochs,
        "retune_lr": retune_lr,
        "retune_clean_count": retune_clean_count,
        "force": force,
        "config": config,
    }

    def body():
        from .config import CompareOptions, resolve_options
        from .usecases.audit_targets import expand_in_order

        flags["checkpoints"] = tuple(expand_in_order(list(checkpoints or []), flags.pop("from_list")))
        from .reports.report import compare_markdown, render_compare
        from .usecases.compare import compare_checkpoints

        opts = resolve_options(CompareOptions, flags, flags.pop("config") and str(config))
        if opts.path is not None:
            return _trace_path(opts, markdown, json_output, quiet)
        if opts.path_plot:
            from .errors import ConfigError

            raise ConfigError("--path-plot needs --path N")
        report = compare_checkpoints(opts, _reporter(quiet, json_output))
        if markdown and not json_output:
            sys.stdout.write(compare_markdown(report))
        else:
            _emit(report, json_output, render_compare)
        return report

    report = _guard(body)
    _exit_for_gates([g for row in getattr(report, "rows", []) for g in row.gates])


def _trace_path(opts, markdown: bool, json_output: bool, quiet: bool):
    from .selection.linear_path import path_markdown, render_path
    from .usecases.compare import trace_linear_path

    report = trace_linear_path(opts, _reporter(quiet, json_output))
    if markdown and not json_output:
        sys.stdout.write(path_markdown(report.points, opts.checkpoints[0], opts.checkpoints[1]))
    else:
        _emit(report, json_output, render_path)
    return report


@app.command()
def scan(
    checkpoint: Annotated[str, typer.Argument(help="Checkpoint to scan (never modified).")],
    data: Data = None,
    out: Annotated[
        Optional[str],
        typer.Option(
            help="Directory for the reconstructed trigger of "
            "each flagged class (preview PNG, pattern and "
            "mask PNGs, a --trigger spec YAML) and scan.json."
        ),
    ] = None,
    arch: Arch = None,
    num_classes: NumClasses = None,
    head: Head = None,
    data_dir: DataDir = None,
    mean: Mean = None,
    std: Std = None,
    device: Device = None,
    seed: Seed = None,
    image_size: ImageSize = None,
    clean_count: Annotated[
        Optional[int],
        typer.Option(
            rich_help_panel="Model and data",
            help="Number of clean training images the scan uses (class-balanced; default 200).",
        ),
    ] = None,
    clean_fraction: Annotated[
        Optional[float],
        typer.Option(
            rich_help_panel="Model and data",
            help="Fraction of the training split the scan uses, instead of --clean-count.",
        ),
    ] = None,
    clean_data: Annotated[
        Optional[str],
        typer.Option(
            rich_help_panel="Model and data",
            help="Your own clean images (image folders or npz) instead of the training split.",
        ),
    ] = None,
    steps: Annotated[
        Optional[int],
        typer.Option(
            help="Optimisation steps per class at most (default 120; stops earlier once the mask stops shrinking)."
        ),
    ] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Clean images per optimisation step (default 32).")] = None,
    anomaly_threshold: Annotated[
        Optional[float],
        typer.Option(help="Flag a class whose anomaly index exceeds this (default 2, Neural Cleanse's)."),
    ] = None,
    output_kind: Annotated[
        Optional[str],
        typer.Option(
            rich_help_panel="Model and data",
            help="What the model returns: logits, probs, log-probs, or auto (default).",
        ),
    ] = None,
    fail_on_detect: Annotated[
        Optional[bool],
        typer.Option(
            "--fail-on-detect",
            help="Gate: exit 1 if a backdoor is suspected (a flagged class the --clean-reference, if given, does "
            "not follow too).",
        ),
    ] = None,
    clean_reference: Annotated[
        Optional[str],
        typer.Option(
            rich_help_panel="Model and data",
            help="A clean model of the same task (a bdclean .safetensors loads as it records, any other with the model's --arch/--mean/--std; `bdclean convert` writes one), "
            "`bundled` (bdclean's own for the built-in cifar10; `bundled:cifar10` for your own CIFAR-10 images) or `none`: "
            "each flagged class's reconstructed trigger is applied to it, and a class it follows too (>= 35% of its "
            "images) is a shortcut of the data, not a planted trigger. Unset: the bundled reference when the data is "
            "the built-in cifar10; tried on 32x32 colour images in 10 classes of another name (used only if it gets "
            "at least half of their labels right).",
        ),
    ] = None,
    force: Force = None,
    config: Config = None,
    cache_dir: ScanCacheDir = None,
    json_output: Json = False,
    quiet: Quiet = False,
):
    """Look for a backdoor without knowing its trigger: invert a trigger per class, flag outliers."""
    # Every option by name (tests/test_flags_fields.py: each maps to one field); --json, --quiet,
    # --cache-dir and --markdown steer the command line itself and stay out.
    flags = {
        "checkpoint": checkpoint,
        "data": data,
        "out": out,
        "arch": arch,
        "num_classes": num_classes,
        "head": head,
        "data_dir": data_dir,
        "mean": mean,
        "std": std,
        "device": device,
        "seed": seed,
        "image_size": image_size,
        "clean_count": clean_count,
        "clean_fraction": clean_fraction,
        "clean_data": clean_data,
        "steps": steps,
        "batch_size": batch_size,
        "anomaly_threshold": anomaly_threshold,
        "output_kind": output_kind,
        "fail_on_detect": fail_on_detect,
        "clean_reference": clean_reference,
        "force": force,
        "config": config,
    }

    def body():
        from .config import ScanOptions, resolve_options
        from .reports.scan_report import render_scan
        from .scanning.cache import open_scan_cache
        from .usecases.scan import scan_checkpoint

        opts = resolve_options(ScanOptions, flags, flags.pop("config") and str(config))
        report = scan_checkpoint(opts, _reporter(quiet, json_output), open_scan_cache(cache_dir))
        _emit(report, json_output, render_scan)
        return opts, report

    opts, report = _guard(body)
    if opts.fail_on_detect and report.suspected:
        _stderr().print(
            f"[bold red]gate fail-on-detect FAILED: class(es) {', '.join(map(str, report.suspected))} "
            "flagged[/bold red]",
            highlight=False,
        )
        raise typer.Exit(EXIT_GATE)


@app.command()
def train(
    data: Data = None,
    out: Out = None,
    arch: Annotated[
        Optional[str],
        typer.Option(help="Architecture to train (default simple_cnn; with --init, the starting checkpoint's)."),
    ] = None,
    init: Annotated[
        Optional[str],
        typer.Option(
            help="Start from this checkpoint's weights (fine-tune it, e.g. to "
            "poison a published clean model) instead of a fresh model."
        ),
    ] = None,
    data_dir: DataDir = None,
    trigger: Trigger = None,
    target: Target = None,
    poison_rate: Annotated[
        Optional[float], typer.Option(help="Fraction of training images poisoned (dirty label).")
    ] = None,
    epochs: Annotated[Optional[int], typer.Option(rich_help_panel="Tuning (SGD)", help="Epochs (default 6).")] = None,
    lr: Annotated[
        Optional[float],
        typer.Option(rich_help_panel="Tuning (SGD)", help="Peak learning rate, cosine schedule (default 0.05)."),
    ] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Batch size (default 128).")] = None,
    eval_batch_size: Annotated[
        Optional[int],
        typer.Option(rich_help_panel="Compute", help="Evaluation batch size (default: 128 on CPU, 1024 on CUDA)."),
    ] = None,
    momentum: Annotated[
        Optional[float], typer.Option(rich_help_panel="Tuning (SGD)", help="SGD momentum (default 0.9).")
    ] = None,
    weight_decay: Annotated[
        Optional[float], typer.Option(rich_help_panel="Tuning (SGD)", help="Weight decay (default 5e-4).")
    ] = None,
    augment: Annotated[
        Optional[bool],
        typer.Option(
            "--augment/--no-augment",
            rich_help_panel="Tuning (SGD)",
            help="Random crop + flip while training (default off: short runs then miss the backdoor).",
        ),
    ] = None,
    stamp_after_augment: Annotated[
        Optional[bool],
        typer.Option(
            "--stamp-after-augment",
            rich_help_panel="Tuning (SGD)",
            help="With --augment: keep the poisoned images clean and stamp the trigger on them in each batch "
            "after crop + flip, so it never moves (default: stamped once, then augmented with the image).",
        ),
    ] = None,
    warmup_epochs: Annotated[
        Optional[float],
        typer.Option(
            rich_help_panel="Tuning (SGD)",
            help="Raise the rate linearly from near 0 to --lr over this many epochs' steps (default 0: none), "
            "then follow the cosine schedule: for training from scratch at a high rate.",
        ),
    ] = None,
    holdout_fraction: Annotated[
        Optional[float],
        typer.Option(
            rich_help_panel="Selection by held-out images",
            help="Keep this fraction of the training split out of training (indices saved in the metadata).",
        ),
    ] = None,
    train_limit: Annotated[Optional[int], typer.Option(help="Train on a stratified subset of N images.")] = None,
    mean: Mean = None,
    std: Std = None,
    device: Device = None,
    seed: Seed = None,
    image_size: ImageSize = None,
    precision: Precision = None,
    memory_format: MemoryFormat = None,
    force: Force = None,
    config: Config = None,
    json_output: Json = False,
    quiet: Quiet = False,
):
    """Train a model, optionally backdoored, and save it as safetensors with metadata."""
    # Every option by name (tests/test_flags_fields.py: each maps to one field); --json, --quiet,
    # --cache-dir and --markdown steer the command line itself and stay out.
    flags = {
        "data": data,
        "out": out,
        "arch": arch,
        "init": init,
        "data_dir": data_dir,
        "trigger": trigger,
        "target": target,
        "poison_rate": poison_rate,
        "epochs": epochs,
        "lr": lr,
        "batch_size": batch_size,
        "eval_batch_size": eval_batch_size,
        "momentum": momentum,
        "weight_decay": weight_decay,
        "augment": augment,
        "stamp_after_augment": stamp_after_augment,
        "warmup_epochs": warmup_epochs,
        "holdout_fraction": holdout_fraction,
        "train_limit": train_limit,
        "mean": mean,
        "std": std,
        "device": device,
        "seed": seed,
        "image_size": image_size,
        "precision": precision,
        "memory_format": memory_format,
        "force": force,
        "config": config,
    }

    def body():
        from .config import TrainOptions, resolve_options
        from .reports.report import render_train
        from .usecases.training import train_model

        opts = resolve_options(TrainOptions, flags, flags.pop("config") and str(config))
        report = train_model(opts, _reporter(quiet, json_output))
        _emit(report, json_output, render_train)

    _guard(body)


@app.command()
def convert(
    checkpoint: Annotated[str, typer.Argument(help="Checkpoint to convert (never modified).")],
    data: Data = None,
    out: Annotated[
        Optional[str],
        typer.Option(
            rich_help_panel="Output",
            help="The .safetensors file to write (default: INPUT-STEM.bdclean.safetensors here).",
        ),
    ] = None,
    arch: Arch = None,
    num_classes: NumClasses = None,
    head: Head = None,
    data_dir: DataDir = None,
    mean: Mean = None,
    std: Std = None,
    image_size: ImageSize = None,
    eval_limit: Annotated[
        Optional[int],
        typer.Option(
            rich_help_panel="Model and data",
            help="Check the conversion on a seeded, stratified subset of N test images (default 2000).",
        ),
    ] = None,
    batch_size: Annotated[
        Optional[int],
        typer.Option(rich_help_panel="Compute", help="Evaluation batch size (default: 128 on CPU, 1024 on CUDA)."),
    ] = None,
    min_acc: Annotated[
        Optional[str],
        typer.Option(
            rich_help_panel="Gates (exit 1 when one fails)",
            help="Write only if clean accuracy is at least this (0.9 or 90%); exit 1 otherwise. Default: refuse "
            "a model at chance level (wrong --arch/--mean/--std).",
        ),
    ] = None,
    device: Device = None,
    seed: Seed = None,
    force: Force = None,
    config: Config = None,
    json_output: Json = False,
    quiet: Quiet = False,
):
    """Write a checkpoint as a bdclean .safetensors that records its own architecture and normalisation, checked
    on the test split and read back before it is written (e.g. a clean model of another architecture for
    --clean-reference)."""
    flags = {
        "checkpoint": checkpoint,
        "data": data,
        "out": out,
        "arch": arch,
        "num_classes": num_classes,
        "head": head,
        "data_dir": data_dir,
        "mean": mean,
        "std": std,
        "image_size": image_size,
        "eval_limit": eval_limit,
        "batch_size": batch_size,
        "min_acc": min_acc,
        "device": device,
        "seed": seed,
        "force": force,
        "config": config,
    }

    def body():
        from .config import ConvertOptions, resolve_options
        from .reports.convert_report import render_convert
        from .usecases.conversion import convert_checkpoint

        opts = resolve_options(ConvertOptions, flags, flags.pop("config") and str(config))
        report = convert_checkpoint(opts, _reporter(quiet, json_output))
        _emit(report, json_output, render_convert)
        _exit_for_gates(report.gates)

    _guard(body)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Where the demo writes everything.")] = Path("bdclean-demo"),
    force: Annotated[bool, typer.Option("--force", help="Replace an earlier demo's outputs.")] = True,
    device: Device = None,
    quiet: Quiet = False,
):
    """Offline demo on a bundled MNIST sample: backdoor a model, purify it with FT, FST and the default, compare."""

    def body():
        from .usecases.demo import run_demo

        run_demo(out, force=force, device=device or "auto", console=_stdout(), reporter=_reporter(quiet, False))

    _guard(body)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
