"""Export nodes: thin wrappers over ``mk_hspc.export`` (site, crops, QuPath, Label Studio)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pandas as pd

from mk_hspc.czi import CziSlide
from mk_hspc.datasets.tile_store import TileStore
from mk_hspc.export.build import plan_site
from mk_hspc.export.interop import label_studio_tasks, qupath_geojson
from mk_hspc.export.site import SiteContent


def build_annotation_site(
    cells: pd.DataFrame,
    tile_store: TileStore,
    raw_slides: Mapping[str, Callable[[], CziSlide]],
    export: dict[str, Any],
) -> SiteContent:
    """Pages, index and crops of every candidate (written tile by tile as the site dataset saves)."""
    return plan_site(cells, tile_store, raw_slides, export)


def make_qupath_geojson(
    cells: pd.DataFrame, tile_store: TileStore, slide_meta: dict[str, Any], export: dict[str, Any]
) -> dict[str, Any]:
    """One GeoJSON FeatureCollection of detections per slide, in QuPath's frame for the CZI."""
    return qupath_geojson(
        cells, tile_store, slide_meta, list(export["cell_types"]), float(export["qupath"]["simplify_px"])
    )


def make_label_studio_tasks(cells: pd.DataFrame, export: dict[str, Any]) -> list[dict[str, Any]]:
    """Label Studio image-classification tasks pointing at the crops."""
    return label_studio_tasks(
        cells, list(export["cell_types"]), export["image_format"], export["label_studio"]["image_url_prefix"]
    )
