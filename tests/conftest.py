"""Shared test fixtures: the offline real data in ../shared/data, and tiny synthetic data."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """Path to ../shared/data (CIFAR-10, MNIST, the ResNet-20 checkpoint), or skip when absent."""
    if not (SHARED_DATA / "cifar10" / "test.npz").exists():
        pytest.skip(f"real data not found at {SHARED_DATA} (the ../shared folder beside the repo)")
    return SHARED_DATA


@pytest.fixture(scope="module")
def toy_model(tmp_path_factory) -> dict:
    """A BadNets-backdoored test_tiny model on a toy dataset (paths as str: data, model, root), trained once
    per test module through the CLI."""
    from helpers import train_toy_model

    made = train_toy_model(tmp_path_factory.mktemp("toy"), epochs=2)
    return {k: str(v) for k, v in made.items()}


@pytest.fixture(scope="session")
def planted_template(tmp_path_factory) -> dict:
    """A simple_cnn_half with a BadNets backdoor (target 0) on the template data (tests/helpers.py), trained once per
    session through the CLI: {"root", "data", "model"} (paths). The default's scan flags its target."""
    from helpers import make_template_dataset, train_small_cnn

    root = tmp_path_factory.mktemp("planted-template")
    data = make_template_dataset(root / "data")
    model = train_small_cnn(data, root / "bd.safetensors", "--trigger", "badnets", "--poison-rate", "0.1")
    return {"root": root, "data": data, "model": model}
