"""Plan the annotation site from the cells table and the tile store: one slide region read per tile.

:func:`plan_site` decides the pages up front (from the cells table alone) and returns the per-tile crop work
as lazy read and cut stages; :func:`write_site` runs them in tile workers (each reads a tile, then cuts its
crops) feeding one file writer, into a folder (the site dataset calls it), so memory holds a few tiles'
pixels and crops, never the whole site.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mk_hspc.datasets.tile_store import TileStore
from mk_hspc.engine.prefetch import StageClock, StageError, run_prefetched
from mk_hspc.export.crops import CropSpec, crops_region, normalisation_limits, tile_crops
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
from mk_hspc.tile_store import CellOutlines

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TilePixels:
    """What a tile's read stage hands to its cut stage: the pixels its crops need, read once, and the cells'
    outlines (in the tile window's frame, whose corner is ``outlines_origin``)."""

    rgb: np.ndarray
    origin: tuple[int, int]
    outlines: dict[str, CellOutlines]
    pixel_size_um: float
    outlines_origin: tuple[int, int]


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
    low_pct, high_pct = export["normalise_percentiles"]
    quality = int(export["quality"])

    def make_tile(tile_id: str, by_type: dict[str, list[dict]]) -> TileWork:
        def read() -> TilePixels:
            result = tile_store.read_outlines(tile_id, list(by_type))
            needed = [(records, specs[cell_type]) for cell_type, records in by_type.items()]
            x, y, w, h = crops_region(needed, result.pixel_size_um)
            rgb = pool.get(result.slide).read_region(x, y, w, h)  # the one region read of this tile
            return TilePixels(rgb, (x, y), result.outlines, result.pixel_size_um, result.window[:2])

        def cut(pixels: TilePixels) -> tuple[dict[str, bytes], dict[str, Outline]]:
            limits = normalisation_limits(pixels.rgb, float(low_pct), float(high_pct))
            files, outlines = {}, {}
            for cell_type, records in by_type.items():
                crops = tile_crops(
                    pixels.rgb,
                    pixels.origin,
                    pixels.outlines[cell_type],
                    records,
                    pixels.pixel_size_um,
                    specs[cell_type],
                    limits=limits,
                    image_format=image_format,
                    quality=quality,
                    outlines_xy=pixels.outlines_origin,
                )
                for crop in crops:
                    files[crop_path(tile_id, crop.cell_id, image_format)] = crop.image
                    outlines[crop.cell_id] = crop.outline
            return files, outlines

        return TileWork(tile_id, read, cut)

    by_tile: dict[str, dict[str, list[dict]]] = {}
    for (tile_id, cell_type), records in crop_records(selected).items():
        by_tile.setdefault(tile_id, {})[cell_type] = records
    # Tiles with the most crops first: the workers then end together instead of one cutting a crowded tile
    # while the others idle (longest-processing-time-first scheduling; the site does not depend on order).
    crowded_first = sorted(by_tile, key=lambda tile_id: (-sum(map(len, by_tile[tile_id].values())), tile_id))
    tiles = [make_tile(tile_id, by_tile[tile_id]) for tile_id in crowded_first]
    output_px = {cell_type: spec.output_px for cell_type, spec in specs.items()}
    draft = functools.cache(
        lambda: draft_pages(pages, cell_types, output_px, image_format, sorted(slide_loaders))
    )
    return SiteContent(
        tiles=tiles,
        render=lambda outlines: fill_pages(draft(), outlines),
        prepare=draft,
        paths=lambda: site_paths(pages, cell_types, image_format),
        threads=int(export.get("threads", 2)),
        close=pool.close,
    )


@contextlib.contextmanager
def _heap_frozen() -> Iterator[None]:
    """Keep the cyclic garbage collector off the objects that exist before the block (``gc.freeze``), and
    give them back to it after (``gc.unfreeze``), once the last of overlapping blocks (threads writing two
    sites) has ended.

    A Kedro session holds ~270,000 tracked objects; the crops' allocations trigger full collections that
    walk them all, 110-125 ms each with the GIL held, which stalled both tile workers in one export of the
    demo study in three. Objects made in the block are still collected as usual.
    """
    global _freezers
    with _FREEZE_LOCK:
        if _freezers == 0:
            gc.freeze()
        _freezers += 1
    try:
        yield
    finally:
        with _FREEZE_LOCK:
            _freezers -= 1
            if _freezers == 0:
                gc.unfreeze()


_FREEZE_LOCK = threading.Lock()
_freezers = 0  # blocks inside _heap_frozen


def _thread_cpu_s(func: Callable[[], Any]) -> float:
    """Run ``func``; the CPU seconds its thread spent."""
    started = time.thread_time()
    func()
    return time.thread_time() - started


def write_site(content: SiteContent, folder: Path) -> dict[str, Any]:
    """Write the site into ``folder``: tile workers read and cut tiles side by side, one thread writes files.

    ``folder`` may hold an older site (a reused folder): its files are overwritten and what the new site
    lacks is removed, so it ends holding exactly the new site.

    ``content.threads`` tile workers each read a tile (its slide region, once, and its outlines; libCZI
    decodes without the GIL), then cut and encode its crops (OpenCV, without the GIL): the tiles' work
    spreads over the cores with no hand-off from one reader to one cutter, which left a core idle while the
    first tile was read and the last one cut, and the lighter stage idle in between (measured: 1.77x the
    tile read time vs 1.67x). A writer thread writes the finished crops. Pages are drafted meanwhile by
    another thread and finished last (they need every outline).

    Returns:
        ``{"tiles": ..., "crops": ..., "busy_s": {stage: seconds summed over threads}, "cpu_s": {stage:
        CPU seconds of those threads}}``; stages ``read`` (slide region + outlines), ``process`` (limits,
        cut, encode), ``write`` (crop files) and ``pages``.

    Raises:
        StageError: a tile failed to read, cut or write (the error names the tile and the stage).
    """
    with _heap_frozen():
        return _write_site(content, folder)


def _write_site(content: SiteContent, folder: Path) -> dict[str, Any]:
    folder.mkdir(parents=True, exist_ok=True)
    # Listing the reused folder and the new site's paths (~10 ms for 5,000 crops) runs beside the first reads;
    # the writer needs it only for the first tile's crops.
    drafting = ThreadPoolExecutor(max_workers=1, thread_name_prefix="site-pages")
    listed = drafting.submit(reusable_files, folder, content.paths)

    def reuse() -> Any:
        try:
            return listed.result()
        except Exception as exc:  # named as the listing's failure, not as the first tile's write
            raise StageError("listing the reused folder", str(folder), exc) from exc

    outlines: dict[str, Outline] = {}
    written: dict[str, str] = {}  # site-relative path -> sha256 of what was written there
    n_crops = 0
    clock = StageClock()

    def work(tile: TileWork) -> tuple[dict[str, bytes], dict[str, Outline]]:
        stage = "read"
        try:
            pixels = clock.timed(stage, tile.read)
            stage = "process"
            return clock.timed(stage, tile.cut, pixels)
        except Exception as exc:
            raise StageError(stage, tile.tile_id, exc) from exc

    def write(tile: TileWork, result: tuple[dict[str, bytes], dict[str, Outline]]) -> None:
        nonlocal n_crops
        files, tile_outlines = result
        write_files(folder, files, reuse(), sha256=written)  # one writer thread: no lock needed
        outlines.update(tile_outlines)
        n_crops += len(files)

    # Drafting the pages is Python work that fits where the workers wait for their first tiles' reads.
    drafted = drafting.submit(_thread_cpu_s, content.prepare)
    try:
        stats = run_prefetched(
            content.tiles,
            work,  # the engine's read stage, run by the tile workers
            lambda tile, result: result,  # nothing left for the calling thread
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
    write_files(folder, pages, reuse(), sha256=written)
    remove_unwritten(folder, written.keys())
    busy = {stage: round(clock.busy_s.get(stage, 0.0), 3) for stage in ("read", "process")}
    busy["write"] = round(stats.busy_s.get("write", 0.0), 3)
    busy["pages"] = round(time.perf_counter() - started, 3)
    cpu = {stage: round(clock.cpu_s.get(stage, 0.0), 3) for stage in ("read", "process")}
    cpu["write"] = round(stats.cpu_s.get("write", 0.0), 3)
    cpu["pages"] = round(drafting_cpu_s + time.thread_time() - cpu_started, 3)  # drafting included
    logger.info("annotation site: %d tiles, %d crops; stage times %s", len(content.tiles), n_crops, busy)
    content.stats = {"tiles": len(content.tiles), "crops": n_crops, "busy_s": busy, "cpu_s": cpu}
    content.file_sha256 = written
    return content.stats
