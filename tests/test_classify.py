"""Classification without Kedro: labels contract, training sets, grouped CV, gates, MLflow store, safe loading,
active learning, the simulated annotator and the group comparison."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from mk_hspc.classify import active, results, training
from mk_hspc.classify.labels import LabelsError, build_training_set, cell_type_of, labels_table
from mk_hspc.classify.simulated import simulated_labels, true_matches
from mk_hspc.classify.tracking import (
    SHA_TAG,
    VALIDATED_ALIAS,
    ModelNotValidatedError,
    load_validated_model,
    log_training_run,
    resolve_store,
)
from mk_hspc.slide_sheet import validate_slide_sheet

STAMP = "2026-11-30T06:00:00Z"
RF = {
    "class": "sklearn.ensemble.RandomForestClassifier",
    "params": {"n_estimators": 15, "class_weight": "balanced", "random_state": 0},
}
GATES = {"accuracy": 0.75, "precision": 0.70, "recall": 0.70}


def make_cells(n_slides: int = 4, per_slide: int = 40, seed: int = 0) -> pd.DataFrame:
    """Candidates of two types on several slides; a true cell has a larger area (a learnable feature)."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(n_slides):
        for i in range(per_slide):
            cell_type = "mk" if i % 2 else "hspc"
            is_true = bool(rng.random() < 0.5)
            rows.append(
                {
                    "cell_id": f"demo_{s:02d}_s0_r000_c000_{cell_type}_{i:05d}",
                    "slide": f"demo_{s:02d}",
                    "cell_type": cell_type,
                    "centroid_x_um": float(rng.uniform(0, 400)),
                    "centroid_y_um": float(rng.uniform(0, 400)),
                    "area_um2": 50.0,
                    "score": float(rng.random()),
                    "morphology_area_um2": float(rng.normal(80 if is_true else 30, 8)),
                    "morphology_solidity": float(rng.random()),
                    "truth": is_true,
                }
            )
    return pd.DataFrame(rows)


def labels_doc(cells: pd.DataFrame, *, flip: bool = False) -> dict:
    truth = cells["truth"] ^ flip if flip else cells["truth"]
    return {
        "version": 1,
        "labels": [
            {"cell_id": c, "label": "yes" if t else "no", "annotator": "ann", "updated_at": STAMP}
            for c, t in zip(cells["cell_id"], truth, strict=True)
        ],
    }


def features_of(cells: pd.DataFrame) -> pd.DataFrame:
    return cells.set_index("cell_id")[["morphology_area_um2", "morphology_solidity"]]


# ------------------------------------------------------------------------------------------- labels
def test_cell_type_is_parsed_from_the_stable_id() -> None:
    assert cell_type_of("LAB01_s0_r001_c002_hspc_00017") == "hspc"
    with pytest.raises(ValueError, match="does not follow"):
        cell_type_of("LAB01_hspc_x")


def test_invalid_labels_fail_naming_each_entry() -> None:
    doc = {
        "version": 1,
        "labels": [
            {"cell_id": "t_mk_00001", "label": "maybe", "annotator": "a", "updated_at": STAMP},
            {"cell_id": "t_mk_00002", "label": "yes", "annotator": "a"},
            {"cell_id": "bad-id", "label": "no", "annotator": "a", "updated_at": STAMP},
            {"cell_id": "t_mk_00003", "label": "yes", "annotator": "a", "updated_at": "yesterday"},
        ],
    }
    with pytest.raises(LabelsError) as error:
        labels_table(doc)
    message = str(error.value)
    assert "4 invalid entries" in message
    assert "t_mk_00001" in message and "'maybe'" in message
    assert "t_mk_00002" in message and "updated_at" in message
    assert "bad-id" in message and "t_mk_00003" in message


def test_unknown_cell_ids_fail_naming_them() -> None:
    cells = make_cells()
    doc = labels_doc(cells)
    doc["labels"].append(
        {"cell_id": "OTHER_s0_r000_c000_mk_00099", "label": "yes", "annotator": "a", "updated_at": STAMP}
    )
    with pytest.raises(LabelsError, match="OTHER_s0_r000_c000_mk_00099"):
        build_training_set(doc, cells, "mk", features_of(cells))


def test_unsure_and_conflicting_labels_are_reported_not_trained_on() -> None:
    cells = make_cells()
    doc = labels_doc(cells)
    mk_ids = cells.loc[cells["cell_type"] == "mk", "cell_id"].tolist()
    conflicting, unsure, agreed = mk_ids[0], mk_ids[1], mk_ids[2]
    doc["labels"] = [e for e in doc["labels"] if e["cell_id"] != unsure]
    doc["labels"] += [
        {
            "cell_id": conflicting,
            "label": "no" if cells.set_index("cell_id").truth[conflicting] else "yes",
            "annotator": "b",
            "updated_at": STAMP,
        },
        {"cell_id": unsure, "label": "unsure", "annotator": "a", "updated_at": STAMP},
        {"cell_id": agreed, "label": "unsure", "annotator": "b", "updated_at": STAMP},  # abstains
    ]
    training_set, summary = build_training_set(doc, cells, "mk", features_of(cells))
    assert summary["n_conflicting"] == 1 and summary["conflicting_examples"] == [conflicting]
    assert summary["n_unsure"] == 1 and summary["unsure_examples"] == [unsure]
    assert conflicting not in set(training_set["cell_id"]) and unsure not in set(training_set["cell_id"])
    assert agreed in set(training_set["cell_id"])
    assert summary["n_training"] == len(mk_ids) - 2 == summary["n_yes"] + summary["n_no"]
    assert summary["n_label_entries_other_types"] == (cells["cell_type"] == "hspc").sum()
    assert set(training_set.columns) == {
        "cell_id",
        "slide",
        "y",
        "morphology_area_um2",
        "morphology_solidity",
    }


# -------------------------------------------------------------------------------------- grouped CV
def test_grouped_cv_never_puts_a_slide_on_both_sides() -> None:
    groups = np.repeat([f"s{i}" for i in range(5)], [3, 10, 1, 7, 4])
    splits = list(training.grouped_splits(groups, n_splits=5))
    assert len(splits) == 5
    for train_idx, valid_idx in splits:
        assert set(groups[train_idx]).isdisjoint(groups[valid_idx])
        assert len(train_idx) + len(valid_idx) == len(groups)
    held_out = np.concatenate([valid for _, valid in splits])
    assert sorted(held_out) == list(range(len(groups)))  # every cell validated exactly once


def test_grouped_cv_needs_two_slides() -> None:
    with pytest.raises(ValueError, match="at least 2 slides"):
        list(training.grouped_splits(np.array(["s1", "s1"]), n_splits=3))


def test_estimators_come_from_scikit_learn_only() -> None:
    assert type(training.make_estimator(RF)).__name__ == "RandomForestClassifier"
    with pytest.raises(ValueError, match="only scikit-learn"):
        training.make_estimator({"class": "os.system", "params": {}})


def test_good_labels_pass_and_flipped_labels_fail_the_gates() -> None:
    cells = make_cells()
    good, _ = build_training_set(labels_doc(cells), cells, "hspc", features_of(cells))
    validation = training.cross_validate(good, training.make_estimator(RF), GATES, n_splits=4)
    assert validation.passed and validation.failing == []
    assert {f["validation_slides"][0] for f in validation.folds} == set(cells["slide"])
    poor, _ = build_training_set(labels_doc(cells, flip=True), cells, "hspc", features_of(cells))
    poor.loc[poor.index % 2 == 0, "y"] = (
        1 - poor.loc[poor.index % 2 == 0, "y"]
    )  # half right, half wrong: noise
    validation = training.cross_validate(poor, training.make_estimator(RF), GATES, n_splits=4)
    assert not validation.passed and validation.failing
    for gate in validation.failing:
        assert validation.gates[gate]["margin"] < 0
        assert validation.gates[gate]["value"] == pytest.approx(validation.metrics[gate])


def test_a_handful_of_lucky_labels_cannot_pass_the_gates() -> None:
    """Perfectly separable labels, but 3 yes and 3 no: the metric gates pass, ``min_labels_per_class`` not."""
    from mk_hspc.params_schema import Gates

    cells = make_cells()
    full, _ = build_training_set(labels_doc(cells), cells, "hspc", features_of(cells))
    few = pd.concat([full[full["y"] == 1].groupby("slide").head(1).head(3),
                     full[full["y"] == 0].groupby("slide").head(1).head(3)])  # fmt: skip
    assert few["slide"].nunique() >= 2 and len(few) == 6
    defaults = Gates().model_dump()
    assert defaults["min_labels_per_class"] == 20  # the documented default
    validation = training.cross_validate(few, training.make_estimator(RF), defaults, n_splits=4)
    assert validation.metrics["accuracy"] == 1.0  # lucky: every held-out label right
    assert validation.failing == ["min_labels_per_class"]
    assert validation.gates["min_labels_per_class"]["value"] == 3.0
    assert validation.gates["min_labels_per_class"]["margin"] == -17.0
    # With enough labels of each class the same gates pass.
    validation = training.cross_validate(full, training.make_estimator(RF), defaults, n_splits=4)
    assert validation.passed and validation.metrics["min_labels_per_class"] >= 20


def test_min_labels_per_class_is_validated() -> None:
    from pydantic import ValidationError

    from mk_hspc.params_schema import Gates

    for wrong in (0, -5, 2.5, "20"):
        with pytest.raises(ValidationError, match="min_labels_per_class"):
            Gates.model_validate({"min_labels_per_class": wrong})
    assert Gates.model_validate({"min_labels_per_class": 50}).min_labels_per_class == 50


# ------------------------------------------------------------------------------------------ MLflow
@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory):
    """One store for the module (creating an MLflow SQLite schema takes seconds); names differ per test."""
    return resolve_store(
        {
            "tracking_uri": "sqlite:///mlflow/mlflow.db",
            "artifact_location": "mlflow/artifacts",
            "experiment": "t",
        },
        tmp_path_factory.mktemp("project"),
    )


def _log(store, training_set: pd.DataFrame, name: str, *, passed: bool):
    model = training.fit_final(training_set, training.make_estimator(RF))
    validation = training.cross_validate(training_set, training.make_estimator(RF), GATES, n_splits=4)
    validation.passed = passed
    validation.failing = [] if passed else ["precision"]
    return log_training_run(
        store,
        run_name=name,
        registered_model=name,
        params={"cell_type": "mk", "estimator": "random_forest"},
        counts={"n_yes": int(training_set["y"].sum()), "n_no": int((training_set["y"] == 0).sum())},
        validation=validation.to_dict(),
        figure=training.validation_figure(validation, name),
        artifacts={"summary.json": {"n": len(training_set)}},
        model=model,
        example=training.feature_matrix(training_set).head(3),
    )


@pytest.fixture
def good_set() -> pd.DataFrame:
    cells = make_cells()
    return build_training_set(labels_doc(cells), cells, "mk", features_of(cells))[0]


def test_passing_model_is_registered_validated_and_loads_without_pickle(store, good_set) -> None:
    report = _log(store, good_set, "mk_model", passed=True)
    assert report["passed"] and report["version"] == 1
    # The MLflow client API reads the run and the alias from the project's store.
    client = mlflow.MlflowClient(tracking_uri=store.tracking_uri, registry_uri=store.tracking_uri)
    run = client.get_run(report["run_id"])
    assert run.data.tags["passed"] == "true" and run.data.params["estimator"] == "random_forest"
    assert run.data.metrics["n_yes"] == good_set["y"].sum()
    assert "gate_precision_margin" in run.data.metrics
    assert {a.path for a in client.list_artifacts(report["run_id"])} >= {"validation.png", "summary.json"}
    version = client.get_model_version_by_alias("mk_model", VALIDATED_ALIAS)
    assert int(version.version) == 1 and version.run_id == report["run_id"]
    loaded = load_validated_model(store, "mk_model")
    assert loaded.feature_names == ["morphology_area_um2", "morphology_solidity"]
    probability = loaded.model.predict_proba(training.feature_matrix(good_set))[:, 1]
    assert ((probability >= 0.5) == good_set["y"].astype(bool)).mean() > 0.9


def test_failing_model_is_not_registered_and_cannot_be_loaded(store, good_set) -> None:
    report = _log(store, good_set, "hspc_model", passed=False)
    assert not report["passed"] and report["version"] is None
    client = mlflow.MlflowClient(tracking_uri=store.tracking_uri, registry_uri=store.tracking_uri)
    assert client.get_run(report["run_id"]).data.tags["failing_gates"].startswith("precision")
    with pytest.raises(ModelNotValidatedError, match="has passed its validation gates"):
        load_validated_model(store, "hspc_model")


def _model_file(store, name: str) -> Path:
    client = mlflow.MlflowClient(tracking_uri=store.tracking_uri, registry_uri=store.tracking_uri)
    version = client.get_model_version_by_alias(name, VALIDATED_ALIAS)
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=version.source)) / "model.skops"


def test_tampered_model_file_is_refused(store, good_set) -> None:
    _log(store, good_set, "tampered_model", passed=True)
    path = _model_file(store, "tampered_model")
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(ModelNotValidatedError, match="not the file recorded at training"):
        load_validated_model(store, "tampered_model")


def test_pickled_model_is_refused_even_with_a_matching_digest(store, good_set, tmp_path: Path) -> None:
    """A registered, aliased version whose model is a pickle (digest recorded too) never gets unpickled."""
    model = training.fit_final(good_set, training.make_estimator(RF))
    mlflow.set_tracking_uri(store.tracking_uri)
    mlflow.set_registry_uri(store.tracking_uri)
    marker = tmp_path / "unpickled"
    with mlflow.start_run() as run:
        mlflow.set_tag("passed", "true")
        info = mlflow.sklearn.log_model(model, name="model", serialization_format="pickle")
    version = mlflow.register_model(info.model_uri, "evil")
    client = mlflow.MlflowClient(tracking_uri=store.tracking_uri, registry_uri=store.tracking_uri)
    client.set_registered_model_alias("evil", VALIDATED_ALIAS, version.version)
    client.set_model_version_tag("evil", version.version, SHA_TAG, "0" * 64)
    with pytest.raises(ModelNotValidatedError, match="not skops"):
        load_validated_model(store, "evil")
    # A pickle dropped in place of the skops file (its digest even recorded) is refused as well.
    _log(store, good_set, "swapped_model", passed=True)
    path = _model_file(store, "swapped_model")

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    path.write_bytes(pickle.dumps(Payload()))
    from mk_hspc.classify.tracking import sha256_file

    version = client.get_model_version_by_alias("swapped_model", VALIDATED_ALIAS)
    client.set_model_version_tag("swapped_model", version.version, SHA_TAG, sha256_file(path))
    with pytest.raises(ModelNotValidatedError, match="not a readable skops file"):
        load_validated_model(store, "swapped_model")
    assert not marker.exists()
    assert run.info.run_id


# --------------------------------------------------------------------------- simulated annotator
def test_simulated_annotator_matches_its_own_type_one_to_one() -> None:
    meta = {"s1": {"pixel_size_um": 0.5}}
    truth = pd.DataFrame(
        {
            "slide": ["s1"] * 3,
            "cell_type": ["mk", "hspc", "granulocyte"],
            "centroid_x_px": [100.0, 400.0, 800.0],
            "centroid_y_px": [100.0, 400.0, 800.0],
            "is_target": [True, True, False],
        }
    )
    cells = pd.DataFrame(
        {
            "cell_id": ["t_mk_00001", "t_mk_00002", "t_hspc_00003", "t_hspc_00004", "t_hspc_00005"],
            "slide": ["s1"] * 5,
            "cell_type": ["mk", "mk", "hspc", "hspc", "hspc"],
            # mk on the MK; a second mk on the same MK; hspc on the MK; hspc on the HSPC; hspc on a confounder
            "centroid_x_um": [51.0, 53.0, 50.0, 200.5, 400.0],
            "centroid_y_um": [50.0, 50.0, 50.0, 200.0, 400.0],
        }
    )
    matched = true_matches(cells, truth, meta, {"mk": 10.0, "hspc": 4.0})
    assert matched.to_dict() == {
        "t_mk_00001": True,
        "t_mk_00002": False,
        "t_hspc_00003": False,
        "t_hspc_00004": True,
        "t_hspc_00005": False,
    }
    doc = simulated_labels(list(cells["cell_id"]), matched)
    assert labels_table(doc)["label"].tolist() == ["yes", "no", "no", "yes", "no"]
    # Today's demo truth (no is_target column, only mk/hspc rows) works the same.
    assert (
        true_matches(cells, truth.drop(columns="is_target").iloc[:2], meta, {"mk": 10.0, "hspc": 4.0}).sum()
        == 2
    )


# ------------------------------------------------------------------------------ active learning
def test_next_batch_prefers_uncertain_cells_and_spreads_over_slides() -> None:
    candidates = pd.DataFrame(
        {
            "cell_id": [f"c{i}" for i in range(8)],
            "slide": ["a", "a", "a", "a", "b", "b", "c", "c"],
            "probability": [0.5, 0.52, 0.49, 0.99, 0.7, 0.01, 0.6, 0.0],
            "centroid_x_um": [0, 100, 1, 200, 0, 100, 0, 100],
            "centroid_y_um": [0] * 8,
        }
    )
    batch = active.next_batch(candidates, 4, min_distance_um=10.0)
    assert batch["cell_id"].tolist()[:3] == ["c0", "c6", "c4"]  # best of each slide, most uncertain first
    assert set(batch["slide"]) == {"a", "b", "c"}
    assert "c2" not in set(batch["cell_id"])  # 1 µm from c0: skipped for diversity
    assert batch["batch_rank"].tolist() == [0, 1, 2, 3]


def test_next_batch_seeks_the_class_the_gates_still_lack() -> None:
    """While yes labels are missing (MKs are a few % of their candidates) the likeliest yes come first."""
    rng = np.random.default_rng(0)
    n = 60
    candidates = pd.DataFrame(
        {
            "cell_id": [f"c{i:02d}" for i in range(n)],
            "slide": [f"s{i % 3}" for i in range(n)],
            "probability": rng.uniform(0, 1, n),
            "centroid_x_um": np.arange(n) * 100.0,
            "centroid_y_um": np.zeros(n),
        }
    )
    batch = active.next_batch(candidates, 6, deficit=active.label_deficit(16, 40, 20))  # 4 yes missing
    assert batch["pick"].tolist() == ["seek_yes"] * 4 + ["uncertain"] * 2
    # Slides take turns: each seek pick is among the two likeliest yes of its slide.
    per_slide_top2 = set(candidates.sort_values("probability").groupby("slide").tail(2)["cell_id"])
    assert set(batch["cell_id"][:4]) <= per_slide_top2 and batch["slide"][:3].nunique() == 3
    # Both classes lacking more than a batch holds: shared in proportion, each gets a slot.
    assert active.seek_slots(10, active.label_deficit(0, 15, 20)) == {"yes": 8, "no": 2}
    assert active.seek_slots(10, active.label_deficit(19, 25, 20)) == {"yes": 1, "no": 0}
    batch = active.next_batch(candidates, 10, deficit=active.label_deficit(0, 15, 20))
    no_picks = batch.loc[batch["pick"] == "seek_no", "probability"]
    assert len(no_picks) == 2 and no_picks.max() < candidates["probability"].median()
    # Enough labels of both classes: uncertainty only, as without a deficit.
    plain = active.next_batch(candidates, 6)
    assert (
        plain["cell_id"].tolist()
        == active.next_batch(candidates, 6, deficit={"yes": 0, "no": 0})["cell_id"].tolist()
    )
    assert set(plain["pick"]) == {"uncertain"}
    assert (
        plain["uncertainty"].min()
        >= candidates.assign(u=active.uncertainty(candidates["probability"]))["u"].nlargest(12).min()
    )


def test_next_batch_node_seeks_yes_while_the_gate_lacks_them() -> None:
    """The train pipeline's node: 2 yes of 20 required (no labels enough), no model -> the highest scores first."""
    from mk_hspc.pipelines.train.nodes import select_next_batch

    cells = make_cells()
    hspc = cells[cells["cell_type"] == "hspc"]
    labelled = hspc.head(4)
    doc = labels_doc(labelled)
    train = {
        "feature_set": "morphology",
        "gates": {"accuracy": 0.75, "min_labels_per_class": 20},
        "active_learning": {"batch_size": 6, "min_distance_um": 0.0},
    }
    batch = select_next_batch(None, {"n_yes": 2, "n_no": 30}, cells, doc, None, train, {"cell_type": "hspc"})
    assert batch["pick"].tolist() == ["seek_yes"] * 6  # 18 yes missing, no labels enough
    unlabelled = hspc[~hspc["cell_id"].isin(labelled["cell_id"])]
    per_slide_best = unlabelled.sort_values("score").groupby("slide").tail(2)["cell_id"]
    assert set(batch["cell_id"]) <= set(per_slide_best)


# ------------------------------------------------------------------------------- group comparison
def test_group_comparison_uses_a_rank_test_and_shows_n() -> None:
    counts = pd.DataFrame(
        {
            "slide": [f"s{i}" for i in range(6)],
            "group": ["A", "A", "A", "B", "B", "B"],
            "cell_type": ["mk"] * 6,
            "density_per_mm2": [10.0, 11.0, 12.0, 30.0, 31.0, 32.0],
        }
    )
    table = results.group_comparison(counts)
    row = table.iloc[0]
    assert row["test"] == "Mann-Whitney U" and row["n_per_level"] == "A: 3, B: 3" and row["factor"] == "group"
    assert row["p_value"] == pytest.approx(
        0.1, abs=1e-9
    )  # exact two-sided p for complete separation, n = 3 + 3
    single = results.group_comparison(counts.assign(group=[f"g{i}" for i in range(6)]))
    assert np.isnan(single.iloc[0]["p_value"]) and "2 slides" in single.iloc[0]["note"]
    sex = pd.DataFrame({"slide": counts["slide"], "group": counts["group"], "sex": ["F", "M"] * 3})
    by_factor = results.group_comparison(counts, sex).set_index("factor")
    assert by_factor.loc["sex", "n_per_level"] == "F: 3, M: 3" and by_factor.loc["group", "p_value"] < 0.2
    assert json.dumps(table.to_dict("records"), default=str)


# ---------------------------------------------------------------------------------- configuration
def test_every_configured_estimator_trains_and_is_storable_as_skops() -> None:
    import skops.io
    import yaml

    from mk_hspc.classify.tracking import REVIEWED_TYPES

    conf = yaml.safe_load((Path(__file__).parents[1] / "conf" / "base" / "parameters_train.yml").read_text())
    estimators = conf["train"]["estimators"]
    assert conf["train"]["estimator"] == "random_forest"
    assert estimators["random_forest"]["params"]["class_weight"] == "balanced"
    cells = make_cells()
    training_set, _ = build_training_set(labels_doc(cells), cells, "hspc", features_of(cells))
    for name, estimator_conf in estimators.items():
        small = {**estimator_conf, "params": {**estimator_conf["params"]}}
        small["params"]["n_estimators" if "n_estimators" in small["params"] else "max_iter"] = 10
        model = training.fit_final(training_set, training.make_estimator(small))
        untrusted = skops.io.get_untrusted_types(data=skops.io.dumps(model))
        assert set(untrusted) <= set(REVIEWED_TYPES), name


def test_train_parameters_are_checked_by_the_schema() -> None:
    import copy

    import yaml

    from mk_hspc.params_schema import ParameterError, Train

    conf = yaml.safe_load((Path(__file__).parents[1] / "conf" / "base" / "parameters_train.yml").read_text())
    Train.model_validate(conf["train"])
    bad = copy.deepcopy(conf["train"])
    bad["estimator"] = "svm"
    bad["gates"]["precision"] = 1.5
    bad["estimators"]["random_forest"]["class"] = "os.system"
    bad["classifiers"]["mk"]["cell_type"] = "hspc"
    from mk_hspc.params_schema import validate_parameters

    base = Path(__file__).parents[1] / "conf" / "base"
    params = {}
    for name in ("demo", "ingestion", "segmentation"):
        params.update(yaml.safe_load((base / f"parameters_{name}.yml").read_text()))
    params["demo"]["slide_sheet"] = "sheet.csv"
    params["ingestion"]["slides_dir"] = "slides"
    params["ingestion"]["pixel_size_um_override"] = None
    params["train"] = bad
    with pytest.raises(ParameterError) as error:
        validate_parameters(params)
    message = str(error.value)
    assert "train.gates.precision" in message and "train.estimators.random_forest.class" in message
    assert "train.classifiers" in message


def test_full_store_links_finished_tiles_and_never_changes_the_sampled_ones(tmp_path: Path) -> None:
    import os

    from mk_hspc.datasets.tile_store import link_finished_tiles
    from mk_hspc.tile_store import tile_path

    sampled, full = tmp_path / "sampled", tmp_path / "full"
    tiles = pd.DataFrame({"tile_id": ["s1_s0_r000_c000", "s1_s0_r000_c001"], "slide": ["s1", "s1"]})
    source = tile_path(sampled, "s1_s0_r000_c000", "s1")
    source.parent.mkdir(parents=True)
    source.write_bytes(b"finished tile")
    assert link_finished_tiles(sampled, full, tiles) == 1  # the other tile has no file to reuse
    linked = tile_path(full, "s1_s0_r000_c000", "s1")
    assert linked.read_bytes() == b"finished tile" and linked.stat().st_ino == source.stat().st_ino
    assert link_finished_tiles(sampled, full, tiles) == 0  # present already: left alone
    # A tile recomputed in the full store is written through a temporary file and a rename (tile_store).
    replacement = linked.with_name("tmp.h5")
    replacement.write_bytes(b"recomputed")
    os.replace(replacement, linked)
    assert source.read_bytes() == b"finished tile"


def test_feature_set_all_adds_every_extractor_of_the_tile_store(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from mk_hspc.pipelines.train import nodes

    cells = make_cells(n_slides=2, per_slide=4)
    ids = cells["cell_id"].tolist()
    resnet = pd.DataFrame(
        np.arange(len(ids) * 3, dtype=float).reshape(-1, 3),
        index=ids,
        columns=["resnet50_0000", "resnet50_0001", "resnet50_0002"],
    )
    store = SimpleNamespace(
        root=Path("store"),
        tiles={"t0": "demo_00"},
        read=lambda tile_id, include_labels: SimpleNamespace(features={"morphology": None, "resnet50": None}),
    )
    asked = []

    def fake_load_features(root, name, cell_ids):
        asked.append((name, list(cell_ids)))
        return resnet.loc[list(cell_ids)]

    monkeypatch.setattr(nodes, "load_features", fake_load_features)
    morphology = nodes.candidate_features(cells, store, "morphology", ids[:3])
    assert list(morphology.columns) == ["morphology_area_um2", "morphology_solidity"]
    everything = nodes.candidate_features(cells, store, "all", ids[:3])
    assert list(everything.columns) == [*morphology.columns, *resnet.columns]
    assert everything.index.tolist() == ids[:3] and asked == [("resnet50", ids[:3])]
    with pytest.raises(ValueError, match="feature_set"):
        nodes.candidate_features(cells, store, "sam2", ids)


def test_kruskal_with_all_tied_values_gives_a_reason_not_a_silent_nan() -> None:
    """Three groups whose slides all have the same density (e.g. no MK found anywhere): Mann-Whitney gives
    p = 1 for the two-group case, but Kruskal-Wallis returns NaN (scipy: H undefined) and the row carries
    the test name with an empty note, i.e. an unexplained NaN p-value. The docstring promises a NaN p only with
    its reason."""
    counts = pd.DataFrame(
        {
            "slide": [f"s{i}" for i in range(6)],
            "group": list("AABBCC"),
            "cell_type": ["mk"] * 6,
            "density_per_mm2": [0.0] * 6,
        }
    )
    two = results.group_comparison(counts[counts["group"] != "C"]).iloc[0]
    assert two["p_value"] == pytest.approx(1.0)
    row = results.group_comparison(counts).iloc[0]
    assert np.isfinite(row["p_value"]) or row["note"], row.to_dict()


def test_slide_sheet_factors_join_slides_the_way_the_sheet_is_validated() -> None:
    """``validate_slide_sheet`` strips blanks around slide names and groups (a hand-written sheet), so
    ``slide_groups`` has ``s1``; ``slide_factors`` merges the raw sheet (``' s1 '``), so the slide's sex is lost
    (NaN) and it silently drops out of the sex comparison, and ``'F '`` / ``'F'`` become two levels."""
    sheet = pd.DataFrame(
        {
            "slide": [" s1 ", "s2", "s3", "s4"],
            "group": ["A", "A", "B", "B"],
            "sex": ["F ", "F", "M", "M"],
        }
    )
    groups = validate_slide_sheet(sheet, ["s1", "s2", "s3", "s4"], sheet_path="sheet.csv", strict=True)
    factors = results.slide_factors(groups, sheet).set_index("slide")
    assert factors.loc["s1", "sex"] == "F"
    assert sorted(factors["sex"].unique()) == ["F", "M"]


def test_ungrouped_slides_are_not_compared_as_a_group() -> None:
    """With ``slide_sheet_strict: false`` slides without a group get the placeholder ``'ungrouped'``
    (``slide_sheet.UNGROUPED``). The comparison then tests A vs B vs 'ungrouped' with Kruskal-Wallis instead
    of A vs B with Mann-Whitney: a placeholder is treated as an experimental group."""
    counts = pd.DataFrame(
        {
            "slide": [f"s{i}" for i in range(6)],
            "group": ["A", "A", "B", "B", "ungrouped", "ungrouped"],
            "cell_type": ["mk"] * 6,
            "density_per_mm2": [10.0, 11.0, 30.0, 31.0, 20.0, 21.0],
        }
    )
    row = results.group_comparison(counts).iloc[0]
    assert "ungrouped" not in row["levels"].split(", "), row.to_dict()
    assert row["test"] == "Mann-Whitney U"


def test_simulated_labels_refuse_slides_the_demo_ground_truth_does_not_describe() -> None:
    """A lab's study with the demo's ground truth still in data/01_raw: every candidate was labelled `no`."""
    from mk_hspc.pipelines.simulate_labels.nodes import simulate_demo_labels

    cells = make_cells(n_slides=2)
    truth = pd.DataFrame(
        {"slide": ["demo_00"], "cell_type": ["mk"], "centroid_x_px": [10.0], "centroid_y_px": [10.0]}
    )
    annotator = {"radius_um": {"mk": 12.0, "hspc": 4.0}, "seed": 0, "n_per_type": None}
    with pytest.raises(ValueError, match=r"1 of the 2 slides.*demo_01"):
        simulate_demo_labels(cells, truth, {}, annotator)
