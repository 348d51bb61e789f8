"""Consolidate the per-tile store into the cells table, and fetch wide feature matrices on demand.

The cells table (one row per cell, joined everywhere on the stable ``cell_id``) carries positions, sizes,
scores and the narrow morphology features; learned embeddings (hundreds of columns) stay in the tile
files and are loaded for the cells a later stage asks for.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd

from mk_hspc.engine.tile_work import CELL_COLUMNS
from mk_hspc.tile_store import read_tile_result, tile_path

LEADING_COLUMNS = (
    "cell_id",
    "slide",
    "tile_id",
    "cell_type",
    "label",
    "centroid_x_um",
    "centroid_y_um",
    "area_um2",
    "score",
)
TABLE_COLUMNS = LEADING_COLUMNS + tuple(c for c in CELL_COLUMNS if c not in LEADING_COLUMNS)


def build_cells_table(
    store_dir: str | Path,
    tile_sample: pd.DataFrame,
    *,
    table_features: Sequence[str] = ("morphology",),
    params_hash: str | None = None,
) -> pd.DataFrame:
    """One row per cell of the sampled tiles, in tile-id then cell order (deterministic).

    Args:
        store_dir: root of the tile store written by ``segment_tiles``.
        tile_sample: the tiles to include (``tile_id`` and ``slide`` columns).
        table_features: feature extractors whose columns join the table (narrow ones only).
        params_hash: when given, every tile file must have been produced with it.

    Raises:
        FileNotFoundError: some tiles have no file yet (lists the first few).
        ValueError: a tile file was produced with other parameters than ``params_hash``.
    """
    tiles = tile_sample.loc[:, ["tile_id", "slide"]].astype(str).sort_values("tile_id")
    missing = [
        tid for tid, slide in tiles.itertuples(index=False) if not tile_path(store_dir, tid, slide).exists()
    ]
    if missing:
        raise FileNotFoundError(f"{len(missing)} tile(s) have no result in {store_dir}, e.g. {missing[:5]}")
    frames = []
    for tile_id, slide in tiles.itertuples(index=False):
        result = read_tile_result(
            store_dir, tile_id, slide=slide, include_labels=False, feature_names=table_features
        )
        if params_hash is not None and result.params_hash != params_hash:
            raise ValueError(
                f"tile {tile_id} was produced with params {result.params_hash}, expected {params_hash}"
            )
        if len(result.cells) == 0:
            continue
        cells = result.cells.assign(slide=slide, tile_id=tile_id)
        for name in table_features:
            if name in result.features:
                cells = cells.join(result.features[name], on="cell_id")
        frames.append(cells)
    if not frames:
        return pd.DataFrame({name: [] for name in TABLE_COLUMNS})
    table = pd.concat(frames, ignore_index=True)
    ordered = [c for c in TABLE_COLUMNS if c in table.columns]
    return table[ordered + [c for c in table.columns if c not in ordered]]


def load_features(
    store_dir: str | Path,
    extractor_name: str,
    cell_ids: Iterable[str] | None = None,
    tile_ids: Iterable[str] | None = None,
) -> pd.DataFrame:
    """Feature matrix of one extractor, indexed by ``cell_id``, for given cells or for whole tiles.

    Args:
        store_dir: root of the tile store.
        extractor_name: e.g. ``"resnet50"``; its columns are ``"resnet50_0000", ...``.
        cell_ids: cells to fetch (rows come back in this order); mutually exclusive with ``tile_ids``.
        tile_ids: tiles whose cells to fetch (rows in tile-id then cell order).

    Raises:
        KeyError: a requested cell is not in the store, or a tile lacks the extractor's features.
    """
    if (cell_ids is None) == (tile_ids is None):
        raise ValueError("pass exactly one of cell_ids or tile_ids")
    wanted_cells = None if cell_ids is None else [str(c) for c in cell_ids]
    tiles = (
        sorted({tile_of_cell(c) for c in wanted_cells}) if wanted_cells is not None else sorted(set(tile_ids))
    )
    frames = []
    for tile_id in tiles:
        result = read_tile_result(store_dir, tile_id, include_labels=False, feature_names=[extractor_name])
        if extractor_name not in result.features:
            raise KeyError(f"tile {tile_id} has no {extractor_name!r} features")
        frames.append(result.features[extractor_name])
    features = pd.concat(frames) if frames else pd.DataFrame(index=pd.Index([], name="cell_id"))
    if wanted_cells is None:
        return features
    absent = [c for c in wanted_cells if c not in features.index]
    if absent:
        raise KeyError(f"{len(absent)} cell(s) not in the store, e.g. {absent[:5]}")
    return features.loc[wanted_cells]


def tile_of_cell(cell_id: str) -> str:
    """``tile_id`` part of ``f"{tile_id}_{cell_type}_{label:05d}"`` (cell types contain no ``_``)."""
    parts = cell_id.rsplit("_", 2)
    if len(parts) != 3 or not parts[2].isdigit():
        raise ValueError(f"cell id {cell_id!r} does not follow '{{tile_id}}_{{cell_type}}_{{label:05d}}'")
    return parts[0]
