"""The clean reference models bdclean ships, one per built-in dataset it has one for.

The scan's shortcut test (scanning/guided.py) applies each reconstructed trigger to a clean model of the
same task: a trigger the clean model follows too is a shortcut of the data, one it ignores is the model's
own. Without a reference the default purify unlearnt a clean CIFAR-10 ResNet-56's airplane shortcut for a
3.5-point loss (docs/purification.md); with the clean ResNet-20 below as the reference it cost nothing.
Shipping that reference makes the measured configuration the default for CIFAR-10 images.

A bundled reference is only offered where its task is certainly the data's: the built-in dataset by
name, with its image shape and class count (a folder named cifar10 of 8x8 images is not CIFAR-10).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path


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

    def fits(self, image_shape, num_classes: int) -> bool:
        return tuple(image_shape) == self.image_shape and num_classes == self.num_classes


BUNDLED_REFERENCES: dict[str, BundledReference] = {
    "cifar10": BundledReference(
        dataset="cifar10",
        file="cifar10-resnet20.safetensors",
        description="bdclean's bundled clean CIFAR-10 ResNet-20 (91.73% on the test set; akamaster/"
        "pytorch_resnet_cifar10, BSD-2-Clause)",
        image_shape=(32, 32, 3),
        num_classes=10,
        sha256="a5598c1bb1470fb301a75695c0e69e9ff536489dee6f3e67c8eb06bcd28e2db1",
    ),
}


def bundled_reference(dataset: str) -> BundledReference | None:
    return BUNDLED_REFERENCES.get(dataset)
