"""The real-tissue benchmark's matching and bookkeeping, on hand-made points (no real data needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mk_hspc.models.evaluation import points_covered
from tests.conftest import loaded_bench_script


@pytest.fixture(scope="module")
def bench():
    with loaded_bench_script("real_tissue") as module:
        yield module


def test_points_covered_grows_the_mask_by_the_radius() -> None:
    labels = np.zeros((40, 60), np.int32)
    labels[10:20, 10:20] = 1  # a square: columns 10..19, rows 10..19
    labels[30:35, 50:55] = 2
    points = [
        [15, 15],  # inside
        [22, 15],  # 3 px right of the square's last column
        [23, 15],  # 4 px right
        [22, 22],  # diagonal: sqrt(3^2 + 3^2) = 4.24 px from the corner pixel
        [52, 32],  # inside the second candidate
        [-5, 5],  # outside the image
        [200, 10],
    ]
    covered = points_covered(points, labels, radius_px=3.0)
    assert covered.tolist() == [True, True, False, False, True, False, False]
    assert points_covered(points, labels, radius_px=4.3)[:4].tolist() == [True, True, True, True]
    assert not points_covered(points, np.zeros_like(labels), radius_px=10).any()
    assert points_covered(np.zeros((0, 2)), labels, 3.0).shape == (0,)


def test_mk_points_csv_with_and_without_points(bench, tmp_path: Path) -> None:
    some = tmp_path / "a.csv"
    some.write_text("x,y,confidence\n752,553,sure\n715,878,possible\n")
    xy, confidence = bench.read_mk_points(some)
    np.testing.assert_array_equal(xy, [[752, 553], [715, 878]])
    assert confidence.tolist() == ["sure", "possible"]
    none = tmp_path / "b.csv"
    none.write_text("x,y,confidence\n")
    xy, confidence = bench.read_mk_points(none)
    assert xy.shape == (0, 2) and confidence.shape == (0,)


def test_recall_by_confidence(bench) -> None:
    points = [
        {"confidence": "sure", "found": True},
        {"confidence": "sure", "found": False},
        {"confidence": "possible", "found": True},
    ]
    assert bench._recall(points, "sure") == 0.5
    assert bench._recall(points, "possible") == 1.0
    assert bench._recall(points, "other") is None


def test_nucleus_curve_thresholds_scores_and_matches_one_to_one(bench) -> None:
    dots = np.array([[10.0, 10.0], [100.0, 100.0]])
    # One true detection with a high score, one with a low score, one false with a middle score.
    xy = np.array([[12.0, 10.0], [100.0, 105.0], [300.0, 300.0]])
    scores = np.array([0.9, 0.1, 0.5])
    curve = {row["min_score"]: row for row in bench.nucleus_curve([(xy, scores, dots)])}
    assert curve[0.0]["recall_mean"] == 1.0 and curve[0.0]["precision_mean"] == pytest.approx(2 / 3)
    assert curve[0.2]["recall_mean"] == 0.5 and curve[0.2]["precision_mean"] == 0.5
    assert curve[0.6]["recall_mean"] == 0.5 and curve[0.6]["precision_mean"] == 1.0
    recalls = [row["recall_mean"] for row in bench.nucleus_curve([(xy, scores, dots)])]
    assert recalls == sorted(recalls, reverse=True)  # raising min_score never adds a detection


def test_leave_one_image_out_scores_each_image_at_the_others_best(bench) -> None:
    curve = [
        {"min_score": 0.1, "f1_per_image": [0.9, 0.5, 0.5]},
        {"min_score": 0.5, "f1_per_image": [0.4, 0.8, 0.8]},
    ]
    result = bench.leave_one_image_out(curve)
    # Held out 0: images 1, 2 prefer 0.5 (0.8 vs 0.5). Held out 1 (or 2): images 0, 2 prefer 0.1 (0.7 vs 0.6).
    assert result["chosen_min_score"] == [0.5, 0.1, 0.1]
    assert result["f1_mean"] == pytest.approx((0.4 + 0.5 + 0.5) / 3, abs=1e-4)  # rounded to 4 places


def test_the_default_operating_point_is_measured_exactly_even_off_the_grid(bench) -> None:
    # Before, at_score snapped to the nearest grid value: a default of 0.37 was reported at 0.35.
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 500, (60, 2))
    scores = rng.uniform(0, 1, 60)
    dots = xy[:40] + 1.0
    curve = bench.nucleus_curve([(xy, scores, dots)], also=(0.37,))
    row = bench.at_score(curve, 0.37)
    assert row["min_score"] == 0.37
    assert row["recall_mean"] == pytest.approx(float(np.mean(scores[:40] >= 0.37)))
    with pytest.raises(ValueError, match="not on the curve"):
        bench.at_score(bench.nucleus_curve([(xy, scores, dots)]), 0.37)
