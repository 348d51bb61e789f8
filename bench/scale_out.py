"""Benchmark of the Dask executor on demo slides with 3000 px tiles: scaling with workers and cost per tile.

* ``tiles_per_s_1_worker`` / ``tiles_per_s_2_workers``: classical mk + hspc segmenters with morphology
  features (conf/base), a LocalCluster of 1 and 2 single-threaded worker processes; ``speedup_2_workers``
  is their ratio (goal on a 2-core machine: >= 1.7). Cluster start and each worker's plugin build are
  excluded (a warm-up run on other tiles builds them; workers keep built plugins across runs).
* ``overhead_per_tile_s``: the no-op segmenter (no features: read + write only) on the Dask executor with one
  worker minus the local threaded executor, seconds per tile. It holds the scheduling round trip and the
  lost read/write overlap (a worker reads, segments and writes one tile after the other).
* ``peak_rss_mib_per_worker``: each worker process's peak RSS (``ru_maxrss``) in the classical runs.
* ``projection_48_cores``: wall time of a 16-slide study at 100% (11,600 tissue tiles of 3000 px) on a
  48-core workstation with 48 single-threaded workers, from the measured seconds per tile of one worker and
  the measured 2-worker efficiency; also from CPU seconds per tile, which the machine's load does not inflate.

Each phase records ``os.getloadavg()`` before and after and the per-tile CPU time of the workers: on a shared
machine wall-clock numbers move with everyone else's jobs, so rerun on a quiet machine for the headline.

Usage: ``python bench/scale_out.py [--output bench/results/scale_out.json] [--tiles-per-slide 6]``
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from kedro.config import OmegaConfigLoader

from mk_hspc.czi import open_slide
from mk_hspc.demo import DemoSpec, make_demo_study
from mk_hspc.engine.dask_executor import DaskRun, DaskSettings, dask_client, usable_cores
from mk_hspc.engine.plugins import build_plugins
from mk_hspc.engine.tile_work import SegmentationSettings, segment_tiles
from mk_hspc.pipelines.segmentation.nodes import chosen_plugin_conf
from mk_hspc.settings import CONFIG_LOADER_ARGS
from mk_hspc.tiling import build_tile_grid, overlap_px_for

REPO = Path(__file__).resolve().parents[1]
TILE_PX = 3000
STUDY_TILES = 11_600  # 16 slides at 100%, tissue tiles of 3000 px (issue 9)
WORKSTATION_CORES = 48


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", type=Path, default=REPO / "bench" / "results" / "scale_out.json")
    parser.add_argument("--work-dir", type=Path, default=None, help="demo slides are written here (temp)")
    parser.add_argument("--n-slides", type=int, default=2)
    parser.add_argument("--tiles-per-slide", type=int, default=6, help="full 3000 px windows per slide")
    parser.add_argument(
        "--resummarise", action="store_true", help="recompute --output's numbers from its runs"
    )
    return parser.parse_args(argv)


def segmentation_conf() -> dict[str, Any]:
    params = OmegaConfigLoader(str(REPO / "conf"), **{**CONFIG_LOADER_ARGS, "default_run_env": "base"})
    segmentation = copy.deepcopy(params["parameters"]["segmentation"])
    segmentation["runtime"].update(progress=False)
    return segmentation


def noop_conf(segmentation: dict[str, Any]) -> dict[str, Any]:
    noop = copy.deepcopy(segmentation)
    for spec in noop["segmenters"].values():
        spec["name"] = "noop"
    for spec in noop["features"].values():
        spec["enabled"] = False
    return noop


def load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def run(
    sample,
    slides,
    store: Path,
    segmentation: dict[str, Any],
    *,
    client: Any = None,
    n_workers: int = 1,
) -> dict[str, Any]:
    """One run into a fresh store; the Dask executor when ``client`` is given."""
    shutil.rmtree(store, ignore_errors=True)
    store.mkdir(parents=True)
    segmenters, extractors = build_plugins(segmentation)
    dask = None
    if client is not None:
        settings = DaskSettings(n_workers=n_workers, threads_per_worker=1)
        dask = DaskRun(settings, segmentation, client=client)
    load_before = load()
    summary = segment_tiles(
        sample,
        slides,
        store,
        segmenters,
        extractors,
        SegmentationSettings(**segmentation["runtime"]),
        params=chosen_plugin_conf(segmentation),
        isolate_failures=False,
        dask=dask,
    )
    out = summary.to_dict()
    out["loadavg_before"] = load_before
    out["loadavg_after"] = load()
    return out


def dask_runs(sample, warmup, slides, work: Path, segmentation, n_workers: int) -> dict[str, Any]:
    """Warm-up (cluster up, plugins built in every worker) then the timed run, on one LocalCluster."""
    settings = DaskSettings(n_workers=n_workers, threads_per_worker=1, startup_timeout_s=300.0)
    started = time.perf_counter()
    with dask_client(settings, segmentation) as client:
        cluster_start_s = time.perf_counter() - started
        started = time.perf_counter()
        run(warmup, slides, work / "warmup", segmentation, client=client, n_workers=n_workers)
        warmup_s = time.perf_counter() - started
        timed = run(
            sample, slides, work / f"dask_{n_workers}", segmentation, client=client, n_workers=n_workers
        )
    timed["cluster_start_s"] = round(cluster_start_s, 2)
    timed["warmup_run_s"] = round(warmup_s, 2)
    return timed


def summarise(
    results: dict[str, Any], n: int, n_slides: int, demo_s: float, started: float
) -> dict[str, Any]:
    """The headline numbers from the runs (also used by ``--resummarise`` on a saved result)."""
    one, two = results["classical_dask_1"], results["classical_dask_2"]
    noop_local, noop_dask = results["noop_local"], results["noop_dask_1"]
    s_per_tile_1 = one["elapsed_s"] / n
    speedup = two["tiles_per_s"] / one["tiles_per_s"]
    efficiency = speedup / 2
    cpu_per_tile = one["executor"]["tile_cpu_s"] / n
    hours = STUDY_TILES * s_per_tile_1 / (WORKSTATION_CORES * min(1.0, efficiency)) / 3600
    hours_cpu = STUDY_TILES * cpu_per_tile / WORKSTATION_CORES / 3600
    # The one worker's idle time between its tiles: what the scheduler itself costs per tile.
    scheduling_s = (noop_dask["elapsed_s"] - sum(noop_dask["busy_s"].values())) / n
    peak_rss = {
        f"{runs}: {worker}": rss
        for runs in ("classical_dask_1", "classical_dask_2")
        for worker, rss in results[runs]["executor"]["peak_rss_mib_per_worker"].items()
    }
    return {
        "tiles_per_s_1_worker": round(one["tiles_per_s"], 4),
        "tiles_per_s_2_workers": round(two["tiles_per_s"], 4),
        "speedup_2_workers": round(speedup, 3),
        "goal_speedup_2_workers": 1.7,
        "classical_local_tiles_per_s": round(results["classical_local"]["tiles_per_s"], 4),
        "overhead_per_tile_s": round((noop_dask["elapsed_s"] - noop_local["elapsed_s"]) / n, 4),
        "scheduling_overhead_per_tile_s": round(scheduling_s, 4),
        "noop_s_per_tile": {
            "local": round(noop_local["elapsed_s"] / n, 4),
            "dask_1_worker": round(noop_dask["elapsed_s"] / n, 4),
            "dask_1_worker_read_write_busy": round(sum(noop_dask["busy_s"].values()) / n, 4),
        },
        "classical_cpu_s_per_tile": round(cpu_per_tile, 3),
        "classical_cpu_s_per_tile_2_workers": round(two["executor"]["tile_cpu_s"] / n, 3),
        "peak_rss_mib_per_worker": peak_rss,
        "projection_48_cores": {
            "tiles": STUDY_TILES,
            "workers": WORKSTATION_CORES,
            "hours_from_wall_time": round(hours, 2),
            "hours_from_cpu_time": round(hours_cpu, 2),
            "how": "wall: tiles x wall s/tile of one worker / (48 x min(1, measured 2-worker efficiency)), "
            "inflated by this machine's load; cpu: tiles x CPU s/tile of one worker / 48, i.e. 48 free cores "
            "and linear scaling (CPU s/tile with 2 workers shows whether workers slow each other down)",
        },
        "tiles": n,
        "tile_px": TILE_PX,
        "slides": n_slides,
        "usable_cores": usable_cores(),
        "runs": results,
        "demo_generation_s": round(demo_s, 1),
        "machine": {
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "cpu_count": os.cpu_count(),
            "loadavg_end": load(),
        },
        "conditions": conditions(results.get("loadavg_start"), os.cpu_count() or 1),
        "bench_wall_s": round(time.perf_counter() - started, 1),
    }


def conditions(loadavg_start: list[float] | None, cores: int) -> str:
    """Whether the wall-clock numbers can be trusted, from the 1-minute load average at the start."""
    if not loadavg_start:
        return "load unknown: wall-clock numbers (tiles/s, speedup, overhead) unverified"
    state = "quiet" if loadavg_start[0] < cores else "busy"
    return (
        f"{state} machine: 1-minute load {loadavg_start[0]} at the start on {cores} cores; wall-clock numbers "
        "(tiles/s, speedup, overhead) hold only on a quiet machine; CPU s/tile is load-independent"
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    bench_started = time.perf_counter()
    if args.resummarise:  # recompute the headline numbers of a saved result from its runs (no rerun)
        saved = json.loads(args.output.read_text())
        out = summarise(
            saved["runs"], saved["tiles"], saved["slides"], saved["demo_generation_s"], bench_started
        )
        out["machine"], out["bench_wall_s"] = saved["machine"], saved["bench_wall_s"]
        args.output.write_text(json.dumps(out, indent=2) + "\n")
        return
    segmentation = segmentation_conf()
    ingestion_tiles = OmegaConfigLoader(
        str(REPO / "conf"), **{**CONFIG_LOADER_ARGS, "default_run_env": "base"}
    )["parameters"]["ingestion"]["tiles"]
    with tempfile.TemporaryDirectory(prefix="scale_out_") as tmp:
        work = args.work_dir or Path(tmp)
        spec = DemoSpec()
        overlap_px = overlap_px_for(ingestion_tiles["largest_cell_um"], spec.pixel_size_um, TILE_PX)
        step = TILE_PX - overlap_px
        cols = max(1, args.tiles_per_slide // 2)
        rows = -(-args.tiles_per_slide // cols)
        spec = dataclasses.replace(
            spec,
            n_slides=args.n_slides,
            width_px=TILE_PX + (cols - 1) * step,
            height_px=TILE_PX + (rows - 1) * step,
        )
        started = time.perf_counter()
        if not (work / "slides").is_dir():
            make_demo_study(work, spec, progress=False)
        demo_s = time.perf_counter() - started
        paths = {p.stem: p for p in sorted((work / "slides").glob("*.czi"))}
        slides = {name: open_slide(path, cache_mib=0) for name, path in paths.items()}
        grid = build_tile_grid(
            {n: s.meta for n, s in slides.items()},
            {},
            tile_px=TILE_PX,
            overlap_um=ingestion_tiles["largest_cell_um"],
        )
        full = grid[(grid["w"] == TILE_PX) & (grid["h"] == TILE_PX)].reset_index(drop=True)
        sample = full.groupby("slide").head(args.tiles_per_slide).reset_index(drop=True)
        # Warm-up tiles: the same windows under other ids, so the timed runs never find them done.
        warmup = sample.head(4).assign(
            tile_id=lambda f: f["tile_id"].str.replace("_s0_", "_s9_", regex=False)
        )

        noop = noop_conf(segmentation)
        results: dict[str, Any] = {"loadavg_start": load()}
        results["noop_local"] = run(sample, slides, work / "noop_local", noop)
        results["noop_dask_1"] = dask_runs(sample, warmup, slides, work, noop, 1)
        results["classical_dask_1"] = dask_runs(sample, warmup, slides, work, segmentation, 1)
        results["classical_dask_2"] = dask_runs(sample, warmup, slides, work, segmentation, 2)
        results["classical_local"] = run(sample, slides, work / "classical_local", segmentation)
        for slide in slides.values():
            slide.close()

    out = summarise(results, len(sample), args.n_slides, demo_s, bench_started)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
