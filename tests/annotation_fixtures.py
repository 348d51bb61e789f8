"""A tiny real study for export and annotation tests: CZI slides, a tile store, the cells table, slide_meta.

Two slides (one named like an XSS attack), each placed away from the CZI origin so that QuPath's
bounding-box frame differs from absolute CZI pixels; two tiles per slide; dark discs as MKs and small
discs as HSPCs, with their label images written to a real tile store.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from skimage.draw import disk
from skimage.measure import regionprops_table

from mk_hspc.czi import open_slide
from mk_hspc.datasets.tile_store import TileStore
from mk_hspc.engine.cells_table import build_cells_table
from mk_hspc.engine.tile_work import CELL_COLUMNS
from mk_hspc.tile_store import TileResult, write_tile_result

EVIL_SLIDE = "<img src=x onerror=alert(1)>"
PIXEL_SIZE_UM = 0.5
SLIDE_ORIGINS = {EVIL_SLIDE: (1000, 2000), "S2": (-500, 300)}
TILE_W, TILE_H = 200, 240
PARAMS_HASH = "test-params"
EXPORT_PARAMS: dict[str, Any] = {
    "cell_types": {"mk": {"crop_um": 40.0, "output_px": 64}, "hspc": {"crop_um": 16.0, "output_px": 48}},
    "page_size": 4,
    "order": "score",
    "seed": 1,
    "image_format": "webp",
    "quality": 70,
    "normalise_percentiles": [1.0, 99.5],
    "threads": 2,
    "qupath": {"simplify_px": 0.5},
    "label_studio": {"image_url_prefix": "http://127.0.0.1:8765/"},
}


@dataclass
class Study:
    slides_dir: Path
    store: TileStore
    cells: pd.DataFrame
    slide_meta: dict[str, dict[str, Any]]

    def loaders(self) -> dict[str, Any]:
        return {name: (lambda p=self.slides_dir / f"{name}.czi": open_slide(p)) for name in self.slide_meta}


def _cells_of(
    labels: np.ndarray, tile_id: str, cell_type: str, x: int, y: int, rng: np.random.Generator
) -> pd.DataFrame:
    props = regionprops_table(labels, properties=("label", "area", "centroid", "bbox"))
    n = len(props["label"])
    return pd.DataFrame(
        {
            "cell_id": [f"{tile_id}_{cell_type}_{label:05d}" for label in props["label"]],
            "cell_type": [cell_type] * n,
            "label": props["label"].astype(np.int32),
            "centroid_x_px": x + props["centroid-1"],
            "centroid_y_px": y + props["centroid-0"],
            "centroid_x_um": (x + props["centroid-1"]) * PIXEL_SIZE_UM,
            "centroid_y_um": (y + props["centroid-0"]) * PIXEL_SIZE_UM,
            "area_px": props["area"].astype(np.int64),
            "area_um2": props["area"] * PIXEL_SIZE_UM**2,
            "score": rng.uniform(0, 1, n).astype(np.float32),
            "bbox_x": (x + props["bbox-1"]).astype(np.int64),
            "bbox_y": (y + props["bbox-0"]).astype(np.int64),
            "bbox_w": (props["bbox-3"] - props["bbox-1"]).astype(np.int64),
            "bbox_h": (props["bbox-2"] - props["bbox-0"]).astype(np.int64),
            "wider_than_overlap": np.zeros(n, bool),
        },
        columns=list(CELL_COLUMNS),
    )


def make_study(root: Path, seed: int = 0) -> Study:
    from pylibCZIrw import czi as pyczi

    rng = np.random.default_rng(seed)
    slides_dir = root / "slides"
    store_dir = root / "tile_store"
    slides_dir.mkdir(parents=True)
    tiles: dict[str, str] = {}
    samples = []
    for slide, (ox, oy) in SLIDE_ORIGINS.items():
        width, height = 2 * TILE_W, TILE_H
        rgb = np.empty((height, width, 3), np.uint8)
        rgb[:] = (235, 200, 215)  # pink tissue
        for col in range(2):
            tile_id = f"{slide}_s0_r000_c{col:03d}"
            x, y = ox + col * TILE_W, oy
            labels = {
                "mk": np.zeros((TILE_H, TILE_W), np.int32),
                "hspc": np.zeros((TILE_H, TILE_W), np.int32),
            }
            for n, (cy, cx) in enumerate([(70, 60), (160, 130)], start=1):
                rr, cc = disk((cy, cx), 22, shape=(TILE_H, TILE_W))
                labels["mk"][rr, cc] = n
                rgb[rr, cc + col * TILE_W] = (120, 60, 140)
            for n, (cy, cx) in enumerate([(30, 150), (200, 40), (120, 20)], start=1):
                rr, cc = disk((cy, cx), 7, shape=(TILE_H, TILE_W))
                labels["hspc"][rr, cc] = n
                rgb[rr, cc + col * TILE_W] = (60, 40, 120)
            cells = pd.concat(
                [_cells_of(labels[t], tile_id, t, x, y, rng) for t in ("mk", "hspc")], ignore_index=True
            )
            window = (x, y, TILE_W, TILE_H)
            write_tile_result(
                store_dir,
                TileResult(tile_id, slide, window, window, PIXEL_SIZE_UM, PARAMS_HASH, labels, cells),
                fsync=False,
            )
            tiles[tile_id] = slide
            samples.append({"tile_id": tile_id, "slide": slide})
        with pyczi.create_czi(str(slides_dir / f"{slide}.czi"), exist_ok=True) as writer:
            writer.write(rgb[:, :, ::-1].copy(), location=(ox, oy))  # CZI stores BGR
            writer.write_metadata(scale_x=PIXEL_SIZE_UM * 1e-6, scale_y=PIXEL_SIZE_UM * 1e-6)
    store = TileStore(store_dir, {"params_hash": PARAMS_HASH, "tiles": dict(sorted(tiles.items()))})
    cells = build_cells_table(store_dir, pd.DataFrame(samples), params_hash=PARAMS_HASH)
    cells["slide"] = cells["slide"].astype(str)
    slide_meta = {}
    for slide in SLIDE_ORIGINS:
        with open_slide(slides_dir / f"{slide}.czi") as handle:
            slide_meta[slide] = handle.meta.to_dict()
    return Study(slides_dir, store, cells, slide_meta)
