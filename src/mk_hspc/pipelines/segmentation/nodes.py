"""Segmentation nodes: sampled tiles -> tile store (HDF5 per tile) -> cells table -> counts.

Thin wrappers over ``mk_hspc.engine`` (the prefetching, resumable tile work, executed by the tile store
dataset) and ``mk_hspc.counts``.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from mk_hspc.counts import cell_counts_figure, count_cells
from mk_hspc.czi import CziSlide
from mk_hspc.datasets.tile_store import TileStore
from mk_hspc.engine.cells_table import build_cells_table
from mk_hspc.engine.dask_executor import DaskRun, DaskSettings
from mk_hspc.engine.plan import SegmentationPlan
from mk_hspc.engine.plugins import build_plugins, check_overlap_covers_cells, chosen_plugins
from mk_hspc.engine.tile_work import SegmentationSettings

logger = logging.getLogger(__name__)


def segment_sampled_tiles(
    tile_sample: pd.DataFrame,
    raw_slides: Mapping[str, Callable[[], CziSlide]],
    segmentation: dict[str, Any],
    ingestion: dict[str, Any],
) -> SegmentationPlan:
    """The segmentation of every sampled tile, run by the tile store dataset as it saves (resumable)."""
    segmenters, extractors = build_plugins(segmentation)
    check_overlap_covers_cells(segmenters, float(ingestion["tiles"]["largest_cell_um"]))
    return SegmentationPlan(
        tile_sample=tile_sample,
        slide_openers=raw_slides,
        segmenters=segmenters,
        feature_extractors=extractors,
        settings=SegmentationSettings(**segmentation.get("runtime", {})),
        params=chosen_plugin_conf(segmentation),
        skip_failed_tiles=bool(ingestion["skip_bad_slides"]),
        dask=dask_run(segmentation),
    )


def dask_run(segmentation: Mapping[str, Any]) -> DaskRun | None:
    """The Dask executor's settings when ``segmentation.executor.kind`` is ``dask`` (None: local threads)."""
    executor = segmentation.get("executor") or {}
    if executor.get("kind", "local") != "dask":
        return None
    return DaskRun(
        DaskSettings.from_params(executor.get("dask")), segmentation=copy.deepcopy(dict(segmentation))
    )


def chosen_plugin_conf(segmentation: Mapping[str, Any]) -> dict[str, Any]:
    """The conf of the chosen plugins only: another plugin's settings (or its weights) change no tile."""
    segmenters, features = chosen_plugins(copy.deepcopy(segmentation))
    return {
        "segmenters": {
            cell_type: {"name": c.name, "params": c.params} for cell_type, c in segmenters.items()
        },
        "features": [{"name": c.name, "params": c.params} for c in features],
    }


def make_cells_table(tile_store: TileStore, tile_sample: pd.DataFrame) -> pd.DataFrame:
    """One row per kept cell of the sampled tiles, with stable cell ids and morphology."""
    missing = sorted(
        set(tile_sample["tile_id"].astype(str)) - set(tile_store.tiles) - set(tile_store.failed_tiles)
    )
    if missing:
        raise ValueError(
            f"the tile store {tile_store.root} lacks {len(missing)} sampled tile(s), e.g. {missing[:3]}; "
            "run segmentation again"
        )
    segmented = tile_sample[tile_sample["tile_id"].astype(str).isin(tile_store.tiles)]
    return build_cells_table(tile_store.root, segmented, params_hash=tile_store.params_hash)


def summarise_cell_counts(
    cells: pd.DataFrame,
    tile_store: TileStore,
    tile_sample: pd.DataFrame,
    slide_meta: dict[str, dict[str, Any]],
    slide_groups: pd.DataFrame,
    segmenters: dict[str, Any],
) -> tuple[pd.DataFrame, Figure]:
    """Cells per slide and group, with densities per mm² of sampled tissue, and their plot.

    Takes only the segmenters' block (for the cell types), so that a runtime setting changed since the cells
    were made (threads, progress bar) does not make the provenance check refuse the counts.
    """
    counts = count_cells(
        cells, tile_sample, slide_meta, slide_groups, sorted(segmenters), failed_tiles=tile_store.failed_tiles
    )
    return counts, cell_counts_figure(counts)
