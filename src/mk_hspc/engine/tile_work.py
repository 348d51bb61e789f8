"""Segmentation of sampled tiles: per-tile work (segment, keep owned cells, describe) and the resumable run.

``process_tile`` is a pure function of one tile's pixels and geometry, so a rerun, a resumed run and a run
with other thread counts all give identical results. ``segment_tiles`` streams the tiles through the
prefetch engine into the per-tile HDF5 store, skipping tiles already done with the same parameters.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pandas as pd
from skimage.measure import regionprops_table

from mk_hspc.engine.fingerprint import run_fingerprint
from mk_hspc.engine.prefetch import release_free_heap, run_prefetched
from mk_hspc.errors import UserError, describe_error
from mk_hspc.models.base import FeatureExtractor, Segmentation, Segmenter
from mk_hspc.tile_store import (
    FORMAT_VERSION,
    TileResult,
    TileStatus,
    remove_temporary_files,
    tile_status,
    write_tile_result,
)

if TYPE_CHECKING:
    from mk_hspc.engine.dask_executor import DaskRun

logger = logging.getLogger(__name__)

WIDER = "wider_than_overlap"
TILE_COLUMNS = ("tile_id", "slide", "x", "y", "w", "h", "core_x", "core_y", "core_w", "core_h")
CELL_COLUMNS = (
    "cell_id",
    "cell_type",
    "label",
    "centroid_x_px",
    "centroid_y_px",
    "centroid_x_um",
    "centroid_y_um",
    "area_px",
    "area_um2",
    "score",
    "bbox_x",
    "bbox_y",
    "bbox_w",
    "bbox_h",
    "wider_than_overlap",
)


class SlideLike(Protocol):
    """What the run needs from a slide (``mk_hspc.czi.CziSlide`` satisfies it)."""

    @property
    def meta(self) -> Any: ...  # has ``pixel_size_um``

    def read_region(self, x: int, y: int, w: int, h: int, scale: float = 1.0) -> np.ndarray: ...


@dataclass(frozen=True, order=True)
class TileSpec:
    """Geometry of one tile (a ``tile_sample`` row), absolute CZI px; orders by tile id."""

    tile_id: str
    slide: str
    x: int
    y: int
    w: int
    h: int
    core_x: int
    core_y: int
    core_w: int
    core_h: int

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> TileSpec:
        return cls(
            tile_id=str(record["tile_id"]),
            slide=str(record["slide"]),
            **{name: int(record[name]) for name in TILE_COLUMNS[2:]},
        )

    @property
    def window(self) -> tuple[int, int, int, int]:
        return (self.x, self.y, self.w, self.h)

    @property
    def core(self) -> tuple[int, int, int, int]:
        return (self.core_x, self.core_y, self.core_w, self.core_h)


@dataclass(frozen=True)
class SegmentationSettings:
    """Runtime knobs of the segmentation run (``parameters_segmentation.yml: segmentation.runtime``).

    Attributes:
        reader_threads: threads reading and normalising tiles ahead of the model worker.
        prefetch_tiles: bound of the queue of read tiles waiting for the model worker.
        writer_threads: threads writing tile files.
        pending_writes: bound of the queue of results waiting for a writer.
        progress: show a progress bar (tiles/s and cells found so far).
        fsync: make every tile file durable before counting it done.
        label_chunk_px: HDF5 chunk side of the stored label images.
        release_memory_every_tiles: give freed heap memory back to the OS after every this many written
            tiles, so RSS stays flat over thousands of tiles (see ``prefetch.release_free_heap``); each
            release makes the next reads fault their buffers in again, hence not after every tile.
            None never releases.
    """

    reader_threads: int = 2
    prefetch_tiles: int = 2
    writer_threads: int = 1
    pending_writes: int = 2
    progress: bool = True
    fsync: bool = True
    label_chunk_px: int = 512
    release_memory_every_tiles: int | None = 8

    @property
    def max_tiles_in_memory(self) -> int:
        """Upper bound of tiles (read or processed) alive at once: what keeps memory flat."""
        return self.reader_threads + self.prefetch_tiles + 1 + self.pending_writes + self.writer_threads


@dataclass(frozen=True)
class RunSummary:
    """What one ``segment_tiles`` call did (JSON-friendly through ``to_dict``)."""

    params_hash: str
    n_tiles: int
    n_skipped: int
    n_processed: int
    n_recomputed: int
    n_cells: dict[str, int] = field(default_factory=dict)  # per cell type, in the tiles processed now
    elapsed_s: float = 0.0
    tiles_per_s: float = 0.0
    max_read_queue: int = 0
    max_write_queue: int = 0
    max_tiles_in_flight: int = 0
    removed_temporary_files: int = 0
    busy_s: dict[str, float] = field(default_factory=dict)
    # Tiles whose read or segmentation failed (``isolate_failures``): tile_id, slide, stage, error.
    failed_tiles: list[dict[str, str]] = field(default_factory=list)
    # Cells wider than the tile overlap (kept, flagged; exactly-once not guaranteed for them).
    n_cells_wider_than_overlap: int = 0
    # Which executor ran the tiles; the Dask one adds its workers and their peak RSS.
    executor: dict[str, Any] = field(default_factory=lambda: {"kind": "local"})

    def to_dict(self) -> dict:
        return asdict(self)


def compute_params_hash(
    segmenters: Mapping[str, Segmenter],
    feature_extractors: Sequence[FeatureExtractor] = (),
    params: Mapping[str, Any] | None = None,
) -> str:
    """Fingerprint of everything run-wide that determines a tile's result (changes => tiles recomputed).

    See :mod:`mk_hspc.engine.fingerprint`: plugin parameters (normalised, weights by content), plugin code
    and package versions, feature columns, and ``params`` (e.g. the ``segmentation`` conf block).
    """
    return run_fingerprint(segmenters, feature_extractors, params, format_version=FORMAT_VERSION)


def process_tile(
    tile_rgb: np.ndarray,
    spec: TileSpec,
    pixel_size_um: float,
    segmenters: Mapping[str, Segmenter],
    feature_extractors: Sequence[FeatureExtractor] = (),
    params_hash: str = "",
    slide_file_id: str = "",
) -> TileResult:
    """Segment one tile with every segmenter, keep the cells it owns, describe them.

    A cell is owned by the tile whose core holds the centre of its bounding box (absolute px, pixel-index
    convention); with tiles overlapping by at least the cell's width and height the owner sees it whole, so
    each such cell is kept exactly once, whole, whatever its shape. Wider cells are kept and flagged
    (``wider_than_overlap``) rather than lost (see :func:`_ownership`). Kept cells are relabelled 1..N
    in the order of their original labels (deterministic), and ids follow the contract
    ``f"{tile_id}_{cell_type}_{label:05d}"``.

    Args:
        tile_rgb: ``(spec.h, spec.w, 3)`` uint8 RGB pixels of the tile window.
        spec: the tile's window and core.
        pixel_size_um: pixel size of the slide.
        segmenters: ``cell_type -> segmenter`` (e.g. ``{"mk": ..., "hspc": ...}``).
        feature_extractors: run on the kept cells of each cell type.
        params_hash: stored with the result (see :func:`compute_params_hash`).
        slide_file_id: identity of the slide file (``SlideMeta.file_id``), stored with the result.
    """
    expected_shape = (spec.h, spec.w, 3)
    if tile_rgb.shape != expected_shape:
        raise ValueError(
            f"tile {spec.tile_id}: pixels have shape {tile_rgb.shape}, expected {expected_shape}"
        )
    labels_by_type: dict[str, np.ndarray] = {}
    cell_frames: list[pd.DataFrame] = []
    feature_parts: dict[str, list[pd.DataFrame]] = {extractor.name: [] for extractor in feature_extractors}
    for cell_type, segmenter in segmenters.items():
        segmentation = segmenter.segment(tile_rgb, pixel_size_um)
        labels, cells = _owned_cells(segmentation, spec, cell_type, pixel_size_um)
        labels_by_type[cell_type] = labels
        cell_frames.append(cells)
        if len(cells) == 0:
            continue  # extractors need not handle empty input; the tile simply has no rows for this type
        cell_labels = cells["label"].to_numpy(np.int32)
        for extractor in feature_extractors:
            frame = extractor.extract(tile_rgb, labels, cell_labels, pixel_size_um)
            feature_parts[extractor.name].append(
                _checked_features(frame, extractor.name, cells, spec.tile_id)
            )
    cells = pd.concat(cell_frames, ignore_index=True) if cell_frames else _empty_cells()
    features = {
        name: (
            pd.concat(parts) if parts else pd.DataFrame(index=pd.Index([], name="cell_id"), dtype=np.float32)
        )
        for name, parts in feature_parts.items()
    }
    return TileResult(
        tile_id=spec.tile_id,
        slide=spec.slide,
        window=spec.window,
        core=spec.core,
        pixel_size_um=float(pixel_size_um),
        params_hash=params_hash,
        labels=labels_by_type,
        cells=cells,
        features=features,
        segmenters={
            cell_type: str(getattr(seg, "name", type(seg).__name__)) for cell_type, seg in segmenters.items()
        },
        slide_file_id=slide_file_id,
    )


def segment_tiles(
    tile_sample: pd.DataFrame,
    slides: Mapping[str, SlideLike],
    store_dir: str | Path,
    segmenters: Mapping[str, Segmenter],
    feature_extractors: Sequence[FeatureExtractor] = (),
    settings: SegmentationSettings | None = None,
    *,
    params: Mapping[str, Any] | None = None,
    isolate_failures: bool = False,
    dask: DaskRun | None = None,
) -> RunSummary:
    """Segment every tile of ``tile_sample`` into ``store_dir``, resuming where a previous run stopped.

    Tiles whose file is complete and was made with the same parameters (and window) are skipped; stale or
    damaged files are recomputed and replaced atomically. Leftover temporary files are removed first, so
    do not point two concurrent runs at one store.

    Args:
        tile_sample: contract ``tile_sample`` (needs ``tile_id, slide, x, y, w, h, core_*``).
        slides: ``slide name -> slide`` (``mk_hspc.czi.CziSlide`` or anything with ``meta.pixel_size_um``
            and ``read_region``); opened by the caller, read concurrently by the reader threads.
        store_dir: root of the tile store.
        segmenters: ``cell_type -> segmenter``; cell types must not contain ``_`` (cell ids parse on it).
        feature_extractors: run on the kept cells.
        settings: threads, queue bounds, progress bar, durability.
        params: extra configuration folded into the parameters hash (e.g. the conf block).
        isolate_failures: a tile that fails to read or segment is recorded in ``failed_tiles`` (with its
            slide and error) and the run goes on; without it the first failure stops the run.
        dask: run the tiles on a Dask cluster (:mod:`mk_hspc.engine.dask_executor`) instead of the local
            threads. Which tiles run, their ids, files and fingerprints are the same either way; each worker
            builds its own plugins from ``dask.segmentation`` and re-opens ``slides`` by path.

    Returns:
        A :class:`RunSummary` (counts, throughput, queue high-water marks).
    """
    settings = settings or SegmentationSettings()
    store_dir = Path(store_dir)
    _validate_inputs(tile_sample, slides, segmenters)
    params_hash = compute_params_hash(segmenters, feature_extractors, params)
    removed = remove_temporary_files(store_dir)
    specs = sorted(
        TileSpec.from_record(rec) for rec in tile_sample.loc[:, list(TILE_COLUMNS)].to_dict("records")
    )

    pixel_sizes_um = {name: float(slides[name].meta.pixel_size_um) for name in {s.slide for s in specs}}
    unusable = {name: size for name, size in pixel_sizes_um.items() if not (math.isfinite(size) and size > 0)}
    if unusable:
        # Before any tile: NaN would be written into the µm columns (and, NaN != NaN, make every rerun
        # recompute the tile); the segmenters would fail each tile with an error that names no slide.
        raise ValueError(f"slide pixel size(s) are not a positive number of µm per pixel: {unusable}")
    file_ids = {name: str(getattr(slides[name].meta, "file_id", "")) for name in pixel_sizes_um}
    todo: list[TileSpec] = []
    redo: dict[TileStatus, list[str]] = {TileStatus.STALE: [], TileStatus.INVALID: []}
    for spec in specs:
        status = tile_status(
            store_dir,
            spec.tile_id,
            params_hash,
            slide=spec.slide,
            window=spec.window,
            core=spec.core,
            pixel_size_um=pixel_sizes_um[spec.slide],
            slide_file_id=file_ids[spec.slide],
        )
        if status is not TileStatus.DONE:
            todo.append(spec)
        if status in redo:
            redo[status].append(spec.tile_id)
    if redo[TileStatus.STALE]:
        logger.warning(
            "%d tile file(s) come from other parameters or windows and are recomputed, e.g. %s",
            len(redo[TileStatus.STALE]),
            redo[TileStatus.STALE][:3],
        )
    if redo[TileStatus.INVALID]:
        logger.warning(
            "%d tile file(s) are damaged or incomplete and are recomputed, e.g. %s",
            len(redo[TileStatus.INVALID]),
            redo[TileStatus.INVALID][:3],
        )
    n_recomputed = len(redo[TileStatus.STALE]) + len(redo[TileStatus.INVALID])
    logger.info(
        "Segmentation: %d tiles, %d already done, %d to run (params %s)",
        len(specs),
        len(specs) - len(todo),
        len(todo),
        params_hash,
    )

    started = time.perf_counter()
    if dask is not None:
        from mk_hspc.engine.dask_executor import run_on_dask

        outcome = run_on_dask(
            todo,
            dask,
            {
                "segmentation": dask.segmentation,
                "fingerprint_params": dict(params or {}),
                "params_hash": params_hash,
                "slides": {name: slides[name] for name in pixel_sizes_um},
                "pixel_sizes_um": pixel_sizes_um,
                "store_dir": str(store_dir.resolve()),
                "fsync": settings.fsync,
                "label_chunk_px": settings.label_chunk_px,
                "release_memory_every_tiles": settings.release_memory_every_tiles,
            },
            progress=settings.progress,
            isolate_failures=isolate_failures,
        )
        # A worker killed between writing and renaming a tile leaves its temporary file; the tile itself
        # was redone elsewhere. Every task has settled here, so nothing is writing any more.
        removed += remove_temporary_files(store_dir)
        n_done, totals, busy_s, failed_tiles = (
            outcome.n_done,
            outcome.totals,
            outcome.busy_s,
            outcome.failures,
        )
        queues = (0, 0, outcome.max_in_flight)
        executor = outcome.info
    else:
        n_done, totals, busy_s, failed_tiles, queues = _run_local(
            todo,
            slides,
            store_dir,
            segmenters,
            feature_extractors,
            settings,
            params_hash,
            pixel_sizes_um,
            isolate_failures,
        )
        executor = {"kind": "local"}
    elapsed_s = time.perf_counter() - started
    if totals.get(WIDER):
        logger.warning(
            "%d cell(s) were wider than the tile overlap: they are kept and flagged (wider_than_overlap) but "
            "may be cut or counted twice; the cells table lists them (wider_than_overlap, with bbox_w / bbox_h "
            "in px); raise ingestion.tiles.largest_cell_um above the largest one's width in µm",
            totals[WIDER],
        )
    return RunSummary(
        params_hash=params_hash,
        n_tiles=len(specs),
        n_skipped=len(specs) - len(todo),
        n_processed=n_done,  # written tiles (failed ones not included)
        n_recomputed=n_recomputed,
        n_cells={k: v for k, v in totals.items() if k != WIDER},
        n_cells_wider_than_overlap=int(totals.get(WIDER, 0)),
        elapsed_s=elapsed_s,
        tiles_per_s=n_done / elapsed_s if elapsed_s > 0 else 0.0,
        max_read_queue=queues[0],
        max_write_queue=queues[1],
        max_tiles_in_flight=queues[2],
        removed_temporary_files=len(removed),
        busy_s=busy_s,
        failed_tiles=sorted(failed_tiles, key=lambda failure: failure["tile_id"]),
        executor=executor,
    )


def _run_local(
    todo: list[TileSpec],
    slides: Mapping[str, SlideLike],
    store_dir: Path,
    segmenters: Mapping[str, Segmenter],
    feature_extractors: Sequence[FeatureExtractor],
    settings: SegmentationSettings,
    params_hash: str,
    pixel_sizes_um: Mapping[str, float],
    isolate_failures: bool,
) -> tuple[int, dict[str, int], dict[str, float], list[dict[str, str]], tuple[int, int, int]]:
    """The threaded prefetch engine of this process: readers -> the model (this thread) -> writers."""

    def read(spec: TileSpec) -> np.ndarray:
        return _normalise_tile(slides[spec.slide].read_region(spec.x, spec.y, spec.w, spec.h), spec)

    def process(spec: TileSpec, tile_rgb: np.ndarray) -> TileResult:
        return process_tile(
            tile_rgb,
            spec,
            pixel_sizes_um[spec.slide],
            segmenters,
            feature_extractors,
            params_hash,
            slide_file_id=str(getattr(slides[spec.slide].meta, "file_id", "")),
        )

    def write(spec: TileSpec, result: TileResult) -> None:
        write_tile_result(store_dir, result, fsync=settings.fsync, label_chunk_px=settings.label_chunk_px)

    stats = run_prefetched(
        todo,
        read,
        process,
        write,
        key=lambda spec: f"tile {spec.tile_id}",
        n_readers=settings.reader_threads,
        n_writers=settings.writer_threads,
        read_queue_size=settings.prefetch_tiles,
        write_queue_size=settings.pending_writes,
        progress=settings.progress,
        description="segmentation",
        describe=lambda result: _cells_per_type(result, segmenters),
        on_item_done=_every(settings.release_memory_every_tiles, release_free_heap),
        isolate_failures=isolate_failures,
    )
    spec_by_key = {f"tile {spec.tile_id}": spec for spec in todo}
    failed_tiles = []
    for error in stats.failures:
        cause = error.__cause__ or error
        spec = spec_by_key[error.item_key]
        if not isinstance(cause, UserError):  # a bug or a library failure: its traceback goes to the log
            logger.error("Tile %s failed at %s", spec.tile_id, error.stage, exc_info=cause)
        failed_tiles.append(
            {
                "tile_id": spec.tile_id,
                "slide": spec.slide,
                "stage": error.stage,
                "error": describe_error(cause),
                "user_error": isinstance(cause, UserError),
            }
        )
    queues = (stats.max_read_queue, stats.max_write_queue, stats.max_in_flight)
    return stats.n_items, dict(stats.totals), dict(stats.busy_s), failed_tiles, queues


def _owned_cells(
    segmentation: Segmentation, spec: TileSpec, cell_type: str, pixel_size_um: float
) -> tuple[np.ndarray, pd.DataFrame]:
    """Keep the cells this tile owns (see :func:`process_tile`), relabel them 1..N and build their records."""
    labels, scores = segmentation.labels, segmentation.scores
    if labels.shape != (spec.h, spec.w):
        raise ValueError(
            f"tile {spec.tile_id}: {cell_type} segmenter returned labels of shape {labels.shape}, "
            f"expected {(spec.h, spec.w)}"
        )
    labels = labels.astype(np.int32, copy=False)
    if segmentation.n_cells == 0:  # nothing found (e.g. a blank tile): skip the pass over the pixels
        return labels, _empty_cells()
    props = regionprops_table(labels, properties=("label", "area", "centroid", "bbox"))
    owned, wider = _ownership(props, spec)
    old_labels = props["label"][owned].astype(np.int64)
    n_kept = len(old_labels)
    new_labels = np.arange(1, n_kept + 1, dtype=np.int32)
    if n_kept == len(props["label"]) and np.array_equal(old_labels, new_labels):
        kept_image = labels  # every cell owned and already consecutive: no relabel pass over the pixels
    else:
        lookup = np.zeros(int(labels.max(initial=0)) + 1, dtype=np.int32)
        lookup[old_labels] = new_labels
        kept_image = lookup[labels]
    centroid_x_px = spec.x + props["centroid-1"][owned]
    centroid_y_px = spec.y + props["centroid-0"][owned]
    area_px = props["area"][owned].astype(np.int64)
    min_row, min_col = props["bbox-0"][owned], props["bbox-1"][owned]
    max_row, max_col = props["bbox-2"][owned], props["bbox-3"][owned]
    cells = pd.DataFrame(
        {
            "cell_id": pd.Series(
                [f"{spec.tile_id}_{cell_type}_{label:05d}" for label in new_labels], dtype="str"
            ),
            "cell_type": pd.Series([cell_type] * n_kept, dtype="str"),
            "label": new_labels,
            "centroid_x_px": centroid_x_px,
            "centroid_y_px": centroid_y_px,
            "centroid_x_um": centroid_x_px * pixel_size_um,
            "centroid_y_um": centroid_y_px * pixel_size_um,
            "area_px": area_px,
            "area_um2": area_px * pixel_size_um**2,
            "score": np.asarray(scores, dtype=np.float32)[old_labels - 1],
            "bbox_x": (spec.x + min_col).astype(np.int64),
            "bbox_y": (spec.y + min_row).astype(np.int64),
            "bbox_w": (max_col - min_col).astype(np.int64),
            "bbox_h": (max_row - min_row).astype(np.int64),
            "wider_than_overlap": wider[owned],
        },
        columns=list(CELL_COLUMNS),
    )
    return kept_image, cells


def _ownership(props: Mapping[str, np.ndarray], spec: TileSpec) -> tuple[np.ndarray, np.ndarray]:
    """``(owned, wider_than_overlap)`` per region: the exactly-once rule and where it cannot hold.

    A cell belongs to the tile whose core holds the centre of its bounding box. Whatever the cell's shape, a box
    centred in the core and no wider than the overlap lies inside the window, so the owner sees the cell
    whole; a cell cut by an inner window edge (one that is not the scene's edge) is therefore someone else's
    and is dropped here. A cell wider than the overlap can be cut in the tile that owns it and seen whole by no
    tile: it is kept anyway (a missed cell is lost for good) and flagged, and the run warns to raise
    ``ingestion.tiles.largest_cell_um``.
    """
    min_row, min_col, max_row, max_col = (props[f"bbox-{i}"] for i in range(4))
    centre_x = spec.x + (min_col + max_col - 1) / 2.0  # pixel-index convention, like the core bounds
    centre_y = spec.y + (min_row + max_row - 1) / 2.0
    in_core = (
        (centre_x >= spec.core_x)
        & (centre_x < spec.core_x + spec.core_w)
        & (centre_y >= spec.core_y)
        & (centre_y < spec.core_y + spec.core_h)
    )
    inner_left, inner_top = spec.core_x > spec.x, spec.core_y > spec.y
    inner_right = spec.core_x + spec.core_w < spec.x + spec.w
    inner_bottom = spec.core_y + spec.core_h < spec.y + spec.h
    cut = (
        ((min_col == 0) & inner_left)
        | ((max_col == spec.w) & inner_right)
        | ((min_row == 0) & inner_top)
        | ((max_row == spec.h) & inner_bottom)
    )
    max_w = 2 * _smallest_inner_margin(
        spec.core_x - spec.x if inner_left else None,
        spec.x + spec.w - spec.core_x - spec.core_w if inner_right else None,
    )
    max_h = 2 * _smallest_inner_margin(
        spec.core_y - spec.y if inner_top else None,
        spec.y + spec.h - spec.core_y - spec.core_h if inner_bottom else None,
    )
    wider = ((max_col - min_col) > max_w) | ((max_row - min_row) > max_h)
    return in_core & (~cut | wider), wider


def _smallest_inner_margin(*margins: int | None) -> float:
    """Smallest distance between core and window edge on an axis's inner sides (inf when it has none)."""
    inner = [m for m in margins if m is not None]
    return float(min(inner)) if inner else float("inf")


def _every(n_calls: int | None, func: Callable[[], Any]) -> Callable[[], None] | None:
    """A thread-safe hook that calls ``func`` on every ``n_calls``-th call (None: no hook)."""
    if n_calls is None:
        return None
    if n_calls < 1:
        raise ValueError(f"release_memory_every_tiles must be >= 1 or None, got {n_calls}")
    calls = itertools.count(1)  # next() on a count is atomic under the GIL

    def hook() -> None:
        if next(calls) % n_calls == 0:
            func()

    return hook


def _cells_per_type(result: TileResult, segmenters: Mapping[str, Segmenter]) -> dict[str, int]:
    """Cells per type in a written tile, plus ``WIDER`` when some were wider than the overlap."""
    counts = result.cells["cell_type"].value_counts()
    described = {cell_type: int(counts.get(cell_type, 0)) for cell_type in segmenters}
    n_wider = int(result.cells["wider_than_overlap"].sum())
    if n_wider:
        described[WIDER] = n_wider
    return described


def _checked_features(frame: pd.DataFrame, name: str, cells: pd.DataFrame, tile_id: str) -> pd.DataFrame:
    """Validate an extractor's output (one row per cell, prefixed columns) and index it by cell id."""
    if len(frame) != len(cells):
        raise ValueError(
            f"tile {tile_id}: feature extractor {name!r} returned {len(frame)} rows for {len(cells)} cells"
        )
    bad = [str(c) for c in frame.columns if not str(c).startswith(f"{name}_")]
    if bad:
        raise ValueError(
            f"feature extractor {name!r} returned columns without the '{name}_' prefix: {bad[:5]}"
        )
    return pd.DataFrame(
        frame.to_numpy(dtype=np.float32),
        columns=frame.columns,
        index=pd.Index(cells["cell_id"], name="cell_id"),
    )


def _normalise_tile(pixels: np.ndarray, spec: TileSpec) -> np.ndarray:
    """Contiguous ``(h, w, 3)`` uint8 RGB, copying only when the reader returned something else."""
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[:, :, None], 3, axis=2)
    if pixels.shape != (spec.h, spec.w, 3):
        raise ValueError(f"read_region returned shape {pixels.shape}, expected {(spec.h, spec.w, 3)}")
    if pixels.dtype != np.uint8:
        raise ValueError(f"read_region returned dtype {pixels.dtype}, expected uint8 RGB")
    return np.ascontiguousarray(pixels)


def _validate_inputs(
    tile_sample: pd.DataFrame, slides: Mapping[str, SlideLike], segmenters: Mapping[str, Segmenter]
) -> None:
    missing_columns = [c for c in TILE_COLUMNS if c not in tile_sample.columns]
    if missing_columns:
        raise ValueError(f"tile_sample lacks columns {missing_columns}")
    if tile_sample["tile_id"].duplicated().any():
        raise ValueError("tile_sample has duplicate tile ids")
    missing_slides = sorted(set(tile_sample["slide"].astype(str)) - set(slides))
    if missing_slides:
        raise ValueError(f"no slide handle for {missing_slides}")
    if not segmenters:
        raise ValueError("no segmenter configured")
    bad_types = [t for t in segmenters if not t or "_" in t]
    if bad_types:
        raise ValueError(f"cell types must be non-empty and free of '_' (cell ids parse on it): {bad_types}")


def _empty_cells() -> pd.DataFrame:
    """Zero-row cell records with the same dtypes as non-empty ones (files and tables stay uniform)."""
    dtypes = {"cell_id": "str", "cell_type": "str", "label": np.int32, "score": np.float32}
    dtypes |= dict.fromkeys(
        ("centroid_x_px", "centroid_y_px", "centroid_x_um", "centroid_y_um", "area_um2"), np.float64
    )
    dtypes |= dict.fromkeys(("area_px", "bbox_x", "bbox_y", "bbox_w", "bbox_h"), np.int64)
    dtypes["wider_than_overlap"] = bool
    return pd.DataFrame({name: pd.Series([], dtype=dtypes[name]) for name in CELL_COLUMNS})
