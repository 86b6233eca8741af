"""Built triggers: a spec's tensors for one image shape, applied to uint8 batches with whole-batch tensor ops.

Built triggers work on uint8 image batches shaped (N, H, W, C), C = 1 or 3, on any device, with
whole-batch tensor ops only. Output is uint8 of the same shape on the same device:
- `patch` copies pixels, so it is exact;
- `blend`, `sig` and `image` compute x * scale + offset in float32, then round to the nearest
  integer (ties to even, `torch.round`) and clamp to [0, 255];
- `wanet` resamples bilinearly in float32 (`grid_sample`, align_corners=True), then rounds and
  clamps the same way.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import ConfigError, InputError
from .assets import load_pixels, resize_pixels
from .spec import TriggerSpec
from .values import is_int, show

# Elements per apply() chunk: bounds the float32 temporaries of big batches (~64 MB each).
APPLY_CHUNK_ELEMENTS = 2**24


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
    if len(shape) != 3 or not all(is_int(v) and v > 0 for v in shape) or shape[2] not in (1, 3):
        raise InputError(f"triggers need images shaped (H, W, C) with C = 1 or 3, got {show(image_shape)}")
    shape = tuple(int(v) for v in shape)
    if spec.type not in _BUILDERS:
        raise ConfigError(f"trigger spec {spec.source}: unknown type {show(spec.type)}")
    if not is_int(spec.target) or spec.target < 0:
        raise ConfigError(
            f"trigger spec {spec.source}: field 'target' must be an integer >= 0, got {show(spec.target)}"
        )
    return _BUILDERS[spec.type](spec, shape)


def _build_patch(spec: TriggerSpec, shape) -> Trigger:
    height, width, channels = shape
    p = spec.params
    if "image" in p:
        patch = torch.from_numpy(load_pixels(p["image"], p["image_sha256"], channels).copy())
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
        pattern = resize_pixels(load_pixels(p["image"], p["image_sha256"], channels), height, width)
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
    picture = load_pixels(p["image"], p["image_sha256"], channels)
    mask = load_pixels(p["mask"], p["mask_sha256"], 1, mode_for_mask=True)
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
