"""The demo study's generation time and what its ground truth holds, per type and per group.

Writes the default study (or ``--spec small``) into a fresh folder with 2 worker processes, then reports:

- ``seconds``: wall time of ``make_demo_study`` (with the load average before and after: the machine is
  shared, so compare runs made under similar load only);
- ``per_type``: count, count per mm² of marrow, and area (µm²) min / median / max of every ground-truth type;
- ``per_group``: per group, the MK and HSPC densities (per mm² of marrow) the spec asked for and what was
  placed, so that the group effects the study is built to show can be checked.

Usage: ``python bench/demo_study.py [--spec default|small] [--out bench/results/demo_study.json]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from mk_hspc.demo import DemoSpec, make_demo_study
from mk_hspc.demo.cells import CELL_TYPES
from mk_hspc.demo.layout import build_layout
from mk_hspc.demo.writer import _slide_rng, slide_name

REPO = Path(__file__).resolve().parents[1]


def marrow_area_mm2(spec: DemoSpec) -> dict[str, float]:
    """Marrow area of every slide, from the same layout the writer draws (deterministic)."""
    return {
        slide_name(i): build_layout(_slide_rng(spec, i, 1), spec).marrow_area_mm2
        for i in range(spec.n_slides)
    }


def summarise(cells: pd.DataFrame, spec: DemoSpec, marrow: dict[str, float]) -> dict:
    total_mm2 = sum(marrow.values())
    per_type = {}
    for cell_type in CELL_TYPES:
        areas = cells.area_um2[cells.cell_type == cell_type]
        per_type[cell_type] = {
            "count": int(len(areas)),
            "per_mm2_marrow": round(len(areas) / total_mm2, 1),
            "area_um2_min_median_max": [round(float(v), 1) for v in np.percentile(areas, [0, 50, 100])]
            if len(areas)
            else None,
        }
    per_group = {}
    for i in range(spec.n_slides):
        group = spec.groups[i % len(spec.groups)]
        entry = per_group.setdefault(
            group.name,
            {
                "mk_per_mm2_asked": spec.mk_per_mm2 * group.mk_density_factor,
                "hspc_per_mm2_asked": spec.hspc_per_mm2 * group.hspc_density_factor,
                "marrow_mm2": 0.0,
                "mk": 0,
                "hspc": 0,
            },
        )
        own = cells[cells.slide == slide_name(i)]
        entry["marrow_mm2"] += marrow[slide_name(i)]
        entry["mk"] += int((own.cell_type == "mk").sum())
        entry["hspc"] += int((own.cell_type == "hspc").sum())
    for entry in per_group.values():
        entry["mk_per_mm2_placed"] = round(entry["mk"] / entry["marrow_mm2"], 1)
        entry["hspc_per_mm2_placed"] = round(entry["hspc"] / entry["marrow_mm2"], 1)
        entry["marrow_mm2"] = round(entry["marrow_mm2"], 4)
    return {"per_type": per_type, "per_group": per_group}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", choices=["default", "small"], default="default")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "demo_study.json")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    spec = getattr(DemoSpec, args.spec)()
    work = Path(tempfile.mkdtemp(prefix="demo_study_"))
    try:
        load_before = os.getloadavg()
        start = time.perf_counter()
        make_demo_study(work, spec, progress=False, n_workers=args.workers)
        seconds = time.perf_counter() - start
        load_after = os.getloadavg()
        cells = pd.read_parquet(work / "ground_truth" / "cells.parquet")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "spec": args.spec,
        "n_slides": spec.n_slides,
        "slide_px": [spec.width_px, spec.height_px],
        "workers": args.workers,
        "seconds": round(seconds, 1),
        "conditions": {
            "loadavg_before": [round(v, 2) for v in load_before],
            "loadavg_after": [round(v, 2) for v in load_after],
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "note": "shared machine: compare only with runs under a similar load average",
        },
        **summarise(cells, spec, marrow_area_mm2(spec)),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
