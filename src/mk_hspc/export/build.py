"""Plan the annotation site from the cells table and the tile store: one slide region read per tile.

:func:`plan_site` decides the pages up front (from the cells table alone) and returns the per-tile crop work
as lazy batches; :func:`write_site` runs them into a folder (the site dataset calls it), so memory holds one
tile's pixels and crops per worker, never the whole site.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Any

import pandas as pd

from mk_hspc.datasets.tile_store import TileStore
from mk_hspc.export.crops import CropSpec, normalisation_limits, tile_crops
from mk_hspc.export.site import Outline, SiteContent, TileBatch, assign_pages, crop_path, page_files

logger = logging.getLogger(__name__)


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
    pages = assign_pages(selected, cell_types, int(export["page_size"]), export["order"], int(export["seed"]))
    image_format = export["image_format"]
    pool = SlidePool(slide_loaders)
    low_pct, high_pct = export["normalise_percentiles"]

    def make_batch(tile_id: str, tile_cells: pd.DataFrame) -> TileBatch:
        def run() -> tuple[dict[str, bytes], dict[str, Outline]]:
            result = tile_store.read(tile_id, include_labels=True, feature_names=())
            x, y, w, h = result.window
            tile_rgb = pool.get(result.slide).read_region(x, y, w, h)  # the one region read of this tile
            limits = normalisation_limits(tile_rgb, float(low_pct), float(high_pct))
            files, outlines = {}, {}
            for cell_type, of_type in tile_cells.groupby("cell_type", sort=True):
                crops = tile_crops(
                    tile_rgb,
                    (x, y),
                    result.labels[str(cell_type)],
                    of_type.to_dict("records"),
                    result.pixel_size_um,
                    specs[str(cell_type)],
                    limits=limits,
                    image_format=image_format,
                    quality=int(export["quality"]),
                )
                for crop in crops:
                    files[crop_path(tile_id, crop.cell_id, image_format)] = crop.image
                    outlines[crop.cell_id] = crop.outline
            return files, outlines

        return run

    batches = [make_batch(str(tile_id), group) for tile_id, group in selected.groupby("tile_id", sort=True)]
    output_px = {cell_type: spec.output_px for cell_type, spec in specs.items()}
    return SiteContent(
        batches=batches,
        render=lambda outlines: page_files(
            pages, outlines, cell_types, output_px, image_format, sorted(slide_loaders)
        ),
        threads=int(export.get("threads", 1)),
        close=pool.close,
    )


def safe_relative(path: str) -> PurePosixPath:
    """A site-relative path that cannot leave the site (no absolute path, ``..``, backslash or NUL)."""
    if (
        path.startswith("/")
        or any(part in ("..", ".", "") for part in path.split("/"))
        or "\\" in path
        or "\0" in path
    ):
        raise ValueError(f"site path {path!r} would leave the site folder")
    return PurePosixPath(path)


def write_files(folder: Path, files: Mapping[str, bytes]) -> None:
    for name, content in files.items():
        target = folder / safe_relative(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)


def write_site(content: SiteContent, folder: Path) -> dict[str, int]:
    """Run every batch (up to ``content.threads`` at once) and write the site into ``folder``.

    Returns:
        ``{"tiles": ..., "crops": ...}`` counts.
    """
    folder.mkdir(parents=True, exist_ok=True)
    outlines: dict[str, Outline] = {}
    n_crops = 0
    try:
        with ThreadPoolExecutor(max_workers=max(1, content.threads)) as executor:
            for files, tile_outlines in executor.map(lambda batch: batch(), content.batches):
                write_files(folder, files)
                outlines.update(tile_outlines)
                n_crops += len(files)
    finally:
        content.close()
    write_files(folder, content.render(outlines))
    return {"tiles": len(content.batches), "crops": n_crops}
