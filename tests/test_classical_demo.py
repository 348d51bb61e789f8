"""The classical segmenter on the embedded demo study: MKs and HSPCs against the demo's ground truth.

A detection is correct when its centroid lies inside the outline of a true cell of that type; each true
cell can be claimed once (``match_points_to_regions``), so split cells cost precision.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from skimage.draw import polygon

from mk_hspc.czi import open_slide
from mk_hspc.demo import DemoSpec, make_demo_study
from mk_hspc.models.evaluation import match_points_to_regions, scores_from_counts
from mk_hspc.models.segmenters.classical import ClassicalSegmenter, label_moments

# Recall first at the default operating point: the segmenter proposes, labels and the classifier decide.
# The MK default (min_score 0.3) was set on the real BM_GRAZ images (5 of 5 sure MKs found); on the demo of
# generator 2 (lobulated MKs, typed confounders) it finds 9 of 19 MKs (recall 0.47, measured at this commit),
# and 18 of 19 with min_score 0: the MK score does not yet rank the demo's MKs above its confounders. A known
# gap, reported on issue 8; the demo is a smoke test, real images decide, so the default is not tuned here.
MIN_RECALL = {"mk": 0.45, "hspc": 0.90}
MIN_RECALL_ALL_CANDIDATES = {"mk": 0.9}


@pytest.fixture(scope="module")
def demo_study(tmp_path_factory: pytest.TempPathFactory):
    return make_demo_study(tmp_path_factory.mktemp("demo"), DemoSpec.small(), progress=False, n_workers=1)


def truth_regions(cells: pd.DataFrame, x0: int, y0: int, shape: tuple[int, int]) -> np.ndarray:
    """Instance image (1..M, in the order of ``cells``) of true cell outlines in a region at (x0, y0)."""
    regions = np.zeros(shape, np.int32)
    for index, flat in enumerate(cells["polygon_xy"], start=1):
        xy = np.asarray(flat, dtype=np.float64).reshape(-1, 2)
        rows, cols = polygon(xy[:, 1] - y0, xy[:, 0] - x0, shape)
        regions[rows, cols] = index
    return regions


def detected_points(labels: np.ndarray) -> np.ndarray:
    n = int(labels.max())
    if n == 0:
        return np.zeros((0, 2))
    moments = label_moments(labels, n)
    return np.stack([moments["centroid_x"], moments["centroid_y"]], axis=1)


@pytest.mark.slow
def test_classical_segmenter_finds_the_demo_cells(demo_study) -> None:
    cells = pd.read_parquet(demo_study.cells_path)
    segmenters = {"mk": ClassicalSegmenter(mode="mk"), "hspc": ClassicalSegmenter(mode="hspc")}
    counts = {mode: np.zeros(3, int) for mode in segmenters}
    matched_scores: dict[str, list[float]] = {mode: [] for mode in segmenters}
    unmatched_scores: dict[str, list[float]] = {mode: [] for mode in segmenters}
    for slide, path in sorted(demo_study.slide_paths.items()):
        with open_slide(path) as handle:
            (scene,) = handle.meta.scenes
            rgb = handle.read_region(scene.x, scene.y, scene.w, scene.h)
            pixel_size_um = handle.meta.pixel_size_um
        for mode, segmenter in segmenters.items():
            truth = cells[(cells["slide"] == slide) & (cells["cell_type"] == mode)]
            regions = truth_regions(truth, scene.x, scene.y, rgb.shape[:2])
            result = segmenter.segment(rgb, pixel_size_um)
            assert np.all((result.scores >= 0.0) & (result.scores <= 1.0))
            tp, fp, fn, pairs = match_points_to_regions(detected_points(result.labels), regions)
            counts[mode] += (tp, fp, fn)
            is_match = np.zeros(result.n_cells, bool)
            is_match[pairs[:, 0]] = True
            matched_scores[mode] += result.scores[is_match].tolist()
            unmatched_scores[mode] += result.scores[~is_match].tolist()
    for mode, (tp, fp, fn) in counts.items():
        scores = scores_from_counts(int(tp), int(fp), int(fn))
        assert scores.n_true > 0
        assert scores.recall >= MIN_RECALL[mode], (mode, scores)
    # The MK score sorts: true MKs score higher than the false candidates on average. (The demo gives the
    # nucleus mode too few false candidates, four, to compare; BM_GRAZ measures its curve.)
    assert np.mean(matched_scores["mk"]) > np.mean(unmatched_scores["mk"])


@pytest.mark.slow
def test_every_demo_mk_is_proposed_when_no_score_cut_is_applied(demo_study) -> None:
    cells = pd.read_parquet(demo_study.cells_path)
    segmenter = ClassicalSegmenter(mode="mk", min_score=0.0)
    counts = np.zeros(3, int)
    for slide, path in sorted(demo_study.slide_paths.items()):
        with open_slide(path) as handle:
            (scene,) = handle.meta.scenes
            rgb = handle.read_region(scene.x, scene.y, scene.w, scene.h)
            pixel_size_um = handle.meta.pixel_size_um
        truth = cells[(cells["slide"] == slide) & (cells["cell_type"] == "mk")]
        regions = truth_regions(truth, scene.x, scene.y, rgb.shape[:2])
        tp, fp, fn, _ = match_points_to_regions(
            detected_points(segmenter.segment(rgb, pixel_size_um).labels), regions
        )
        counts += (tp, fp, fn)
    assert scores_from_counts(*(int(v) for v in counts)).recall >= MIN_RECALL_ALL_CANDIDATES["mk"]


def test_demo_ground_truth_is_in_slide_pixels(demo_study) -> None:
    """The matching above relies on polygons in absolute CZI pixels inside each slide's scene."""
    cells = pd.read_parquet(demo_study.cells_path)
    slide, path = sorted(demo_study.slide_paths.items())[0]
    with open_slide(Path(path)) as handle:
        (scene,) = handle.meta.scenes
    own = cells[cells["slide"] == slide]
    assert own["centroid_x_px"].between(scene.x, scene.x + scene.w).all()
    assert own["centroid_y_px"].between(scene.y, scene.y + scene.h).all()
