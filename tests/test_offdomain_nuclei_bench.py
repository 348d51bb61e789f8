"""The off-domain nucleus analysis sorts each missed true nucleus into one cause (hand-made labels)."""

from __future__ import annotations

import numpy as np
import pytest

from mk_hspc.models.segmenters.nuclei import HspcParams
from tests.conftest import loaded_bench_script


@pytest.fixture(scope="module")
def bench():
    with loaded_bench_script("offdomain_nuclei") as module:
        yield module


def test_miss_categories(bench) -> None:
    truth_labels = np.zeros((60, 80), np.int64)
    truth_labels[5:15, 5:15] = 1  # found: candidate 1 on it, high score
    truth_labels[5:15, 30:40] = 2  # low_score: candidate 2 on it, scored below min_score
    truth_labels[30:40, 5:15] = 3  # merged: candidate 3 covers 3 and 4 and is matched to 3
    truth_labels[30:40, 15:20] = 4
    truth_labels[30:40, 50:60] = 5  # no_foreground: no candidate
    truth_labels[50:55, 70:75] = 6  # too_small: candidate 4 dropped by the area bounds
    candidate_labels = np.zeros_like(truth_labels, np.int32)
    candidate_labels[5:15, 5:15] = 1
    candidate_labels[5:15, 30:40] = 2
    candidate_labels[30:40, 5:19] = 3
    candidate_labels[51:54, 71:74] = 4
    truth_xy = np.array([[9.5, 9.5], [34.5, 9.5], [9.5, 34.5], [17.0, 34.5], [54.5, 34.5], [72.0, 52.0]])
    candidate_xy = np.array([[9.5, 9.5], [34.5, 9.5], [11.5, 34.5], [72.0, 52.0]])
    candidates = bench.Candidates(
        features={"area_um2": np.array([25.0, 25.0, 35.0, 2.0])},
        kept=np.array([True, True, True, False]),
        xy=candidate_xy,
        labels=candidate_labels,
        factor=1,
    )
    truth = bench.Truth("hand-made", truth_xy, gate_px=4.0, labels=truth_labels)
    scores = np.array([0.9, 0.1, 0.8, 0.9])
    categories = bench.miss_categories(candidates, truth, scores, HspcParams())
    assert categories == ["found", "low_score", "found", "merged", "no_foreground", "too_small"]


def test_miss_categories_at_a_binning_factor(bench) -> None:
    # Candidates at half the resolution (factor 2) still cover the true nucleus they lie on.
    truth_labels = np.zeros((20, 20), np.int64)
    truth_labels[4:12, 4:12] = 1
    candidate_labels = np.zeros((10, 10), np.int32)
    candidate_labels[2:6, 2:6] = 1
    candidates = bench.Candidates(
        features={"area_um2": np.array([400.0])},
        kept=np.array([False]),
        xy=np.array([[7.5, 7.5]]),
        labels=candidate_labels,
        factor=2,
    )
    truth = bench.Truth("binned", np.array([[7.5, 7.5]]), gate_px=4.0, labels=truth_labels)
    assert bench.miss_categories(candidates, truth, np.array([0.9]), HspcParams()) == ["too_large"]


def _domain(bench, fractions_true: list[float], fractions_false: list[float]):
    """One image: true nuclei on a row of points (each matched by a candidate on it), then false candidates
    far from any; all low-score (the test's score), with the given haematoxylin fractions."""
    n_true, n_false = len(fractions_true), len(fractions_false)
    xy = np.array([[10.0 + 20 * k, 10.0] for k in range(n_true + n_false)])
    ones = np.ones(n_true + n_false)
    features = {
        name: ones.copy() for name in ("width_um", "contrast", "area_um2", "major_um", "haematoxylin_od")
    }
    features["haematoxylin_fraction"] = np.array(fractions_true + fractions_false)
    candidates = bench.Candidates(
        features=features, kept=ones.astype(bool), xy=xy, labels=np.zeros((2, 2), np.int32), factor=1
    )
    return candidates, bench.Truth("hand-made", xy[:n_true], gate_px=4.0)


def test_feature_separation_measures_within_and_across_domains(bench, monkeypatch) -> None:
    monkeypatch.setattr(bench, "default_score", lambda features, p: np.full(len(features["width_um"]), 0.1))
    data = {
        "bm_graz_1.0": [_domain(bench, [0.8, 0.9], [0.4, 0.5, 0.6])],  # true nuclei bluer
        "challenge": [_domain(bench, [0.3, 0.35], [0.7])],  # the other way round, and paler than BM's false
    }
    p = HspcParams(min_score=0.35)
    result = bench.feature_separation(bench.low_score_groups(data, p), p)
    assert result["n"] == {"bm_graz_true": 2, "bm_graz_false": 3, "challenge_true": 2, "challenge_false": 1}
    auc = result["auc_true_vs_false"]["haematoxylin_fraction"]
    assert auc == {"bm_graz": 1.0, "challenge": 0.0, "cross": 0.0}
    assert result["auc_true_vs_false"]["width_um"] == {"bm_graz": 0.5, "challenge": 0.5, "cross": 0.5}
