"""Atomic writes: a folder or a file appears whole or not at all, even if the writer is killed.

    with atomic_directory("out/helpful") as tmp:
        save_file(tensors, os.path.join(tmp, "value_head.safetensors"))
        ...  # an exception (or a kill -9) here leaves out/helpful as it was

Everything is written into a hidden temp folder beside the target (same parent, so the final
rename never crosses a filesystem) and swapped in when the block exits cleanly. On Linux an
existing folder is replaced by one atomic exchange (renameat2 RENAME_EXCHANGE): at every moment the
target is the old folder or the new one. Elsewhere (or on a filesystem without the exchange) the old
folder is renamed aside and the new one renamed in; a crash between those two renames leaves the
previous folder at `.NAME.old-*` beside it. Temp folders of writers that died are removed by the next
write to the same target. Used for head folders, training checkpoints, the base-sample cache and reports;
`atomic_write_text` does the same for one file (a temp file beside it, then one rename).
"""

from __future__ import annotations

import ctypes
import errno
import glob
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

_RENAME_EXCHANGE, _AT_FDCWD = 2, -100  # from <linux/fs.h> and <fcntl.h>
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


@contextmanager
def atomic_directory(path: str | os.PathLike, *, overwrite: bool = True) -> Iterator[str]:
    """Yield an empty temp folder beside `path`; on a clean exit it becomes `path`.

    On an exception the temp folder is removed and `path` is left exactly as it was.
    An existing folder at `path` is replaced (`overwrite=True`). With `overwrite=False` an existing
    folder wins and the new one is discarded, which suits content-addressed caches written by
    concurrent runs. A file (not a folder) at `path` is an error, raised before anything is written.
    """
    path = os.path.abspath(os.fspath(path))
    parent, base = os.path.split(path)
    if not base:
        raise ValueError(f"Cannot write a folder at {path!r}: give a folder name, not a filesystem root.")
    if os.path.exists(path) and not os.path.isdir(path):
        raise FileExistsError(f"{path} exists and is a file, not a folder; remove it or pick another path.")
    os.makedirs(parent, exist_ok=True)
    _remove_leftovers(path)
    tmp = os.path.join(parent, f".{base}.tmp-{os.getpid()}-{uuid.uuid4().hex}")
    os.mkdir(tmp)
    try:
        yield tmp
        _swap_in(tmp, path, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a rename; the old folder after an exchange


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to a temp file beside `path` (its folder made if missing), then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # the mode open() would give, not mkstemp's owner-only 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _swap_in(tmp: str, path: str, overwrite: bool) -> None:
    """Make `tmp` the folder at `path`: a rename, or an atomic exchange with an existing folder."""
    if not os.path.lexists(path):
        try:
            os.rename(tmp, path)
            return
        except OSError:
            if not os.path.isdir(path):  # anything but a concurrent writer that finished first
                raise
    if not overwrite:
        return  # keep the folder that is there; the caller's `finally` removes tmp
    if _exchange(tmp, path):
        return  # tmp now holds the previous folder, which the caller's `finally` removes
    old = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.old-{os.getpid()}-{uuid.uuid4().hex}")
    os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(old, path)  # put the previous folder back
        raise
    shutil.rmtree(old, ignore_errors=True)


def _exchange(a: str, b: str) -> bool:
    """Swap two paths in one atomic step (Linux renameat2); False where the system cannot."""
    renameat2 = getattr(_LIBC, "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), b)


def _remove_leftovers(path: str) -> None:
    """Delete temp folders beside `path` left by writers that died (their pid is gone).

    A set-aside previous folder (`.NAME.old-*`) is deleted only while `path` itself exists: otherwise
    it is the last copy of the folder, which the error of the loader points to.
    """
    parent, base = os.path.split(path)
    for leftover in glob.glob(os.path.join(glob.escape(parent), f".{glob.escape(base)}.*-*-*")):
        kind, _, rest = leftover.rpartition(".")[2].partition("-")
        pid = rest.partition("-")[0]
        wanted = kind == "tmp" or (kind == "old" and os.path.isdir(path))
        if wanted and pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)
