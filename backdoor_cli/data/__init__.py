"""Data: images in, uint8 tensors out - dataset layouts, image folders, streaming, clean subsets, batch ops.

- datasets: the layouts `load_dataset` reads, clean-subset selection, batched normalise/augment
- image_set: ImageSet (uint8 images + labels on one device) and the checks raw arrays pass to become one
- imagefolder: image folders - listing, header checks, safe decoding, resize + centre-crop
- streaming: FolderStream, a large folder split decoded batch by batch
- standard_layouts: torchvision's download folders
- augmentation: which augmentation tuning uses, decided from the data
"""

from .augmentation import decide_augmentation
from .datasets import (
    DatasetBundle,
    ImageSizeError,
    augment_batch,
    canonical_name,
    indices_sha256,
    iterate_minibatches,
    load_clean_folder,
    load_dataset,
    normalize,
    select_clean_subset,
    stratified_limit,
)
from .image_set import ImageSet
from .imagefolder import MAX_IMAGE_SIDE, TRANSFORM
from .streaming import FolderStream, materialize

__all__ = [
    "DatasetBundle",
    "FolderStream",
    "ImageSet",
    "ImageSizeError",
    "MAX_IMAGE_SIDE",
    "TRANSFORM",
    "augment_batch",
    "canonical_name",
    "decide_augmentation",
    "indices_sha256",
    "iterate_minibatches",
    "load_clean_folder",
    "load_dataset",
    "materialize",
    "normalize",
    "select_clean_subset",
    "stratified_limit",
]
