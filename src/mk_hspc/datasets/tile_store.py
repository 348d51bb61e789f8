"""The per-tile HDF5 store as a Kedro dataset: saved by executing a segmentation plan, loaded lazily per tile.

Files and trust rules of each tile: :mod:`mk_hspc.tile_store`. At the store level, a manifest
``<store>.manifest.json`` is written only when every tile of the plan is done; it lists the tiles with the
size and mtime of their files, the run's parameters hash, the run summary and the lineage. Without a valid
manifest the store does not "exist" for Kedro (``--only-missing-outputs`` reruns segmentation, which resumes)
and cannot be loaded; a tile file changed or removed since is refused at load.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from kedro.io import AbstractDataset, DatasetError

from mk_hspc.atomic_io import write_json_atomic
from mk_hspc.datasets.atomic import (
    StaleOutputError,
    VerifiedOutput,
    held_lock,
    manifest_path,
    read_manifest,
)
from mk_hspc.engine.fingerprint import digest
from mk_hspc.engine.plan import SegmentationPlan
from mk_hspc.errors import UserError
from mk_hspc.failpoints import failpoint
from mk_hspc.tile_store import (
    FORMAT_VERSION,
    TileOutlines,
    TileResult,
    read_tile_outlines,
    read_tile_result,
    tile_path,
)

logger = logging.getLogger(__name__)

FAILURES_NAME = "failures.json"
STORE_LOCK_NAME = ".mk_hspc_store.lock"


class TileFailuresError(DatasetError):
    """Some tiles could not be read or segmented; every other tile was processed and written.

    Raised as :class:`BadInputTilesError` (shown without a traceback) when every failure was bad input (a
    corrupt region of a slide); a failure of the code or of a library keeps the traceback, and its type and
    traceback are in the records and the log (:func:`tile_failures_error`).
    """

    def __init__(self, failed_tiles: Sequence[Mapping[str, Any]], failures_file: Path) -> None:
        lines = [f"  {f['tile_id']} ({f['stage']}): {f['error']}" for f in failed_tiles[:10]]
        more = f"\n  ... and {len(failed_tiles) - 10} more" if len(failed_tiles) > 10 else ""
        super().__init__(
            f"{len(failed_tiles)} tile(s) failed; all other tiles are done and kept. Details in "
            f"{failures_file}. Fix the cause (or drop the slide) and run again: finished tiles are skipped.\n"
            + "\n".join(lines)
            + more
        )
        self.failed_tiles = list(failed_tiles)
        self.failures_file = failures_file

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.failed_tiles, self.failures_file))


class BadInputTilesError(UserError, TileFailuresError):
    """Tiles failed, every one on bad input (e.g. a corrupt slide region): the message says which and why."""


def tile_failures_error(failed_tiles: Sequence[Mapping[str, Any]], failures_file: Path) -> TileFailuresError:
    """The error for these failed tiles: :class:`BadInputTilesError` when all were bad input."""
    bad_input = all(bool(f.get("user_error", False)) for f in failed_tiles)
    return (BadInputTilesError if bad_input else TileFailuresError)(failed_tiles, failures_file)


class TileStore:
    """Read view of a complete tile store: which tiles, made with which parameters, and each tile on demand."""

    def __init__(self, root: Path, manifest: dict[str, Any]) -> None:
        self.root = root
        self.params_hash: str = manifest["params_hash"]
        self.tiles: dict[str, str] = dict(manifest["tiles"])  # tile_id -> slide
        self.summary: dict[str, Any] = manifest.get("summary", {})
        # tile_id -> slide of sampled tiles that failed and were left out (skip_bad_slides)
        self.failed_tiles: dict[str, str] = {
            f["tile_id"]: f["slide"] for f in manifest.get("failed_tiles", [])
        }

    def read(
        self, tile_id: str, *, include_labels: bool = True, feature_names: Iterable[str] | None = None
    ) -> TileResult:
        """One tile's result (labels, cells, features); refuses a tile the store does not hold."""
        if tile_id not in self.tiles:
            raise KeyError(f"tile {tile_id} is not in the tile store {self.root}")
        return read_tile_result(
            self.root,
            tile_id,
            slide=self.tiles[tile_id],
            include_labels=include_labels,
            feature_names=feature_names,
        )

    def read_outlines(self, tile_id: str, cell_types: Iterable[str]) -> TileOutlines:
        """Window and cell outlines of one tile (see :func:`mk_hspc.tile_store.read_tile_outlines`)."""
        if tile_id not in self.tiles:
            raise KeyError(f"tile {tile_id} is not in the tile store {self.root}")
        return read_tile_outlines(self.root, tile_id, cell_types, slide=self.tiles[tile_id])

    def __repr__(self) -> str:
        return f"TileStore({str(self.root)!r}, {len(self.tiles)} tiles, params {self.params_hash})"


class TileStoreDataset(VerifiedOutput, AbstractDataset[SegmentationPlan, TileStore]):
    """Folder of per-tile HDF5 files (``<path>/<slide>/<tile_id>.h5``) plus its manifest.

    Args:
        path: the store's folder.
        reuse_from: another store folder (e.g. the sampled run's, for the full run) whose tile files are
            hard-linked into this one before the plan runs, for tiles this store lacks. The run then
            skips each linked tile made with the same fingerprint and rewrites any other one (tile writes
            replace the directory entry, so the other store's file is never changed).
        metadata: free-form metadata, ignored by Kedro.
    """

    def __init__(
        self, path: str, reuse_from: str | None = None, metadata: dict[str, Any] | None = None
    ) -> None:
        self._path = Path(path)
        self._reuse_from = Path(reuse_from) if reuse_from else None
        self.metadata = metadata
        self.lineage: dict[str, str] = {}  # set by ProvenanceHooks just before a save

    def save(self, data: SegmentationPlan) -> None:
        self._path.mkdir(parents=True, exist_ok=True)
        # The project's run lock covers data/; a store configured elsewhere (a shared disk) gets its own, so
        # two projects never write into, or clean the temporary files of, one store at once.
        busy = f"tile store {self._path} is being written by another run; wait for it to finish"
        with held_lock(self._path / STORE_LOCK_NAME, 0, busy):
            self._save_locked(data)

    def _save_locked(self, data: SegmentationPlan) -> None:
        manifest_path(self._path).unlink(missing_ok=True)  # incomplete until this run has finished
        if self._reuse_from is not None and self._reuse_from.resolve() != self._path.resolve():
            link_finished_tiles(self._reuse_from, self._path, data.tile_sample)
        summary = data.run(self._path)
        failures_file = self._path / FAILURES_NAME
        write_json_atomic(failures_file, summary.failed_tiles)
        if summary.failed_tiles and not data.skip_failed_tiles:
            raise tile_failures_error(summary.failed_tiles, failures_file)
        if summary.failed_tiles:
            logger.warning(
                "%d tile(s) failed and are left out (skip_bad_slides), slides %s; details in %s",
                len(summary.failed_tiles),
                sorted({f["slide"] for f in summary.failed_tiles}),
                failures_file,
            )
        failpoint("tile_store:before_manifest")
        failed = {f["tile_id"] for f in summary.failed_tiles}
        sampled = zip(
            data.tile_sample["tile_id"].astype(str), data.tile_sample["slide"].astype(str), strict=True
        )
        tiles = dict(sorted((tile_id, slide) for tile_id, slide in sampled if tile_id not in failed))
        write_json_atomic(
            manifest_path(self._path),
            {
                "format_version": FORMAT_VERSION,
                "params_hash": summary.params_hash,
                "tiles": tiles,
                "digest": self._digest(summary.params_hash, tiles),
                "lineage": dict(sorted(self.lineage.items())),
                "summary": summary.to_dict(),
                "failed_tiles": summary.failed_tiles,
                "written_at_unix_s": round(time.time(), 3),
            },
        )

    def _digest(self, params_hash: str, tiles: dict[str, str]) -> str:
        """Fingerprint of the store's content: parameters and every tile file's size and mtime."""
        stamps = []
        for tile_id, slide in tiles.items():
            stat = tile_path(self._path, tile_id, slide).stat()
            stamps.append([tile_id, stat.st_size, stat.st_mtime_ns])
        return digest({"params_hash": params_hash, "tiles": stamps}, length=64)

    def verified_manifest(self) -> dict[str, Any]:
        """The manifest, after checking that every tile it lists is still the file it was.

        Raises:
            StaleOutputError: no complete run wrote this store, or tiles changed since.
        """
        manifest = read_manifest(self._path)
        if manifest is None or "digest" not in manifest:
            raise StaleOutputError(
                f"tile store {self._path} is not complete (no manifest: segmentation has not finished "
                "here, or was interrupted); run the segmentation pipeline, which resumes"
            )
        if manifest.get("format_version") != FORMAT_VERSION:
            # Older tiles lack what this code reads (format 3: the cells' outlines, which the export draws).
            written = manifest.get("format_version", "2 or older")
            raise StaleOutputError(
                f"tile store {self._path} holds tiles of format {written}, this version of the project reads "
                f"format {FORMAT_VERSION}; run the segmentation pipeline again (it recomputes the tiles)"
            )
        try:
            current = self._digest(manifest["params_hash"], manifest["tiles"])
        except FileNotFoundError as exc:
            raise StaleOutputError(f"tile store {self._path}: a tile file is gone ({exc.filename})") from None
        if current != manifest["digest"]:
            raise StaleOutputError(
                f"tile store {self._path}: tile files changed since the run that wrote it; run segmentation "
                "again (changed tiles are checked and recomputed)"
            )
        return manifest

    def load(self) -> TileStore:
        return TileStore(self._path, self.verified_manifest())

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path), "reuse_from": str(self._reuse_from) if self._reuse_from else None}


def link_finished_tiles(source: Path, dest: Path, tile_sample: Any) -> int:
    """Hard-link (or copy, across file systems) ``source``'s tile files that ``dest`` lacks; returns how many."""
    linked = 0
    for tile_id, slide in zip(
        tile_sample["tile_id"].astype(str), tile_sample["slide"].astype(str), strict=True
    ):
        src, dst = tile_path(source, tile_id, slide), tile_path(dest, tile_id, slide)
        if not src.is_file() or dst.exists():
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
        linked += 1
    return linked


def read_failures(store_path: str | Path) -> list[dict[str, str]]:
    """The failed tiles of the store's last run (empty when none or never run)."""
    try:
        return json.loads((Path(store_path) / FAILURES_NAME).read_text())
    except (OSError, ValueError):
        return []
