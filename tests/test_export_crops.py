"""The fast crop path: histogram percentiles, shrinking, batched crops, stored outlines drawn on the crops,
and the tile workers -> writer pipeline of the site (errors naming the tile and the stage)."""

from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import shapely

from mk_hspc.engine.prefetch import StageError
from mk_hspc.export import crops as crops_module
from mk_hspc.export.build import plan_site, write_site
from mk_hspc.export.crops import (
    CropSpec,
    crop_box,
    crop_side_px,
    crops_region,
    cut_padded,
    display_outlines,
    histogram_percentile,
    normalisation_limits,
    shrink,
    stretch_table,
    tile_crops,
)
from mk_hspc.tile_store import label_outlines, read_tile_result
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


def drawn_points(points: str) -> list[tuple[int, int]]:
    return sorted(map(tuple, np.array(points.split(), dtype=int).reshape(-1, 2).tolist()))


def test_display_outlines_move_the_stored_outline_onto_each_crop() -> None:
    labels = np.zeros((60, 60), np.int32)
    labels[4:10, 3:12] = 1
    labels[30:50, 30:50] = 3  # label 2 has no pixels
    outlines = label_outlines(labels)
    # scale 1: the boundary pixels' indices, less the crop's origin
    same = display_outlines(outlines, np.array([1, 2]), np.array([[0, 0], [0, 0]]), side=20, output_px=20)
    assert drawn_points(same[0]) == [(3, 4), (3, 9), (11, 4), (11, 9)] and same[1] == ""
    moved = display_outlines(outlines, np.array([1]), np.array([[2, -3]]), side=20, output_px=20)
    assert drawn_points(moved[0]) == [(1, 7), (1, 12), (9, 7), (9, 12)]
    # halved: pixel i's centre (i + .5) lands at (i + .5) / 2 of the stored image, pixel index that - .5
    half = display_outlines(outlines, np.array([3]), np.array([[20, 20]]), side=40, output_px=20)
    assert drawn_points(half[0]) == [(5, 5), (5, 14), (14, 5), (14, 14)]  # pixels 30..49 -> 5..14
    # a cell larger than its crop is outlined along the crop's edge, inside the image
    clipped = display_outlines(outlines, np.array([3]), np.array([[35, 35]]), side=10, output_px=10)
    assert drawn_points(clipped[0]) == [(0, 0), (0, 9), (9, 0), (9, 9)]
    # a label the tile store does not have (the cells table and the store disagree) is named, not mis-drawn
    for wrong in (0, 4):
        with pytest.raises(ValueError, match=rf"labels \[{wrong}\] are not among the tile store's 1..3"):
            display_outlines(outlines, np.array([1, wrong]), np.zeros((2, 2), int), side=20, output_px=20)


def test_a_cell_larger_than_its_crop_is_outlined_along_the_crop_edge_not_across_its_corners() -> None:
    """A diamond-shaped cell whose edges cross the crop's corners: its polygon is cut to the image, not each
    point moved into it (which drew a diamond inside the square, 4,900 px² of the 8,750 in the crop)."""
    rows, cols = np.mgrid[0:300, 0:300]
    labels = (np.abs(cols - 150) + np.abs(rows - 150) <= 75).astype(np.int32)
    origin = np.array([[100, 100]])  # a 100 px crop centred on the cell: its corners are outside the cell
    drawn = display_outlines(label_outlines(labels), np.array([1]), origin, side=100, output_px=100)[0]
    polygon = shapely.Polygon(np.array(drawn.split(), float).reshape(-1, 2))
    in_crop = int(labels[100:200, 100:200].sum())  # 8,750
    # through the boundary pixels' centres: the cell less about half its boundary's pixels
    assert 0.97 * in_crop < polygon.area <= in_crop
    assert polygon.bounds == (0.0, 0.0, 99.0, 99.0)


def test_crops_region_is_the_union_of_the_crop_boxes() -> None:
    rng = np.random.default_rng(5)
    mk, hspc = CropSpec(60.0, 128), CropSpec(20.0, 80)
    cells = {
        spec: [
            {"centroid_x_px": float(x), "centroid_y_px": float(y)} for x, y in rng.uniform(-500, 3000, (n, 2))
        ]
        for spec, n in ((mk, 3), (hspc, 40))
    }
    boxes = []
    for spec, records in cells.items():
        side = crop_side_px(spec.crop_um, 0.1725, spec.output_px)
        boxes += [(*crop_box(c["centroid_x_px"], c["centroid_y_px"], side), side) for c in records]
    x0, y0 = min(b[0] for b in boxes), min(b[1] for b in boxes)
    x1, y1 = max(b[0] + b[2] for b in boxes), max(b[1] + b[2] for b in boxes)
    assert crops_region([(records, spec) for spec, records in cells.items()], 0.1725) == (
        x0,
        y0,
        x1 - x0,
        y1 - y0,
    )
    with pytest.raises(ValueError, match="no cells"):
        crops_region([([], mk)], 0.1725)


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
        outlines = label_outlines(result.labels[cell_type])
        crops = tile_crops(
            rgb, (x, y), outlines, records, result.pixel_size_um, spec, limits=limits,
            image_format="jpeg", quality=95,
        )  # fmt: skip
        assert [c.cell_id for c in crops] == cells["cell_id"].tolist()
        for crop, cell in zip(crops, records, strict=True):
            side = crop_side_px(spec.crop_um, result.pixel_size_um, spec.output_px)
            x0, y0 = crop_box(cell["centroid_x_px"], cell["centroid_y_px"], side)
            one = display_outlines(outlines, np.array([cell["label"]]), np.array([[x0 - x, y0 - y]]), side,
                                   spec.output_px)  # fmt: skip
            assert crop.outline == one[0] != ""
            expected = cv2.LUT(shrink(cut_padded(rgb, x0 - x, y0 - y, side, 255), spec.output_px), table)
            decoded = cv2.imdecode(np.frombuffer(crop.image, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]
            assert np.abs(decoded.astype(float) - expected).mean() < 3  # JPEG at quality 95


def test_tile_crops_refuses_an_unknown_format() -> None:
    with pytest.raises(ValueError, match="png"):
        tile_crops(
            np.zeros((8, 8, 3), np.uint8), (0, 0), label_outlines(np.zeros((8, 8), np.int32)), [], 1.0,
            CropSpec(4, 4),
            limits=(np.zeros(3), np.ones(3)), image_format="png",
        )  # fmt: skip


def test_the_store_hands_the_outlines_of_the_cell_types_asked(study: Study) -> None:
    tile_id = next(iter(study.store.tiles))
    read = study.store.read_outlines(tile_id, ["hspc", "mk"])
    expected = read_tile_result(study.store.root, tile_id)
    assert (read.tile_id, read.slide, read.window) == (tile_id, expected.slide, expected.window)
    assert read.pixel_size_um == expected.pixel_size_um and list(read.outlines) == ["hspc", "mk"]
    for name in ("hspc", "mk"):
        traced = label_outlines(expected.labels[name])
        assert np.array_equal(read.outlines[name].xy, traced.xy)
        assert np.array_equal(read.outlines[name].start, traced.start)
    with pytest.raises(KeyError, match="not in the tile store"):
        study.store.read_outlines("nope_s0_r000_c000", ["mk"])


def test_site_pipeline_names_the_failing_tile_and_closes_the_slides(study: Study, tmp_path: Path) -> None:
    closed: list[str] = []
    bad_tile = sorted(study.store.tiles)[1]
    bad_cells = study.cells[study.cells["tile_id"] == bad_tile]
    bad_region = crops_region(
        [
            (
                bad_cells[bad_cells["cell_type"] == cell_type].to_dict("records"),
                CropSpec(c["crop_um"], c["output_px"]),
            )
            for cell_type, c in EXPORT_PARAMS["cell_types"].items()
        ],
        read_tile_result(study.store.root, bad_tile).pixel_size_um,
    )

    class Slide:
        def __init__(self, name: str) -> None:
            self.name, self.slide = name, study.loaders()[name]()

        def read_region(self, x: int, y: int, w: int, h: int) -> np.ndarray:
            if (x, y, w, h) == bad_region:
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


def test_site_pipeline_names_a_tile_whose_crops_fail(
    study: Study, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tile workers read and cut in one engine stage; an error still names its own part and tile."""
    bad_tile = sorted(study.store.tiles)[0]
    real = crops_module.tile_crops

    def failing(tile_rgb, window_xy, *args, **kwargs):
        if tuple(kwargs["outlines_xy"]) == read_tile_result(study.store.root, bad_tile).window[:2]:
            raise ValueError("no room for crops")
        return real(tile_rgb, window_xy, *args, **kwargs)

    monkeypatch.setattr("mk_hspc.export.build.tile_crops", failing)
    expected = f"process failed for {bad_tile}: ValueError: no room for crops"
    with pytest.raises(StageError, match=re.escape(expected)):
        write_site(plan_site(study.cells, study.store, study.loaders(), EXPORT_PARAMS), tmp_path / "site")


def test_a_reused_folder_that_cannot_be_listed_is_named_not_a_tiles_write(
    study: Study, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unreadable(folder: Path, paths) -> None:
        raise PermissionError("listing failed")

    monkeypatch.setattr("mk_hspc.export.build.reusable_files", unreadable)
    folder = tmp_path / "site"
    expected = f"listing the reused folder failed for {folder}: PermissionError: listing failed"
    with pytest.raises(StageError, match=re.escape(expected)):
        write_site(plan_site(study.cells, study.store, study.loaders(), EXPORT_PARAMS), folder)
    empty = plan_site(study.cells.iloc[:0], study.store, study.loaders(), EXPORT_PARAMS)
    with pytest.raises(StageError, match=re.escape(expected)):
        write_site(empty, folder)


def test_site_pipeline_records_its_stages(study: Study, tmp_path: Path) -> None:
    content = plan_site(study.cells, study.store, study.loaders(), {**EXPORT_PARAMS, "threads": 1})
    stats = write_site(content, tmp_path / "site")
    assert stats["tiles"] == len(study.store.tiles) and stats["crops"] == len(study.cells)
    assert set(stats["busy_s"]) == set(stats["cpu_s"]) == {"read", "process", "write", "pages"}
    assert content.stats == stats


def test_the_heap_is_frozen_for_the_collector_only_while_the_site_is_written(tmp_path: Path) -> None:
    """Full collections walking the session's objects stalled the tile workers; they are frozen for the
    write and given back afterwards, also when the write fails."""
    import gc

    from mk_hspc.export.site import SiteContent

    seen = []

    def render(outlines: dict) -> dict[str, bytes]:
        seen.append(gc.get_freeze_count())
        return {"cells.json": b'{"cells": {}}'}

    before = gc.get_freeze_count()
    write_site(SiteContent(tiles=[], render=render), tmp_path / "site")
    assert seen[0] > before
    assert gc.get_freeze_count() == before

    def failing(outlines: dict) -> dict[str, bytes]:
        raise RuntimeError("render failed")

    with pytest.raises(RuntimeError, match="render failed"):
        write_site(SiteContent(tiles=[], render=failing), tmp_path / "other")
    assert gc.get_freeze_count() == before


def test_overlapping_site_writes_keep_the_heap_frozen_until_the_last_ends() -> None:
    import gc

    from mk_hspc.export import build

    before = gc.get_freeze_count()
    with build._heap_frozen():
        frozen = gc.get_freeze_count()
        with build._heap_frozen():  # a second site written meanwhile (another thread)
            pass
        assert gc.get_freeze_count() == frozen  # the first write's objects stay frozen
    assert gc.get_freeze_count() == before
