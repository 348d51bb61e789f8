"""Every cell exactly once and whole with the project's default tiling, wherever it lies against tile edges."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from kedro.config import OmegaConfigLoader

from mk_hspc.engine.tile_work import TileSpec, process_tile
from mk_hspc.pipelines.ingestion.nodes import make_tile_index
from mk_hspc.tissue import TissueMap
from tests.test_tile_work import ArraySlide, DarkBlobSegmenter

PROJECT = Path(__file__).resolve().parents[1]
PIXEL_SIZE_UM = 0.5
MK_DIAMETER_UM = 50.0  # ~2000 µm², the classical segmenter's largest MK


def default_ingestion_params(tile_px: int) -> dict:
    """conf/base's ingestion parameters, with a smaller tile so the test images stay small."""
    params = OmegaConfigLoader(str(PROJECT / "conf"), base_env="base", default_run_env="base")["parameters"]
    ingestion = params["ingestion"]
    ingestion["tiles"]["tile_px"] = tile_px
    return ingestion


def tiles_of(height: int, width: int, tile_px: int) -> pd.DataFrame:
    meta = {
        "name": "edge",
        "pixel_size_um": PIXEL_SIZE_UM,
        "scenes": [{"x": 0, "y": 0, "w": width, "h": height}],
    }
    tissue = TissueMap("edge", np.ones((4, 4), bool), 0, 0, max(height, width) / 4, PIXEL_SIZE_UM, 0.5)
    return make_tile_index({"edge": meta}, {"edge": lambda: tissue}, default_ingestion_params(tile_px))


def cells_found(rgb: np.ndarray, tiles: pd.DataFrame) -> pd.DataFrame:
    slide = ArraySlide(rgb, origin=(0, 0))
    frames = []
    for record in tiles.to_dict("records"):
        spec = TileSpec.from_record(record)
        tile = slide.read_region(spec.x, spec.y, spec.w, spec.h)
        frames.append(process_tile(tile, spec, PIXEL_SIZE_UM, {"mk": DarkBlobSegmenter()}).cells)
    return pd.concat(frames, ignore_index=True)


@pytest.mark.parametrize("offset_px", range(-70, 71, 7))
def test_a_large_cell_across_a_tile_edge_is_kept_once_and_whole(offset_px: int) -> None:
    tile_px, height, width = 400, 300, 680
    tiles = tiles_of(height, width, tile_px)
    assert len(tiles) == 2
    boundary_x = int(tiles["core_x"].max())  # where the second tile's core begins
    radius_px = MK_DIAMETER_UM / PIXEL_SIZE_UM / 2
    rows, cols = np.ogrid[:height, :width]
    centre = (height // 2, boundary_x + offset_px)
    disk = (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius_px**2
    rgb = np.full((height, width, 3), 230, np.uint8)
    rgb[disk] = (60, 30, 90)

    cells = cells_found(rgb, tiles)

    assert len(cells) == 1, cells[["cell_id", "area_px", "centroid_x_px"]]
    assert cells["area_px"].iloc[0] == disk.sum()  # whole, not truncated by an edge
