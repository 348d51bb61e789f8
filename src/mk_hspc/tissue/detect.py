"""Tissue detection on slide thumbnails: a per-pixel score, one threshold for the whole study, a clean mask.

The score is the optical density (OD) of the darkest channel, ``-log10(min(R, G, B) / 255)``: glass is bright
and grey (OD near 0 in every channel) while both hematoxylin and eosin absorb strongly in at least one channel.
The threshold is calibrated on the histogram of ALL slides' scores pooled (triangle method at the foot of the
glass peak), because a per-slide threshold assumes each slide shows both glass and tissue and picks a
meaningless cut on a slide that is nearly all tissue or nearly empty. White holes enclosed by tissue (fat
vacuoles, sinusoids, vessels) are filled up to an area, because a tile that is mostly fat inside marrow is
still marrow; isolated specks (dust, debris) are removed. Method and reasons: ``docs/tissue.md``.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu

#: Largest OD a uint8 pixel can have (a channel value of 1; 0 is clipped to 1).
MAX_OD = float(np.log10(255.0))

_OD_LUT = (-np.log10(np.maximum(np.arange(256), 1) / 255.0)).astype(np.float32)


def tissue_score_thumbnail(
    rgb: np.ndarray,
    *,
    valid: np.ndarray | None = None,
    smooth_sigma_px: float = 0.0,
    unscanned_rgb_max: int = 0,
) -> np.ndarray:
    """Per-pixel tissue score (OD of the darkest channel), smoothed; NaN where there is no image.

    Args:
        rgb: ``(H, W, 3)`` uint8 thumbnail.
        valid: optional ``(H, W)`` bool, False outside every scene.
        smooth_sigma_px: Gaussian sigma in thumbnail pixels, 0 = none. Needed only for a reader that
            subsamples (nearest neighbour picks single nuclei or fat membranes, a speckled score); an
            area-averaging reader (``mk_hspc.czi``'s default) needs none, and smoothing pushes the tissue edge
            outwards when the threshold sits near the glass level.
        unscanned_rgb_max: pixels whose channels are all <= this are treated as no image: areas of a scene
            the scanner never imaged, where a reader fills black (pylibCZIrw's default; ``mk_hspc.czi`` fills
            brightfield white, which scores as glass anyway).

    Returns:
        ``(H, W)`` float32 in ``[0, MAX_OD]``, NaN where there is no image.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected (H, W, 3) uint8 RGB, got {rgb.shape} {rgb.dtype}")
    score = _OD_LUT[rgb.min(axis=2)]
    has_image = rgb.max(axis=2) > unscanned_rgb_max
    if valid is not None:
        has_image &= valid
    if smooth_sigma_px > 0:
        # Normalised convolution: smooth only over pixels that have an image, so scene borders keep their value.
        weight = ndi.gaussian_filter(has_image.astype(np.float32), smooth_sigma_px)
        smoothed = ndi.gaussian_filter(np.where(has_image, score, 0.0).astype(np.float32), smooth_sigma_px)
        with np.errstate(invalid="ignore", divide="ignore"):
            score = smoothed / weight
    return np.where(has_image, score, np.nan).astype(np.float32)


def score_histogram(score_map: np.ndarray, *, bins: int = 1024) -> np.ndarray:
    """Counts of the finite scores in ``bins`` equal bins over ``[0, MAX_OD]`` (NaN = no image, ignored)."""
    finite = score_map[np.isfinite(score_map)]
    counts, _ = np.histogram(finite, bins=bins, range=(0.0, MAX_OD))
    return counts.astype(np.int64)


def _triangle_threshold(
    counts: np.ndarray, centers: np.ndarray, glass_max_od: float, tail_quantile: float
) -> float:
    """Zack's triangle threshold (Zack et al. 1977) to the right of the glass peak, in normalised units.

    The line runs from the glass peak to the ``tail_quantile`` end of the tissue tail; the cut is the bin
    farthest below that line (the knee where the glass peak gives way to tissue). Both axes are scaled to
    ``[0, 1]`` (counts by the peak, bins by the peak-to-tail span), so the result does not depend on the
    number of pixels or bins.
    """
    near_glass = centers <= glass_max_od
    peak = (
        int(np.argmax(np.where(near_glass, counts, -1)))
        if counts[near_glass].any()
        else int(np.argmax(counts))
    )
    cumulative = np.cumsum(counts) / counts.sum()
    tail = max(int(np.searchsorted(cumulative, tail_quantile)), peak + 1)
    if tail >= counts.size:
        return float(centers[-1])
    x = np.arange(tail - peak + 1) / (tail - peak)
    y = counts[peak : tail + 1] / counts[peak]
    below_line = (y[-1] - 1.0) * x - (y - 1.0)  # cross product sign: positive below the peak-to-tail line
    return float(centers[peak + int(np.argmax(below_line))])


def threshold_from_histogram(
    counts: np.ndarray,
    *,
    method: str = "triangle",
    glass_max_od: float = 0.15,
    tail_quantile: float = 0.999,
) -> float:
    """Tissue threshold of a score histogram over ``[0, MAX_OD]`` (from :func:`score_histogram`).

    Args:
        counts: histogram counts.
        method: ``"triangle"`` (default) or ``"otsu"`` (Otsu 1979). Glass forms one narrow peak while tissue
            spreads from pale eosin to dark nuclei; Otsu minimises within-class variance, so that broad tissue
            class pulls its cut into the tissue (pale tissue becomes glass). The triangle method cuts where the
            glass peak ends.
        glass_max_od: the glass peak is looked for at scores up to this (glass never absorbs more).
        tail_quantile: the triangle's far end: this quantile of the scores (robust to a few pen marks).
    """
    counts = np.asarray(counts, dtype=np.int64)
    if counts.sum() == 0:
        raise ValueError("cannot calibrate a tissue threshold: no scored pixels")
    edges = np.linspace(0.0, MAX_OD, counts.size + 1)
    centers = (edges[:-1] + edges[1:]) / 2
    occupied = np.flatnonzero(counts)
    if occupied.size == 1:  # one value only: no split exists, cut just above it
        return float(edges[occupied[0] + 1])
    if method == "triangle":
        return _triangle_threshold(counts, centers, glass_max_od, tail_quantile)
    if method == "otsu":
        lo, hi = occupied[0], occupied[-1] + 1
        return float(threshold_otsu(hist=(counts[lo:hi], centers[lo:hi])))
    raise ValueError(f"unknown threshold method {method!r} (use 'triangle' or 'otsu')")


def calibrate_tissue_threshold(
    score_maps: Iterable[np.ndarray],
    *,
    bins: int = 1024,
    method: str = "triangle",
    min_threshold_od: float = 0.0,
    max_threshold_od: float = MAX_OD,
) -> float:
    """One tissue threshold for a whole study, from the pooled score histogram of every slide.

    Streams: only one histogram is held, so ``score_maps`` may be a generator loading maps one by one.
    ``min_threshold_od`` / ``max_threshold_od`` clamp the result, a guard for a study in which (almost) no
    slide shows glass and the pooled histogram has no glass peak.
    """
    pooled = np.zeros(bins, np.int64)
    for score_map in score_maps:
        pooled += score_histogram(score_map, bins=bins)
    threshold = threshold_from_histogram(pooled, method=method)
    return float(np.clip(threshold, min_threshold_od, max_threshold_od))


def _fill_enclosed_holes(mask: np.ndarray, outside: np.ndarray, max_hole_px: float) -> np.ndarray:
    """Fill background components of at most ``max_hole_px`` pixels that touch neither the border nor ``outside``.

    A glass margin between tissue and the scene edge is not a hole however small it is, hence the border rule.
    """
    holes, n_holes = ndi.label(~mask)  # 4-connected background, the dual of 8-connected tissue
    if n_holes == 0:
        return mask
    sizes = np.bincount(holes.ravel(), minlength=n_holes + 1)
    open_labels = np.zeros(n_holes + 1, bool)
    open_labels[0] = True
    border = np.concatenate([holes[0], holes[-1], holes[:, 0], holes[:, -1], holes[outside]])
    open_labels[border] = True
    fill = (sizes <= max_hole_px) & ~open_labels
    return mask | fill[holes]


def _remove_small_objects(mask: np.ndarray, min_object_px: float) -> np.ndarray:
    """Drop 8-connected tissue components smaller than ``min_object_px`` pixels."""
    objects, n_objects = ndi.label(mask, structure=np.ones((3, 3), bool))
    if n_objects == 0:
        return mask
    sizes = np.bincount(objects.ravel(), minlength=n_objects + 1)
    keep = sizes >= min_object_px
    keep[0] = False
    return keep[objects]


def tissue_mask(
    score_map: np.ndarray,
    threshold: float,
    pixel_um: float,
    *,
    fill_holes_max_um2: float = 250_000.0,
    min_object_um2: float = 20_000.0,
) -> np.ndarray:
    """Tissue where the score exceeds ``threshold``, enclosed holes filled, specks removed.

    Args:
        score_map: from :func:`tissue_score_thumbnail` (NaN = no image, never tissue).
        threshold: from :func:`calibrate_tissue_threshold`.
        pixel_um: size of one score-map pixel in micrometres.
        fill_holes_max_um2: white areas enclosed by tissue up to this area count as tissue (fat, vessels).
        min_object_um2: tissue components smaller than this are dust or debris.
    """
    has_image = np.isfinite(score_map)
    mask = has_image & (np.nan_to_num(score_map, nan=0.0) > threshold)
    pixel_um2 = pixel_um * pixel_um
    mask = _fill_enclosed_holes(mask, ~has_image, fill_holes_max_um2 / pixel_um2)
    mask = _remove_small_objects(mask, min_object_um2 / pixel_um2)
    return mask & has_image
