"""Tissue maps: score, pooled threshold, hole filling, speck removal, thumbnails, file form, figure, demo truth."""

from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from mk_hspc.czi import Box, CziSlideError
from mk_hspc.tiling import build_tile_grid
from mk_hspc.tissue import (
    TissueMap,
    build_tissue_maps,
    calibrate_tissue_threshold,
    read_slide_thumbnail,
    score_histogram,
    slide_tissue_score,
    threshold_from_histogram,
    tissue_mask,
    tissue_overlay_figure,
    tissue_score_thumbnail,
)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
GLASS_RGB = (238, 238, 242)


@dataclass(frozen=True)
class Meta:
    name: str
    pixel_size_um: float
    bbox: Box
    scenes: tuple[Box, ...]


@dataclass
class FakeSlide:
    """An in-memory slide: a full-resolution canvas at an absolute origin; unscanned areas read black."""

    name: str
    canvas: np.ndarray
    origin_x: int = 0
    origin_y: int = 0
    pixel_size_um: float = 2.0
    scenes: tuple[Box, ...] | None = None
    scales_read: list[float] = field(default_factory=list)

    @property
    def meta(self) -> Meta:
        h, w = self.canvas.shape[:2]
        bbox = Box(self.origin_x, self.origin_y, w, h)
        return Meta(self.name, self.pixel_size_um, bbox, self.scenes or (bbox,))

    def read_region(self, x: int, y: int, w: int, h: int, scale: float = 1.0) -> np.ndarray:
        self.scales_read.append(scale)
        out_h, out_w = round(h * scale), round(w * scale)
        rows = y - self.origin_y + np.minimum((np.arange(out_h) + 0.5) / scale, h - 1).astype(int)
        cols = x - self.origin_x + np.minimum((np.arange(out_w) + 0.5) / scale, w - 1).astype(int)
        out = np.zeros((out_h, out_w, 3), np.uint8)
        row_ok = (rows >= 0) & (rows < self.canvas.shape[0])
        col_ok = (cols >= 0) & (cols < self.canvas.shape[1])
        out[np.ix_(row_ok, col_ok)] = self.canvas[np.ix_(rows[row_ok], cols[col_ok])]
        return out


def _disc(shape: tuple[int, int], center_rc: tuple[float, float], radius_px: float) -> np.ndarray:
    rr, cc = np.ogrid[: shape[0], : shape[1]]
    return (rr - center_rc[0]) ** 2 + (cc - center_rc[1]) ** 2 <= radius_px**2


def _paint(truth: np.ndarray, fat: np.ndarray, specks: np.ndarray, seed: int) -> np.ndarray:
    """H&E-like canvas: pink eosin with purple nuclei where ``truth``, white fat, dark specks, grey glass."""
    rng = np.random.default_rng(seed)
    shape = truth.shape
    canvas = np.empty((*shape, 3), np.float32)
    canvas[:] = GLASS_RGB
    tissue = truth & ~fat
    canvas[tissue] = (222, 150, 196)
    nuclei = tissue & (rng.random(shape) < 0.25)
    canvas[nuclei] = (95, 60, 150)
    canvas[fat] = (244, 242, 246)
    canvas[specks] = (60, 50, 70)
    canvas += rng.normal(0.0, 3.0, canvas.shape)
    return np.clip(canvas, 0, 255).astype(np.uint8)


def _marrow_slide(
    name: str, seed: int, shape=(1200, 1600), origin=(-3000, 5000)
) -> tuple[FakeSlide, np.ndarray]:
    """A slide with an irregular tissue blob, fat vacuoles, one large enclosed glass lake and two dust specks.

    Returns the slide and its true tissue mask at full resolution (fat counts as tissue, the lake does not).
    """
    rng = np.random.default_rng(seed)
    rr, cc = np.ogrid[: shape[0], : shape[1]]
    radius = 430 + 40 * np.sin(5 * np.arctan2(rr - 600, cc - 800))
    truth = (rr - 600) ** 2 + ((cc - 800) * 0.8) ** 2 <= radius**2
    lake = _disc(shape, (600, 800), 260)  # 520 px = 1040 um across: far above the hole-filling limit
    truth &= ~lake
    fat = np.zeros(shape, bool)
    for _ in range(40):  # 30-50 um vacuoles (15-25 px) inside the tissue ring
        angle = rng.uniform(0, 2 * np.pi)
        dist = rng.uniform(300, 360)
        center = (600 + dist * np.sin(angle), 800 + dist * np.cos(angle) / 0.8)
        fat |= _disc(shape, center, rng.uniform(8, 12))
    fat &= truth
    specks = _disc(shape, (80, 120), 20) | _disc(shape, (1100, 1500), 25)  # < 20 000 um2 each at 2 um/px
    return FakeSlide(name, _paint(truth, fat, specks, seed), *origin), truth


def test_score_is_low_on_glass_high_on_tissue_and_nan_where_unscanned():
    slide, truth = _marrow_slide("a", 0)
    rgb = slide.canvas.copy()
    rgb[:50, :50] = 0  # never scanned: the reader fills black
    score = tissue_score_thumbnail(rgb, smooth_sigma_px=0)
    glass = ~truth & np.isfinite(score)
    glass[:100, :200] = False
    assert np.nanmedian(score[glass]) < 0.05
    assert np.median(score[truth]) > 0.15
    assert np.isnan(score[:50, :50]).all() and np.isfinite(score[50:, 50:]).all()


def test_pooled_threshold_works_where_per_slide_otsu_fails():
    marrow, marrow_truth = _marrow_slide("marrow", 1)
    full = np.ones((600, 800), bool)
    all_tissue = _paint(full, np.zeros_like(full), np.zeros_like(full), seed=2)
    empty = _paint(~full, np.zeros_like(full), np.zeros_like(full), seed=3)
    scores = {
        "marrow": tissue_score_thumbnail(marrow.canvas),
        "all_tissue": tissue_score_thumbnail(all_tissue),
        "empty": tissue_score_thumbnail(empty),
    }
    pooled = calibrate_tissue_threshold(scores.values())
    own = {name: threshold_from_histogram(score_histogram(score)) for name, score in scores.items()}
    tissue_share = {name: (score > pooled).mean() for name, score in scores.items()}
    assert tissue_share["all_tissue"] > 0.99
    assert tissue_share["empty"] < 0.01
    assert (scores["marrow"] > pooled)[marrow_truth].mean() > 0.95  # the rest is white fat, filled later
    # per-slide Otsu splits the all-tissue slide in two and calls glass noise tissue on the empty one
    assert (scores["all_tissue"] > own["all_tissue"]).mean() < 0.9
    assert (scores["empty"] > own["empty"]).mean() > 0.1
    # the pooled threshold equals the one from summed histograms, independent of slide order
    assert calibrate_tissue_threshold(reversed(list(scores.values()))) == pytest.approx(pooled)


@dataclass
class UnreadableSlide(FakeSlide):
    """A slide whose metadata opens but whose pixels fail to decode (a corrupt subblock)."""

    def read_region(self, x: int, y: int, w: int, h: int, scale: float = 1.0) -> np.ndarray:
        raise CziSlideError(f"/slides/{self.name}.czi", f"reading region {(x, y, w, h)} failed (corrupt)")


def test_unreadable_slide_is_dropped_when_skipping_and_the_rest_share_one_threshold(caplog):
    good = [_marrow_slide("a", 1)[0], _marrow_slide("b", 2)[0]]
    bad = UnreadableSlide("c", np.zeros((400, 400, 3), np.uint8))
    with pytest.raises(CziSlideError, match=r"/slides/c\.czi"):
        build_tissue_maps([*good, bad])
    with caplog.at_level(logging.WARNING, logger="mk_hspc.tissue"):
        maps, calibration = build_tissue_maps([*good, bad], skip_unreadable=True)
    alone, alone_calibration = build_tissue_maps(good)
    assert sorted(maps) == ["a", "b"] and calibration["n_slides"] == 2
    assert calibration["threshold_od"] == alone_calibration["threshold_od"]  # pooled over the readable slides
    assert all(np.array_equal(maps[name].mask, alone[name].mask) for name in alone)
    assert list(calibration["skipped_slides"]) == ["c"] and "corrupt" in calibration["skipped_slides"]["c"]
    assert "Skipping slide c" in caplog.text and "/slides/c.czi" in caplog.text
    assert alone_calibration["skipped_slides"] == {}


def test_mask_fills_enclosed_fat_keeps_large_lake_and_removes_specks():
    slide, truth = _marrow_slide("a", 4)
    maps, calibration = build_tissue_maps([slide], map_um_per_px=8.0, threads=2)
    tissue_map = maps["a"]
    assert tissue_map.downsample == 4 and calibration["threshold_od"] == tissue_map.threshold
    thumb_truth = truth[2::4, 2::4]  # the fake reader samples pixel centres
    agreement = (tissue_map.mask == thumb_truth).mean()
    assert agreement > 0.97
    lake = _disc(thumb_truth.shape, (150, 200), 55)
    assert not tissue_map.mask[lake].any()  # 1 mm wide lake stays glass
    for center in [(20, 30), (275, 375)]:  # the two dust specks are gone
        assert not tissue_map.mask[_disc(thumb_truth.shape, center, 8)].any()
    # fat vacuoles are inside the tissue ring and are filled
    ring = thumb_truth & ~_disc(thumb_truth.shape, (150, 200), 75)
    assert tissue_map.mask[ring].mean() > 0.99


def test_holes_touching_the_border_or_too_large_are_not_filled():
    score = np.full((100, 100), 0.5, np.float32)
    score[40:46, 40:46] = 0.0  # 36 px enclosed: filled (limit 40 px at 1 um/px)
    score[0:5, 60:66] = 0.0  # 30 px but open to the border: glass margin, kept
    score[70:80, 10:20] = 0.0  # 100 px enclosed: too large, kept
    score[90:93, 90:93] = np.nan  # no image: never tissue
    mask = tissue_mask(score, 0.1, pixel_um=1.0, fill_holes_max_um2=40.0, min_object_um2=0.0)
    assert mask[40:46, 40:46].all()
    assert not mask[0:5, 60:66].any()
    assert not mask[70:80, 10:20].any()
    assert not mask[90:93, 90:93].any()


def test_specks_removed_by_area_in_um2():
    score = np.zeros((60, 60), np.float32)
    score[5:8, 5:8] = 1.0  # 9 px = 36 um2 at 2 um/px
    score[20:40, 20:40] = 1.0  # 400 px = 1600 um2
    mask = tissue_mask(score, 0.1, pixel_um=2.0, fill_holes_max_um2=0.0, min_object_um2=100.0)
    assert not mask[5:8, 5:8].any() and mask[20:40, 20:40].all() and mask.sum() == 400


def test_thumbnail_is_low_resolution_places_scenes_and_ignores_thread_count():
    canvas = _paint(np.ones((900, 1300), bool), np.zeros((900, 1300), bool), np.zeros((900, 1300), bool), 5)
    scenes = (Box(1000, 2000, 400, 300), Box(1700, 2500, 600, 400))
    slide = FakeSlide("two_scenes", canvas, 1000, 2000, pixel_size_um=0.5, scenes=scenes)
    one = read_slide_thumbnail(slide, map_um_per_px=5.0, threads=1)
    two = read_slide_thumbnail(
        slide, map_um_per_px=5.0, threads=2, block_px=120
    )  # 12 x 12 thumbnail px blocks
    assert max(slide.scales_read) == pytest.approx(0.1)  # never a full-resolution read
    assert one.downsample == 10 and one.rgb.shape == (90, 130, 3)
    np.testing.assert_array_equal(one.rgb, two.rgb)
    np.testing.assert_array_equal(one.valid, two.valid)
    assert one.valid.sum() == 40 * 30 + 60 * 40  # exactly the two scenes
    assert one.valid[0:30, 0:40].all() and one.valid[50:90, 70:130].all() and not one.valid[40:50].any()
    np.testing.assert_array_equal(one.rgb[0:30, 0:40], canvas[5:300:10, 5:400:10])
    score = slide_tissue_score(one)
    assert np.isnan(score[~one.valid]).all() and np.isfinite(score[one.valid]).all()


def test_tissue_map_npz_round_trip(tmp_path):
    slide, _ = _marrow_slide("rt", 6)
    tissue_map = build_tissue_maps({"rt": slide})[0]["rt"]
    tissue_map.to_npz(tmp_path / "rt.npz")
    buffer = io.BytesIO()
    tissue_map.to_npz(buffer)
    for loaded in (TissueMap.from_npz(tmp_path / "rt.npz"), TissueMap.from_npz(buffer.getvalue())):
        assert loaded.slide == "rt" and (loaded.origin_x, loaded.origin_y) == (-3000, 5000)
        np.testing.assert_array_equal(loaded.mask, tissue_map.mask)
        np.testing.assert_array_equal(loaded.thumbnail, tissue_map.thumbnail)
        assert loaded.threshold == tissue_map.threshold and loaded.um_per_px == tissue_map.um_per_px


def test_overlay_figure_renders_layers_and_counts(tmp_path):
    slide, _ = _marrow_slide("fig", 7)
    maps, _ = build_tissue_maps([slide])
    tiles = build_tile_grid([slide.meta], maps, tile_px=200)
    sampled = tiles.loc[tiles["is_tissue"], "tile_id"].iloc[:3].tolist()
    fig = tissue_overlay_figure(maps["fig"], tiles, sampled)
    ax = fig.axes[0]
    n_tissue = int(tiles["is_tissue"].sum())
    assert f"{len(tiles)} tiles, {n_tissue} with tissue" in ax.get_title() and "3 sampled" in ax.get_title()
    labels = [text.get_text() for text in fig.legends[0].get_texts()]
    assert labels == ["tissue", "tile", "tissue tile", "sampled tile"]
    assert sum(len(c.get_paths()) for c in ax.collections if hasattr(c, "get_paths")) >= len(tiles)
    fig.savefig(tmp_path / "fig.png", dpi=60)
    assert (tmp_path / "fig.png").stat().st_size > 5000


# --- real CZI files --------------------------------------------------------------------------------------

# DemoSpec.small() slides are only 0.41 x 0.35 mm: 400 px tiles (69 um) give 120 tiles, and a 4 um/px map keeps
# ~17 map pixels per tile side (production: 3000 px tiles at 8 um/px, ~65).
TEST_TILE_PX = 400
TEST_MAP_UM_PER_PX = 4.0
MIN_TISSUE_FRACTION = 0.15
BORDERLINE = 0.05  # tiles whose true tissue fraction is this close to the cut-off may go either way


@pytest.fixture(scope="module")
def demo_study(tmp_path_factory):
    demo = pytest.importorskip("mk_hspc.demo")
    czi = pytest.importorskip("mk_hspc.czi")
    if not hasattr(demo, "make_demo_study") or not hasattr(czi, "open_slide"):
        pytest.skip("mk_hspc.demo / mk_hspc.czi not available yet")
    out_dir = tmp_path_factory.mktemp("demo_tissue")
    study = demo.make_demo_study(out_dir, demo.DemoSpec.small(), progress=False)
    slides = [czi.open_slide(path) for path in sorted((out_dir / "slides").glob("*.czi"))]
    maps, calibration = build_tissue_maps(slides, map_um_per_px=TEST_MAP_UM_PER_PX)
    tiles = build_tile_grid(
        [slide.meta for slide in slides], maps, tile_px=TEST_TILE_PX, min_tissue_fraction=MIN_TISSUE_FRACTION
    )
    yield out_dir, study, slides, maps, calibration, tiles
    for slide in slides:
        slide.close()


def load_truth_map(out_dir: Path, name: str) -> TissueMap:
    """The demo's ground-truth tissue mask (section outline, fat and bone included) as a TissueMap."""
    from mk_hspc.demo import load_tissue_truth

    with np.load(out_dir / "ground_truth" / "tissue" / f"{name}.npz") as data:
        pixel_size_um = float(data["pixel_size_um"])
    mask, origin_x, origin_y, downsample = load_tissue_truth(
        out_dir / "ground_truth" / "tissue" / f"{name}.npz"
    )
    return TissueMap(name, mask.astype(bool), origin_x, origin_y, float(downsample), pixel_size_um, np.nan)


def test_demo_tiles_agree_with_ground_truth(demo_study):
    out_dir, _, slides, maps, _, tiles = demo_study
    truth_maps = {slide.meta.name: load_truth_map(out_dir, slide.meta.name) for slide in slides}
    truth_tiles = build_tile_grid(
        [slide.meta for slide in slides],
        truth_maps,
        tile_px=TEST_TILE_PX,
        min_tissue_fraction=MIN_TISSUE_FRACTION,
    )
    assert (truth_tiles["tile_id"] == tiles["tile_id"]).all() and len(tiles) >= 100
    agree = truth_tiles["is_tissue"] == tiles["is_tissue"]
    clear = (truth_tiles["tissue_fraction"] - MIN_TISSUE_FRACTION).abs() > BORDERLINE
    assert agree.mean() >= 0.99, tiles.loc[~agree]
    assert agree[clear].all(), tiles.loc[clear & ~agree]
    assert (truth_tiles["tissue_fraction"] - tiles["tissue_fraction"]).abs().mean() < 0.03
    assert 0 < tiles["is_tissue"].sum() < len(tiles)


def test_demo_threshold_is_calibrated_on_all_slides_pooled(demo_study):
    _, _, slides, maps, calibration, _ = demo_study
    assert {tissue_map.threshold for tissue_map in maps.values()} == {calibration["threshold_od"]}
    histograms = [
        score_histogram(slide_tissue_score(read_slide_thumbnail(slide, TEST_MAP_UM_PER_PX)))
        for slide in slides
    ]
    assert calibration["n_pixels"] == sum(int(h.sum()) for h in histograms)
    assert threshold_from_histogram(np.sum(histograms, axis=0)) == pytest.approx(calibration["threshold_od"])
    assert set(calibration["per_slide"]) == {slide.meta.name for slide in slides}


def test_shared_czi_with_two_far_apart_scenes_thumbnail():
    path = SHARED_DATA / "czitools" / "WellD6-7_S2.czi"
    if not path.exists():
        pytest.skip(f"{path} not available")
    czi = pytest.importorskip("mk_hspc.czi")
    if not hasattr(czi, "open_slide"):
        pytest.skip("mk_hspc.czi not available yet")
    with czi.open_slide(path) as slide:
        thumb = read_slide_thumbnail(slide, map_um_per_px=8 * slide.meta.pixel_size_um)
        meta = slide.meta
    assert thumb.downsample == 8
    assert thumb.rgb.shape[:2] == (math.ceil(meta.bbox.h / 8), math.ceil(meta.bbox.w / 8))
    expected_valid = sum(round(box.w / 8) * round(box.h / 8) for box in meta.scenes)
    assert abs(int(thumb.valid.sum()) - expected_valid) <= 2 * sum(box.w + box.h for box in meta.scenes) / 8
    assert thumb.valid.mean() < 0.5  # the gap between the scenes is never read


def test_tissue_reaching_the_scene_edge_counts_in_the_last_cores_fraction() -> None:
    """Scene 1007 px wide at 0.25 µm/px (map downsample 32): 1007 = 31 x 32 + 15, and the thumbnail read gave
    round(1007 / 32) = 31 columns, so the map's last column was never read: the last core, all tissue, got a
    tissue fraction of 0.889."""
    from mk_hspc.tiling import build_tile_grid
    from mk_hspc.tissue import read_slide_thumbnail, slide_tissue_score, tissue_map_from_thumbnail

    width = 1007
    canvas = np.full((1300, width, 3), (238, 238, 242), np.uint8)
    canvas[:, 600:] = (150, 80, 160)  # tissue from x = 600 to the scene's right edge
    slide = FakeSlide("s", canvas, pixel_size_um=0.25)
    thumb = read_slide_thumbnail(slide, 8.0)
    tissue_map = tissue_map_from_thumbnail(thumb, slide_tissue_score(thumb), threshold=0.1)
    meta = {"name": "s", "pixel_size_um": 0.25, "scenes": [{"x": 0, "y": 0, "w": width, "h": 1300}]}
    grid = build_tile_grid({"s": meta}, {"s": tissue_map}, tile_px=1000, overlap_um=60)
    last = grid[grid["col"] == grid["col"].max()].iloc[0]
    assert last["core_x"] >= 600  # the whole core is tissue
    assert last["core_tissue_fraction"] >= 0.97 and last["tissue_fraction"] >= 0.97
