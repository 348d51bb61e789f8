"""The Dask executor: same cells as the local executor, a killed worker's tile redone, SLURM job scripts, schema.

The runs use a small demo slide (6 tiles of 800 px, classical plugins from conf/base) and a LocalCluster of
2 single-threaded worker processes.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner

from mk_hspc.czi import open_slide
from mk_hspc.datasets.tile_store import TileFailuresError, TileStoreDataset, read_failures
from mk_hspc.demo import DemoSpec, make_demo_study
from mk_hspc.engine.dask_executor import (
    DaskRun,
    DaskSettings,
    WorkerJob,
    WorkerSetupError,
    _WorkerState,
    resolve_n_workers,
    slurm_cluster,
)
from mk_hspc.failpoints import ENV_VAR as FAILPOINT_ENV
from mk_hspc.params_schema import validate_parameters
from mk_hspc.pipelines.segmentation import create_pipeline
from mk_hspc.pipelines.segmentation.nodes import chosen_plugin_conf, segment_sampled_tiles
from mk_hspc.tile_store import TILE_SUFFIX, TMP_SUFFIX
from mk_hspc.tiling import build_tile_grid
from tests.conftest import corrupt_first_subblock, write_czi
from tests.test_parameters import load_parameters, problems_of, with_value
from tests.test_prefetch import RecordingBar

pytestmark = pytest.mark.slow

TILE_PX = 800


@dataclasses.dataclass
class Study:
    slides: dict[str, Path]
    tile_sample: pd.DataFrame
    params: dict[str, Any]  # conf/base parameters, quiet


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Study:
    root = tmp_path_factory.mktemp("dask_demo")
    spec = dataclasses.replace(DemoSpec.small(), n_slides=1, width_px=1600, height_px=1200)
    make_demo_study(root, spec, progress=False, n_workers=1)
    slides = {path.stem: path for path in sorted((root / "slides").glob("*.czi"))}
    metas = {name: open_slide(path).meta for name, path in slides.items()}
    params = load_parameters()
    tiles = params["ingestion"]["tiles"]
    grid = build_tile_grid(metas, {}, tile_px=TILE_PX, overlap_um=tiles["largest_cell_um"])
    params["segmentation"]["runtime"].update(progress=False, fsync=False)
    return Study(slides, grid, params)


def segmentation_params(study: Study, **dask: Any) -> dict[str, Any]:
    """conf/base's segmentation block with the Dask executor (2 workers, 1 thread each) and ``dask`` keys."""
    segmentation = copy.deepcopy(study.params["segmentation"])
    segmentation["executor"] = {
        "kind": "dask",
        "dask": {"n_workers": 2, "threads_per_worker": 1, "startup_timeout_s": 60.0} | dask,
    }
    return segmentation


def run_pipeline(study: Study, store: Path, segmentation: dict[str, Any]) -> pd.DataFrame:
    """The segmentation pipeline up to the cells table, with the real tile store dataset."""
    catalog = DataCatalog(
        {
            "tile_sample": MemoryDataset(study.tile_sample),
            "raw_slides": MemoryDataset(
                {name: (lambda p=path: open_slide(p, cache_mib=0)) for name, path in study.slides.items()},
                copy_mode="assign",
            ),
            "params:segmentation": MemoryDataset(segmentation),
            "params:ingestion": MemoryDataset(study.params["ingestion"]),
            "tile_store": TileStoreDataset(str(store)),
            "cells": MemoryDataset(copy_mode="assign"),
        }
    )
    SequentialRunner().run(create_pipeline().to_nodes("make_cells_table"), catalog)
    return catalog.load("cells")


@pytest.fixture(scope="module")
def local_cells(study: Study, tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    store = tmp_path_factory.mktemp("local") / "tile_store"
    cells = run_pipeline(study, store, copy.deepcopy(study.params["segmentation"]))
    assert TileStoreDataset(str(store)).load().summary["executor"] == {"kind": "local"}
    return cells


def assert_same_cells(actual: pd.DataFrame, expected: pd.DataFrame) -> None:
    assert len(expected) > 0 and set(expected["cell_type"]) == {"mk", "hspc"}
    assert list(actual["cell_id"]) == list(expected["cell_id"])
    assert list(actual.columns) == list(expected.columns)
    numeric = [c for c in expected.columns if pd.api.types.is_numeric_dtype(expected[c])]
    assert any(c.startswith("morphology_") for c in numeric)
    np.testing.assert_allclose(
        actual[numeric].to_numpy(float), expected[numeric].to_numpy(float), rtol=1e-6, atol=1e-6
    )
    text = [c for c in expected.columns if c not in numeric]
    pd.testing.assert_frame_equal(actual[text], expected[text])


def tile_files(store: Path) -> list[str]:
    return sorted(path.name for path in store.rglob(f"*{TILE_SUFFIX}"))


# ------------------------------------------------------------------------------------------ equality
def test_two_dask_workers_give_the_local_executors_cells_and_resume_each_other(
    study: Study, local_cells: pd.DataFrame, tmp_path: Path
) -> None:
    store = tmp_path / "tile_store"
    cells = run_pipeline(study, store, segmentation_params(study))
    assert_same_cells(cells, local_cells)
    summary = TileStoreDataset(str(store)).load().summary
    assert summary["executor"]["kind"] == "dask" and summary["executor"]["workers_seen"] == 2
    assert summary["n_processed"] == len(study.tile_sample) and summary["failed_tiles"] == []
    assert 0 < summary["max_tiles_in_flight"] <= 2 * 2  # 2 workers x max_tiles_in_flight_per_worker
    # Same fingerprints: the local executor finds every tile of the Dask run done, and vice versa.
    rerun = run_pipeline(study, store, copy.deepcopy(study.params["segmentation"]))
    assert TileStoreDataset(str(store)).load().summary["n_skipped"] == len(study.tile_sample)
    assert_same_cells(rerun, local_cells)


def test_dask_progress_bar_shows_each_tiles_counts_when_it_counts_the_tile(
    study: Study, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mk_hspc.engine.dask_executor as dask_executor

    RecordingBar.instances.clear()
    monkeypatch.setattr(dask_executor, "tqdm", RecordingBar)
    segmentation = segmentation_params(study)
    segmentation["runtime"]["progress"] = True
    cells = run_pipeline(study, tmp_path / "tile_store", segmentation)
    (bar,) = RecordingBar.instances
    assert [n for n, _ in bar.drawn] == list(range(1, len(study.tile_sample) + 1))
    final = bar.drawn[-1][1]  # the line that reaches 100 % already holds every tile's cells
    assert sum(final.values()) == len(cells) > 0


# ---------------------------------------------------------------------------------------- lost worker
class KillOneWorkerWhileWriting:
    """Worker plugin: the first worker to start arms the ``tile:written`` fail point in its own process, so it
    SIGKILLs itself after writing its first tile's temporary file and before renaming it; its restarted
    successor (and the other worker) are left alone (a marker file makes it happen once)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def setup(self, worker: Any) -> None:
        try:
            fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.write(fd, f"{os.getpid()}\n".encode())
        os.close(fd)
        os.environ[FAILPOINT_ENV] = "tile:written"


def test_a_killed_worker_s_tile_is_redone_elsewhere_and_every_tile_is_stored_once(
    study: Study, local_cells: pd.DataFrame, tmp_path: Path
) -> None:
    from distributed import Client, LocalCluster, WorkerPlugin

    class Killer(KillOneWorkerWhileWriting, WorkerPlugin):
        pass

    marker = tmp_path / "killed.pid"
    store = tmp_path / "tile_store"
    segmentation = segmentation_params(study)
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        client.register_plugin(Killer(marker))
        pids_before = set(client.run(os.getpid).values())
        plan = segment_sampled_tiles(
            study.tile_sample,
            {n: lambda p=p: open_slide(p) for n, p in study.slides.items()},
            segmentation,
            study.params["ingestion"],
        )
        plan.dask = DaskRun(plan.dask.settings, plan.dask.segmentation, client=client)
        TileStoreDataset(str(store)).save(plan)
        pids_after = set(client.run(os.getpid).values())

    killed_pid = int(marker.read_text())
    assert killed_pid in pids_before and killed_pid not in pids_after  # it died; its nanny started another
    expected = sorted(f"{t}{TILE_SUFFIX}" for t in study.tile_sample["tile_id"])
    assert tile_files(store) == expected  # every tile exactly once
    assert not list(store.rglob(f"*{TMP_SUFFIX}"))  # the dead worker's temporary file was removed
    summary = TileStoreDataset(str(store)).load().summary
    assert summary["n_processed"] == len(expected) and summary["failed_tiles"] == []
    assert summary["removed_temporary_files"] == 1
    assert_same_cells(run_pipeline(study, store, segmentation), local_cells)


def test_a_tile_that_kills_every_worker_is_recorded_failed_and_the_run_ends(
    study: Study, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every worker dies on its first write: Dask gives the tiles up (allowed_failures) instead of hanging."""
    store = tmp_path / "tile_store"
    monkeypatch.setenv(FAILPOINT_ENV, "tile:written")  # inherited by the worker processes; unused here
    plan = segment_sampled_tiles(
        study.tile_sample.iloc[:1],
        {n: lambda p=p: open_slide(p) for n, p in study.slides.items()},
        segmentation_params(study, allowed_failures=1, retries=0),
        study.params["ingestion"],
    )
    with pytest.raises(TileFailuresError, match=r"1 tile\(s\) failed"):
        TileStoreDataset(str(store)).save(plan)
    failures = read_failures(store)
    assert [f["stage"] for f in failures] == ["worker"]
    assert "died" in failures[0]["error"]
    assert not TileStoreDataset(str(store)).exists()


# ---------------------------------------------------------------------------------------------- SLURM
def test_the_slurm_env_builds_a_job_script_without_submitting(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # the cluster creates its log directory
    segmentation = load_parameters(env="slurm")["segmentation"]
    assert segmentation["executor"]["kind"] == "dask"
    settings = DaskSettings.from_params(segmentation["executor"]["dask"])
    assert settings.cluster == "slurm" and settings.slurm_jobs == 4
    with slurm_cluster(settings) as cluster:
        script = cluster.job_script()
        assert not cluster.workers  # nothing submitted
    lines = script.splitlines()
    assert lines[0] == "#!/usr/bin/env bash"
    for directive in ("-p compute", "-A my_lab", "-n 1", "--cpus-per-task=16", "-t 08:00:00", "-J mk-hspc"):
        assert f"#SBATCH {directive}" in lines
    assert any(line.startswith("#SBATCH --mem=") for line in lines)
    assert "source .venv/bin/activate" in lines
    assert "--nworkers 16" in script and "--nthreads 1" in script
    assert "--local-directory $TMPDIR" in script


# --------------------------------------------------------------------------------------------- schema
def test_the_default_executor_is_local_and_n_workers_auto_counts_usable_cores() -> None:
    segmentation = load_parameters()["segmentation"]
    assert segmentation["executor"]["kind"] == "local"
    settings = DaskSettings.from_params(segmentation["executor"]["dask"])
    n_workers, why = resolve_n_workers(settings, segmentation)
    assert n_workers == len(os.sched_getaffinity(0)) and "core" in why
    settings = dataclasses.replace(settings, threads_per_worker=2)
    assert resolve_n_workers(settings, segmentation)[0] == max(1, len(os.sched_getaffinity(0)) // 2)


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("segmentation.executor.kind", "spark", "input should be 'local' or 'dask', got 'spark'"),
        (
            "segmentation.executor.dask.n_workers",
            0,
            "n_workers: should be auto or a whole number of workers >= 1, got 0",
        ),
        ("segmentation.executor.dask.memory_limit", "lots", "should be auto or a size such as 6GiB"),
        ("segmentation.executor.dask.max_tiles_in_flight_per_worker", 0, "greater than or equal to 1"),
        ("segmentation.executor.dask.retries", -1, "greater than or equal to 0"),
        ("segmentation.executor.dask.cluster", "address", "cluster: address needs address"),
        ("segmentation.executor.dask.slurm.cluster", {"cpus": 4}, "slurm.cluster.cpus: unknown key"),
        ("segmentation.executor.dask.workers", 4, "segmentation.executor.dask.workers: unknown key"),
        ("segmentation.executor.dask.threads_per_worker", 3, "at least threads_per_worker"),
    ],
)
def test_bad_executor_settings_are_named_by_their_key(key: str, value: Any, problem: str) -> None:
    problems = problems_of(with_value(load_parameters(), key, value))
    assert any(problem in reported for reported in problems), problems


def test_the_slurm_and_gpu_envs_are_valid() -> None:
    validate_parameters(load_parameters(env="slurm"))
    with_dask = with_value(load_parameters(env="gpu"), "segmentation.executor.kind", "dask")
    validate_parameters(with_dask)


def test_an_unreachable_scheduler_stops_the_run_at_once_naming_it(study: Study, tmp_path: Path) -> None:
    segmentation = segmentation_params(
        study, cluster="address", address="tcp://127.0.0.1:9", startup_timeout_s=2.0
    )
    plan = segment_sampled_tiles(
        study.tile_sample,
        {n: lambda p=p: open_slide(p) for n, p in study.slides.items()},
        segmentation,
        study.params["ingestion"],
    )
    with pytest.raises(Exception, match=r"cannot reach the scheduler at tcp://127\.0\.0\.1:9"):
        TileStoreDataset(str(tmp_path / "store")).save(plan)


# ------------------------------------------------------------------------------- workers (no cluster)
def worker_job(study: Study, tmp_path: Path, params_hash: str) -> WorkerJob:
    segmentation = copy.deepcopy(study.params["segmentation"])
    return WorkerJob(
        token="t",
        segmentation=segmentation,
        fingerprint_params=chosen_plugin_conf(segmentation),
        params_hash=params_hash,
        slides={},
        pixel_sizes_um={},
        store_dir=str(tmp_path),
        fsync=False,
        label_chunk_px=512,
        release_memory_every_tiles=None,
    )


def test_a_worker_whose_fingerprint_differs_from_the_driver_s_refuses_the_run(
    study: Study, tmp_path: Path
) -> None:
    state = _WorkerState(worker_job(study, tmp_path, params_hash="0123456789abcdef"))
    with pytest.raises(WorkerSetupError, match="computes the run fingerprint .* the driver 0123456789abcdef"):
        state.ensure_built()
    with pytest.raises(WorkerSetupError, match="computes the run fingerprint"):  # every later tile too
        state.ensure_built()
    missing_store = worker_job(study, tmp_path / "elsewhere", params_hash="x")
    with pytest.raises(WorkerSetupError, match="cannot see the tile store folder .*elsewhere"):
        _WorkerState(missing_store).ensure_built()


def test_with_learned_plugins_auto_means_one_worker_per_gpu_each_on_its_own(monkeypatch) -> None:
    from mk_hspc.engine import dask_executor

    segmentation = load_parameters(env="gpu")["segmentation"]
    monkeypatch.setattr(dask_executor, "cuda_device_count", lambda: 3)
    settings = DaskSettings.from_params(segmentation["executor"]["dask"])
    assert resolve_n_workers(settings, segmentation) == (3, "one per GPU (3 visible) for the learned plugins")
    assert resolve_n_workers(settings, {**segmentation, "device": "cpu"})[0] == len(os.sched_getaffinity(0))
    monkeypatch.setattr("distributed.get_worker", lambda: type("W", (), {"name": 4})())
    assert dask_executor._with_worker_device(segmentation)["device"] == "cuda:1"
    classical = load_parameters()["segmentation"]
    assert dask_executor._with_worker_device(classical)["device"] == "auto"  # no torch plugin: unchanged


# ------------------------------------------------------------------------------ failures, no hang
def test_failed_tiles_are_recorded_as_the_local_executor_records_them_and_a_stall_ends_the_run(
    tmp_path: Path,
) -> None:
    """A corrupt region fails its tile alike on both executors (failures.json, non-zero end); a run in which
    no tile finishes within stall_timeout_s ends with its tiles failed instead of waiting."""
    from distributed import Client, LocalCluster

    slide_path = corrupt_first_subblock(
        write_czi(tmp_path / "lab01.czi", 120, 0.5, size_px=256, compression="zstd1:ExplicitLevel=1")
    )
    sample = pd.DataFrame(
        [
            {"tile_id": f"lab01_s0_r000_c{col:03d}", "slide": "lab01", "x": x, "y": 0, "w": 256, "h": 256}
            | {"core_x": x, "core_y": 0, "core_w": 256, "core_h": 256}
            for col, x in enumerate((0, 256))
        ]
    )
    segmentation = load_parameters()["segmentation"]
    segmentation["runtime"].update(progress=False, fsync=False)
    for spec in segmentation["segmenters"].values():
        spec["name"] = "noop"
    segmentation["features"]["morphology"]["enabled"] = False
    ingestion = load_parameters()["ingestion"]
    openers = {"lab01": lambda: open_slide(slide_path)}

    def save(store: Path, executor: dict[str, Any] | None, client: Any = None) -> list[dict[str, str]]:
        conf = copy.deepcopy(segmentation) | ({"executor": executor} if executor else {})
        plan = segment_sampled_tiles(sample, openers, conf, ingestion)
        if client is not None:
            plan.dask = DaskRun(plan.dask.settings, plan.dask.segmentation, client=client)
        with pytest.raises(TileFailuresError):
            TileStoreDataset(str(store)).save(plan)
        return read_failures(store)

    local = save(tmp_path / "local", None)
    assert [(f["tile_id"], f["stage"]) for f in local] == [("lab01_s0_r000_c000", "read")]
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        dask = save(tmp_path / "dask", {"kind": "dask", "dask": {"retries": 1}}, client)
        assert dask == local  # same tile, stage and error text
        assert tile_files(tmp_path / "dask") == ["lab01_s0_r000_c001.h5"]
        stalled = save(tmp_path / "stalled", {"kind": "dask", "dask": {"stall_timeout_s": 0.001}}, client)
    assert [f["stage"] for f in stalled] == ["timeout", "timeout"]
    assert "no tile finished within 0.001 s" in stalled[0]["error"]
