"""The full run's trust checks: failed tiles out of the densities, and a validated model applied only where
its validation holds (its decision threshold, the segmentation that made its training features)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mk_hspc.classify.tracking import ModelNotValidatedError
from mk_hspc.datasets.tile_store import TileStore
from mk_hspc.pipelines.full import nodes as full_nodes
from mk_hspc.pipelines.full import pipeline as full_pipeline
from mk_hspc.pipelines.train import nodes as train_nodes
from tests.test_classify import labels_doc, make_cells

PX_UM = 0.5
NO_LABELS = {"version": 1, "labels": []}


# ------------------------------------------------------------------ full run: failed tiles and density
def test_full_run_counts_leave_out_the_area_of_failed_tiles() -> None:
    """With ``skip_bad_slides`` a tile of the full run can fail; its cells are absent from ``final_cells``
    (``make_cells_table`` keeps only segmented tiles), so its tissue area must not be in the denominator
    either (the sampled run passes ``failed_tiles`` to ``count_cells`` for this reason) and
    ``n_failed_tiles`` must say so. The full run's count node is called here exactly as the pipeline wires it.
    """
    # one slide, two tiles of equal tissue; t1 failed (no cells), t0 holds 10 accepted MKs
    side = 1000  # px; at 0.5 um/px a core is 0.25 mm2
    tile_sample = pd.DataFrame(
        {
            "tile_id": ["s1_t0", "s1_t1"],
            "slide": ["s1", "s1"],
            "core_w": [side, side],
            "core_h": [side, side],
            "core_tissue_fraction": [1.0, 1.0],
        }
    )
    final_cells = pd.DataFrame(
        {
            "cell_id": [f"s1_t0_mk_{i:05d}" for i in range(10)],
            "slide": "s1",
            "tile_id": "s1_t0",
            "cell_type": "mk",
            "area_um2": 300.0,
            "centroid_x_um": 10.0,
            "centroid_y_um": 10.0,
            "probability": 0.9,
            "is_cell": True,
            "model_recall": np.nan,
            "model_false_positive_rate": np.nan,
        }
    )
    store = TileStore(
        Path("/nonexistent"),
        {
            "params_hash": "p",
            "tiles": {"s1_t0": "s1"},
            "failed_tiles": [{"tile_id": "s1_t1", "slide": "s1", "stage": "segment", "error": "x"}],
        },
    )
    inputs = {
        "final_cells": final_cells,
        "full_tile_sample": tile_sample,
        "full_tile_store": store,
        "slide_meta": {"s1": {"pixel_size_um": PX_UM}},
        "slide_groups": pd.DataFrame({"slide": ["s1"], "group": ["A"]}),
        "slide_sheet": None,
        "tissue_maps": {},
        "params:train": {"classifiers": {"mk": {"cell_type": "mk", "registered_model": "m"}}},
    }
    node = next(n for n in full_pipeline.create_pipeline().nodes if n.name == "summarise_final_counts")
    counts, _, _ = node.func(*[inputs[name] for name in node.inputs])
    row = counts.set_index("cell_type").loc["mk"]
    # 10 cells on the one segmented tile of 0.25 mm2 tissue -> 40 / mm2 (not 20 / mm2 over 0.5 mm2)
    assert row["tissue_mm2"] == pytest.approx(0.25)
    assert row["density_per_mm2"] == pytest.approx(40.0)
    assert row["n_failed_tiles"] == 1


# --------------------------------------------------- validated model vs the features / threshold it meets
def _train_conf(tmp_path: Path, threshold: float) -> dict:
    return {
        "feature_set": "morphology",
        "estimator": "random_forest",
        "estimators": {
            "random_forest": {
                "class": "sklearn.ensemble.RandomForestClassifier",
                "params": {"n_estimators": 15, "class_weight": "balanced", "random_state": 0},
            }
        },
        "cv_splits": 4,
        "decision_threshold": threshold,
        "gates": {"accuracy": 0.75, "precision": 0.70, "recall": 0.70, "min_labels_per_class": 20},
        "classifiers": {"mk": {"cell_type": "mk", "registered_model": "rev_mk"}},
        "mlflow": {
            "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
            "artifact_location": str(tmp_path / "artifacts"),
            "experiment": "rev",
        },
        "active_learning": {"batch_size": 10, "min_distance_um": 0.0},
    }


def _store(params_hash: str) -> TileStore:
    return TileStore(Path("/nonexistent"), {"params_hash": params_hash, "tiles": {}})


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    """An MK model trained through the train nodes at threshold 0.5 on a store with params_hash 'seg-A'."""
    tmp_path = tmp_path_factory.mktemp("rev_mlflow")
    cells = make_cells()
    train = _train_conf(tmp_path, 0.5)
    classifier = train["classifiers"]["mk"]
    training_set, summary = train_nodes.make_training_set(
        labels_doc(cells), cells, _store("seg-A"), train, classifier
    )
    report, _ = train_nodes.train_classifier(training_set, summary, train, classifier)
    assert report["passed"] and report["version"] == 1
    full_cells = make_cells(seed=1).drop(columns="truth")
    return tmp_path, full_cells


def test_validated_model_is_applied_at_its_own_threshold_and_otherwise_refused(trained) -> None:
    """The gates (and the recall / false-positive rate the adjusted counts use) were measured at the training
    run's ``decision_threshold`` (0.5). A full run configured with another threshold (0.9) applies a model at a
    working point that no gate ever judged; it must refuse, or use the validated threshold."""
    tmp_path, full_cells = trained
    baseline = full_nodes.apply_validated_models(
        full_cells, _store("seg-A"), NO_LABELS, _train_conf(tmp_path, 0.5)
    )
    assert len(baseline) and baseline["is_cell"].any()
    try:
        final = full_nodes.apply_validated_models(
            full_cells, _store("seg-A"), NO_LABELS, _train_conf(tmp_path, 0.9)
        )
    except (ValueError, ModelNotValidatedError):
        return  # refused: fine
    assert (final["is_cell"] == (final["probability"] >= 0.5)).all(), (
        "the model was applied at threshold 0.9, but its gates/recall/fpr were validated at 0.5: "
        f"{int(baseline['is_cell'].sum())} cells at 0.5 vs {int(final['is_cell'].sum())} accepted"
    )


def test_validated_model_is_refused_on_features_of_other_segmentation_parameters(trained) -> None:
    """Promise: a model is refused if applied to features different from those it was trained on, including
    features made with different segmentation parameters. Training saw cells of tile store ``seg-A``; the full
    run's store was made with other parameters (``seg-B``), yet the same column names let it through."""
    tmp_path, full_cells = trained
    with pytest.raises((ValueError, ModelNotValidatedError), match="(?i)segmentation|params"):
        full_nodes.apply_validated_models(full_cells, _store("seg-B"), NO_LABELS, _train_conf(tmp_path, 0.5))


def test_a_newer_failing_training_run_is_named_when_the_older_validated_model_is_applied(
    trained, caplog: pytest.LogCaptureFixture
) -> None:
    """A retrain that fails its gates leaves the alias on the older passing version; the full run then
    applies that older model, and says so, naming the failed run."""
    tmp_path, full_cells = trained
    train = _train_conf(tmp_path, 0.5)
    classifier = train["classifiers"]["mk"]
    cells = make_cells()
    rng = np.random.default_rng(7)
    noise = labels_doc(cells.assign(truth=rng.random(len(cells)) < 0.5))  # labels unrelated to the cells
    training_set, summary = train_nodes.make_training_set(noise, cells, _store("seg-A"), train, classifier)
    report, _ = train_nodes.train_classifier(training_set, summary, train, classifier)
    assert not report["passed"]
    with caplog.at_level("WARNING"):
        final = full_nodes.apply_validated_models(full_cells, _store("seg-A"), NO_LABELS, train)
    assert set(final["model_version"]) == {1}
    assert report["run_id"] in caplog.text and "FAILED" in caplog.text


def test_labelled_candidates_keep_the_label_and_the_model_decides_the_rest(trained) -> None:
    """A person's yes / no is the decision for that cell (``decided_by: label``), whatever the model says; the
    adjusted count corrects only the model's part."""
    tmp_path, full_cells = trained
    train = _train_conf(tmp_path, 0.5)
    baseline = full_nodes.apply_validated_models(full_cells, _store("seg-A"), NO_LABELS, train)
    mk = baseline[baseline["cell_type"] == "mk"]
    accepted, rejected = mk[mk["is_cell"]].iloc[0], mk[~mk["is_cell"]].iloc[0]
    stamp = "2026-01-01T00:00:00.000000Z"
    labels = {
        "version": 1,
        "labels": [
            {"cell_id": accepted["cell_id"], "label": "no", "annotator": "a", "updated_at": stamp},
            {"cell_id": rejected["cell_id"], "label": "yes", "annotator": "a", "updated_at": stamp},
        ],
    }
    final = full_nodes.apply_validated_models(full_cells, _store("seg-A"), labels, train).set_index("cell_id")
    assert not final.loc[accepted["cell_id"], "is_cell"] and final.loc[rejected["cell_id"], "is_cell"]
    assert final.loc[[accepted["cell_id"], rejected["cell_id"]], "decided_by"].tolist() == ["label", "label"]
    assert (final.drop(index=[accepted["cell_id"], rejected["cell_id"]])["decided_by"] == "model").all()
