"""Image folders (`<split>/<class>/<image files>`): list the files, check each header, decode safely,
and bring every image to one size with the standard ImageNet evaluation transform.

The transform for an input size H x W (`--image-size N` is N x N):
  1. resize, keeping the aspect ratio, to the smallest size that covers round(H / 0.875) x
     round(W / 0.875) (PIL bilinear, antialiased when shrinking). For a square N this is the usual
     "shorter side to round(N / 0.875)": 256 for 224;
  2. centre-crop H x W.

Untrusted files: every image's size is read from its header and checked (MAX_IMAGE_SIDE per side,
PIL's MAX_IMAGE_PIXELS decompression-bomb limit) before its pixels are decoded, and checked again
in the same open file just before decoding. No warnings filter is needed for the bomb check, so
decoding is safe to run in threads (PIL releases the GIL while it decodes and resizes).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff")
MAX_IMAGE_SIDE = 4096  # per image in an ImageFolder; checked from the header before decoding
CROP_FRACTION = 0.875  # ImageNet evaluation: resize to size / 0.875, then centre-crop size
GRAY_MODES = ("L", "1", "I", "I;16", "F")
DECODE_WORKERS = min(8, os.cpu_count() or 1)
TRANSFORM = "resize to cover round(H / 0.875) x round(W / 0.875) (bilinear), then centre-crop H x W"

ImageSize = tuple[int, int]  # (height, width) of the model's input


@dataclass(frozen=True)
class FolderIndex:
    """The files of one split, their labels, and what their headers say (nothing decoded yet)."""

    path: Path
    files: tuple[Path, ...]
    labels: np.ndarray  # int64, one per file
    mode: str  # "RGB" if any image has colour, else "L": every image is converted to it
    sizes: tuple[tuple[int, int], ...]  # (width, height) per file, from the header

    @property
    def channels(self) -> int:
        return 3 if self.mode == "RGB" else 1


def folder_classes(path: Path) -> list[str]:
    """The sorted class subfolders of a split (labels are their positions)."""
    classes = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise InputError(f"{path} has no class subfolders", hint="ImageFolder layout: DIR/<class>/<image files>")
    return classes


def index_folder(path: Path, classes: list[str]) -> FolderIndex:
    """List path/<class>/<images> for the given classes and read every header (size limits checked)."""
    present = set(folder_classes(path))
    unknown = sorted(present - set(classes))
    if unknown:
        raise InputError(f"{path} has classes not in the training split: {', '.join(unknown[:5])}")
    files: list[Path] = []
    labels: list[int] = []
    for label, cls in enumerate(classes):
        folder = path / cls
        if folder.is_dir():
            found = [f for f in sorted(folder.iterdir()) if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]
            files += found
            labels += [label] * len(found)
    if not files:
        raise InputError(f"{path} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    headers = [image_header(f) for f in files]
    mode = "RGB" if any(m not in GRAY_MODES for m, _ in headers) else "L"
    return FolderIndex(path, tuple(files), np.array(labels, dtype=np.int64), mode, tuple(s for _, s in headers))


def common_size(index: FolderIndex) -> tuple[int, int]:
    """(width, height) shared by every image of the split, or an error naming the first odd one."""
    size = index.sizes[0]
    for f, s in zip(index.files, index.sizes):
        if s != size:
            raise InputError(
                f"{f}: image is {s[0]}x{s[1]} but the others are {size[0]}x{size[1]}",
                hint="pass --image-size N (or H,W), e.g. 224, to resize and centre-crop every image "
                "to the model's input size",
            )
    return size


def output_shape(index: FolderIndex, image_size: ImageSize | None) -> tuple[int, int, int]:
    """(H, W, C) of the decoded images: the common size, or image_size when resizing."""
    if image_size is None:
        width, height = common_size(index)
        return height, width, index.channels
    return image_size[0], image_size[1], index.channels


def resized_size(width: int, height: int, image_size: ImageSize) -> tuple[int, int]:
    """(width, height) after step 1 of the transform: the smallest aspect-preserving size covering
    round(H / 0.875) x round(W / 0.875)."""
    cover_h, cover_w = round(image_size[0] / CROP_FRACTION), round(image_size[1] / CROP_FRACTION)
    scale = max(cover_h / height, cover_w / width)
    return max(cover_w, round(width * scale)), max(cover_h, round(height * scale))


def centre_box(width: int, height: int, image_size: ImageSize) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the centred H x W crop of a width x height image."""
    top, left = (height - image_size[0]) // 2, (width - image_size[1]) // 2
    return left, top, left + image_size[1], top + image_size[0]


def decode_image(path: Path, mode: str, image_size: ImageSize | None) -> np.ndarray:
    """One image as uint8 (H, W, C) in `mode`, resized and centre-cropped when image_size is given."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            _check_size(path, image.size)  # again, in this open file: it may have changed since indexing
            image = image.convert(mode)
            if image_size is not None:
                width, height = resized_size(image.width, image.height, image_size)
                image = image.resize((width, height), Image.Resampling.BILINEAR)
                image = image.crop(centre_box(width, height, image_size))
            pixels = np.asarray(image, dtype=np.uint8)
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - PIL raises many types for corrupt files
        raise InputError(f"{path}: not a readable image ({clip(str(e) or type(e).__name__)})") from None
    return pixels.reshape(pixels.shape[0], pixels.shape[1], -1)


def decode_into(
    out: np.ndarray,
    files: tuple[Path, ...] | list[Path],
    mode: str,
    image_size: ImageSize | None,
    pool: ThreadPoolExecutor,
) -> list:
    """Queue the decoding of files[i] into out[i] on the pool; returns the futures (result() raises)."""
    return [pool.submit(_decode_slot, out, i, f, mode, image_size) for i, f in enumerate(files)]


def _decode_slot(out: np.ndarray, i: int, path: Path, mode: str, image_size: ImageSize | None) -> None:
    pixels = decode_image(path, mode, image_size)
    if pixels.shape != out.shape[1:]:
        raise InputError(
            f"{path}: image is {pixels.shape[1]}x{pixels.shape[0]}, expected "
            f"{out.shape[2]}x{out.shape[1]} (did the file change while it was read?)"
        )
    out[i] = pixels


def decode_all(
    files: tuple[Path, ...], mode: str, image_size: ImageSize | None, shape: tuple[int, int, int]
) -> np.ndarray:
    """Decode every file into one uint8 (N, *shape) array, in DECODE_WORKERS threads."""
    x = np.empty((len(files), *shape), dtype=np.uint8)
    with ThreadPoolExecutor(DECODE_WORKERS) as pool:
        for future in decode_into(x, files, mode, image_size, pool):
            future.result()
    return x


def image_header(path: Path) -> tuple[str, tuple[int, int]]:
    """(mode, (width, height)) from the header only, refusing oversized images before any decoding."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            mode, size = image.mode, image.size
    except Exception as e:  # noqa: BLE001
        raise InputError(f"{path}: not a readable image ({clip(str(e) or type(e).__name__)})") from None
    _check_size(path, size)
    return mode, size


def _check_size(path: Path, size: tuple[int, int]) -> None:
    from PIL import Image

    if not (0 < size[0] <= MAX_IMAGE_SIDE and 0 < size[1] <= MAX_IMAGE_SIDE):
        raise InputError(f"{path}: image is {size[0]}x{size[1]} pixels (limit {MAX_IMAGE_SIDE} per side)")
    if Image.MAX_IMAGE_PIXELS is not None and size[0] * size[1] > Image.MAX_IMAGE_PIXELS:
        raise InputError(
            f"{path}: image has {size[0] * size[1]} pixels, over PIL's decompression-bomb limit "
            f"({Image.MAX_IMAGE_PIXELS})"
        )


def clip(text: str, limit: int = 120) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
