"""Writing outputs safely: atomic files, never over an input, existing files only with --force.

Every output is written to a temporary file in the destination directory and renamed into place,
so an interrupted or failed run (Ctrl-C, full disk) leaves either the old file or none, never half
a file. A run first checks every output it will write, so it fails before spending minutes tuning.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from .errors import OutputError


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temp file in the same directory and an atomic rename."""
    path = Path(path)
    tmp_name = None
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
        tmp_name = None
    except OSError as exc:
        raise OutputError(_describe_write_error(path, exc)) from None
    finally:
        if tmp_name is not None:
            try:
                os.unlink(tmp_name)
            except OSError:
                pass


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _describe_write_error(path: Path, exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return f"no space left on the device while writing {path}; nothing was written"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {path}: permission denied (choose another --out)"
    return f"cannot write {path}: {exc.strerror or exc}"


def prepare_out_dir(out: Path, names: Iterable[str], inputs: Iterable[Path], force: bool) -> Path:
    """Create `out` if needed and check that writing `names` there is allowed.

    Refuses: `out` being a file, an output that would replace one of `inputs` (never, even with
    --force), existing outputs without `force`, and a directory we cannot write to.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file; it must be a directory", hint="choose a directory for the outputs")
    resolved_inputs = {Path(p).resolve() for p in inputs if p is not None}
    targets = [out / n for n in names]
    for target in targets:
        if target.resolve() in resolved_inputs:
            raise OutputError(f"refusing to overwrite the input {target}", hint="choose another --out directory")
    existing = [t for t in targets if t.exists()]
    if existing and not force:
        raise OutputError(
            f"{len(existing)} output(s) already exist in {out} (e.g. {existing[0].name})",
            hint="pass --force to replace them, or choose another --out",
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(_describe_write_error(out, exc)) from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write to {out}: permission denied", hint="choose another --out")
    return out


def check_output_file(path: Path, inputs: Iterable[Path], force: bool) -> Path:
    """The single-file version of prepare_out_dir, for commands that write one file (train)."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path} is a directory; give a file name such as model.safetensors")
    prepare_out_dir(path.parent if str(path.parent) else Path("."), [path.name], inputs, force)
    return path
