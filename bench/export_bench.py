"""Benchmark of the export stage on the demo study (3000 px tiles): site size per cell and export speed.

* ``bytes_per_cell``: every byte of the site (pages + crops + index + assets + cells index) over the number
  of exported cells (goal <= 10,240; the lab's original pages were ~117,000 bytes per cell, images inlined).
* ``export_s``: wall time of the export node + the site dataset's save (crops, pages) with the project's
  parameters (``export.threads`` tiles at once).
* ``tile_read_s``: time to merely read the same tile windows once (``read_region``, one after another, after
  an untimed warm-up pass so that both see the same page cache).
* ``export_vs_tile_read`` = ``export_s / tile_read_s`` (goal <= 1.5).
* ``by_image_format``: the same for JPEG and WebP (each written once more; the headline is the configured one).
* ``qupath_geojson_s``: the QuPath GeoJSON of the same cells (exact outlines from the tile store), apart.

The demo run (ingestion + segmentation, ``kedro run``) happens once in ``--project`` (a project copy under
``bench/work/``) and is reused; the export itself runs in-process through the project's catalog.

Usage: ``python bench/export_bench.py [--project bench/work/export_project] [--output bench/results/export.json]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--project", type=Path, default=REPO / "bench" / "work" / "export_project")
    parser.add_argument("--output", type=Path, default=REPO / "bench" / "results" / "export.json")
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

    from mk_hspc.pipelines.export.nodes import build_annotation_site, make_qupath_geojson

    os.environ["KEDRO_DISABLE_TELEMETRY"] = "true"
    bootstrap_project(project)
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

        def read_all() -> float:
            opened = {name: slides[name]() for name in sorted(set(slide_of))}
            start = time.perf_counter()
            for (x, y, w, h), slide in zip(windows, slide_of, strict=True):
                opened[slide].read_region(x, y, w, h)
            elapsed = time.perf_counter() - start
            for handle in opened.values():
                handle.close()
            return elapsed

        read_all()  # warm-up: the page cache holds the slides for both timed passes
        tile_read_s = read_all()
        load = os.getloadavg()
        site = Path(catalog.get("annotation_site")._describe()["filepath"])
        if not site.is_absolute():
            site = project / site
        variants = {}
        for image_format in ("jpeg", "webp"):
            start = time.perf_counter()
            catalog.save(
                "annotation_site",
                build_annotation_site(cells, store, slides, {**export, "image_format": image_format}),
            )
            variant_s = time.perf_counter() - start
            variant_bytes = sum(p.stat().st_size for p in site.rglob("*") if p.is_file())
            variants[image_format] = {
                "export_s": round(variant_s, 3),
                "export_vs_tile_read": round(variant_s / tile_read_s, 3),
                "bytes_per_cell": round(variant_bytes / max(len(cells), 1), 1),
            }
        # The headline: the project's configured format, written last so the site on disk is that one.
        start = time.perf_counter()
        catalog.save("annotation_site", build_annotation_site(cells, store, slides, export))
        export_s = time.perf_counter() - start
        load_after = os.getloadavg()
        start = time.perf_counter()
        catalog.save("qupath_geojson", make_qupath_geojson(cells, store, catalog.load("slide_meta"), export))
        qupath_s = time.perf_counter() - start

    files = [p for p in site.rglob("*") if p.is_file()]
    site_bytes = sum(p.stat().st_size for p in files)
    crops = [p for p in files if p.parts[len(site.parts)] == "crops"]
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
        "export_vs_tile_read": round(export_s / tile_read_s, 3),
        "export_vs_tile_read_goal": 1.5,
        "qupath_geojson_s": round(qupath_s, 3),
        "by_image_format": variants,
        "parameters": {
            k: export[k] for k in ("cell_types", "image_format", "quality", "page_size", "threads")
        },
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
