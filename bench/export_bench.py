"""Benchmark of the export stage on the demo study (3000 px tiles): site size per cell and export speed.

* ``bytes_per_cell``: every byte of the site (pages + crops + index + assets + cells index) over the number
  of exported cells (goal <= 10,240; the lab's original pages were ~117,000 bytes per cell, images inlined).
* ``export_s``: wall time of the export node + the site dataset's save (crops, pages, then the atomic
  dataset's sync, digest and swap) with the project's parameters (``export.threads`` tile workers, each
  reading a tile then cutting its crops); the median of ``--repeats`` runs, every run in ``export_runs_s``.
* ``tile_read_s``: time to merely read the same tile windows once (``read_region``, one after another, after
  an untimed warm-up pass so that both see the same page cache); the median of ``--repeats`` passes.
* ``export_vs_tile_read``: the median over ``--repeats`` pairs of ``export wall / tile read wall``, each pair
  a read pass right before an export run (goal <= 1.5). This machine's speed drifts by 10-20 % over minutes
  (the same code measured 1.43x and 1.78x ten minutes apart), so the two times are compared within a pair,
  not as a best of reads taken before a best of exports; ``pair_ratios`` lists them all, and
  ``best_export_vs_best_read`` is the former best-of-runs ratio. ``cpu_s`` (process CPU time) is recorded
  beside each wall time, and before each pair ``pair_two_core_efficiency`` (:func:`two_core_efficiency`:
  1.0 when both cores are the bench's alone).
* The replaced site is kept aside and overwritten by the next export (``reuse_replaced``); one that cannot be
  kept is deleted by a background thread (``remove_old_in_background``): not in ``export_s``; the bench waits
  for it after each run (``old_site_removal_s``) so that runs do not overlap.
* ``crop_files_write_s``: writing the same crop files alone, from memory, as new files in a fresh folder
  (the file system's share; on ext4 without a journal it includes skipping the inodes freed seconds before).
* ``stages_busy_s``: time inside each pipeline stage of the best run (read = slide region + outlines,
  process = normalisation limits + cut + encode, write = crop files; summed over threads) and the pages;
  ``node_s`` / ``save_s`` split it.
  ``stages_cpu_s``: the CPU time of the same threads in each stage (pages: drafting + filling in); busy
  time above it is time spent waiting for a core (2 cores, 3-4 busy threads) or the disk.
* ``by_image_format``: the same for JPEG and WebP (each written once more; the headline is the configured one).
* ``qupath_geojson_s``: the QuPath GeoJSON of the same cells (exact outlines traced on the tile store's
  label images), apart.

The demo run (ingestion + segmentation, ``kedro run``) happens once in ``--project`` (a project copy under
``bench/work/``) and is reused; the export itself runs in-process through the project's catalog.

Usage: ``python bench/export_bench.py [--project bench/work/export_project] [--output bench/results/export.json]``
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def two_core_efficiency(megabytes: int = 64) -> float:
    """How much of a second core this machine gives right now: the time to hash a buffer on one thread over
    the time to hash it twice on two (sha256 releases the GIL; 1.0 = two full cores, 0.5 = one). The export
    runs on two cores and the read on one, so a neighbour taking a share of a core moves their ratio."""
    data = bytes(megabytes << 20)

    def digest(_: object = None) -> None:
        hashlib.sha256(data).digest()

    digest()  # warm-up (pages mapped)
    one_s = two_s = float("inf")
    with ThreadPoolExecutor(max_workers=2) as pool:
        for _ in range(2):
            start = time.perf_counter()
            digest()
            one_s = min(one_s, time.perf_counter() - start)
            start = time.perf_counter()
            list(pool.map(digest, range(2)))
            two_s = min(two_s, time.perf_counter() - start)
    return one_s / two_s


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--project", type=Path, default=REPO / "bench" / "work" / "export_project")
    parser.add_argument("--output", type=Path, default=REPO / "bench" / "results" / "export.json")
    parser.add_argument("--repeats", type=int, default=7, help="timed pairs of a read pass and an export")
    args = parser.parse_args(argv)
    project = args.project.resolve()
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true", "PYTHONPATH": str(REPO / "src")}
    if not (project / "data" / "03_primary" / "cells.parquet").exists():
        sys.path.insert(0, str(REPO))
        from tests.conftest import make_project_copy

        make_project_copy(project)
        kedro = str(Path(sys.executable).with_name("kedro"))
        subprocess.run(
            [kedro, "run", "--params", "segmentation.runtime.progress=false"],
            cwd=project,
            env=env,
            check=True,
        )

    # The export runs with this repository's current parameters (the copy may predate them).
    shutil.copytree(REPO / "conf" / "base", project / "conf" / "base", dirs_exist_ok=True)

    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    # Imported before bootstrap_project puts the copy's own (stale) src/ first on sys.path: the package and
    # every submodule then come from this repository's src/, the code under test.
    import mk_hspc
    from mk_hspc.atomic_io import wait_for_background_removals
    from mk_hspc.pipelines.export.nodes import build_annotation_site, make_qupath_geojson

    os.environ["KEDRO_DISABLE_TELEMETRY"] = "true"
    bootstrap_project(project)
    if Path(mk_hspc.__file__).resolve().parents[1] != REPO / "src":
        raise RuntimeError(f"mk_hspc imported from {mk_hspc.__file__}, not {REPO / 'src'}: set PYTHONPATH")
    with KedroSession.create(project_path=project) as session:
        context = session.load_context()
        catalog = context.catalog
        cells = catalog.load("cells")
        store = catalog.load("tile_store")
        slides = catalog.load("raw_slides")
        export = context.params["export"]
        tile_ids = sorted(set(cells["tile_id"]))
        windows = [store.read(t, include_labels=False, feature_names=()).window for t in tile_ids]
        slide_of = [store.tiles[t] for t in tile_ids]

        def read_all() -> tuple[float, float]:
            opened = {name: slides[name]() for name in sorted(set(slide_of))}
            start, cpu = time.perf_counter(), time.process_time()
            for (x, y, w, h), slide in zip(windows, slide_of, strict=True):
                opened[slide].read_region(x, y, w, h)
            elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
            for handle in opened.values():
                handle.close()
            return elapsed, cpu

        read_all()  # warm-up: the page cache holds the slides for both timed passes
        load = os.getloadavg()
        site = Path(catalog.get("annotation_site")._describe()["filepath"])
        if not site.is_absolute():
            site = project / site
        variants = {}
        for image_format in ("jpeg", "webp"):
            variant_read_s, _ = read_all()
            start = time.perf_counter()
            catalog.save(
                "annotation_site",
                build_annotation_site(cells, store, slides, {**export, "image_format": image_format}),
            )
            variant_s = time.perf_counter() - start
            wait_for_background_removals()  # untimed: the next run must not compete with it
            variant_bytes = sum(p.stat().st_size for p in site.rglob("*") if p.is_file())
            variants[image_format] = {
                "export_s": round(variant_s, 3),
                "export_vs_tile_read": round(variant_s / variant_read_s, 3),
                "bytes_per_cell": round(variant_bytes / max(len(cells), 1), 1),
            }
        # The headline: the project's configured format, written last so the site on disk is that one.
        runs, read_runs, efficiencies = [], [], []
        for _ in range(args.repeats):
            efficiencies.append(two_core_efficiency())
            read_runs.append(read_all())  # the pair's read, right before its export
            start, cpu = time.perf_counter(), time.process_time()
            content = build_annotation_site(cells, store, slides, export)
            node_s = time.perf_counter() - start
            catalog.save("annotation_site", content)
            wall_s, cpu_s = time.perf_counter() - start, time.process_time() - cpu
            removal_start = time.perf_counter()
            wait_for_background_removals()
            runs.append(
                {
                    "wall_s": round(wall_s, 3),
                    "cpu_s": round(cpu_s, 3),
                    "node_s": round(node_s, 3),
                    "save_s": round(wall_s - node_s, 3),
                    # the replaced site's deletion, left to a background thread (not in wall_s)
                    "old_site_removal_s": round(time.perf_counter() - removal_start, 3),
                    "stages_busy_s": content.stats["busy_s"],
                    "stages_cpu_s": content.stats["cpu_s"],
                    "loadavg_1min": round(os.getloadavg()[0], 2),
                }
            )
        best = min(runs, key=lambda run: run["wall_s"])
        export_s = statistics.median(run["wall_s"] for run in runs)
        tile_read_s = statistics.median(wall for wall, _ in read_runs)
        tile_read_cpu_s = statistics.median(cpu for _, cpu in read_runs)
        pair_ratios = [run["wall_s"] / wall for run, (wall, _) in zip(runs, read_runs, strict=True)]
        load_after = os.getloadavg()
        start = time.perf_counter()
        catalog.save("qupath_geojson", make_qupath_geojson(cells, store, catalog.load("slide_meta"), export))
        qupath_s = time.perf_counter() - start

    files = [p for p in site.rglob("*") if p.is_file()]
    site_bytes = sum(p.stat().st_size for p in files)
    crops = [p for p in files if p.parts[len(site.parts)] == "crops"]
    # The file system's share: writing the same crop files alone (bytes already in memory, no fsync).
    from mk_hspc.export.files import write_files

    crop_bytes = {str(p.relative_to(site)): p.read_bytes() for p in crops}
    scratch = project / "data" / ".crop_write_probe"
    shutil.rmtree(scratch, ignore_errors=True)
    start = time.perf_counter()
    write_files(scratch, crop_bytes)
    crop_files_write_s = time.perf_counter() - start
    shutil.rmtree(scratch, ignore_errors=True)
    pages = [p for p in files if p.suffix == ".html"]
    n_cells = len(json.loads((site / "cells.json").read_text())["cells"])
    result = {
        "what": "annotation site export on the demo study (default kedro run: 8 slides, 3000 px tiles, 10% sample)",
        "cells": n_cells,
        "cells_by_type": {t: int((cells["cell_type"] == t).sum()) for t in export["cell_types"]},
        "tiles": len(tile_ids),
        "site_bytes": site_bytes,
        "bytes_per_cell": round(site_bytes / max(n_cells, 1), 1),
        "crop_bytes_per_cell": round(sum(p.stat().st_size for p in crops) / max(len(crops), 1), 1),
        "page_bytes_per_cell": round(sum(p.stat().st_size for p in pages) / max(n_cells, 1), 1),
        "bytes_per_cell_goal": 10240,
        "original_bytes_per_cell": 117000,
        "export_s": round(export_s, 3),
        "tile_read_s": round(tile_read_s, 3),
        "export_vs_tile_read": round(statistics.median(pair_ratios), 3),
        "export_vs_tile_read_goal": 1.5,
        "pair_ratios": [round(ratio, 3) for ratio in pair_ratios],
        "pair_two_core_efficiency": [round(value, 2) for value in efficiencies],
        "best_export_vs_best_read": round(best["wall_s"] / min(wall for wall, _ in read_runs), 3),
        "export_cpu_s": round(statistics.median(run["cpu_s"] for run in runs), 3),  # median, as the read's
        "tile_read_cpu_s": round(tile_read_cpu_s, 3),
        "export_best_run": best,
        "export_runs_s": [run["wall_s"] for run in runs],
        "tile_read_runs_s": [round(wall, 3) for wall, _ in read_runs],
        "crop_files_write_s": round(crop_files_write_s, 3),
        "qupath_geojson_s": round(qupath_s, 3),
        "by_image_format": variants,
        "parameters": {
            k: export[k] for k in ("cell_types", "image_format", "quality", "page_size", "threads")
        },
        "repeats": args.repeats,
        "conditions": {
            "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared with other jobs)",
            "loadavg_before": [round(v, 2) for v in load],
            "loadavg_after": [round(v, 2) for v in load_after],
            "python": platform.python_version(),
        },
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
