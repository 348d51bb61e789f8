"""Plan the annotation site from the cells table and the tile store: one slide region read per tile.

:func:`plan_site` decides the pages up front (from the cells table alone) and returns the per-tile crop work
as lazy read and cut stages; :func:`write_site` runs them through a reader -> cutter -> writer pipeline into
a folder (the site dataset calls it), so memory holds a few tiles' pixels and crops, never the whole site.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mk_hspc.datasets.tile_store import TileStore
from mk_hspc.engine.prefetch import run_prefetched
from mk_hspc.export.crops import CropSpec, normalisation_limits, tile_crops
from mk_hspc.export.files import remove_unwritten, reusable_files, write_files
from mk_hspc.export.site import (
    Outline,
    SiteContent,
    TileWork,
    assign_pages,
    crop_path,
    draft_pages,
    fill_pages,
    site_paths,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TilePixels:
    """What a tile's read stage hands to its cut stage: the window's pixels, once, and its label images."""

    rgb: np.ndarray
    origin: tuple[int, int]
    labels: dict[str, np.ndarray]
    pixel_size_um: float


class SlidePool:
    """Opens each slide once, on first use, from its loader; thread-safe; closes them all at the end."""

    def __init__(self, loaders: Mapping[str, Callable[[], Any]]) -> None:
        self._loaders = loaders
        self._open: dict[str, Any] = {}
        self._lock = threading.Lock()

    def get(self, slide: str) -> Any:
        with self._lock:
            if slide not in self._open:
                if slide not in self._loaders:
                    raise KeyError(f"slide {slide!r} of the cells table is not among the raw slides")
                self._open[slide] = self._loaders[slide]()
            return self._open[slide]

    def close(self) -> None:
        with self._lock:
            for slide in self._open.values():
                slide.close()
            self._open.clear()


class ArrayPool:
    """Arrays handed back by finished tiles, lent again to the next tiles' reads (thread-safe).

    A tile's label images are ~36 MB each; allocating them afresh per tile costs page faults (and, with
    transparent huge pages, direct compaction) that measured 2-5x the HDF5 decompression on the benchmark
    machine. ``take`` lends a free array of the same shape and dtype or allocates one; the pool holds at
    most what the pipeline has in flight at once (its queue bounds), so memory stays bounded.
    """

    def __init__(self) -> None:
        self._free: dict[tuple[tuple[int, ...], str], list[np.ndarray]] = {}
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        key = (tuple(int(n) for n in shape), np.dtype(dtype).str)
        with self._lock:
            free = self._free.get(key)
            if free:
                return free.pop()
        return np.empty(key[0], np.dtype(dtype))

    def give(self, array: np.ndarray) -> None:
        with self._lock:
            self._free.setdefault((array.shape, array.dtype.str), []).append(array)

    def clear(self) -> None:
        with self._lock:
            self._free.clear()

    def __len__(self) -> int:
        with self._lock:
            return sum(len(free) for free in self._free.values())


def crop_specs(export: Mapping[str, Any]) -> dict[str, CropSpec]:
    return {
        cell_type: CropSpec(float(conf["crop_um"]), int(conf["output_px"]))
        for cell_type, conf in export["cell_types"].items()
    }


CROP_FIELDS = ("cell_id", "label", "centroid_x_px", "centroid_y_px")


def crop_records(cells: pd.DataFrame) -> dict[tuple[str, str], list[dict]]:
    """Per (tile, cell type), sorted, the cells' :data:`CROP_FIELDS` as dicts, in table order.

    Only the fields a crop needs: whole rows (``to_dict("records")``, 40 columns) took 0.15 s for 5,000 cells.
    """
    columns = [cells[name].tolist() for name in CROP_FIELDS]
    rows = [dict(zip(CROP_FIELDS, values, strict=True)) for values in zip(*columns, strict=True)]
    groups = cells.groupby(["tile_id", "cell_type"], sort=True, observed=True).indices
    return {
        (str(tile), str(cell_type)): [rows[i] for i in index] for (tile, cell_type), index in groups.items()
    }


def plan_site(
    cells: pd.DataFrame,
    tile_store: TileStore,
    slide_loaders: Mapping[str, Callable[[], Any]],
    export: Mapping[str, Any],
) -> SiteContent:
    """The site of every cell of the configured cell types in ``cells`` (see :mod:`mk_hspc.export.site`)."""
    specs = crop_specs(export)
    cell_types = list(specs)
    missing_tiles = sorted(set(cells["tile_id"].astype(str)) - set(tile_store.tiles))
    if missing_tiles:
        raise ValueError(
            f"the cells table names {len(missing_tiles)} tile(s) the tile store {tile_store.root} lacks, e.g. "
            f"{missing_tiles[:3]}; rerun segmentation"
        )
    selected = cells[cells["cell_type"].isin(cell_types)]
    pages = assign_pages(
        selected, cell_types, int(export["page_size"]), export["order"], int(export["seed"]),
        first=list(export.get("first_cell_ids") or ()),
    )  # fmt: skip
    image_format = export["image_format"]
    pool = SlidePool(slide_loaders)
    buffers = ArrayPool()
    low_pct, high_pct = export["normalise_percentiles"]
    quality = int(export["quality"])

    def make_tile(tile_id: str, by_type: dict[str, list[dict]]) -> TileWork:
        def read() -> TilePixels:
            result = tile_store.read_labels(tile_id, list(by_type), allocate=buffers.take)
            x, y, w, h = result.window
            rgb = pool.get(result.slide).read_region(x, y, w, h)  # the one region read of this tile
            return TilePixels(rgb, (x, y), result.labels, result.pixel_size_um)

        def cut(pixels: TilePixels) -> tuple[dict[str, bytes], dict[str, Outline]]:
            try:
                return cut_tile(pixels)
            finally:
                for array in pixels.labels.values():
                    buffers.give(array)

        def cut_tile(pixels: TilePixels) -> tuple[dict[str, bytes], dict[str, Outline]]:
            limits = normalisation_limits(pixels.rgb, float(low_pct), float(high_pct))
            files, outlines = {}, {}
            for cell_type, records in by_type.items():
                crops = tile_crops(
                    pixels.rgb,
                    pixels.origin,
                    pixels.labels[cell_type],
                    records,
                    pixels.pixel_size_um,
                    specs[cell_type],
                    limits=limits,
                    image_format=image_format,
                    quality=quality,
                )
                for crop in crops:
                    files[crop_path(tile_id, crop.cell_id, image_format)] = crop.image
                    outlines[crop.cell_id] = crop.outline
            return files, outlines

        return TileWork(tile_id, read, cut)

    by_tile: dict[str, dict[str, list[dict]]] = {}
    for (tile_id, cell_type), records in crop_records(selected).items():
        by_tile.setdefault(tile_id, {})[cell_type] = records
    tiles = [make_tile(tile_id, by_type) for tile_id, by_type in by_tile.items()]
    output_px = {cell_type: spec.output_px for cell_type, spec in specs.items()}
    draft = functools.cache(
        lambda: draft_pages(pages, cell_types, output_px, image_format, sorted(slide_loaders))
    )
    return SiteContent(
        tiles=tiles,
        render=lambda outlines: fill_pages(draft(), outlines),
        prepare=draft,
        paths=lambda: site_paths(pages, cell_types, image_format),
        threads=int(export.get("threads", 1)),
        close=lambda: (pool.close(), buffers.clear()),
    )


def _thread_cpu_s(func: Callable[[], Any]) -> float:
    """Run ``func``; the CPU seconds its thread spent."""
    started = time.thread_time()
    func()
    return time.thread_time() - started


def write_site(content: SiteContent, folder: Path) -> dict[str, Any]:
    """Write the site into ``folder``: tiles flow through a reader -> cutter -> writer pipeline.

    ``folder`` may hold an older site (a reused folder): its files are overwritten and what the new site
    lacks is removed, so it ends holding exactly the new site.

    ``content.threads`` reader threads read tiles ahead (slide region and labels; libCZI decodes without
    the GIL), the calling thread cuts and encodes one tile at a time, and a writer thread writes the
    finished crops, so the wall time tends to the largest of the three rather than their sum. Pages are
    drafted meanwhile by another thread and finished last (they need every outline).

    Returns:
        ``{"tiles": ..., "crops": ..., "busy_s": {stage: seconds summed over threads}, "cpu_s": {stage:
        CPU seconds of those threads}}``.

    Raises:
        StageError: a tile failed to read, cut or write (the error names the tile).
    """
    folder.mkdir(parents=True, exist_ok=True)
    reuse = reusable_files(folder, content.paths)
    outlines: dict[str, Outline] = {}
    written: set[str] = set()
    n_crops = 0

    def write(tile: TileWork, result: tuple[dict[str, bytes], dict[str, Outline]]) -> None:
        nonlocal n_crops
        files, tile_outlines = result
        write_files(folder, files, reuse)
        outlines.update(tile_outlines)  # one writer thread: no lock needed
        written.update(files)
        n_crops += len(files)

    # Drafting the pages is Python work that fits where the cutter waits for the first tile's read.
    drafting = ThreadPoolExecutor(max_workers=1, thread_name_prefix="site-pages")
    drafted = drafting.submit(_thread_cpu_s, content.prepare)
    try:
        stats = run_prefetched(
            content.tiles,
            lambda tile: tile.read(),
            lambda tile, pixels: tile.cut(pixels),
            write,
            key=lambda tile: tile.tile_id,
            n_readers=max(1, content.threads),
            n_writers=1,
            read_queue_size=1,
            write_queue_size=2,
            progress=False,
        )
    finally:
        content.close()
        drafting.shutdown(wait=True)
    started, cpu_started = time.perf_counter(), time.thread_time()
    drafting_cpu_s = drafted.result()  # re-raises a drafting error
    pages = content.render(outlines)
    write_files(folder, pages, reuse)
    written.update(pages)
    remove_unwritten(folder, written)
    busy = {stage: round(seconds, 3) for stage, seconds in stats.busy_s.items()}
    busy["pages"] = round(time.perf_counter() - started, 3)
    cpu = {stage: round(seconds, 3) for stage, seconds in stats.cpu_s.items()}
    cpu["pages"] = round(drafting_cpu_s + time.thread_time() - cpu_started, 3)  # drafting included
    logger.info("annotation site: %d tiles, %d crops; stage times %s", len(content.tiles), n_crops, busy)
    content.stats = {"tiles": len(content.tiles), "crops": n_crops, "busy_s": busy, "cpu_s": cpu}
    return content.stats
