"""The tile grid of every scene, each tile's tissue fraction, and the seeded sample pooled across slides.

Windows may overlap (stride = ``tile_px - overlap_px``); each tile also owns a *core*, and the cores of a scene
partition it exactly, so a cell kept only by the tile whose core holds its bounding-box centre is kept
exactly once (whole, when the overlap is at least its width and height: ``engine.tile_work``). Column layout: ``docs/CONTRACTS.md`` ("Tiles").
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from mk_hspc.tissue.maps import TissueMap
from mk_hspc.tissue.protocols import BoxLike, SlideMetaLike

TILE_COLUMNS = [
    "tile_id", "slide", "scene", "row", "col", "x", "y", "w", "h",
    "core_x", "core_y", "core_w", "core_h", "tissue_fraction", "core_tissue_fraction", "is_tissue",
]  # fmt: skip


def axis_windows(
    start: int, length: int, tile_px: int, overlap_px: int = 0
) -> list[tuple[int, int, int, int]]:
    """Windows and cores along one axis of a scene: ``(window_start, window_len, core_start, core_len)``.

    Windows start every ``stride = tile_px - overlap_px`` pixels and are clipped to ``[start, start + length)``;
    there are just enough of them for the last to reach the end. Core ``i`` spans
    ``[start_i + overlap_px // 2, start_i + overlap_px // 2 + stride)``, except that the first begins at the
    scene start and the last ends at the scene end; consecutive cores touch, so they partition the axis.
    """
    if tile_px <= 0:
        raise ValueError(f"tile_px must be positive, got {tile_px}")
    if not 0 <= overlap_px < tile_px:
        raise ValueError(f"overlap_px must be in [0, tile_px), got {overlap_px} with tile_px={tile_px}")
    if length <= 0:
        raise ValueError(f"scene length must be positive, got {length}")
    stride = tile_px - overlap_px
    n_windows = max(1, math.ceil((length - overlap_px) / stride))
    end = start + length
    half_overlap = overlap_px // 2
    windows = []
    for i in range(n_windows):
        window_start = start + i * stride
        window_len = min(tile_px, end - window_start)
        core_start = start if i == 0 else window_start + half_overlap
        core_end = end if i == n_windows - 1 else window_start + half_overlap + stride
        windows.append((window_start, window_len, core_start, core_end - core_start))
    return windows


def scene_tiles(
    slide: str, scene: int, box: BoxLike, tile_px: int = 3000, overlap_px: int = 0
) -> list[dict[str, object]]:
    """The tiles of one scene as rows (without tissue columns), in row-major order."""
    rows = []
    for row, (y, h, core_y, core_h) in enumerate(axis_windows(box.y, box.h, tile_px, overlap_px)):
        for col, (x, w, core_x, core_w) in enumerate(axis_windows(box.x, box.w, tile_px, overlap_px)):
            rows.append(
                {
                    "tile_id": f"{slide}_s{scene}_r{row:03d}_c{col:03d}",
                    "slide": slide,
                    "scene": scene,
                    "row": row,
                    "col": col,
                    "x": x,
                    "y": y,
                    "w": w,
                    "h": h,
                    "core_x": core_x,
                    "core_y": core_y,
                    "core_w": core_w,
                    "core_h": core_h,
                }
            )
    return rows


@dataclass(frozen=True)
class _Box:
    x: int
    y: int
    w: int
    h: int


def _meta_fields(meta: SlideMetaLike | Mapping[str, Any]) -> tuple[str, list[_Box]]:
    """Name and scene boxes of a slide from a ``SlideMeta`` or its ``to_dict()`` form."""
    if isinstance(meta, Mapping):
        name, scenes = meta["name"], meta["scenes"]
    else:
        name, scenes = meta.name, meta.scenes
    boxes = []
    for scene in scenes:
        if isinstance(scene, Mapping):
            boxes.append(_Box(int(scene["x"]), int(scene["y"]), int(scene["w"]), int(scene["h"])))
        elif isinstance(scene, Sequence):
            boxes.append(_Box(*(int(v) for v in scene)))
        else:
            boxes.append(_Box(int(scene.x), int(scene.y), int(scene.w), int(scene.h)))
    return str(name), boxes


def slide_tile_index(
    meta: SlideMetaLike | Mapping[str, Any],
    tissue_map: TissueMap | None,
    *,
    tile_px: int = 3000,
    overlap_px: int = 0,
    min_tissue_fraction: float = 0.15,
) -> pd.DataFrame:
    """Tile index of one slide: every scene's grid with each window's tissue fraction from ``tissue_map``.

    ``meta`` is a ``SlideMeta`` or its ``to_dict()`` form. ``is_tissue`` is ``tissue_fraction >=
    min_tissue_fraction`` (the window decides whether a tile is worth segmenting); ``core_tissue_fraction``
    is the tissue fraction of the core, the area the tile's cells are counted in (densities use it). Without
    a map every fraction is NaN and no tile is a tissue tile.
    """
    name, scenes = _meta_fields(meta)
    rows = [
        row for scene, box in enumerate(scenes) for row in scene_tiles(name, scene, box, tile_px, overlap_px)
    ]
    frame = pd.DataFrame(rows, columns=TILE_COLUMNS[:-2])
    if tissue_map is None:
        fractions = core_fractions = np.full(len(frame), np.nan)
    else:
        if tissue_map.slide != name:
            raise ValueError(f"tissue map of {tissue_map.slide!r} given for slide {name!r}")
        fractions = tissue_map.window_fractions(frame["x"], frame["y"], frame["w"], frame["h"])
        core_fractions = tissue_map.window_fractions(
            frame["core_x"], frame["core_y"], frame["core_w"], frame["core_h"]
        )
    frame["tissue_fraction"] = fractions
    frame["core_tissue_fraction"] = core_fractions
    frame["is_tissue"] = frame["tissue_fraction"] >= min_tissue_fraction
    return frame.astype({"scene": "int64", "row": "int64", "col": "int64"})


def build_tile_grid(
    slide_meta: Mapping[str, SlideMetaLike | Mapping[str, Any]] | Iterable[SlideMetaLike],
    tissue_maps: Mapping[str, TissueMap],
    *,
    tile_px: int = 3000,
    overlap_px: int = 0,
    overlap_um: float | None = None,
    min_tissue_fraction: float = 0.15,
) -> pd.DataFrame:
    """Tile index of a study: :func:`slide_tile_index` of every slide, concatenated, sorted by ``tile_id``.

    ``slide_meta`` maps slide name to metadata (object or dict), or is an iterable of metadata objects.
    ``overlap_um`` (when given) sets each slide's overlap from its own pixel size (:func:`overlap_px_for`)
    instead of ``overlap_px``: a cell is kept whole by exactly one tile only when the overlap is at least
    its diameter, and cell sizes are physical.
    """
    metas = list(slide_meta.values()) if isinstance(slide_meta, Mapping) else list(slide_meta)
    frames = []
    for meta in metas:
        name, _ = _meta_fields(meta)
        if overlap_um is not None:
            overlap_px = overlap_px_for(overlap_um, _pixel_size_um(meta), tile_px)
        frames.append(
            slide_tile_index(
                meta,
                tissue_maps.get(name),
                tile_px=tile_px,
                overlap_px=overlap_px,
                min_tissue_fraction=min_tissue_fraction,
            )
        )
    if not frames:
        return pd.DataFrame(columns=TILE_COLUMNS)
    return pd.concat(frames, ignore_index=True).sort_values("tile_id", ignore_index=True)


# Pixels added to the overlap: a cell as wide as the overlap, centred on the last column of its tile's core,
# would otherwise end exactly on the window edge and be taken for a cut cell by its owner (kept by no tile).
OVERLAP_MARGIN_PX = 2
# The tile step (tile_px - overlap) is a multiple of this: segmenters that bin pixels (2x, 3x, 4x, 6x, 8x...)
# then bin every tile on one grid, so neighbouring tiles see a cell near their boundary in the same pixels.
# Off-grid steps made the two tiles segment such a cell differently, and each took it for the other's.
STEP_ALIGN_PX = 24


def overlap_px_for(overlap_um: float, pixel_size_um: float, tile_px: int) -> int:
    """The overlap in px that holds a cell ``overlap_um`` wide whole in its owner tile; an error when it
    eats the tile.

    At least ``ceil(overlap_um / pixel_size_um) + OVERLAP_MARGIN_PX``: each side of a core then has at least
    half the cell width plus one pixel of window beyond it, so a cell no wider than ``overlap_um`` whose
    bounding-box centre is in the core never touches the window's inner edge; then up to
    ``STEP_ALIGN_PX - 1`` px more, so that the step between tiles is a multiple of ``STEP_ALIGN_PX``.
    """
    needed_px = math.ceil(overlap_um / pixel_size_um - 1e-9) + OVERLAP_MARGIN_PX
    overlap_px = tile_px - (tile_px - needed_px) // STEP_ALIGN_PX * STEP_ALIGN_PX
    if overlap_px * 2 >= tile_px:
        raise ValueError(
            f"ingestion.tiles.largest_cell_um = {overlap_um} µm is a tile overlap of {overlap_px} px at "
            f"{pixel_size_um} µm/px, too large for ingestion.tiles.tile_px = {tile_px} (the overlap must be "
            "under half the tile); raise tile_px"
        )
    return overlap_px


def _pixel_size_um(meta: SlideMetaLike | Mapping[str, Any]) -> float:
    return float(meta["pixel_size_um"] if isinstance(meta, Mapping) else meta.pixel_size_um)


def _draw_key(seed: int, tile_id: str) -> bytes:
    """A seeded pseudo-random sort key per tile: the same tile gets the same key on every machine and run."""
    return hashlib.blake2b(tile_id.encode(), digest_size=16, key=str(int(seed)).encode()).digest()


def sample_tiles(tile_index: pd.DataFrame, fraction: float = 0.10, seed: int = 0) -> pd.DataFrame:
    """A seeded sample of the tissue tiles of ALL slides pooled (not per slide).

    Every tissue tile gets a key from a keyed hash of ``(seed, tile_id)``; the ``n = round(fraction *
    n_tissue_tiles)`` tiles with the smallest keys are the sample (at least one when any tissue tile
    exists). So the sample depends only on the set of tissue tile ids, the fraction and the seed - never on
    row order, and a smaller fraction's sample is a prefix of a larger one's. Per-slide counts follow the
    pooled draw, so a slide with more tissue gets more tiles on average but not exactly its share.

    Returns:
        The sampled rows ordered by ``sample_rank`` (0 = drawn first), with a ``sample_rank`` column.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    tissue = tile_index.loc[tile_index["is_tissue"].astype(bool)]
    if tissue["tile_id"].duplicated().any():
        raise ValueError("tile_index has duplicate tile_id values")
    n_tissue = len(tissue)
    n_sample = min(n_tissue, max(1, math.floor(fraction * n_tissue + 0.5))) if n_tissue else 0
    keys = [(_draw_key(seed, tile_id), tile_id) for tile_id in tissue["tile_id"].astype(str)]
    order = sorted(range(n_tissue), key=keys.__getitem__)[:n_sample]
    sample = tissue.iloc[order].reset_index(drop=True)
    sample["sample_rank"] = np.arange(n_sample, dtype=np.int64)
    return sample
