"""Nucleus candidates of the classical segmenter (``mode: hspc``): every small haematopoietic nucleus.

Haematoxylin above the tissue's background level by a fraction of Otsu's step, holes filled (pale, vesicular nuclei are
stained only at their rim), specks opened away, touching nuclei split by a watershed on the distance
transform from its h-maxima. The segmenter proposes nucleus candidates (lymphocytes, erythroblasts,
myeloid precursors, HSPCs alike); which of them are HSPCs is decided by labels and the classifier.

Each candidate gets a score in [0, 1] (:func:`nucleus_score`): a logistic of its width and its contrast
with a ring around it, both *relative to the tile's typical nucleus* (the median over its candidates).
Relative terms make the score independent of a pixel size that is off by a few per cent and of a lab's
staining strength; only the area bounds and the morphology scales are physical (µm).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu
from skimage.morphology import disk, h_maxima, remove_small_holes
from skimage.segmentation import watershed

from mk_hspc.models.segmenters.binning import radius_px
from mk_hspc.models.segmenters.label_measures import (
    label_means,
    label_moments,
    ring_labels,
    sigmoid,
)
from mk_hspc.models.stain import StainMaps


@dataclass(frozen=True)
class HspcParams:
    """Parameters of the ``hspc`` (nucleus candidate) mode: micrometres, OD units, unitless ratios.

    Attributes:
        working_pixel_size_um: pixel size the nuclei are segmented at (tiles are binned by an integer
            factor towards it; a 6 µm nucleus is still ~12 px wide at 0.5 µm). On BM_GRAZ upsampled to
            the scanner's 0.175 µm/px, 0.5 (binning 3) and 0.35 (binning 2) give the same recall,
            precision and best F1 within 0.005, at less than half the pixels.
        smooth_um: Gaussian sigma applied to the haematoxylin map before thresholding.
        min_tissue_od: summed RGB optical density below which a pixel is glass or fat.
        background_percentile: percentile of the tissue's haematoxylin taken as its background level
            (the stroma or cytoplasm between nuclei; colour deconvolution often puts it below 0).
        threshold_scale: nucleus threshold = background + this x (Otsu threshold of the tissue's
            haematoxylin - background); low, so that pale (vesicular) nuclei are candidates too (recall
            first). Measured from the background, not from 0 OD: on a paler or differently unmixed
            stain the whole haematoxylin scale shifts, and an absolute threshold misses pale nuclei.
        threshold_contrast_od_range: Otsu threshold - background is clipped to this range first, so
            that a tile without nuclei (or made only of nuclei) keeps a sensible threshold. The floor
            (0.15 OD) keeps a nucleus-free tile of stroma with a little texture (0.02 OD) free of
            candidates; the palest nuclei-challenge image has a step of 0.15 OD, BM_GRAZ about 0.3.
        max_hole_um2: enclosed holes up to this area are filled (pale nuclear centres).
        opening_radius_um: opening that removes specks; small, so that thin spindle nuclei survive.
        distance_smooth_um: Gaussian sigma on the distance transform before finding markers.
        split_depth_um: h of the h-maxima markers: two nuclei are split only when the neck between them
            is at least this much narrower than their radii.
        ring_width_um: width of the ring around a nucleus used for its local contrast.
        min_area_um2: candidates smaller than this are dropped (specks, debris).
        max_area_um2: candidates larger than this are dropped. 300 µm² (a 20 µm disc): a marrow nucleus
            is far smaller, but large non-marrow nuclei and touching pairs are kept as candidates (the
            score and the classifier decide); megakaryocyte lobes are excluded separately.
        score_width_ratio: nucleus width / the tile's median candidate width where the width term is 0.
        score_width_ratio_scale: change of that ratio that moves the logit by 1.
        score_contrast_ratio: ring contrast / the tile's median contrast where the contrast term is 0.
        score_contrast_ratio_scale: change of that ratio that moves the logit by 1.
        reference_min_candidates: with fewer candidates than this a tile's medians are not trusted and
            ``reference_width_um`` / ``reference_contrast`` are used instead.
        reference_width_um: typical nucleus width (median on real bone-marrow H&E).
        reference_contrast: typical ring contrast in units of the threshold's step above background
            (same source).
        min_score: candidates with a lower score are dropped (the operating point; recall first).
        exclude_mk_nuclei: drop candidates whose centre lies inside a megakaryocyte candidate of the
            ``mk`` mode that scores at least ``exclude_mk_min_score`` (the lobes of an MK nucleus).
        exclude_mk_min_score: see ``exclude_mk_nuclei``.
        mk_params: parameters of that ``mk`` pass (see :class:`~.megakaryocytes.MkParams`).
    """

    working_pixel_size_um: float = 0.5
    smooth_um: float = 0.7
    min_tissue_od: float = 0.25
    background_percentile: float = 25.0
    threshold_scale: float = 0.6
    threshold_contrast_od_range: tuple[float, float] = (0.15, 0.6)
    max_hole_um2: float = 50.0
    opening_radius_um: float = 0.5
    distance_smooth_um: float = 0.5
    split_depth_um: float = 0.4
    ring_width_um: float = 1.5
    min_area_um2: float = 5.0
    max_area_um2: float = 300.0
    score_width_ratio: float = 0.9
    score_width_ratio_scale: float = 0.15
    score_contrast_ratio: float = 0.8
    score_contrast_ratio_scale: float = 0.3
    reference_min_candidates: int = 20
    reference_width_um: float = 5.9
    reference_contrast: float = 3.0
    min_score: float = 0.35
    exclude_mk_nuclei: bool = True
    exclude_mk_min_score: float = 0.4
    mk_params: dict[str, Any] = dataclasses.field(default_factory=dict)


def segment_nuclei(
    stains: StainMaps, pixel_size_um: float, p: HspcParams
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Candidate nuclei (labels) and their measurements, before any filtering, at the maps' pixel size.

    Returns:
        ``(labels, features)`` with ``features`` holding, per label ``1..N``: ``area_um2``,
        ``width_um`` (minor axis), ``contrast`` (mean haematoxylin inside minus in a ring around it, in
        units of the threshold's step above background, :func:`haematoxylin_background`), ``centroid_y`` / ``centroid_x`` (px of the maps).
    """
    px = pixel_size_um
    h = ndi.gaussian_filter(stains.haematoxylin, p.smooth_um / px)
    tissue = stains.od_total > p.min_tissue_od
    background, contrast_scale = haematoxylin_background(h, tissue, p)
    threshold = background + contrast_scale
    foreground = remove_small_holes(h > threshold, max_size=int(p.max_hole_um2 / px**2))
    foreground = ndi.binary_opening(foreground, disk(radius_px(p.opening_radius_um, px)))
    distance = ndi.distance_transform_edt(foreground).astype(np.float32)
    distance = ndi.gaussian_filter(distance, p.distance_smooth_um / px)
    markers, _ = ndi.label(foreground_h_maxima(distance, foreground, p.split_depth_um / px))
    labels = watershed(-distance, markers, mask=foreground).astype(np.int32)
    n = int(labels.max())
    moments = label_moments(labels, n)
    inside = label_means(stains.haematoxylin, labels, n)
    ring = label_means(stains.haematoxylin, ring_labels(labels, radius_px(p.ring_width_um, px)), n)
    features = {
        "area_um2": moments["area"] * px**2,
        "width_um": moments["minor"] * px,
        "contrast": np.nan_to_num((inside - ring) / contrast_scale, nan=0.0),
        "centroid_y": moments["centroid_y"],
        "centroid_x": moments["centroid_x"],
    }
    return labels, features


def foreground_h_maxima(distance: np.ndarray, foreground: np.ndarray, h: float) -> np.ndarray:
    """``h_maxima(distance * foreground, h) & foreground``, computed on the foreground's pieces only.

    skimage's grey reconstruction sorts every pixel of its image; nuclei cover a fraction of a tile, so
    each 8-connected piece of the foreground is cut out (its own pixels only, in a zero border) and the
    pieces are packed side by side on shelves, and the h-maxima of that packed image are mapped back.
    Zero around every piece, as between the pieces on the tile, makes this equal to the whole-tile
    transform (tested), on typically a third of the pixels.
    """
    pieces, n = ndi.label(foreground, structure=np.ones((3, 3), bool))
    if n == 0:
        return np.zeros(foreground.shape, bool)
    slices = ndi.find_objects(pieces)
    heights = np.array([s[0].stop - s[0].start + 2 for s in slices])
    widths = np.array([s[1].stop - s[1].start + 2 for s in slices])
    shelf_width = max(int(widths.max()), int(np.sqrt(heights @ widths)) + 1)
    offsets = np.zeros((n, 2), np.int64)
    y = x = shelf_height = 0
    for k in np.argsort(-heights, kind="stable"):  # tallest first: shelves waste little height
        if x + widths[k] > shelf_width:
            y, x, shelf_height = y + shelf_height, 0, 0
        offsets[k] = y, x
        x += widths[k]
        shelf_height = max(shelf_height, int(heights[k]))
    packed = np.zeros((y + shelf_height, shelf_width), distance.dtype)
    own = []
    for k, (rows, cols) in enumerate(slices):
        mine = pieces[rows, cols] == k + 1
        own.append(mine)
        oy, ox = offsets[k] + 1
        packed[oy : oy + mine.shape[0], ox : ox + mine.shape[1]][mine] = distance[rows, cols][mine]
    packed_maxima = h_maxima(packed, h).astype(bool)
    maxima = np.zeros(foreground.shape, bool)
    for k, (rows, cols) in enumerate(slices):
        oy, ox = offsets[k] + 1
        mine = own[k]
        maxima[rows, cols] |= packed_maxima[oy : oy + mine.shape[0], ox : ox + mine.shape[1]] & mine
    return maxima


def haematoxylin_background(
    h: np.ndarray, tissue: np.ndarray, p: HspcParams, min_pixels: int = 256
) -> tuple[float, float]:
    """``(background, step)`` of a tile's smoothed haematoxylin: nuclei are the pixels above ``background + step``.

    ``background`` is the ``background_percentile`` of the tissue's haematoxylin; ``step`` is
    ``threshold_scale`` x (Otsu threshold - background), that difference clipped to
    ``threshold_contrast_od_range``. Both come from one 256-bin histogram of the tissue's pixels. A tile
    with less than ``min_pixels`` of tissue (or a flat one) gets background 0 and the range's low end.
    Contrasts (:func:`segment_nuclei`) are in units of ``step``.
    """
    low, high = p.threshold_contrast_od_range
    values = h[tissue]
    if values.size < min_pixels or float(values.min()) == float(values.max()):
        return 0.0, p.threshold_scale * low
    counts, edges = np.histogram(values, bins=256)
    centers = (edges[:-1] + edges[1:]) / 2
    otsu = float(threshold_otsu(hist=(counts, centers)))
    cumulative = np.cumsum(counts)
    rank = p.background_percentile / 100.0 * cumulative[-1]
    background = float(centers[min(int(np.searchsorted(cumulative, rank)), len(centers) - 1)])
    return background, p.threshold_scale * float(np.clip(otsu - background, low, high))


def typical_nucleus(features: dict[str, np.ndarray], p: HspcParams) -> tuple[float, float]:
    """``(width_um, contrast)`` of the tile's typical nucleus: medians over candidates of a plausible size.

    Falls back to the reference values on tiles with fewer than ``reference_min_candidates`` such
    candidates (a tile of fat or bone has no typical nucleus).
    """
    area = features["area_um2"]
    plausible = (area >= p.min_area_um2) & (area <= p.max_area_um2)
    if int(plausible.sum()) < p.reference_min_candidates:
        return p.reference_width_um, p.reference_contrast
    width = float(np.median(features["width_um"][plausible]))
    contrast = float(np.median(features["contrast"][plausible]))
    if width <= 0 or contrast <= 0:
        return p.reference_width_um, p.reference_contrast
    return width, contrast


def nucleus_score(features: dict[str, np.ndarray], p: HspcParams) -> np.ndarray:
    """Score in [0, 1] of each nucleus candidate: a logistic of its relative width and contrast.

    Wide, well-contrasted nuclei score high; narrow fragments, lobes of granulocytes, spindle-shaped
    stromal nuclei and faint, out-of-focus nuclei score low. Both terms are ratios to the tile's typical
    nucleus (:func:`typical_nucleus`), so a pixel size off by ±15 % or a paler stain moves every
    candidate alike and the ranking and operating point stay put.
    """
    width_um, contrast = typical_nucleus(features, p)
    logit = (features["width_um"] / width_um - p.score_width_ratio) / p.score_width_ratio_scale + (
        features["contrast"] / contrast - p.score_contrast_ratio
    ) / p.score_contrast_ratio_scale
    return sigmoid(logit).astype(np.float32)
