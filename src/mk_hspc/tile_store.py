"""Per-tile HDF5 result store: one file per tile, written atomically, trusted only when complete and current.

Layout of ``<store_dir>/<slide>/<tile_id>.h5``::

    attrs       tile_id, slide, window (x, y, w, h), core (x, y, w, h) [absolute CZI px], pixel_size_um,
                params_hash, cell_types, segmenters, feature_extractors (JSON), format_version,
                complete (written last)
    labels/<cell_type>            int32 (h, w) instance image of the kept cells (1..N), chunked, LZ4;
                                  all-background chunks are not stored (fill value 0)
    outlines/<cell_type>/xy       int32 (n_points, 2): each cell's outer boundary (its largest part), the
                                  (x, y) indices of its boundary pixels in the window (OpenCV's trace,
                                  simplified by 0.5 px), cells in label order; the export draws these,
                                  never reading the labels
    outlines/<cell_type>/start    int64 (N + 1): label L's points are rows ``start[L-1]:start[L]``
    cells/<column>                one 1-D dataset per per-cell column (cell_id, cell_type, label, ...)
    features/<extractor>/values   float32 (n_cells, n_features), rows in ``cells/cell_id`` order
    features/<extractor>/columns  feature names

A file is written under a temporary name in the same folder and renamed into place (``os.replace``), so a
crash leaves either the previous state or a temporary file, never a half-written final file. Readers
nevertheless check the completion marker and the parameters hash: a file from other parameters is
*stale* and recomputed, never silently reused.
"""

from __future__ import annotations

import enum
import io
import json
import logging
import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import h5py
import hdf5plugin
import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from mk_hspc.atomic_io import publishing
from mk_hspc.failpoints import failpoint

logger = logging.getLogger(__name__)

FORMAT_VERSION = 3  # 3: outlines/
TILE_SUFFIX = ".h5"
TMP_SUFFIX = ".h5.tmp"
_COMPLETE_ATTR = "complete"
_TILE_ID_PATTERN = re.compile(r"^(?P<slide>.+)_s(?P<scene>\d+)_r(?P<row>\d+)_c(?P<col>\d+)$")
_STR_DTYPE = h5py.string_dtype("utf-8")
_LZ4 = dict(hdf5plugin.LZ4())


class TileStatus(enum.Enum):
    """What a tile's store file is worth to a run with given parameters."""

    DONE = "done"  # complete, current parameters and window: skip the tile
    MISSING = "missing"  # no final file
    STALE = "stale"  # complete but from other parameters or another window: recompute
    INVALID = "invalid"  # unreadable, truncated or without completion marker: recompute


@dataclass
class TileResult:
    """Everything the segmentation stage keeps for one tile.

    Attributes:
        tile_id: contract tile id ``"{slide}_s{scene}_r{row:03d}_c{col:03d}"``.
        slide: slide name (file stem).
        window: ``(x, y, w, h)`` of the tile window, absolute CZI px.
        core: ``(x, y, w, h)`` of the part of the window this tile owns, absolute CZI px.
        pixel_size_um: pixel size of the slide.
        params_hash: fingerprint of the segmenters/feature extractors that produced the result.
        labels: ``cell_type -> (h, w) int32`` label image of the kept cells (1..N, consecutive).
        cells: one row per kept cell (``cell_id``, ``cell_type``, ``label``, centroids, area, score, bbox).
        features: ``extractor name -> DataFrame`` (float32, index ``cell_id``, rows in ``cells`` order).
        segmenters: ``cell_type -> segmenter name``.
        slide_file_id: the slide file's identity (header GUID and size): a replaced slide recomputes.
    """

    tile_id: str
    slide: str
    window: tuple[int, int, int, int]
    core: tuple[int, int, int, int]
    pixel_size_um: float
    params_hash: str
    labels: dict[str, np.ndarray]
    cells: pd.DataFrame
    features: dict[str, pd.DataFrame] = field(default_factory=dict)
    segmenters: dict[str, str] = field(default_factory=dict)
    slide_file_id: str = ""  # identity of the slide file the pixels came from (SlideMeta.file_id)


def slide_from_tile_id(tile_id: str) -> str:
    """The slide part of a contract tile id (slide names may themselves contain underscores)."""
    match = _TILE_ID_PATTERN.match(tile_id)
    if match is None:
        raise ValueError(f"tile id {tile_id!r} does not follow '{{slide}}_s{{scene}}_r{{row}}_c{{col}}'")
    return match["slide"]


def tile_path(store_dir: str | Path, tile_id: str, slide: str | None = None) -> Path:
    """Final path of a tile's file; ``slide`` defaults to the one encoded in the tile id."""
    return Path(store_dir) / (slide or slide_from_tile_id(tile_id)) / f"{tile_id}{TILE_SUFFIX}"


def remove_temporary_files(store_dir: str | Path) -> list[Path]:
    """Delete temporary files left by killed runs (call before a run starts; never during one)."""
    store_dir = Path(store_dir)
    if not store_dir.is_dir():
        return []
    removed = sorted(store_dir.glob(f"*/*{TMP_SUFFIX}"))
    for path in removed:
        path.unlink(missing_ok=True)
    if removed:
        logger.info("Removed %d leftover temporary tile file(s) under %s", len(removed), store_dir)
    return removed


def tile_status(
    store_dir: str | Path,
    tile_id: str,
    params_hash: str,
    *,
    slide: str | None = None,
    window: Iterable[int] | None = None,
    core: Iterable[int] | None = None,
    pixel_size_um: float | None = None,
    slide_file_id: str | None = None,
) -> TileStatus:
    """Classify a tile's final file; ``window``, ``core``, ``pixel_size_um``, ``slide_file_id`` must match too.

    A result is only as current as everything it was made from: the run's ``params_hash`` (plugins, code,
    packages, weights, conf), the slide's pixel size (µm columns and µm-based parameters depend on it) and
    the tile's geometry, and the slide file itself (a re-exported slide under the same name).
    """
    path = tile_path(store_dir, tile_id, slide)
    if not path.exists():
        return TileStatus.MISSING
    try:
        with h5py.File(path, "r") as h5:
            attrs = h5.attrs
            if not bool(attrs.get(_COMPLETE_ATTR, False)):
                return TileStatus.INVALID
            if (
                int(attrs.get("format_version", -1)) != FORMAT_VERSION
                or attrs.get("params_hash") != params_hash
            ):
                return TileStatus.STALE
            if window is not None and tuple(attrs["window"].tolist()) != tuple(int(v) for v in window):
                return TileStatus.STALE
            if core is not None and tuple(attrs["core"].tolist()) != tuple(int(v) for v in core):
                return TileStatus.STALE
            if pixel_size_um is not None and float(attrs["pixel_size_um"]) != float(pixel_size_um):
                return TileStatus.STALE
            if slide_file_id is not None and str(attrs.get("slide_file_id", "")) != slide_file_id:
                return TileStatus.STALE
    except (OSError, KeyError, ValueError) as exc:
        logger.warning("Tile file %s is unreadable (%s); it will be recomputed", path, exc)
        return TileStatus.INVALID
    return TileStatus.DONE


def is_tile_done(store_dir: str | Path, tile_id: str, params_hash: str, *, slide: str | None = None) -> bool:
    """Whether the tile has a complete file produced with ``params_hash`` (so a rerun may skip it)."""
    return tile_status(store_dir, tile_id, params_hash, slide=slide) is TileStatus.DONE


def write_tile_result(
    store_dir: str | Path, result: TileResult, *, fsync: bool = True, label_chunk_px: int = 512
) -> Path:
    """Write one tile's result atomically (temporary file + ``os.replace``) and return the final path.

    Args:
        store_dir: root of the store; the file goes to ``<store_dir>/<slide>/<tile_id>.h5``.
        result: the tile's result.
        fsync: flush file and folder to disk before/after the rename, so a power cut cannot leave a
            renamed but empty file (costs a few ms per tile).
        label_chunk_px: side of the square HDF5 chunks of the label images (compression unit).
    """
    final = tile_path(store_dir, result.tile_id, result.slide)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{final.stem}.{uuid.uuid4().hex[:12]}{TMP_SUFFIX}")
    with publishing(tmp, final, fsync=fsync):
        _write_file(tmp, result, label_chunk_px)
        failpoint("tile:written")
    return final


def read_tile_result(
    store_dir: str | Path,
    tile_id: str,
    *,
    slide: str | None = None,
    include_labels: bool = True,
    feature_names: Iterable[str] | None = None,
) -> TileResult:
    """Read a tile's result; ``feature_names=None`` reads every feature group, ``()`` none.

    Raises:
        FileNotFoundError: no final file for the tile.
        ValueError: the file lacks its completion marker.
    """
    path = tile_path(store_dir, tile_id, slide)
    with h5py.File(path, "r") as h5:
        attrs = h5.attrs
        if not bool(attrs.get(_COMPLETE_ATTR, False)):
            raise ValueError(f"tile file {path} is incomplete")
        cells_group = h5["cells"]
        columns = json.loads(cells_group.attrs["columns"])
        cells = pd.DataFrame({name: _read_column(cells_group[name]) for name in columns})
        labels = {}
        if include_labels:
            labels = {name: h5["labels"][name][()] for name in json.loads(attrs["cell_types"])}
        available = list(h5["features"].keys())
        wanted = available if feature_names is None else [name for name in feature_names if name in available]
        features = {}
        for name in wanted:
            group = h5["features"][name]
            feature_columns = list(group["columns"].asstr()[()])
            features[name] = pd.DataFrame(
                group["values"][()], columns=feature_columns, index=pd.Index(cells["cell_id"], name="cell_id")
            )
        return TileResult(
            tile_id=str(attrs["tile_id"]),
            slide=str(attrs["slide"]),
            window=tuple(int(v) for v in attrs["window"]),
            core=tuple(int(v) for v in attrs["core"]),
            pixel_size_um=float(attrs["pixel_size_um"]),
            params_hash=str(attrs["params_hash"]),
            labels=labels,
            cells=cells,
            features=features,
            segmenters=json.loads(attrs["segmenters"]),
            slide_file_id=str(attrs.get("slide_file_id", "")),
        )


@dataclass(frozen=True)
class CellOutlines:
    """The outlines of one cell type's cells in a tile (``outlines/<cell_type>`` of the layout)."""

    xy: np.ndarray  # int32 (n_points, 2), window px
    start: np.ndarray  # int64 (N + 1,)

    def of(self, label: int) -> np.ndarray:
        """The ``(n, 2)`` boundary points of the cell with ``label`` (1..N); empty for a label without pixels."""
        return self.xy[self.start[label - 1] : self.start[label]]


SIMPLIFY_PX = 0.5  # outline simplification (Douglas-Peucker), full-resolution px: below what a crop shows


def label_outlines(
    labels: np.ndarray, boxes: Sequence[tuple[slice, slice] | None] | None = None
) -> CellOutlines:
    """Every labelled cell's outer boundary, in label order (see :class:`CellOutlines`).

    OpenCV's trace of each cell in its box, simplified by :data:`SIMPLIFY_PX` (a subset of its boundary
    pixels, about a third of them for a nucleus): ~25 us per cell, paid once at segmentation so that every
    export reads points, not label images. ``boxes[label - 1]`` are ``(rows, cols)`` slices, e.g. from the
    cells table; by default (or when they miss part of a cell) ``find_objects`` finds them, one pass over
    the image (~20 ms of a 3000 px tile). A cell in several parts keeps its largest, as the crops draw it.
    """
    given = boxes is not None
    boxes = boxes if given else ndi.find_objects(labels)
    parts: list[np.ndarray] = []
    counts = np.zeros(len(boxes), np.int64)
    traced_px = 0
    for index, box in enumerate(boxes):
        mask = None if box is None else (labels[box] == index + 1).view(np.uint8)
        if mask is None or mask.size == 0:
            continue
        traced_px += cv2.countNonZero(mask)
        rows, cols = box
        contours, _ = cv2.findContours(
            mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE, offset=(cols.start, rows.start)
        )
        if not contours:
            continue
        contour = contours[0] if len(contours) == 1 else max(contours, key=cv2.contourArea)
        parts.append(cv2.approxPolyDP(contour, SIMPLIFY_PX, True).reshape(-1, 2))
        counts[index] = len(parts[-1])
    if given and traced_px != np.count_nonzero(labels):
        # A box missing part of its cell (a cells table not of this image) would cut its outline silently.
        # Each label's pixels in its box never exceed its own, so equal totals prove every box whole.
        return label_outlines(labels)
    xy = np.concatenate(parts).astype(np.int32, copy=False) if parts else np.zeros((0, 2), np.int32)
    return CellOutlines(xy, np.concatenate([[0], np.cumsum(counts)]))


def _cell_boxes(result: TileResult, cell_type: str, n_labels: int) -> list[tuple[slice, slice]] | None:
    """The boxes of a cell type's labels 1..N from the cells table (window px), or None when the table does
    not describe exactly those labels (then :func:`label_outlines` finds them in the image)."""
    columns = ("cell_type", "label", "bbox_x", "bbox_y", "bbox_w", "bbox_h")
    if n_labels == 0 or any(name not in result.cells for name in columns):
        return None
    cells = result.cells[result.cells["cell_type"].astype(str) == cell_type]
    if not np.array_equal(np.sort(cells["label"].to_numpy()), np.arange(1, n_labels + 1)):
        return None
    cells = cells.sort_values("label")
    x0 = cells["bbox_x"].to_numpy(np.int64) - result.window[0]
    y0 = cells["bbox_y"].to_numpy(np.int64) - result.window[1]
    x1, y1 = x0 + cells["bbox_w"].to_numpy(np.int64), y0 + cells["bbox_h"].to_numpy(np.int64)
    height, width = result.labels[cell_type].shape
    if (x0 < 0).any() or (y0 < 0).any() or (x1 > width).any() or (y1 > height).any():
        return None
    if (x1 <= x0).any() or (y1 <= y0).any():
        return None
    return [
        (slice(top, bottom), slice(left, right))
        for left, top, right, bottom in zip(x0.tolist(), y0.tolist(), x1.tolist(), y1.tolist(), strict=True)
    ]


@dataclass(frozen=True)
class TileOutlines:
    """A tile's window, pixel size and the cell outlines of some cell types (:func:`read_tile_outlines`)."""

    tile_id: str
    slide: str
    window: tuple[int, int, int, int]
    pixel_size_um: float
    outlines: dict[str, CellOutlines]


def read_tile_outlines(
    store_dir: str | Path, tile_id: str, cell_types: Iterable[str], *, slide: str | None = None
) -> TileOutlines:
    """Only the cell outlines of ``cell_types`` of a tile (and its window): what the export's crops draw.

    Raises:
        FileNotFoundError: no final file for the tile.
        ValueError: the file lacks its completion marker.
        KeyError: a cell type the tile has no outlines for.
    """
    path = tile_path(store_dir, tile_id, slide)
    with h5py.File(path, "r") as h5:
        if not bool(h5.attrs.get(_COMPLETE_ATTR, False)):
            raise ValueError(f"tile file {path} is incomplete")
        outlines = {}
        for name in cell_types:
            if name not in h5["outlines"]:
                raise KeyError(f"tile file {path} has no outlines {name!r}")
            group = h5["outlines"][name]
            outlines[name] = CellOutlines(group["xy"][()], group["start"][()])
        return TileOutlines(
            tile_id=str(h5.attrs["tile_id"]),
            slide=str(h5.attrs["slide"]),
            window=tuple(int(v) for v in h5.attrs["window"]),
            pixel_size_um=float(h5.attrs["pixel_size_um"]),
            outlines=outlines,
        )


def _write_file(path: Path, result: TileResult, label_chunk_px: int) -> None:
    """Build the HDF5 file in memory, then write its bytes with plain Python I/O.

    HDF5 must never meet a disk error: after a failed write (a full disk) the library keeps the file open
    with dirty buffers and flushes them again when the interpreter exits, which crashed the process
    (segfault) after the correct error message. An in-memory image cannot fail that way, and a failing
    ``write`` of its bytes is an ordinary ``OSError``. One tile's file is a few MB (labels are compressed).
    """
    image = io.BytesIO()
    with h5py.File(image, "w", track_order=True) as h5:
        _write_contents(h5, result, label_chunk_px)
        h5.attrs[_COMPLETE_ATTR] = True  # last: a file without it is never trusted
    with open(path, "wb") as handle:
        handle.write(image.getbuffer())


def _write_contents(h5: h5py.File, result: TileResult, label_chunk_px: int) -> None:
    h5.attrs["format_version"] = FORMAT_VERSION
    h5.attrs["tile_id"] = result.tile_id
    h5.attrs["slide"] = result.slide
    h5.attrs["window"] = np.asarray(result.window, dtype=np.int64)
    h5.attrs["core"] = np.asarray(result.core, dtype=np.int64)
    h5.attrs["pixel_size_um"] = float(result.pixel_size_um)
    h5.attrs["slide_file_id"] = result.slide_file_id
    h5.attrs["params_hash"] = result.params_hash
    h5.attrs["cell_types"] = json.dumps(list(result.labels))
    h5.attrs["segmenters"] = json.dumps(result.segmenters)
    h5.attrs["feature_extractors"] = json.dumps(list(result.features))

    labels_group = h5.create_group("labels")
    outlines_group = h5.create_group("outlines")
    for cell_type, labels in result.labels.items():
        labels = labels.astype(np.int32, copy=False)
        _write_sparse_labels(labels_group, cell_type, labels, label_chunk_px)
        n_labels = int(labels.max(initial=0))
        outlines = label_outlines(labels, _cell_boxes(result, cell_type, n_labels))
        group = outlines_group.create_group(cell_type)
        group.create_dataset("xy", data=outlines.xy, **(_LZ4 if len(outlines.xy) else {}))
        group.create_dataset("start", data=outlines.start)

    cells_group = h5.create_group("cells")
    cells_group.attrs["columns"] = json.dumps([str(c) for c in result.cells.columns])
    for name in result.cells.columns:
        values = result.cells[name].to_numpy()
        if values.dtype.kind in "OUS" or isinstance(result.cells[name].dtype, pd.StringDtype):
            cells_group.create_dataset(str(name), data=np.asarray(values, dtype=object), dtype=_STR_DTYPE)
        else:
            cells_group.create_dataset(str(name), data=values)

    features_group = h5.create_group("features")
    for name, frame in result.features.items():
        group = features_group.create_group(name)
        group.create_dataset("values", data=frame.to_numpy(dtype=np.float32).reshape(frame.shape))
        group.create_dataset(
            "columns", data=np.asarray([str(c) for c in frame.columns], dtype=object), dtype=_STR_DTYPE
        )


def _write_sparse_labels(group: h5py.Group, name: str, labels: np.ndarray, chunk_px: int) -> None:
    """Chunked LZ4 label image where all-background chunks are never written (they read back as 0).

    Most of a tile is background, especially for the rare large MKs: skipping those chunks saves their
    compression, which runs under h5py's global lock and the GIL.
    """
    height, width = labels.shape
    chunks = (min(chunk_px, height), min(chunk_px, width))
    dataset = group.create_dataset(
        name, shape=labels.shape, dtype=np.int32, chunks=chunks, fillvalue=0, **hdf5plugin.LZ4()
    )
    if not labels.any():
        return
    for row in range(0, height, chunks[0]):
        for col in range(0, width, chunks[1]):
            block = labels[row : row + chunks[0], col : col + chunks[1]]
            if block.any():
                dataset[row : row + chunks[0], col : col + chunks[1]] = block


def _read_column(dataset: h5py.Dataset) -> np.ndarray | pd.api.extensions.ExtensionArray:
    if h5py.check_string_dtype(dataset.dtype) is not None:
        return pd.array(dataset.asstr()[()].astype(object), dtype="str")
    return dataset[()]
