"""Which checkpoints an audit covers: arguments (files, directories, globs) and --from-list, expanded
to a sorted list, and the deterministic share of it that one shard of a spread-out audit takes.

A directory with a config.json is ONE model (a Hugging Face/timm model directory, as `bdclean
evaluate DIR` has always read it); any other directory is a folder of checkpoints, searched
recursively for checkpoint files and model directories. Torch-free: this runs before any import
that takes seconds.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, InputError

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".th", ".bin", ".ckpt")
MODEL_DIR_MARKER = "config.json"
GLOB_CHARS = set("*?[")
MAX_LIST_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count` (0-based, as Slurm array ids, Kubernetes completion indexes and RANK are)."""

    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def is_model_dir(path: Path) -> bool:
    return path.is_dir() and (path / MODEL_DIR_MARKER).is_file()


def is_single_target(arguments: list[str]) -> bool:
    """One argument naming one checkpoint (a file, a model directory, or a path that does not exist,
    which then fails as it always did): `evaluate` keeps its single-checkpoint behaviour and output."""
    if len(arguments) != 1 or GLOB_CHARS & set(arguments[0]):
        return False
    path = Path(arguments[0])
    return not path.is_dir() or is_model_dir(path)


def expand_targets(arguments: list[str], from_list: str | None = None) -> list[str]:
    """Every checkpoint the arguments and the list file name, each once, sorted (so every shard of an
    audit sees the same order). A named file is taken whatever its suffix; a folder contributes only
    files with a checkpoint suffix, so its READMEs and reports are not audited."""
    unique = sorted(set(expand_in_order(arguments, from_list)))
    if not unique:
        named = ", ".join(map(str, list(arguments) + ([from_list] if from_list else [])))
        raise InputError(
            f"no checkpoints found in {named} (a directory without {MODEL_DIR_MARKER} is searched for "
            "checkpoint files and model directories)",
            hint=f"checkpoint files end in {', '.join(CHECKPOINT_SUFFIXES)}; a Hugging Face/timm model "
            f"directory has a {MODEL_DIR_MARKER}",
        )
    return unique


def expand_in_order(arguments: list[str], from_list: str | None = None) -> list[str]:
    """The arguments in the order given (compare's first is its reference), each folder or glob replaced
    by the sorted checkpoints it holds. Repeats stay: `compare m m` is a valid self-check."""
    found: list[str] = []
    for argument in list(arguments) + _read_list(from_list):
        matches = sorted(glob.glob(argument, recursive=True)) if GLOB_CHARS & set(argument) else [argument]
        if not matches:
            raise InputError(f"no checkpoint matches {argument!r}")
        for match in matches:
            found.extend(sorted(_expand_path(Path(match))))
    return found


def _expand_path(path: Path) -> list[str]:
    if not path.is_dir() or is_model_dir(path):
        return [os.path.normpath(str(path))]  # a file (or a missing path: its row will say so)
    out = []
    for root, dirs, files in os.walk(path):
        here = Path(root)
        models = [d for d in dirs if is_model_dir(here / d)]
        out += [os.path.normpath(str(here / d)) for d in models]
        dirs[:] = sorted(d for d in dirs if d not in models and not d.startswith("."))  # a model dir is one target
        out += [os.path.normpath(str(here / f)) for f in files if f.lower().endswith(CHECKPOINT_SUFFIXES)]
    return out


def _read_list(from_list: str | None) -> list[str]:
    """Paths one per line; blank lines and lines starting with # are skipped; relative paths are relative
    to the current directory (as on the command line)."""
    if not from_list:
        return []
    path = Path(from_list)
    if not path.is_file():
        raise InputError(f"--from-list file not found: {path}")
    if path.stat().st_size > MAX_LIST_BYTES:
        raise InputError(f"--from-list file {path} is over 16 MB; that is not a list of checkpoints")
    try:
        lines = path.read_text("utf-8").splitlines()
    except UnicodeDecodeError:
        raise InputError(f"--from-list file {path} is not UTF-8 text") from None
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def parse_shard(text: str | None, environ=None) -> Shard | None:
    """--shard I/N, else RANK/WORLD_SIZE when a launcher (torchrun, most MPI/Slurm wrappers) set them
    with WORLD_SIZE > 1, else None (the whole list)."""
    environ = os.environ if environ is None else environ
    source = "--shard"
    if text is None and environ.get("WORLD_SIZE") not in (None, "", "1"):
        text, source = f"{environ.get('RANK', '')}/{environ['WORLD_SIZE']}", "RANK/WORLD_SIZE"
    if text is None:
        return None
    parts = str(text).strip().split("/")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ConfigError(
            f"{source} {text!r} is not I/N", hint="e.g. --shard 0/4 for the first of four shards (0-based)"
        )
    index, count = int(parts[0]), int(parts[1])
    if count < 1 or not 0 <= index < count:
        raise ConfigError(f"{source} {text!r}: the shard index must be in [0, {max(count, 1) - 1}]")
    return Shard(index, count)


def select_shard(paths: list[str], shard: Shard | None) -> list[str]:
    """Round-robin over the sorted list: shards differ by at most one checkpoint, and the union of all
    shards is the list, each checkpoint in exactly one."""
    if shard is None:
        return list(paths)
    return [p for i, p in enumerate(paths) if i % shard.count == shard.index]
