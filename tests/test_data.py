"""data.py: layouts, validation, clean subsets, and the batched fast path (normalise, augment, batches)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from backdoor_cli.data.datasets import (
    ImageSet,
    augment_batch,
    indices_sha256,
    iterate_minibatches,
    load_clean_folder,
    load_dataset,
    normalize,
    select_clean_subset,
    stratified_limit,
)
from backdoor_cli.errors import ConfigError, InputError
from helpers import make_npz_dataset


def _image_folder(root, classes=("a", "b", "c"), per_class=4, size=(12, 10), mode="RGB"):
    from PIL import Image

    for split in ("train", "test"):
        for i, cls in enumerate(classes):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for j in range(per_class):
                Image.new(mode, size, (30 * i + j,) * (3 if mode == "RGB" else 1)).save(folder / f"{j}.png")
    return root


def test_npz_directory_rgb(tmp_path):
    bundle = load_dataset(str(make_npz_dataset(tmp_path / "toy", classes=4)))
    assert bundle.name == "toy" and bundle.num_classes == 4
    assert bundle.test.image_shape == (12, 12, 3) and bundle.train.num_images == 240
    assert bundle.test.x.dtype == torch.uint8 and bundle.test.y.dtype == torch.int64
    assert bundle.mean == (0.5, 0.5, 0.5) and bundle.augment_flip


def test_grayscale_becomes_one_channel_and_train_is_skipped(tmp_path):
    bundle = load_dataset(str(make_npz_dataset(tmp_path / "g", channels=1)), need_train=False)
    assert bundle.test.image_shape == (12, 12, 1) and bundle.train is None


def test_named_dataset_under_data_dir_gets_its_standard_values(tmp_path):
    root = tmp_path / "datasets"
    make_npz_dataset(root / "cifar10", classes=10, n_train=40, n_test=20)
    bundle = load_dataset("cifar10", str(root))
    assert bundle.name == "cifar10" and bundle.num_classes == 10
    assert bundle.mean == pytest.approx((0.4914, 0.4822, 0.4465))
    with pytest.raises(InputError, match="not found"):
        load_dataset("mnist", str(root))


def test_data_dir_from_environment(tmp_path, monkeypatch):
    make_npz_dataset(tmp_path / "mnist", classes=10, channels=1, n_train=40, n_test=20)
    monkeypatch.setenv("BDCLEAN_DATA_DIR", str(tmp_path))
    bundle = load_dataset("mnist")
    assert bundle.name == "mnist" and not bundle.augment_flip and bundle.mean == (0.1307,)


def test_unknown_name_and_single_npz_file(tmp_path):
    with pytest.raises(InputError, match="nosuch"):
        load_dataset("nosuch")
    make_npz_dataset(tmp_path / "d")
    bundle = load_dataset(str(tmp_path / "d" / "test.npz"))
    assert bundle.train is None and bundle.test.num_images == 90


@pytest.mark.parametrize(
    "x, y, words",
    [
        (np.zeros((5, 4, 4, 3), np.float32), np.zeros(5, np.uint8), "uint8"),
        (np.zeros((5, 4, 4, 3), np.uint8), np.zeros(4, np.uint8), "lengths differ"),
        (np.zeros((5, 4, 4, 3), np.uint8), -np.ones(5, np.int64), "negative label"),
        (np.zeros((5, 16), np.uint8), np.zeros(5, np.uint8), "shape"),
        (np.zeros((5, 4, 4, 2), np.uint8), np.zeros(5, np.uint8), "C 1 or 3"),
        (np.zeros((0, 4, 4, 3), np.uint8), np.zeros(0, np.uint8), "no images"),
        (np.zeros((5, 4, 4, 3), np.uint8), np.zeros(5, np.float32), "integer"),
    ],
)
def test_npz_validation(tmp_path, x, y, words):
    np.savez(tmp_path / "test.npz", x=x, y=y)
    with pytest.raises(InputError, match=words):
        load_dataset(str(tmp_path))


def test_npz_never_unpickles(tmp_path):
    np.save(tmp_path / "x.npy", np.array([object()], dtype=object), allow_pickle=True)
    np.savez(tmp_path / "test.npz", x=np.array([{"a": 1}], dtype=object), y=np.zeros(1, np.uint8))
    with pytest.raises(InputError, match="not a readable .npz"):
        load_dataset(str(tmp_path))


def test_labels_beyond_a_known_dataset(tmp_path):
    make_npz_dataset(tmp_path / "mnist", classes=12, channels=1)
    with pytest.raises(InputError, match="out of range"):
        load_dataset(str(tmp_path / "mnist"))


def test_image_folder(tmp_path):
    bundle = load_dataset(str(_image_folder(tmp_path / "f")))
    assert bundle.num_classes == 3 and bundle.test.image_shape == (10, 12, 3)
    assert bundle.train.y.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert int(bundle.test.x[4, 0, 0, 0]) == 30  # class b, image 0


def test_image_folder_grayscale_and_mixed_modes(tmp_path):
    gray = load_dataset(str(_image_folder(tmp_path / "g", mode="L")))
    assert gray.test.image_shape == (10, 12, 1)
    from PIL import Image

    root = _image_folder(tmp_path / "m")
    Image.new("L", (12, 10), 77).save(root / "test" / "a" / "gray.png")
    mixed = load_dataset(str(root))
    assert mixed.test.image_shape == (10, 12, 3) and mixed.test.num_images == 13
    assert mixed.test.x[4].flatten().unique().tolist() == [77]  # replicated to RGB ("gray.png" sorts after 3.png)


def test_image_folder_errors_name_the_file(tmp_path):
    from PIL import Image

    root = _image_folder(tmp_path / "f")
    Image.new("RGB", (13, 10)).save(root / "test" / "b" / "odd.png")
    with pytest.raises(InputError, match="odd.png"):
        load_dataset(str(root))
    (root / "test" / "b" / "odd.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(InputError, match="odd.png"):
        load_dataset(str(root))
    (root / "test" / "b" / "odd.png").unlink()
    (root / "test" / "zzz").mkdir()
    with pytest.raises(InputError, match="zzz"):
        load_dataset(str(root))


def test_load_clean_folder_forms(tmp_path):
    make_npz_dataset(tmp_path / "npzdir", n_train=30)
    assert load_clean_folder(str(tmp_path / "npzdir")).num_images == 30
    assert load_clean_folder(str(tmp_path / "npzdir" / "test.npz")).num_images == 90
    _image_folder(tmp_path / "f")
    assert load_clean_folder(str(tmp_path / "f")).num_images == 12
    assert load_clean_folder(str(tmp_path / "f" / "test")).num_images == 12
    with pytest.raises(InputError, match="does not exist"):
        load_clean_folder(str(tmp_path / "missing"))


def test_clean_subset_is_balanced_seeded_and_sorted():
    y = torch.arange(1000) % 10
    a = select_clean_subset(y, 0.02, None, seed=3, num_classes=10)
    assert len(a) == 20 and torch.bincount(y[a]).tolist() == [2] * 10
    assert torch.equal(a, a.sort().values)
    assert torch.equal(a, select_clean_subset(y, 0.02, None, seed=3, num_classes=10))
    assert not torch.equal(a, select_clean_subset(y, 0.02, None, seed=4, num_classes=10))
    b = select_clean_subset(y, None, 25, seed=0, num_classes=10)
    counts = torch.bincount(y[b], minlength=10)
    assert len(b) == 25 and counts.max() - counts.min() <= 1


@pytest.mark.parametrize(
    "fraction, count, words",
    [
        (0.1, 10, "both"),
        (None, None, "clean-fraction"),
        (0.0, None, "clean-fraction"),
        (1.5, None, "clean-fraction"),
        (None, 0, "clean-count"),
        (None, 10_000, "larger"),
        (0.0001, None, "empty"),
        (None, 1, "class"),
    ],
)
def test_clean_subset_errors(fraction, count, words):
    with pytest.raises(ConfigError, match=words):
        select_clean_subset(torch.arange(100) % 3, fraction, count, 0, 3)


def test_stratified_limit_keeps_proportions():
    y = torch.cat([torch.zeros(800), torch.ones(200)]).long()
    idx = stratified_limit(y, 100, seed=1)
    assert len(idx) == 100 and len(idx.unique()) == 100
    assert torch.bincount(y[idx]).tolist() == [80, 20]
    assert torch.equal(idx, stratified_limit(y, 100, seed=1))
    assert len(stratified_limit(y, 5000, 0)) == 1000


def test_indices_hash_matches_the_saved_file():
    idx = torch.tensor([3, 17, 256])
    assert indices_sha256(idx) == hashlib.sha256(b"3\n17\n256\n").hexdigest()


def test_normalize_values_and_layout():
    x = torch.tensor([[[[0, 255, 51]]]], dtype=torch.uint8).expand(2, 4, 4, 3).contiguous()
    mean = torch.tensor([0.0, 0.5, 0.2]).view(1, 3, 1, 1)
    std = torch.tensor([1.0, 0.5, 0.2]).view(1, 3, 1, 1)
    out = normalize(x, mean, std)
    assert out.shape == (2, 3, 4, 4) and out.dtype == torch.float32
    assert out[0, :, 0, 0].tolist() == pytest.approx([0.0, 1.0, 0.0], abs=1e-6)
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_augment_batch_crops_and_flips_like_per_image_ops():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 8, 8, 3), generator=g, dtype=torch.uint8)
    out = augment_batch(x, torch.Generator().manual_seed(5), flip=True, pad=2)
    assert out.shape == x.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(x, (0, 0, 2, 2, 2, 2))
    # Every output must be some crop of its own padded image, possibly flipped: check exhaustively.
    for i in range(len(x)):
        crops = [padded[i, r : r + 8, c : c + 8] for r in range(5) for c in range(5)]
        assert any(torch.equal(out[i], crop) or torch.equal(out[i], crop.flip(1)) for crop in crops)
    flips = sum(not torch.equal(out[i], x[i]) for i in range(len(x)))
    assert flips > 32  # augmentation actually changes most images
    same = augment_batch(x, torch.Generator().manual_seed(5), flip=True, pad=2)
    assert torch.equal(out, same)
    assert torch.equal(augment_batch(x, g, flip=False, pad=0), x)


def test_iterate_minibatches_covers_everything_once():
    g = torch.Generator().manual_seed(0)
    batches = list(iterate_minibatches(10, 4, g))
    assert [len(b) for b in batches] == [4, 4, 2]
    assert sorted(torch.cat(batches).tolist()) == list(range(10))
    assert torch.cat(list(iterate_minibatches(5, 2, g, shuffle=False))).tolist() == [0, 1, 2, 3, 4]


def test_image_set_subset_and_to():
    s = ImageSet(torch.zeros(5, 2, 2, 1, dtype=torch.uint8), torch.arange(5))
    sub = s.subset(torch.tensor([4, 1]))
    assert sub.y.tolist() == [4, 1] and sub.image_shape == (2, 2, 1) and s.to("cpu").num_images == 5


def test_real_cifar10_and_mnist(shared_dir):
    cifar = load_dataset(str(shared_dir / "cifar10"), need_train=False)
    assert cifar.name == "cifar10" and cifar.test.num_images == 10_000 and cifar.test.image_shape == (32, 32, 3)
    assert torch.bincount(cifar.test.y).tolist() == [1000] * 10
    mnist = load_dataset(str(shared_dir / "mnist"), need_train=False)
    assert mnist.test.image_shape == (28, 28, 1) and mnist.num_classes == 10 and not mnist.augment_flip


def _cifar_folder(root, n=20, classes=10):
    import pickle

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(np.arange(n) % classes)}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    return folder


def test_torchvision_cifar10_folder(tmp_path):
    folder = _cifar_folder(tmp_path)
    bundle = load_dataset("cifar10", str(tmp_path))
    assert bundle.train.num_images == 100 and bundle.test.num_images == 20 and bundle.num_classes == 10
    import pickle

    raw = pickle.loads((folder / "test_batch").read_bytes())[b"data"][3]
    # CHW planes in the file -> HWC in the set: pixel (row 0, col 1) of channel 2 is byte 2*1024 + 1
    assert int(bundle.test.x[3, 0, 1, 2]) == int(raw[2 * 1024 + 1])
    assert bundle.mean == pytest.approx((0.4914, 0.4822, 0.4465))


def test_torchvision_cifar_pickle_with_code_is_refused(tmp_path):
    import os
    import pickle

    from backdoor_cli.errors import UnsafeInputError

    folder = _cifar_folder(tmp_path)

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path}/PWNED",))

    (folder / "test_batch").write_bytes(pickle.dumps({b"data": Payload(), b"labels": []}, protocol=2))
    with pytest.raises(UnsafeInputError, match="system"):
        load_dataset("cifar10", str(tmp_path), need_train=False)
    assert not (tmp_path / "PWNED").exists()


def test_torchvision_mnist_idx_folder(tmp_path):
    import gzip
    import struct

    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", 30), ("t10k", 10)):
        images = np.arange(n * 28 * 28, dtype=np.uint64).astype(np.uint8).reshape(n, 28, 28)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            struct.pack(">4B3I", 0, 0, 8, 3, n, 28, 28) + images.tobytes()
        )
        labels = (np.arange(n) % 10).astype(np.uint8)
        blob = struct.pack(">4BI", 0, 0, 8, 1, n) + labels.tobytes()
        (raw / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(blob))
    bundle = load_dataset("mnist", str(tmp_path))
    assert bundle.train.num_images == 30 and bundle.test.image_shape == (28, 28, 1) and bundle.test.y[3] == 3
    (raw / "t10k-images-idx3-ubyte").write_bytes(struct.pack(">4B3I", 0, 0, 8, 3, 10, 28, 28) + b"\x00" * 50)
    with pytest.raises(InputError, match="truncated"):
        load_dataset("mnist", str(tmp_path))
