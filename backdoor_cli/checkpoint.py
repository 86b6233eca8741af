"""Read any supported checkpoint safely; write safetensors with bdclean metadata.

The rule this module exists for: a checkpoint is attacker-controlled data, so loading it must
never run code. Safetensors files are plain data. Torch pickles are scanned opcode by opcode
(`pickletools.genops` parses, it never executes) before `torch.load(weights_only=True)` touches
them, so a pickle that asks for a global outside the allowlist is refused with exit 3 and the
names of the globals it wanted, instead of torch's generic "Weights only load failed".
"""

from __future__ import annotations

import hashlib
import io
import json
import pickletools
import struct
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import InputError, UnsafeInputError
from .outputs import atomic_write_bytes

# Wrappers seen in the wild, tried in this order: timm/Lightning ('state_dict'), BackdoorBench's
# attack_result.pt ('model'), training-loop dumps ('model_state_dict'), EMA exports ('ema'), others ('net').
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "ema", "net")
# Prefixes added by DataParallel/DDP ('module.') and torch.compile ('_orig_mod.').
STRIPPED_PREFIXES = ("module.", "_orig_mod.")
METADATA_KEY = "bdclean"
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024
MAX_SNIFF_PICKLE = 1 << 20  # protocol 0/1 sniffing parses at most this much
MAX_CHECKPOINT_BYTES = 4 * 1024**3

# BackdoorBench stores numpy arrays (poison indices) beside the weights; reconstructing a plain
# ndarray needs exactly these globals and nothing that can call arbitrary functions.
_NUMPY_GLOBALS = {
    "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray._reconstruct",
    "numpy.ndarray",
    "numpy.dtype",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
}


@dataclass
class Checkpoint:
    """A checkpoint read from disk: its tensors, where they came from, and what it says about itself."""

    path: Path
    format: str  # 'safetensors' | 'torch-zip' | 'torch-legacy'
    state_dict: dict[str, torch.Tensor]
    sha256: str
    size_bytes: int
    wrapper: str | None = None  # the wrapper key the state_dict was found under, if any
    stripped_prefix: str | None = None
    metadata: dict = field(default_factory=dict)  # bdclean metadata (empty for foreign checkpoints)
    extra_keys: list[str] = field(default_factory=list)  # non-tensor entries beside the weights

    @property
    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.state_dict.values() if t.is_floating_point())


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint without executing anything in it; raise InputError/UnsafeInputError when bad."""
    path = Path(path)
    return parse_checkpoint(_read_bytes(path), path)


def parse_checkpoint(data: bytes, path: str | Path) -> Checkpoint:
    """A checkpoint from its bytes (`path` names it in messages): what read_checkpoint does after reading, so
    bytes about to be written can be read back by the same code every command uses (bdclean convert)."""
    path = Path(path)
    digest = hashlib.sha256(data).hexdigest()
    fmt = sniff_format(data, path)
    if fmt == "safetensors":
        tensors, metadata = _load_safetensors(data, path)
        ckpt = Checkpoint(path, fmt, tensors, digest, len(data), metadata=metadata)
    else:
        obj = _load_torch(data, path, fmt)
        state, wrapper, extra = unwrap_state_dict(obj, path)
        ckpt = Checkpoint(path, fmt, state, digest, len(data), wrapper=wrapper, extra_keys=extra)
    ckpt.state_dict, ckpt.stripped_prefix = strip_prefixes(ckpt.state_dict)
    check_tensors(ckpt.state_dict, path)
    return ckpt


def _read_bytes(path: Path) -> bytes:
    if not path.exists():
        raise InputError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise InputError(f"checkpoint is a directory, not a file: {path}")
    size = path.stat().st_size
    if size == 0:
        raise InputError(f"checkpoint is empty (0 bytes): {path}", hint="the download or copy may have failed")
    if size > MAX_CHECKPOINT_BYTES:
        raise InputError(f"checkpoint is {size / 1e9:.1f} GB, over the 4 GB limit: {path}")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from None


def sniff_format(data: bytes, path: Path) -> str:
    """Tell the format from the bytes, not the file name (names lie; magic numbers rarely do)."""
    if data[:4] == b"PK\x03\x04":
        return "torch-zip"
    if len(data) >= 10 and data[8:9] == b"{":
        return "safetensors"
    if data[:1] == b"\x80":
        return "torch-legacy"
    if _is_old_protocol_pickle(data):
        return "pickle"  # protocol 0/1 (no PROTO byte): still a pickle, so it is scanned and may be refused
    raise InputError(
        f"{path} is not a checkpoint bdclean can read (not safetensors, not a torch zip, not a pickle)",
        hint="supported: .safetensors, and .pt/.pth/.th/.bin files saved by torch.save",
    )


def _is_old_protocol_pickle(data: bytes) -> bool:
    """True when the bytes parse as one complete pickle stream (parsing only; nothing runs)."""
    try:
        for opcode, _arg, _pos in pickletools.genops(io.BytesIO(data[:MAX_SNIFF_PICKLE])):
            if opcode.name == "STOP":
                return True
    except Exception:  # noqa: BLE001 - any parse failure means "not a pickle"
        return False
    return False


def _load_safetensors(data: bytes, path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors

    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > min(MAX_SAFETENSORS_HEADER, len(data) - 8):
        raise InputError(
            f"{path}: safetensors header length {header_len} exceeds the file; the file is truncated or corrupt"
        )
    try:
        header = json.loads(data[8 : 8 + header_len].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: safetensors header is not valid JSON ({exc.__class__.__name__})") from None
    if not isinstance(header, dict):
        raise InputError(f"{path}: safetensors header is not a JSON object")
    try:
        tensors = load_safetensors(data)
    except (SafetensorError, ValueError, RuntimeError, TypeError, OverflowError) as exc:
        raise InputError(f"{path}: corrupt safetensors file ({_first_line(exc)})") from None
    raw_meta = header.get("__metadata__") or {}
    metadata: dict = {}
    if isinstance(raw_meta, dict) and METADATA_KEY in raw_meta:
        try:
            metadata = json.loads(raw_meta[METADATA_KEY])
        except (TypeError, json.JSONDecodeError):
            raise InputError(f"{path}: the embedded bdclean metadata is not valid JSON") from None
        if not isinstance(metadata, dict):
            raise InputError(f"{path}: the embedded bdclean metadata is not a JSON object")
    return tensors, metadata


def _allowed_pickle_globals() -> set[str]:
    try:  # torch's own allowlist for weights_only loading (private, so guarded)
        from torch._weights_only_unpickler import _get_allowed_globals

        allowed = set(_get_allowed_globals().keys())
    except Exception:  # pragma: no cover - depends on torch internals
        allowed = {"collections.OrderedDict", "torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_parameter"}
    return allowed | _NUMPY_GLOBALS


def scan_pickle_globals(pickle_bytes: bytes, max_pickles: int = 1) -> list[str]:
    """List the globals a pickle stream would import, by parsing opcodes only (nothing is executed).

    Torch's legacy format is five pickles back to back (magic number, protocol, system info, the
    object, the storage keys) followed by raw storage bytes; pass max_pickles=5 to scan all five.
    """
    found: list[str] = []
    stream = io.BytesIO(pickle_bytes)
    for _ in range(max_pickles):
        if stream.tell() >= len(pickle_bytes):
            break
        strings: list[str] = []
        memo: dict[int, str] = {}
        for opcode, arg, _pos in pickletools.genops(stream):
            name = opcode.name
            if name in ("GLOBAL", "INST"):
                found.append(str(arg).replace(" ", "."))
            elif name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING"):
                strings.append(str(arg))
            elif name in ("BINPUT", "LONG_BINPUT", "PUT") and strings:
                memo[int(arg)] = strings[-1]
            elif name == "MEMOIZE" and strings:
                memo[len(memo)] = strings[-1]
            elif name in ("BINGET", "LONG_BINGET", "GET") and int(arg) in memo:
                strings.append(memo[int(arg)])
            elif name == "STACK_GLOBAL":
                found.append(".".join(strings[-2:]) if len(strings) >= 2 else "<unknown>")
            elif name == "STOP":
                break
        if name != "STOP":  # genops ended without STOP: truncated stream
            break
    return found


def _pickle_payloads(data: bytes, fmt: str, path: Path) -> list[bytes]:
    if fmt in ("torch-legacy", "pickle"):
        return [data]
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            return [archive.read(n) for n in archive.namelist() if n.endswith(".pkl")]
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
        raise InputError(f"{path}: corrupt or truncated torch zip archive ({_first_line(exc)})") from None


def _load_torch(data: bytes, path: Path, fmt: str):
    allowed = _allowed_pickle_globals()
    for payload in _pickle_payloads(data, fmt, path):
        try:
            wanted = scan_pickle_globals(payload, max_pickles=5 if fmt == "torch-legacy" else 1)
        except Exception as exc:  # genops raises ValueError & co. on malformed streams
            raise InputError(f"{path}: corrupt pickle stream ({_first_line(exc)})") from None
        unsafe = sorted({g for g in wanted if g not in allowed})
        if unsafe:
            raise UnsafeInputError(
                f"refused {path}: its pickle would import {', '.join(unsafe[:5])}"
                + (f" and {len(unsafe) - 5} more" if len(unsafe) > 5 else "")
                + " (loading it could run arbitrary code)",
                hint="convert it to .safetensors where it was made, or save only model.state_dict() with torch.save",
            )
    numpy_globals = _numpy_safe_globals()
    try:
        with torch.serialization.safe_globals(numpy_globals), warnings.catch_warnings():
            # torch warns about pickle protocols it was not written with; the outcome is what matters here
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt files; all mean "bad input" here
        refused = _weights_only_refusal(exc)
        if refused is not None:
            # The opcode scan missed it (obfuscated pickle) but torch's safe unpickler did not: still a refusal.
            raise UnsafeInputError(
                f"refused {path}: its pickle needs {refused}, which safe loading does not allow "
                "(loading it could run arbitrary code)",
                hint="convert it to .safetensors where it was made",
            ) from None
        raise InputError(f"{path}: cannot read torch checkpoint ({_first_line(exc)})") from None


def _weights_only_refusal(exc: BaseException) -> str | None:
    """What torch's weights_only unpickler refused, or None if the failure was something else.
    Its own message advises weights_only=False, which is exactly what must not be done here."""
    text = str(exc)
    if "Unsupported global" in text or "WeightsUnpickler" in text or "weights_only" in text.lower():
        import re

        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        return f"the global {found.group(1)}" if found else "a construct outside the allowlist"
    return None


def _numpy_safe_globals() -> list:
    try:
        import numpy as np

        core = getattr(np, "_core", None) or np.core
        return [core.multiarray._reconstruct, np.ndarray, np.dtype, core.multiarray.scalar] + [
            type(np.dtype(t)) for t in ("uint8", "int64", "int32", "float32", "float64", "bool")
        ]
    except Exception:  # pragma: no cover
        return []


def unwrap_state_dict(obj, path: Path) -> tuple[dict[str, torch.Tensor], str | None, list[str]]:
    """Find the tensor mapping inside the common wrappers (at most two levels deep)."""
    wrapper = None
    for _ in range(2):
        if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        if not isinstance(obj, dict):
            break
        key = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if key is None:
            break
        wrapper = key if wrapper is None else f"{wrapper}.{key}"
        obj = obj[key]
    if not isinstance(obj, dict):
        raise InputError(f"{path}: holds a {type(obj).__name__}, not a state_dict of tensors")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    extra = sorted(str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor))
    if not tensors:
        raise InputError(
            f"{path}: no tensors found (top-level keys: {', '.join(map(str, list(obj)[:8]))})",
            hint=f"bdclean looks for a state_dict, bare or under one of: {', '.join(WRAPPER_KEYS)}",
        )
    if not all(isinstance(k, str) for k in tensors):
        raise InputError(f"{path}: state_dict keys must be strings")
    return tensors, wrapper, extra


def strip_prefixes(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str | None]:
    """Remove 'module.' / '_orig_mod.' when every key carries it (possibly stacked)."""
    stripped = ""
    changed = True
    while changed:
        changed = False
        for prefix in STRIPPED_PREFIXES:
            if state and all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                stripped += prefix
                changed = True
    return state, (stripped or None)


def check_tensors(state: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse NaN/Inf weights: a model with them cannot be evaluated or tuned meaningfully."""
    floats = [(k, t) for k, t in state.items() if t.is_floating_point()]
    bad = [] if _all_finite([t for _, t in floats]) else [k for k, t in floats if not bool(torch.isfinite(t).all())]
    if bad:
        raise InputError(
            f"{path}: {len(bad)} tensor(s) hold NaN or Inf values: {', '.join(bad[:5])}",
            hint="the checkpoint is corrupt or was saved after training diverged",
        )
    if not any(t.is_floating_point() for t in state.values()):
        raise InputError(f"{path}: no floating-point tensors; this does not look like model weights")


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """True when every tensor is finite, from one fused norm per tensor (NaN and Inf propagate into a
    norm). A per-tensor isfinite().all() cost 0.3 s for a ResNet-20's 97 tensors on a 2-core EPYC (a
    parallel kernel per tensor), the fused norms 0.5 ms. A norm may also overflow on finite values
    (large fp16 weights): False then only sends the caller to the exact per-tensor check."""
    if not tensors:
        return True
    try:
        return bool(torch.stack([n.float() for n in torch._foreach_norm(tensors)]).isfinite().all())
    except Exception:  # noqa: BLE001 - a dtype the fused kernel lacks: the exact check decides
        return False


def safetensors_bytes(state: dict[str, torch.Tensor], metadata: dict, extra: dict[str, str] | None = None) -> bytes:
    """Weights + bdclean metadata as safetensors bytes (deterministic: sorted metadata keys).
    `extra`: other string metadata entries a loader expects (transformers wants {'format': 'pt'})."""
    from safetensors.torch import save as save_safetensors

    # Clone into contiguous CPU tensors: safetensors refuses shared or strided storage.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    return save_safetensors(tensors, metadata={**(extra or {}), METADATA_KEY: json.dumps(metadata, sort_keys=True)})


def write_safetensors(path: str | Path, state: dict[str, torch.Tensor], metadata: dict) -> str:
    """Write weights + bdclean metadata atomically (temp file + rename); return the file's sha256."""
    blob = safetensors_bytes(state, metadata)
    atomic_write_bytes(Path(path), blob)
    return hashlib.sha256(blob).hexdigest()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    msg = text[0] if text else exc.__class__.__name__
    return msg[:200]
