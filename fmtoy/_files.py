"""Writing a file or a folder so that it is never half written (checkpoints, run folders, run cache, samples)."""

from __future__ import annotations

import ctypes
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable


def fsync_folder(folder: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename inside it) to disk, where the platform allows opening a folder."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_mode(folder: bool = False) -> int:
    """The permissions a plain open()/mkdir() would give under the user's umask (temporary files get 0600/0700)."""
    return (0o777 if folder else 0o666) & ~_umask()


def write_atomically(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """write(binary file) into a temporary file beside `path`, flushed to disk, then renamed to `path`: the file is
    always the old content or the new, and no temporary file is left behind on any error (Ctrl-C included)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE, macOS renamex_np RENAME_SWAP); False where the
    platform or the file system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if sys.platform.startswith("linux"):
            call = libc.renameat2
            args = (-100, os.fsencode(a), -100, os.fsencode(b), 2)  # AT_FDCWD, ..., RENAME_EXCHANGE
        elif sys.platform == "darwin":
            call, args = libc.renamex_np, (os.fsencode(a), os.fsencode(b), 2)  # RENAME_SWAP
        else:
            return False
    except (OSError, AttributeError):
        return False
    if call(*args) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95, 45):  # EINVAL, ENOSYS, EOPNOTSUPP (Linux) / ENOTSUP (macOS): not supported here
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_folder(stage: str | os.PathLike, folder: str | os.PathLike, keep: Callable[[str], bool]) -> None:
    """Make the complete folder `stage` become `folder` in one step, so that `folder` is at every instant either its
    old content or the new; entries of the old folder for which keep(name) is true (the user's own files beside a
    run) move into the new one. `stage` must be a sibling of `folder`; it is gone afterwards."""
    stage, folder = Path(stage), Path(folder)
    for entry in os.scandir(stage):
        if entry.is_file(follow_symlinks=False):
            with open(entry.path, "rb") as f:
                os.fsync(f.fileno())
    fsync_folder(stage)
    if not folder.exists():
        os.rename(stage, folder)
        fsync_folder(folder.parent)
        return
    others = [e for e in os.scandir(folder) if keep(e.name)]
    for e in others:  # files are linked into the new folder before the swap, folders moved after it
        if e.is_file(follow_symlinks=False):
            try:
                os.link(e.path, stage / e.name)
            except OSError:
                shutil.copy2(e.path, stage / e.name)
    old = stage  # after the swap the stage's name holds the old folder
    if not _exchange(stage, folder):  # no atomic swap here: a moment without `folder`, the old one beside it
        old = stage.with_name(stage.name.replace(".new-", ".old-", 1))
        os.rename(folder, old)
        os.rename(stage, folder)
    fsync_folder(folder.parent)
    for e in others:
        if not (folder / e.name).exists():
            os.rename(old / e.name, folder / e.name)
    shutil.rmtree(old, ignore_errors=True)
