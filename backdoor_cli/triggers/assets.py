"""Trigger files: bounded reads of regular files only, image decoding that checks the size before the pixels.

Trigger pictures and masks come from users and downloaded specs: a file is size-checked before it is read
(FIFOs, devices and directories are refused), its header before its pixels are decoded, and only a few common
formats are decoded at all. Every failure is a ConfigError naming the file.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import warnings
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from .values import clip

# A trigger picture is a few hundred pixels; these bounds only stop files crafted to exhaust memory
# (decompression bombs) before any decoding happens.
MAX_IMAGE_SIDE = 4096
MAX_IMAGE_BYTES = 50 * 1024 * 1024
# Image formats we decode; others (TIFF, PSD, ...) are refused to keep the decoder surface small.
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP")


def read_image_file(path: Path, what: str) -> bytes:
    """The bytes of a trigger picture or mask, at most MAX_IMAGE_BYTES of a regular file."""
    return read_bounded(path, MAX_IMAGE_BYTES, what)


def read_bounded(path: Path, limit: int, what: str) -> bytes:
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


def decode_image(data: bytes, what: str):
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
        reason = clip(str(e) or type(e).__name__)
        raise ConfigError(
            f"{what}: not a readable image ({', '.join(IMAGE_FORMATS)}): {reason}",
            hint="check the file, or re-save it as PNG",
        ) from None


def load_pixels(path: str, sha256: str, channels: int, mode_for_mask: bool = False) -> np.ndarray:
    """Read an image recorded in a spec, check its hash, return uint8 (h, w, channels)."""
    what = f"trigger image {path}"
    data = read_image_file(Path(path), what)
    if hashlib.sha256(data).hexdigest() != sha256:
        raise ConfigError(f"{what}: the file changed since the trigger spec was read (sha256 differs)")
    image = decode_image(data, what)
    # Masks are grayscale whatever the file holds; pictures take the data's channel count.
    # Converting drops any alpha channel (use type: image with a mask for shaped triggers).
    mode = "L" if mode_for_mask or channels == 1 else "RGB"
    array = np.asarray(image.convert(mode), dtype=np.uint8)
    return array[:, :, None] if array.ndim == 2 else array


def resize_pixels(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """PIL bilinear resize of uint8 (h, w, c) pixels to (height, width, c)."""
    from PIL import Image

    if pixels.shape[:2] == (height, width):
        return pixels
    image = Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)
    out = np.asarray(image.resize((width, height), Image.BILINEAR), dtype=np.uint8)
    return out[:, :, None] if out.ndim == 2 else out
