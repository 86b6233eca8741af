"""outputs.py: atomic writes, never over an input, --force, unwritable and full destinations."""

from __future__ import annotations

import os

import pytest

from backdoor_cli.errors import OutputError
from backdoor_cli.outputs import atomic_write_bytes, prepare_out_dir


def test_atomic_write_replaces_whole_file(tmp_path):
    target = tmp_path / "a.bin"
    atomic_write_bytes(target, b"one")
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two" and os.listdir(tmp_path) == ["a.bin"]


def test_refuses_existing_without_force(tmp_path):
    (tmp_path / "report.json").write_text("{}")
    with pytest.raises(OutputError, match="--force"):
        prepare_out_dir(tmp_path, ["report.json"], [], force=False)
    prepare_out_dir(tmp_path, ["report.json"], [], force=True)


def test_never_overwrites_input_even_with_force(tmp_path):
    ckpt = tmp_path / "purified.safetensors"
    ckpt.write_bytes(b"x")
    with pytest.raises(OutputError, match="overwrite the input"):
        prepare_out_dir(tmp_path, ["purified.safetensors"], [ckpt], force=True)


def test_out_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        prepare_out_dir(tmp_path / "f", ["a"], [], force=False)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_unwritable_directory(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(OutputError, match="permission"):
        prepare_out_dir(locked, ["a"], [], force=False)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_full_disk_leaves_no_partial_file(tmp_path, monkeypatch):
    # Simulate ENOSPC: route the temp file's writes to /dev/full.
    import backdoor_cli.outputs as outputs

    real_fdopen = os.fdopen

    def full_fdopen(fd, mode="r", *args, **kwargs):
        os.dup2(os.open("/dev/full", os.O_WRONLY), fd)
        return real_fdopen(fd, mode, *args, **kwargs)

    monkeypatch.setattr(outputs.os, "fdopen", full_fdopen)
    with pytest.raises(OutputError, match="no space left"):
        atomic_write_bytes(tmp_path / "big.bin", b"x" * 100_000)
    assert os.listdir(tmp_path) == []
