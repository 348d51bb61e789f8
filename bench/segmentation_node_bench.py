"""Benchmark of the segmentation node on demo slides with 3000 px tiles, measured in one run.

* ``noop_vs_raw_read_ratio``: node throughput (tiles/s) with the ``noop`` segmenter and no features, over
  raw ``read_region`` throughput of the same tiles read one after another in a plain loop (goal >= 0.9:
  the engine adds no cost beyond reading).
* ``peak_rss_mb_1_slide`` / ``peak_rss_mb_8_slides``: peak RSS (VmHWM) of the noop node in fresh
  subprocesses on all tiles of 1 slide vs 8 slides (goal: 8 slides <= 1.2 x 1 slide).
* ``classical_tiles_per_s``: classical mk + hspc segmenters with morphology features.

Slides are opened the way the segmentation node should open them (``--reader-cache-mib 0``): sampled
tiles rarely share CZI subblocks, so a per-slide subblock cache buys nothing there but grows with every
slide read. The thread mode stays ``shared`` (libCZI releases the GIL, so reader threads overlap on one
handle; ``per_thread`` opens a handle per thread and slide, which costs more than it gains when a run
reads one tile per slide). Both headline numbers are also reported with ``open_slide``'s defaults
(``*_reader_defaults``; with the cache on, the small demo slides are served from memory after the warm-up
pass). The ratio is
also measured with reads that sleep for the measured read time instead of decoding
(``*_io_bound_reads``): on a small shared machine decoding and the node's own work compete for the same
cores, so that number shows what the engine costs by itself.

The demo study is generated once into ``--work-dir`` and reused. Slides are small (4500 px) so generation
stays short on 2 cores: each holds one full-size, non-overlapping 3000 px tile (the throughput runs use
these, one per slide, like a sample drawn across slides). The RSS runs use heavily overlapping 3000 px
windows instead (49 per slide), so that the 1-slide run also lasts long enough to fill every queue of the
engine. Besides the peak (VmHWM), each RSS run reports its RSS after the run with freed heap returned to
the OS (the steady state: it shows whether anything is kept per slide).

Usage: ``python bench/segmentation_node_bench.py [--output bench/results/segmentation_node.json]``
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from mk_hspc.czi import open_slide
from mk_hspc.demo import DemoSpec, make_demo_study
from mk_hspc.engine.prefetch import release_free_heap
from mk_hspc.engine.tile_work import SegmentationSettings, segment_tiles
from mk_hspc.models.registry import create_feature_extractor, create_segmenter
from mk_hspc.tiling import build_tile_grid

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", type=Path, default=REPO / "bench" / "results" / "segmentation_node.json")
    parser.add_argument("--work-dir", type=Path, default=REPO / "bench" / "work" / "segmentation_node")
    parser.add_argument("--n-slides", type=int, default=8)
    parser.add_argument("--slide-px", type=int, default=4500, help="demo slide width and height")
    parser.add_argument("--tile-px", type=int, default=3000)
    parser.add_argument(
        "--rss-overlap-px",
        type=int,
        default=2750,
        help="window overlap of the RSS runs (sets tiles per slide)",
    )
    parser.add_argument(
        "--overhead-overlap-px",
        type=int,
        default=2000,
        help="window overlap of the throughput runs: more tiles per slide, so start-up cost is amortised",
    )
    parser.add_argument("--repeats", type=int, default=3, help="alternating repeats; the best of each counts")
    parser.add_argument("--classical-tiles", type=int, default=3)
    parser.add_argument("--reader-threads", type=int, default=2)
    parser.add_argument("--prefetch-tiles", type=int, default=2)
    parser.add_argument("--writer-threads", type=int, default=1)
    parser.add_argument("--pending-writes", type=int, default=2)
    parser.add_argument("--reader-cache-mib", type=float, default=0.0, help="open_slide cache_mib")
    parser.add_argument("--reader-thread-mode", default="shared", help="open_slide thread_mode")
    # internal: run as a fresh child measuring peak RSS on the first N slides
    parser.add_argument("--child-rss", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--child-reader-defaults", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def demo_study(args: argparse.Namespace):
    spec = DemoSpec(n_slides=args.n_slides, width_px=args.slide_px, height_px=args.slide_px)
    return make_demo_study(args.work_dir / "demo", spec, progress=False, n_workers=2)


def reader_options(args: argparse.Namespace, defaults: bool = False) -> dict:
    return {} if defaults else {"cache_mib": args.reader_cache_mib, "thread_mode": args.reader_thread_mode}


def open_slides(study, names: list[str], options: dict) -> dict:
    return {name: open_slide(study.slide_paths[name], **options) for name in names}


def tile_sample(slides: dict, args: argparse.Namespace, overlap_px: int = 0) -> pd.DataFrame:
    """Every full-size window of the given slides (sorted by tile id)."""
    metas = {name: slide.meta for name, slide in slides.items()}
    grid = build_tile_grid(metas, {}, tile_px=args.tile_px, overlap_px=overlap_px)
    return grid[(grid["w"] == args.tile_px) & (grid["h"] == args.tile_px)].reset_index(drop=True)


def settings(args: argparse.Namespace) -> SegmentationSettings:
    return SegmentationSettings(
        reader_threads=args.reader_threads,
        prefetch_tiles=args.prefetch_tiles,
        writer_threads=args.writer_threads,
        pending_writes=args.pending_writes,
        progress=False,
    )


def raw_read_tiles_per_s(slides: dict, sample: pd.DataFrame) -> float:
    started = time.perf_counter()
    for tile in sample.itertuples():
        slides[tile.slide].read_region(tile.x, tile.y, tile.w, tile.h)
    return len(sample) / (time.perf_counter() - started)


def node_tiles_per_s(slides, sample, store_dir, segmenters, features, args) -> tuple[float, dict]:
    """Wall-clock throughput of the whole node call (store checks and writes included), fresh store."""
    shutil.rmtree(store_dir, ignore_errors=True)
    started = time.perf_counter()
    summary = segment_tiles(sample, slides, store_dir, segmenters, features, settings(args))
    elapsed_s = time.perf_counter() - started
    if summary.n_processed != len(sample):
        raise RuntimeError(f"node processed {summary.n_processed} of {len(sample)} tiles")
    return len(sample) / elapsed_s, summary.to_dict()


class ReplaySlide:
    """Serves tiles read beforehand after sleeping for a real read's duration: a reader that waits instead
    of computing, which separates the engine's own overhead from CPU contention on a small machine."""

    def __init__(self, slide, tiles: dict[tuple[int, int, int, int], np.ndarray], read_s: float) -> None:
        self.meta = slide.meta
        self._tiles = tiles
        self._read_s = read_s

    def read_region(self, x: int, y: int, w: int, h: int, scale: float = 1.0) -> np.ndarray:
        time.sleep(self._read_s)
        return self._tiles[(x, y, w, h)].copy()


def replay_slides(slides: dict, sample: pd.DataFrame, read_s: float) -> dict:
    tiles: dict[str, dict] = {name: {} for name in slides}
    for tile in sample.itertuples():
        window = (tile.x, tile.y, tile.w, tile.h)
        tiles[tile.slide][window] = slides[tile.slide].read_region(*window)
    return {name: ReplaySlide(slides[name], tiles[name], read_s) for name in slides}


def noop_segmenters() -> dict:
    return {"mk": create_segmenter("noop"), "hspc": create_segmenter("noop")}


def overhead_ratio(slides: dict, sample: pd.DataFrame, args: argparse.Namespace) -> dict:
    """Best-of-``repeats`` noop-node and raw-read throughputs, alternated, after one warm-up read pass."""
    raw_read_tiles_per_s(slides, sample)  # page cache and lazily opened handles alike for both
    raw, node, summary = [], [], {}
    store = args.work_dir / "store_noop"
    for _ in range(args.repeats):
        raw.append(raw_read_tiles_per_s(slides, sample))
        tps, summary = node_tiles_per_s(slides, sample, store, noop_segmenters(), [], args)
        node.append(tps)
    shutil.rmtree(store, ignore_errors=True)
    return {
        "ratio": max(node) / max(raw),
        "median_ratio": statistics.median(node) / statistics.median(raw),
        "noop_node_tiles_per_s": node,
        "raw_read_tiles_per_s": raw,
        "noop_run_summary": summary,
    }


def _status_mb(field: str) -> float:
    """A ``/proc/self/status`` memory field in MiB (VmHWM is per process image, unlike ru_maxrss,
    which Linux carries over from the parent across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def child_rss(args: argparse.Namespace) -> None:
    """Run the noop node on the first ``--child-rss`` slides and print its peak RSS (fresh process)."""
    study = demo_study(args)
    names = sorted(study.slide_paths)[: args.child_rss]
    slides = open_slides(study, names, reader_options(args, args.child_reader_defaults))
    sample = tile_sample(slides, args, overlap_px=args.rss_overlap_px)
    segmenters = noop_segmenters()
    baseline_mb = _status_mb("VmRSS")
    store = args.work_dir / f"store_rss_{args.child_rss}"
    tps, summary = node_tiles_per_s(slides, sample, store, segmenters, [], args)
    shutil.rmtree(store, ignore_errors=True)
    release_free_heap()
    report = {
        "n_slides": len(slides),
        "n_tiles": len(sample),
        "rss_before_run_mb": baseline_mb,
        "peak_rss_mb": _status_mb("VmHWM"),
        "rss_after_run_mb": _status_mb("VmRSS"),
        "tiles_per_s": tps,
        "max_tiles_in_flight": summary["max_tiles_in_flight"],
    }
    print(json.dumps(report))


def run_child(args: argparse.Namespace, n_slides: int, reader_defaults: bool = False) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--child-rss", str(n_slides)]
    forwarded = ("work_dir", "n_slides", "slide_px", "tile_px", "rss_overlap_px", "reader_threads")
    forwarded += (
        "prefetch_tiles",
        "writer_threads",
        "pending_writes",
        "reader_cache_mib",
        "reader_thread_mode",
    )
    for name in forwarded:
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    if reader_defaults:
        command.append("--child-reader-defaults")
    out = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def rss_pair(args: argparse.Namespace, n_all: int, reader_defaults: bool = False) -> dict:
    one, many = run_child(args, 1, reader_defaults), run_child(args, n_all, reader_defaults)
    return {"1_slide": one, f"{n_all}_slides": many, "ratio": many["peak_rss_mb"] / one["peak_rss_mb"]}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.child_rss:
        child_rss(args)
        return {}
    logging.basicConfig(level=logging.WARNING)
    bench_started = time.perf_counter()
    load_start = os.getloadavg()[0]  # other jobs on the machine compete with the reads for the cores

    started = time.perf_counter()
    study = demo_study(args)
    demo_s = time.perf_counter() - started
    names = sorted(study.slide_paths)
    slides = open_slides(study, names, reader_options(args))
    # overlapping full-size windows: enough tiles (32 by default) to measure steady throughput, not start-up
    overhead_sample = tile_sample(slides, args, overlap_px=args.overhead_overlap_px)

    # 1. noop node vs raw reads on the same tiles, same slide handles; then with reads that wait for the
    # measured read time instead of decoding (engine overhead without CPU contention)
    overhead = overhead_ratio(slides, overhead_sample, args)
    overhead_defaults = overhead_ratio(open_slides(study, names, {}), overhead_sample, args)
    read_s = 1 / max(overhead["raw_read_tiles_per_s"])
    overhead_io = overhead_ratio(replay_slides(slides, overhead_sample, read_s), overhead_sample, args)

    # 2. peak RSS, 1 slide vs all slides, in fresh processes
    rss = rss_pair(args, len(names))
    rss_defaults = rss_pair(args, len(names), reader_defaults=True)

    # 3. classical segmenters + morphology on full-size tiles
    classical = {
        "mk": create_segmenter("classical", mode="mk"),
        "hspc": create_segmenter("classical", mode="hspc"),
    }
    morphology = [create_feature_extractor("morphology")]
    classical_sample = (
        overhead_sample.groupby("slide").head(1).iloc[: args.classical_tiles]
    )  # distinct slides
    store = args.work_dir / "store_classical"
    classical_tps, classical_summary = node_tiles_per_s(
        slides, classical_sample, store, classical, morphology, args
    )

    n_all = len(names)
    result = {
        "noop_vs_raw_read_ratio": overhead["ratio"],
        "peak_rss_mb_1_slide": rss["1_slide"]["peak_rss_mb"],
        f"peak_rss_mb_{n_all}_slides": rss[f"{n_all}_slides"]["peak_rss_mb"],
        "peak_rss_ratio": rss["ratio"],
        "classical_tiles_per_s": classical_tps,
        "noop_vs_raw_read_ratio_reader_defaults": overhead_defaults["ratio"],
        "noop_vs_raw_read_ratio_io_bound_reads": overhead_io["ratio"],
        "peak_rss_ratio_reader_defaults": rss_defaults["ratio"],
        "tile_px": args.tile_px,
        "rss_overlap_px": args.rss_overlap_px,
        "slide_px": [args.slide_px, args.slide_px],
        "tiles": {
            "overhead": len(overhead_sample),
            "rss_1_slide": rss["1_slide"]["n_tiles"],
            f"rss_{n_all}_slides": rss[f"{n_all}_slides"]["n_tiles"],
            "classical": len(classical_sample),
        },
        "threads": {"readers": args.reader_threads, "writers": args.writer_threads, "model": 1},
        "queue_sizes": {"prefetch_tiles": args.prefetch_tiles, "pending_writes": args.pending_writes},
        "max_tiles_in_memory": settings(args).max_tiles_in_memory,
        "reader_options": reader_options(args),
        "overhead_runs": overhead,
        "overhead_runs_reader_defaults": overhead_defaults,
        "overhead_runs_io_bound_reads": {**overhead_io, "read_s": read_s},
        "rss_runs": rss,
        "rss_runs_reader_defaults": rss_defaults,
        "classical_run_summary": classical_summary,
        "demo_generation_s": demo_s,
        "demo_spec": {
            "n_slides": args.n_slides,
            "slide_px": args.slide_px,
            "compression": study.spec.compression,
        },
        "machine": {
            "cpus": os.cpu_count(),
            "load_avg_1min_start_end": [load_start, os.getloadavg()[0]],
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "bench_wall_s": time.perf_counter() - bench_started,
    }
    shutil.rmtree(store, ignore_errors=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict | list)}, indent=2))
    return result


if __name__ == "__main__":
    main()
