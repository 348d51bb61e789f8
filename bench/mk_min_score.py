"""MK candidates vs the MK segmenter's ``min_score`` on real marrow and on the demo -> bench/results/mk_min_score.json.

Why: the full run's MK counts can only be as good as the MK candidates. This sweeps the classical ``mk``
mode's operating point (``segmentation.segmenters.mk.params.classical.min_score``) with everything else
at the configured defaults:

* real: BM_GRAZ (``../shared/data``), the measures of ``bench/real_tissue.py``'s ``mk`` block (a point is
  found when a candidate covers it within 3 µm; ``sure`` / ``possible`` annotations) at each threshold;
* demo: a project that ran ``kedro run`` on the demo; for every true MK whose centroid lies in a sampled
  tile's core, the MK pass (``min_score`` 0) on that tile: the candidate under the MK's centroid, its score,
  its area and how far its centroid lies from the MK's (the simulated annotator matches within 12 µm).

Candidates are computed once at ``min_score = 0`` and thresholded afterwards (as in real_tissue.py).

Usage: python bench/mk_min_score.py --project DIR [--out bench/results/mk_min_score.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))

import real_tissue  # noqa: E402

from mk_hspc.czi import open_slide  # noqa: E402
from mk_hspc.models.segmenters.classical import ClassicalSegmenter  # noqa: E402

GRID = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3)
MATCH_RADIUS_UM = 12.0  # the simulated annotator's MK radius (conf/base/parameters_train.yml)


def real_part(shared: Path, params: dict) -> dict:
    images = real_tissue.load_bm_graz(shared / "MICCAI2015_bone_marrow" / "BM_GRAZ")
    segmenter = ClassicalSegmenter(**{**params, "min_score": 0.0})
    px = real_tissue.BM_GRAZ_PIXEL_SIZE_UM
    per_image = []
    for image in images:
        labels, _, scores = real_tissue.candidates(segmenter, image.rgb, px)
        found = real_tissue.points_covered(image.mk_xy, labels, real_tissue.MK_RADIUS_UM / px)
        point_scores = [
            real_tissue._nearest_score(labels, scores, x, y) if hit else None
            for (x, y), hit in zip(image.mk_xy, found, strict=True)
        ]
        per_image.append((np.asarray(scores), list(zip(image.mk_confidence, point_scores, strict=True))))
    rows = []
    for min_score in GRID:
        points = [(c, s is not None and s >= min_score) for _, pts in per_image for c, s in pts]
        recall = {
            conf: round(float(np.mean([hit for c, hit in points if c == conf])), 4)
            for conf in ("sure", "possible")
            if any(c == conf for c, _ in points)
        }
        rows.append(
            {
                "min_score": min_score,
                "mk_recall_sure": recall.get("sure"),
                "mk_recall_possible": recall.get("possible"),
                "mk_candidates_per_image": round(
                    float(np.mean([(s >= min_score).sum() for s, _ in per_image])), 2
                ),
            }
        )
    return {"n_images": len(images), "pixel_size_um": px, "sweep": rows}


def demo_part(project: Path, params: dict) -> dict:
    data = project / "data"
    truth = pd.read_parquet(data / "01_raw" / "ground_truth" / "cells.parquet")
    meta = json.loads((data / "02_intermediate" / "slide_meta.json").read_text())
    sample = pd.read_parquet(data / "02_intermediate" / "tile_sample.parquet")
    tiles = pd.read_parquet(data / "02_intermediate" / "tile_index.parquet").set_index("tile_id")
    mks = truth[truth["cell_type"] == "mk"]
    segmenter = ClassicalSegmenter(**{**params, "min_score": 0.0})
    rows = []
    for tile_id, tile in tiles.loc[sample["tile_id"]].iterrows():
        inside = mks[
            (mks["slide"] == tile["slide"])
            & mks["centroid_x_px"].between(tile["core_x"], tile["core_x"] + tile["core_w"], inclusive="left")
            & mks["centroid_y_px"].between(tile["core_y"], tile["core_y"] + tile["core_h"], inclusive="left")
        ]
        if inside.empty:
            continue
        px = float(meta[tile["slide"]]["pixel_size_um"])
        with open_slide(meta[tile["slide"]]["path"]) as handle:
            rgb = handle.read_region(int(tile["x"]), int(tile["y"]), int(tile["w"]), int(tile["h"]))
        result = segmenter.segment(rgb, px)
        index = np.arange(1, result.n_cells + 1)
        centroids = np.asarray(ndi.center_of_mass(result.labels > 0, result.labels, index)).reshape(-1, 2)
        areas = np.asarray(ndi.sum(result.labels > 0, result.labels, index)) * px**2
        for mk in inside.itertuples():
            y, x = int(mk.centroid_y_px - tile["y"]), int(mk.centroid_x_px - tile["x"])
            k = int(result.labels[min(y, rgb.shape[0] - 1), min(x, rgb.shape[1] - 1)])
            rows.append(
                {
                    "mk": mk.cell_id,
                    "tile_id": tile_id,
                    "true_area_um2": round(float(mk.area_um2), 1),
                    "covered": bool(k),
                    "score": round(float(result.scores[k - 1]), 4) if k else None,
                    "area_um2": round(float(areas[k - 1]), 1) if k else None,
                    "centroid_offset_um": round(float(np.hypot(*(centroids[k - 1] - (y, x))) * px), 2)
                    if k
                    else None,
                }
            )
    table = pd.DataFrame(rows)
    sweep = []
    for min_score in GRID:
        kept = table["covered"] & (table["score"].fillna(-1) >= min_score)
        matched = kept & (table["centroid_offset_um"].fillna(np.inf) <= MATCH_RADIUS_UM)
        sweep.append(
            {
                "min_score": min_score,
                "mk_candidate_recall": round(float(kept.mean()), 4),
                "mk_candidate_recall_within_12um": round(float(matched.mean()), 4),
            }
        )
    return {"n_true_mk_in_sampled_cores": len(table), "sweep": sweep, "per_mk": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, required=True)
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "mk_min_score.json")
    args = parser.parse_args()
    params = real_tissue.default_classical_params()["mk"]
    started = time.time()
    conditions = {"machine": platform.platform(), "cpus": os.cpu_count(), "loadavg_start": os.getloadavg()}
    result = {
        "mk_params": params,
        "configured_min_score": ClassicalSegmenter(**params).params.min_score,
        "real_bm_graz": real_part(args.shared, params) if args.shared.is_dir() else None,
        "demo": demo_part(args.project, params),
    }
    conditions.update(loadavg_end=os.getloadavg(), wall_seconds=round(time.time() - started, 1))
    result["conditions"] = conditions
    args.out.write_text(json.dumps(result, indent=1, default=float) + "\n")
    print(
        json.dumps(
            {k: v for k, v in result.items() if k != "demo"} | {"demo": result["demo"]["sweep"]}, indent=1
        )
    )


if __name__ == "__main__":
    main()
