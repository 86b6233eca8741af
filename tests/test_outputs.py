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


def test_output_set_publishes_all_or_nothing(tmp_path):
    from backdoor_cli.outputs import OutputSet

    out = tmp_path / "new" / "out"
    with pytest.raises(RuntimeError):
        with OutputSet(out, ["a.txt", "b.txt"], [], force=False) as outputs:
            outputs.stage("a.txt", b"A")
            raise RuntimeError("tuning failed")
    assert not (tmp_path / "new").exists()  # the directories this run created are gone too
    with OutputSet(out, ["a.txt", "b.txt"], [], force=False) as outputs:
        outputs.stage("a.txt", b"A")
        outputs.stage("b.txt", b"B")
        assert not (out / "a.txt").exists()  # nothing visible before the commit
        outputs.commit()
    assert (out / "a.txt").read_bytes() == b"A" and sorted(p.name for p in out.iterdir()) == ["a.txt", "b.txt"]


def test_output_set_rolls_back_a_failed_commit_and_drops_stale_outputs(tmp_path, monkeypatch):
    from backdoor_cli import outputs as mod
    from backdoor_cli.outputs import OutputSet

    (tmp_path / "a.txt").write_text("old a")
    (tmp_path / "plot.png").write_text("old plot")
    real_replace = mod.os.replace
    calls = {"n": 0}

    def flaky_replace(src, dst):
        calls["n"] += 1
        if str(dst).endswith("b.txt"):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(mod.os, "replace", flaky_replace)
    with pytest.raises(OutputError, match="no space"):
        with OutputSet(tmp_path, ["a.txt", "b.txt", "plot.png"], [], force=True) as outputs:
            outputs.stage("a.txt", b"new a")
            outputs.stage("b.txt", b"new b")
            outputs.commit()
    assert (tmp_path / "a.txt").read_text() == "old a" and not (tmp_path / "b.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "plot.png"]  # no temp or backup files
    monkeypatch.setattr(mod.os, "replace", real_replace)
    with OutputSet(tmp_path, ["a.txt", "b.txt", "plot.png"], [], force=True) as outputs:
        outputs.stage("a.txt", b"new a")
        outputs.commit()
    # plot.png belonged to an earlier run and this one drew none: it must not pass as this run's
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_outputs_never_land_in_an_input_directory(tmp_path):
    from backdoor_cli.outputs import OutputSet

    data = tmp_path / "data"
    data.mkdir()
    with pytest.raises(OutputError, match="inside the input directory"):
        with OutputSet(data / "models", ["m.safetensors"], [data], force=True):
            pass
    assert not (data / "models").exists()


def test_output_set_names_in_a_subdirectory(tmp_path):
    """purify writes purified-hf/config.json & co.: the subdirectory is made when first staged, removed
    again on abort, and a stale file in it is replaced (with --force) like any other output."""
    from backdoor_cli.outputs import OutputSet

    names = ["a.txt", "sub/b.txt", "sub/c.txt"]
    with pytest.raises(RuntimeError):
        with OutputSet(tmp_path / "out", names, [], force=False) as outputs:
            outputs.stage("sub/b.txt", b"B")
            raise RuntimeError("tuning failed")
    assert not (tmp_path / "out").exists()
    with OutputSet(tmp_path / "out", names, [], force=False) as outputs:
        outputs.stage("sub/b.txt", b"B")
        outputs.stage("sub/c.txt", b"C")
        outputs.commit()
    with pytest.raises(OutputError, match="already exist"):
        OutputSet(tmp_path / "out", names, [], force=False).__enter__()
    with OutputSet(tmp_path / "out", names, [], force=True) as outputs:
        outputs.stage("sub/b.txt", b"B2")
        outputs.commit()
    assert sorted(p.name for p in (tmp_path / "out" / "sub").iterdir()) == ["b.txt"]  # stale c.txt dropped
    assert (tmp_path / "out" / "sub" / "b.txt").read_bytes() == b"B2"
