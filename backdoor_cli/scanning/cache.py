"""A cache of scans, so a second purify of the same model on the same clean images skips the search.

The scan is most of the default purify's time (on the 2-core CPU: about 55 of 86 s for a ResNet-20 and 268
of 510-640 s for a VGG-16-BN), and a user who runs purify again on the same checkpoint and clean data (with
`--retune-check`, other tuning flags, in a nightly CI job) gets the same scan: it is a pure function of the
model's weights and structure, the scan images and their labels, the normalisation, the loss read from the
output, the search's parameters and seed, its arithmetic, and the software and processor it runs on (a
search of thousands of steps amplifies rounding, so a different torch, CPU model, GPU or thread
count is a different entry, never a stale hit). The key hashes exactly those.

Opt-in, as the evaluation cache whose folder it shares (`--cache-dir`, or $BDCLEAN_CACHE_DIR, under `scan/`).
An entry is two files: `<key>.safetensors` (each class's mask and pattern: never a pickle) and `<key>.json`
(the key's fields and each class's mask size, success and steps), written in that order, each atomically,
so a JSON file is only ever beside complete tensors. An entry that cannot be read, or whose tensors do not
match its record (shape, range, the mask's size), is a miss, never an error: the cache only ever saves time.
The outlier test is not stored: a hit is scored again by the same rule (inversion.score_triggers).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
from pathlib import Path

import torch

from ..data.datasets import ImageSet
from ..evaluation.cache import CACHE_ENV, CacheKey, hash_tensor
from ..models.output_kind import LossAdapter
from ..precision import cpu_capability
from .inversion import ClassTrigger, InversionParams, ScanResult, score_triggers

SCAN_CACHE_SCHEMA = "bdclean.scan-cache/1"
SCAN_SUBDIR = "scan"
# Masks and patterns of a 1,000-class model of 224 x 224 images take about 800 MB: not worth a disk's space.
MAX_ENTRY_BYTES = 64 * 1024 * 1024
MAX_RECORD_BYTES = 16 * 1024 * 1024  # the JSON record: a few hundred bytes per class
HEADER_ALLOWANCE = 1024 * 1024  # safetensors' own header beside the tensors
# A scan this long is worth keeping for the next run: without a cache, the run says how (scan and purify are often
# run again on the same model: with --retune-check, other tuning flags, a gate in CI).
CACHE_HINT_SECONDS = 30.0


def scan_key(
    model: torch.nn.Module,
    images: ImageSet,
    num_classes: int,
    mean: torch.Tensor,
    std: torch.Tensor,
    adapter: LossAdapter,
    params: InversionParams,
    seed: int,
    precision: str,
) -> CacheKey:
    """The key of scanning `model` (as it is now: weights, buffers, structure, memory format) on `images`."""
    from .. import __version__

    fields = {
        "model": model_fingerprint(model),
        "images": images_fingerprint(images.x, images.y),
        "num_classes": num_classes,
        "normalization": [mean.flatten().tolist(), std.flatten().tolist()],
        "loss": {"kind": adapter.kind, "source": adapter.source, "module": adapter.module},
        "params": params.to_dict(),
        "seed": seed,
        "precision": precision,
        "processor": processor(images.x.device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "bdclean": __version__,
    }
    return CacheKey.of(fields)


def model_fingerprint(model: torch.nn.Module) -> str:
    """Its structure (the modules' repr: layer sizes, strides, activations), every parameter and buffer by
    name, and whether its weights are channels_last (the two formats round differently)."""
    hasher = hashlib.sha256(f"{type(model).__module__}.{type(model).__qualname__}\n{model!r}".encode())
    for name, tensor in model.state_dict().items():
        hasher.update(name.encode())
        hash_tensor(hasher, tensor)
    conv = next((p for p in model.parameters() if p.dim() == 4), None)
    layout = conv is not None and conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    hasher.update(b"channels_last" if layout else b"contiguous")
    return hasher.hexdigest()


def images_fingerprint(images: torch.Tensor, labels: torch.Tensor) -> str:
    hasher = hashlib.sha256()
    hash_tensor(hasher, images)
    hash_tensor(hasher, labels)
    return hasher.hexdigest()


def processor(device: torch.device) -> str:
    """What does the arithmetic: the GPU's name, or the CPU's model and dispatch level (AVX2, AVX512, ...): two CPUs
    of one level may still block a convolution differently (cache sizes), and so round a sum in another order."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"{device.type}:{cpu_model()}:{cpu_capability().torch_capability}"


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The first processor's model name (Linux), else what the platform says."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class ScanCache:
    """get/put ScanResults by CacheKey in a folder."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def paths(self, key: CacheKey) -> tuple[Path, Path]:
        return self.root / f"{key.digest}.json", self.root / f"{key.digest}.safetensors"

    def get(self, key: CacheKey, image_shape: tuple[int, int, int]) -> ScanResult | None:
        """The stored scan scored again, or None (absent, unreadable, or not matching its record)."""
        record_path, tensor_path = self.paths(key)
        try:
            # a regular file of a sane size, never a FIFO or a device a hostile folder put there (a read would block
            # or never end); the tensors are checked by safetensors, which reads its header's length first
            for path, limit in ((record_path, MAX_RECORD_BYTES), (tensor_path, MAX_ENTRY_BYTES + HEADER_ALLOWANCE)):
                if not path.is_file() or path.stat().st_size > limit:
                    return None
            record = json.loads(record_path.read_text("utf-8"))
            if record.get("schema") != SCAN_CACHE_SCHEMA or record.get("key") != key.fields:
                return None
            from safetensors.torch import load_file  # tensors only: reading an entry runs no code

            tensors = load_file(str(tensor_path))
            triggers = checked_triggers(record, tensors, key.fields["num_classes"], image_shape)
            result = score_triggers(
                triggers, key.fields["params"]["threshold"], list(record["candidates"]), list(record["reference"])
            )
        except Exception:  # noqa: BLE001 - a damaged entry (safetensors' own errors included) is a miss
            return None
        result.cached = key.digest
        return result

    def put(self, key: CacheKey, result: ScanResult) -> bool:
        """Store `result`; False when it is too large to keep or the folder cannot be written."""
        masks = torch.stack([t.mask.float() for t in result.triggers]).contiguous()
        patterns = torch.stack([t.pattern.float() for t in result.triggers]).contiguous()
        if (masks.numel() + patterns.numel()) * 4 > MAX_ENTRY_BYTES:
            return False
        record = {
            "schema": SCAN_CACHE_SCHEMA,
            "key": key.fields,
            "classes": [
                {"class": t.target, "l1": t.l1, "success": t.success, "reached": t.reached, "steps": t.steps}
                for t in result.triggers
            ],
            "candidates": list(result.candidates),
            "reference": list(result.reference),
        }
        from safetensors.torch import save

        from ..outputs import atomic_write_bytes

        record_path, tensor_path = self.paths(key)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(tensor_path, save({"masks": masks, "patterns": patterns}))
            atomic_write_bytes(record_path, json.dumps(record, indent=1).encode())
        except Exception:  # noqa: BLE001 - an unwritable cache costs time on the next run, nothing else
            return False
        return True


def checked_triggers(
    record: dict, tensors: dict, num_classes: int, image_shape: tuple[int, int, int]
) -> list[ClassTrigger]:
    """The stored triggers, in class order; ValueError unless every tensor has the scan's shape, lies in [0, 1],
    and every mask adds up to the size its record says (a damaged or mismatched entry is a miss)."""
    height, width, channels = image_shape
    masks, patterns = tensors["masks"], tensors["patterns"]
    classes = record["classes"]
    if masks.dtype != torch.float32 or patterns.dtype != torch.float32:
        raise ValueError("the stored masks and patterns must be float32")
    if tuple(masks.shape) != (num_classes, height, width) or tuple(patterns.shape) != (
        num_classes,
        height,
        width,
        channels,
    ):
        raise ValueError("the stored masks or patterns have another shape than this scan's")
    for values in (masks, patterns):
        if not bool(torch.isfinite(values).all()) or float(values.min()) < 0 or float(values.max()) > 1:
            raise ValueError("a stored mask or pattern lies outside [0, 1]")
    if len(classes) != num_classes or [c["class"] for c in classes] != list(range(num_classes)):
        raise ValueError("the record does not list every class in order")
    triggers = []
    for k, entry in enumerate(classes):
        l1, success = float(entry["l1"]), float(entry["success"])
        if not math.isclose(float(masks[k].sum()), l1, rel_tol=1e-5, abs_tol=1e-4) or not 0 <= success <= 1:
            raise ValueError(f"class {k}'s record does not match its mask")
        triggers.append(
            ClassTrigger(
                target=k,
                mask=masks[k].clone(),
                pattern=patterns[k].clone(),
                l1=l1,
                success=success,
                reached=bool(entry["reached"]),
                steps=int(entry["steps"]),
            )
        )
    return triggers


def open_scan_cache(directory: str | Path | None) -> ScanCache | None:
    """The scan cache under the evaluation cache's folder (--cache-dir, else $BDCLEAN_CACHE_DIR), or None: off
    by default, so a plain run never writes outside its outputs."""
    directory = directory or os.environ.get(CACHE_ENV)
    return ScanCache(Path(directory) / SCAN_SUBDIR) if directory else None


def keep_scan_hint(seconds: float) -> str | None:
    """What to do so that the next run does not search again, for a scan that took CACHE_HINT_SECONDS or more
    with no cache to keep it (None below that)."""
    if seconds < CACHE_HINT_SECONDS:
        return None
    return (
        f"the scan took {seconds:.0f} s; with --cache-dir DIR (or BDCLEAN_CACHE_DIR) it is kept, and the next run "
        "on this model and these images with these settings reads it back instead of searching again"
    )
