"""Tile grid geometry, the core partition, tissue fractions and the pooled seeded sample."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest

from mk_hspc.czi import Box
from mk_hspc.tiling import TILE_COLUMNS, axis_windows, build_tile_grid, sample_tiles, slide_tile_index
from mk_hspc.tissue.maps import TissueMap


@dataclass(frozen=True)
class Meta:
    name: str
    scenes: tuple[Box, ...]
    pixel_size_um: float = 0.5


def test_axis_windows_partition_exhaustively():
    """For every small geometry: cores tile [start, end) without gaps or overlaps and lie inside windows."""
    for start, length, tile_px in itertools.product((-7, 0, 13), range(1, 40), range(1, 12)):
        for overlap_px in range(tile_px):
            windows = axis_windows(start, length, tile_px, overlap_px)
            covered = np.zeros(length, int)
            for i, (w_start, w_len, c_start, c_len) in enumerate(windows):
                assert w_start == start + i * (tile_px - overlap_px)
                assert 0 < w_len <= tile_px and w_start + w_len <= start + length
                assert c_len > 0 and w_start <= c_start and c_start + c_len <= w_start + w_len
                covered[c_start - start : c_start - start + c_len] += 1
            assert (covered == 1).all(), (start, length, tile_px, overlap_px)
            assert windows[-1][0] + windows[-1][1] == start + length  # the last window reaches the end
            # no window is redundant: without the last one the scene would not be covered
            if len(windows) > 1:
                assert windows[-2][0] + windows[-2][1] < start + length


def test_axis_windows_cores_follow_contract_with_overlap():
    windows = axis_windows(100, 1000, 300, 60)  # stride 240
    starts = [w[0] for w in windows]
    assert starts == [100, 340, 580, 820]
    cores = [(w[2], w[2] + w[3]) for w in windows]
    assert cores == [(100, 370), (370, 610), (610, 850), (850, 1100)]
    assert [w[1] for w in windows] == [300, 300, 300, 280]  # last window clipped to the scene


def test_axis_windows_rejects_bad_parameters():
    with pytest.raises(ValueError, match="overlap_px"):
        axis_windows(0, 100, 10, 10)
    with pytest.raises(ValueError, match="tile_px"):
        axis_windows(0, 100, 0)
    with pytest.raises(ValueError, match="length"):
        axis_windows(0, 0, 10)


def _point_owners(tiles: pd.DataFrame, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """How many tile cores contain each point."""
    inside = (
        (x[:, None] >= tiles["core_x"].to_numpy())
        & (x[:, None] < (tiles["core_x"] + tiles["core_w"]).to_numpy())
        & (y[:, None] >= tiles["core_y"].to_numpy())
        & (y[:, None] < (tiles["core_y"] + tiles["core_h"]).to_numpy())
    )
    return inside.sum(axis=1)


def test_cores_partition_two_dimensional_scenes():
    meta = Meta("s1", (Box(-500, 1200, 1037, 613), Box(4000, -90, 301, 2999)))
    for tile_px, overlap_px in [(100, 0), (128, 32), (97, 13), (5000, 0)]:
        tiles = slide_tile_index(meta, None, tile_px=tile_px, overlap_px=overlap_px)
        for scene, box in enumerate(meta.scenes):
            scene_tiles = tiles[tiles["scene"] == scene]
            assert scene_tiles["core_w"].mul(scene_tiles["core_h"]).sum() == box.w * box.h
            gx, gy = np.meshgrid(np.arange(box.x, box.x + box.w, 7), np.arange(box.y, box.y + box.h, 11))
            assert (_point_owners(scene_tiles, gx.ravel(), gy.ravel()) == 1).all()
            # windows stay inside the scene and contain their core
            assert (scene_tiles["x"] >= box.x).all() and (
                scene_tiles["x"] + scene_tiles["w"] <= box.x + box.w
            ).all()
            assert (scene_tiles["y"] >= box.y).all() and (
                scene_tiles["y"] + scene_tiles["h"] <= box.y + box.h
            ).all()
            assert (scene_tiles["core_x"] >= scene_tiles["x"]).all()
            assert (
                scene_tiles["core_x"] + scene_tiles["core_w"] <= scene_tiles["x"] + scene_tiles["w"]
            ).all()


def test_tile_ids_and_columns():
    meta = Meta("slideA", (Box(0, 0, 2500, 1200),))
    tiles = slide_tile_index(meta, None, tile_px=1000)
    assert list(tiles.columns) == TILE_COLUMNS
    assert tiles["tile_id"].tolist() == [f"slideA_s0_r{r:03d}_c{c:03d}" for r in range(2) for c in range(3)]
    assert tiles["tile_id"].is_unique
    last = tiles.iloc[-1]
    assert (last["x"], last["y"], last["w"], last["h"]) == (2000, 1000, 500, 200)  # clipped at the scene edge
    assert tiles["tissue_fraction"].isna().all() and not tiles["is_tissue"].any()


def test_tissue_fraction_from_map_and_cutoff():
    # 100 x 100 map at downsample 10 from origin (0, 0): left half tissue
    mask = np.zeros((100, 100), bool)
    mask[:, :50] = True
    tissue_map = TissueMap(
        "m", mask, origin_x=0, origin_y=0, downsample=10.0, pixel_size_um=0.5, threshold=0.1
    )
    meta = {"name": "m", "scenes": [{"x": 0, "y": 0, "w": 1000, "h": 1000}]}
    tiles = slide_tile_index(meta, tissue_map, tile_px=300, min_tissue_fraction=0.25)
    by_col = tiles.groupby("col")["tissue_fraction"].agg(["min", "max"])
    # columns of windows: [0,300) [300,600) [600,900) [900,1000): tissue is x < 500
    np.testing.assert_allclose(by_col["min"], [1.0, 2 / 3, 0.0, 0.0])
    np.testing.assert_allclose(by_col["max"], by_col["min"])
    assert (
        tiles.loc[tiles["col"] <= 1, "is_tissue"].all()
        and not tiles.loc[tiles["col"] >= 2, "is_tissue"].any()
    )


def test_window_fraction_is_area_weighted_at_subpixel_edges():
    mask = np.zeros((4, 4), bool)
    mask[1, 1] = True  # covers full-res [110, 120) x [210, 220) at downsample 10, origin (100, 200)
    tissue_map = TissueMap(
        "m", mask, origin_x=100, origin_y=200, downsample=10.0, pixel_size_um=1.0, threshold=0
    )
    fractions = tissue_map.window_fractions(
        np.array([110, 115, 105, 90]), np.array([210, 215, 205, 190]), np.array([10, 10, 10, 20]),
        np.array([10, 10, 10, 20]),
    )  # fmt: skip
    np.testing.assert_allclose(fractions, [1.0, 0.25, 0.25, 0.0])


def test_build_tile_grid_accepts_dict_meta_and_sorts():
    metas = {
        "b": {"name": "b", "scenes": [{"x": 0, "y": 0, "w": 500, "h": 500}]},
        "a": Meta("a", (Box(10, 10, 250, 250),)),
    }
    tiles = build_tile_grid(metas, {}, tile_px=200)
    assert tiles["tile_id"].tolist() == sorted(tiles["tile_id"])
    assert set(tiles["slide"]) == {"a", "b"} and len(tiles) == 4 + 9


def _study_index(tissue_tiles_per_slide: dict[str, int], non_tissue_per_slide: int = 5) -> pd.DataFrame:
    rows = []
    for slide, n_tissue in tissue_tiles_per_slide.items():
        for i in range(n_tissue + non_tissue_per_slide):
            rows.append({"tile_id": f"{slide}_s0_r000_c{i:03d}", "slide": slide, "is_tissue": i < n_tissue})
    return pd.DataFrame(rows)


def test_sample_is_deterministic_and_order_independent():
    index = _study_index({"a": 40, "b": 70, "c": 9})
    first = sample_tiles(index, fraction=0.1, seed=7)
    shuffled = index.sample(frac=1.0, random_state=3)
    second = sample_tiles(shuffled, fraction=0.1, seed=7)
    assert first["tile_id"].tolist() == second["tile_id"].tolist()
    assert first["sample_rank"].tolist() == list(range(len(first)))
    assert len(first) == round(0.1 * 119) and first["is_tissue"].all()


def test_sample_changes_with_seed_and_nests_across_fractions():
    index = _study_index({"a": 100, "b": 100})
    draws = {seed: tuple(sample_tiles(index, 0.1, seed)["tile_id"]) for seed in range(5)}
    assert len(set(draws.values())) == 5
    small = sample_tiles(index, 0.1, 3)["tile_id"].tolist()
    large = sample_tiles(index, 0.3, 3)["tile_id"].tolist()
    assert large[: len(small)] == small


def test_sample_ignores_non_tissue_tiles():
    index = _study_index({"a": 30, "b": 30}, non_tissue_per_slide=0)
    padded = _study_index({"a": 30, "b": 30}, non_tissue_per_slide=50)
    assert sample_tiles(index, 0.2, 1)["tile_id"].tolist() == sample_tiles(padded, 0.2, 1)["tile_id"].tolist()


def test_sample_is_pooled_not_per_slide():
    counts = {"big": 400, "small": 40, "tiny": 7}
    index = _study_index(counts)
    per_slide = pd.DataFrame([sample_tiles(index, 0.1, seed)["slide"].value_counts() for seed in range(60)])
    per_slide = per_slide.reindex(columns=list(counts)).fillna(0)
    # total is pooled: round(0.1 * 447) = 45 every time
    assert (per_slide.sum(axis=1) == 45).all()
    # a slide with 10x the tissue tiles gets about 10x the sampled tiles on average ...
    ratio = per_slide["big"].mean() / per_slide["small"].mean()
    assert 7.0 < ratio < 14.0
    # ... but not a fixed per-slide quota: counts vary between seeds and often differ from round(0.1 * n)
    assert per_slide["small"].nunique() > 2
    quota = {slide: round(0.1 * n) for slide, n in counts.items()}
    assert (per_slide != pd.Series(quota)).any(axis=1).mean() > 0.5


def test_sample_edge_cases():
    index = _study_index({"a": 3, "b": 2})
    assert sample_tiles(index, 1.0, 0)["tile_id"].sort_values().tolist() == sorted(
        index.loc[index["is_tissue"], "tile_id"]
    )
    assert len(sample_tiles(index, 0.01, 0)) == 1  # at least one tile when there is tissue
    assert sample_tiles(_study_index({"a": 0}), 0.5, 0).empty
    with pytest.raises(ValueError, match="fraction"):
        sample_tiles(index, 0.0, 0)
    with pytest.raises(ValueError, match="duplicate"):
        sample_tiles(pd.concat([index, index]), 0.5, 0)


@pytest.mark.parametrize("pixel_size_um", [0.1725, 0.22, 0.25, 0.5, 0.11])
@pytest.mark.parametrize("tile_px", [1000, 2000, 3000])
def test_the_tile_step_is_aligned_for_binning_segmenters(pixel_size_um: float, tile_px: int) -> None:
    """The step between tiles is a multiple of 24 px, so a segmenter binning 2x, 3x, 4x, 6x or 8x bins
    neighbouring tiles on one grid, and the overlap still holds a 60 µm cell plus its margin."""
    from mk_hspc.tiling import OVERLAP_MARGIN_PX, STEP_ALIGN_PX, overlap_px_for

    needed = int(np.ceil(60.0 / pixel_size_um - 1e-9)) + OVERLAP_MARGIN_PX
    if 2 * (needed + STEP_ALIGN_PX) > tile_px:  # 60 µm at 0.11 µm/px is over half a 1000 px tile
        with pytest.raises(ValueError, match="too large"):
            overlap_px_for(60.0, pixel_size_um, tile_px)
        return
    overlap = overlap_px_for(60.0, pixel_size_um, tile_px)
    assert (tile_px - overlap) % STEP_ALIGN_PX == 0
    assert needed <= overlap < needed + STEP_ALIGN_PX
