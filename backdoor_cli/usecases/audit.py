"""The audit of many checkpoints in one process (`bdclean evaluate DIR`).

    audit_checkpoints(opts)
      expand the arguments -> take this shard's share -> load the data once -> for each checkpoint:
      hash it -> already in --jsonl with the same settings? reuse the row -> else load, build its
      trigger's evaluation sets (once per distinct trigger), evaluate (or read the evaluation cache),
      gate -> free the model -> append the row -> optionally purify it when it failed a gate

What one process saves over N separate `bdclean evaluate` runs is the start-up (imports), the data
load and the triggered-set construction, paid once instead of N times (benchmarks/bench_audit.py).
A checkpoint that cannot be measured is a row with its error and its exit code, never the end of the
audit; the command's exit code follows audit_log.audit_exit_code.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from ..config import AuditOptions, EvaluateOptions, PurifyOptions, to_yaml_dict
from ..data.datasets import DatasetBundle
from ..defenses import get_defense
from ..errors import BdcleanError, ConfigError, InputError
from ..evaluation.cache import EvalCache, data_fingerprint, eval_key, file_sha256, measured, trigger_fingerprint
from ..evaluation.gates import check_gates
from ..evaluation.measure import EvalSets, build_eval_sets, evaluate_model
from ..precision import PrecisionPlan, resolve_precision
from ..progress import Reporter
from ..reports.audit_log import EXIT_GATE, EXIT_INTERNAL, EXIT_OK, AuditLog, AuditRow, completed, read_rows, sort_rows
from ..runtime import environment, prepare_model, resolve_device, seed_everything
from ..subject import load_subject, normalization_tensors
from .audit_targets import Shard, expand_targets, is_model_dir, parse_shard, select_shard
from .purify import purify_checkpoint

# Evaluation settings that change a row's outcome; a rerun reuses a row only when all of them match.
from .references import check_reference_use
from .setup import check_gate_inputs, describe_data, load_run_data, resolve_trigger

# Evaluation settings that change a row's outcome; a rerun reuses a row only when all of them match.
SETTING_FIELDS = (
    "arch",
    "num_classes",
    "head",
    "trigger",
    "target",
    "mean",
    "std",
    "seed",
    "eval_limit",
    "max_asr",
    "min_acc",
    "image_size",
    "purify",
    "precision",
)


@dataclass
class AuditReport:
    """Every row of this process's share, worst first, and what they were measured with."""

    rows: list[AuditRow]
    settings: str
    shard: Shard | None
    data: dict
    environment: dict
    options: dict

    @property
    def exit_code(self) -> int:
        from ..reports.audit_log import audit_exit_code

        return audit_exit_code(self.rows)

    def context(self) -> dict:
        """What the JSON summary carries beside the rows (audit_report.audit_json)."""
        return {
            "settings": self.settings,
            "shard": str(self.shard) if self.shard else None,
            "data": self.data,
            "environment": self.environment,
            "options": self.options,
        }


@dataclass
class _Run:
    """What every checkpoint of one audit shares: loaded once, then read by each."""

    opts: AuditOptions
    bundle: DatasetBundle
    data_fingerprint: str
    settings: str
    device: torch.device
    cache: EvalCache
    reporter: Reporter
    out_names: dict[str, str]
    sets: dict  # trigger fingerprint -> EvalSets: each distinct trigger's images are built once
    plan: PrecisionPlan  # resolved once for the whole audit


def audit_checkpoints(
    opts: AuditOptions, reporter: Reporter | None = None, cache: EvalCache | None = None, on_row=None
) -> AuditReport:
    """Evaluate every checkpoint of this shard on the same images; `on_row(row)` after each one."""
    reporter = reporter or Reporter()
    everything = expand_targets(list(opts.checkpoints), opts.from_list)
    shard = parse_shard(opts.shard)
    paths = select_shard(everything, shard)
    if opts.retune_check:
        raise ConfigError(
            "--retune-check is not part of an audit of many checkpoints (it tunes a copy of each)",
            hint="run `bdclean compare DIR --retune-check` to check a folder's checkpoints side by side",
        )
    check_reference_use(opts)
    if opts.purify:
        get_defense(opts.purify)  # an unknown method: exit 2 before any work
        if not opts.out:
            raise ConfigError(
                "--purify needs --out", hint="a folder; each purified checkpoint gets its own folder in it"
            )
    device = resolve_device(shard_device(opts.device))
    plan = resolve_precision(opts.precision, device)
    seed_everything(opts.seed)
    reporter.stage(f"auditing {len(paths)} checkpoint(s)" + (f" (shard {shard} of {len(everything)})" if shard else ""))
    reporter.stage(f"loading data {opts.data}")
    bundle, image_size = load_run_data(opts, paths, need_train=False)
    fingerprint = data_fingerprint(bundle.test)
    run = _Run(
        opts,
        bundle,
        fingerprint,
        audit_settings(opts, fingerprint, device),
        device,
        cache or EvalCache(),
        reporter,
        output_names(everything),
        {},
        plan,
    )
    log = AuditLog(opts.jsonl) if opts.jsonl else None
    done = completed(read_rows(opts.jsonl)) if opts.jsonl and Path(opts.jsonl).is_file() else {}
    rows = []
    for number, path in enumerate(paths, 1):
        reporter.stage(f"[{number}/{len(paths)}] {path}")
        row, fresh = _row_for(run, path, done)
        if fresh and log is not None:
            log.write(row)
        if row.error:
            reporter.warn(f"{path}: {row.error}")
        rows.append(row)
        if on_row is not None:
            on_row(row)
    sets = next(iter(run.sets.values()), None)
    data = (
        describe_data(bundle, sets, image_size) if sets is not None else {"name": bundle.name, "source": bundle.source}
    )
    return AuditReport(sort_rows(rows), run.settings, shard, data, environment(device), to_yaml_dict(opts))


def _row_for(run: _Run, path: str, done: dict) -> tuple[AuditRow, bool]:
    """(the row, whether it is new and belongs in the JSONL)."""
    from .. import __version__

    try:
        sha = checkpoint_sha256(path)
    except BdcleanError as exc:
        return AuditRow(path, None, run.settings, exc.exit_code, error=exc.message, bdclean=__version__), True
    prior = done.get((sha, run.settings))
    if prior is not None:
        run.reporter.info("already in the JSONL with these settings: skipped")
        if prior.path == path:
            return prior, False
        return AuditRow.from_dict({**prior.to_dict(), "path": path}), True  # the same bytes under another name
    started = time.perf_counter()
    try:
        row = _measure(run, path, sha)
    except BdcleanError as exc:
        row = AuditRow(path, sha, run.settings, exc.exit_code, error=exc.message)
    except Exception as exc:  # noqa: BLE001 - a bug on one checkpoint must not cost the audit the others
        row = AuditRow(
            path, sha, run.settings, EXIT_INTERNAL, error=f"internal error: {exc.__class__.__name__}: {str(exc)[:300]}"
        )
    release_memory(run.device)  # the model is unreachable now; give its memory back before the next one
    row.seconds, row.rss_mb, row.bdclean = round(time.perf_counter() - started, 3), current_rss_mb(), __version__
    if run.opts.purify and row.exit_code == EXIT_GATE:
        row.purified = _purify(run, path)
        release_memory(run.device)
    return row, True


def _measure(run: _Run, path: str, sha: str) -> AuditRow:
    """Load, evaluate and gate one checkpoint. Its model lives only in this frame, so returning frees it."""
    opts = run.opts
    subject = load_subject(
        path, run.bundle, arch=opts.arch, num_classes=opts.num_classes, head=opts.head, mean=opts.mean, std=opts.std
    )
    for note in subject.notes:
        run.reporter.warn(note)
    trigger = resolve_trigger(opts.trigger, opts.target, subject, run.bundle.test.image_shape, subject.num_classes)
    check_gate_inputs(opts, trigger)
    sets = _sets_for(run, trigger)
    model = prepare_model(subject.model, run.device)
    mean, std = normalization_tensors(subject, run.device)
    precision = run.plan.evaluate
    key = eval_key(
        subject.checkpoint.sha256,
        subject,
        run.data_fingerprint,
        trigger,
        opts.eval_limit,
        opts.seed,
        run.device,
        precision,
    )
    result, cached = measured(
        run.cache,
        key,
        lambda: evaluate_model(model, sets, mean, std, run.device, opts.batch_size, run.reporter, precision),
    )
    gates = check_gates(
        result.asr.value if result.asr else None, result.clean_acc.value, max_asr=opts.max_asr, min_acc=opts.min_acc
    )
    passed = all(g.passed for g in gates)
    described = subject.describe()
    return AuditRow(
        path,
        sha,
        run.settings,
        EXIT_OK if passed else EXIT_GATE,
        architecture=subject.arch,
        format=described["format"],
        num_classes=subject.num_classes,
        trigger=trigger.to_dict() if trigger is not None else None,
        metrics=result.to_dict(),
        gates=[g.to_dict() for g in gates],
        passed=passed,
        cached=cached,
    )


def _sets_for(run: _Run, trigger) -> EvalSets:
    fingerprint = trigger_fingerprint(trigger)
    if fingerprint not in run.sets:
        run.reporter.stage("building the evaluation sets" + (f" for trigger {trigger.spec.type}" if trigger else ""))
        run.sets[fingerprint] = build_eval_sets(
            run.bundle.test, trigger, run.device, run.opts.eval_limit, run.opts.seed
        )
    return run.sets[fingerprint]


def _purify(run: _Run, path: str) -> dict:
    """Purify a checkpoint that failed its gate into OUT/<its name>; the audit's evaluation of it is in
    the cache, so purify does not measure the input again."""
    opts = run.opts
    out = Path(opts.out) / run.out_names[path]
    shared = {f.name: getattr(opts, f.name) for f in fields(EvaluateOptions) if f.name not in ("batch_size", "config")}
    purify_opts = PurifyOptions(
        **{**shared, "checkpoint": path},
        method=opts.purify,
        out=str(out),
        force=opts.force,
        eval_batch_size=opts.batch_size,
    )
    run.reporter.stage(f"purifying {path} with {opts.purify} into {out}")
    try:
        report = purify_checkpoint(purify_opts, run.reporter, run.cache)
    except BdcleanError as exc:
        return {"method": opts.purify, "out": str(out), "exit_code": exc.exit_code, "error": exc.message}
    except Exception as exc:  # noqa: BLE001
        return {
            "method": opts.purify,
            "out": str(out),
            "exit_code": EXIT_INTERNAL,
            "error": f"internal error: {exc.__class__.__name__}: {str(exc)[:300]}",
        }
    passed = all(g.passed for g in report.gates)
    return {
        "method": opts.purify,
        "out": str(out),
        "exit_code": EXIT_OK if passed else EXIT_GATE,
        "error": None,
        "after": report.after.to_dict(),
        "der": report.der,
        "gates": [g.to_dict() for g in report.gates],
        "passed": passed,
    }


def checkpoint_sha256(path: str) -> str:
    """The file's sha256 (what `evaluate` reports); for a model directory, a hash over its files'
    relative names and sha256s, so editing its config.json counts as a different checkpoint."""
    target = Path(path)
    if not target.exists():
        raise InputError(f"checkpoint not found: {path}")
    try:
        if not is_model_dir(target):
            if target.is_dir():
                raise InputError(f"{path} is a directory without config.json, not a checkpoint")
            return file_sha256(target)
        hasher = hashlib.sha256()
        for file in sorted(p for p in target.rglob("*") if p.is_file()):
            hasher.update(f"{file.relative_to(target).as_posix()}\0{file_sha256(file)}\n".encode())
        return hasher.hexdigest()
    except OSError as exc:
        raise InputError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from None


def audit_settings(opts: AuditOptions, data_fingerprint: str, device: torch.device) -> str:
    """A hash of everything besides the checkpoint that a row depends on: the test images, the options
    that change what is measured or how it is gated, the content of a trigger spec file, the device
    type and the bdclean version. Two runs with equal settings give equal rows for equal bytes."""
    from .. import __version__

    values = {name: getattr(opts, name) for name in SETTING_FIELDS}
    if opts.trigger and Path(opts.trigger).is_file():
        values["trigger_file_sha256"] = file_sha256(opts.trigger)
    values.update(data=data_fingerprint, device_type=device.type, bdclean=__version__)
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


def output_names(paths: list[str]) -> dict[str, str]:
    """A folder name per checkpoint for --purify, from its path relative to the audited folders' common
    parent (the same in every shard, which all expand the same list): a/b.pt -> a__b."""
    from ..reports.report import display_names

    def slug(text: str) -> str:
        return re.sub(r"[^A-Za-z0-9._-]+", "_", text.replace(os.sep, "__")).strip("._") or "checkpoint"

    relative = dict(zip(paths, display_names(paths) if paths else []))
    stems = {p: slug(r[: -len(Path(r).suffix)] if Path(r).suffix else r) for p, r in relative.items()}
    taken = [stem for stem in stems.values()]
    # a.pt beside a.safetensors: both keep their suffix (a.pt, a.safetensors) rather than share a folder
    return {p: stem if taken.count(stem) == 1 else slug(relative[p]) for p, stem in stems.items()}


def shard_device(spec: str | None) -> str:
    """`auto` under torchrun with several GPUs: this process's own GPU (LOCAL_RANK), so the ranks of
    one node do not all pile onto cuda:0."""
    local_rank = os.environ.get("LOCAL_RANK", "")
    if (spec or "auto") == "auto" and local_rank.isdigit() and torch.cuda.is_available():
        return f"cuda:{int(local_rank) % torch.cuda.device_count()}"
    return spec or "auto"


def release_memory(device: torch.device) -> None:
    gc.collect()  # models in reference cycles (hooks, parametrisations) are not freed by refcounting alone
    if device.type == "cuda":
        torch.cuda.empty_cache()


def current_rss_mb() -> float | None:
    """Resident memory now (not the peak): what tells a flat audit from a leaking one. Linux only."""
    try:
        with open("/proc/self/statm") as handle:
            pages = int(handle.read().split()[1])
        return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
    except (OSError, ValueError, IndexError, AttributeError):
        return None
