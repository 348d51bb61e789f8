"""One write mechanism for every catalog output: temporary sibling, fsync, rename, then a manifest.

Kedro's file datasets write straight to their final path, so a kill or a full disk mid-write destroys the
previous output and leaves a file that may still parse (a cut-off CSV reads as a shorter table). Wrapping
them in :class:`AtomicDataset` gives every output the same guarantees, without touching any node:

- the wrapped dataset writes into a temporary sibling (file or folder); only a complete write is renamed
  over the final path, so a failed write leaves the previous output untouched;
- a manifest ``<name>.manifest.json`` beside it records the content digest and the output's lineage (the
  digests of the inputs it was built from, filled in by ``mk_hspc.hooks.ProvenanceHooks``);
- a load (and ``exists``) checks the content against the manifest: an output that was cut off, edited or
  replaced outside a run, or whose manifest is missing, is refused with a message naming the file;
- saves of one output never overlap (a lock file beside it): the later one waits, then replaces it whole.

Why not a library: fsspec and kedro-datasets write in place; no Kedro plugin provides atomic saves.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout
from kedro.io import AbstractDataset, DatasetError
from kedro.io.core import parse_dataset_definition

from mk_hspc.atomic_io import (
    fsync_tree,
    remove_leftovers,
    remove_path,
    replace_path,
    spare_sibling,
    take_spare,
    temporary_sibling,
    write_json_atomic,
)
from mk_hspc.errors import UserError
from mk_hspc.failpoints import failpoint

SAVE_LOCK_TIMEOUT_S = 600


def save_lock_path(final: Path) -> Path:
    """The lock a save of ``final`` holds (hidden, beside it; never a leftover to clean up)."""
    return final.with_name(f".{final.name}.save.lock")


@contextlib.contextmanager
def held_lock(path: Path, timeout_s: float, busy: str) -> Iterator[None]:
    """Hold the file lock ``path`` for the block; ``DatasetError(busy)`` when another holder keeps it past
    ``timeout_s`` (0: at once). A new lock object per call, so it has its own descriptor and threads of one
    process exclude each other too (the kernel frees it when a holder dies)."""
    lock = FileLock(path, timeout=timeout_s)
    try:
        lock.acquire()
    except Timeout:
        raise DatasetError(busy) from None
    try:
        yield
    finally:
        lock.release()


MANIFEST_SUFFIX = ".manifest.json"
# ``{relative path: sha256 hex}`` of the files a wrapped folder dataset's last save wrote, when it keeps them.
WRITTEN_SHA256_ATTRIBUTE = "written_sha256"


class StaleOutputError(UserError, DatasetError):
    """An output does not match its manifest (cut off, edited, or written by an interrupted run)."""


LISTING_SCHEME = "sha256-listing"
"""The folder digest of manifests that name it (``digest_scheme``): the sha256 of the folder's ``sha256sum``
listing, one line ``<sha256 hex>  <relative path>`` per file, sorted by path bytes. Each file is hashed on its
own, so a writer that hashes what it writes (the annotation site, thousands of crops) hands its digests over
instead of the whole folder being read back after the write, and anyone can check a folder with coreutils
(README, "Checking an output"). Manifests without ``digest_scheme`` keep the first folder digest
(:func:`stream_digest`)."""


def content_digest(path: Path, scheme: str | None = LISTING_SCHEME) -> str:
    """sha256 of a file; of a folder, by ``scheme`` (:data:`LISTING_SCHEME`, or None for manifests written
    before it: :func:`stream_digest`). Hidden entries are ignored."""
    if not path.is_dir():
        return _file_sha256(path)
    if scheme is None:
        return stream_digest(path)
    if scheme != LISTING_SCHEME:
        raise ValueError(f"{path}: unknown digest scheme {scheme!r} (this version knows {LISTING_SCHEME!r})")
    return listing_digest(path)


def listing_digest(folder: Path, known_sha256: Mapping[str, str] | None = None) -> str:
    """The :data:`LISTING_SCHEME` digest of ``folder``.

    ``known_sha256``: ``{relative path: sha256 hex}`` of files whose content the caller has just written and
    hashed; the rest are read and hashed here. The folder is always listed, so a file the caller did not write
    still counts, and a file it names that is not there is an error, not a digest of a folder that never was
    (hidden names aside: no digest counts them).

    Raises:
        FileNotFoundError: a path of ``known_sha256`` is not a file of ``folder``.
    """
    known = known_sha256 or {}
    entries = []
    for parts, file in _visible_files(str(folder), ()):
        relative = "/".join(parts)
        entries.append((os.fsencode(relative), relative, known.get(relative) or _file_sha256(file)))
    listed = {relative for _, relative, _ in entries}
    missing = [path for path in known if path not in listed and not _is_hidden(path)]
    if missing:
        raise FileNotFoundError(
            f"{folder}: {len(missing)} file(s) its writer reported are not there, e.g. {sorted(missing)[:3]}"
        )
    sha = hashlib.sha256()
    for path_bytes, _, file_sha in sorted(entries):
        sha.update(_listing_line(path_bytes, file_sha))
    return sha.hexdigest()


def _listing_line(path_bytes: bytes, file_sha: str) -> bytes:
    """One ``sha256sum`` line. A name holding a backslash, newline or carriage return is escaped as coreutils
    does (the line starts with a backslash): raw, a name with a newline could forge the lines of other files."""
    if b"\\" in path_bytes or b"\n" in path_bytes or b"\r" in path_bytes:
        escaped = path_bytes.replace(b"\\", b"\\\\").replace(b"\n", b"\\n").replace(b"\r", b"\\r")
        return b"\\" + file_sha.encode() + b"  " + escaped + b"\n"
    return file_sha.encode() + b"  " + path_bytes + b"\n"


def _is_hidden(relative: str) -> bool:
    return any(part.startswith(".") for part in relative.split("/"))


def stream_digest(path: Path) -> str:
    """The first folder digest (manifests without ``digest_scheme``): one sha256 over every file's relative
    path and content in turn, sorted by path components."""
    sha = hashlib.sha256()
    # Sorted by path components, as ``sorted(Path, ...)`` orders them ("a/b" before "a-b/c").
    for parts, file in sorted(_visible_files(str(path), ())):
        sha.update("/".join(parts).encode() + b"\0")
        _update_with_file(sha, file)
        sha.update(b"\0")
    return sha.hexdigest()


def synced_digest(path: Path, known_sha256: Mapping[str, str] | None = None) -> str:
    """Make ``path`` durable (:func:`fsync_tree`) and return its :func:`content_digest` (a folder's with the
    digests its writer reported, see :func:`listing_digest`).

    A folder is hashed by another thread while the sync waits for the disk: reading back small files from the
    page cache and flushing them to disk need different resources, so the two overlap.
    """
    if not path.is_dir():
        fsync_tree(path)
        return content_digest(path)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="digest") as pool:
        digest = pool.submit(listing_digest, path, known_sha256)
        fsync_tree(path)
        return digest.result()


def _visible_files(folder: str, parts: tuple[str, ...]) -> list[tuple[tuple[str, ...], str]]:
    """``(relative path components, path)`` of the files under ``folder``, skipping hidden names and not
    entering linked folders (what ``Path.rglob("*")`` + ``is_file`` yield, without pathlib's per-file cost:
    a site of 5,000 crops digests in a third of the time)."""
    files = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir(follow_symlinks=False):
                files.extend(_visible_files(entry.path, (*parts, entry.name)))
            elif entry.is_file():
                files.append(((*parts, entry.name), entry.path))
    return files


def _file_sha256(file: Path | str) -> str:
    sha = hashlib.sha256()
    _update_with_file(sha, file)
    return sha.hexdigest()


def _update_with_file(sha: Any, file: Path | str) -> None:
    # Plain os.read: a buffered file object per file cost a third of a 5,000-crop site's digest.
    fd = os.open(file, os.O_RDONLY)
    try:
        while block := os.read(fd, 1 << 22):
            sha.update(block)
    finally:
        os.close(fd)


def _stamp(path: Path) -> tuple:
    """Size, mtime and inode of a file, or of a folder's files and of its manifest: cheap change detector."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    files.append(manifest_path(path))
    stamps = []
    for file in files:
        try:
            stat = file.stat()
        except OSError:
            stamps.append((str(file), None))
            continue
        stamps.append((str(file), stat.st_size, stat.st_mtime_ns, stat.st_ino))
    return tuple(stamps)


def manifest_path(final: Path) -> Path:
    return final.with_name(final.name + MANIFEST_SUFFIX)


def read_manifest(final: Path) -> dict[str, Any] | None:
    """The manifest of an output, or None when there is none or it is unreadable."""
    try:
        manifest = json.loads(manifest_path(final).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


class VerifiedOutput:
    """An output that exists for Kedro only when it matches its manifest (``--only-missing-outputs``)."""

    def verified_manifest(self) -> dict[str, Any]:
        raise NotImplementedError

    def _exists(self) -> bool:
        try:
            self.verified_manifest()
        except StaleOutputError:
            return False
        return True


class AtomicDataset(VerifiedOutput, AbstractDataset[Any, Any]):
    """Any file or folder dataset, written atomically and loaded only when it matches its manifest.

    Args:
        dataset: the wrapped dataset's type (``"pandas.ParquetDataset"``) or its config without the path.
        filepath: the output's final path (passed to the wrapped dataset as ``filepath`` or ``path``).
        remove_old_in_background: delete a replaced folder in a background thread (thousands of small
            files, e.g. the annotation site) instead of before ``save`` returns.
        reuse_replaced: keep the replaced folder aside and hand it to the next save as its temporary
            folder, to overwrite instead of deleting thousands of files and creating as many (see
            :func:`mk_hspc.atomic_io.take_spare`). Only for a wrapped dataset whose save leaves the folder
            holding exactly the new output whatever it held (class attribute ``REWRITES_WHOLE_FOLDER``).
        metadata: free-form metadata, ignored by Kedro.

    Example (``catalog.yml``)::

        cells:
          type: mk_hspc.datasets.atomic.AtomicDataset
          dataset: pandas.ParquetDataset
          filepath: data/03_primary/cells.parquet
    """

    def __init__(
        self,
        dataset: str | dict[str, Any],
        filepath: str,
        metadata: dict[str, Any] | None = None,
        remove_old_in_background: bool = False,
        reuse_replaced: bool = False,
    ) -> None:
        config = {"type": dataset} if isinstance(dataset, str) else dict(dataset)
        dataset_class, _ = parse_dataset_definition(dict(config))
        if reuse_replaced and not getattr(dataset_class, "REWRITES_WHOLE_FOLDER", False):
            raise DatasetError(
                f"AtomicDataset: reuse_replaced needs a dataset that rewrites its whole folder; {config['type']} "
                "may leave the replaced output's files in it"
            )
        parameters = inspect.signature(dataset_class).parameters
        self._path_key = "filepath" if "filepath" in parameters else "path"
        if self._path_key not in parameters:
            raise DatasetError(f"AtomicDataset: {config['type']} takes neither 'filepath' nor 'path'")
        self._config = config
        self._filepath = Path(filepath)
        self.metadata = metadata
        self._remove_old_in_background = bool(remove_old_in_background)
        self._reuse_replaced = bool(reuse_replaced)
        self.lineage: dict[str, str] = {}  # set by ProvenanceHooks just before a save
        self._verified: tuple[tuple, dict[str, Any]] | None = None  # (stat of the output, its manifest)

    def _inner(self, path: Path) -> AbstractDataset:
        return AbstractDataset.from_config(self._filepath.name, {**self._config, self._path_key: str(path)})

    def save(self, data: Any) -> None:
        final = self._filepath
        final.parent.mkdir(parents=True, exist_ok=True)
        # One save of an output at a time, across threads and processes (the annotate server's export beside
        # `kedro annotate export` or a run, which hold no common lock): a second save's cleanup of leftovers
        # would delete the first one's temporary sibling. The later save waits, then wins.
        busy = (
            f"{final} is being written by another save for over {SAVE_LOCK_TIMEOUT_S} s "
            f"(lock {save_lock_path(final)}); try again when it has finished"
        )
        with held_lock(save_lock_path(final), SAVE_LOCK_TIMEOUT_S, busy):
            self._save_locked(data)

    def _save_locked(self, data: Any) -> None:
        final = self._filepath
        remove_leftovers(final)
        tmp = temporary_sibling(final)
        try:
            if self._reuse_replaced:
                take_spare(final, tmp)
            else:
                remove_path(spare_sibling(final))  # kept while reuse_replaced was on: no longer wanted
            inner = self._inner(tmp)
            inner.save(data)
            failpoint(f"atomic:{final.name}:written")
            # A folder writer may report the sha256 of each file it wrote (WRITTEN_SHA256_ATTRIBUTE): hashed from
            # memory as it wrote them, instead of read back here.
            digest = synced_digest(tmp, getattr(inner, WRITTEN_SHA256_ATTRIBUTE, None))
            # The manifest goes first: a crash before the data rename leaves old data under a new manifest,
            # which loads as a mismatch (refused), never as a silently accepted old output.
            write_json_atomic(
                manifest_path(final),
                {
                    "digest": digest,
                    **({"digest_scheme": LISTING_SCHEME} if tmp.is_dir() else {}),
                    "lineage": dict(sorted(self.lineage.items())),
                    "written_at_unix_s": round(time.time(), 3),
                    "dataset": self._config["type"],
                },
            )
            failpoint(f"atomic:{final.name}:manifest")
            replace_path(
                tmp,
                final,
                remove_old_in_background=self._remove_old_in_background,
                keep_old=self._reuse_replaced,
            )
        except BaseException:
            remove_path(tmp)
            raise

    def verified_manifest(self) -> dict[str, Any]:
        """The manifest, after checking that the output on disk is the one it describes.

        Raises:
            StaleOutputError: no output, no manifest, or content that differs from the manifest's digest.
        """
        final = self._filepath
        if not final.exists():
            raise StaleOutputError(f"{final} does not exist; run the pipeline that writes it")
        stamp = _stamp(final)
        if self._verified is not None and self._verified[0] == stamp:
            return self._verified[1]  # unchanged since verified (a load and its hook check hash once)
        manifest = read_manifest(final)
        if manifest is None or "digest" not in manifest:
            raise StaleOutputError(
                f"{final} has no manifest ({manifest_path(final).name}): it was not written completely by "
                "this project (an interrupted or older run); rerun the node that writes it"
            )
        try:
            current = content_digest(final, manifest.get("digest_scheme"))
        except ValueError as exc:  # a digest scheme this version does not know (a newer version's manifest)
            raise StaleOutputError(f"{exc}; rerun the node that writes it with this version") from None
        if current != manifest["digest"]:
            raise StaleOutputError(
                f"{final} does not match its manifest (cut off, edited, or left by an interrupted run); "
                "rerun the node that writes it"
            )
        self._verified = (stamp, manifest)
        return manifest

    def load(self) -> Any:
        self.verified_manifest()
        return self._inner(self._filepath).load()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath), "dataset": self._config.get("type")}
