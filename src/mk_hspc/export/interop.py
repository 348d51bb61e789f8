"""Files for other tools: QuPath GeoJSON per slide and a Label Studio task file.

QuPath opens a CZI in the frame of the slide's bounding box: pixel (0, 0) is the top-left corner of the
union of all scenes (``SlideMeta.bbox``), whereas mk-hspc's coordinates are absolute CZI pixels. So every
outline is shifted by ``-bbox.x, -bbox.y``. Detections carry ``classification`` = cell type and the cell's
measurements in µm; the stable cell id is the object's name (and a UUID derived from it is its id).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import pandas as pd

from mk_hspc.datasets.tile_store import TileStore
from mk_hspc.export.crops import outline_array
from mk_hspc.export.site import crop_path, url

CELL_ID_NAMESPACE = uuid.UUID("7c1c7f0e-5a7b-4f43-9d0c-0b8d3c2f6a51")
CLASS_COLOURS = {"mk": [200, 40, 160], "hspc": [30, 120, 220]}
MEASUREMENTS = ("area_um2", "score", "centroid_x_um", "centroid_y_um")
LABEL_STUDIO_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <Text name="cell" value="$cell_id"/>
  <Choices name="label" toName="image" choice="single" showInline="true">
    <Choice value="Yes" hotkey="y"/><Choice value="No" hotkey="n"/><Choice value="Unsure" hotkey="u"/>
  </Choices>
</View>"""


def qupath_features(
    tile_store: TileStore, slide_cells: pd.DataFrame, bbox_xy: tuple[int, int], tolerance_px: float
) -> Iterator[dict[str, Any]]:
    """GeoJSON features of one slide's cells: outlines from the tile store's labels, tile by tile."""
    for tile_id, tile_cells in slide_cells.groupby("tile_id", sort=True):
        result = tile_store.read(str(tile_id), include_labels=True, feature_names=())
        wx, wy = result.window[:2]
        for cell in tile_cells.itertuples(index=False):
            labels = result.labels[str(cell.cell_type)]
            x0, y0 = int(cell.bbox_x) - wx, int(cell.bbox_y) - wy
            mask = labels[y0 : y0 + int(cell.bbox_h), x0 : x0 + int(cell.bbox_w)] == int(cell.label)
            offset = (cell.bbox_x - bbox_xy[0], cell.bbox_y - bbox_xy[1])
            ring = np.round(outline_array(mask, tolerance_px) + offset, 2).tolist()
            if len(ring) < 4:
                continue
            if ring[0] != ring[-1]:
                ring.append(ring[0])
            cell_type = str(cell.cell_type)
            yield {
                "type": "Feature",
                "id": str(uuid.uuid5(CELL_ID_NAMESPACE, str(cell.cell_id))),
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {
                    "objectType": "detection",
                    "name": str(cell.cell_id),
                    "classification": {
                        "name": cell_type,
                        "color": CLASS_COLOURS.get(cell_type, [128, 128, 128]),
                    },
                    "measurements": {
                        name: float(getattr(cell, name)) for name in MEASUREMENTS if hasattr(cell, name)
                    },
                },
            }


def qupath_geojson(
    cells: pd.DataFrame,
    tile_store: TileStore,
    slide_meta: Mapping[str, Mapping[str, Any]],
    cell_types: list[str],
    tolerance_px: float,
) -> dict[str, Any]:
    """``{slide: callable -> FeatureCollection}`` for every slide of ``slide_meta`` (lazy, one slide at a time)."""
    selected = cells[cells["cell_type"].isin(cell_types)]

    def collection(slide: str) -> dict[str, Any]:
        bbox = slide_meta[slide]["bbox"]
        of_slide = selected[selected["slide"] == slide]
        features = list(qupath_features(tile_store, of_slide, (int(bbox["x"]), int(bbox["y"])), tolerance_px))
        return {"type": "FeatureCollection", "features": features}

    return {slide: (lambda slide=slide: collection(slide)) for slide in sorted(slide_meta)}


def label_studio_tasks(
    cells: pd.DataFrame, cell_types: list[str], image_format: str, image_url_prefix: str
) -> list[dict[str, Any]]:
    """Image-classification tasks (``LABEL_STUDIO_CONFIG``), one per cell, the crop's URL and the cell id in data."""
    selected = cells[cells["cell_type"].isin(cell_types)].sort_values("cell_id")
    return [
        {
            "data": {
                "image": image_url_prefix + url(crop_path(str(row.tile_id), str(row.cell_id), image_format)),
                "cell_id": str(row.cell_id),
                "slide": str(row.slide),
                "cell_type": str(row.cell_type),
                "score": round(float(row.score), 4),
            }
        }
        for row in selected.itertuples(index=False)
    ]
