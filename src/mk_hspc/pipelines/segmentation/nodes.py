"""Segmentation nodes: sampled tiles -> tile store (HDF5 per tile) -> cells table -> counts.

Thin wrappers over ``tile_work`` (the prefetching, resumable run) and ``cells_table``.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from mk_hspc.czi import CziSlide
from mk_hspc.models import create_feature_extractor, create_segmenter
from mk_hspc.models.registry import FEATURE_GROUP, SEGMENTER_GROUP, plugin_class
from mk_hspc.pipelines.ingestion.nodes import open_good_slides
from mk_hspc.pipelines.segmentation.cells_table import build_cells_table
from mk_hspc.pipelines.segmentation.counts import cell_counts_figure, count_cells
from mk_hspc.pipelines.segmentation.tile_work import SegmentationSettings, segment_tiles

logger = logging.getLogger(__name__)


def _plugin_params(group: str, spec: Mapping[str, Any], device: str) -> dict[str, Any]:
    """A plugin's parameters, plus the run-wide ``device`` when its constructor takes one."""
    params = dict(spec.get("params") or {})
    if "device" not in params and "device" in inspect.signature(plugin_class(group, spec["name"])).parameters:
        params["device"] = device
    return params


def build_plugins(segmentation: Mapping[str, Any]) -> tuple[dict[str, Any], list[Any]]:
    """Segmenters by cell type and feature extractors, as chosen in ``parameters_segmentation.yml``."""
    device = segmentation.get("device", "auto")
    segmenters = {
        cell_type: create_segmenter(spec["name"], **_plugin_params(SEGMENTER_GROUP, spec, device))
        for cell_type, spec in segmentation["segmenters"].items()
    }
    extractors = [
        create_feature_extractor(spec["name"], **_plugin_params(FEATURE_GROUP, spec, device))
        for spec in segmentation.get("features") or []
    ]
    return segmenters, extractors


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
    slide_groups: pd.DataFrame,
) -> tuple[pd.DataFrame, Figure]:
    """Cells per slide and group, with densities per mm² of sampled tissue, and their plot."""
    counts = count_cells(cells, tile_sample, slide_meta, slide_groups)
    return counts, cell_counts_figure(counts)
