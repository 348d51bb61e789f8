"""The fast crop path: histogram percentiles, shrinking, batched crops and outlines, label reads into reused
arrays, and the reader -> cutter -> writer pipeline of the site (order of pages, errors naming the tile)."""

from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from mk_hspc.engine.prefetch import StageError
from mk_hspc.export import crops as crops_module
from mk_hspc.export.build import ArrayPool, plan_site, write_site
from mk_hspc.export.crops import (
    CropSpec,
    crop_box,
    crop_side_px,
    cut_padded,
    display_outline,
    histogram_percentile,
    mask_outline,
    normalisation_limits,
    shrink,
    stretch_table,
    tile_crops,
)
from mk_hspc.tile_store import TileResult, read_tile_labels, read_tile_result, write_tile_result
from tests.annotation_fixtures import EXPORT_PARAMS, Study, make_study


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Study:
    return make_study(tmp_path_factory.mktemp("study"))


def tissue_like(seed: int, size: int = 400) -> np.ndarray:
    """Smooth random colour texture with sharp-edged dark blobs (nuclei), uint8 RGB."""
    rng = np.random.default_rng(seed)
    image = cv2.GaussianBlur(rng.integers(120, 255, (size, size, 3)).astype(np.uint8), (0, 0), 3)
    for _ in range(30):
        centre = tuple(int(v) for v in rng.integers(0, size, 2))
        cv2.circle(image, centre, int(rng.integers(3, 15)), (60, 30, 110), -1)
    return image


@pytest.mark.parametrize("pct", [0.0, 0.2, 1.0, 37.5, 50.0, 99.5, 100.0])
def test_histogram_percentile_equals_numpy(pct: float) -> None:
    values = np.random.default_rng(3).integers(0, 256, 10_001).astype(np.uint8)
    counts = np.bincount(values, minlength=256)
    assert histogram_percentile(counts, pct) == pytest.approx(np.percentile(values, pct), abs=1e-9)


def test_normalisation_limits_equal_numpy_on_the_subsample() -> None:
    image = tissue_like(1, 1200)
    low, high = normalisation_limits(image, 0.2, 99.5)
    sample = image[::2, ::2].reshape(-1, 3).astype(np.float32)  # step 2 for 1.44 Mpx
    assert np.allclose(low, np.percentile(sample, 0.2, axis=0))
    assert np.allclose(high, np.percentile(sample, 99.5, axis=0))


def test_histogram_percentile_refuses_an_empty_sample() -> None:
    with pytest.raises(ValueError, match="empty"):
        histogram_percentile(np.zeros(256, np.int64), 50)


@pytest.mark.parametrize(("side", "output_px"), [(348, 128), (116, 80), (240, 64), (80, 80), (50, 64)])
def test_shrink_is_close_to_the_area_average(side: int, output_px: int) -> None:
    image = tissue_like(side)[:side, :side]
    out = np.empty((output_px, output_px, 3), np.uint8)
    result = shrink(image, output_px, dst=out)
    assert result.shape == (output_px, output_px, 3) and np.shares_memory(result, out)
    reference = cv2.resize(image, (output_px, output_px), interpolation=cv2.INTER_AREA)
    difference = np.abs(out.astype(float) - reference.astype(float))
    assert difference.mean() < 2.0  # grey levels out of 255
    assert np.percentile(difference, 99) < 30  # only where a nucleus edge falls between pixels


def test_shrink_trims_a_side_that_is_no_multiple_evenly() -> None:
    """233 px to 64: reduced by 3 from the central 231 px (1 px dropped at each edge), then bilinear."""
    image = tissue_like(5)[:233, :233]
    reference = cv2.resize(image[1:232, 1:232], (64, 64), interpolation=cv2.INTER_AREA)
    difference = np.abs(shrink(image, 64).astype(float) - reference.astype(float))
    assert difference.mean() < 2.0 and np.percentile(difference, 99) < 30


def test_mask_outline_is_the_pixel_boundary_as_svg_points() -> None:
    mask = np.zeros((20, 20), np.uint8)
    mask[4:10, 3:12] = 1
    points = np.array(mask_outline(mask).split(), dtype=int).reshape(-1, 2)
    assert sorted(map(tuple, points)) == [(3, 4), (3, 9), (11, 4), (11, 9)]
    assert mask_outline(np.zeros((5, 5), np.uint8)) == ""


@pytest.mark.parametrize("batch", [64, 2])
def test_batched_crops_match_the_per_cell_path(
    study: Study, batch: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Crops cut in batches equal those cut cell by cell, including cells at the tile's edge."""
    monkeypatch.setattr(crops_module, "CROP_BATCH", batch)  # 2: three HSPCs span two batches
    tile_id = next(iter(study.store.tiles))
    result = read_tile_result(study.store.root, tile_id)
    x, y, w, h = result.window
    with study.loaders()[result.slide]() as slide:
        rgb = slide.read_region(x, y, w, h)
    limits = normalisation_limits(rgb, 1.0, 99.5)
    table = stretch_table(*limits)
    for cell_type, conf in EXPORT_PARAMS["cell_types"].items():
        spec = CropSpec(conf["crop_um"], conf["output_px"])
        cells = study.cells[(study.cells["tile_id"] == tile_id) & (study.cells["cell_type"] == cell_type)]
        records = cells.to_dict("records")
        crops = tile_crops(
            rgb, (x, y), result.labels[cell_type], records, result.pixel_size_um, spec, limits=limits,
            image_format="jpeg", quality=95,
        )  # fmt: skip
        assert [c.cell_id for c in crops] == cells["cell_id"].tolist()
        for crop, cell in zip(crops, records, strict=True):
            side = crop_side_px(spec.crop_um, result.pixel_size_um, spec.output_px)
            x0, y0 = crop_box(cell["centroid_x_px"], cell["centroid_y_px"], side)
            mask = cut_padded(result.labels[cell_type], x0 - x, y0 - y, side, 0) == cell["label"]
            assert crop.outline == display_outline(mask, spec.output_px) != ""
            expected = cv2.LUT(shrink(cut_padded(rgb, x0 - x, y0 - y, side, 255), spec.output_px), table)
            decoded = cv2.imdecode(np.frombuffer(crop.image, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]
            assert np.abs(decoded.astype(float) - expected).mean() < 3  # JPEG at quality 95


def test_tile_crops_refuses_an_unknown_format() -> None:
    with pytest.raises(ValueError, match="png"):
        tile_crops(
            np.zeros((8, 8, 3), np.uint8), (0, 0), np.zeros((8, 8), np.int32), [], 1.0, CropSpec(4, 4),
            limits=(np.zeros(3), np.ones(3)), image_format="png",
        )  # fmt: skip


def test_labels_are_read_into_the_arrays_given(study: Study) -> None:
    tile_id = next(iter(study.store.tiles))
    given: list[np.ndarray] = []

    def allocate(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        given.append(np.full(shape, -7, dtype))
        return given[-1]

    read = study.store.read_labels(tile_id, ["hspc", "mk"], allocate=allocate)
    expected = read_tile_result(study.store.root, tile_id)
    assert (read.tile_id, read.slide, read.window) == (tile_id, expected.slide, expected.window)
    assert read.pixel_size_um == expected.pixel_size_um
    assert [read.labels["hspc"] is given[0], read.labels["mk"] is given[1]] == [True, True]
    for name in ("hspc", "mk"):
        assert np.array_equal(read.labels[name], expected.labels[name])
    with pytest.raises(KeyError, match="no label image 'blob'"):
        read_tile_labels(study.store.root, tile_id, ["blob"])
    with pytest.raises(KeyError, match="not in the tile store"):
        study.store.read_labels("nope_s0_r000_c000", ["mk"])


def test_array_pool_lends_returned_arrays_again() -> None:
    pool = ArrayPool()
    first = pool.take((4, 5), np.int32)
    pool.give(first)
    assert pool.take((4, 5), np.int32) is first
    assert pool.take((4, 5), np.int32) is not first  # none free: a new one
    assert pool.take((4, 5), np.uint8).dtype == np.uint8
    pool.give(first)
    pool.clear()
    assert len(pool) == 0


def test_site_pipeline_names_the_failing_tile_and_closes_the_slides(study: Study, tmp_path: Path) -> None:
    closed: list[str] = []
    bad_tile = sorted(study.store.tiles)[1]

    class Slide:
        def __init__(self, name: str) -> None:
            self.name, self.slide = name, study.loaders()[name]()

        def read_region(self, x: int, y: int, w: int, h: int) -> np.ndarray:
            if (x, y, w, h) == read_tile_result(study.store.root, bad_tile).window:
                raise OSError("disk on fire")
            return self.slide.read_region(x, y, w, h)

        def close(self) -> None:
            closed.append(self.name)
            self.slide.close()

    loaders = {name: (lambda n=name: Slide(n)) for name in study.slide_meta}
    with pytest.raises(StageError, match=re.escape(f"read failed for {bad_tile}: OSError: disk on fire")):
        write_site(plan_site(study.cells, study.store, loaders, EXPORT_PARAMS), tmp_path / "site")
    assert closed and sorted(closed) == sorted(set(closed))
    assert not (tmp_path / "site" / "cells.json").exists()  # no pages for a site with missing crops


def test_site_pipeline_records_its_stages(study: Study, tmp_path: Path) -> None:
    content = plan_site(study.cells, study.store, study.loaders(), {**EXPORT_PARAMS, "threads": 1})
    stats = write_site(content, tmp_path / "site")
    assert stats["tiles"] == len(study.store.tiles) and stats["crops"] == len(study.cells)
    assert set(stats["busy_s"]) == set(stats["cpu_s"]) == {"read", "process", "write", "pages"}
    assert content.stats == stats


def test_labels_read_into_a_used_array_hold_zeros_where_no_chunk_was_written(tmp_path: Path) -> None:
    """A reused array still holds the previous tile's labels; chunks never written must read back as 0."""
    labels = np.zeros((64, 48), np.int32)
    labels[2:10, 3:12] = 5  # one chunk of 16 x 16 written, the others all background (never stored)
    cells = study_cells_stub()
    result = TileResult(
        "S_s0_r000_c000", "S", (0, 0, 48, 64), (0, 0, 48, 64), 0.5, "h", {"mk": labels}, cells
    )
    write_tile_result(tmp_path, result, fsync=False, label_chunk_px=16)
    used = np.full((64, 48), 9, np.int32)
    read = read_tile_labels(tmp_path, "S_s0_r000_c000", ["mk"], allocate=lambda shape, dtype: used)
    assert read.labels["mk"] is used and np.array_equal(used, labels)


def study_cells_stub() -> pd.DataFrame:
    from mk_hspc.engine.tile_work import CELL_COLUMNS

    return pd.DataFrame({name: [] for name in CELL_COLUMNS})
