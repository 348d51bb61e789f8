"""The off-domain nucleus analysis sorts each missed true nucleus into one cause (hand-made labels)."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from mk_hspc.models.segmenters.nuclei import HspcParams
from tests.conftest import load_bench_script


@pytest.fixture(scope="module")
def bench():
    module = load_bench_script("offdomain_nuclei")
    yield module
    sys.modules.pop(module.__name__, None)


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
