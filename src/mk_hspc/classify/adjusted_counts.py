"""Counts corrected for the classifier's measured errors ("adjusted classify and count").

A classifier with recall ``tpr`` and false-positive rate ``fpr`` accepts, of ``n_candidates`` candidates of
which ``true`` are real cells, ``tpr * true + fpr * (n_candidates - true)`` in expectation. Solving for
``true`` gives the adjusted count (Forman 2008, "Quantifying counts and costs via classification", Data Min.
Knowl. Discov. 17:164-206)::

    n_adjusted = (n_accepted - fpr * n_candidates) / (tpr - fpr),  clipped to [0, n_candidates]

Why: counting the accepted cells is biased whenever recall and precision differ (a classifier at recall 0.85
and precision 0.97 under-counts by ~12% on every slide, which is larger than the 10% a study may need),
whereas the adjusted count is unbiased when ``tpr`` and ``fpr`` hold on the slide. Both rates come from the
validated model's out-of-fold predictions on held-out tiles of the labelled slides (where the full run applies
it; the gates judge held-out slides, which is pessimistic for the study's own slides). Candidates a person
labelled are counted by their label and take no correction.

Assumption (stated in the README): the labelled candidates are representative of all candidates (a random
or full-page sample). Labels picked for uncertainty (an active-learning batch) make the held-out rates
pessimistic; the plain count ``n_cells`` stays beside the adjusted one.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

# Below this tpr - fpr the classifier barely separates the classes and the correction would divide by ~0.
MIN_RATE_GAP = 0.2


def adjusted_count(
    n_accepted: np.ndarray | pd.Series, n_candidates: np.ndarray | pd.Series, tpr: float, fpr: float
) -> np.ndarray:
    """``(n_accepted - fpr * n_candidates) / (tpr - fpr)`` clipped to ``[0, n_candidates]``; NaN when the
    rates are unknown or ``tpr - fpr < MIN_RATE_GAP``."""
    accepted = np.asarray(n_accepted, dtype=float)
    candidates = np.asarray(n_candidates, dtype=float)
    if not (np.isfinite(tpr) and np.isfinite(fpr)) or tpr - fpr < MIN_RATE_GAP:
        return np.full(accepted.shape, np.nan)
    return np.clip((accepted - fpr * candidates) / (tpr - fpr), 0.0, candidates)


def add_adjusted_counts(
    counts: pd.DataFrame, final_cells: pd.DataFrame, rates: dict[str, tuple[float, float]]
) -> pd.DataFrame:
    """``counts`` (per slide and cell type, with ``n_cells`` and ``tissue_mm2``) plus ``n_candidates``,
    ``n_cells_adjusted`` and ``density_adjusted_per_mm2``.

    The adjusted count is the cells people labelled ``yes`` plus the adjusted count of the candidates the
    model decided (``decided_by``; every candidate when the column is absent).

    Args:
        counts: the per-slide table of :func:`mk_hspc.counts.count_cells`.
        final_cells: every classified candidate (``slide``, ``cell_type``).
        rates: ``cell_type -> (tpr, fpr)`` of the model that classified that type.
    """
    by = [final_cells["slide"].astype(str), final_cells["cell_type"].astype(str)]
    keys = pd.MultiIndex.from_frame(counts[["slide", "cell_type"]].astype(str))

    def per_row(values: pd.Series) -> np.ndarray:
        return values.groupby(by).sum().reindex(keys, fill_value=0).to_numpy("float64")

    n_candidates = per_row(pd.Series(1, index=final_cells.index))
    if "decided_by" in final_cells.columns:
        # The correction is for the model's errors, so it applies to the cells the model decided; cells
        # people labelled count as labelled.
        by_label = final_cells["decided_by"].astype(str).eq("label")
        is_cell = final_cells["is_cell"].astype(bool)
        labelled_yes = per_row(is_cell & by_label)
        model_candidates = per_row(~by_label)
        model_accepted = per_row(is_cell & ~by_label)
    else:  # every candidate decided by the model: the accepted ones are the counts' n_cells
        labelled_yes = np.zeros(len(keys))
        model_candidates = n_candidates
        model_accepted = counts["n_cells"].to_numpy("float64")
    table = counts.assign(n_candidates=n_candidates.astype("int64"))
    adjusted = np.full(len(table), np.nan)
    for cell_type, (tpr, fpr) in rates.items():
        rows = (table["cell_type"] == cell_type).to_numpy()
        adjusted[rows] = labelled_yes[rows] + adjusted_count(
            model_accepted[rows], model_candidates[rows], tpr, fpr
        )
    adjusted[n_candidates == 0] = 0.0  # no candidates: no cells, whatever the rates
    table["n_cells_adjusted"] = np.round(adjusted, 1)
    area = table["tissue_mm2"].where(table["tissue_mm2"] > 0)
    table["density_adjusted_per_mm2"] = table["n_cells_adjusted"] / area
    return table
