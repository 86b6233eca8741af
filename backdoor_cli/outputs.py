"""Writing outputs safely: atomic files, never over an input, existing files only with --force.

Every output is written to a temporary file in the destination directory and renamed into place,
so an interrupted or failed run (Ctrl-C, full disk) leaves either the old file or none, never half
a file. A run first checks every output it will write, so it fails before spending minutes tuning.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path

from .errors import OutputError


def write_temp_beside(path: Path, data: bytes) -> str:
    """Write `data` (fsynced) to a hidden temp file in `path`'s directory; return its name.
    Nothing is left behind when writing fails."""
    path = Path(path)
    tmp_name = None
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        return tmp_name
    except OSError as exc:
        if tmp_name is not None:
            _unlink_quietly(tmp_name)
        raise OutputError(_describe_write_error(path, exc)) from None


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temp file in the same directory and an atomic rename."""
    tmp_name = write_temp_beside(path, data)
    try:
        os.replace(tmp_name, path)
    except OSError as exc:
        _unlink_quietly(tmp_name)
        raise OutputError(_describe_write_error(Path(path), exc)) from None


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _describe_write_error(path: Path, exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return f"no space left on the device while writing {path}; nothing was written"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {path}: permission denied (choose another --out)"
    return f"cannot write {path}: {exc.strerror or exc}"


def _refuse_special(target: Path) -> None:
    """Only regular files (or symlinks, which are replaced as links) may be replaced: os.replace over
    a FIFO or a device node such as /dev/null would destroy it."""
    try:
        mode = os.lstat(target).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise OutputError(_describe_write_error(target, exc)) from None
    if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
        raise OutputError(
            f"{target} exists and is not a regular file; bdclean will not replace it", hint="choose another output path"
        )


def _inside(target: Path, directory: Path) -> bool:
    try:
        target.relative_to(directory)
        return True
    except ValueError:
        return False


def check_targets(targets: Iterable[Path], inputs: Iterable[Path | str | None], force: bool) -> None:
    """Refuse outputs that would replace an input (or land inside an input directory, e.g. the
    dataset), special files, and existing files without --force. Never relaxed by --force."""
    resolved_inputs = [Path(p).resolve() for p in inputs if p is not None and str(p)]
    for target in targets:
        resolved = target.resolve()
        for source in resolved_inputs:
            if resolved == source or (source.is_dir() and _inside(resolved, source)):
                raise OutputError(
                    f"refusing to overwrite the input {source}"
                    if resolved == source
                    else f"refusing to write {target} inside the input directory {source}",
                    hint="choose another output path",
                )
        _refuse_special(target)
    existing = [t for t in targets if os.path.lexists(t)]
    if existing and not force:
        raise OutputError(
            f"{len(existing)} output(s) already exist (e.g. {existing[0]})",
            hint="pass --force to replace them, or choose another --out",
        )


class OutputSet:
    """All outputs of one run, published together or not at all.

    Used as a context manager around the whole run: opening checks every target and creates the
    directory (so a bad --out fails in a second, not after tuning); `stage()` writes each file to
    a hidden temp file beside its target; `commit()` renames them all into place, restoring the
    previous files if any rename fails. Leaving the block without a commit (an error, Ctrl-C)
    deletes the temp files and the directory if this run created it, so nothing partial remains.
    """

    def __init__(self, directory: Path, names: Iterable[str], inputs: Iterable[Path | str | None], force: bool):
        self.directory = Path(directory)
        self.names = list(names)
        self.inputs = list(inputs)
        self.force = force
        self._staged: dict[str, str] = {}
        self._created: list[Path] = []
        self.committed = False

    def __enter__(self) -> OutputSet:
        out = self.directory
        if os.path.lexists(out) and not out.is_dir():
            raise OutputError(
                f"--out {out} is a file; it must be a directory", hint="choose a directory for the outputs"
            )
        check_targets([out / n for n in self.names], self.inputs, self.force)
        missing = _missing_dirs(out)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(_describe_write_error(out, exc)) from None
        self._created = missing  # deepest first: removed in this order on abort
        if not os.access(out, os.W_OK | os.X_OK):
            self._remove_created()
            raise OutputError(f"cannot write to {out}: permission denied", hint="choose another --out")
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.committed:
            self._discard_staged()
            self._remove_created()

    def stage(self, name: str, data: bytes) -> None:
        """Write one output's bytes to a temp file (fsynced) next to where it will go."""
        if name not in self.names:
            raise ValueError(f"{name} was not declared as an output")  # programming error
        self._make_parent(self.directory / name)
        tmp_name = write_temp_beside(self.directory / name, data)
        if name in self._staged:
            _unlink_quietly(self._staged[name])
        self._staged[name] = tmp_name

    def _make_parent(self, target: Path) -> None:
        """Create the subdirectory an output name like 'purified-hf/config.json' needs, remembering it
        (deepest first) so an aborted run removes it again."""
        created = _missing_dirs(target.parent)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(_describe_write_error(target.parent, exc)) from None
        self._created = created + self._created

    def commit(self) -> None:
        """Rename every staged file into place; on any failure put back what was there before."""
        backups: dict[Path, str | None] = {}
        try:
            for name, tmp in self._staged.items():
                target = self.directory / name
                backup = None
                if os.path.lexists(target):
                    backup = _backup_name(target)
                    os.replace(target, backup)
                backups[target] = backup
                os.replace(tmp, target)
            for name in self.names:  # a stale output of an earlier run (e.g. its plot) must not pass as ours
                target = self.directory / name
                if name not in self._staged and os.path.lexists(target):
                    backup = _backup_name(target)
                    os.replace(target, backup)
                    backups[target] = backup
        except BaseException as exc:  # Ctrl-C too: roll back, then let it propagate
            for target, backup in backups.items():
                _unlink_quietly(target)
                if backup is not None:
                    try:
                        os.replace(backup, target)
                    except OSError:
                        pass
            if isinstance(exc, OSError):
                raise OutputError(_describe_write_error(self.directory, exc)) from None
            raise
        self.committed = True
        for backup in backups.values():
            if backup is not None:
                _unlink_quietly(backup)
        self._staged.clear()

    def _discard_staged(self) -> None:
        for tmp in self._staged.values():
            _unlink_quietly(tmp)
        self._staged.clear()

    def _remove_created(self) -> None:
        for path in self._created:
            try:
                path.rmdir()  # only if empty: never removes anything the run did not create
            except OSError:
                break


def _missing_dirs(path: Path) -> list[Path]:
    """`path` and those of its parents that do not exist yet, deepest first."""
    missing = []
    while not path.exists():
        missing.append(path)
        if path.parent == path:
            break
        path = path.parent
    return missing


def _backup_name(target: Path) -> str:
    """A free name beside `target` for its previous version while a commit is under way."""
    return tempfile.mktemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent)


def _unlink_quietly(path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def prepare_out_dir(out: Path, names: Iterable[str], inputs: Iterable[Path], force: bool) -> Path:
    """Check and create an output directory for writers that publish file by file (the demo)."""
    with OutputSet(out, names, inputs, force) as outputs:
        outputs.committed = True  # keep the directory: the caller writes into it
    return Path(out)
