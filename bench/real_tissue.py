"""Real-tissue benchmark of the no-weights default (the ``classical`` segmenter as configured in conf/base).

Measures, on the real H&E images in ``../shared/data`` (none of them is a training set for this code; the
defaults were chosen on BM_GRAZ, so the off-domain images and the ±15 % pixel-size runs are the honest
generalisation checks):

* **MK candidates** (``mode: mk``) against the project's own megakaryocyte points on the 7 BM_GRAZ images
  (``mk_points/*.csv``, ``sure`` / ``possible``): a point is found when it lies inside a candidate mask
  grown by 3 µm (:func:`mk_hspc.models.evaluation.points_covered`). Also the candidates per image and the
  score each found MK got, and the same at 0.85x and 1.15x the pixel size.
* **Nucleus candidates** (``mode: hspc``) against the BM_GRAZ nucleus dots, one-to-one within 16 px
  (:func:`mk_hspc.models.evaluation.match_points`, as ``bench/bm_graz.py``): precision / recall / F1 at the
  default ``min_score``, the whole curve over ``min_score`` and its best mean F1, the same at 0.85x and
  1.15x the pixel size, and a leave-one-image-out check of choosing ``min_score`` for best F1.
* **Off-domain nuclei**: the MICCAI 2015 nuclei-challenge tiles (non-marrow H&E, each at the pixel size of
  its objective: 20x = 0.5 µm/px, 40x = 0.25 µm/px): the headline matches candidate centroids one-to-one
  with the true nuclei's centroids within the BM_GRAZ gate in µm (16 px x 0.35 µm = 5.6 µm); ``recall_inside``
  counts a detection when its centroid falls in a true nucleus, once
  (:func:`mk_hspc.models.evaluation.match_points_to_regions`). Why the misses happen:
  ``bench/offdomain_nuclei.py``.
* **Demo**: recall per ground-truth type on the embedded demo study (either mode's candidate counts).
* **Speed** of the classical MK + nucleus + morphology path on one 3000 x 3000 px tile (BM_GRAZ upsampled
  2x and stitched, about the Axioscan's 0.175 µm/px), on one core: run it as
  ``taskset -c 0 python bench/real_tissue.py``; the JSON records the affinity, the load average before and
  after, and every repeat.

Candidates are computed once at ``min_score = 0`` and thresholded afterwards: a candidate's score and its
other filters do not depend on the threshold, so this equals running at each ``min_score`` (a unit test
checks that property on the segmenter).

Usage:
    taskset -c 0 python bench/real_tissue.py [--shared ../shared/data] [--out bench/results/real_tissue.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from skimage.io import imread

from mk_hspc.models.evaluation import (
    detection_scores,
    match_points_to_regions,
    points_covered,
    scores_from_counts,
)
from mk_hspc.models.features.morphology import MorphologyFeatures
from mk_hspc.models.segmenters.classical import ClassicalSegmenter, label_moments

REPO = Path(__file__).resolve().parents[1]
BM_GRAZ_PIXEL_SIZE_UM = 0.35  # undocumented; about 0.35 µm from nucleus sizes (see bench/bm_graz.py)
NUCLEUS_MATCH_RADIUS_PX = 16.0
MK_RADIUS_UM = 3.0
SCALES = (0.85, 1.15)
SCORE_GRID = tuple(round(x, 2) for x in np.arange(0.0, 0.96, 0.05))
# MICCAI 2015 nuclei challenge (README_training.txt): image01-07 at 20x, image08-10 at 40x.
CHALLENGE_PIXEL_SIZE_UM = {**{f"image{k:02d}": 0.5 for k in range(1, 8)}, "image08": 0.25, "image09": 0.25}
CHALLENGE_PIXEL_SIZE_UM["image10"] = 0.25
SPEED_TILE_PX = 3000


@dataclass(frozen=True)
class BmGrazImage:
    name: str
    rgb: np.ndarray
    dots_xy: np.ndarray
    mk_xy: np.ndarray
    mk_confidence: np.ndarray


def default_classical_params() -> dict[str, dict]:
    """The ``classical`` parameters of both cell types as conf/base sets them (the project's default)."""
    conf = yaml.safe_load((REPO / "conf" / "base" / "parameters_segmentation.yml").read_text())
    segmenters = conf["segmentation"]["segmenters"]
    return {cell_type: dict(segmenters[cell_type]["params"]["classical"]) for cell_type in ("mk", "hspc")}


def read_mk_points(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(xy (N, 2), confidence (N,))`` of one ``mk_points`` CSV (``x,y,confidence``; header-only = none)."""
    lines = [line.split(",") for line in path.read_text().splitlines()[1:] if line.strip()]
    xy = np.array([[float(x), float(y)] for x, y, _ in lines]).reshape(-1, 2)
    return xy, np.array([c.strip() for _, _, c in lines], dtype=str)


def load_bm_graz(folder: Path) -> list[BmGrazImage]:
    images = []
    for source in sorted((folder / "source").glob("*.png")):
        dots = np.loadtxt(folder / "annotations" / f"{source.stem}.txt", skiprows=1, ndmin=2)[:, :2]
        mk_xy, confidence = read_mk_points(folder / "mk_points" / f"{source.stem}.csv")
        rgb = np.ascontiguousarray(imread(source)[..., :3], dtype=np.uint8)
        images.append(BmGrazImage(source.stem, rgb, dots, mk_xy, confidence))
    return images


def read_ascii_mask(path: Path) -> np.ndarray:
    """A nuclei-challenge mask: ``width height`` then one label per pixel, row-major."""
    values = np.array(path.read_text().split(), dtype=np.int64)
    width, height = int(values[0]), int(values[1])
    return values[2:].reshape(height, width)


def load_challenge(folder: Path) -> list[tuple[str, np.ndarray, np.ndarray, float]]:
    """``(name, rgb, labels, pixel_size_um)``; masks are paired with images by size (04/05 are swapped)."""
    masks = [read_ascii_mask(path) for path in sorted(folder.glob("image*_mask.txt"))]
    items = []
    for source in sorted(folder.glob("image??.png")):
        rgb = np.ascontiguousarray(imread(source)[..., :3], dtype=np.uint8)
        same_size = [mask for mask in masks if mask.shape == rgb.shape[:2]]
        if len(same_size) != 1:
            raise ValueError(f"{source}: {len(same_size)} masks of its size {rgb.shape[:2]}")
        items.append((source.stem, rgb, same_size[0], CHALLENGE_PIXEL_SIZE_UM[source.stem]))
    return items


def candidates(segmenter: ClassicalSegmenter, rgb: np.ndarray, pixel_size_um: float):
    """``(labels, centroids xy (N, 2), scores (N,))`` of one image."""
    result = segmenter.segment(rgb, pixel_size_um)
    n_cells = result.n_cells
    if n_cells == 0:
        return result.labels, np.zeros((0, 2)), np.zeros(0)
    moments = label_moments(result.labels, n_cells)
    xy = np.stack([moments["centroid_x"], moments["centroid_y"]], axis=1)
    return result.labels, xy, result.scores.astype(np.float64)


def nucleus_curve(
    per_image: list[tuple[np.ndarray, np.ndarray, np.ndarray]], also: tuple[float, ...] = ()
) -> list[dict]:
    """Mean precision / recall / F1 over images at every ``min_score`` of the grid and of ``also`` (the
    default operating point is measured exactly, wherever it lies on the grid).

    ``per_image``: ``(xy, scores, dots_xy)``; candidates with ``score >= min_score`` are kept.
    """
    curve = []
    for min_score in sorted({*SCORE_GRID, *also}):
        rows = [
            detection_scores(xy[scores >= min_score], dots, NUCLEUS_MATCH_RADIUS_PX)
            for xy, scores, dots in per_image
        ]
        curve.append(
            {
                "min_score": min_score,
                "precision_mean": float(np.mean([r.precision for r in rows])),
                "recall_mean": float(np.mean([r.recall for r in rows])),
                "f1_mean": float(np.mean([r.f1 for r in rows])),
                "f1_per_image": [round(r.f1, 4) for r in rows],
            }
        )
    return curve


def at_score(curve: list[dict], min_score: float) -> dict:
    """The curve's row at exactly ``min_score`` (:func:`nucleus_curve` measures it with ``also``)."""
    rows = [row for row in curve if row["min_score"] == min_score]
    if not rows:
        raise ValueError(f"min_score {min_score} is not on the curve; pass it to nucleus_curve(also=...)")
    return rows[0]


def leave_one_image_out(curve: list[dict]) -> dict:
    """Choose ``min_score`` for best mean F1 on six images, score the seventh; the mean over held-out images."""
    n_images = len(curve[0]["f1_per_image"])
    held_out = []
    for k in range(n_images):

        def others(row: dict, k: int = k) -> float:
            return float(np.mean([f for j, f in enumerate(row["f1_per_image"]) if j != k]))

        chosen = max(curve, key=others)
        held_out.append({"min_score": chosen["min_score"], "f1": chosen["f1_per_image"][k]})
    return {
        "f1_mean": round(float(np.mean([row["f1"] for row in held_out])), 4),
        "chosen_min_score": [row["min_score"] for row in held_out],
    }


def nucleus_block(images: list[BmGrazImage], params: dict, default_min_score: float) -> dict:
    out: dict = {}
    for label, scale in (("1.0", 1.0), *((str(s), s) for s in SCALES)):
        segmenter = ClassicalSegmenter(**{**params, "min_score": 0.0})
        per_image = []
        for image in images:
            _, xy, scores = candidates(segmenter, image.rgb, BM_GRAZ_PIXEL_SIZE_UM * scale)
            per_image.append((xy, scores, image.dots_xy))
        curve = nucleus_curve(per_image, also=(default_min_score,))
        best = max(curve, key=lambda row: row["f1_mean"])
        default = at_score(curve, default_min_score)
        out[label] = {"default": default, "best": best, "curve": curve}
        if scale == 1.0:
            out[label]["leave_one_image_out"] = leave_one_image_out(curve)
    return out


def mk_block(images: list[BmGrazImage], params: dict) -> dict:
    out: dict = {}
    for label, scale in (("1.0", 1.0), *((str(s), s) for s in SCALES)):
        pixel_size_um = BM_GRAZ_PIXEL_SIZE_UM * scale
        segmenter = ClassicalSegmenter(**params)
        rows = []
        for image in images:
            labels, _, scores = candidates(segmenter, image.rgb, pixel_size_um)
            # The points are in image pixels: grow by 3 µm of the true (not the assumed) pixel size.
            found = points_covered(image.mk_xy, labels, MK_RADIUS_UM / BM_GRAZ_PIXEL_SIZE_UM)
            found_scores = []
            for (x, y), hit in zip(image.mk_xy, found, strict=True):
                found_scores.append(_nearest_score(labels, scores, x, y) if hit else None)
            rows.append(
                {
                    "image": image.name,
                    "n_candidates": int(len(scores)),
                    "points": [
                        {"x": float(x), "y": float(y), "confidence": c, "found": bool(h), "score": s}
                        for (x, y), c, h, s in zip(
                            image.mk_xy, image.mk_confidence, found, found_scores, strict=True
                        )
                    ],
                }
            )
        points = [p for row in rows for p in row["points"]]
        out[label] = {
            "mk_recall_sure": _recall(points, "sure"),
            "mk_recall_possible": _recall(points, "possible"),
            "mk_candidates_per_image": round(float(np.mean([row["n_candidates"] for row in rows])), 2),
            "per_image": rows,
        }
    return out


def _nearest_score(labels: np.ndarray, scores: np.ndarray, x: float, y: float) -> float:
    """Score of the candidate whose mask is nearest to ``(x, y)``."""
    rows, cols = np.nonzero(labels)
    nearest = np.argmin((rows - y) ** 2 + (cols - x) ** 2)
    return round(float(scores[labels[rows[nearest], cols[nearest]] - 1]), 3)


def _recall(points: list[dict], confidence: str) -> float | None:
    chosen = [p["found"] for p in points if p["confidence"] == confidence]
    return round(float(np.mean(chosen)), 4) if chosen else None


def offdomain_block(items: list, params: dict) -> dict:
    """Nucleus candidates on the nuclei-challenge tiles, scored two ways.

    ``point``: centroids one-to-one with the true nuclei's centroids within the BM_GRAZ gate in µm
    (16 px x 0.35 µm = 5.6 µm), the headline, comparable with the BM_GRAZ figures. ``inside``: a
    candidate's centroid must fall inside a true nucleus (stricter for curved spindle nuclei, whose
    centroid can lie outside their own mask).
    """
    segmenter = ClassicalSegmenter(**params)
    gate_um = NUCLEUS_MATCH_RADIUS_PX * BM_GRAZ_PIXEL_SIZE_UM
    rows = []
    for name, rgb, truth, pixel_size_um in items:
        _, xy, _ = candidates(segmenter, rgb, pixel_size_um)
        n_true = int(truth.max())
        moments = label_moments(truth, n_true)
        present = moments["area"] > 0
        true_xy = np.stack([moments["centroid_x"], moments["centroid_y"]], axis=1)[present]
        point = detection_scores(xy, true_xy, gate_um / pixel_size_um)
        inside = scores_from_counts(*match_points_to_regions(xy, truth)[:3])
        rows.append(
            {
                "image": name,
                "pixel_size_um": pixel_size_um,
                "recall": round(point.recall, 4),
                "precision": round(point.precision, 4),
                "recall_inside": round(inside.recall, 4),
                "precision_inside": round(inside.precision, 4),
                "n_true": point.n_true,
                "n_pred": point.n_pred,
            }
        )
    return {
        "offdomain_nucleus_recall_mean": round(float(np.mean([r["recall"] for r in rows])), 4),
        "offdomain_nucleus_precision_mean": round(float(np.mean([r["precision"] for r in rows])), 4),
        "offdomain_nucleus_recall_inside_mean": round(float(np.mean([r["recall_inside"] for r in rows])), 4),
        "match_radius_um": gate_um,
        "per_image": rows,
    }


def speed_tile(images: list[BmGrazImage]) -> np.ndarray:
    upsampled = [np.repeat(np.repeat(image.rgb, 2, axis=0), 2, axis=1) for image in images]
    rows = [np.concatenate(upsampled[i : i + 2], axis=1) for i in range(0, len(upsampled) - 1, 2)]
    return np.ascontiguousarray(np.concatenate(rows, axis=0)[:SPEED_TILE_PX, :SPEED_TILE_PX])


def speed_block(images: list[BmGrazImage], params: dict[str, dict], repeats: int) -> dict:
    """Seconds for MK + nucleus segmentation + morphology of both on one tile, ``repeats`` times."""
    tile = speed_tile(images)
    pixel_size_um = BM_GRAZ_PIXEL_SIZE_UM / 2
    segmenters = {cell_type: ClassicalSegmenter(**p) for cell_type, p in params.items()}
    features = MorphologyFeatures()
    seconds, stages = [], []
    for repeat in range(repeats + 1):  # the first run warms caches and imports; not counted
        tile[0, 0, 0] ^= 1  # a new tile each time: the MK pass memo must not carry over
        timing: dict[str, float] = {}
        start = time.perf_counter()
        counts = {}
        for cell_type in ("mk", "hspc"):
            t0 = time.perf_counter()
            result = segmenters[cell_type].segment(tile, pixel_size_um)
            t1 = time.perf_counter()
            features.extract(tile, result.labels, np.arange(1, result.n_cells + 1), pixel_size_um)
            timing[f"{cell_type}_segment_s"] = round(t1 - t0, 3)
            timing[f"{cell_type}_morphology_s"] = round(time.perf_counter() - t1, 3)
            counts[cell_type] = result.n_cells
        if repeat:
            seconds.append(time.perf_counter() - start)
            stages.append(timing)
    median = float(np.median(seconds))
    return {
        "classical_tiles_per_s_per_core": round(1.0 / median, 3),
        "seconds_median": round(median, 3),
        "seconds": [round(s, 3) for s in seconds],
        "stages": stages,
        "cells": counts,
        "tile_px": list(tile.shape[:2]),
        "pixel_size_um": pixel_size_um,
    }


def demo_block(params: dict[str, dict]) -> dict:
    """Recall per ground-truth type on the embedded demo study (spec ``small``) at the default operating point.

    A true cell is found when a candidate's centroid falls inside its outline, by either mode (so a
    confounder found as an MK or a nucleus candidate counts as "kept as a candidate"). Types come from the
    ground truth's ``type`` column where the demo writes one, else from its ``cell_type``.
    """
    import tempfile

    import pandas as pd
    from skimage.draw import polygon

    from mk_hspc.czi import open_slide
    from mk_hspc.demo import DemoSpec, make_demo_study

    segmenters = {cell_type: ClassicalSegmenter(**p) for cell_type, p in params.items()}
    found_by_type: dict[str, list[bool]] = {}
    by_mode: dict[str, dict[str, list[bool]]] = {cell_type: {} for cell_type in segmenters}
    with tempfile.TemporaryDirectory() as folder:
        study = make_demo_study(Path(folder), DemoSpec.small(), progress=False, n_workers=1)
        cells = pd.read_parquet(study.cells_path)
        type_column = "type" if "type" in cells.columns else "cell_type"
        for slide, path in sorted(study.slide_paths.items()):
            with open_slide(path) as handle:
                (scene,) = handle.meta.scenes
                rgb = handle.read_region(scene.x, scene.y, scene.w, scene.h)
                pixel_size_um = handle.meta.pixel_size_um
            truth = cells[cells["slide"] == slide].reset_index(drop=True)
            regions = np.zeros(rgb.shape[:2], np.int32)
            for index, flat in enumerate(truth["polygon_xy"], start=1):
                xy = np.asarray(flat, dtype=np.float64).reshape(-1, 2)
                rr, cc = polygon(xy[:, 1] - scene.y, xy[:, 0] - scene.x, rgb.shape[:2])
                regions[rr, cc] = index
            found = np.zeros(len(truth) + 1, bool)
            for cell_type, segmenter in segmenters.items():
                _, xy, _ = candidates(segmenter, rgb, pixel_size_um)
                _, _, _, pairs = match_points_to_regions(xy, regions)
                found_by_mode = np.zeros(len(truth) + 1, bool)
                found_by_mode[pairs[:, 1] + 1] = True
                found |= found_by_mode
                for kind, hit in zip(truth[type_column], found_by_mode[1:], strict=True):
                    by_mode[cell_type].setdefault(str(kind), []).append(bool(hit))
            for kind, hit in zip(truth[type_column], found[1:], strict=True):
                found_by_type.setdefault(str(kind), []).append(bool(hit))

    def recall(hits_by_type: dict[str, list[bool]]) -> dict[str, float]:
        return {kind: round(float(np.mean(hits)), 4) for kind, hits in sorted(hits_by_type.items())}

    return {
        "type_column": type_column,
        "recall_by_type": recall(found_by_type),
        # Either mode's candidates count above; here each mode alone (an MK found only by the nucleus
        # mode is a nucleus candidate on its lobes, not an MK candidate).
        "recall_by_type_and_mode": {mode: recall(hits) for mode, hits in by_mode.items()},
        "n_by_type": {kind: len(hits) for kind, hits in sorted(found_by_type.items())},
    }


def run(shared: Path, repeats: int) -> dict:
    params = default_classical_params()
    bm_graz = load_bm_graz(shared / "MICCAI2015_bone_marrow" / "BM_GRAZ")
    load_before = os.getloadavg()
    default_min_score = float(ClassicalSegmenter(**params["hspc"]).params.min_score)
    nucleus = nucleus_block(bm_graz, params["hspc"], default_min_score)
    mk = mk_block(bm_graz, params["mk"])
    challenge = load_challenge(shared / "MICCAI2015_nuclei_seg_challenge")
    offdomain = offdomain_block(challenge, params["hspc"])
    speed = speed_block(bm_graz, params, repeats)
    demo = demo_block(params)
    base = nucleus["1.0"]
    f1_default = base["default"]["f1_mean"]
    return {
        "mk_recall_sure": mk["1.0"]["mk_recall_sure"],
        "mk_recall_possible": mk["1.0"]["mk_recall_possible"],
        "mk_candidates_per_image": mk["1.0"]["mk_candidates_per_image"],
        "nucleus_recall_mean": round(base["default"]["recall_mean"], 4),
        "nucleus_precision_mean": round(base["default"]["precision_mean"], 4),
        "nucleus_f1_mean": round(f1_default, 4),
        "nucleus_f1_best_mean": round(base["best"]["f1_mean"], 4),
        "nucleus_best_min_score": base["best"]["min_score"],
        "nucleus_f1_best_leave_one_image_out_mean": base["leave_one_image_out"]["f1_mean"],
        "f1_drop_pixel_size_15pct": round(
            max(f1_default - nucleus[str(s)]["default"]["f1_mean"] for s in SCALES), 4
        ),
        "f1_best_drop_pixel_size_15pct": round(
            max(base["best"]["f1_mean"] - nucleus[str(s)]["best"]["f1_mean"] for s in SCALES), 4
        ),
        "mk_recall_sure_by_pixel_scale": {k: v["mk_recall_sure"] for k, v in mk.items()},
        "offdomain_nucleus_recall_mean": offdomain["offdomain_nucleus_recall_mean"],
        "offdomain_nucleus_precision_mean": offdomain["offdomain_nucleus_precision_mean"],
        "classical_tiles_per_s_per_core": speed["classical_tiles_per_s_per_core"],
        "demo_recall_by_type": demo["recall_by_type"],
        "demo_recall_by_type_and_mode": demo["recall_by_type_and_mode"],
        "default_params": params,
        "demo": demo,
        "mk": mk,
        "nucleus": nucleus,
        "offdomain": offdomain,
        "speed": speed,
        "conditions": {
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
            "cpu_affinity": sorted(os.sched_getaffinity(0)),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "note": "shared 2-core machine: speed needs a quiet rerun; quality numbers are deterministic",
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "real_tissue.json")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    result = run(args.shared, args.repeats)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    headline = {k: v for k, v in result.items() if not isinstance(v, dict)}
    print(json.dumps(headline, indent=2))


if __name__ == "__main__":
    main()
