"""The Kedro project as a user drives it: registry, kedro-viz, `kedro run` on a tiny demo, bad slides."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import kedro, kedro_killed_at, make_project_copy

# A tiny study: 4 small demo slides cut into 600 px tiles, half of the tissue tiles sampled.
TINY_RUN = (
    "demo.spec=small,ingestion.tiles.tile_px=1000,ingestion.sampling.fraction=0.5,"
    "ingestion.tissue.map_um_per_px=4.0,segmentation.runtime.progress=false"
)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_project_copy(tmp_path_factory.mktemp("project"))


@pytest.fixture(scope="module")
def demo_run(project: Path) -> Path:
    kedro(project, "run", "--params", TINY_RUN)
    # Kept as finished, for the tests that damage a copy (the shared project changes as tests run).
    shutil.copytree(project, project.parent / "pristine", ignore=shutil.ignore_patterns("build", "*.lock"))
    return project


def test_registry_lists_the_stages(project: Path) -> None:
    listed = kedro(project, "registry", "list").stdout
    assert "ingestion" in listed and "segmentation" in listed and "__default__" in listed


def test_viz_build_lists_ingestion_nodes(project: Path) -> None:
    kedro(project, "viz", "build")
    ingestion = json.loads((project / "build" / "api" / "pipelines" / "ingestion").read_text())
    task_names = {node["name"] for node in ingestion["nodes"] if node["type"] == "task"}
    assert {
        "prepare_demo_slides",
        "read_slide_metadata",
        "make_tissue_maps",
        "make_tile_index",
        "sample_tiles",
        "plot_tissue_overlays",
    } <= task_names


def test_default_run_produces_every_output(demo_run: Path) -> None:
    data = demo_run / "data"
    slide_meta = json.loads((data / "02_intermediate" / "slide_meta.json").read_text())
    assert len(slide_meta) == 4
    assert {meta["pixel_size_source"] for meta in slide_meta.values()} == {"metadata"}
    groups = pd.read_parquet(data / "02_intermediate" / "slide_groups.parquet")
    assert groups["slide"].tolist() == sorted(slide_meta) and groups["group"].nunique() == 4
    calibration = json.loads((data / "02_intermediate" / "tissue_calibration.json").read_text())
    assert calibration["n_slides"] == 4 and calibration["skipped_slides"] == {}
    tile_index = pd.read_parquet(data / "02_intermediate" / "tile_index.parquet")
    sample = pd.read_parquet(data / "02_intermediate" / "tile_sample.parquet")
    assert set(sample["tile_id"]) <= set(tile_index.loc[tile_index["is_tissue"], "tile_id"])
    assert len(sample) == math.floor(0.5 * tile_index["is_tissue"].sum() + 0.5)
    assert sorted(p.name for p in (data / "08_reporting" / "tissue_overlays").glob("*.png")) == [
        f"{name}.png" for name in sorted(slide_meta)
    ]
    cells = pd.read_parquet(data / "03_primary" / "cells.parquet")
    assert set(cells["cell_type"]) == {"mk", "hspc"}
    assert cells["cell_id"].is_unique
    assert set(cells["tile_id"]) <= set(sample["tile_id"])
    stored = sorted(p.stem for p in (data / "03_primary" / "tile_store").glob("*/*.h5"))
    assert stored == sorted(sample["tile_id"])
    counts = pd.read_csv(data / "08_reporting" / "cell_counts_sampled.csv")
    assert counts["n_cells"].sum() == len(cells)
    assert set(counts["group"]) == set(pd.read_csv(data / "01_raw" / "slide_sheet.csv")["group"])


def test_rerun_skips_finished_tiles(demo_run: Path) -> None:
    before = pd.read_parquet(demo_run / "data" / "03_primary" / "cells.parquet")
    kedro(demo_run, "run", "--pipeline", "segmentation", "--params", TINY_RUN)
    manifest = json.loads((demo_run / "data" / "03_primary" / "tile_store.manifest.json").read_text())
    summary = manifest["summary"]
    assert summary["n_processed"] == 0 and summary["n_skipped"] == summary["n_tiles"] > 0
    pd.testing.assert_frame_equal(before, pd.read_parquet(demo_run / "data" / "03_primary" / "cells.parquet"))


def test_bad_slide_is_named_or_skipped(demo_run: Path) -> None:
    bad = demo_run / "data" / "01_raw" / "slides" / "not_a_slide.czi"
    bad.write_text("[/bold] this is a spreadsheet, not a CZI file\n")  # brackets: logged verbatim, not markup
    try:
        with pytest.raises(AssertionError, match=r"not_a_slide\.czi"):
            kedro(demo_run, "run", "--pipeline", "ingestion", "--params", TINY_RUN)
        result = kedro(
            demo_run,
            "run",
            "--pipeline",
            "ingestion",
            "--params",
            TINY_RUN + ",ingestion.skip_bad_slides=true",
        )
        assert "Skipping bad slide not_a_slide" in result.stdout + result.stderr
        assert "starts with b'[/bold] th'" in result.stdout + result.stderr
        assert "not_a_slide" not in json.loads(
            (demo_run / "data" / "02_intermediate" / "slide_meta.json").read_text()
        )
    finally:
        bad.unlink()


def test_describe_and_viz_show_the_tile_store_between_segmentation_and_cells(project: Path) -> None:
    described = kedro(project, "catalog", "describe-datasets", "--pipeline", "segmentation").stdout
    assert "tile_store" in described and "TileStoreDataset" in described
    kedro(project, "viz", "build")
    segmentation = json.loads((project / "build" / "api" / "pipelines" / "segmentation").read_text())
    ids = {node["id"]: node["name"] for node in segmentation["nodes"]}
    edges = {(ids[e["source"]], ids[e["target"]]) for e in segmentation["edges"]}
    assert ("segment_sampled_tiles", "tile_store") in edges and ("tile_store", "make_cells_table") in edges


@pytest.fixture()
def finished_copy(demo_run: Path, tmp_path: Path) -> Path:
    """A copy of the finished demo project that a test may damage."""
    copy = tmp_path / "copy"
    shutil.copytree(demo_run.parent / "pristine", copy)
    return copy


def test_counts_on_an_old_cells_table_with_a_new_tile_sample_are_refused(finished_copy: Path) -> None:
    # A new sample (e.g. after a crash, a rerun of ingestion only), then only the counts node: the cells table
    # was built from the old sample, so densities would be silently wrong.
    kedro(
        finished_copy,
        "run",
        "--pipeline",
        "ingestion",
        "--params",
        TINY_RUN + ",ingestion.sampling.fraction=0.25",
    )
    with pytest.raises(AssertionError, match="do not belong together.*(tile_sample|params:ingestion)"):
        kedro(finished_copy, "run", "--nodes", "summarise_cell_counts", "--params", TINY_RUN)


def test_counts_are_refused_when_ingestion_was_killed_before_it_wrote_anything_new(
    finished_copy: Path,
) -> None:
    # The sampling fraction changes and ingestion is killed before its first new output: every output on
    # disk is the old, self-consistent one. The counts node alone must still refuse: its cells were built
    # with another params:ingestion than this run's.
    new_fraction = TINY_RUN.replace("sampling.fraction=0.5", "sampling.fraction=0.25")
    killed = kedro_killed_at(
        finished_copy,
        "atomic:slide_meta.json:written",
        "run",
        "--pipeline",
        "ingestion",
        "--params",
        new_fraction,
    )
    assert killed.returncode == -9
    with pytest.raises(AssertionError, match="'cells' was built with another 'params:ingestion'"):
        kedro(finished_copy, "run", "--nodes", "summarise_cell_counts", "--params", new_fraction)


def test_only_missing_outputs_reruns_segmentation_when_the_store_is_gone(finished_copy: Path) -> None:
    shutil.rmtree(finished_copy / "data" / "03_primary" / "tile_store")
    kedro(finished_copy, "run", "--only-missing-outputs", "--params", TINY_RUN)
    manifest = json.loads((finished_copy / "data" / "03_primary" / "tile_store.manifest.json").read_text())
    assert manifest["summary"]["n_processed"] == len(manifest["tiles"]) > 0


def test_a_kill_while_the_cells_table_is_written_leaves_the_old_table(finished_copy: Path) -> None:
    cells_path = finished_copy / "data" / "03_primary" / "cells.parquet"
    before = pd.read_parquet(cells_path)
    killed = kedro_killed_at(
        finished_copy,
        "atomic:cells.parquet:written",
        "run",
        "--pipeline",
        "segmentation",
        "--params",
        TINY_RUN,
    )
    assert killed.returncode == -9
    pd.testing.assert_frame_equal(pd.read_parquet(cells_path), before)
    kedro(finished_copy, "run", "--pipeline", "segmentation", "--params", TINY_RUN)
    pd.testing.assert_frame_equal(pd.read_parquet(cells_path), before)
    # No temporary or swapped-out sibling is left; the save lock stays (an empty file, as the run lock).
    leftovers = [p.name for p in cells_path.parent.iterdir() if p.name.startswith(".cells.parquet")]
    assert leftovers == [".cells.parquet.save.lock"]


HOLD_LOCK = (
    "import sys, time; from mk_hspc.hooks import RunLockHooks; hooks = RunLockHooks(); "
    "hooks.before_pipeline_run({'project_path': sys.argv[1]}); print('holding', flush=True); time.sleep(120)"
)


def test_a_second_run_on_the_same_folder_is_refused(finished_copy: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(finished_copy)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(AssertionError, match=f"Another mk-hspc run holds .*pid {holder.pid}"):
            kedro(finished_copy, "run", "--pipeline", "segmentation", "--params", TINY_RUN)
    finally:
        holder.kill()
        holder.wait()


def test_every_pipeline_package_is_registered() -> None:
    """A pipeline package that does not expose create_pipeline makes find_pipelines(raise_errors=True) fail
    every `kedro run`, whichever pipeline is asked for."""
    import importlib
    import pkgutil

    import mk_hspc.pipelines

    packages = {m.name for m in pkgutil.iter_modules(mk_hspc.pipelines.__path__) if m.ispkg}
    assert "export_next_batch" in packages
    for name in sorted(packages):  # what find_pipelines looks for in each package
        module = importlib.import_module(f"mk_hspc.pipelines.{name}")
        assert callable(getattr(module, "create_pipeline", None)), f"mk_hspc.pipelines.{name}"
