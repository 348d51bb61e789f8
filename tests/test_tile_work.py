"""Per-tile work and the resumable run on a synthetic in-memory slide with fake plugins."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage
from skimage.segmentation import relabel_sequential

from mk_hspc.engine.cells_table import build_cells_table, load_features
from mk_hspc.engine.tile_work import (
    SegmentationSettings,
    TileSpec,
    compute_params_hash,
    process_tile,
    segment_tiles,
)
from mk_hspc.models.base import Segmentation
from mk_hspc.tile_store import read_tile_result

PIXEL_SIZE_UM = 0.5
ORIGIN = (-1000, 2000)  # absolute CZI frame of the fake slide: offset and partly negative, like real files


class ArraySlide:
    """Slide-like object backed by an RGB array placed at ``ORIGIN`` in the absolute frame."""

    def __init__(self, rgb: np.ndarray, origin: tuple[int, int] = ORIGIN) -> None:
        self.rgb = rgb
        self.origin = origin
        self.meta = SimpleNamespace(pixel_size_um=PIXEL_SIZE_UM)

    def read_region(self, x: int, y: int, w: int, h: int, scale: float = 1.0) -> np.ndarray:
        col, row = x - self.origin[0], y - self.origin[1]
        return self.rgb[row : row + h, col : col + w].copy()


@dataclass
class DarkBlobSegmenter:
    """Labels connected dark regions (stands in for a real segmenter; deterministic)."""

    name: str = "darkblobs"
    max_brightness: int = 128
    min_area_px: int = 5

    def segment(self, tile_rgb: np.ndarray, pixel_size_um: float) -> Segmentation:
        mask = tile_rgb.mean(axis=2) < self.max_brightness
        labels, n = ndimage.label(mask)
        areas = np.bincount(labels.ravel(), minlength=n + 1)
        labels[areas[labels] < self.min_area_px] = 0
        labels, _, _ = relabel_sequential(labels)
        n = int(labels.max())
        darkness = ndimage.mean(255 - tile_rgb[..., 0].astype(float), labels, np.arange(1, n + 1)) / 255
        return Segmentation(labels.astype(np.int32), np.asarray(darkness, np.float32).reshape(n))


@dataclass
class FakeMorphology:
    """Per-cell area and mean red intensity, with the extractor-name prefix the protocol demands."""

    name: str = "morphology"

    def extract(self, tile_rgb, labels, cell_labels, pixel_size_um) -> pd.DataFrame:
        area = ndimage.sum_labels(np.ones(labels.shape), labels, cell_labels) * pixel_size_um**2
        red = ndimage.mean(tile_rgb[..., 0], labels, cell_labels)
        return pd.DataFrame({"morphology_area_um2": area, "morphology_red": red}).astype(np.float32)


def make_blob_slide(height: int = 420, width: int = 560, n_blobs: int = 40, seed: int = 0):
    """Light background with well separated dark disks; returns the image and the disk centres (row, col)."""
    rng = np.random.default_rng(seed)
    rgb = np.full((height, width, 3), 230, np.uint8)
    centres: list[tuple[int, int]] = []
    rows, cols = np.ogrid[:height, :width]
    while len(centres) < n_blobs:
        r, c = int(rng.integers(10, height - 10)), int(rng.integers(10, width - 10))
        if all((r - r0) ** 2 + (c - c0) ** 2 > 22**2 for r0, c0 in centres):
            centres.append((r, c))
            radius = int(rng.integers(3, 8))
            disk = (rows - r) ** 2 + (cols - c) ** 2 <= radius**2
            rgb[disk] = (60 + len(centres), 30, 90)
    return rgb, np.asarray(centres)


def make_tile_sample(
    slide: str, height: int, width: int, core_px: int, overlap_px: int, origin=ORIGIN
) -> pd.DataFrame:
    """Contract-shaped tile sample: cores partition the image, windows extend them by the overlap."""
    rows = []
    for r, y0 in enumerate(range(0, height, core_px)):
        for c, x0 in enumerate(range(0, width, core_px)):
            core_w, core_h = min(core_px, width - x0), min(core_px, height - y0)
            x, y = max(0, x0 - overlap_px), max(0, y0 - overlap_px)
            x1, y1 = min(width, x0 + core_w + overlap_px), min(height, y0 + core_h + overlap_px)
            rows.append(
                {
                    "tile_id": f"{slide}_s0_r{r:03d}_c{c:03d}",
                    "slide": slide,
                    "scene": 0,
                    "row": r,
                    "col": c,
                    "x": origin[0] + x,
                    "y": origin[1] + y,
                    "w": x1 - x,
                    "h": y1 - y,
                    "core_x": origin[0] + x0,
                    "core_y": origin[1] + y0,
                    "core_w": core_w,
                    "core_h": core_h,
                    "tissue_fraction": 1.0,
                    "is_tissue": True,
                }
            )
    sample = pd.DataFrame(rows)
    sample["sample_rank"] = np.arange(len(sample))
    return sample


@pytest.fixture()
def blob_study():
    rgb, centres = make_blob_slide()
    sample = make_tile_sample("slide_a", rgb.shape[0], rgb.shape[1], core_px=150, overlap_px=30)
    return rgb, centres, sample


def test_overlapping_tiles_keep_every_cell_exactly_once(blob_study):
    rgb, centres, sample = blob_study
    slide = ArraySlide(rgb)
    segmenters = {"mk": DarkBlobSegmenter()}
    kept = []
    for record in sample.to_dict("records"):
        spec = TileSpec.from_record(record)
        tile = slide.read_region(spec.x, spec.y, spec.w, spec.h)
        result = process_tile(tile, spec, PIXEL_SIZE_UM, segmenters, [FakeMorphology()])
        kept.append(result.cells)
        # relabelled 1..N, label image holds exactly the kept cells
        n = len(result.cells)
        assert result.cells["label"].tolist() == list(range(1, n + 1))
        assert np.array_equal(np.unique(result.labels["mk"]), np.arange(0, n + 1))
        assert result.features["morphology"].index.tolist() == result.cells["cell_id"].tolist()
    cells = pd.concat(kept, ignore_index=True)
    assert len(cells) == len(centres)
    assert cells["cell_id"].is_unique
    # every disk centre is matched by exactly one kept centroid (absolute px -> µm)
    true_x_um = (centres[:, 1] + ORIGIN[0]) * PIXEL_SIZE_UM
    true_y_um = (centres[:, 0] + ORIGIN[1]) * PIXEL_SIZE_UM
    distance = np.hypot(
        cells["centroid_x_um"].to_numpy()[:, None] - true_x_um[None],
        cells["centroid_y_um"].to_numpy()[:, None] - true_y_um[None],
    )
    assert (distance.min(axis=0) < 0.01).all()
    assert ((distance < 0.01).sum(axis=0) == 1).all()


def test_cell_records_follow_contract(blob_study):
    rgb, _, sample = blob_study
    spec = TileSpec.from_record(sample.iloc[4].to_dict())
    tile = ArraySlide(rgb).read_region(spec.x, spec.y, spec.w, spec.h)
    result = process_tile(tile, spec, PIXEL_SIZE_UM, {"mk": DarkBlobSegmenter(), "hspc": DarkBlobSegmenter()})
    cells = result.cells
    assert len(cells) > 0
    first = cells.iloc[0]
    assert first["cell_id"] == f"{spec.tile_id}_{first['cell_type']}_{first['label']:05d}"
    assert set(cells["cell_type"]) == {"mk", "hspc"}
    np.testing.assert_allclose(cells["area_um2"], cells["area_px"] * PIXEL_SIZE_UM**2)
    np.testing.assert_allclose(cells["centroid_x_um"], cells["centroid_x_px"] * PIXEL_SIZE_UM)
    # bounding-box centres inside the core, bounding boxes (absolute px) inside the window and around the centroid
    box_centre_x = cells["bbox_x"] + (cells["bbox_w"] - 1) / 2
    assert box_centre_x.between(spec.core_x, spec.core_x + spec.core_w, inclusive="left").all()
    assert (cells["bbox_x"] >= spec.x).all() and (cells["bbox_x"] + cells["bbox_w"] <= spec.x + spec.w).all()
    assert (
        (cells["bbox_x"] <= cells["centroid_x_px"])
        & (cells["centroid_x_px"] <= cells["bbox_x"] + cells["bbox_w"])
    ).all()
    # area of a cell equals its pixel count in the stored label image
    mk = cells[cells["cell_type"] == "mk"]
    counts = np.bincount(result.labels["mk"].ravel())[1:]
    assert counts.tolist() == mk["area_px"].tolist()


def test_blank_tile_gives_typed_empty_records(blob_study):
    rgb, _, sample = blob_study
    spec = TileSpec.from_record(sample.iloc[0].to_dict())
    blank = np.full((spec.h, spec.w, 3), 240, np.uint8)
    result = process_tile(blank, spec, PIXEL_SIZE_UM, {"mk": DarkBlobSegmenter()}, [FakeMorphology()])
    assert len(result.cells) == 0 and not result.labels["mk"].any()
    assert result.features["morphology"].shape[0] == 0
    tile = ArraySlide(rgb).read_region(spec.x, spec.y, spec.w, spec.h)
    full = process_tile(tile, spec, PIXEL_SIZE_UM, {"mk": DarkBlobSegmenter()})
    assert result.cells.dtypes.to_dict() == full.cells.dtypes.to_dict()


def test_process_tile_rejects_inconsistent_plugins(blob_study):
    rgb, _, sample = blob_study
    spec = TileSpec.from_record(sample.iloc[0].to_dict())
    tile = ArraySlide(rgb).read_region(spec.x, spec.y, spec.w, spec.h)

    class Unprefixed(FakeMorphology):
        def extract(self, *args):
            return super().extract(*args).rename(columns=lambda c: c.replace("morphology_", ""))

    with pytest.raises(ValueError, match="prefix"):
        process_tile(tile, spec, PIXEL_SIZE_UM, {"mk": DarkBlobSegmenter()}, [Unprefixed()])
    with pytest.raises(ValueError, match="shape"):
        process_tile(tile[:-1], spec, PIXEL_SIZE_UM, {"mk": DarkBlobSegmenter()})


def test_params_hash_tracks_plugin_parameters():
    base = compute_params_hash({"mk": DarkBlobSegmenter()}, [FakeMorphology()])
    assert base == compute_params_hash({"mk": DarkBlobSegmenter()}, [FakeMorphology()])
    assert base != compute_params_hash({"mk": DarkBlobSegmenter(max_brightness=100)}, [FakeMorphology()])
    assert base != compute_params_hash({"hspc": DarkBlobSegmenter()}, [FakeMorphology()])
    assert base != compute_params_hash({"mk": DarkBlobSegmenter()}, [])
    assert base != compute_params_hash(
        {"mk": DarkBlobSegmenter()}, [FakeMorphology()], params={"min_area_um2": 5}
    )


def test_params_hash_reads_dataclass_parameters():
    @dataclass(frozen=True)
    class Knobs:
        min_area_um2: float = 8.0
        range_od: tuple[float, float] = (0.2, 0.6)

    class WithKnobs(DarkBlobSegmenter):
        def __init__(self, **knobs):
            super().__init__()
            self.params = Knobs(**knobs)

    base = compute_params_hash({"hspc": WithKnobs()})
    assert base == compute_params_hash({"hspc": WithKnobs()})
    assert base != compute_params_hash({"hspc": WithKnobs(min_area_um2=9.0)})
    assert base != compute_params_hash({"hspc": WithKnobs(range_od=(0.2, 0.7))})


def test_segment_tiles_threaded_equals_sequential_and_resumes(tmp_path, blob_study, caplog):
    rgb, centres, sample = blob_study
    slides = {"slide_a": ArraySlide(rgb)}
    segmenters = {"mk": DarkBlobSegmenter(), "hspc": DarkBlobSegmenter(max_brightness=100)}
    features = [FakeMorphology()]
    sequential = SegmentationSettings(
        reader_threads=1, writer_threads=1, prefetch_tiles=1, pending_writes=1, progress=False
    )
    threaded = SegmentationSettings(
        reader_threads=3, writer_threads=2, prefetch_tiles=2, pending_writes=2, progress=False
    )

    summary = segment_tiles(sample, slides, tmp_path / "seq", segmenters, features, sequential)
    assert summary.n_processed == len(sample) and summary.n_skipped == 0
    assert summary.n_cells == {"mk": len(centres), "hspc": len(centres)}
    threaded_summary = segment_tiles(sample, slides, tmp_path / "thr", segmenters, features, threaded)
    assert threaded_summary.max_tiles_in_flight <= threaded.max_tiles_in_memory

    table_seq = build_cells_table(tmp_path / "seq", sample)
    table_thr = build_cells_table(tmp_path / "thr", sample)
    pd.testing.assert_frame_equal(table_seq, table_thr)
    assert table_seq["cell_id"].is_unique and len(table_seq) == 2 * len(centres)
    assert {"slide", "tile_id", "morphology_area_um2", "morphology_red"} <= set(table_seq.columns)
    assert table_seq["tile_id"].is_monotonic_increasing
    for tile_id in sample["tile_id"]:
        a, b = read_tile_result(tmp_path / "seq", tile_id), read_tile_result(tmp_path / "thr", tile_id)
        for cell_type in segmenters:
            assert np.array_equal(a.labels[cell_type], b.labels[cell_type])

    # a rerun skips everything; a parameter change recomputes everything
    again = segment_tiles(sample, slides, tmp_path / "seq", segmenters, features, threaded)
    assert (again.n_skipped, again.n_processed) == (len(sample), 0)
    changed = {"mk": DarkBlobSegmenter(min_area_px=6), "hspc": segmenters["hspc"]}
    with caplog.at_level(logging.WARNING):
        redo = segment_tiles(sample, slides, tmp_path / "seq", changed, features, threaded)
    assert (redo.n_skipped, redo.n_processed, redo.n_recomputed) == (0, len(sample), len(sample))
    assert f"{len(sample)} tile file(s) come from other parameters" in caplog.text
    assert redo.params_hash != summary.params_hash
    assert read_tile_result(tmp_path / "seq", sample["tile_id"].iloc[0]).params_hash == redo.params_hash


def test_load_features_by_cells_and_tiles(tmp_path, blob_study):
    rgb, _, sample = blob_study
    settings = SegmentationSettings(progress=False)
    segment_tiles(
        sample,
        {"slide_a": ArraySlide(rgb)},
        tmp_path,
        {"mk": DarkBlobSegmenter()},
        [FakeMorphology()],
        settings,
    )
    table = build_cells_table(tmp_path, sample)
    wanted = table["cell_id"].iloc[::-3].tolist()  # reversed, across tiles
    features = load_features(tmp_path, "morphology", cell_ids=wanted)
    assert features.index.tolist() == wanted
    np.testing.assert_array_equal(
        features["morphology_red"].to_numpy(),
        table.set_index("cell_id").loc[wanted, "morphology_red"].to_numpy(),
    )
    by_tile = load_features(tmp_path, "morphology", tile_ids=sample["tile_id"])
    assert by_tile.index.tolist() == table["cell_id"].tolist()
    with pytest.raises(KeyError):
        load_features(tmp_path, "morphology", cell_ids=[f"{sample['tile_id'].iloc[0]}_mk_99999"])
    with pytest.raises(ValueError, match="produced with params"):
        build_cells_table(tmp_path, sample, params_hash="not-this-run")


def test_segment_tiles_names_the_failing_tile(tmp_path, blob_study):
    rgb, _, sample = blob_study
    bad_tile = sample["tile_id"].iloc[3]

    class FailsOnTile(DarkBlobSegmenter):
        def segment(self, tile_rgb, pixel_size_um):
            if (
                tile_rgb.shape[:2] == (int(sample["h"].iloc[3]), int(sample["w"].iloc[3]))
                and tile_rgb[0, 0, 1] == 7
            ):
                raise RuntimeError("model exploded")
            return super().segment(tile_rgb, pixel_size_um)

    marked = rgb.copy()
    row0, col0 = sample["y"].iloc[3] - ORIGIN[1], sample["x"].iloc[3] - ORIGIN[0]
    marked[row0, col0, 1] = 7  # only the window of tile 3 starts on this pixel
    with pytest.raises(RuntimeError, match=bad_tile):
        segment_tiles(
            sample,
            {"slide_a": ArraySlide(marked)},
            tmp_path,
            {"mk": FailsOnTile()},
            (),
            SegmentationSettings(progress=False),
        )
    with pytest.raises(FileNotFoundError):
        build_cells_table(tmp_path, sample)
