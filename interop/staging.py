"""A directory written whole or not at all: files go to a temporary directory beside the target,
which is renamed into place at the end; a failure removes it and leaves nothing half-written."""

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from interop import InteropError


@contextlib.contextmanager
def staged(target: Path):
    """A temporary directory beside `target`, renamed to it on success, removed on failure.

    `target` may exist only as an empty directory; `InteropError` otherwise.
    """
    target = Path(target)
    if target.exists() and any(target.iterdir()):
        raise InteropError(f"{target} exists and is not empty: choose a new directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        yield tmp
        if target.exists():
            target.rmdir()
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
