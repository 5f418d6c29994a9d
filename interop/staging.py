"""A directory written whole or not at all: files go to a temporary directory beside the target,
which is synced to disk and renamed into place at the end; a failure removes it and leaves nothing
half-written. The directory gets the permissions any directory its user makes gets (the umask's),
not a private temporary directory's."""

import contextlib
import os
import secrets
import shutil
from pathlib import Path

from interop import InteropError


def _check_target(target: Path) -> None:
    """`InteropError` unless `target` can become the staged directory: absent or an empty
    directory, below directories (not files)."""
    for path in (target, *target.parents):
        if path.exists() and not path.is_dir():
            raise InteropError(f"{path} is a file, not a directory: choose a new directory")
    if target.exists() and any(target.iterdir()):
        raise InteropError(f"{target} exists and is not empty: choose a new directory")


def _make_beside(target: Path) -> Path:
    """A new empty directory `.<name>-<random>` beside `target` (mode 0o777 less the umask)."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        while True:
            tmp = target.parent / f".{target.name}-{secrets.token_hex(4)}"
            with contextlib.suppress(FileExistsError):
                tmp.mkdir()
                return tmp
    except OSError as e:
        raise InteropError(
            f"cannot write beside {target} ({e.strerror}): choose another directory"
        ) from None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Every file and directory under `root`, and `root`, on disk (the files first)."""
    for directory, _, files in os.walk(root, topdown=False):
        for name in files:
            _fsync(Path(directory, name))
        _fsync(Path(directory))


@contextlib.contextmanager
def staged(target: Path):
    """A temporary directory beside `target`, renamed to it on success, removed on failure.

    `target` may exist only as an empty directory; `InteropError` otherwise.
    """
    target = Path(target)
    _check_target(target)
    tmp = _make_beside(target)
    try:
        yield tmp
        _fsync_tree(tmp)
        try:
            os.rename(tmp, target)  # replaces an empty directory, never a full one
        except OSError as e:
            raise InteropError(
                f"cannot move the new directory to {target} ({e.strerror}): choose a new directory"
            ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync(target.parent)  # the rename itself
