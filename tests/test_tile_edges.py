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


HEIGHT, WIDTH, TILE_PX = 300, 664, 400  # two tiles: the overlap is 60 µm + 2 px, aligned: 136 px


def shape_mask(kind: str, centre_x: float) -> np.ndarray:
    """A dark object across the tile boundary: a disk, an ellipse or a comet (disk + tail, centroid off-centre),
    all at most 57 µm wide so that a 60 µm overlap covers them."""
    rows, cols = np.ogrid[:HEIGHT, :WIDTH]
    cy = HEIGHT / 2
    um = 1 / PIXEL_SIZE_UM
    if kind == "disk":
        return (rows - cy) ** 2 + (cols - centre_x) ** 2 <= (MK_DIAMETER_UM / 2 * um) ** 2
    if kind == "ellipse":  # 56 x 28 µm, ~1230 µm²
        return ((cols - centre_x) / (28 * um)) ** 2 + ((rows - cy) / (14 * um)) ** 2 <= 1
    if kind == "comet":  # a 20 µm disk with a 37 µm tail to its right
        head = (rows - cy) ** 2 + (cols - (centre_x - 18 * um)) ** 2 <= (10 * um) ** 2
        tail = (np.abs(rows - cy) <= 2 * um) & (cols >= centre_x - 18 * um) & (cols <= centre_x + 28 * um)
        return head | tail
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["disk", "ellipse", "comet"])
@pytest.mark.parametrize("offset_px", range(-70, 71, 7))
def test_a_large_cell_across_a_tile_edge_is_kept_once_and_whole(kind: str, offset_px: int) -> None:
    tiles = tiles_of(HEIGHT, WIDTH, TILE_PX)
    assert len(tiles) == 2
    boundary_x = int(tiles["core_x"].max())  # where the second tile's core begins
    mask = shape_mask(kind, boundary_x + offset_px)
    rgb = np.full((HEIGHT, WIDTH, 3), 230, np.uint8)
    rgb[mask] = (60, 30, 90)

    cells = cells_found(rgb, tiles)

    assert len(cells) == 1, cells[["cell_id", "area_px", "centroid_x_px"]]
    assert cells["area_px"].iloc[0] == mask.sum()  # whole, not truncated by an edge
    assert not cells["wider_than_overlap"].iloc[0]


@pytest.mark.parametrize("offset_px", range(-70, 71, 10))
def test_a_cell_wider_than_the_overlap_is_never_lost_and_is_flagged(offset_px: int) -> None:
    tiles = tiles_of(HEIGHT, WIDTH, TILE_PX)
    boundary_x = int(tiles["core_x"].max())
    rows, cols = np.ogrid[:HEIGHT, :WIDTH]
    um = 1 / PIXEL_SIZE_UM
    wide = ((cols - boundary_x - offset_px) / (45 * um)) ** 2 + ((rows - HEIGHT / 2) / (12 * um)) ** 2 <= 1
    rgb = np.full((HEIGHT, WIDTH, 3), 230, np.uint8)
    rgb[wide] = (60, 30, 90)

    cells = cells_found(rgb, tiles)

    assert len(cells) >= 1 and cells["wider_than_overlap"].all()


@pytest.mark.parametrize("side", ["last column of tile 0's core", "first column of tile 1's core"])
def test_a_cell_exactly_as_wide_as_largest_cell_um_is_kept_once_at_a_tile_edge(side: str) -> None:
    """A 60 µm disk (``largest_cell_um``, 120 px) centred on either side of a core boundary. With an overlap of
    exactly 120 px, the disk on the last column of tile 0's core ended on tile 0's window edge: tile 0 took it
    for a cut cell, tile 1 did not own it, and the cell was lost."""
    tiles = tiles_of(HEIGHT, WIDTH, TILE_PX)
    assert len(tiles) == 2
    boundary_x = int(tiles["core_x"].max())  # where tile 1's core begins
    largest_px = round(default_ingestion_params(TILE_PX)["tiles"]["largest_cell_um"] / PIXEL_SIZE_UM)
    rows, cols = np.ogrid[:HEIGHT, :WIDTH]
    centre_x = boundary_x - 0.5 if side.startswith("last") else boundary_x + 0.5
    disk = (rows - HEIGHT / 2) ** 2 + (cols - centre_x) ** 2 <= (largest_px / 2) ** 2
    xs = np.flatnonzero(disk.any(axis=0))
    assert xs.max() - xs.min() + 1 == largest_px  # bounding box exactly as wide as largest_cell_um
    rgb = np.full((HEIGHT, WIDTH, 3), 230, np.uint8)
    rgb[disk] = (60, 30, 90)

    cells = cells_found(rgb, tiles)

    assert len(cells) == 1, f"{len(cells)} cells kept"
    assert cells["area_px"].iloc[0] == disk.sum()  # whole
