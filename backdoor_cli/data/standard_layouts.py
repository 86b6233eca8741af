"""Datasets in the layouts users already have on disk: torchvision's download folders.

    <data-dir>/cifar-10-batches-py/{data_batch_1..5, test_batch}     CIFAR-10 (python pickles)
    <data-dir>/cifar-100-python/{train, test}                        CIFAR-100 (python pickles)
    <data-dir>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]          MNIST (IDX)
    <data-dir>/FashionMNIST/raw/...                                  Fashion-MNIST (IDX)

The CIFAR archives are pickles, so they are read with an unpickler that can only rebuild numpy
arrays: any other global in the file is refused (exit 3), exactly as for checkpoints. IDX files
are parsed from their header; nothing is executed.
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
from pathlib import Path

import numpy as np

from ..errors import InputError, UnsafeInputError

MAX_ARCHIVE_BYTES = 512 * 1024**2
# The only globals a CIFAR batch needs: numpy's array reconstruction (module moved in numpy 2).
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),  # protocol-2 pickles of bytes written by Python 3
}


class _ArraysOnlyUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, path: Path):
        super().__init__(io.BytesIO(data), encoding="bytes")
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise UnsafeInputError(
                f"refused {self.path}: the dataset pickle would import {module}.{name} "
                "(loading it could run arbitrary code)"
            )
        return super().find_class(module, name)


def _read(path: Path) -> bytes:
    size = path.stat().st_size
    if size > MAX_ARCHIVE_BYTES:
        raise InputError(f"{path} is {size} bytes, over the {MAX_ARCHIVE_BYTES} byte limit for a dataset file")
    data = path.read_bytes()
    if path.suffix == ".gz":
        try:
            with gzip.GzipFile(fileobj=io.BytesIO(data)) as handle:
                data = handle.read(MAX_ARCHIVE_BYTES + 1)
        except (OSError, EOFError) as e:
            raise InputError(f"{path}: not a readable gzip file ({e})") from None
        if len(data) > MAX_ARCHIVE_BYTES:
            raise InputError(f"{path}: decompresses to more than {MAX_ARCHIVE_BYTES} bytes")
    return data


def _cifar_batch(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    try:
        batch = _ArraysOnlyUnpickler(_read(path), path).load()
    except UnsafeInputError:
        raise
    except Exception as e:  # noqa: BLE001 - a corrupt pickle raises many types
        raise InputError(f"{path}: not a readable CIFAR batch ({type(e).__name__}: {str(e)[:80]})") from None
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        raise InputError(f"{path}: not a CIFAR batch (expected keys data and {label_key.decode()})")
    x = np.asarray(batch[b"data"])
    y = np.asarray(batch[label_key])
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32:
        raise InputError(f"{path}: CIFAR data must be uint8 (N, 3072), got {x.dtype} {x.shape}")
    # Stored as N x (R plane, G plane, B plane) of 32x32: to NHWC.
    return x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), y.astype(np.int64)


def _idx(path: Path, rank: int) -> np.ndarray:
    data = _read(path)
    if len(data) < 4 + 4 * rank or data[:2] != b"\x00\x00" or data[2] != 0x08 or data[3] != rank:
        raise InputError(f"{path}: not an IDX file of unsigned bytes with {rank} dimension(s)")
    dims = struct.unpack(f">{rank}I", data[4 : 4 + 4 * rank])
    body = data[4 + 4 * rank :]
    if len(body) != int(np.prod(dims, dtype=np.int64)):
        raise InputError(f"{path}: header says {dims} but the file holds {len(body)} bytes (truncated?)")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims).copy()  # writable: torch shares the buffer


def _first(*candidates: Path) -> Path | None:
    return next((c for c in candidates if c.exists()), None)


def _mnist_like(raw: Path, need_train: bool):
    def pair(prefix: str):
        images = _first(raw / f"{prefix}-images-idx3-ubyte", raw / f"{prefix}-images-idx3-ubyte.gz")
        labels = _first(raw / f"{prefix}-labels-idx1-ubyte", raw / f"{prefix}-labels-idx1-ubyte.gz")
        if images is None or labels is None:
            raise InputError(f"{raw}: missing {prefix}-images-idx3-ubyte or {prefix}-labels-idx1-ubyte")
        return _idx(images, 3), _idx(labels, 1).astype(np.int64)

    return (pair("train") if need_train else None), pair("t10k")


def read_standard_layout(name: str, root: Path, need_train: bool):
    """((x, y) train or None, (x, y) test, source path) for a torchvision folder under `root`, or None."""
    if name == "cifar10" and (root / "cifar-10-batches-py" / "test_batch").exists():
        folder = root / "cifar-10-batches-py"
        train = None
        if need_train:
            parts = [_cifar_batch(folder / f"data_batch_{i}", b"labels") for i in range(1, 6)]
            train = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
        return train, _cifar_batch(folder / "test_batch", b"labels"), folder
    if name == "cifar100" and (root / "cifar-100-python" / "test").exists():
        folder = root / "cifar-100-python"
        train = _cifar_batch(folder / "train", b"fine_labels") if need_train else None
        return train, _cifar_batch(folder / "test", b"fine_labels"), folder
    folders = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
    if name in folders and (root / folders[name] / "raw").is_dir():
        raw = root / folders[name] / "raw"
        train, test = _mnist_like(raw, need_train)
        return train, test, raw
    return None
