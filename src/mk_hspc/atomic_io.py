"""Durable, atomic file writes without Kedro: temporary siblings, fsync, rename, and their clean-up.

One mechanism for every file the project writes (catalog outputs through ``datasets.atomic``, tile files,
manifests, the digest cache, the run-lock holder): a reader sees the old content or the complete new one,
never a partial file, and a crash leaves at most a hidden temporary sibling that the next write removes.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import json
import os
import shutil
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TMP_MARK = ".tmp-"
OLD_MARK = ".old-"
SPARE_MARK = ".spare"


def temporary_sibling(final: Path) -> Path:
    """A hidden, unique name beside ``final`` that keeps its suffix (datasets infer formats from it)."""
    return final.with_name(f".{final.stem}{TMP_MARK}{uuid.uuid4().hex[:8]}{final.suffix}")


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder fsync makes a rename durable); no-op where it cannot be opened."""
    flags = (os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)) if path.is_dir() else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# A folder with more files than this is made durable with one syncfs(2) of its file system instead of one
# fsync per file: 4,400 crop files of an annotation site took 20 s to fsync one by one, syncfs 0.01-0.08 s.
SYNCFS_MIN_FILES = 64


def fsync_tree(path: Path) -> None:
    """Make a written file or folder durable (files, then their folders), so a rename never exposes holes."""
    if path.is_dir() and _has_more_files(path, SYNCFS_MIN_FILES) and _syncfs(path):
        return  # counted only up to the threshold: listing 5,000 files cost more than the syncfs
    files = list(_files_under(path)) if path.is_dir() else [path]
    for file in files:
        fsync_path(file)
    for folder in {file.parent for file in files} | ({path} if path.is_dir() else set()):
        fsync_path(folder)


def _files_under(folder: Path) -> Iterator[Path]:
    """Every file under ``folder``, lazily (``os.walk``: ~10x cheaper than ``rglob`` + ``is_file`` for many
    files)."""
    for parent, _, names in os.walk(folder):
        yield from (Path(parent, name) for name in names if os.path.isfile(os.path.join(parent, name)))


def _has_more_files(folder: Path, count: int) -> bool:
    """Whether ``folder`` holds more than ``count`` files, looking no further than that."""
    return next(itertools.islice(_files_under(folder), count, None), None) is not None


def _syncfs(path: Path) -> bool:
    """Flush the whole file system holding ``path`` (Linux ``syncfs``); False where it is unavailable."""
    try:
        syncfs = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        return syncfs(fd) == 0
    finally:
        os.close(fd)


@contextlib.contextmanager
def publishing(tmp: Path, final: Path, *, fsync: bool = True) -> Iterator[Path]:
    """Write ``tmp`` in the ``with`` block; then it is renamed over ``final`` (fsynced before and after the
    rename when ``fsync``, so it is durable before it is visible), or removed if the block raised."""
    try:
        yield tmp
        if fsync:
            fsync_path(tmp)
        os.replace(tmp, final)
        if fsync:
            fsync_path(final.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_bytes_atomic(path: Path, data: bytes | memoryview, *, fsync: bool = True) -> None:
    """Write bytes through a temporary sibling and a rename (durable before visible when ``fsync``)."""
    with publishing(temporary_sibling(path), path, fsync=fsync) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path: Path, payload: Any, *, fsync: bool = True) -> None:
    """Write JSON through a temporary sibling and a rename."""
    write_bytes_atomic(path, json.dumps(payload, indent=1, sort_keys=True).encode(), fsync=fsync)


def replace_path(
    tmp: Path, final: Path, *, remove_old_in_background: bool = False, keep_old: bool = False
) -> None:
    """Move a finished temporary file or folder over ``final`` (a folder is swapped through a side name).

    With ``keep_old`` the swapped-out folder is kept as ``final``'s spare (:func:`spare_sibling`, unless one
    is already there) for the next write to reuse (:func:`take_spare`). Otherwise it is deleted, by a
    background thread with ``remove_old_in_background`` (see :func:`remove_in_background`) instead of
    before returning: deleting thousands of small files can take longer than writing them.
    """
    old = None
    if tmp.is_dir() and final.exists():
        spare = spare_sibling(final)
        keep = keep_old and final.is_dir() and not os.path.lexists(spare)
        old = spare if keep else final.with_name(f".{final.name}{OLD_MARK}{uuid.uuid4().hex[:8]}")
        os.replace(final, old)  # a crash between these two renames leaves no final: missing, never mixed
        os.replace(tmp, final)
        if keep:
            old = None
    else:
        os.replace(tmp, final)
    fsync_path(final.parent)
    if old is not None:
        if remove_old_in_background:
            remove_in_background(old)
        else:
            shutil.rmtree(old, ignore_errors=True)


def spare_sibling(final: Path) -> Path:
    """Where a replaced folder waits to be reused by the next write of ``final`` (hidden, one per output)."""
    return final.with_name(f".{final.name}{SPARE_MARK}")


def take_spare(final: Path, tmp: Path) -> bool:
    """Move ``final``'s spare folder (a replaced output) to ``tmp``, to be overwritten; False if none.

    Why reuse a replaced folder rather than delete it and create new files: on ext4 without a journal
    (this project's disks), a new inode skips every inode freed in the last seconds (up to 5 minutes while
    the inode table is unwritten) by scanning them one by one, so thousands of files created shortly after
    thousands were deleted cost ~0.25 ms each in the kernel instead of ~10 us. Overwriting the replaced
    files allocates no inode and frees none.
    """
    spare = spare_sibling(final)
    if not spare.is_dir() or spare.is_symlink():
        return False
    os.replace(spare, tmp)
    return True


_removals: dict[Path, threading.Thread] = {}
_removals_lock = threading.Lock()


def remove_in_background(path: Path) -> threading.Thread:
    """Delete ``path`` (a hidden, swapped-out sibling) in a non-daemon thread: the interpreter waits for it
    before exiting, and a process killed first leaves a sibling that the next write removes
    (:func:`remove_leftovers`)."""
    thread = threading.Thread(
        target=_remove_and_forget, args=(path,), name=f"remove {path.name}", daemon=False
    )
    with _removals_lock:
        _removals[path] = thread
    thread.start()
    return thread


def _remove_and_forget(path: Path) -> None:
    try:
        remove_path(path)
    finally:
        with _removals_lock:
            _removals.pop(path, None)


def wait_for_background_removals() -> None:
    """Block until every removal started by :func:`remove_in_background` has finished."""
    with _removals_lock:
        threads = list(_removals.values())
    for thread in threads:
        thread.join()


def remove_path(path: Path) -> None:
    """Delete a file or a folder, ignoring one that is already gone."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_leftovers(final: Path) -> None:
    """Delete temporary and swapped-out siblings of ``final`` left by killed runs (called under the run lock)."""
    with _removals_lock:
        in_progress = set(_removals)
    for pattern in (f".{final.stem}{TMP_MARK}*{final.suffix}", f".{final.name}{OLD_MARK}*"):
        for leftover in final.parent.glob(pattern):
            if leftover not in in_progress:  # a background removal of this process is already on it
                remove_path(leftover)
