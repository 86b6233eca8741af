"""Run options as frozen dataclasses: YAML (`--config`, safe_load) + flag overrides + validation.

Precedence: a flag given on the command line > the same key in `--config` > the dataclass default.
YAML keys use the flag names with either dashes or underscores (`clean-fraction` or `clean_fraction`).
Unknown keys and wrong types are errors that name the key: a typo must not silently fall back to
a default in a security tool.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path

from .data.imagefolder import MAX_IMAGE_SIDE
from .errors import ConfigError

MAX_CONFIG_BYTES = 1024 * 1024
# Gate thresholds (and the selection's budget) accept a fraction (0.05) or a percentage string ("5%")
# from flags and YAML alike.
GATE_OPTIONS = ("max_asr", "min_acc", "max_acc_drop", "select_budget")
IMAGE_SIZE_OPTION = "image_size"  # one side (224: a square) or height,width; each in [2, MAX_IMAGE_SIDE]
# Allowed ranges, checked where values enter (flag or YAML), so a bad value fails in a second, naming
# its option, instead of deep inside torch after minutes of work: name -> (low, high, low_open, high_open).
# Declared once: the library's own parameter dataclasses (defenses.DefenseParams, retune.RetuneSettings)
# check themselves against this table too (check_fields). For a list option, each item is checked.
MAX_SEED = 2**63 - 1
RANGES: dict[str, tuple] = {
    "batch_size": (1, 65_536, False, False),
    "eval_batch_size": (1, 1 << 20, False, False),
    "eval_limit": (1, None, False, False),
    "seed": (0, MAX_SEED, False, False),
    "epochs": (1, 10_000, False, False),
    "clean_count": (1, None, False, False),
    "num_classes": (2, 100_000, False, False),
    "target": (0, None, False, False),
    "train_limit": (1, None, False, False),
    "lr": (0, 10, True, False),
    "alpha": (0, None, False, False),
    "momentum": (0, 1, False, True),
    "weight_decay": (0, None, False, False),
    "clean_fraction": (0, 1, True, False),
    "poison_rate": (0, 1, False, False),
    "holdout_fraction": (0, 1, False, True),
    "rho": (0, 100, False, False),
    "label_smoothing": (0, 1, False, True),
    "nad_p": (0, 16, True, False),
    "teacher_epochs": (1, 10_000, False, False),
    "clp_u": (0, 100, False, False),
    "unlearn_fraction": (0, 1, True, True),
    "window_step": (0, 1, False, False),
    "frozen_depth": (0, 1, False, True),
    "d3_lambda": (0, 1e6, True, False),
    "d3_eps": (0, 100, False, False),
    "sau_eps": (0, 1, True, False),
    "sau_steps": (1, 100, False, False),
    "path_floor": (0, 1, False, False),
    "retune_poisoned": (1, 100_000, False, False),
    "retune_epochs": (1, 1000, False, False),
    "retune_lr": (0, 10, True, False),
    "retune_clean_count": (1, None, False, False),
    "steps": (1, 100_000, False, False),
    "scan_steps": (1, 100_000, False, False),
    "anomaly_threshold": (0, None, True, False),
    "distill": (0, 1000, False, False),
    "distill_temperature": (0, 100, True, False),
    "nad_beta": (0, 1e6, False, False),
    "sau_lambda": (0, 1e6, False, False),
}

# Options that take one of a few words; checked where values enter, like the ranges.
CHOICES: dict[str, tuple[str, ...]] = {
    "precision": ("auto", "fp32", "bf16"),  # precision.resolve_precision
    "memory_format": ("auto", "timed", "channels_last", "contiguous"),  # precision.choose_memory_format
    "select": ("last", "epoch", "path"),  # recipe.SELECTIONS
}


@dataclass(frozen=True)
class ModelOptions:
    checkpoint: str = ""
    arch: str | None = None
    num_classes: int | None = None
    head: str | None = None


@dataclass(frozen=True)
class SubjectOptions:
    """What every command that opens a checkpoint on a dataset takes (evaluate, purify, compare, scan)."""

    checkpoint: str = ""
    config: str | None = None  # the --config file it came from (an input: never overwritten)
    data: str | None = None
    arch: str | None = None
    num_classes: int | None = None
    head: str | None = None
    data_dir: str | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    device: str = "auto"
    seed: int = 0
    image_size: tuple[int, int] | None = None  # (height, width); image folders are resized + centre-cropped


@dataclass(frozen=True)
class EvaluateOptions(SubjectOptions):
    trigger: str | None = None
    target: int | None = None
    batch_size: int | None = None  # evaluation batch (None: 128 on CPU, 1024 on CUDA; evaluate.EVAL_BATCH)
    eval_limit: int | None = None
    max_asr: float | None = None
    min_acc: float | None = None
    retune_check: bool = False  # retune a copy with a few poisoned images and report its ASR (verdicts/retune.py)
    clean_reference: str | None = None  # a clean model given the same retuning, for the verdict
    retune_poisoned: int = 5
    retune_epochs: int = 5
    retune_lr: float = 0.01
    retune_clean_count: int | None = None  # evaluate/compare: clean images for the check (default: purify's default)
    precision: str = "auto"  # fp32 | bf16 | auto (bf16 where the device has it natively; precision.py)
    memory_format: str = (
        "auto"  # auto (channels_last, untimed) | timed (on CPU, at start-up) | channels_last | contiguous
    )


@dataclass(frozen=True)
class PurifyOptions(EvaluateOptions):
    method: str | None = (
        None  # None: the default, scan -> unlearn -> verify (selection/recipe.py); a name runs that method as published
    )
    out: str | None = None
    force: bool = False
    lr: float | None = None
    epochs: int | None = None
    alpha: float | None = None
    batch_size: int = 128
    eval_batch_size: int | None = None  # None: 128 on CPU, 1024 on CUDA (evaluate.EVAL_BATCH)
    momentum: float = 0.9
    weight_decay: float = 0.0
    augment: bool | None = None  # None: decided from the data (data/augmentation.py)
    clean_fraction: float | None = None
    clean_count: int | None = None
    clean_data: str | None = None
    max_acc_drop: float | None = None
    output_kind: str = "auto"  # logits | probs | log-probs | auto (models.output_kind)
    holdout_fraction: float | None = None  # clean data kept out of tuning (None: 0.2 for the recipe, 0 for a --method)
    select: str | None = None  # last | epoch | path (None: the recipe's; recipe.resolve_recipe)
    path_floor: float | None = None  # the path selection's smallest t (None: path_select.FLOOR)
    select_budget: float | None = None  # held-out accuracy the selection may give up (None: recipe.DEFAULT_BUDGET)
    require_verified: bool = False  # gate: exit 1 unless the removal verdict is `verified` (verdicts/removal.py)
    distill: float | None = None  # fst-kd: weight of the distillation term (default in defenses/distill.py)
    distill_temperature: float | None = None  # fst-kd: its softmax temperature
    rho: float | None = None  # pam / ft-sam: perturbation radius (default: the method's)
    label_smoothing: float | None = None  # ft-sam (default 0.1)
    nad_beta: tuple[float, ...] | None = None  # nad: attention-loss weight(s)
    nad_p: float | None = None  # nad: attention-map power (default 2)
    nad_layers: tuple[str, ...] | None = None  # nad: layers to distil (default: the end of each stage)
    teacher_epochs: int | None = None  # nad: teacher fine-tuning epochs (default: --epochs)
    clp_u: float | None = None  # clp: the outlier threshold u (default 3)
    unlearn_fraction: float | None = None  # unlearn: share of each batch stamped with the reconstructed trigger (0.2)
    window_step: float | None = None  # unlearn: step of the pattern searched in the trigger's window (0.05; 0 off)
    frozen_depth: float | None = None  # unlearn: share of the weight layers held for a local trigger (2/3; 0 none)
    # unlearn: the trigger inversion's steps per class at most (scan.InversionParams: 120)
    scan_steps: int | None = None
    precaution: bool = False  # unlearn: with no class flagged, unlearn the smallest-mask class anyway (scan_guided.py)
    d3_lambda: float | None = None  # d3: weight of the clean-loss hinge (default 10)
    d3_eps: float | None = None  # d3: the hinge's clean-loss budget (default 0.1)
    sau_eps: float | None = None  # sau: L-inf radius of the adversarial examples, pixel units (default 0.2)
    sau_steps: int | None = None  # sau: PGD steps per batch (default 5)
    sau_lambda: tuple[float, ...] | None = (
        None  # sau: clean CE, adversarial CE, shared unlearning weights (default 1,0,1)
    )


@dataclass(frozen=True)
class CompareOptions(EvaluateOptions):
    checkpoints: tuple[str, ...] = ()
    reference: str | None = None
    max_acc_drop: float | None = None
    path: int | None = None  # the linear-path diagnostic: this many points from the first checkpoint to the second
    path_plot: str | None = None  # its PNG
    force: bool = False


@dataclass(frozen=True)
class AuditOptions(EvaluateOptions):
    """`evaluate` over many checkpoints (runs/audit.py): the evaluation settings plus where the list comes
    from, where rows go, which shard this process takes, and what to do with a checkpoint that fails."""

    checkpoints: tuple[str, ...] = ()  # files, folders of checkpoints, globs
    from_list: str | None = None  # a file of paths, one a line
    jsonl: str | None = None  # one row per checkpoint, appended as each finishes; resumes from it
    shard: str | None = None  # "I/N" (0-based); default RANK/WORLD_SIZE when set
    purify: str | None = None  # a defense to purify every checkpoint that fails a gate with
    out: str | None = None  # --purify: one folder per checkpoint under it
    force: bool = False


@dataclass(frozen=True)
class ScanOptions(SubjectOptions):
    out: str | None = None  # directory for the reconstructed triggers (PNG + spec YAML per flagged class)
    force: bool = False
    clean_count: int | None = None  # scan images drawn from the training split (default scan.DEFAULT_IMAGES)
    clean_data: str | None = None  # or the user's own clean images
    clean_fraction: float | None = None  # or a fraction of the training split (--clean-fraction)
    steps: int = 120  # optimisation steps per class at most (scan.InversionParams)
    batch_size: int = 32
    anomaly_threshold: float = 2.0
    output_kind: str = "auto"
    fail_on_detect: bool = False
    clean_reference: str | None = None  # a clean model of the task: tells shortcuts of the data from planted triggers


@dataclass(frozen=True)
class ConvertOptions(SubjectOptions):
    """`bdclean convert`: write a checkpoint bdclean can read (with flags) as a bdclean .safetensors that
    records its own architecture and normalisation (usecases/conversion.py)."""

    out: str | None = None  # default: INPUT-STEM.bdclean.safetensors in the current directory
    force: bool = False
    eval_limit: int | None = 2000  # test images the conversion is checked on (stratified)
    batch_size: int | None = None  # evaluation batch (None: 128 on CPU, 1024 on CUDA)
    min_acc: float | None = None  # refuse below this accuracy (default: refuse at chance level)


@dataclass(frozen=True)
class TrainOptions:
    arch: str | None = None  # default simple_cnn; with --init, the starting checkpoint's architecture
    init: str | None = None  # start from this checkpoint's weights (fine-tune) instead of a fresh model
    config: str | None = None  # the --config file it came from (an input: never overwritten)
    data: str | None = None
    data_dir: str | None = None
    out: str | None = None
    force: bool = False
    trigger: str | None = None
    target: int | None = None
    poison_rate: float = 0.0
    epochs: int = 6
    lr: float = 0.05
    batch_size: int = 128
    momentum: float = 0.9
    weight_decay: float = 5e-4
    # Off by default: in a short run, crop+flip moved a corner patch often enough that the backdoor did
    # not take (CIFAR-10, 5% BadNets, 6 epochs: ASR 11.6% with, see docs/results-cpu.md); turn it on
    # (--augment) for long runs, where it improves clean accuracy.
    augment: bool = False
    # With --augment: poisoned images are kept clean and stamped in each batch after crop+flip, so the trigger
    # sits at its place in every step (an attacker who controls the training pipeline, as the planted subjects
    # of BackdoorBench and issue 21). Off: stamped once in the data, then cropped and flipped with the image
    # (an attacker who only supplies images).
    stamp_after_augment: bool = False
    warmup_epochs: float = 0.0  # linear warm-up of the rate over these epochs' steps (tuning.sgd.SgdSettings)
    holdout_fraction: float = 0.0
    train_limit: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    device: str = "auto"
    seed: int = 0
    eval_batch_size: int | None = None  # None: 128 on CPU, 1024 on CUDA (evaluate.EVAL_BATCH)
    image_size: tuple[int, int] | None = None
    precision: str = "auto"
    memory_format: str = "auto"


def load_config_file(path: str | Path) -> dict:
    """Read a YAML mapping with yaml.safe_load (no Python tags, no object construction)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    raw = path.read_bytes()
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path} is over 1 MB; that is not a run configuration")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise ConfigError(
            f"config file {path} is not valid YAML{line}: {getattr(exc, 'problem', None) or exc}"
        ) from None
    except RecursionError:
        raise ConfigError(f"config file {path} is nested too deeply") from None
    except (ValueError, KeyError, AttributeError, TypeError, OverflowError) as exc:
        # safe_load's constructors raise these (not YAMLError) for standard tags with bad values: !!int x
        text = " ".join(str(exc).split())[:120] or type(exc).__name__
        raise ConfigError(f"config file {path} is not valid YAML: bad value ({text})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of option: value, not a {type(data).__name__}")
    return data


def resolve_options(cls, flags: dict, config_path: str | None = None):
    """Build `cls` from flags (None = not given) over the config file over the defaults."""
    names = {f.name: f for f in fields(cls)}
    merged: dict = {}
    if config_path:
        for key, value in load_config_file(config_path).items():
            name = str(key).replace("-", "_")
            if name not in names or name == "config":
                known = ", ".join(sorted(n.replace("_", "-") for n in names))
                raise ConfigError(f"unknown key {key!r} in {config_path}", hint=f"known keys: {known}")
            merged[name] = coerce(name, value, names[name].type, source=f"{config_path}: {key}")
    for name, value in flags.items():
        if value is None:
            continue  # not given
        flag = f"--{name.replace('_', '-')}"
        if name not in names:  # a flag this run has no field for would be dropped without a word: refuse it
            raise ConfigError(f"{flag} does not apply to this run", hint="drop it (see --help for what applies)")
        merged[name] = coerce(name, value, names[name].type, source=flag)
    if config_path and "config" in names:
        merged["config"] = str(config_path)
    try:
        return cls(**merged)
    except TypeError as exc:  # pragma: no cover - guarded by the name check above
        raise ConfigError(str(exc)) from None


def _resolve_type(annotation):
    if isinstance(annotation, str):
        annotation = eval(annotation, {**vars(typing), "tuple": tuple}, {})  # our own annotations only
    return annotation


def coerce(name: str, value, annotation, source: str):
    """Check and convert one value to the field's type and range; bools are not numbers, strings not lists."""
    result = _coerce_type(name, value, annotation, source)
    if name in CHOICES:
        result = _check_choice(name, result, source)
    if name in RANGES:
        for item in result if isinstance(result, tuple) else (result,):
            if isinstance(item, (int, float)) and not isinstance(item, bool):
                check_range(name, item, source)
    return result


def check_fields(values: dict, flags: dict[str, str] | None = None) -> None:
    """Check every value (not None) whose name has a range in RANGES, each item of a tuple too, naming it
    by its flag: `flags` maps a field to its RANGES name where they differ (RetuneSettings.lr is
    --retune-lr)."""
    for field_name, value in values.items():
        name = (flags or {}).get(field_name, field_name)
        if value is None or name not in RANGES:
            continue
        for item in value if isinstance(value, tuple) else (value,):
            check_range(name, item, "--" + name.replace("_", "-"))


def _check_choice(name: str, value: str, source: str) -> str:
    """Case and - or _ do not matter (bf16, BF16; channels-last, channels_last)."""
    text = value.strip().lower().replace("-", "_")
    if text not in CHOICES[name]:
        raise ConfigError(f"{source} must be one of {', '.join(CHOICES[name])}, got {value!r}")
    return text


def check_range(name: str, value: float, source: str) -> None:
    low, high, low_open, high_open = RANGES[name]
    bad_low = low is not None and (value <= low if low_open else value < low)
    bad_high = high is not None and (value >= high if high_open else value > high)
    if bad_low or bad_high:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        span = f"{left}{low}, {high if high is not None else 'inf'}{right}"
        raise ConfigError(f"{source} must be in {span}, got {value}")


def _coerce_type(name: str, value, annotation, source: str):
    if name in GATE_OPTIONS:
        return parse_rate(value, source)
    if name == IMAGE_SIZE_OPTION:
        return parse_image_size(value, source)
    annotation = _resolve_type(annotation)
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce_type(name, value, inner[0], source)
    if origin is tuple:
        item_type = args[0] if args else str
        if isinstance(value, str):
            value = [v for v in value.replace(" ", "").split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: expected a list, got {type(value).__name__}")
        return tuple(_coerce_type(name, v, item_type, source) for v in value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, str) and value.strip().lstrip("-").isdigit():
                return int(value)
            raise ConfigError(f"{source}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"{source}: expected a number, got {value!r}")
        try:
            result = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{source}: expected a number, got {value!r}") from None
        if result != result or result in (float("inf"), float("-inf")):
            raise ConfigError(f"{source}: expected a finite number, got {value!r}")
        return result
    if annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{source}: expected a string, got {type(value).__name__}")
    return value


def parse_image_size(value, source: str) -> tuple[int, int] | None:
    """`224` or `"224"` -> (224, 224); `"224,192"` or [224, 192] -> (224, 192) as (height, width)."""
    if value is None:
        return None
    parts = value.replace(" ", "").split(",") if isinstance(value, str) else value
    if not isinstance(parts, (list, tuple)):
        parts = [parts]
    if len(parts) not in (1, 2) or not all(_is_count(p) for p in parts):
        raise ConfigError(f"{source}: expected N or H,W in pixels, got {value!r}", hint="e.g. --image-size 224")
    sides = tuple(int(p) for p in parts)
    if not all(2 <= side <= MAX_IMAGE_SIDE for side in sides):
        raise ConfigError(f"{source}: each side must be in [2, {MAX_IMAGE_SIDE}], got {value!r}")
    return sides[0], sides[-1]


def _is_count(value) -> bool:
    if isinstance(value, str):
        return value.isascii() and value.isdigit()
    return isinstance(value, int) and not isinstance(value, bool)


def parse_rate(text: str | float | None, option: str) -> float | None:
    """A gate threshold: a fraction in [0, 1] (`0.05`) or a percentage (`5%`)."""
    if text is None:
        return None
    raw = str(text).strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        raise ConfigError(
            f"{option} {raw!r} is not a number", hint="write a fraction like 0.05 or a percentage like 5%"
        ) from None
    if not (0.0 <= value <= 1.0):
        raise ConfigError(
            f"{option} {raw} is out of range", hint="write a fraction in [0, 1] like 0.05, or a percentage like 5%"
        )
    return value


def to_yaml_dict(options) -> dict:
    """The resolved options as plain YAML-friendly values (written to config.yaml beside the outputs)."""
    out = {}
    for key, value in dataclasses.asdict(options).items():
        if key == "config":  # the file it came from is not an option (and would not load back)
            continue
        out[key.replace("_", "-")] = list(value) if isinstance(value, tuple) else value
    return out
