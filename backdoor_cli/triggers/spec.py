"""Trigger specs -> batched tensor transforms; the poisoned evaluation and training sets.

A trigger spec is a small YAML mapping (see examples/triggers/) or a built-in name. Specs come from
users, from downloaded files and from checkpoint metadata, so they are treated as hostile: YAML is
read with `yaml.safe_load` only, every field is checked for type and range (booleans are not
numbers), unknown fields are refused, files are size-checked before they are read and image sizes
before they are decoded. Every failure is a ConfigError naming the field or the file.

Built triggers work on uint8 image batches shaped (N, H, W, C), C = 1 or 3, on any device, with
whole-batch tensor ops only. Output is uint8 of the same shape on the same device:
- `patch` copies pixels, so it is exact;
- `blend`, `sig` and `image` compute x * scale + offset in float32, then round to the nearest
  integer (ties to even, `torch.round`) and clamp to [0, 255];
- `wanet` resamples bilinearly in float32 (`grid_sample`, align_corners=True), then rounds and
  clamps the same way.
"""

from __future__ import annotations

import hashlib
import io
import math
import numbers
import os
import reprlib
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from ..errors import ConfigError, InputError

TRIGGER_TYPES = ("patch", "blend", "sig", "wanet", "image")
POSITIONS = ("bottom-right", "bottom-left", "top-right", "top-left", "center")

# Limits on untrusted inputs. A trigger picture is a few hundred pixels; these bounds only stop
# files crafted to exhaust memory (decompression bombs, huge YAML) before any decoding happens.
MAX_IMAGE_SIDE = 4096
MAX_IMAGE_BYTES = 50 * 1024 * 1024
MAX_SPEC_BYTES = 64 * 1024
MAX_PATH_CHARS = 4096
MAX_NAME_CHARS = 100
MAX_TARGET = 2**31 - 1
MAX_SEED = 2**63 - 1
MAX_WANET_K = 256
# Image formats we decode; others (TIFF, PSD, ...) are refused to keep the decoder surface small.
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP")
# Elements per apply() chunk: bounds the float32 temporaries of big batches (~64 MB each).
APPLY_CHUNK_ELEMENTS = 2**24

_COMMON_KEYS = ("type", "target", "name")
_TYPE_KEYS = {
    "patch": ("size", "position", "color", "image", "image_sha256"),
    "blend": ("alpha", "pattern", "seed", "image", "image_sha256"),
    "sig": ("amplitude", "frequency"),
    "wanet": ("k", "s", "seed", "grid_rescale"),
    "image": ("image", "mask", "position", "image_sha256", "mask_sha256"),
}

_MISSING = object()
_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxlevel, _SHORT_REPR.maxlist, _SHORT_REPR.maxtuple, _SHORT_REPR.maxdict = 2, 4, 4, 4
_SHORT_REPR.maxstring, _SHORT_REPR.maxother, _SHORT_REPR.maxlong = 50, 50, 40

# The FST paper's attack settings (Min et al. 2023), all-to-one with target class 0.
BUILTIN_TRIGGERS: dict[str, dict[str, Any]] = {
    "badnets": {"type": "patch", "target": 0, "size": 3, "position": "bottom-right", "color": 255},
    # The paper blends the Hello Kitty picture, which we cannot ship; seeded uniform noise at the
    # same alpha is the usual stand-in. A picture can be given with `type: blend, image: file.png`.
    "blended": {"type": "blend", "target": 0, "alpha": 0.2, "pattern": "noise", "seed": 0},
    "sig": {"type": "sig", "target": 0, "amplitude": 40.0, "frequency": 6.0},
    "wanet": {"type": "wanet", "target": 0, "k": 4, "s": 0.5, "seed": 0, "grid_rescale": 1.0},
}


@dataclass(frozen=True)
class TriggerSpec:
    """A validated trigger spec. `params` holds every field but type/target, defaults filled in;
    image paths are absolute and come with their sha256. `source` is the file or built-in name.
    Change the target with `dataclasses.replace(spec, target=t)`."""

    type: str
    target: int
    params: dict
    source: str


# ---------------------------------------------------------------- reading specs


def load_trigger_spec(text_or_path: str) -> TriggerSpec:
    """A built-in name (badnets, blended, sig, wanet) or the path of a YAML spec file."""
    text = os.fspath(text_or_path) if isinstance(text_or_path, os.PathLike) else text_or_path
    if not isinstance(text, str) or not text.strip():
        raise ConfigError("--trigger is empty", hint=_trigger_hint())
    # Built-in names win over same-named files, so a stray file cannot change what `badnets` means.
    if text in BUILTIN_TRIGGERS:
        return parse_trigger_spec(dict(BUILTIN_TRIGGERS[text]), None, source=text)
    path = Path(text)
    try:
        exists = path.exists()
    except (OSError, ValueError):  # a NUL byte or an over-long name
        exists = False
    if not exists:
        raise ConfigError(
            f"trigger {_show(text)} is neither a built-in name nor an existing file", hint=_trigger_hint()
        )
    data = _read_bounded(path, MAX_SPEC_BYTES, f"trigger spec {path}")
    try:
        doc = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"trigger spec {path}: not UTF-8 text (bad byte at offset {e.start})") from None
    try:
        obj = yaml.safe_load(doc)
    except yaml.MarkedYAMLError as e:
        where = f" (line {e.problem_mark.line + 1}, column {e.problem_mark.column + 1})" if e.problem_mark else ""
        what = e.problem or e.context or "invalid YAML"
        raise ConfigError(f"trigger spec {path}: invalid YAML{where}: {_clip(str(what))}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"trigger spec {path}: invalid YAML: {_clip(str(e))}") from None
    except RecursionError:
        raise ConfigError(f"trigger spec {path}: YAML nested too deeply") from None
    except (ValueError, KeyError, AttributeError, TypeError, OverflowError) as e:
        # safe_load's constructors raise these (not YAMLError) for standard tags with bad values: !!int x
        raise ConfigError(f"trigger spec {path}: invalid YAML value ({_clip(str(e) or type(e).__name__)})") from None
    if obj is None:
        raise ConfigError(f"trigger spec {path}: the file is empty", hint=_trigger_hint())
    return parse_trigger_spec(obj, path.parent, source=str(path))


def parse_trigger_spec(obj: dict, base_dir: Path | None, source: str) -> TriggerSpec:
    """Validate a spec mapping strictly; relative image paths resolve against `base_dir` (else cwd)."""
    if not isinstance(obj, dict):
        raise ConfigError(
            f"trigger spec {source}: expected a mapping of fields (type: patch, ...), got {type(obj).__name__}",
            hint=_trigger_hint(),
        )
    for key in obj:
        if not isinstance(key, str):
            raise ConfigError(f"trigger spec {source}: field names must be text, got {_show(key)}")
    if "type" not in obj:
        raise ConfigError(f"trigger spec {source}: missing field 'type'", hint=f"one of: {', '.join(TRIGGER_TYPES)}")
    kind = obj["type"]
    if not isinstance(kind, str) or kind not in TRIGGER_TYPES:
        raise ConfigError(
            f"trigger spec {source}: field 'type' must be one of {', '.join(TRIGGER_TYPES)}, got {_show(kind)}"
        )
    allowed = _COMMON_KEYS + _TYPE_KEYS[kind]
    for key in obj:
        if key not in allowed:
            raise ConfigError(
                f"trigger spec {source}: unknown field {_show(key)} for type {kind}",
                hint=f"allowed fields: {', '.join(allowed)}",
            )
    fields = _Fields(obj, source, base_dir)
    target = fields.integer("target", 0, 0, MAX_TARGET)
    params: dict[str, Any] = {}
    if "name" in obj:
        params["name"] = fields.name("name")
    params.update(_PARSERS[kind](fields))
    return TriggerSpec(type=kind, target=target, params=params, source=str(source))


class _Fields:
    """Typed, range-checked access to the fields of one spec; errors name the field."""

    def __init__(self, obj: dict, source: str, base_dir: Path | None):
        self.obj, self.source, self.base_dir = obj, source, base_dir

    def fail(self, key: str, expected: str, value: Any = _MISSING, hint: str | None = None):
        got = "" if value is _MISSING else f", got {_show(value)}"
        raise ConfigError(f"trigger spec {self.source}: field '{key}' must be {expected}{got}", hint=hint)

    def refuse(self, message: str, hint: str | None = None):
        raise ConfigError(f"trigger spec {self.source}: {message}", hint=hint)

    def integer(self, key: str, default: int, lo: int, hi: int) -> int:
        value = self.obj.get(key, default)
        if not _is_int(value) or not lo <= value <= hi:
            self.fail(key, f"an integer in [{lo}, {hi}]", value)
        return int(value)

    def number(self, key: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
        value = self.obj.get(key, default)
        ok = _is_number(value) and math.isfinite(value) and (lo < value if lo_open else lo <= value) and value <= hi
        if not ok:
            bounds = f"{'(' if lo_open else '['}{_num(lo)}, {_num(hi)}]" if math.isfinite(hi) else f"> {_num(lo)}"
            self.fail(key, f"a number {'in ' if math.isfinite(hi) else ''}{bounds}", value)
        return float(value)

    def seed(self, key: str) -> int:
        return self.integer(key, 0, 0, MAX_SEED)

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.obj.get(key, default)
        if not isinstance(value, str) or value not in choices:
            self.fail(key, f"one of {', '.join(choices)}", value)
        return value

    def name(self, key: str) -> str:
        value = self.obj[key]
        if not isinstance(value, str) or not 0 < len(value) <= MAX_NAME_CHARS or not value.isprintable():
            self.fail(key, f"printable text of 1..{MAX_NAME_CHARS} characters", value)
        return value

    def position(self, key: str) -> str | list[int]:
        value = self.obj.get(key, "bottom-right")
        if isinstance(value, str):
            if value not in POSITIONS:
                self.fail(key, f"one of {', '.join(POSITIONS)} or [row, col]", value)
            return value
        if (
            isinstance(value, (list, tuple))
            and len(value) == 2
            and all(_is_int(v) and 0 <= v <= MAX_IMAGE_SIDE for v in value)
        ):
            return [int(value[0]), int(value[1])]
        self.fail(key, f"one of {', '.join(POSITIONS)} or [row, col] with integers in [0, {MAX_IMAGE_SIDE}]", value)

    def color(self, key: str) -> int | list[int]:
        value = self.obj.get(key, 255)
        if _is_int(value) and 0 <= value <= 255:
            return int(value)
        if (
            isinstance(value, (list, tuple))
            and 1 <= len(value) <= 4
            and all(_is_int(v) and 0 <= v <= 255 for v in value)
        ):
            return [int(v) for v in value]
        self.fail(key, "an integer in [0, 255] or a list of one per channel", value)

    def image_file(self, key: str) -> tuple[str, str]:
        """Check an image field: resolve, read (bounded), hash, decode once; return (path, sha256)."""
        raw = self.obj[key]
        if not isinstance(raw, str) or not 0 < len(raw) <= MAX_PATH_CHARS or "\x00" in raw:
            self.fail(key, "the path of an image file", raw)
        path = Path(raw)
        if not path.is_absolute():
            path = (self.base_dir if self.base_dir is not None else Path.cwd()) / path
        try:
            path = path.resolve()
        except (OSError, RuntimeError) as e:
            self.refuse(f"{key} file {raw}: cannot resolve the path ({e})")
        what = f"trigger spec {self.source}: {key} file {path}"
        data = _read_bounded(path, MAX_IMAGE_BYTES, what)
        digest = hashlib.sha256(data).hexdigest()
        sha_key = f"{key}_sha256"
        if sha_key in self.obj:
            expected = self.obj[sha_key]
            if not isinstance(expected, str) or len(expected) != 64 or set(expected) - set("0123456789abcdef"):
                self.fail(sha_key, "a sha256 hex digest (64 lowercase hex digits)", expected)
            if expected != digest:
                self.refuse(
                    f"{key} file {path} has sha256 {digest[:12]}..., the spec expects {expected[:12]}...",
                    hint="the file changed since the spec was written; restore it or drop the hash",
                )
        _decode_image(data, what)
        return str(path), digest

    def reject_with(self, present: str, *others: str, reason: str) -> None:
        for other in others:
            if other in self.obj:
                self.refuse(f"field '{other}' cannot be used with '{present}': {reason}")


def _parse_patch(f: _Fields) -> dict:
    if "image" in f.obj:
        f.reject_with("image", "size", "color", reason="the patch picture is used at its own size and colours")
        path, digest = f.image_file("image")
        return {"image": path, "image_sha256": digest, "position": f.position("position")}
    f.reject_with("size", "image_sha256", reason="image_sha256 belongs to an image file")
    return {
        "size": f.integer("size", 3, 1, MAX_IMAGE_SIDE),
        "position": f.position("position"),
        "color": f.color("color"),
    }


def _parse_blend(f: _Fields) -> dict:
    alpha = f.number("alpha", 0.2, 0.0, 1.0)
    if "image" in f.obj:
        f.reject_with("image", "pattern", "seed", reason="give either an image or a generated pattern")
        path, digest = f.image_file("image")
        return {"alpha": alpha, "image": path, "image_sha256": digest}
    f.reject_with("pattern", "image_sha256", reason="image_sha256 belongs to an image file")
    return {"alpha": alpha, "pattern": f.choice("pattern", "noise", ("noise",)), "seed": f.seed("seed")}


def _parse_sig(f: _Fields) -> dict:
    return {
        "amplitude": f.number("amplitude", 40.0, 0.0, 255.0, lo_open=True),
        "frequency": f.number("frequency", 6.0, 0.0, math.inf, lo_open=True),
    }


def _parse_wanet(f: _Fields) -> dict:
    return {
        "k": f.integer("k", 4, 2, MAX_WANET_K),
        "s": f.number("s", 0.5, 0.0, math.inf, lo_open=True),
        "seed": f.seed("seed"),
        "grid_rescale": f.number("grid_rescale", 1.0, 0.0, math.inf, lo_open=True),
    }


def _parse_image(f: _Fields) -> dict:
    for key in ("image", "mask"):
        if key not in f.obj:
            f.refuse(f"type image needs field '{key}'", hint="image: trigger.png and mask: mask.png (grayscale)")
    image, image_sha = f.image_file("image")
    mask, mask_sha = f.image_file("mask")
    return {
        "image": image,
        "image_sha256": image_sha,
        "mask": mask,
        "mask_sha256": mask_sha,
        "position": f.position("position"),
    }


_PARSERS = {
    "patch": _parse_patch,
    "blend": _parse_blend,
    "sig": _parse_sig,
    "wanet": _parse_wanet,
    "image": _parse_image,
}


# ---------------------------------------------------------------- files and images


def _read_bounded(path: Path, limit: int, what: str) -> bytes:
    """Read a regular file of at most `limit` bytes, refusing FIFOs, devices and directories."""
    try:
        # O_NONBLOCK: opening a FIFO must not hang; fstat on the open descriptor avoids a swap race.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise ConfigError(f"{what}: file not found") from None
    except OSError as e:
        raise ConfigError(f"{what}: cannot open ({e.strerror or e})") from None
    try:
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):  # checked before fdopen, which fails on directories
                raise ConfigError(f"{what}: not a regular file")
            if info.st_size > limit:
                raise ConfigError(f"{what}: file too large ({info.st_size} bytes, limit {limit})")
            handle = os.fdopen(fd, "rb")
        except BaseException:
            os.close(fd)
            raise
        with handle:
            data = handle.read(limit + 1)
    except OSError as e:
        raise ConfigError(f"{what}: cannot read ({e.strerror or e})") from None
    if len(data) > limit:
        raise ConfigError(f"{what}: file too large (over {limit} bytes)")
    return data


def _decode_image(data: bytes, what: str):
    """Decode image bytes with PIL, checking the size from the header before decoding pixels."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            # PIL warns (not raises) between MAX_IMAGE_PIXELS and twice that; treat it as an error.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=list(IMAGE_FORMATS))
            width, height = image.size
            if not (0 < width <= MAX_IMAGE_SIDE and 0 < height <= MAX_IMAGE_SIDE):
                raise ConfigError(f"{what}: image is {width}x{height} pixels, limit {MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE}")
            image.seek(0)  # animated GIF/WebP: the first frame is the trigger
            image.load()
            return image
    except ConfigError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ConfigError(f"{what}: image has too many pixels (decompression bomb guard)") from None
    except Exception as e:  # noqa: BLE001 - corrupt files raise many types inside PIL; all mean "bad image"
        reason = _clip(str(e) or type(e).__name__)
        raise ConfigError(
            f"{what}: not a readable image ({', '.join(IMAGE_FORMATS)}): {reason}",
            hint="check the file, or re-save it as PNG",
        ) from None


def _load_pixels(path: str, sha256: str, channels: int, mode_for_mask: bool = False) -> np.ndarray:
    """Read an image recorded in a spec, check its hash, return uint8 (h, w, channels)."""
    what = f"trigger image {path}"
    data = _read_bounded(Path(path), MAX_IMAGE_BYTES, what)
    if hashlib.sha256(data).hexdigest() != sha256:
        raise ConfigError(f"{what}: the file changed since the trigger spec was read (sha256 differs)")
    image = _decode_image(data, what)
    # Masks are grayscale whatever the file holds; pictures take the data's channel count.
    # Converting drops any alpha channel (use type: image with a mask for shaped triggers).
    mode = "L" if mode_for_mask or channels == 1 else "RGB"
    array = np.asarray(image.convert(mode), dtype=np.uint8)
    return array[:, :, None] if array.ndim == 2 else array


def _resize_pixels(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """PIL bilinear resize of uint8 (h, w, c) pixels to (height, width, c)."""
    from PIL import Image

    if pixels.shape[:2] == (height, width):
        return pixels
    image = Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)
    out = np.asarray(image.resize((width, height), Image.BILINEAR), dtype=np.uint8)
    return out[:, :, None] if out.ndim == 2 else out


# ---------------------------------------------------------------- built triggers


class Trigger:
    """A trigger built for one image shape (H, W, C); `apply` maps uint8 batches to uint8 batches."""

    def __init__(self, spec: TriggerSpec, image_shape: tuple[int, int, int], tensors: dict[str, torch.Tensor]):
        self.spec = spec
        self.target = spec.target
        self.image_shape = image_shape
        self._tensors = tensors  # CPU masters; copies per device are made on first use
        self._by_device: dict[torch.device, dict[str, torch.Tensor]] = {}

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Triggered copy of a uint8 batch (N, H, W, C); same shape, dtype and device. Input untouched."""
        if (
            not isinstance(x, torch.Tensor)
            or x.dtype != torch.uint8
            or tuple(x.shape[1:]) != self.image_shape
            or x.dim() != 4
        ):
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            dtype = x.dtype if isinstance(x, torch.Tensor) else ""
            raise InputError(
                f"the {self.spec.type} trigger was built for uint8 images shaped (N, "
                f"{', '.join(map(str, self.image_shape))}), got {dtype} {shape}"
            )
        if x.shape[0] == 0:
            return x.clone()
        tensors = self._on(x.device)
        chunk = max(1, APPLY_CHUNK_ELEMENTS // math.prod(self.image_shape))
        if x.shape[0] <= chunk:
            return self._apply(x, tensors)
        return torch.cat([self._apply(x[i : i + chunk], tensors) for i in range(0, x.shape[0], chunk)])

    def to_dict(self) -> dict:
        """A JSON/YAML-serialisable spec that `parse_trigger_spec` accepts back."""
        out: dict[str, Any] = {"type": self.spec.type, "target": int(self.target)}
        for key, value in self.spec.params.items():
            out[key] = list(value) if isinstance(value, (list, tuple)) else value
        return out

    def state(self) -> dict[str, torch.Tensor]:
        """The tensors this trigger applies (CPU copies), e.g. to save WaNet's warping grid."""
        return {key: value.clone() for key, value in self._tensors.items()}

    def __repr__(self) -> str:
        return f"Trigger({self.spec.type} -> class {self.target}, image {self.image_shape}, from {self.spec.source})"

    def _on(self, device: torch.device) -> dict[str, torch.Tensor]:
        if device not in self._by_device:
            self._by_device[device] = {k: v.to(device) for k, v in self._tensors.items()}
        return self._by_device[device]

    def _apply(self, x: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError


class PatchTrigger(Trigger):
    """Pastes `patch` (h, w, C) with its top-left corner at `origin` (row, col): exact pixel copies."""

    def _apply(self, x, tensors):
        row, col = (int(v) for v in self._tensors["origin"])
        patch = tensors["patch"]
        out = x.clone()
        out[:, row : row + patch.shape[0], col : col + patch.shape[1], :] = patch
        return out


class AffineTrigger(Trigger):
    """x' = round(clamp(x * scale + offset, 0, 255)) in float32: blend, sig and masked-image triggers."""

    def _apply(self, x, tensors):
        y = x.to(torch.float32).mul_(tensors["scale"]).add_(tensors["offset"])
        return y.round_().clamp_(0, 255).to(torch.uint8)


class WarpTrigger(Trigger):
    """WaNet: resample every image through the same fixed warping `grid` (1, H, W, 2)."""

    def _apply(self, x, tensors):
        images = x.permute(0, 3, 1, 2).to(torch.float32)
        grid = tensors["grid"].expand(x.shape[0], -1, -1, -1)
        warped = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        return warped.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def build_trigger(spec: TriggerSpec, image_shape: tuple[int, int, int]) -> Trigger:
    """Build the tensors of `spec` for images shaped (H, W, C) and return the ready Trigger."""
    shape = tuple(image_shape)
    if len(shape) != 3 or not all(_is_int(v) and v > 0 for v in shape) or shape[2] not in (1, 3):
        raise InputError(f"triggers need images shaped (H, W, C) with C = 1 or 3, got {_show(image_shape)}")
    shape = tuple(int(v) for v in shape)
    if spec.type not in _BUILDERS:
        raise ConfigError(f"trigger spec {spec.source}: unknown type {_show(spec.type)}")
    if not _is_int(spec.target) or spec.target < 0:
        raise ConfigError(
            f"trigger spec {spec.source}: field 'target' must be an integer >= 0, got {_show(spec.target)}"
        )
    return _BUILDERS[spec.type](spec, shape)


def _build_patch(spec: TriggerSpec, shape) -> Trigger:
    height, width, channels = shape
    p = spec.params
    if "image" in p:
        patch = torch.from_numpy(_load_pixels(p["image"], p["image_sha256"], channels).copy())
    else:
        color = p["color"]
        if isinstance(color, (list, tuple)):
            if len(color) != channels:
                raise ConfigError(
                    f"trigger spec {spec.source}: field 'color' has {len(color)} values but the images "
                    f"have {channels} channel(s)",
                    hint="give one value per channel, or a single integer",
                )
            fill = torch.tensor(color, dtype=torch.uint8)
        else:
            fill = torch.full((channels,), color, dtype=torch.uint8)
        patch = fill.expand(p["size"], p["size"], channels).clone()
    row, col = _origin(spec, p["position"], patch.shape[0], patch.shape[1], height, width)
    return PatchTrigger(spec, shape, {"patch": patch, "origin": torch.tensor([row, col], dtype=torch.int64)})


def _build_blend(spec: TriggerSpec, shape) -> Trigger:
    height, width, channels = shape
    p = spec.params
    if "image" in p:
        pattern = _resize_pixels(_load_pixels(p["image"], p["image_sha256"], channels), height, width)
        pattern = torch.from_numpy(pattern.copy())
    else:
        # Generated on the CPU from the seed, so the same spec gives the same pattern everywhere.
        generator = torch.Generator(device="cpu").manual_seed(p["seed"])
        pattern = torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8)
    alpha = p["alpha"]
    scale = torch.full((1, 1, 1, 1), 1.0 - alpha, dtype=torch.float32)
    offset = (pattern.to(torch.float32) * alpha)[None]
    return AffineTrigger(spec, shape, {"scale": scale, "offset": offset})


def _build_sig(spec: TriggerSpec, shape) -> Trigger:
    _, width, _ = shape
    amplitude, frequency = spec.params["amplitude"], spec.params["frequency"]
    # Barni et al. 2019: v(j) = amplitude * sin(2 pi j f / W), the same for every row and channel.
    columns = torch.arange(width, dtype=torch.float64)
    signal = amplitude * torch.sin(2 * math.pi * columns * frequency / width)
    offset = signal.to(torch.float32).reshape(1, 1, width, 1)
    return AffineTrigger(spec, shape, {"scale": torch.ones(1, 1, 1, 1), "offset": offset})


def _build_image(spec: TriggerSpec, shape) -> Trigger:
    height, width, channels = shape
    p = spec.params
    picture = _load_pixels(p["image"], p["image_sha256"], channels)
    mask = _load_pixels(p["mask"], p["mask_sha256"], 1, mode_for_mask=True)
    if picture.shape[:2] != mask.shape[:2]:
        raise ConfigError(
            f"trigger spec {spec.source}: image is {picture.shape[1]}x{picture.shape[0]} but mask is "
            f"{mask.shape[1]}x{mask.shape[0]} pixels",
            hint="the mask must have the image's size",
        )
    row, col = _origin(spec, p["position"], picture.shape[0], picture.shape[1], height, width)
    h, w = picture.shape[:2]
    m = torch.zeros(1, height, width, 1, dtype=torch.float32)
    m[0, row : row + h, col : col + w] = torch.from_numpy(mask.copy()).to(torch.float32) / 255.0
    full = torch.zeros(1, height, width, channels, dtype=torch.float32)
    full[0, row : row + h, col : col + w] = torch.from_numpy(picture.copy()).to(torch.float32)
    return AffineTrigger(spec, shape, {"scale": 1.0 - m, "offset": m * full})


def _build_wanet(spec: TriggerSpec, shape) -> Trigger:
    height, width, _ = shape
    p = spec.params
    return WarpTrigger(spec, shape, {"grid": wanet_grid(p["k"], p["s"], p["seed"], p["grid_rescale"], height, width)})


def wanet_grid(k: int, s: float, seed: int, grid_rescale: float, height: int, width: int) -> torch.Tensor:
    """WaNet's warping grid (Nguyen & Tran, ICLR 2021) for `grid_sample`, shaped (1, H, W, 2) in [-1, 1].

    A random k x k field of 2-D offsets in [-1, 1] (from a CPU generator seeded with `seed`, so the
    grid is reproducible), normalised by its mean magnitude, upsampled bicubically to H x W, scaled by
    s / H and added to the identity grid, then multiplied by `grid_rescale` and clamped to [-1, 1].
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    field = torch.rand(1, 2, k, k, generator=generator, dtype=torch.float32) * 2 - 1
    magnitude = field.abs().mean()
    if magnitude > 0:
        field = field / magnitude
    field = F.interpolate(field, size=(height, width), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    rows = torch.linspace(-1, 1, height)
    cols = torch.linspace(-1, 1, width)
    grid_rows, grid_cols = torch.meshgrid(rows, cols, indexing="ij")
    identity = torch.stack((grid_cols, grid_rows), dim=-1)[None]  # grid_sample wants (x = column, y = row)
    return ((identity + s * field / height) * grid_rescale).clamp(-1, 1).contiguous()


_BUILDERS = {
    "patch": _build_patch,
    "blend": _build_blend,
    "sig": _build_sig,
    "wanet": _build_wanet,
    "image": _build_image,
}


def _origin(spec: TriggerSpec, position, h: int, w: int, height: int, width: int) -> tuple[int, int]:
    """Top-left corner of an h x w patch at `position`; refuses patches that do not fit."""
    if h > height or w > width:
        raise ConfigError(
            f"trigger spec {spec.source}: the {w}x{h} trigger is larger than the {width}x{height} images",
            hint="use a smaller size or image",
        )
    if isinstance(position, str):
        rows = {"top": 0, "bottom": height - h, "center": (height - h) // 2}
        cols = {"left": 0, "right": width - w, "center": (width - w) // 2}
        vertical, _, horizontal = position.partition("-")
        return rows[vertical], cols[horizontal or "center"]
    row, col = int(position[0]), int(position[1])
    if row + h > height or col + w > width:
        raise ConfigError(
            f"trigger spec {spec.source}: field 'position' [{row}, {col}] puts the {w}x{h} trigger "
            f"outside the {width}x{height} images",
            hint=f"row <= {height - h} and col <= {width - w}",
        )
    return row, col


# ---------------------------------------------------------------- poisoned sets


def make_poisoned_eval_set(trigger: Trigger, x: torch.Tensor, y: torch.Tensor):
    """Triggered copies of the images whose label is not the target, with their TRUE labels.

    Returns (x_poisoned, y_true, keep_mask). Target-class images are left out: classifying a
    target-class image as the target is correct behaviour, not a successful attack, and would
    inflate ASR by about 1/num_classes.
    """
    _check_pair(x, y)
    keep = y != trigger.target
    return trigger.apply(x[keep.to(x.device)]), y[keep], keep


def poison_training_set(trigger: Trigger, x: torch.Tensor, y: torch.Tensor, rate: float, seed: int):
    """Dirty-label all-to-one poisoning: round(rate * N) images chosen uniformly (seeded) among ALL
    classes get the trigger and the target label. Returns new (x, y) and the sorted int64 indices."""
    if not _is_number(rate) or not math.isfinite(rate) or not 0 <= rate <= 1:
        raise ConfigError(f"poison rate must be a number in [0, 1], got {_show(rate)}")
    if not _is_int(seed) or not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"seed must be an integer in [0, {MAX_SEED}], got {_show(seed)}")
    _check_pair(x, y)
    n = x.shape[0]
    count = round(float(rate) * n)  # Python's round: ties to even (rate 0.5 of 5 images poisons 2)
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    indices = torch.randperm(n, generator=generator)[:count].sort().values
    x_new, y_new = x.clone(), y.clone()
    if count:
        on_x = indices.to(x.device)
        x_new[on_x] = trigger.apply(x[on_x])
        y_new[indices.to(y.device)] = trigger.target
    return x_new, y_new, indices


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if (
        not isinstance(x, torch.Tensor)
        or not isinstance(y, torch.Tensor)
        or x.dim() < 1
        or y.dim() != 1
        or x.shape[0] != y.shape[0]
    ):
        xs = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        ys = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise InputError(f"images and labels do not match: images {xs}, labels {ys}")


# ---------------------------------------------------------------- small helpers


def _is_int(value: Any) -> bool:
    # bool is a subclass of int, but `size: true` is a mistake, not 1.
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _num(value: float) -> str:
    return f"{value:g}"


def _clip(text: str, limit: int = 120) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _show(value: Any) -> str:
    """A short rendering of a possibly hostile value for an error message. reprlib bounds the work:
    YAML aliases can nest shared lists into a structure whose full repr would be astronomically long."""
    try:
        text = _SHORT_REPR.repr(value)
    except Exception:  # noqa: BLE001 - never let a message fail
        text = f"<{type(value).__name__}>"
    return _clip(text, 60)


def _trigger_hint() -> str:
    return f"a built-in ({', '.join(BUILTIN_TRIGGERS)}) or a YAML spec file such as examples/triggers/badnets.yaml"
