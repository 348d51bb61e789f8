"""The demo's simulated annotator: labels candidates from the demo's typed ground truth.

A candidate of type ``mk`` (``hspc``) is ``yes`` when it is matched one-to-one, centroid to centroid within
``radius_um``, to a true object of that type; everything else (a confounder, background, a second
candidate on the same cell) is ``no``. The ground truth (``data/01_raw/ground_truth/cells.parquet``) has
``slide, cell_type, centroid_x_px, centroid_y_px`` (absolute CZI px); when it carries ``is_target``
(typed demo with confounders: osteoclasts, granulocytes, ...), only target rows count as true objects,
so a candidate on a confounder is ``no`` whatever its type.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd

from mk_hspc.classify.labels import LABELS_VERSION
from mk_hspc.models.evaluation import match_points

ANNOTATOR = "simulated"


def true_matches(
    cells: pd.DataFrame,
    truth: pd.DataFrame,
    slide_meta: Mapping[str, Mapping[str, Any]],
    radius_um: Mapping[str, float],
) -> pd.Series:
    """``cell_id -> bool``: whether each candidate is matched to a true object of its own type.

    Matching is one-to-one per slide and type (optimal assignment, ``models.evaluation.match_points``), so
    two candidates on one cell give one ``yes`` and one ``no``.
    """
    targets = truth
    if "is_target" in truth.columns:
        targets = truth[truth["is_target"].astype(bool)]
    matched = pd.Series(False, index=cells["cell_id"].astype(str), name="is_true_cell")
    for (slide, cell_type), group in cells.groupby(
        [cells["slide"].astype(str), cells["cell_type"].astype(str)]
    ):
        if cell_type not in radius_um:
            raise KeyError(f"no matching radius for cell type {cell_type!r} (simulated annotator radius_um)")
        px_um = float(slide_meta[slide]["pixel_size_um"])
        true = targets[
            (targets["slide"].astype(str) == slide) & (targets["cell_type"].astype(str) == cell_type)
        ]
        true_xy = true[["centroid_x_px", "centroid_y_px"]].to_numpy(float) * px_um
        pred_xy = group[["centroid_x_um", "centroid_y_um"]].to_numpy(float)
        _, _, _, pairs = match_points(pred_xy, true_xy, float(radius_um[cell_type]))
        if len(pairs):
            matched.loc[group["cell_id"].astype(str).to_numpy()[pairs[:, 0]]] = True
    return matched


def simulated_labels(
    cell_ids: list[str] | pd.Index, is_true_cell: pd.Series, *, annotator: str = ANNOTATOR
) -> dict[str, Any]:
    """A labels document (the ``labels`` contract) answering ``yes``/``no`` for each given cell."""
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "version": LABELS_VERSION,
        "labels": [
            {
                "cell_id": str(c),
                "label": "yes" if bool(is_true_cell[str(c)]) else "no",
                "annotator": annotator,
                "updated_at": stamp,
            }
            for c in cell_ids
        ],
    }


def pick_cells(cells: pd.DataFrame, n_per_type: int | None, seed: int) -> list[str]:
    """A seeded random pick of ``n_per_type`` candidates of each type (all when None), sorted."""
    picked = []
    rng = np.random.default_rng(seed)
    for _, group in cells.groupby(cells["cell_type"].astype(str)):
        ids = group["cell_id"].astype(str).to_numpy()
        if n_per_type is not None and n_per_type < len(ids):
            ids = rng.choice(ids, n_per_type, replace=False)
        picked.extend(ids.tolist())
    return sorted(picked)
