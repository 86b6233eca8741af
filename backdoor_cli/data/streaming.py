"""A large image-folder split decoded batch by batch, so memory does not grow with the folder.

`FolderStream` stands where a resident `ImageSet` would (labels, image shape, subsets) but holds
only file names; `batches()` decodes in DECODE_WORKERS threads and keeps at most STREAM_AHEAD
batches queued ahead of the one the consumer holds, so at most STREAM_AHEAD + 1 batch buffers
(plus one image per worker being decoded) exist at any time.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .image_set import ImageSet, images_from_arrays
from .imagefolder import DECODE_WORKERS, FolderIndex, ImageSize, decode_all, decode_into, output_shape

STREAM_AHEAD = 2  # batches decoding while the consumer works on the current one


@dataclass(frozen=True)
class FolderStream:
    """An image-folder split read lazily: file names and labels now, pixels batch by batch."""

    files: tuple[Path, ...]
    y: torch.Tensor  # int64 labels, resident (cheap)
    mode: str
    shape: tuple[int, int, int]  # (H, W, C) of every decoded image
    image_size: ImageSize | None
    source: str

    @classmethod
    def from_index(cls, index: FolderIndex, image_size: ImageSize | None) -> FolderStream:
        return cls(
            index.files,
            torch.from_numpy(index.labels),
            index.mode,
            output_shape(index, image_size),
            image_size,
            str(index.path),
        )

    @property
    def num_images(self) -> int:
        return len(self.files)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.shape

    def subset(self, indices: torch.Tensor) -> FolderStream:
        idx = torch.as_tensor(indices, dtype=torch.long).cpu()
        return FolderStream(
            tuple(self.files[i] for i in idx.tolist()), self.y[idx], self.mode, self.shape, self.image_size, self.source
        )

    def materialize(self) -> ImageSet:
        """Every image decoded into one resident ImageSet (for the small clean tuning subset)."""
        x = decode_all(self.files, self.mode, self.image_size, self.shape)
        return images_from_arrays(x, self.y.numpy(), self.source)

    def batches(
        self, batch_size: int, workers: int = DECODE_WORKERS, ahead: int = STREAM_AHEAD
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(uint8 NHWC images, int64 labels) on the CPU, in file order, batch_size at a time."""
        starts = iter(range(0, self.num_images, batch_size))
        pending: deque = deque()
        with ThreadPoolExecutor(max(1, workers)) as pool:

            def queue_next() -> None:
                start = next(starts, None)
                if start is not None:
                    files = self.files[start : start + batch_size]
                    out = np.empty((len(files), *self.shape), dtype=np.uint8)
                    pending.append((start, out, decode_into(out, files, self.mode, self.image_size, pool)))

            try:
                for _ in range(max(1, ahead)):
                    queue_next()
                while pending:
                    start, out, futures = pending.popleft()
                    for future in futures:
                        future.result()
                    queue_next()
                    yield torch.from_numpy(out), self.y[start : start + len(out)]
            finally:
                for _, _, futures in pending:
                    for future in futures:
                        future.cancel()


def materialize(split) -> ImageSet:
    """A resident ImageSet from either kind of split."""
    return split.materialize() if isinstance(split, FolderStream) else split
