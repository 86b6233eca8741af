"""Images in, uint8 tensors out: dataset layouts, clean-subset selection, and the batched fast path.

Everything downstream works on `ImageSet` (image_set.py): uint8 NHWC images and int64 labels that can live on
the device. Normalisation and augmentation are whole-batch tensor ops (`normalize`,
`augment_batch`), so a training step never touches PIL or Python per image.

Layouts `load_dataset` understands (all read without unpickling anything):
  * an npz directory: `train.npz` / `test.npz`, each with `x` (uint8 NHWC or NHW) and `y` labels;
  * a single `.npz` file (used as the test split);
  * an ImageFolder directory: `train/<class>/*.png|jpg` and `test/<class>/...` (imagefolder.py);
  * a dataset name (`cifar10`, `mnist`, ...) looked up as `<data-dir>/<name>` in one of the above,
    or in torchvision's download folders under `<data-dir>` (see standard_layouts.py).

Image folders whose images differ in size need `image_size` (`--image-size`): every image is then
resized and centre-cropped to it (imagefolder.py). A folder split whose decoded images would take
more than STREAM_MIN_BYTES stays on disk as a `FolderStream` (streaming.py), decoded batch by batch
when evaluated; smaller ones, and npz data, are read resident as before.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, InputError
from .image_set import ImageSet, images_from_arrays  # defined there (streaming.py needs them too), used from here
from .imagefolder import ImageSize, clip, folder_classes, index_folder
from .streaming import FolderStream


@dataclass(frozen=True)
class DatasetInfo:
    """What is known about a standard dataset: its class count and usual normalisation."""

    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    flip: bool  # horizontal flips are label-preserving (not for digits or traffic signs)


DATASET_DEFAULTS: dict[str, DatasetInfo] = {
    "cifar10": DatasetInfo(10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), True),
    "cifar100": DatasetInfo(100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), True),
    "mnist": DatasetInfo(10, (0.1307,), (0.3081,), False),
    "fashion-mnist": DatasetInfo(10, (0.2860,), (0.3530,), False),
    "gtsrb": DatasetInfo(43, (0.3337, 0.3064, 0.3171), (0.2672, 0.2564, 0.2629), False),
    "tiny-imagenet": DatasetInfo(200, (0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262), True),
}
# Data of unknown origin: map pixels to [-1, 1]. Checkpoints made by bdclean carry their own values.
UNKNOWN_MEAN, UNKNOWN_STD = (0.5,), (0.5,)
DATA_DIR_ENV = "BDCLEAN_DATA_DIR"
# An image-folder split larger than this once decoded (N x H x W x C bytes) is streamed, not resident:
# 5,000 images at 224 px are 750 MB, CIFAR-sized or Tiny-ImageNet folders (30 / 123 MB) stay resident.
STREAM_MIN_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class DatasetBundle:
    """A dataset as the pipeline sees it: splits, class count, normalisation defaults, provenance."""

    name: str
    train: ImageSet | FolderStream | None  # a FolderStream only for large image folders (STREAM_MIN_BYTES)
    test: ImageSet | FolderStream
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment_flip: bool
    source: str


# ---------------------------------------------------------------- loading


def canonical_name(name: str) -> str:
    """'CIFAR-10', 'cifar_10', 'tiny_imagenet' -> the keys of DATASET_DEFAULTS."""
    key = name.lower().replace("_", "-")
    aliases = {
        "cifar-10": "cifar10",
        "cifar-100": "cifar100",
        "tinyimagenet": "tiny-imagenet",
        "tiny-imagenet-200": "tiny-imagenet",
        "fashionmnist": "fashion-mnist",
    }
    return aliases.get(key, key)


def default_data_dir() -> Path:
    return Path(os.environ.get(DATA_DIR_ENV) or "data")


def load_dataset(
    spec: str, data_dir: str | None = None, need_train: bool = True, image_size: ImageSize | None = None
) -> DatasetBundle:
    """Load a dataset from a path or a name; `need_train=False` skips reading the training split.

    `image_size` (height, width) is the model's input size, from `--image-size` or a model loader's
    own config: image folders are resized and centre-cropped to it (imagefolder.py); npz data must
    already have that size. None keeps the images' own (common) size.
    """
    path = Path(spec).expanduser()
    if not path.exists():
        name = canonical_name(spec)
        root = Path(data_dir).expanduser() if data_dir else default_data_dir()
        if name in DATASET_DEFAULTS and "/" not in spec:
            candidates = [root / spec, root / name]
            path = next((c for c in candidates if c.exists()), candidates[0])
            if not path.exists():
                from .standard_layouts import read_standard_layout

                found = read_standard_layout(name, root, need_train)
                if found is not None:
                    return _check_size(_bundle_from_arrays(name, *found), image_size)
                raise InputError(
                    f"dataset '{spec}' not found under {root}",
                    hint=f"pass --data-dir DIR holding {name}/ (train.npz/test.npz or train/ and test/ "
                    f"class folders) or torchvision's download folder, set {DATA_DIR_ENV}, "
                    "or give --data a directory",
                )
        else:
            raise InputError(
                f"data not found: {spec}",
                hint=f"a directory (train.npz/test.npz or ImageFolder), an .npz file, or one of "
                f"{', '.join(DATASET_DEFAULTS)} with --data-dir",
            )
    name = canonical_name(path.stem if path.is_file() else path.name)
    info = DATASET_DEFAULTS.get(name)
    if path.is_file():
        if path.suffix != ".npz":
            raise InputError(f"{path}: a data file must be .npz with arrays x and y")
        test, train, classes = _sized(read_npz_split(path), image_size), None, None
    elif (path / "test.npz").exists() or (path / "train.npz").exists():
        if not (path / "test.npz").exists():
            raise InputError(f"{path} has train.npz but no test.npz", hint="evaluation needs a test split")
        # One split after the other: numpy parses each .npy header with ast.literal_eval, and CPython 3.11's
        # AST conversion is not thread-safe (reading both splits in two threads failed a later compile with
        # "AST constructor recursion depth mismatch"), for 0.07 s saved.
        test = _sized(read_npz_split(path / "test.npz"), image_size)
        train = (
            _sized(read_npz_split(path / "train.npz"), image_size)
            if need_train and (path / "train.npz").exists()
            else None
        )
        classes = None
    elif (path / "test").is_dir():
        classes = folder_classes(path / "train") if (path / "train").is_dir() else folder_classes(path / "test")
        test = read_folder_split(path / "test", classes, image_size)
        train = (
            read_folder_split(path / "train", classes, image_size) if need_train and (path / "train").is_dir() else None
        )
    elif path.is_dir():
        raise InputError(
            f"{path} holds no dataset",
            hint="expected train.npz/test.npz, or train/ and test/ folders with one subfolder per class",
        )
    else:
        raise InputError(f"{path} is not a regular file or directory")
    if train is not None and train.image_shape != test.image_shape:
        raise InputError(f"{path}: train images are {train.image_shape} but test images are {test.image_shape}")
    if info is not None:
        num_classes = info.num_classes
    elif classes is not None:
        num_classes = len(classes)
    else:
        num_classes = 1 + max(int(s.y.max()) for s in (train, test) if s is not None)
    for split_name, split in (("train", train), ("test", test)):
        if split is not None and int(split.y.max()) >= num_classes:
            raise InputError(
                f"{path}: {split_name} label {int(split.y.max())} is out of range for {name} ({num_classes} classes)"
            )
    channels = test.image_shape[2]
    if info is not None and len(info.mean) == channels:
        mean, std, flip = info.mean, info.std, info.flip
    else:
        mean, std, flip = UNKNOWN_MEAN * channels, UNKNOWN_STD * channels, True
    return DatasetBundle(
        name=name,
        train=train,
        test=test,
        num_classes=num_classes,
        mean=tuple(mean),
        std=tuple(std),
        augment_flip=flip,
        source=str(path),
    )


def _bundle_from_arrays(name: str, train, test, source: Path) -> DatasetBundle:
    info = DATASET_DEFAULTS[name]
    test_set = images_from_arrays(test[0], test[1], f"{source} (test)")
    train_set = images_from_arrays(train[0], train[1], f"{source} (train)") if train is not None else None
    for split_name, split in (("train", train_set), ("test", test_set)):
        if split is not None and int(split.y.max()) >= info.num_classes:
            raise InputError(f"{source}: {split_name} label {int(split.y.max())} is out of range for {name}")
    return DatasetBundle(
        name=name,
        train=train_set,
        test=test_set,
        num_classes=info.num_classes,
        mean=info.mean,
        std=info.std,
        augment_flip=info.flip,
        source=str(source),
    )


class ImageSizeError(InputError):
    """Array (npz) images whose stored size is not the one asked for: they are never resized."""

    def __init__(self, message: str, hint: str, stored: tuple[int, int]):
        super().__init__(message, hint=hint)
        self.stored = stored


def _sized(split: ImageSet, image_size: ImageSize | None) -> ImageSet:
    """npz images are used as stored: with an image_size, they must already have it."""
    if image_size is not None and split.image_shape[:2] != tuple(image_size):
        h, w, _ = split.image_shape
        raise ImageSizeError(
            f"the images are {w}x{h} pixels but --image-size asks for {image_size[1]}x{image_size[0]}",
            hint="--image-size resizes image folders only; resize array data before saving it",
            stored=(h, w),
        )
    return split


def _check_size(bundle: DatasetBundle, image_size: ImageSize | None) -> DatasetBundle:
    for split in (bundle.train, bundle.test):
        if split is not None:
            _sized(split, image_size)
    return bundle


def load_clean_folder(spec: str, image_size: ImageSize | None = None) -> ImageSet:
    """A defender's own clean images: an .npz file, an npz directory (its train.npz, else test.npz),
    or a folder with one subfolder per class (labels are the sorted folder names' positions).
    Always resident; `image_size` as for load_dataset."""
    path = Path(spec).expanduser()
    if not path.exists():
        raise InputError(f"--clean-data {spec} does not exist")
    if path.is_file():
        return _sized(read_npz_split(path), image_size)
    for name in ("train.npz", "test.npz"):
        if (path / name).exists():
            return _sized(read_npz_split(path / name), image_size)
    if (path / "train").is_dir():
        path = path / "train"
    return read_image_folder(path, folder_classes(path), image_size)


def read_npz_split(path: Path) -> ImageSet:
    """One split from an .npz (never unpickles: object arrays are refused)."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "x" not in archive.files or "y" not in archive.files:
                raise InputError(f"{path}: needs arrays 'x' (images) and 'y' (labels), found {sorted(archive.files)}")
            x, y = archive["x"], archive["y"]
    except InputError:
        raise
    except (ValueError, OSError, zipfile.BadZipFile, EOFError, KeyError) as e:
        raise InputError(
            f"{path}: not a readable .npz archive ({clip(str(e) or type(e).__name__)})",
            hint="numpy.savez(path, x=uint8 images, y=labels); pickled arrays are refused",
        ) from None
    return images_from_arrays(x, y, str(path))


def read_folder_split(path: Path, classes: list[str], image_size: ImageSize | None = None):
    """One image-folder split: resident (ImageSet) when its decoded images fit in STREAM_MIN_BYTES,
    else a FolderStream decoded batch by batch. Every header is checked first either way."""
    stream = FolderStream.from_index(index_folder(path, classes), image_size)
    h, w, c = stream.image_shape
    if stream.num_images * h * w * c > STREAM_MIN_BYTES:
        return stream
    return stream.materialize()


def read_image_folder(path: Path, classes: list[str], image_size: ImageSize | None = None) -> ImageSet:
    """Images under path/<class>/ -> one resident ImageSet. Without image_size all images must share
    one size; grayscale images in a colour dataset are replicated to RGB (common in real folders,
    e.g. Tiny-ImageNet)."""
    return FolderStream.from_index(index_folder(path, classes), image_size).materialize()


# ---------------------------------------------------------------- subsets


def select_clean_subset(
    y: torch.Tensor, fraction: float | None, count: int | None, seed: int, num_classes: int
) -> torch.Tensor:
    """Seeded, class-balanced indices of the defender's clean data (sorted int64).

    Each class gets total // C images and the remainder goes to randomly drawn classes, so a 2%
    subset of CIFAR-10 is 100 images per class, as in the FST paper's setting.
    """
    if fraction is not None and count is not None:
        raise ConfigError("give either --clean-fraction or --clean-count, not both")
    if fraction is None and count is None:
        raise ConfigError("the clean subset needs --clean-fraction or --clean-count")
    n = int(y.shape[0])
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise ConfigError(f"--clean-fraction must be in (0, 1], got {fraction}")
        total = round(fraction * n)
    else:
        if count < 1:
            raise ConfigError(f"--clean-count must be >= 1, got {count}")
        if count > n:
            raise ConfigError(f"--clean-count {count} is larger than the {n} training images")
        total = count
    if total == 0:
        raise ConfigError(
            f"the clean subset would be empty ({fraction} of {n} images)",
            hint="raise --clean-fraction or use --clean-count",
        )
    generator = torch.Generator().manual_seed(seed)
    labels = y.cpu()
    counts = torch.bincount(labels, minlength=num_classes)
    present = torch.nonzero(counts).flatten()
    quota = torch.zeros(num_classes, dtype=torch.long)
    quota[present] = total // len(present)
    extra = present[torch.randperm(len(present), generator=generator)[: total % len(present)]]
    quota[extra] += 1
    chosen = []
    for cls in present.tolist():
        members = torch.nonzero(labels == cls).flatten()
        take = min(int(quota[cls]), len(members))
        chosen.append(members[torch.randperm(len(members), generator=generator)[:take]])
    indices = torch.cat(chosen).sort().values
    if len(torch.unique(labels[indices])) < 2:
        raise ConfigError(
            f"the clean subset ({len(indices)} image(s)) holds a single class; "
            "tuning needs clean images of at least 2 classes",
            hint="raise --clean-count",
        )
    return indices


def stratified_limit(y: torch.Tensor, limit: int, seed: int) -> torch.Tensor:
    """`limit` seeded indices keeping the class proportions of `y` (sorted int64)."""
    n = int(y.shape[0])
    if limit >= n:
        return torch.arange(n)
    if limit < 1:
        raise ConfigError(f"limit must be >= 1, got {limit}")
    generator = torch.Generator().manual_seed(seed)
    labels = y.cpu()
    perm = torch.randperm(n, generator=generator)
    # Position of each image among its class in the shuffled order, as a fraction of the class size:
    # taking the smallest fractions takes every class in proportion.
    order = torch.sort(labels[perm], stable=True).indices
    sorted_labels = labels[perm][order]
    counts = torch.bincount(sorted_labels)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(n) - starts[sorted_labels]
    key = (rank.double() + 0.5) / counts[sorted_labels].double()
    picked = perm[order[torch.sort(key, stable=True).indices[:limit]]]
    return picked.sort().values


def indices_sha256(indices: torch.Tensor) -> str:
    """sha256 of the indices written one per line: equals `sha256sum clean_indices.txt`."""
    text = "".join(f"{i}\n" for i in indices.tolist())
    return hashlib.sha256(text.encode()).hexdigest()


# ---------------------------------------------------------------- batch ops (the fast path)


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> float NCHW, (x/255 - mean) / std.

    The permute is a view: the result has channels_last strides without a copy, which is the
    memory format convolutions prefer on GPU (and on CPU with oneDNN).
    """
    return x.permute(0, 3, 1, 2).float().div_(255.0).sub_(mean).div_(std)


def augment_batch(x: torch.Tensor, generator: torch.Generator, flip: bool = True, pad: int = 4) -> torch.Tensor:
    """Random crop with zero padding plus optional horizontal flip, for a whole uint8 NHWC batch at once.

    One gather does both: each image reads rows oy..oy+H and columns ox..ox+W of its padded copy,
    the columns reversed when it is flipped.
    """
    n, h, w, _ = x.shape
    device = x.device
    if pad > 0:
        padded = torch.nn.functional.pad(x, (0, 0, pad, pad, pad, pad))
        oy = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=generator.device).to(device)
        ox = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=generator.device).to(device)
    else:
        padded = x
        oy = ox = torch.zeros(n, dtype=torch.long, device=device)
    cols = torch.arange(w, device=device).expand(n, w)
    if flip:
        flips = torch.rand(n, generator=generator, device=generator.device).to(device) < 0.5
        cols = torch.where(flips[:, None], (w - 1) - cols, cols)
    rows = oy[:, None] + torch.arange(h, device=device)
    cols = ox[:, None] + cols
    batch = torch.arange(n, device=device)[:, None, None]
    return padded[batch, rows[:, :, None], cols[:, None, :]]


def iterate_minibatches(n: int, batch_size: int, generator: torch.Generator, shuffle: bool = True):
    """Index tensors (on the generator's device) covering 0..n-1 once, shuffled by `generator`."""
    order = (
        torch.randperm(n, generator=generator, device=generator.device)
        if shuffle
        else torch.arange(n, device=generator.device)
    )
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]
