"""Training nodes (run once per cell type under the namespaces ``mk`` and ``hspc``).

Thin wrappers over ``mk_hspc.classify``: labels joined to candidates, grouped CV and gates, one MLflow run
per model (registered with alias ``validated`` only when it passes), and the next annotation batch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import pandas as pd

from mk_hspc.classify import active, training
from mk_hspc.classify.labels import build_training_set, feature_columns, labels_table
from mk_hspc.classify.tracking import SEGMENTATION_PARAM, log_training_run, resolve_store
from mk_hspc.datasets.tile_store import TileStore
from mk_hspc.engine.cells_table import load_features

logger = logging.getLogger(__name__)
MORPHOLOGY = "morphology"


def candidate_features(
    cells: pd.DataFrame, tile_store: TileStore, feature_set: str, cell_ids: list[str] | None = None
) -> pd.DataFrame:
    """Features indexed by ``cell_id``: the cells table's morphology columns, plus (``feature_set: all``)
    every other extractor the tile store holds, read tile by tile for the wanted cells only."""
    if feature_set not in (MORPHOLOGY, "all"):
        raise ValueError(f"train.feature_set must be 'morphology' or 'all', got {feature_set!r}")
    ids = cells["cell_id"].astype(str) if cell_ids is None else pd.Series(cell_ids, dtype=str)
    table = cells.set_index(cells["cell_id"].astype(str))
    features = table.loc[ids, feature_columns(cells, (f"{MORPHOLOGY}_",))]
    if feature_set == "all" and len(ids):
        first_tile = next(iter(tile_store.tiles))
        wide = sorted(set(tile_store.read(first_tile, include_labels=False).features) - {MORPHOLOGY})
        for name in wide:
            features = features.join(load_features(tile_store.root, name, cell_ids=list(ids)))
    features.index.name = "cell_id"
    return features


def make_training_set(
    labels: dict[str, Any],
    cells: pd.DataFrame,
    tile_store: TileStore,
    train: Mapping[str, Any],
    classifier: Mapping[str, Any],
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Labelled candidates of this classifier's type with their features, and the summary of the labels."""
    cell_type = classifier["cell_type"]
    table = labels_table(labels)
    own = sorted(
        set(table.loc[table["cell_type"] == cell_type, "cell_id"]) & set(cells["cell_id"].astype(str))
    )
    features = candidate_features(cells, tile_store, train["feature_set"], own)
    training_set, summary = build_training_set(labels, cells, cell_type, features)
    summary["feature_set"] = train["feature_set"]
    # The segmentation that made these candidates and features: the full run refuses the model elsewhere.
    summary[SEGMENTATION_PARAM] = tile_store.params_hash
    logger.info(
        "%s training set: %d cells (%d yes, %d no) from %d slides; left out: %d unsure, %d conflicting",
        cell_type, summary["n_training"], summary["n_yes"], summary["n_no"], summary["n_slides"],
        summary["n_unsure"], summary["n_conflicting"],
    )  # fmt: skip
    return training_set, summary


def train_classifier(
    training_set: pd.DataFrame,
    training_summary: dict[str, Any],
    train: Mapping[str, Any],
    classifier: Mapping[str, Any],
) -> tuple[dict[str, Any], Any]:
    """Grouped CV by slide, the gates, the final fit, one MLflow run; registered + ``validated`` if it passed.

    Returns the training report (run id, verdict, each gate's margin, registered version) and the fitted
    model (None with one class only), which the next-batch node uses within this run.
    """
    cell_type = classifier["cell_type"]
    estimator_conf = train["estimators"][train["estimator"]]
    estimator = training.make_estimator(estimator_conf)
    started = time.perf_counter()
    n_classes = training_set["y"].nunique() if len(training_set) else 0
    if n_classes < 2 or training_set["slide"].nunique() < 2:
        reason = (
            f"{training_summary['n_yes']} yes and {training_summary['n_no']} no labels"
            if n_classes < 2
            else f"labels from {training_set['slide'].nunique()} slide(s)"
        )
        validation = training.Validation(
            probability=training_set["y"].to_numpy(float),
            y=training_set["y"].to_numpy(int),
            metrics={},
            gates=training.judge({}, train["gates"])[0],
            passed=False,
            failing=sorted(train["gates"]),
        )
        validation.gates["trainable"] = {
            "value": 0.0,
            "threshold": 1.0,
            "margin": -1.0,
            "passed": False,
            "reason": reason,
        }
        validation.failing.append("trainable")
        model = None
    else:
        validation = training.cross_validate(
            training_set, estimator, train["gates"], n_splits=int(train["cv_splits"]),
            threshold=float(train["decision_threshold"]),
        )  # fmt: skip
        model = training.fit_final(training_set, estimator)
        # For the full run's adjusted counts (not a gate): the rates on held-out tiles of these slides.
        validation.metrics.update(
            training.within_slide_rates(
                training_set, estimator, n_splits=int(train["cv_splits"]),
                threshold=float(train["decision_threshold"]),
            )
        )  # fmt: skip
    seconds = time.perf_counter() - started
    figure = training.validation_figure(validation, cell_type.upper(), float(train["decision_threshold"]))
    example = training.feature_matrix(training_set).head(5) if model is not None else None
    params = {
        "cell_type": cell_type,
        "feature_set": train["feature_set"],
        "estimator": train["estimator"],
        "estimator_class": estimator_conf["class"],
        **{f"estimator.{k}": v for k, v in (estimator_conf.get("params") or {}).items()},
        "cv_splits": train["cv_splits"],
        "decision_threshold": train["decision_threshold"],
        **{f"gate.{k}": v for k, v in train["gates"].items()},
        "n_features": training_summary["n_features"],
        SEGMENTATION_PARAM: training_summary.get(SEGMENTATION_PARAM, ""),
    }
    counts = {
        k: training_summary[k]
        for k in ("n_training", "n_yes", "n_no", "n_unsure", "n_conflicting", "n_slides")
    }
    counts["train_seconds"] = seconds
    report = log_training_run(
        resolve_store(train["mlflow"]),
        run_name=f"{cell_type}-{train['estimator']}",
        registered_model=classifier["registered_model"],
        params=params,
        counts=counts,
        validation=validation.to_dict(),
        figure=figure,
        artifacts={"training_summary.json": training_summary, "validation.json": validation.to_dict()},
        model=model,
        example=example,
    )
    report.update(cell_type=cell_type, counts=counts, metrics=validation.metrics)
    if report["passed"]:
        logger.info("%s classifier passed its gates: registered %s version %s (alias validated)",
                    cell_type, report["registered_model"], report["version"])  # fmt: skip
    else:
        logger.warning(
            "%s classifier FAILED gate(s) %s; not registered (MLflow run %s)",
            cell_type,
            ", ".join(f"{g} (margin {validation.gates[g]['margin']:+.3f})" for g in validation.failing),
            report["run_id"],
        )
    return report, model


def select_next_batch(
    model: Any,
    training_summary: dict[str, Any],
    cells: pd.DataFrame,
    labels: dict[str, Any],
    tile_store: TileStore,
    train: Mapping[str, Any],
    classifier: Mapping[str, Any],
) -> pd.DataFrame:
    """The next annotation batch: unlabelled candidates of this type, spread over slides: first those most
    likely of a class that has fewer labels than ``train.gates.min_labels_per_class``, then the most
    uncertain (``classify.active``).

    Without a model (one class labelled so far) the segmenter's score stands in for the probability.
    """
    cell_type = classifier["cell_type"]
    labelled = set(labels_table(labels)["cell_id"])
    pool = cells[(cells["cell_type"] == cell_type) & ~cells["cell_id"].astype(str).isin(labelled)]
    if model is None or pool.empty:
        probability = pool["score"].to_numpy(float)
    else:
        features = candidate_features(pool, tile_store, train["feature_set"])
        probability = model.predict_proba(features.astype("float64"))[:, list(model.classes_).index(1)]
    candidates = pool[["cell_id", "slide", "centroid_x_um", "centroid_y_um"]].assign(probability=probability)
    settings = train["active_learning"]
    deficit = active.label_deficit(
        int(training_summary["n_yes"]),
        int(training_summary["n_no"]),
        int(train["gates"].get("min_labels_per_class", 0)),
    )
    return active.next_batch(
        candidates,
        int(settings["batch_size"]),
        min_distance_um=float(settings["min_distance_um"]),
        deficit=deficit,
    )
