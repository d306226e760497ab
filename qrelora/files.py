"""Writing files and directories so that a reader never sees them half-written."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def publish(tmp: Path, final: Path, *, replace: bool = True, durable: bool = False) -> bool:
    """Move a fully written temporary file or directory (beside `final`, on the same file system) into
    place with one rename. An existing `final` is replaced (a directory is removed first), or with
    replace=False kept: another process published the same content first, and ours is discarded.
    durable: flush the rename to disk, so that it survives a crash. Returns whether ours went into place."""
    if final.exists():
        if not replace:
            _remove(tmp)
            return False
        if final.is_dir():
            shutil.rmtree(final)
    try:
        os.replace(tmp, final)
    except OSError:
        if replace or not final.exists():
            raise
        _remove(tmp)  # lost a race to a concurrent writer of the same content
        return False
    if durable:
        fsync_dir(final.parent)
    return True


def apply_umask(directory: Path) -> None:
    """safetensors creates its files with mode 600 whatever the umask; give every file the mode open() gives
    (666 less the umask), like the config and tokenizer files beside it."""
    umask = os.umask(0)
    os.umask(umask)
    for f in directory.iterdir():
        if f.is_file():
            os.chmod(f, 0o666 & ~umask)


def fsync_file(path: Path) -> None:
    """Flush a file written by a library that does not (safetensors) to disk."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
