"""One write mechanism for every catalog output: temporary sibling, fsync, rename, then a manifest.

Kedro's file datasets write straight to their final path, so a kill or a full disk mid-write destroys the
previous output and leaves a file that may still parse (a cut-off CSV reads as a shorter table). Wrapping
them in :class:`AtomicDataset` gives every output the same guarantees, without touching any node:

- the wrapped dataset writes into a temporary sibling (file or folder); only a complete write is renamed
  over the final path, so a failed write leaves the previous output untouched;
- a manifest ``<name>.manifest.json`` beside it records the content digest and the output's lineage (the
  digests of the inputs it was built from, filled in by ``mk_hspc.hooks.ProvenanceHooks``);
- a load (and ``exists``) checks the content against the manifest: an output that was cut off, edited or
  replaced outside a run, or whose manifest is missing, is refused with a message naming the file.

Why not a library: fsspec and kedro-datasets write in place; no Kedro plugin provides atomic saves.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import inspect
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from kedro.io import AbstractDataset, DatasetError
from kedro.io.core import parse_dataset_definition

from mk_hspc.failpoints import failpoint

MANIFEST_SUFFIX = ".manifest.json"
_TMP_MARK = ".tmp-"
_OLD_MARK = ".old-"


class StaleOutputError(DatasetError):
    """An output does not match its manifest (cut off, edited, or written by an interrupted run)."""


def content_digest(path: Path) -> str:
    """sha256 of a file, or of a folder's files (relative path + content, sorted); hidden entries ignored."""
    sha = hashlib.sha256()
    if path.is_dir():
        for file in sorted(p for p in path.rglob("*") if p.is_file() and not _hidden(p, path)):
            sha.update(str(file.relative_to(path).as_posix()).encode() + b"\0")
            _update_with_file(sha, file)
            sha.update(b"\0")
    else:
        _update_with_file(sha, path)
    return sha.hexdigest()


def _hidden(file: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in file.relative_to(root).parts)


def _update_with_file(sha: Any, file: Path) -> None:
    with open(file, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            sha.update(block)


# A folder with more files than this is made durable with one syncfs(2) of its file system instead of one
# fsync per file: 4,400 crop files of an annotation site took 20 s to fsync one by one, syncfs 0.01-0.08 s.
SYNCFS_MIN_FILES = 64


def fsync_tree(path: Path) -> None:
    """Make a written file or folder durable (files, then their folders), so a rename never exposes holes."""
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    if len(files) > SYNCFS_MIN_FILES and _syncfs(path):
        return
    for file in files:
        _fsync(file, os.O_RDONLY)
    folders = {file.parent for file in files} | ({path} if path.is_dir() else set())
    for folder in folders:
        _fsync(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def _syncfs(path: Path) -> bool:
    """Flush the whole file system holding ``path`` (Linux ``syncfs``); False where it is unavailable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        syncfs = libc.syncfs
    except (OSError, AttributeError):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        return syncfs(fd) == 0
    finally:
        os.close(fd)


def _fsync(path: Path, flags: int) -> None:
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON through a temporary sibling and a rename (durable before it is visible)."""
    tmp = path.with_name(f".{path.name}{_TMP_MARK}{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=1, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def replace_path(tmp: Path, final: Path) -> None:
    """Move a finished temporary file or folder over ``final`` (a folder is swapped through a side name)."""
    if tmp.is_dir() and final.exists():
        old = final.with_name(f".{final.name}{_OLD_MARK}{uuid.uuid4().hex[:8]}")
        os.replace(final, old)  # a crash between these two renames leaves no final: missing, never mixed
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync(final.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def remove_leftovers(final: Path) -> None:
    """Delete temporary and swapped-out siblings of ``final`` left by killed runs (called under the run lock)."""
    for pattern in (f".{final.name}{_TMP_MARK}*", f".{final.name}{_OLD_MARK}*"):
        for leftover in final.parent.glob(pattern):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


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


class AtomicDataset(AbstractDataset[Any, Any]):
    """Any file or folder dataset, written atomically and loaded only when it matches its manifest.

    Args:
        dataset: the wrapped dataset's type (``"pandas.ParquetDataset"``) or its config without the path.
        filepath: the output's final path (passed to the wrapped dataset as ``filepath`` or ``path``).
        metadata: free-form metadata, ignored by Kedro.

    Example (``catalog.yml``)::

        cells:
          type: mk_hspc.datasets.atomic.AtomicDataset
          dataset: pandas.ParquetDataset
          filepath: data/03_primary/cells.parquet
    """

    def __init__(
        self, dataset: str | dict[str, Any], filepath: str, metadata: dict[str, Any] | None = None
    ) -> None:
        config = {"type": dataset} if isinstance(dataset, str) else dict(dataset)
        dataset_class, _ = parse_dataset_definition(dict(config))
        parameters = inspect.signature(dataset_class).parameters
        self._path_key = "filepath" if "filepath" in parameters else "path"
        if self._path_key not in parameters:
            raise DatasetError(f"AtomicDataset: {config['type']} takes neither 'filepath' nor 'path'")
        self._config = config
        self._filepath = Path(filepath)
        self.metadata = metadata
        self.lineage: dict[str, str] = {}  # set by ProvenanceHooks just before a save
        self._verified: tuple[tuple, dict[str, Any]] | None = None  # (stat of the output, its manifest)

    def _inner(self, path: Path) -> AbstractDataset:
        return AbstractDataset.from_config(self._filepath.name, {**self._config, self._path_key: str(path)})

    def save(self, data: Any) -> None:
        final = self._filepath
        final.parent.mkdir(parents=True, exist_ok=True)
        remove_leftovers(final)
        tmp = final.with_name(f".{final.name}{_TMP_MARK}{uuid.uuid4().hex[:8]}")
        try:
            self._inner(tmp).save(data)
            failpoint(f"atomic:{final.name}:written")
            fsync_tree(tmp)
            digest = content_digest(tmp)
            # The manifest goes first: a crash before the data rename leaves old data under a new manifest,
            # which loads as a mismatch (refused), never as a silently accepted old output.
            write_json_atomic(
                manifest_path(final),
                {
                    "digest": digest,
                    "lineage": dict(sorted(self.lineage.items())),
                    "written_at_unix_s": round(time.time(), 3),
                    "dataset": self._config["type"],
                },
            )
            failpoint(f"atomic:{final.name}:manifest")
            replace_path(tmp, final)
        except BaseException:
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    tmp.unlink()
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
        if content_digest(final) != manifest["digest"]:
            raise StaleOutputError(
                f"{final} does not match its manifest (cut off, edited, or left by an interrupted run); "
                "rerun the node that writes it"
            )
        self._verified = (stamp, manifest)
        return manifest

    def load(self) -> Any:
        self.verified_manifest()
        return self._inner(self._filepath).load()

    def _exists(self) -> bool:
        try:
            self.verified_manifest()
        except StaleOutputError:
            return False
        return True

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath), "dataset": self._config.get("type")}
