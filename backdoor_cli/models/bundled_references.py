"""The clean reference models bdclean ships, per built-in dataset, and which one a run uses.

The scan's shortcut test (scanning/guided.py) applies each reconstructed trigger to a clean model of the
same task: a trigger the clean model follows too is a shortcut of the data, one it ignores is the model's
own. Without a reference the default purify unlearnt a clean CIFAR-10 ResNet-56's airplane shortcut for a
3.5-point loss (docs/purification.md); with a clean ResNet-20 as the reference it cost nothing.

Two are shipped for CIFAR-10, of two architectures, because a reference that is the subject's own parent
is a weaker witness: the parent of a patch-trigger ResNet-20 followed a below-threshold reconstruction of
its planted trigger on 36.1% of images (a shortcut, so the backdoor was left), where the clean ResNet-56
followed it on 15.6% (planted, unlearnt; eighth session). Public checkpoints are where backdoors are
planted, so the reference of a subject is the first one of another architecture (another shape of weights
cannot be its parent), which is also the grid's measured rule: the ResNet-56 for ResNet-20 subjects, the
ResNet-20 for every other.

A bundled reference is used outright where its task is certainly the data's: the built-in dataset by
name, with its image shape and class count (a folder named cifar10 of 8x8 images is not CIFAR-10). Data
of another name with that shape and class count gets it on trial: its accuracy on the labelled clean
images decides (scanning/guided.py, TRIED_FLOOR; usecases/references.py).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

AKAMASTER = "akamaster/pytorch_resnet_cifar10, BSD-2-Clause"


@dataclass(frozen=True)
class BundledReference:
    dataset: str
    file: str  # under backdoor_cli/assets/references
    description: str
    image_shape: tuple[int, int, int]  # H, W, C of the images it was trained on
    num_classes: int
    sha256: str  # of the shipped file, checked when it is opened

    @property
    def path(self) -> Path:
        return Path(str(resources.files("backdoor_cli") / "assets" / "references" / self.file))

    @property
    def label(self) -> str:
        """How reports name it: bundled:FILE-STEM."""
        return "bundled:" + self.file.removesuffix(".safetensors")

    def fits(self, image_shape, num_classes: int) -> bool:
        return tuple(image_shape) == self.image_shape and num_classes == self.num_classes

    def shapes(self) -> Counter:
        """The multiset of its tensors' shapes, read from the file's header (no weights loaded)."""
        from safetensors import safe_open

        with safe_open(str(self.path), "pt") as f:
            return Counter(tuple(f.get_slice(k).get_shape()) for k in f.keys())


BUNDLED_REFERENCES: dict[str, tuple[BundledReference, ...]] = {
    "cifar10": (
        BundledReference(
            dataset="cifar10",
            file="cifar10-resnet20.safetensors",
            description=f"bdclean's bundled clean CIFAR-10 ResNet-20 (91.73% on the test set; {AKAMASTER})",
            image_shape=(32, 32, 3),
            num_classes=10,
            sha256="a5598c1bb1470fb301a75695c0e69e9ff536489dee6f3e67c8eb06bcd28e2db1",
        ),
        BundledReference(
            dataset="cifar10",
            file="cifar10-resnet56.safetensors",
            description=f"bdclean's bundled clean CIFAR-10 ResNet-56 (93.39% on the test set; {AKAMASTER})",
            image_shape=(32, 32, 3),
            num_classes=10,
            sha256="d83400b275196a1ad34c11fa3f7aa6f8756df2d7af5a496e20ad4f1b28eddd9b",
        ),
    ),
}


def model_shapes(model: torch.nn.Module) -> Counter:
    return Counter(tuple(t.shape) for t in model.state_dict().values())


def bundled_reference(dataset: str, model: torch.nn.Module | None = None) -> BundledReference | None:
    """The dataset's bundled reference for `model`: the first whose weights have other shapes than the
    model's (so it cannot be the model's parent); the first when none differs or no model is given."""
    shipped = BUNDLED_REFERENCES.get(dataset)
    if not shipped:
        return None
    if model is not None:
        own = model_shapes(model)
        for ref in shipped:
            if ref.shapes() != own:
                return ref
    return shipped[0]
