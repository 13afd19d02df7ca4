"""Atomic directory writes: a folder appears whole or not at all.

    with atomic_directory("out/helpful") as tmp:
        save_file(tensors, os.path.join(tmp, "value_head.safetensors"))
        ...  # an exception here leaves out/helpful as it was

Everything is written into a hidden temp folder beside the target (same parent, so the final
rename never crosses a filesystem) and swapped in with one rename when the block exits cleanly.
Used for head folders, training checkpoints and the base-sample cache.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def atomic_directory(path: str | os.PathLike, *, overwrite: bool = True) -> Iterator[str]:
    """Yield an empty temp folder beside `path`; on a clean exit it becomes `path`.

    On an exception the temp folder is removed and `path` is left exactly as it was.
    An existing folder at `path` is replaced (`overwrite=True`): it is renamed away, the new folder
    is renamed in, then the old one is deleted. With `overwrite=False` an existing folder wins and
    the new one is discarded, which suits content-addressed caches written by concurrent runs.
    A file (not a folder) at `path` is an error, raised before anything is written.
    """
    path = os.path.abspath(os.fspath(path))
    parent, base = os.path.split(path)
    if not base:
        raise ValueError(f"Cannot write a folder at {path!r}: give a folder name, not a filesystem root.")
    if os.path.exists(path) and not os.path.isdir(path):
        raise FileExistsError(f"{path} exists and is a file, not a folder; remove it or pick another path.")
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{base}.tmp-{uuid.uuid4().hex}")
    os.mkdir(tmp)
    try:
        yield tmp
        _swap_in(tmp, path, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful swap


def _swap_in(tmp: str, path: str, overwrite: bool) -> None:
    """Rename `tmp` to `path`, moving an existing `path` aside first (and back if the swap fails)."""
    if not os.path.lexists(path):
        try:
            os.rename(tmp, path)
            return
        except OSError:
            if not os.path.isdir(path):  # anything but a concurrent writer that finished first
                raise
    if not overwrite:
        return  # keep the folder that is there; the caller's `finally` removes tmp
    old = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.old-{uuid.uuid4().hex}")
    os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(old, path)  # put the previous folder back
        raise
    shutil.rmtree(old, ignore_errors=True)
