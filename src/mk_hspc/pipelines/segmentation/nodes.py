"""Segmentation nodes: sampled tiles -> tile store (HDF5 per tile) -> cells table -> counts.

Thin wrappers over ``tile_work`` (the prefetching, resumable run) and ``cells_table``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from mk_hspc.counts import cell_counts_figure, count_cells
from mk_hspc.czi import CziSlide
from mk_hspc.engine.cells_table import build_cells_table
from mk_hspc.engine.plugins import build_plugins
from mk_hspc.engine.tile_work import SegmentationSettings, segment_tiles
from mk_hspc.pipelines.ingestion.nodes import open_good_slides

logger = logging.getLogger(__name__)


def segment_sampled_tiles(
    tile_sample: pd.DataFrame,
    slide_meta: dict[str, dict[str, Any]],
    raw_slides: Mapping[str, Callable[[], CziSlide]],
    segmentation: dict[str, Any],
) -> dict[str, Any]:
    """Run the plugins on every sampled tile into the tile store; finished tiles are skipped (resume)."""
    slides = open_good_slides(
        raw_slides, skip_bad_slides=False, only=set(tile_sample["slide"]) & set(slide_meta)
    )
    segmenters, extractors = build_plugins(segmentation)
    summary = segment_tiles(
        tile_sample,
        slides,
        Path(segmentation["tile_store_dir"]),
        segmenters,
        extractors,
        SegmentationSettings(**segmentation.get("runtime", {})),
        params={"segmenters": segmentation["segmenters"], "features": segmentation.get("features")},
    )
    for slide in slides.values():
        slide.close()
    logger.info("Segmentation run: %s", summary.to_dict())
    return summary.to_dict()


def make_cells_table(
    segmentation_run: dict[str, Any], tile_sample: pd.DataFrame, segmentation: dict[str, Any]
) -> pd.DataFrame:
    """One row per kept cell of the sampled tiles, with stable cell ids and morphology."""
    return build_cells_table(
        Path(segmentation["tile_store_dir"]), tile_sample, params_hash=segmentation_run["params_hash"]
    )


def summarise_cell_counts(
    cells: pd.DataFrame,
    tile_sample: pd.DataFrame,
    slide_meta: dict[str, dict[str, Any]],
    ingestion: dict[str, Any],
) -> tuple[pd.DataFrame, Figure]:
    """Cells per slide and group, with densities per mm² of sampled tissue, and their plot."""
    counts = count_cells(cells, tile_sample, slide_meta, Path(ingestion["slide_sheet"]))
    return counts, cell_counts_figure(counts)
