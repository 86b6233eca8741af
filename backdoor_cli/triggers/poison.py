"""Poisoned sets: the triggered evaluation set (target class left out) and dirty-label training poisoning."""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError, InputError
from .apply import Trigger
from .spec import MAX_SEED
from .values import is_int, is_number, show


def make_poisoned_eval_set(trigger: Trigger, x: torch.Tensor, y: torch.Tensor):
    """Triggered copies of the images whose label is not the target, with their TRUE labels.

    Returns (x_poisoned, y_true, keep_mask). Target-class images are left out: classifying a
    target-class image as the target is correct behaviour, not a successful attack, and would
    inflate ASR by about 1/num_classes.
    """
    _check_pair(x, y)
    keep = y != trigger.target
    return trigger.apply(x[keep.to(x.device)]), y[keep], keep


def poison_training_set(trigger: Trigger, x: torch.Tensor, y: torch.Tensor, rate: float, seed: int, stamp: bool = True):
    """Dirty-label all-to-one poisoning: round(rate * N) images chosen uniformly (seeded) among ALL
    classes get the trigger and the target label. Returns new (x, y) and the sorted int64 indices.
    `stamp` False relabels only (the same images): the caller stamps them later, after augmentation."""
    if not is_number(rate) or not math.isfinite(rate) or not 0 <= rate <= 1:
        raise ConfigError(f"poison rate must be a number in [0, 1], got {show(rate)}")
    if not is_int(seed) or not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"seed must be an integer in [0, {MAX_SEED}], got {show(seed)}")
    _check_pair(x, y)
    n = x.shape[0]
    count = round(float(rate) * n)  # Python's round: ties to even (rate 0.5 of 5 images poisons 2)
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    indices = torch.randperm(n, generator=generator)[:count].sort().values
    x_new, y_new = x.clone(), y.clone()
    if count:
        if stamp:
            on_x = indices.to(x.device)
            x_new[on_x] = trigger.apply(x[on_x])
        y_new[indices.to(y.device)] = trigger.target
    return x_new, y_new, indices


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if (
        not isinstance(x, torch.Tensor)
        or not isinstance(y, torch.Tensor)
        or x.dim() < 1
        or y.dim() != 1
        or x.shape[0] != y.shape[0]
    ):
        xs = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        ys = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise InputError(f"images and labels do not match: images {xs}, labels {ys}")
