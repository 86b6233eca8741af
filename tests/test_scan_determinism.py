"""The scan gives the same answer on every run: the inversion's per-image rows of the masks and patterns add
their gradients up in image order (scanning.inversion.per_image), not with a CPU's parallel atomics."""

from __future__ import annotations

import contextlib

import pytest
import torch

from backdoor_cli.models.output_kind import LossAdapter, attach_loss
from backdoor_cli.scanning.inversion import InversionParams, invert_classes, per_image
from helpers import planted_scan_subject


@contextlib.contextmanager
def threads(count: int):
    """Two torch threads even where the machine has one core: the race needs two threads, not two cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def mask_gradient(rows: torch.Tensor, owner: torch.Tensor, images: torch.Tensor, gather) -> torch.Tensor:
    leaf = rows.clone().requires_grad_(True)
    (images * gather(leaf, owner)).square().sum().backward()
    return leaf.grad


@pytest.mark.parametrize("classes", [1, 3])
def test_per_image_gradients_are_the_same_every_time_and_the_same_as_one_threads(classes):
    # 32 images of 32x32 per class: 32,768 mask values per class, where a CPU's indexing backward goes parallel
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(32 * classes, 1, 32, 32, generator=generator)
    rows = torch.randn(classes, 1, 32, 32, generator=generator)
    owner = torch.arange(classes).repeat_interleave(32)
    with threads(1):
        serial = mask_gradient(rows, owner, images, lambda t, i: t[i])
    with threads(2):
        grads = [mask_gradient(rows, owner, images, per_image) for _ in range(12)]
    for grad in grads:
        assert torch.equal(grad, serial)


def test_a_one_class_search_is_the_same_on_every_run(tmp_path):
    """The re-scan inverts one class: every image of the batch adds into the same mask."""
    planted = planted_scan_subject(tmp_path)
    model, images = planted["model"].eval(), planted["images"]
    for p in model.parameters():
        p.requires_grad_(False)
    # 128 images of 16x16 a step: 32,768 mask values, all of class 0's one mask
    params = InversionParams(steps=15, batch_size=128)
    found = []
    with threads(2), attach_loss(model, LossAdapter()) as loss_fn:
        for _ in range(3):
            (trigger,) = invert_classes(
                model,
                images.x,
                images.y,
                [0],
                planted["mean"],
                planted["std"],
                loss_fn,
                params,
                torch.Generator().manual_seed(0),
            )
            found.append(trigger)
    for trigger in found[1:]:
        assert torch.equal(trigger.mask, found[0].mask)
        assert torch.equal(trigger.pattern, found[0].pattern)
