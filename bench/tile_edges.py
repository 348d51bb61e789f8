"""Cells at tile edges: split, truncated or lost MKs, and density error, with the project's default tiling.

The demo study's ground-truth MK outlines are rasterised into each tile window by an *oracle* segmenter, so
the measurement isolates the tiling (overlap, core ownership, edge rule, density area) from segmenter
quality: with exact masks, any split, truncation or loss is the tiling's doing. Every tile of every slide is
processed (not a sample), so each true MK has exactly one chance to be kept whole.

- ``mk_split``: true MKs kept as two or more records;
- ``mk_truncated``: true MKs whose kept record has < 80% of the true area (cut by a tile edge);
- ``mk_lost``: true MKs kept by no tile;
- ``density_error``: mean over slides of |estimated - true| / true MK density, the estimate over the tissue
  tiles (cells in cores / core area x core tissue fraction), the truth over the true tissue mask.

The same numbers for the previous default (no overlap, window tissue fraction) are under ``before``.

Usage: ``python bench/tile_edges.py [--work-dir bench/work/tile_edges] [--n-slides 8]``
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd
from kedro.config import OmegaConfigLoader
from skimage.draw import polygon as raster_polygon
from tqdm import tqdm

from mk_hspc.czi import open_slide
from mk_hspc.demo import DemoSpec, make_demo_study
from mk_hspc.demo.writer import load_tissue_truth
from mk_hspc.engine.tile_work import TileSpec, process_tile
from mk_hspc.models.base import Segmentation
from mk_hspc.tiling import build_tile_grid
from mk_hspc.tissue import build_tissue_maps

REPO = Path(__file__).resolve().parents[1]
TRUNCATED_BELOW = 0.8


class OracleMkSegmenter:
    """Rasterises the true MK outlines that touch the tile window (label = true MK index + 1 in the tile)."""

    name = "oracle"
    max_area_um2 = 2000.0

    def __init__(self, polygons_xy: list[np.ndarray]) -> None:
        self.polygons_xy = polygons_xy
        self.window = (0, 0, 0, 0)  # set per tile by the caller
        self.truth_ids: list[int] = []

    def segment(self, tile_rgb: np.ndarray, pixel_size_um: float) -> Segmentation:
        x, y, w, h = self.window
        labels = np.zeros((h, w), np.int32)
        self.truth_ids = []
        for truth_id, xy in enumerate(self.polygons_xy):
            if xy[:, 0].max() < x or xy[:, 0].min() >= x + w or xy[:, 1].max() < y or xy[:, 1].min() >= y + h:
                continue
            rows, cols = raster_polygon(xy[:, 1] - y, xy[:, 0] - x, shape=(h, w))
            if len(rows) == 0:
                continue
            self.truth_ids.append(truth_id)
            labels[rows, cols] = len(self.truth_ids)
        return Segmentation(labels, np.ones(len(self.truth_ids), np.float32))


def full_area_px(xy: np.ndarray) -> int:
    x0, y0 = np.floor(xy.min(axis=0)).astype(int)
    rows, cols = raster_polygon(xy[:, 1] - y0, xy[:, 0] - x0)
    return len(rows)


def measure(slides, truth: pd.DataFrame, maps, study, tiles_conf: dict, overlap_um: float | None) -> dict:
    """Per-MK records and per-slide densities for one tiling."""
    grid = build_tile_grid(
        {name: slide.meta for name, slide in slides.items()},
        maps,
        tile_px=tiles_conf["tile_px"],
        overlap_um=overlap_um,
        overlap_px=0,
        min_tissue_fraction=tiles_conf["min_tissue_fraction"],
    )
    records: list[dict] = []
    for name, slide in slides.items():
        mks = truth[(truth["slide"] == name) & (truth["cell_type"] == "mk")].reset_index(drop=True)
        polygons = [np.asarray(p, float).reshape(-1, 2) for p in mks["polygon_xy"]]
        oracle = OracleMkSegmenter(polygons)
        for record in tqdm(grid[grid["slide"] == name].to_dict("records"), desc=name, leave=False):
            spec = TileSpec.from_record(record)
            oracle.window = spec.window
            tile = slide.read_region(*spec.window)
            result = process_tile(tile, spec, slide.meta.pixel_size_um, {"mk": oracle})
            raster = oracle.segment(tile, slide.meta.pixel_size_um).labels  # the oracle's own ids
            kept = result.labels["mk"]
            for label in result.cells["label"]:
                oracle_label = np.bincount(raster[kept == label]).argmax()
                records.append(
                    {
                        "slide": name,
                        "tile_id": spec.tile_id,
                        "is_tissue": bool(record["is_tissue"]),
                        "truth_id": oracle.truth_ids[oracle_label - 1],
                        "area_px": int((kept == label).sum()),
                    }
                )
        for truth_id, xy in enumerate(polygons):
            records.append({"slide": name, "truth_id": truth_id, "true_area_px": full_area_px(xy)})
    frame = pd.DataFrame(records)
    truths = frame[frame["true_area_px"].notna()][["slide", "truth_id", "true_area_px"]]
    kept = frame[frame["true_area_px"].isna()]
    per_mk = truths.merge(
        kept.groupby(["slide", "truth_id"]).agg(n_records=("area_px", "size"), kept_px=("area_px", "max")),
        on=["slide", "truth_id"],
        how="left",
    ).fillna({"n_records": 0, "kept_px": 0})
    per_mk["kept_fraction"] = per_mk["kept_px"] / per_mk["true_area_px"]

    densities = []
    for name, slide in slides.items():
        px_mm2 = slide.meta.pixel_size_um**2 / 1e6
        tissue_tiles = grid[(grid["slide"] == name) & grid["is_tissue"]]
        n_counted = int(((kept["slide"] == name) & kept["tile_id"].isin(tissue_tiles["tile_id"])).sum())
        core_px = tissue_tiles["core_w"] * tissue_tiles["core_h"]
        mask, _, _, downsample = load_tissue_truth(study.tissue_path(name))
        true_tissue_mm2 = float(mask.sum()) * downsample**2 * px_mm2
        n_true = int(((truth["slide"] == name) & (truth["cell_type"] == "mk")).sum())
        densities.append(
            {
                "slide": name,
                "true_per_mm2": n_true / true_tissue_mm2,
                "core_tissue_per_mm2": n_counted
                / float((core_px * tissue_tiles["core_tissue_fraction"]).sum() * px_mm2),
                "window_tissue_per_mm2": n_counted
                / float((core_px * tissue_tiles["tissue_fraction"]).sum() * px_mm2),
            }
        )
    density = pd.DataFrame(densities)

    def rel_error(column: str) -> float:
        return float((density[column] - density["true_per_mm2"]).abs().div(density["true_per_mm2"]).mean())

    return {
        "n_tiles": len(grid),
        "mk_truth": len(per_mk),
        "mk_split": int((per_mk["n_records"] > 1).sum()),
        "mk_truncated": int(((per_mk["n_records"] >= 1) & (per_mk["kept_fraction"] < TRUNCATED_BELOW)).sum()),
        "mk_lost": int((per_mk["n_records"] == 0).sum()),
        "density_error_core_tissue": rel_error("core_tissue_per_mm2"),
        "density_error_window_tissue": rel_error("window_tissue_per_mm2"),
        "per_slide_density": density.round(3).to_dict("records"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work-dir", type=Path, default=REPO / "bench" / "work" / "tile_edges")
    parser.add_argument("--n-slides", type=int, default=8)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "tile_edges.json")
    args = parser.parse_args()

    params = OmegaConfigLoader(str(REPO / "conf"), base_env="base", default_run_env="base")["parameters"]
    ingestion = params["ingestion"]
    tiles_conf = ingestion["tiles"]
    spec = dataclasses.replace(DemoSpec.default(), n_slides=args.n_slides)
    started = time.perf_counter()
    study = make_demo_study(args.work_dir, spec)
    truth = pd.read_parquet(study.cells_path)
    slides = {name: open_slide(path) for name, path in sorted(study.slide_paths.items())}
    maps, _ = build_tissue_maps(slides, **ingestion["tissue"])

    now = measure(slides, truth, maps, study, tiles_conf, overlap_um=tiles_conf["largest_cell_um"])
    before = measure(slides, truth, maps, study, tiles_conf, overlap_um=None)  # overlap 0: the old default
    result = {
        "what": "MKs split / truncated / lost at tile edges with the default tiling, oracle masks (true outlines)",
        "tile_px": tiles_conf["tile_px"],
        "largest_cell_um": tiles_conf["largest_cell_um"],
        "pixel_size_um": spec.pixel_size_um,
        "n_slides": args.n_slides,
        "mk_truth": now["mk_truth"],
        "mk_split": now["mk_split"],
        "mk_truncated": now["mk_truncated"],
        "mk_lost": now["mk_lost"],
        "density_error": now["density_error_core_tissue"],
        "goals": {"mk_split": 0, "mk_truncated": 0},
        "now": now,
        "before": {"overlap_px": 0, **before, "density_error": before["density_error_window_tissue"]},
        "elapsed_s": round(time.perf_counter() - started, 1),
        "machine": {"python": platform.python_version(), "cpus": __import__("os").cpu_count()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    summary = {k: result[k] for k in ("mk_truth", "mk_split", "mk_truncated", "mk_lost", "density_error")}
    print(json.dumps({"now": summary, "before": {k: before[k] for k in summary if k in before}}, indent=1))


if __name__ == "__main__":
    main()
