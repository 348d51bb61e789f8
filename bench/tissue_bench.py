"""Tissue-tile selection: the new low-resolution method against the lab's full-resolution baseline.

    python bench/tissue_bench.py [--output bench/results/tissue.json] [--work-dir DIR] [--spec default]

On the SAME demo slides (real CZI files without a pyramid, written by ``mk_hspc.demo``) this measures

* ``baseline``: the lab method (``bench/baseline_lab.py``): every tile read at full resolution, grey block
  variance, K-means-calibrated threshold;
* ``ours``: ``mk_hspc.tissue.build_tissue_maps`` (one low-resolution read per slide, pooled Otsu threshold)
  plus ``mk_hspc.tiling.build_tile_grid`` (grid and tissue fraction per tile);
* ``decode_floor``: every tile window read at full resolution and discarded, with the same thread count:
  what merely decoding the slides costs, which a low-resolution read of a slide without pyramid cannot beat
  by much because it must decode every subblock once too.

Each method runs in a fresh subprocess (so its peak RSS, ``ru_maxrss`` of that process, is its own), the
methods are interleaved over ``--repeats`` rounds (so load from other processes on the machine hits them
alike) and the median wall time is reported. The slide files are read once before timing, so every
method reads from the page cache. Separately, on a small shared CZI file WITH a pyramid, the thumbnail
read is timed using the pyramid and without it (full-resolution read then downsampled) - illustrative only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
PYRAMID_FILE = SHARED_DATA / "czitools" / "1_tileregion.czi"
METHODS = ("decode_floor", "ours", "baseline")
# Tiles whose TRUE tissue fraction is within this of the cut-off are "borderline": any method may go either way.
BORDERLINE = 0.05


# libCZI's cache of decoded subblocks is per open slide (256 MiB by default); every method holds all slides
# open, so with the cache on, 8 x 256 MiB would dominate every method's peak RSS alike. Measured on these
# slides it does not change the decode time (tiles and blocks are large), so it is off for all methods.
READER_OPTIONS = {"cache_mib": 0}


def _open_slides(slides_dir: Path) -> dict:
    from mk_hspc.czi import open_slide

    paths = sorted(slides_dir.glob("*.czi"))
    return {slide.meta.name: slide for slide in (open_slide(path, **READER_OPTIONS) for path in paths)}


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _grid(slides: dict, tile_px: int) -> pd.DataFrame:
    from mk_hspc.tiling import build_tile_grid

    return build_tile_grid([slide.meta for slide in slides.values()], {}, tile_px=tile_px)


def _peak_rss_mb() -> float:
    """This process's peak resident set size (``VmHWM``).

    Not ``getrusage().ru_maxrss``: Linux carries the pre-exec high-water mark (the forked copy of the parent)
    into it, so every child would report at least the parent's RSS.
    """
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # not Linux: best effort


def run_method(method: str, slides_dir: Path, tile_px: int, threads: int, min_tissue_fraction: float) -> dict:
    """One timed run of one method in this (fresh) process; returns seconds, peak RSS and per-tile decisions."""
    rss_before_mb = _peak_rss_mb()
    start = time.perf_counter()
    cpu_start = _cpu_seconds()
    slides = _open_slides(slides_dir)
    result: dict = {"method": method}
    if method == "imports":
        kept = {}
    elif method == "decode_floor":
        tiles = _grid(slides, tile_px)

        def decode(tile) -> int:
            return slides[tile.slide].read_region(tile.x, tile.y, tile.w, tile.h, scale=1.0).shape[0]

        with ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(decode, tiles.itertuples(index=False)))
        kept = {}
    elif method == "ours":
        from mk_hspc.tiling import build_tile_grid
        from mk_hspc.tissue import build_tissue_maps

        maps, calibration = build_tissue_maps(slides, threads=threads)
        result["tissue_map_seconds"] = time.perf_counter() - start
        result["tissue_map_cpu_seconds"] = _cpu_seconds() - cpu_start
        tiles = build_tile_grid(
            [slide.meta for slide in slides.values()],
            maps,
            tile_px=tile_px,
            min_tissue_fraction=min_tissue_fraction,
        )
        kept = dict(zip(tiles["tile_id"], tiles["is_tissue"].astype(bool), strict=True))
        result["threshold_od"] = calibration["threshold_od"]
        tissue_px = tiles["tissue_fraction"] * tiles["w"] * tiles["h"]
        result["tissue_area_in_skipped_tiles"] = float(tissue_px[~tiles["is_tissue"]].sum() / tissue_px.sum())
    elif method == "baseline":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from baseline_lab import lab_tissue_tiles

        tiles = _grid(slides, tile_px)
        decisions, calibration = lab_tissue_tiles(
            slides, tiles, threads=threads, min_block_fraction=min_tissue_fraction
        )
        kept = dict(zip(decisions["tile_id"], decisions["is_tissue"].astype(bool), strict=True))
        result["calibration"] = calibration
    else:
        raise ValueError(f"unknown method {method!r}")
    result["seconds"] = time.perf_counter() - start
    result["cpu_seconds"] = _cpu_seconds() - cpu_start
    result["peak_rss_mb"] = _peak_rss_mb()
    result["rss_at_start_mb"] = rss_before_mb
    result["kept"] = kept
    for slide in slides.values():
        slide.close()
    return result


def _run_child(method: str, args: argparse.Namespace, slides_dir: Path) -> dict:
    command = [
        sys.executable, __file__, "--method", method, "--slides-dir", str(slides_dir), "--tile-px", str(args.tile_px),
        "--threads", str(args.threads), "--min-tissue-fraction", str(args.min_tissue_fraction),
    ]  # fmt: skip
    done = subprocess.run(command, check=True, capture_output=True, text=True, cwd=REPO)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _truth_tiles(study_dir: Path, slides_dir: Path, tile_px: int, min_tissue_fraction: float) -> pd.DataFrame:
    """The tile grid with true tissue fractions and decisions from the demo's ground-truth masks."""
    from mk_hspc.demo import load_tissue_truth
    from mk_hspc.tiling import build_tile_grid
    from mk_hspc.tissue import TissueMap

    slides = _open_slides(slides_dir)
    maps = {}
    for name, slide in slides.items():
        mask, origin_x, origin_y, downsample = load_tissue_truth(
            study_dir / "ground_truth" / "tissue" / f"{name}.npz"
        )
        maps[name] = TissueMap(
            name, mask.astype(bool), origin_x, origin_y, downsample, slide.meta.pixel_size_um, np.nan
        )
    tiles = build_tile_grid(
        [slide.meta for slide in slides.values()],
        maps,
        tile_px=tile_px,
        min_tissue_fraction=min_tissue_fraction,
    )
    for slide in slides.values():
        slide.close()
    return tiles.set_index("tile_id")


def _warm_page_cache(slides_dir: Path) -> int:
    n_bytes = 0
    for path in sorted(slides_dir.glob("*.czi")):
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 24):
                n_bytes += len(chunk)
    return n_bytes


def _agreement(a: dict[str, bool], b: dict[str, bool], only: set[str] | None = None) -> float:
    if a.keys() != b.keys():
        raise RuntimeError("the methods produced different tile sets")
    keys = [key for key in a if only is None or key in only]
    return float(np.mean([a[key] == b[key] for key in keys]))


class _IgnorePyramid:
    """A slide whose low-resolution reads decode full resolution and area-average it (cv2 INTER_AREA): exactly
    what the reader does for a slide without a pyramid."""

    def __init__(self, slide) -> None:
        self.slide = slide
        self.meta = slide.meta

    def read_region(self, x: int, y: int, w: int, h: int, scale: float = 1.0) -> np.ndarray:
        import cv2

        full = self.slide.read_region(x, y, w, h, scale=1.0)
        return cv2.resize(full, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)


def pyramid_effect(repeats: int = 50) -> dict:
    """Thumbnail of a small shared CZI with a 2x pyramid layer, read using the layer and ignoring it.

    Both go through ``read_slide_thumbnail`` (same overhead); "ignoring" wraps the slide in ``_IgnorePyramid``.
    """
    from mk_hspc.czi import open_slide
    from mk_hspc.czi.reader import read_subblocks
    from mk_hspc.tissue import read_slide_thumbnail

    if not PYRAMID_FILE.exists():
        return {"skipped": f"{PYRAMID_FILE} not found"}
    with open_slide(PYRAMID_FILE) as slide:
        meta = slide.meta
        layer_um_per_px = 2 * meta.pixel_size_um  # the file's pyramid layer is stored at 2x downsample
        variants = {"with_pyramid": slide, "without_pyramid": _IgnorePyramid(slide)}
        timings: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(repeats):
            for name, variant in variants.items():
                start = time.perf_counter()
                thumbnail = read_slide_thumbnail(variant, layer_um_per_px, threads=1)
                timings[name].append(time.perf_counter() - start)
    ms = {name: 1000 * statistics.median(values) for name, values in timings.items()}
    subblocks = read_subblocks(PYRAMID_FILE)
    stored_px = {
        "with_pyramid": sum(e.stored_w * e.stored_h for e in subblocks if not e.is_layer0),
        "without_pyramid": sum(e.stored_w * e.stored_h for e in subblocks if e.is_layer0),
    }
    return {
        "file": str(PYRAMID_FILE.relative_to(SHARED_DATA.parent)),
        "size_px": [meta.bbox.w, meta.bbox.h],
        "pixel_type": meta.pixel_type,
        "compression": meta.compression,
        "thumbnail_downsample": thumbnail.downsample,
        "thumbnail_shape": list(thumbnail.rgb.shape[:2]),
        "median_ms": ms,
        "speedup": ms["without_pyramid"] / ms["with_pyramid"],
        "stored_pixels_decoded": stored_px,
        "decoded_pixel_ratio": stored_px["without_pyramid"] / stored_px["with_pyramid"],
        "repeats": repeats,
        "note": "illustrative only: a 1480x570 uncompressed file with one 2x pyramid subblock. Decoding it "
        "costs next to nothing, so both reads are about a millisecond of per-call overhead and the times show "
        "little; what the pyramid saves is decoded pixels (decoded_pixel_ratio = 4 for a 2x layer). On a "
        "20 GB Axioscan slide with a full pyramid an 8 um/px map reads a layer holding roughly 1/1000 - 1/2000 "
        "of the full-resolution pixels instead of decoding all of them, so the saving grows to orders of "
        "magnitude there",
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output", type=Path, default=REPO / "bench" / "results" / "tissue.json")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/mk_hspc_tissue_bench"))
    parser.add_argument("--spec", default="default", help="DemoSpec preset (default | small)")
    parser.add_argument("--n-slides", type=int, default=None, help="override the preset's slide count")
    parser.add_argument("--tile-px", type=int, default=3000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min-tissue-fraction", type=float, default=0.15)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--method", choices=(*METHODS, "imports"), help=argparse.SUPPRESS)
    parser.add_argument("--slides-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.method:  # child: one method, JSON on stdout
        result = run_method(
            args.method, args.slides_dir, args.tile_px, args.threads, args.min_tissue_fraction
        )
        print(json.dumps(result))
        return

    import dataclasses

    from mk_hspc.demo import DemoSpec, make_demo_study

    spec = getattr(DemoSpec, args.spec)()
    if args.n_slides:
        spec = dataclasses.replace(spec, n_slides=args.n_slides)
    study_dir = args.work_dir / f"demo_{args.spec}_{spec.n_slides}"
    slides_dir = study_dir / "slides"
    make_demo_study(study_dir, spec, progress=False)  # does nothing when an identical study is there
    file_bytes = _warm_page_cache(slides_dir)

    load_start = os.getloadavg()[0]
    runs: dict[str, list[dict]] = {method: [] for method in METHODS}
    imports = _run_child("imports", args, slides_dir)
    for _ in range(args.repeats):
        for method in METHODS:
            runs[method].append(_run_child(method, args, slides_dir))
            print(f"{method}: {runs[method][-1]['seconds']:.2f} s", file=sys.stderr)

    def median(method: str, key: str = "seconds") -> float:
        return statistics.median(run[key] for run in runs[method])

    ours, baseline = runs["ours"][0]["kept"], runs["baseline"][0]["kept"]
    truth_tiles = _truth_tiles(study_dir, slides_dir, args.tile_px, args.min_tissue_fraction)
    truth = {tile_id: bool(kept) for tile_id, kept in truth_tiles["is_tissue"].items()}
    clear = set(
        truth_tiles.index[(truth_tiles["tissue_fraction"] - args.min_tissue_fraction).abs() > BORDERLINE]
    )
    disagreements = [
        {
            "tile_id": tile_id,
            "ours": ours[tile_id],
            "baseline": baseline[tile_id],
            "true_tissue_fraction": round(float(truth_tiles.loc[tile_id, "tissue_fraction"]), 4),
        }
        for tile_id in sorted(ours)
        if ours[tile_id] != baseline[tile_id] or ours[tile_id] != truth[tile_id]
    ]
    slides = _open_slides(slides_dir)
    metas = [slide.meta for slide in slides.values()]
    result = {
        "benchmark": "tissue tile selection: low-resolution tissue map vs lab full-resolution block variance",
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "note": "2 cores shared with other jobs: wall times are noisy (see load_average_1min and "
            "seconds_all_repeats); CPU seconds are less sensitive to the sharing",
        },
        "reader_options": READER_OPTIONS,
        "slides": {
            "n_slides": len(metas),
            "spec": args.spec,
            "width_px": [m.bbox.w for m in metas],
            "height_px": [m.bbox.h for m in metas],
            "total_megapixels": sum(b.w * b.h for m in metas for b in m.scenes) / 1e6,
            "file_bytes": file_bytes,
            "pixel_size_um": metas[0].pixel_size_um,
            "has_pyramid": any(m.has_pyramid for m in metas),
            "compression": sorted({m.compression for m in metas}),
        },
        "tile_px": args.tile_px,
        "threads": args.threads,
        "min_tissue_fraction": args.min_tissue_fraction,
        "n_tiles": len(ours),
        "repeats": args.repeats,
        "seconds": {method: median(method) for method in METHODS}
        | {"ours_tissue_map": median("ours", "tissue_map_seconds")},
        "seconds_all_repeats": {method: [run["seconds"] for run in runs[method]] for method in METHODS},
        "cpu_seconds": {method: median(method, "cpu_seconds") for method in METHODS}
        | {"ours_tissue_map": median("ours", "tissue_map_cpu_seconds")},
        "speedup_vs_baseline_cpu": median("baseline", "cpu_seconds") / median("ours", "cpu_seconds"),
        "ratio_to_decode_floor_cpu": median("ours", "tissue_map_cpu_seconds")
        / median("decode_floor", "cpu_seconds"),
        "load_average_1min": {"start": load_start, "end": os.getloadavg()[0]},
        "speedup_vs_baseline": median("baseline") / median("ours"),
        "ratio_to_decode_floor": median("ours", "tissue_map_seconds") / median("decode_floor"),
        "tile_agreement": _agreement(ours, baseline),
        "kept_tiles": {
            "ours": int(sum(ours.values())),
            "baseline": int(sum(baseline.values())),
            "truth": int(sum(truth.values())),
        },
        "agreement_with_truth": {"ours": _agreement(ours, truth), "baseline": _agreement(baseline, truth)},
        "borderline_tissue_fraction": BORDERLINE,
        "n_clear_tiles": len(clear),
        "agreement_clear_tiles": {
            "ours_vs_baseline": _agreement(ours, baseline, clear),
            "ours_vs_truth": _agreement(ours, truth, clear),
            "baseline_vs_truth": _agreement(baseline, truth, clear),
        },
        "disagreements": disagreements,
        "peak_rss_mb": {method: max(run["peak_rss_mb"] for run in runs[method]) for method in METHODS},
        "peak_rss_mb_imports_only": imports["peak_rss_mb"],
        "peak_rss_method": "VmHWM (peak RSS) of a fresh subprocess per method run, max over the runs; includes the "
        "interpreter, imports and open slides (peak_rss_mb_imports_only is that floor)",
        "tissue_area_in_skipped_tiles": runs["ours"][0]["tissue_area_in_skipped_tiles"],
        "baseline_calibration": runs["baseline"][0]["calibration"],
        "ours_threshold_od": runs["ours"][0]["threshold_od"],
        "pyramid_effect": pyramid_effect(),
        "goals": {
            "speedup_vs_baseline": ">= 2",
            "tile_agreement": ">= 0.99",
            "ratio_to_decode_floor": "<= 1.3",
        },
    }
    for slide in slides.values():
        slide.close()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(
        json.dumps(
            {
                k: result[k]
                for k in (
                    "seconds",
                    "speedup_vs_baseline",
                    "ratio_to_decode_floor",
                    "tile_agreement",
                    "peak_rss_mb",
                )
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
