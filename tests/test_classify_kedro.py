"""The demo loop as a user drives it: `kedro run`, simulated labels, `--pipelines train`, `--pipelines full`."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from mk_hspc.classify.simulated import true_matches
from mk_hspc.classify.tracking import VALIDATED_ALIAS
from mk_hspc.datasets.atomic import AtomicDataset
from tests.conftest import kedro, make_project_copy

# The small demo with larger slides (4000 x 3000 px) and more MKs (250 / mm²): 15-60 MKs and 300-400 nucleus
# targets per slide, so that 10% of a slide's count is more than one cell. The segmenters' score floors are at
# 0 (recall-first candidates: the demo yields false candidates to learn from); forests of the default size.
RUN = (
    "demo.spec=small,demo.overrides.mk_per_mm2=250.0,demo.overrides.width_px=4000,"
    "demo.overrides.height_px=3000,ingestion.tiles.tile_px=1000,ingestion.sampling.fraction=0.5,"
    "ingestion.tissue.map_um_per_px=4.0,segmentation.runtime.progress=false,"
    "segmentation.segmenters.mk.params.classical.min_score=0.0,"
    "segmentation.segmenters.hspc.params.classical.min_score=0.0,train.cv_splits=4"
)
# Runs that only check refusals train small forests.
SMALL_FORESTS = "train.estimators.random_forest.params.n_estimators=40"
POOR_STORE = f"train.mlflow.tracking_uri=sqlite:///data/06_models/poor/mlflow.db,{SMALL_FORESTS}"


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    project = make_project_copy(tmp_path_factory.mktemp("classify"))
    kedro(project, "run", "--params", RUN)
    kedro(project, "run", "--pipelines", "simulate_labels", "--params", RUN)
    kedro(project, "run", "--pipelines", "train", "--params", RUN)
    return project


def client(project: Path, db: str = "data/06_models/mlflow/mlflow.db") -> mlflow.MlflowClient:
    uri = f"sqlite:///{project / db}"
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_demo_loop_passes_its_gates_and_registers_both_models(project: Path) -> None:
    store = client(project)
    for cell_type in ("mk", "hspc"):
        report = json.loads(
            (project / "data" / "06_models" / f"{cell_type}_training_report.json").read_text()
        )
        assert report["passed"], report
        summary = json.loads(
            (project / "data" / "05_model_input" / f"{cell_type}_training_summary.json").read_text()
        )
        assert summary["n_yes"] > 0 and summary["n_no"] > 0 and summary["n_slides"] == 4
        # Read back through the MLflow client API from the project's own store.
        version = store.get_model_version_by_alias(f"mk_hspc_{cell_type}", VALIDATED_ALIAS)
        assert version.run_id == report["run_id"]
        run = store.get_run(report["run_id"])
        assert run.data.tags["passed"] == "true" and run.data.params["cell_type"] == cell_type
        assert run.data.metrics["n_yes"] == summary["n_yes"] and run.data.metrics["precision"] >= 0.7
        batch = pd.read_csv(project / "data" / "05_model_input" / f"{cell_type}_next_batch.csv")
        assert {"batch_rank", "pick"} <= set(batch.columns)
        # Labels of both classes reach min_labels_per_class here, so nothing is sought (the simulated
        # annotator labelled every sampled candidate, so the batch may be empty).
        assert min(summary["n_yes"], summary["n_no"]) >= 20 and set(batch["pick"]) <= {"uncertain"}


def test_full_run_counts_match_the_demo_ground_truth(project: Path) -> None:
    kedro(project, "run", "--pipelines", "full", "--params", RUN)
    data = project / "data"
    counts = pd.read_csv(data / "08_reporting" / "final_counts.csv")
    truth = pd.read_parquet(data / "01_raw" / "ground_truth" / "cells.parquet")
    if "is_target" in truth.columns:
        truth = truth[truth["is_target"]]
    expected = truth.groupby(["slide", "cell_type"]).size()
    off = []
    for row in counts.itertuples():
        true_n = int(expected.get((row.slide, row.cell_type), 0))
        # The adjusted count (accepted cells corrected for the validated model's held-out recall and
        # false-positive rate) is the slide's estimate: within 10%, with no floor of a few cells.
        if abs(row.n_cells_adjusted - true_n) > 0.10 * true_n:
            off.append((row.slide, row.cell_type, row.n_cells, row.n_cells_adjusted, true_n))
        assert row.n_candidates >= row.n_cells and np.isfinite(row.density_adjusted_per_mm2)
    assert not off, off
    final = pd.read_parquet(data / "07_model_output" / "final_cells.parquet")
    assert final["probability"].between(0, 1).all() and set(final["cell_type"]) == {"mk", "hspc"}
    tile_index = pd.read_parquet(data / "02_intermediate" / "tile_index.parquet")
    assert set(final["tile_id"]) <= set(tile_index.loc[tile_index["is_tissue"], "tile_id"])
    plots = {p.name for p in (data / "08_reporting" / "final_plots").iterdir()}
    assert {"counts_by_group.png", "area_histograms.png", "density_demo_01.png"} <= plots
    comparison = pd.read_csv(data / "08_reporting" / "group_comparison.csv")
    assert set(comparison["cell_type"]) == {"mk", "hspc"} and comparison["n_per_level"].notna().all()
    assert {"group", "sex", "treatment"} <= set(comparison["factor"])  # the demo sheet's factors
    assert set(comparison["value"]) == {"density_adjusted_per_mm2"}  # the adjusted densities are compared
    # The sampled tiles were reused (linked), not segmented again.
    log = (data / "03_primary" / "tile_store_full.manifest.json").read_text()
    sample = pd.read_parquet(data / "02_intermediate" / "tile_sample.parquet")
    assert json.loads(log)["summary"]["n_skipped"] >= len(sample)


def test_poor_labels_fail_a_gate_are_not_registered_and_full_refuses(project: Path) -> None:
    cells = pd.read_parquet(project / "data" / "03_primary" / "cells.parquet")
    rng = np.random.default_rng(1)
    poor = {
        "version": 1,
        "labels": [
            {
                "cell_id": c,
                "label": "yes" if rng.random() < 0.5 else "no",
                "annotator": "coin",
                "updated_at": "2026-11-30T06:00:00Z",
            }
            for c in cells["cell_id"]
        ],
    }
    labels_path = project / "data" / "05_model_input" / "labels.json"
    good = json.loads(labels_path.read_text())
    AtomicDataset("json.JSONDataset", str(labels_path)).save(poor)
    try:
        kedro(project, "run", "--pipelines", "train", "--params", f"{RUN},{POOR_STORE}")
        store = client(project, "data/06_models/poor/mlflow.db")
        for cell_type in ("mk", "hspc"):
            report = json.loads(
                (project / "data" / "06_models" / f"{cell_type}_training_report.json").read_text()
            )
            assert not report["passed"] and report["failing"] and report["version"] is None
            assert all(report["gates"][g]["margin"] < 0 for g in report["failing"])
            assert store.get_run(report["run_id"]).data.tags["passed"] == "false"
            with pytest.raises(mlflow.exceptions.MlflowException):
                store.get_model_version_by_alias(f"mk_hspc_{cell_type}", VALIDATED_ALIAS)
        full_store = project / "data" / "03_primary" / "tile_store_full.manifest.json"
        before = full_store.stat().st_mtime_ns if full_store.exists() else None
        with pytest.raises(AssertionError, match="has passed its validation gates"):
            kedro(project, "run", "--pipelines", "full", "--params", f"{RUN},{POOR_STORE}")
        # Refused before the full run segments a single tile (hours on a real study): its store untouched.
        assert (full_store.stat().st_mtime_ns if full_store.exists() else None) == before
    finally:
        AtomicDataset("json.JSONDataset", str(labels_path)).save(good)


def test_unknown_label_ids_stop_training_naming_them(project: Path) -> None:
    labels_path = project / "data" / "05_model_input" / "labels.json"
    good = json.loads(labels_path.read_text())
    bad = {
        **good,
        "labels": [*good["labels"], {**good["labels"][0], "cell_id": "GHOST_s0_r000_c000_mk_00001"}],
    }
    AtomicDataset("json.JSONDataset", str(labels_path)).save(bad)
    try:
        with pytest.raises(AssertionError, match="GHOST_s0_r000_c000_mk_00001"):
            kedro(project, "run", "--pipelines", "train", "--params", f"{RUN},{POOR_STORE}")
    finally:
        AtomicDataset("json.JSONDataset", str(labels_path)).save(good)


def test_viz_shows_the_mk_and_hspc_namespaces(project: Path) -> None:
    kedro(project, "viz", "build")
    train = json.loads((project / "build" / "api" / "pipelines" / "train").read_text())
    namespaces = {n["id"] for n in train["nodes"] if n["type"] == "modularPipeline"}
    assert namespaces == {"mk", "hspc"} and {"mk", "hspc"} <= set(train["modular_pipelines"])
    for namespace in ("mk", "hspc"):
        children = {c["id"] for c in train["modular_pipelines"][namespace]["children"]}
        tasks = [n for n in train["nodes"] if n["id"] in children and n["type"] == "task"]
        assert sorted(n["name"] for n in tasks) == [
            "make_training_set",
            "select_next_batch",
            "train_classifier",
        ]


def test_simulated_labels_agree_with_the_ground_truth(project: Path) -> None:
    data = project / "data"
    cells = pd.read_parquet(data / "03_primary" / "cells.parquet")
    labels = pd.DataFrame(json.loads((data / "05_model_input" / "labels.json").read_text())["labels"])
    meta = json.loads((data / "02_intermediate" / "slide_meta.json").read_text())
    truth = pd.read_parquet(data / "01_raw" / "ground_truth" / "cells.parquet")
    matched = true_matches(cells, truth, meta, {"mk": 12.0, "hspc": 4.0})
    assert (
        labels.set_index("cell_id")["label"].eq("yes") == matched.reindex(labels["cell_id"]).to_numpy()
    ).all()
    assert set(labels["cell_id"]) == set(cells["cell_id"])
