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
