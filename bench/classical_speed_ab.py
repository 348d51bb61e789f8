"""Interleaved one-core timing of two versions of the classical MK + nucleus + morphology path (A/B).

On a busy shared machine absolute seconds say little, but two versions timed alternately under the same
load give a trustworthy ratio. Each run is a fresh process pinned to one core (``taskset -c 0``) that
segments the 3000 x 3000 px BM_GRAZ tile of ``bench/real_tissue.py`` twice (after a warm-up) with each
version's own defaults.

Usage (the old version exported with ``git archive <commit> src | tar -x -C /tmp/old``):
    python bench/classical_speed_ab.py /tmp/old/src src --pairs 3 --out bench/results/classical_speed_ab.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
ONE_RUN = r"""
import json, sys, time, glob
import numpy as np
from skimage.io import imread
from mk_hspc.models.segmenters.classical import ClassicalSegmenter
from mk_hspc.models.features.morphology import MorphologyFeatures
folder = sys.argv[1]
images = [imread(p)[..., :3] for p in sorted(glob.glob(folder + "/source/*.png"))]
upsampled = [np.repeat(np.repeat(rgb, 2, axis=0), 2, axis=1) for rgb in images]
rows = [np.concatenate(upsampled[i : i + 2], axis=1) for i in range(0, len(upsampled) - 1, 2)]
tile = np.ascontiguousarray(np.concatenate(rows, axis=0)[:3000, :3000])
mk, hspc, features = ClassicalSegmenter(mode="mk"), ClassicalSegmenter(mode="hspc"), MorphologyFeatures()
def run():
    results = [mk.segment(tile, 0.175), hspc.segment(tile, 0.175)]
    for result in results:
        features.extract(tile, result.labels, np.arange(1, result.n_cells + 1), 0.175)
    return [r.n_cells for r in results]
run()
seconds = []
for _ in range(2):
    tile[0, 0, 0] ^= 1  # a new tile: no memo carries over
    start = time.perf_counter(); cells = run(); seconds.append(time.perf_counter() - start)
print(json.dumps({"seconds": seconds, "cells_mk_hspc": cells}))
"""


def one_run(src: Path, image_dir: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src)}
    out = subprocess.run(
        ["taskset", "-c", "0", sys.executable, "-c", ONE_RUN, str(image_dir)],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return {
        **json.loads(out.stdout.strip().splitlines()[-1]),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src_a", type=Path, help="the reference version's src/ folder")
    parser.add_argument("src_b", type=Path, help="the new version's src/ folder")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument(
        "--images", type=Path, default=REPO.parent / "shared" / "data" / "MICCAI2015_bone_marrow" / "BM_GRAZ"
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "classical_speed_ab.json")
    args = parser.parse_args()
    pairs = [
        {"a": one_run(args.src_a, args.images), "b": one_run(args.src_b, args.images)}
        for _ in range(args.pairs)
    ]
    ratios = [float(np.median(p["a"]["seconds"]) / np.median(p["b"]["seconds"])) for p in pairs]
    result = {
        "speedup_b_over_a_median": round(float(np.median(ratios)), 3),
        "speedup_per_pair": [round(r, 3) for r in ratios],
        "pairs": pairs,
        "src_a": str(args.src_a),
        "src_b": str(args.src_b),
        "note": "ratio of interleaved runs under the same load; absolute seconds need a quiet machine",
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "pairs"}, indent=2))


if __name__ == "__main__":
    main()
