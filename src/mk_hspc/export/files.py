"""Writing a site folder in place: site-relative names checked, files overwritten or recycled, leftovers
removed.

The site dataset may hand :func:`mk_hspc.export.build.write_site` the replaced site's folder
(``AtomicDataset(reuse_replaced=True)``, see :func:`mk_hspc.atomic_io.take_spare`): its files are
overwritten in place, renamed to the new names the new site needs, and what remains is deleted, so that no
inode is created or freed on the way (slow on ext4 without a journal just after mass deletions).
"""

from __future__ import annotations

import hashlib
import mmap
import os
from collections.abc import Callable, Collection, Mapping
from pathlib import Path, PurePosixPath


def safe_relative(path: str) -> PurePosixPath:
    """A site-relative path that cannot leave the site (no absolute path, ``..``, backslash or NUL)."""
    check_site_path(path)
    return PurePosixPath(path)


def check_site_path(path: str) -> None:
    """Raise ``ValueError`` for a site path that could leave the site (see :func:`safe_relative`)."""
    if (
        path.startswith("/")
        or any(part in ("..", ".", "") for part in path.split("/"))
        or "\\" in path
        or "\0" in path
    ):
        raise ValueError(f"site path {path!r} would leave the site folder")


class Recycler:
    """The files of a reused folder, and those of them the new content will not have (to be renamed).

    Args:
        existing: site-relative paths of the files the folder holds.
        spare: those of ``existing`` the new content lacks; :func:`write_files` renames one of them to each
            new name it writes, so that no inode is created or freed (see :func:`mk_hspc.atomic_io.take_spare`).
    """

    def __init__(self, existing: set[str], spare: list[str]) -> None:
        self.existing = existing
        self.spare = spare


def write_files(
    folder: Path,
    files: Mapping[str, bytes],
    recycler: Recycler | None = None,
    sha256: dict[str, str] | None = None,
) -> None:
    """Write ``files`` (site-relative path -> bytes) under ``folder``, over any file already there; no fsync
    (the site dataset syncs the finished folder once). A file that is not there yet is, when ``recycler`` has a
    spare file, that file renamed. ``sha256``, if given, receives each file's sha256 (hex): the site's digest
    without reading the files back (:func:`mk_hspc.datasets.atomic.listing_digest`).

    Files are opened relative to their folder's descriptor, without following a link: no path object and
    no path walk per file (a tile's few hundred crops share one folder).
    """
    folder_fds: dict[str, int] = {}
    try:
        for name, content in files.items():
            check_site_path(name)
            parent, _, base = name.rpartition("/")
            folder_fd = folder_fds.get(parent)
            if folder_fd is None:
                (folder / parent).mkdir(parents=True, exist_ok=True)
                folder_fd = os.open(folder / parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
                folder_fds[parent] = folder_fd
            if recycler is not None and recycler.spare and name not in recycler.existing:
                spare = recycler.spare.pop()
                os.rename(f"{folder}/{spare}", f"{folder}/{name}")
                recycler.existing.discard(spare)
                recycler.existing.add(name)
            fd = os.open(base, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644, dir_fd=folder_fd)
            try:
                overwrite(fd, content)
            finally:
                os.close(fd)
            if sha256 is not None:
                sha256[name] = hashlib.sha256(content).hexdigest()
    finally:
        for folder_fd in folder_fds.values():
            os.close(folder_fd)


_PAGE_BYTES = mmap.PAGESIZE
_ZEROS = bytes(_PAGE_BYTES)


def overwrite(fd: int, content: bytes) -> None:
    """Make the open file ``fd`` hold exactly ``content``: whole pages written from offset 0, then the size cut.

    Why not ``O_TRUNC``: truncating a file of a reused folder frees its blocks (on a disk mounted with
    ``discard``, a discard each: 0.3-1.3 ms per crop file measured) and the write then allocates new ones.
    Whole pages over the old blocks allocate and free nothing (for a file no longer in the page cache, a
    partial page would first be read from disk); the cut to the content's size zeroes the padding.
    """
    padding = -len(content) % _PAGE_BYTES
    written = os.writev(fd, [content, _ZEROS[:padding]])
    if written < len(content) + padding:  # a short write (not seen on local disks): finish it plainly
        rest = memoryview(bytes(content) + _ZEROS[:padding])[written:]
        while rest:
            rest = rest[os.write(fd, rest) :]
    os.ftruncate(fd, len(content))


def reusable_files(folder: Path, paths: Callable[[], frozenset[str]] | None) -> Recycler | None:
    """What ``folder`` holds and which of it the new site (``paths``) lacks; None for an empty folder."""
    existing = set(_regular_files(str(folder), ""))
    if not existing:
        return None
    wanted = paths() if paths is not None else frozenset()
    return Recycler(existing, sorted(existing - wanted, reverse=True) if paths is not None else [])


def _regular_files(path: str, prefix: str) -> list[str]:
    """Site-relative paths of the regular files under ``path`` (a link is never reused, only replaced)."""
    files = []
    with os.scandir(path) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                files += _regular_files(entry.path, prefix + entry.name + "/")
            elif entry.is_file(follow_symlinks=False):
                files.append(prefix + entry.name)
    return files


def remove_unwritten(folder: Path, written: Collection[str]) -> None:
    """Delete every file and folder under ``folder`` that holds none of ``written`` (site-relative paths):
    what a reused folder kept from the site it held before."""

    def prune(path: str, prefix: str) -> bool:
        kept = False
        with os.scandir(path) as entries:
            for entry in entries:
                relative = prefix + entry.name
                if entry.is_dir(follow_symlinks=False):
                    if prune(entry.path, relative + "/"):
                        kept = True
                    else:
                        os.rmdir(entry.path)
                elif relative in written:
                    kept = True
                else:
                    os.unlink(entry.path)
        return kept

    prune(str(folder), "")
