"""What the issue-12 experiments share: a subject, the defender's fresh images, and the evaluation
sets built from the other test images with the subject's recorded trigger (for scoring only)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backdoor_cli.data.datasets import DatasetBundle, ImageSet, images_from_arrays, load_dataset  # noqa: E402
from backdoor_cli.evaluation.measure import EvalSets, build_eval_sets  # noqa: E402
from backdoor_cli.subject import Subject, load_subject, normalization_tensors  # noqa: E402
from backdoor_cli.usecases.setup import resolve_trigger  # noqa: E402


@dataclass
class SplitSetup:
    device: torch.device
    bundle: DatasetBundle
    subject: Subject
    mean: torch.Tensor
    std: torch.Tensor
    pool: ImageSet  # the defender's clean images (experiments/make_split.py)
    sets: EvalSets


def load_split_setup(subject_path: str, pool_path: str, data: str, limit: int | None) -> SplitSetup:
    device = torch.device("cpu")
    bundle = load_dataset(data, need_train=False)
    subject = load_subject(subject_path, bundle)
    mean, std = normalization_tensors(subject, device)
    with np.load(pool_path, allow_pickle=False) as f:
        pool = images_from_arrays(f["x"], f["y"], pool_path)
    trigger = resolve_trigger(None, None, subject, bundle.test.image_shape, bundle.num_classes)
    return SplitSetup(
        device, bundle, subject, mean, std, pool, build_eval_sets(bundle.test, trigger, device, limit=limit)
    )
