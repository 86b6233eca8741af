"""A cache of evaluations, so the same model on the same images is measured once.

An evaluation is a pure function of what it was given: the checkpoint's bytes, the test images, the
trigger, how the model is fed (architecture, normalisation), which subset is drawn (eval limit, seed),
the device type (bf16 autocast on CUDA, fp32 on CPU) and the bdclean version that ran it. The key
hashes exactly those, computed from *resolved* values (the sha256 the loader computed, the trigger
actually built, the tensors actually loaded), so `evaluate` and `purify` arrive at the same key for
the same input by different roads, and `purify` skips the "before" evaluation `evaluate` just did.
The batch size is left out on purpose: it changes speed, not the counts.

Two stores: a directory of small JSON files (`--cache-dir`, or BDCLEAN_CACHE_DIR), shared between
processes and runs, and an in-memory dict for one process (an audit that purifies what it measured).
A cache entry that cannot be read is a miss, never an error: the cache only ever saves time.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .checked import CheckedStats
from .measure import EvalResult
from .metrics import Rate
from .paired import Outcomes

CACHE_ENV = "BDCLEAN_CACHE_DIR"
CACHE_SCHEMA = "bdclean.eval-cache/1"
HASH_CHUNK = 1 << 20
# An entry holds counts and one bit per image and outcome (about 3 bytes an image as JSON): 64 MB is millions of images.
MAX_ENTRY_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class CacheKey:
    """What a cached result (an evaluation, a scan) depends on, hashed; `fields` is kept beside the entry for
    people reading it."""

    digest: str
    fields: dict

    @classmethod
    def of(cls, fields: dict) -> CacheKey:
        return cls(hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest(), fields)


class EvalCache:
    """get/put EvalResults by CacheKey; `root` None keeps them in memory for this process only."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root else None
        self._memory: dict[str, EvalResult] = {}

    def get(self, key: CacheKey) -> EvalResult | None:
        if key.digest in self._memory:
            return self._memory[key.digest]
        if self.root is None:
            return None
        path = self.root / f"{key.digest}.json"
        try:
            # a regular file of a sane size: a FIFO or a device in a hostile folder would block or never end
            if not path.is_file() or path.stat().st_size > MAX_ENTRY_BYTES:
                return None
            entry = json.loads(path.read_text("utf-8"))
            current = entry.get("schema") == CACHE_SCHEMA
            result = result_from_dict(entry["metrics"], entry["outcomes"]) if current else None
        except (OSError, ValueError, KeyError, TypeError, AttributeError):  # AttributeError: JSON that is no object
            return None
        if result is not None:
            self._memory[key.digest] = result
        return result

    def put(self, key: CacheKey, result: EvalResult) -> None:
        self._memory[key.digest] = result
        if self.root is None:
            return
        from ..outputs import atomic_write_bytes

        entry = {"schema": CACHE_SCHEMA, "key": key.fields, "metrics": result.to_dict()}
        if result.outcomes is not None:
            entry["outcomes"] = result.outcomes.to_dict()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.root / f"{key.digest}.json", json.dumps(entry, indent=1).encode())
        except Exception:  # noqa: BLE001 - an unwritable cache costs time on the next run, nothing else
            pass


def open_cache(directory: str | Path | None) -> EvalCache | None:
    """The cache the user asked for (--cache-dir, else $BDCLEAN_CACHE_DIR), or None: off by default, so
    a plain run never writes outside its outputs."""
    directory = directory or os.environ.get(CACHE_ENV)
    return EvalCache(directory) if directory else None


def eval_key(
    checkpoint_sha256: str,
    subject,
    data_fingerprint: str,
    trigger,
    eval_limit,
    seed: int,
    device: torch.device,
    precision: str = "fp32",
) -> CacheKey:
    """The key of evaluating `subject` (a loaded Subject) on the test split with `trigger`, in `precision`
    (bf16 and fp32 evaluations can differ in a few predictions, so they are different entries)."""
    from .. import __version__

    fields = {
        "checkpoint_sha256": checkpoint_sha256,
        "arch": subject.arch,
        "num_classes": subject.num_classes,
        "normalization": [list(subject.mean), list(subject.std)],
        "data": data_fingerprint,
        "trigger": trigger_fingerprint(trigger),
        "eval_limit": eval_limit,
        "seed": seed,
        "device_type": device.type,
        "precision": precision,
        "bdclean": __version__,
    }
    return CacheKey.of(fields)


def trigger_fingerprint(trigger) -> str | None:
    """Its spec and the tensors it applies (a blend image, a warping grid): two triggers with the same
    name but different pixels must not share results."""
    if trigger is None:
        return None
    hasher = hashlib.sha256(json.dumps(trigger.to_dict(), sort_keys=True, default=str).encode())
    for name, tensor in sorted(trigger.state().items()):
        hasher.update(name.encode())
        hash_tensor(hasher, tensor)
    return hasher.hexdigest()


def data_fingerprint(test) -> str:
    """The test split's content: the pixels and labels of resident images; for a split streamed from
    disk (too large to hold), its file names, sizes and modification times plus the decode settings."""
    hasher = hashlib.sha256()
    if hasattr(test, "x"):
        hasher.update(repr(tuple(test.x.shape)).encode())
        hash_tensor(hasher, test.x)
        hash_tensor(hasher, test.y)
        return hasher.hexdigest()
    hasher.update(repr((test.mode, test.shape, test.image_size)).encode())
    for path in test.files:
        stat = Path(path).stat()
        hasher.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    hash_tensor(hasher, test.y)
    return hasher.hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in chunks (a 4 GB checkpoint is not held twice)."""
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(HASH_CHUNK), b""):
            hasher.update(chunk)
    return hasher.hexdigest()


def measured(cache: EvalCache | None, key: CacheKey | None, evaluate) -> tuple[EvalResult, bool]:
    """(the result, whether it came from the cache): `evaluate()` runs only on a miss, and its result is stored."""
    if cache is not None and key is not None:
        found = cache.get(key)
        if found is not None:
            return found, True
    result = evaluate()
    if cache is not None and key is not None:
        cache.put(key, result)
    return result, False


def result_from_dict(metrics: dict, outcomes: dict | None = None) -> EvalResult:
    """EvalResult.to_dict() read back (the counts are the truth; intervals are recomputed from them), with its
    per-image outcomes (Outcomes.to_dict()). An entry written before the outcomes were kept has none and is read
    as a miss by EvalCache.get, so a paired change is never left out for want of them."""

    def rate(value):
        return None if value is None else Rate(value["k"], value["n"])

    if metrics.get("asr") is not None and metrics.get("asr_no_trigger") is None:
        # written before the untriggered rate was counted: a miss, so a report never lacks a figure it shows
        raise KeyError("asr_no_trigger")
    return EvalResult(
        rate(metrics["clean_acc"]),
        rate(metrics.get("asr")),
        rate(metrics.get("ra")),
        float(metrics.get("seconds", 0.0)),
        int(metrics["images"]),
        asr_no_trigger=rate(metrics.get("asr_no_trigger")),
        # how a checked bf16 evaluation computed it: a report of a cached figure shows the same record
        checked=CheckedStats.from_dict(metrics["arithmetic"]) if metrics.get("arithmetic") else None,
        outcomes=None if outcomes is None else checked_outcomes(Outcomes.from_dict(outcomes), metrics),
    )


def checked_outcomes(outcomes: Outcomes, metrics: dict) -> Outcomes:
    """Outcomes that add up to the entry's counts; anything else is a damaged entry (ValueError: a miss)."""

    def adds_up(bits, rate: dict) -> bool:
        return bits is not None and bits.numel() == rate["n"] and int(bits.sum()) == rate["k"]

    hits = metrics.get("asr")
    if not adds_up(outcomes.clean_correct, metrics["clean_acc"]) or (
        hits is not None and not adds_up(outcomes.target_hits, hits)
    ):
        raise ValueError("cached outcomes do not add up to the cached counts")
    return outcomes


def hash_tensor(hasher, tensor: torch.Tensor) -> None:
    """Feed a tensor's dtype, shape and values (in logical order, whatever its memory format) to `hasher`."""
    tensor = tensor.detach().to("cpu").contiguous()
    hasher.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    if tensor.numel():
        hasher.update(tensor.reshape(-1).view(torch.uint8).numpy())  # the buffer itself, no copy
