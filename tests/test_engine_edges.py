"""Engine edge cases: a candidate covered by an earlier cell, zero-pixel masks, the Dask executor's counts, the
Cellpose fingerprint on a driver without a GPU, unusable pixel sizes (each test failed before its fix)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from mk_hspc.engine.tile_work import SegmentationSettings, segment_tiles
from mk_hspc.models.base import Segmentation
from mk_hspc.models.segmenters.classical import ClassicalSegmenter
from mk_hspc.models.stain import REFERENCE_E_OD, REFERENCE_H_OD


# ------------------------------------------------------------------------------------------ helpers
class OneBigBox:
    """One 50 x 50 px cell in the middle of a 100 px tile: wider than a 10 px overlap margin."""

    name = "onebigbox"

    def segment(self, tile_rgb: np.ndarray, pixel_size_um: float) -> Segmentation:
        labels = np.zeros(tile_rgb.shape[:2], np.int32)
        labels[25:75, 25:75] = 1
        return Segmentation(labels)


class GreySlide:
    def __init__(self, pixel_size_um: float = 0.5) -> None:
        self.meta = SimpleNamespace(pixel_size_um=pixel_size_um)

    def read_region(self, x: int, y: int, w: int, h: int, scale: float = 1.0) -> np.ndarray:
        return np.full((h, w, 3), 200, np.uint8)


def one_tile_sample() -> pd.DataFrame:
    return pd.DataFrame(
        [
            dict(tile_id="s_s0_r000_c000", slide="s", x=0, y=0, w=100, h=100)
            | dict(core_x=10, core_y=10, core_w=80, core_h=80)
        ]
    )


def he_rgb(haematoxylin: np.ndarray, eosin: np.ndarray) -> np.ndarray:
    """uint8 RGB of given H and E optical densities (reference stain vectors, Beer-Lambert)."""
    h_vec = np.asarray(REFERENCE_H_OD) / np.linalg.norm(REFERENCE_H_OD)
    e_vec = np.asarray(REFERENCE_E_OD) / np.linalg.norm(REFERENCE_E_OD)
    od = haematoxylin[..., None] * h_vec + eosin[..., None] * e_vec
    return np.clip(np.round(255 * 10 ** (-od)), 0, 255).astype(np.uint8)


def nucleus_inside_a_c_shaped_mk() -> np.ndarray:
    """A small MK-like candidate (nucleus + its own cytoplasm) sitting inside the opening of a larger,
    C-shaped MK nucleus with a cytoplasm ring; glass between them. At 0.7 µm/px (no binning)."""
    size = 128
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - 64, xx - 64)
    slot = (np.abs(xx - 64) < 4) & (yy > 64)  # an 8 px gap in the C, below the centre
    nucleus = (r <= 7) | ((r >= 21) & (r <= 27) & ~slot)
    cytoplasm = ((r > 7) & (r <= 13)) | ((r > 27) & (r <= 34))
    haematoxylin = np.where(nucleus, 1.0, np.where(cytoplasm, 0.05, 0.0))
    eosin = np.where(nucleus, 0.1, np.where(cytoplasm, 0.5, 0.0))
    return he_rgb(haematoxylin, eosin)


# ---------------------------------------------------------------------------------------------- bugs
def test_dask_executor_reports_cells_wider_than_the_overlap_like_the_local_executor(tmp_path, monkeypatch):
    """Local run: ``n_cells_wider_than_overlap == 1`` (and the warning); Dask run of the same tile: 0.

    ``tile_task`` returns only per-type counts, never the ``wider_than_overlap`` count that the local
    engine's ``_cells_per_type`` adds, so the summary (and the warning) differ by executor.
    """
    from distributed import Client, LocalCluster

    import mk_hspc.engine.plugins as plugins
    from mk_hspc.engine.dask_executor import DaskRun, DaskSettings

    segmenters = {"mk": OneBigBox()}
    settings = SegmentationSettings(progress=False, fsync=False)
    local = segment_tiles(
        one_tile_sample(), {"s": GreySlide()}, tmp_path / "local", segmenters, settings=settings
    )
    assert local.n_cells_wider_than_overlap == 1

    # In-process workers build the very same plugins (their fingerprint matches the driver's).
    monkeypatch.setattr(plugins, "build_plugins", lambda segmentation: (segmenters, []))
    (tmp_path / "dask").mkdir()  # the tile store dataset creates it before a run; workers check it exists
    with (
        LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        dask = segment_tiles(
            one_tile_sample(),
            {"s": GreySlide()},
            tmp_path / "dask",
            segmenters,
            settings=settings,
            dask=DaskRun(DaskSettings(), segmentation={"device": "cpu"}, client=client),
        )
    assert dask.failed_tiles == [] and dask.n_cells == local.n_cells
    assert dask.n_cells_wider_than_overlap == local.n_cells_wider_than_overlap


def test_mk_segmenter_survives_a_candidate_covered_by_an_earlier_cell():
    """The later candidate (inside the C) is kept with a score, but every pixel of it was already painted
    by the C-shaped MK's closed, hole-filled cell: ``labels.max()`` (1) < ``len(scores)`` (2) and
    ``Segmentation`` raises, failing the whole tile (default parameters)."""
    segmentation = ClassicalSegmenter(mode="mk").segment(nucleus_inside_a_c_shaped_mk(), pixel_size_um=0.7)
    assert segmentation.labels.max() == segmentation.n_cells


def test_sam2_overlap_resolution_never_keeps_a_mask_without_pixels():
    """``min_unclaimed_fraction=0`` and ``min_area_um2=0`` are accepted by ``Sam2Segmenter``; then a mask
    entirely covered by a better one passes ``n_unclaimed < 0 * area`` and is kept with no pixel: the label
    count (1) and the scores (2) disagree and ``Segmentation`` raises (same class of bug as the MK pass)."""
    torch = pytest.importorskip("torch")
    from mk_hspc.models.segmenters.sam2_amg import resolve_overlaps

    mask = np.zeros((20, 20), bool)
    mask[5:15, 5:15] = True
    proposals = SimpleNamespace(
        predicted_iou=torch.tensor([0.9, 0.8]),
        full_res_masks=lambda: [(0, 0, mask), (0, 0, mask.copy())],
    )
    segmentation = resolve_overlaps(proposals, (20, 20), min_unclaimed_fraction=0.0, min_area_px=0.0)
    assert segmentation.labels.max() == segmentation.n_cells


@pytest.mark.parametrize("pixel_size_um", [float("nan"), float("inf"), 0.0, -0.5])
def test_segment_tiles_refuses_a_pixel_size_that_is_not_finite_and_positive(tmp_path, pixel_size_um):
    """``segment_tiles`` takes any ``meta.pixel_size_um``: with NaN a pixel-size-agnostic segmenter writes
    tiles whose µm columns are NaN, and since ``NaN != NaN`` in ``tile_status`` every rerun finds the tile
    STALE and recomputes it forever; the classical segmenter instead fails each tile with a cryptic
    "cannot convert float NaN to integer" (inf: "h = 0 is ambiguous"). Expected: one clear error naming the
    slide before any tile runs."""
    settings = SegmentationSettings(progress=False, fsync=False)
    with pytest.raises(ValueError, match="pixel"):
        segment_tiles(
            one_tile_sample(),
            {"s": GreySlide(pixel_size_um)},
            tmp_path,
            {"mk": OneBigBox()},
            settings=settings,
        )


def test_cellpose_fingerprint_does_not_depend_on_where_device_auto_resolves(tmp_path, monkeypatch):
    """``CellposeSegmenter(use_bfloat16=None)`` stores ``use_bfloat16 = (device.type == "cuda")`` as a public
    attribute, so it enters the fingerprint: with the documented ``device: auto`` a GPU-less driver (the
    SLURM login node of conf/slurm's GPU recipe) computes another ``params_hash`` than its GPU workers, and
    ``_WorkerState._build`` refuses every worker ("its mk_hspc code, packages or weights differ")."""
    pytest.importorskip("torch")
    import torch

    from mk_hspc.engine.tile_work import compute_params_hash
    from mk_hspc.models.segmenters import cellpose_seg

    weights = tmp_path / "cpsam"
    weights.write_bytes(b"not loaded until the first tile")
    driver = cellpose_seg.CellposeSegmenter(weights=str(weights), device="auto")
    monkeypatch.setattr(cellpose_seg, "resolve_device", lambda device: torch.device("cuda"))
    gpu_worker = cellpose_seg.CellposeSegmenter(weights=str(weights), device="auto")
    assert compute_params_hash({"hspc": driver}) == compute_params_hash({"hspc": gpu_worker})
