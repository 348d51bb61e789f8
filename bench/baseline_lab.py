"""The lab's original tissue-tile method, reimplemented as the reference for ``tissue_bench.py``.

What the original pipeline did, step by step:

1. Every tile of the grid is read at FULL resolution (``read_region(..., scale=1.0)``).
2. The tile is converted to grey (ITU-R BT.601 luma, ``0.299 R + 0.587 G + 0.114 B``, as OpenCV's
   ``COLOR_RGB2GRAY``) and cut into ``block_px`` x ``block_px`` blocks (512 px). Blocks at the tile's right and
   bottom edge are smaller when the tile is not a multiple of 512 px; they are kept, so every pixel belongs to
   exactly one block. Each block's grey-value variance is computed.
3. The variance threshold is calibrated once per study by 3-cluster K-means (scikit-learn, seeded) on the
   block variances of ``n_calibration_tiles`` (16) tiles drawn at random (seeded) from the grids of all slides,
   read for this purpose (a second read of those tiles; a small number keeps the baseline's time honest).
   In 1-D K-means assigns each value to the nearest centre, so the boundary between the lowest-variance
   cluster (glass) and the others is the midpoint between the two lowest centres: that midpoint is the
   threshold.
4. A tile is kept when at least ``min_block_fraction`` (15%) of its blocks have a variance above the
   threshold.

Tiles are processed by a thread pool of the same size the new method uses, so the comparison measures the
method, not the parallelism.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
from sklearn.cluster import KMeans

from mk_hspc.tissue.protocols import SlideLike

_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def block_variances(tile_rgb: np.ndarray, block_px: int = 512) -> np.ndarray:
    """Grey-value variance of every ``block_px`` block of a tile (edge blocks may be smaller), row-major."""
    grey = tile_rgb.astype(np.float32) @ _LUMA
    row_starts = np.arange(0, grey.shape[0], block_px)
    col_starts = np.arange(0, grey.shape[1], block_px)
    sums = np.add.reduceat(np.add.reduceat(grey, row_starts, axis=0, dtype=np.float64), col_starts, axis=1)
    squares = np.add.reduceat(
        np.add.reduceat(np.square(grey, dtype=np.float64), row_starts, axis=0), col_starts, axis=1
    )
    heights = np.diff(np.append(row_starts, grey.shape[0]))
    widths = np.diff(np.append(col_starts, grey.shape[1]))
    counts = np.outer(heights, widths)
    means = sums / counts
    return np.maximum(squares / counts - means**2, 0.0).ravel()


def _read_tile(slide: SlideLike, tile: pd.Series) -> np.ndarray:
    return slide.read_region(int(tile.x), int(tile.y), int(tile.w), int(tile.h), scale=1.0)


def calibrate_variance_threshold(
    slides: Mapping[str, SlideLike],
    tile_index: pd.DataFrame,
    *,
    n_calibration_tiles: int = 16,
    block_px: int = 512,
    seed: int = 0,
    threads: int = 2,
) -> tuple[float, list[float]]:
    """Threshold between the lowest of 3 K-means clusters of block variances and the next one.

    Returns:
        ``(threshold, sorted cluster centres)``.
    """
    rng = np.random.default_rng(seed)
    ordered = tile_index.sort_values("tile_id", ignore_index=True)
    picks = rng.choice(len(ordered), size=min(n_calibration_tiles, len(ordered)), replace=False)
    tiles = ordered.iloc[np.sort(picks)]

    def variances(tile: pd.Series) -> np.ndarray:
        return block_variances(_read_tile(slides[tile.slide], tile), block_px)

    with ThreadPoolExecutor(max_workers=threads) as pool:
        values = np.concatenate(list(pool.map(variances, (row for _, row in tiles.iterrows()))))
    kmeans = KMeans(n_clusters=3, n_init=10, random_state=seed).fit(values.reshape(-1, 1))
    centres = sorted(float(c) for c in kmeans.cluster_centers_.ravel())
    return (centres[0] + centres[1]) / 2.0, centres


def lab_tissue_tiles(
    slides: Mapping[str, SlideLike] | Sequence[SlideLike],
    tile_index: pd.DataFrame,
    *,
    block_px: int = 512,
    min_block_fraction: float = 0.15,
    n_calibration_tiles: int = 16,
    seed: int = 0,
    threads: int = 2,
) -> tuple[pd.DataFrame, dict[str, object]]:
    """Run the lab method on every tile of ``tile_index`` (columns ``tile_id, slide, x, y, w, h``).

    Returns:
        ``(per-tile frame with tile_id, tissue_block_fraction, is_tissue; calibration facts)``.
    """
    named = dict(slides) if isinstance(slides, Mapping) else {slide.meta.name: slide for slide in slides}
    threshold, centres = calibrate_variance_threshold(
        named,
        tile_index,
        n_calibration_tiles=n_calibration_tiles,
        block_px=block_px,
        seed=seed,
        threads=threads,
    )

    def block_fraction(tile: pd.Series) -> float:
        return float(np.mean(block_variances(_read_tile(named[tile.slide], tile), block_px) > threshold))

    with ThreadPoolExecutor(max_workers=threads) as pool:
        fractions = list(pool.map(block_fraction, (row for _, row in tile_index.iterrows())))
    result = pd.DataFrame({"tile_id": tile_index["tile_id"].to_numpy(), "tissue_block_fraction": fractions})
    result["is_tissue"] = result["tissue_block_fraction"] >= min_block_fraction
    calibration = {
        "variance_threshold": threshold,
        "kmeans_centres": centres,
        "n_calibration_tiles": int(min(n_calibration_tiles, len(tile_index))),
        "block_px": block_px,
        "min_block_fraction": min_block_fraction,
    }
    return result, calibration
