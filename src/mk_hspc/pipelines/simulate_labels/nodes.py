"""The demo's simulated annotator as a node: candidates + typed ground truth -> the labels dataset."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd

from mk_hspc.classify.simulated import pick_cells, simulated_labels, true_matches


def simulate_demo_labels(
    cells: pd.DataFrame,
    demo_ground_truth: pd.DataFrame,
    slide_meta: dict[str, dict[str, Any]],
    simulated_annotator: Mapping[str, Any],
) -> dict[str, Any]:
    """Yes/No for the picked candidates, from the demo's ground truth (see ``classify.simulated``).

    Raises:
        ValueError: the ground truth does not describe every slide of the cells (a lab's study with the demo's
            ground truth still in the folder would otherwise get every candidate labelled ``no``).
    """
    slides = set(cells["slide"].astype(str))
    described = slides & set(demo_ground_truth["slide"].astype(str))
    if slides and described != slides:
        raise ValueError(
            f"the demo ground truth describes {len(described)} of the {len(slides)} slides of the cells table "
            f"(missing e.g. {sorted(slides - described)[:3]}): simulated labels are for the demo study only, "
            "never for a lab's slides; label those with `kedro annotate`"
        )
    matched = true_matches(cells, demo_ground_truth, slide_meta, simulated_annotator["radius_um"])
    n_per_type = simulated_annotator.get("n_per_type")
    picked = pick_cells(
        cells, None if n_per_type is None else int(n_per_type), int(simulated_annotator["seed"])
    )
    return simulated_labels(picked, matched)
