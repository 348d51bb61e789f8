"""Counts corrected for the classifier's held-out recall and false-positive rate."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mk_hspc.classify.adjusted_counts import add_adjusted_counts, adjusted_count
from mk_hspc.classify.training import gate_metrics


def test_adjusted_count_inverts_the_expected_acceptance() -> None:
    # 40 real cells among 200 candidates; recall 0.8 accepts 32 of them, fpr 0.05 accepts 8 of the 160 others.
    assert adjusted_count(np.array([40]), np.array([200]), tpr=0.8, fpr=0.05) == pytest.approx([40.0])


def test_adjusted_count_removes_the_bias_of_counting_accepted_cells() -> None:
    rng = np.random.default_rng(0)
    true_n, n_candidates, tpr, fpr = 50, 400, 0.85, 0.005
    accepted = rng.binomial(true_n, tpr, 2000) + rng.binomial(n_candidates - true_n, fpr, 2000)
    plain_bias = accepted.mean() / true_n - 1
    adjusted_bias = adjusted_count(accepted, np.full(2000, n_candidates), tpr, fpr).mean() / true_n - 1
    assert plain_bias < -0.05  # counting accepted cells under-counts by ~11% here (42.5 + 1.75 of 50)
    assert abs(adjusted_bias) < 0.01


def test_adjusted_count_is_clipped_and_undefined_without_usable_rates() -> None:
    assert adjusted_count(np.array([0, 10]), np.array([100, 10]), 0.9, 0.2).tolist() == [0.0, 10.0]
    assert np.isnan(adjusted_count(np.array([5]), np.array([50]), 0.5, 0.4)).all()  # tpr - fpr < 0.2
    assert np.isnan(adjusted_count(np.array([5]), np.array([50]), float("nan"), 0.1)).all()


def test_add_adjusted_counts_per_slide_and_type() -> None:
    counts = pd.DataFrame(
        {
            "slide": ["a", "a", "b", "b"],
            "cell_type": ["hspc", "mk", "hspc", "mk"],
            "n_cells": [40, 9, 0, 0],
            "tissue_mm2": [2.0, 2.0, 1.0, 0.0],
        }
    )
    final_cells = pd.DataFrame({"slide": ["a"] * 200 + ["a"] * 12, "cell_type": ["hspc"] * 200 + ["mk"] * 12})
    table = add_adjusted_counts(counts, final_cells, {"hspc": (0.8, 0.05), "mk": (0.9, 0.0)})
    assert table["n_candidates"].tolist() == [200, 12, 0, 0]
    assert table["n_cells_adjusted"].tolist() == pytest.approx([40.0, 10.0, 0.0, 0.0])
    assert table["density_adjusted_per_mm2"].iloc[:3].tolist() == pytest.approx([20.0, 5.0, 0.0])
    assert np.isnan(table["density_adjusted_per_mm2"].iloc[3])  # no tissue: no density


def test_gate_metrics_report_the_false_positive_rate() -> None:
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0])
    probability = np.array([0.9, 0.8, 0.6, 0.2, 0.7, 0.1, 0.1, 0.3, 0.4])
    metrics = gate_metrics(y, probability)
    assert metrics["recall"] == pytest.approx(0.75)
    assert metrics["false_positive_rate"] == pytest.approx(0.2)


def test_a_slide_without_candidates_has_no_cells_even_without_rates() -> None:
    counts = pd.DataFrame(
        {"slide": ["a", "b"], "cell_type": ["mk", "mk"], "n_cells": [3, 0], "tissue_mm2": [1.0, 1.0]}
    )
    final_cells = pd.DataFrame({"slide": ["a"] * 5, "cell_type": ["mk"] * 5})
    table = add_adjusted_counts(counts, final_cells, {"mk": (float("nan"), float("nan"))})
    assert np.isnan(table["n_cells_adjusted"].iloc[0]) and table["n_cells_adjusted"].iloc[1] == 0.0


def test_cells_people_labelled_are_counted_as_labelled_and_the_rest_adjusted() -> None:
    """10 labelled candidates (4 yes) + 100 the model decided (20 accepted at tpr 0.8, fpr 0.1):
    4 + (20 - 0.1 x 100) / (0.8 - 0.1) = 4 + 14.29."""
    final_cells = pd.DataFrame(
        {
            "slide": ["a"] * 110,
            "cell_type": ["mk"] * 110,
            "decided_by": ["label"] * 10 + ["model"] * 100,
            "is_cell": [True] * 4 + [False] * 6 + [True] * 20 + [False] * 80,
        }
    )
    counts = pd.DataFrame({"slide": ["a"], "cell_type": ["mk"], "n_cells": [24], "tissue_mm2": [1.0]})
    table = add_adjusted_counts(counts, final_cells, {"mk": (0.8, 0.1)})
    assert table["n_candidates"].tolist() == [110]
    assert table["n_cells_adjusted"].iloc[0] == pytest.approx(4 + 10 / 0.7, abs=0.05)


def test_within_slide_rates_hold_out_whole_tiles() -> None:
    """The adjusted counts' rates come from folds of whole tiles (no tile on both sides); one tile: unknown."""
    from sklearn.dummy import DummyClassifier

    from mk_hspc.classify.training import within_slide_rates

    rng = np.random.default_rng(0)
    n = 120
    tiles = [f"s{i % 2}_s0_r00{i % 6}_c000" for i in range(n)]
    training_set = pd.DataFrame(
        {
            "cell_id": [f"{t}_mk_{i:05d}" for i, t in enumerate(tiles)],
            "slide": [t.split("_")[0] for t in tiles],
            "y": rng.integers(0, 2, n),
            "morphology_area_um2": rng.random(n),
        }
    )
    seen: list[set[str]] = []

    class Recording(DummyClassifier):
        def fit(self, X, y, sample_weight=None):
            seen.append({tiles[i] for i in X.index})
            return super().fit(X, y, sample_weight)

    rates = within_slide_rates(training_set, Recording(strategy="constant", constant=1), n_splits=3)
    assert rates == {"recall_within_slides": 1.0, "false_positive_rate_within_slides": 1.0}
    assert len(seen) == 3 and all(len(train) == 4 for train in seen)  # 6 tiles, 2 held out per fold
    one_tile = training_set.assign(cell_id=[f"s0_s0_r000_c000_mk_{i:05d}" for i in range(n)])
    assert all(
        np.isnan(v)
        for v in within_slide_rates(one_tile, Recording(strategy="constant", constant=1), n_splits=3).values()
    )
