"""The full run: every tissue tile segmented (reusing finished sampled tiles), validated models applied,
counts and densities per slide and group, plots and the group comparison."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from mk_hspc.classify import results
from mk_hspc.classify.adjusted_counts import add_adjusted_counts
from mk_hspc.classify.labels import labels_table, resolve_labels
from mk_hspc.classify.tracking import load_validated_model, newer_failed_run, resolve_store
from mk_hspc.counts import count_cells
from mk_hspc.datasets.tile_store import TileStore
from mk_hspc.pipelines.train.nodes import candidate_features
from mk_hspc.tiling import sample_tiles
from mk_hspc.tissue.maps import TissueMap

logger = logging.getLogger(__name__)


def make_full_tile_sample(tile_index: pd.DataFrame) -> pd.DataFrame:
    """Every tissue tile, in the tile sample's layout (a sample of fraction 1.0)."""
    return sample_tiles(tile_index, fraction=1.0, seed=0)


def check_models_before_the_full_run(
    train: Mapping[str, Any],
    segmentation: Mapping[str, Any],
    segmenters: Mapping[str, Any],
    extractors: Sequence[Any],
) -> None:
    """The refusals of :func:`apply_validated_models` that need no tile, before the full run segments
    every tissue tile (hours on a study): a type without a validated model, a model validated at another
    decision threshold or on features of another segmentation than the one this run will make (the plugins
    built from ``segmentation``, as the segmentation node builds them).

    Raises:
        ModelNotValidatedError: naming the model and what to do.
    """
    from mk_hspc.engine.tile_work import compute_params_hash
    from mk_hspc.pipelines.segmentation.nodes import chosen_plugin_conf

    params_hash = compute_params_hash(segmenters, extractors, chosen_plugin_conf(segmentation))
    store = resolve_store(train["mlflow"])
    for classifier in train["classifiers"].values():
        loaded = load_validated_model(store, classifier["registered_model"])
        loaded.check_applicable(float(train["decision_threshold"]), params_hash)


def apply_validated_models(
    full_cells: pd.DataFrame, full_tile_store: TileStore, labels: Mapping[str, Any], train: Mapping[str, Any]
) -> pd.DataFrame:
    """Every candidate with ``probability`` (P(yes) from its type's validated model) and ``is_cell``.

    A candidate a person labelled keeps that decision (``decided_by``: ``label``; ``yes``/``no`` agreed by its
    annotators, as training resolves them): the model is for the cells nobody looked at (``model``).

    Raises:
        ModelNotValidatedError: a cell type has no registered model that passed its gates, or its gates were
            judged at another decision threshold or on features of another segmentation.
    """
    store = resolve_store(train["mlflow"])
    threshold = float(train["decision_threshold"])
    decided, _ = resolve_labels(labels_table(labels))
    human = decided.set_index("cell_id")["label"]
    frames = []
    for classifier in train["classifiers"].values():
        cell_type = classifier["cell_type"]
        loaded = load_validated_model(store, classifier["registered_model"])
        loaded.check_applicable(threshold, full_tile_store.params_hash)
        newer = newer_failed_run(store, loaded.registered_model, loaded.run_id)
        if newer is not None:
            logger.warning(
                "%s: the latest training run %s (%s) FAILED its gates (%s); applying the older validated "
                "version %d (run %s). Label more and retrain if the newer labels should count.",
                loaded.registered_model, newer["run_id"], newer["started"], newer["failing_gates"],
                loaded.version, loaded.run_id,
            )  # fmt: skip
        cells = full_cells[full_cells["cell_type"] == cell_type]
        feature_set = (
            "all" if any(not c.startswith("morphology_") for c in loaded.feature_names) else "morphology"
        )
        features = candidate_features(cells, full_tile_store, feature_set)
        classified = results.classify_cells(cells, features, loaded.model, loaded.feature_names, threshold)
        label = human.reindex(classified["cell_id"].astype(str)).to_numpy()
        labelled = pd.notna(label)
        classified = classified.assign(
            label=np.where(labelled, label, ""),
            decided_by=np.where(labelled, "label", "model"),
            is_cell=np.where(labelled, label == "yes", classified["is_cell"].to_numpy(bool)),
        )
        frames.append(
            classified.assign(
                model_version=loaded.version,
                model_run_id=loaded.run_id,
                model_recall=loaded.recall,
                model_false_positive_rate=loaded.false_positive_rate,
            )
        )
        logger.info("%s: %d of %d candidates are cells (%d labelled by people, the rest by %s version %d)",
                    cell_type, int(classified["is_cell"].sum()), len(classified), int(labelled.sum()),
                    loaded.registered_model, loaded.version)  # fmt: skip
    return pd.concat(frames, ignore_index=True) if frames else full_cells.iloc[:0]


def model_rates(final_cells: pd.DataFrame) -> dict[str, tuple[float, float]]:
    """``cell_type -> (recall, false-positive rate)`` of the model that classified each type's cells."""
    if final_cells.empty or "model_recall" not in final_cells.columns:
        return {}
    first = final_cells.groupby(final_cells["cell_type"].astype(str)).first()
    return {str(t): (float(r.model_recall), float(r.model_false_positive_rate)) for t, r in first.iterrows()}


def summarise_final_counts(
    final_cells: pd.DataFrame,
    full_tile_sample: pd.DataFrame,
    full_tile_store: TileStore,
    slide_meta: dict[str, dict[str, Any]],
    slide_groups: pd.DataFrame,
    slide_sheet: pd.DataFrame | None,
    tissue_maps: Mapping[str, Callable[[], TissueMap]],
    train: Mapping[str, Any],
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Figure]]:
    """Counts and densities per slide (all tissue) and group, the group comparison (by ``group`` and every
    other column of the slide sheet, e.g. sex and treatment), and the plots.

    Each slide gets the accepted cells (``n_cells``, ``density_per_mm2``) and the count corrected for the
    validated model's held-out recall and false-positive rate (``n_cells_adjusted``,
    ``density_adjusted_per_mm2``; see ``classify.adjusted_counts``), the best estimate of the true number; the
    group comparison tests the adjusted densities when every type has them. Tiles that failed to segment
    (``skip_bad_slides``) have no cells in ``final_cells``, so their tissue is left out of the densities too
    (``n_failed_tiles`` says how many per slide).
    """
    cell_types = sorted(c["cell_type"] for c in train["classifiers"].values())
    accepted = final_cells[final_cells["is_cell"].astype(bool)]
    counts = count_cells(
        accepted, full_tile_sample, slide_meta, slide_groups, cell_types,
        failed_tiles=full_tile_store.failed_tiles,
    )  # fmt: skip
    counts = counts.rename(columns={"sampled_tissue_mm2": "tissue_mm2"})
    counts = add_adjusted_counts(counts, final_cells, model_rates(final_cells))
    value = "density_adjusted_per_mm2"
    if counts.loc[counts["tissue_mm2"] > 0, value].isna().any():
        logger.warning(
            "some cell types have no adjusted counts (their model's run lacks false_positive_rate: a model "
            "trained before adjusted counts existed; run `kedro run --pipelines train` again): comparing plain "
            "densities"
        )
        value = "density_per_mm2"
    factors = results.slide_factors(slide_groups, slide_sheet)
    comparison = results.group_comparison(counts, factors, value=value)
    plots = {
        "counts_by_group.png": results.counts_figure(counts),
        "area_histograms.png": results.area_histograms(final_cells),
        **{
            f"{name}.png": fig
            for name, fig in results.density_maps(final_cells, tissue_maps, cell_types).items()
        },
    }
    return counts, comparison, plots
