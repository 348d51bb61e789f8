"""The weight-free default segmenter: colour deconvolution, thresholds and marker-controlled watersheds.

Two modes share the stain separation (:mod:`mk_hspc.models.stain`) and differ in scale:

* ``hspc``: small round nuclei. Haematoxylin above a per-tile Otsu threshold, holes filled (pale,
  vesicular nuclei are stained only at their rim), thin bridges opened, touching nuclei split by a
  watershed on the distance transform from its h-maxima. Each nucleus gets a confidence from its width
  and its contrast with a thin ring around it; nuclei below ``min_score`` and nuclei that are lobes of a
  megakaryocyte (found with the ``mk`` mode on the same tile) are dropped.
* ``mk``: large cells whose dark, multilobed nucleus sits in abundant eosinophilic cytoplasm. Lobes
  are merged into one nuclear mass by a closing at the lobe-gap scale. MK-like cytoplasm is even,
  eosinophilic, non-nuclear tissue that survives an opening (so the thin rims of small cells and of fat
  vacuoles do not count). A large mass is an MK when a ring around it is mostly such cytoplasm and the
  cell it forms with the cytoplasm around it is bounded (bone and matrix go on) and has an MK's area;
  clusters of small nuclei have no such ring.

Every size is a micrometre parameter converted once with the tile's pixel size; each mode works at its
own coarser pixel size (integer binning) where the scale allows, and returns labels at the tile's size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu
from skimage.morphology import convex_hull_image, disk, h_maxima, remove_small_holes
from skimage.segmentation import relabel_sequential, watershed

from mk_hspc.models.base import Segmentation
from mk_hspc.models.stain import StainMaps, separate_he
from mk_hspc.models.tile_memo import LastTileResults, tile_fingerprint

MODES = ("hspc", "mk")


@dataclass(frozen=True)
class HspcParams:
    """Parameters of the ``hspc`` mode (micrometres, OD units, unitless ratios).

    Attributes:
        working_pixel_size_um: pixel size the nuclei are segmented at (tiles are binned by an integer
            factor towards it; a 7 µm nucleus is still ~20 px wide at 0.35 µm).
        smooth_um: Gaussian sigma applied to the haematoxylin map before thresholding.
        min_tissue_od: summed RGB optical density below which a pixel is glass or fat.
        threshold_scale: nucleus threshold = this x Otsu threshold of the tissue's haematoxylin.
        threshold_od_range: the Otsu threshold is clipped to this range first, so that a tile without
            nuclei (or made only of nuclei) keeps a sensible threshold.
        max_hole_um2: enclosed holes up to this area are filled (pale nuclear centres).
        opening_radius_um: opening that cuts thin bridges between nuclei and removes specks.
        distance_smooth_um: Gaussian sigma on the distance transform before finding markers.
        split_depth_um: h of the h-maxima markers: two nuclei are split only when the neck between them
            is at least this much narrower than their radii.
        ring_width_um: width of the ring around a nucleus used for its local contrast.
        min_area_um2: nuclei smaller than this are dropped (specks, debris).
        max_area_um2: nuclei larger than this are dropped (not a single HSPC nucleus).
        score_width_um: minor-axis length (nucleus width) where the width term of the score is 0.
        score_width_scale_um: width change that moves the logit by 1.
        score_contrast: ring contrast (in units of the nucleus threshold) where the contrast term is 0.
        score_contrast_scale: contrast change that moves the logit by 1.
        min_score: nuclei with a lower confidence are dropped.
        exclude_mk_nuclei: drop nuclei whose centre lies inside a megakaryocyte found by the ``mk`` mode.
        mk_params: parameters of that ``mk`` pass (see :class:`MkParams`).
    """

    working_pixel_size_um: float = 0.35
    smooth_um: float = 0.7
    min_tissue_od: float = 0.25
    threshold_scale: float = 0.8
    threshold_od_range: tuple[float, float] = (0.2, 0.6)
    max_hole_um2: float = 50.0
    opening_radius_um: float = 1.0
    distance_smooth_um: float = 0.5
    split_depth_um: float = 0.8
    ring_width_um: float = 1.5
    min_area_um2: float = 8.0
    max_area_um2: float = 150.0
    score_width_um: float = 4.5
    score_width_scale_um: float = 0.8
    score_contrast: float = 2.5
    score_contrast_scale: float = 0.8
    min_score: float = 0.5
    exclude_mk_nuclei: bool = True
    mk_params: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class MkParams:
    """Parameters of the ``mk`` mode (micrometres, OD units, unitless ratios).

    Attributes:
        working_pixel_size_um: pixel size MKs are segmented at (an MK is 15-50 µm wide).
        smooth_um: Gaussian sigma on the stain maps.
        min_tissue_od: summed RGB optical density below which a pixel is glass or fat.
        threshold_od_range: clip range of the per-tile Otsu threshold of haematoxylin (nuclei).
        threshold_scale: nucleus threshold = this x the clipped Otsu threshold; low, so that pale nuclei
            count as nuclei and never as cytoplasm.
        lobe_gap_um: closing radius that merges the lobes of one MK nucleus.
        lobe_merge_um: candidate nuclei this close to each other, with cytoplasm between them, are lobes
            of one MK (one cell, not two halves split between them).
        min_nucleus_area_um2: smallest merged nuclear mass that can be an MK nucleus.
        cytoplasm_eosin_od: eosin OD above which a non-nuclear pixel can be MK cytoplasm.
        cytoplasm_max_haematoxylin: haematoxylin, as a fraction of the nucleus threshold, above which it
            cannot (nuclear haze, basophilic cells).
        texture_smooth_um: Gaussian sigma applied to the optical density before its local standard
            deviation, so that pixel-scale granularity and noise do not count as texture.
        texture_window_um: window of the local standard deviation of the optical density.
        cytoplasm_max_texture_od: local OD standard deviation above which a pixel is not MK cytoplasm;
            an MK's cytoplasm is finely granular and even, packed small cells, red-cell clusters and
            vacuoles have edges.
        cytoplasm_opening_um: opening radius of the cytoplasm mask: only pink areas at least twice this
            wide remain (an MK's cytoplasm, bone, blood pools), not the rims of small cells or vacuoles.
        ring_gap_um: the ring starts this far from the nucleus (its border blurs the maps there).
        ring_width_um: width of the ring around a candidate nucleus that must be such cytoplasm.
        min_ring_fraction: share of that ring that must be cytoplasm for a mass to be examined at all.
        max_cytoplasm_um: farthest a pixel of the cell can be from its nucleus.
        open_band_um: width of the band just outside the cell examined for ``max_open_fraction``.
        max_open_fraction: largest share of that band that may still be MK-like cytoplasm: an MK ends at
            a border, bone and matrix go on (cut only by the reach limit or by a neighbouring candidate).
        min_area_um2: smallest MK (nucleus + cytoplasm).
        max_area_um2: largest MK.
        min_score: cells with a lower confidence (ring fraction x solidity x closedness, see
            :func:`mk_score`) are dropped.
    """

    working_pixel_size_um: float = 0.7
    smooth_um: float = 0.7
    min_tissue_od: float = 0.25
    threshold_od_range: tuple[float, float] = (0.2, 0.6)
    threshold_scale: float = 0.7
    lobe_gap_um: float = 1.5
    lobe_merge_um: float = 4.0
    min_nucleus_area_um2: float = 30.0
    cytoplasm_eosin_od: float = 0.2
    cytoplasm_max_haematoxylin: float = 0.4
    texture_smooth_um: float = 0.35
    texture_window_um: float = 2.0
    cytoplasm_max_texture_od: float = 0.07
    cytoplasm_opening_um: float = 1.4
    ring_gap_um: float = 1.5
    ring_width_um: float = 3.0
    min_ring_fraction: float = 0.4
    max_cytoplasm_um: float = 20.0
    open_band_um: float = 1.4
    max_open_fraction: float = 0.5
    min_area_um2: float = 200.0
    max_area_um2: float = 2000.0
    min_score: float = 0.45


# ---------------------------------------------------------------------------------------------- scale


def working_factor(pixel_size_um: float, working_pixel_size_um: float) -> int:
    """Integer binning factor that brings ``pixel_size_um`` closest to ``working_pixel_size_um`` (>= 1)."""
    if pixel_size_um <= 0:
        raise ValueError(f"pixel_size_um must be > 0, got {pixel_size_um}")
    return max(1, int(round(working_pixel_size_um / pixel_size_um)))


def bin_rgb(rgb: np.ndarray, factor: int) -> np.ndarray:
    """Mean of ``factor x factor`` blocks (edges padded by replication so no dark border appears)."""
    if factor == 1:
        return np.asarray(rgb)
    height, width = rgb.shape[:2]
    pad_y, pad_x = (-height) % factor, (-width) % factor
    if pad_y or pad_x:
        rgb = np.pad(rgb, ((0, pad_y), (0, pad_x), (0, 0)), mode="edge")
    # Summing the factor x factor strided views is several times faster than a reshaped mean.
    binned = np.zeros((rgb.shape[0] // factor, rgb.shape[1] // factor, 3), np.float32)
    for dy in range(factor):
        for dx in range(factor):
            binned += rgb[dy::factor, dx::factor]
    binned *= np.float32(1.0 / factor**2)
    return binned


def unbin_labels(labels: np.ndarray, factor: int, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour upsampling of binned labels back to the tile's ``shape``."""
    if factor == 1:
        return labels
    return np.repeat(np.repeat(labels, factor, axis=0), factor, axis=1)[: shape[0], : shape[1]]


def _radius_px(radius_um: float, pixel_size_um: float) -> int:
    return max(1, int(round(radius_um / pixel_size_um)))


# ------------------------------------------------------------------------------------------- helpers


def nucleus_threshold(
    haematoxylin: np.ndarray, tissue: np.ndarray, od_range: tuple[float, float], min_pixels: int = 256
) -> float:
    """Otsu threshold of the tissue's haematoxylin, clipped to ``od_range`` (the range alone if no tissue)."""
    values = haematoxylin[tissue]
    if values.size < min_pixels or float(values.min()) == float(values.max()):
        return float(od_range[0])
    return float(np.clip(threshold_otsu(values), *od_range))


def label_means(values: np.ndarray, labels: np.ndarray, n_labels: int) -> np.ndarray:
    """Mean of ``values`` per label ``1..n_labels`` (NaN where a label has no pixel), vectorised."""
    flat = labels.ravel()
    counts = np.bincount(flat, minlength=n_labels + 1)[1:]
    sums = np.bincount(flat, weights=values.ravel(), minlength=n_labels + 1)[1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / counts


def label_moments(labels: np.ndarray, n_labels: int) -> dict[str, np.ndarray]:
    """Area, centroid and minor/major axis lengths (px) of labels ``1..n_labels`` from second moments.

    The axes are those of the ellipse with the same second moments (as ``skimage.measure.regionprops``),
    computed with ``bincount`` so that thousands of nuclei cost one pass over the image.
    """
    rows, cols = np.nonzero(labels)
    lab = labels[rows, cols]
    area = np.bincount(lab, minlength=n_labels + 1)[1:].astype(np.float64)
    safe = np.maximum(area, 1.0)
    cy = np.bincount(lab, weights=rows, minlength=n_labels + 1)[1:] / safe
    cx = np.bincount(lab, weights=cols, minlength=n_labels + 1)[1:] / safe
    dy, dx = rows - cy[lab - 1], cols - cx[lab - 1]
    myy = np.bincount(lab, weights=dy * dy, minlength=n_labels + 1)[1:] / safe
    mxx = np.bincount(lab, weights=dx * dx, minlength=n_labels + 1)[1:] / safe
    mxy = np.bincount(lab, weights=dx * dy, minlength=n_labels + 1)[1:] / safe
    half_trace, det_term = (myy + mxx) / 2.0, np.sqrt(((myy - mxx) / 2.0) ** 2 + mxy**2)
    return {
        "area": area,
        "centroid_y": cy,
        "centroid_x": cx,
        "major": 4.0 * np.sqrt(np.maximum(half_trace + det_term, 0.0)),
        "minor": 4.0 * np.sqrt(np.maximum(half_trace - det_term, 0.0)),
    }


def local_std(image: np.ndarray, window_px: int, where: np.ndarray | None = None) -> np.ndarray:
    """Standard deviation of ``image`` in a ``window_px`` box around each pixel.

    With ``where``, only those pixels enter each window (normalised convolution), so that e.g. the edge of
    a dark nucleus does not make the even cytoplasm around it look textured.
    """
    image = image.astype(np.float32, copy=False)
    weight = np.ones_like(image) if where is None else where.astype(np.float32)
    count = np.maximum(ndi.uniform_filter(weight, window_px), 1e-6)
    mean = ndi.uniform_filter(image * weight, window_px) / count
    mean_sq = ndi.uniform_filter(image * image * weight, window_px) / count
    return np.sqrt(np.maximum(mean_sq - mean * mean, 0.0))


def ring_labels(labels: np.ndarray, width_px: int) -> np.ndarray:
    """Background pixels within ``width_px`` of a label, each given the label of the nearest one."""
    distance, (iy, ix) = ndi.distance_transform_edt(labels == 0, return_indices=True)
    return np.where((distance > 0) & (distance <= width_px), labels[iy, ix], 0)


def keep_labels(labels: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Zero labels ``k`` with ``keep[k - 1]`` False and renumber the rest 1..N in order (int32)."""
    lut = np.zeros(len(keep) + 1, np.int32)
    lut[1:][keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return lut[labels]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


# ---------------------------------------------------------------------------------------------- HSPC


def segment_nuclei(
    stains: StainMaps, pixel_size_um: float, p: HspcParams
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Candidate nuclei (labels) and their measurements, before any filtering, at the maps' pixel size.

    Returns:
        ``(labels, features)`` with ``features`` holding, per label ``1..N``: ``area_um2``,
        ``width_um`` (minor axis), ``contrast`` (mean haematoxylin inside minus in a ring around it, in
        units of the nucleus threshold), ``centroid_y`` / ``centroid_x`` (px of the maps).
    """
    px = pixel_size_um
    h = ndi.gaussian_filter(stains.haematoxylin, p.smooth_um / px)
    tissue = stains.od_total > p.min_tissue_od
    threshold = nucleus_threshold(h, tissue, p.threshold_od_range) * p.threshold_scale
    foreground = remove_small_holes(h > threshold, max_size=int(p.max_hole_um2 / px**2))
    foreground = ndi.binary_opening(foreground, disk(_radius_px(p.opening_radius_um, px)))
    distance = ndi.distance_transform_edt(foreground).astype(np.float32)
    distance = ndi.gaussian_filter(distance, p.distance_smooth_um / px)
    markers, _ = ndi.label(h_maxima(distance, p.split_depth_um / px) & foreground)
    labels = watershed(-distance, markers, mask=foreground).astype(np.int32)
    n = int(labels.max())
    moments = label_moments(labels, n)
    inside = label_means(stains.haematoxylin, labels, n)
    ring = label_means(stains.haematoxylin, ring_labels(labels, _radius_px(p.ring_width_um, px)), n)
    features = {
        "area_um2": moments["area"] * px**2,
        "width_um": moments["minor"] * px,
        "contrast": np.nan_to_num((inside - ring) / threshold, nan=0.0),
        "centroid_y": moments["centroid_y"],
        "centroid_x": moments["centroid_x"],
    }
    return labels, features


def nucleus_score(features: dict[str, np.ndarray], p: HspcParams) -> np.ndarray:
    """Confidence in [0, 1] that a candidate is an HSPC nucleus: a logistic of its width and contrast.

    Wide, well-contrasted nuclei score high; narrow fragments, lobes of granulocytes, spindle-shaped
    stromal nuclei and faint, out-of-focus nuclei score low.
    """
    logit = (features["width_um"] - p.score_width_um) / p.score_width_scale_um + (
        features["contrast"] - p.score_contrast
    ) / p.score_contrast_scale
    return _sigmoid(logit).astype(np.float32)


# ------------------------------------------------------------------------------------------------ MK


@dataclass(frozen=True)
class MkMaps:
    """Tile-wide masks the ``mk`` mode examines its candidates with (all at the working pixel size).

    Attributes:
        nuclei: labels ``1..G`` of candidate MK nuclei: nuclear masses large enough and ringed by
            cytoplasm, lobes that share one cytoplasm grouped under one label.
        ring_fraction: per candidate ``1..G``, the share of a ring around it (pixels nearer to it than to
            any other nuclear mass) that is MK-like cytoplasm.
        cytoplasm: wide, even, eosinophilic, non-nuclear tissue (what an MK's cytoplasm looks like).
        nearest: label of the nearest candidate of every pixel: a Voronoi split of the cytoplasm between
            neighbouring candidates (small nuclei own no wide cytoplasm, so they do not take part).
    """

    nuclei: np.ndarray
    ring_fraction: np.ndarray
    cytoplasm: np.ndarray
    nearest: np.ndarray


def mk_maps(stains: StainMaps, pixel_size_um: float, p: MkParams) -> MkMaps:
    """Candidate MK nuclei, their ring fractions and the MK-cytoplasm mask of a tile."""
    px = pixel_size_um
    h = ndi.gaussian_filter(stains.haematoxylin, p.smooth_um / px)
    e = ndi.gaussian_filter(stains.eosin, p.smooth_um / px)
    tissue = stains.od_total > p.min_tissue_od
    threshold = nucleus_threshold(h, tissue, p.threshold_od_range)
    # Lobes of one MK nucleus are separated by thin gaps: a closing at that scale makes them one mass.
    merged = ndi.binary_closing(h > threshold * p.threshold_scale, disk(_radius_px(p.lobe_gap_um, px)))
    merged = ndi.binary_fill_holes(merged)
    masses, n_masses = ndi.label(merged)
    od_smooth = ndi.gaussian_filter(stains.od_total, p.texture_smooth_um / px)
    texture = local_std(od_smooth, _radius_px(p.texture_window_um, px), where=~merged)
    cytoplasm = (
        tissue
        & ~merged
        & (e > p.cytoplasm_eosin_od)
        & (h < threshold * p.cytoplasm_max_haematoxylin)
        & (texture < p.cytoplasm_max_texture_od)
    )
    cytoplasm = ndi.binary_opening(cytoplasm, disk(_radius_px(p.cytoplasm_opening_um, px)))
    none = MkMaps(np.zeros_like(masses), np.zeros(0), cytoplasm, np.zeros_like(masses))
    if n_masses == 0:
        return none
    # Ring of every mass at once: pixels at the ring's distance whose nearest mass it is.
    distance, (iy, ix) = ndi.distance_transform_edt(~merged, return_indices=True)
    gap_px, width_px = p.ring_gap_um / px, p.ring_width_um / px
    ring = np.where((distance > gap_px) & (distance <= gap_px + width_px), masses[iy, ix], 0)
    ring_total = np.bincount(ring.ravel(), minlength=n_masses + 1)[1:]
    ring_cytoplasm = np.bincount(ring.ravel(), weights=cytoplasm.ravel(), minlength=n_masses + 1)[1:]
    mass_area = np.bincount(masses.ravel(), minlength=n_masses + 1)[1:]
    # Where neighbours crowd a mass its ring is cut short; measure against the full ring of a disc of the
    # same area, so that a nucleus among packed cells cannot pass on a few lucky pixels.
    disc_ring = np.pi * width_px * (2.0 * np.sqrt(mass_area / np.pi) + 2.0 * gap_px + width_px)
    ring_fraction = ring_cytoplasm / np.maximum(np.maximum(ring_total, disc_ring), 1.0)
    is_candidate = np.concatenate([[False], (mass_area * px**2 >= p.min_nucleus_area_um2)])[masses]
    is_candidate &= np.concatenate([[False], ring_fraction >= p.min_ring_fraction])[masses]
    if not is_candidate.any():
        return none
    # Lobes farther apart than the closing joins are still one nucleus when cytoplasm fills the space
    # between them: group candidates linked through cytoplasm within lobe_merge_um of them.
    to_candidate, (iy, ix) = ndi.distance_transform_edt(~is_candidate, return_indices=True)
    halo = ndi.binary_dilation(cytoplasm, disk(_radius_px(p.ring_gap_um, px)))
    groups, _ = ndi.label(is_candidate | ((to_candidate <= p.lobe_merge_um / px) & halo))
    nuclei = relabel_sequential(np.where(is_candidate, groups, 0))[0].astype(np.int32)
    n_nuclei = int(nuclei.max())
    weights = np.where(is_candidate, ring_fraction[np.maximum(masses, 1) - 1], 0.0)
    area = np.bincount(nuclei.ravel(), minlength=n_nuclei + 1)[1:]
    group_ring = np.bincount(nuclei.ravel(), weights=weights.ravel(), minlength=n_nuclei + 1)[1:] / area
    return MkMaps(nuclei, group_ring, cytoplasm, nuclei[iy, ix])


def measure_mk_candidate(
    maps: MkMaps, k: int, box: tuple[slice, slice], pixel_size_um: float, p: MkParams
) -> tuple[np.ndarray, dict[str, float]]:
    """The cell a candidate nucleus ``k`` forms (mask within ``box``) and its measurements.

    Returns:
        ``(cell, measures)`` with ``ring_fraction`` (see :class:`MkMaps`), ``area_um2`` (nucleus +
        the cytoplasm around it that is nearer to ``k`` than to any other candidate and at most
        ``max_cytoplasm_um`` away), ``nucleus_area_um2``, ``open_fraction`` (share of a band just
        outside the cell that is still MK-like cytoplasm) and ``solidity`` (area / convex-hull area).
    """
    px = pixel_size_um
    gap_px, ring_px, reach_px = p.ring_gap_um / px, p.ring_width_um / px, p.max_cytoplasm_um / px
    cytoplasm = maps.cytoplasm[box]
    nucleus = maps.nuclei[box] == k
    to_nucleus = ndi.distance_transform_edt(~nucleus)
    ring = (to_nucleus > gap_px) & (to_nucleus <= gap_px + ring_px)
    reachable = cytoplasm & (maps.nearest[box] == k) & (to_nucleus <= reach_px)
    # The cell: cytoplasm connected to the ring, joined to the nucleus across the blurred halo.
    parts, _ = ndi.label(reachable)
    touching = np.unique(parts[ring & reachable])
    cell = nucleus | np.isin(parts, touching[touching > 0])
    cell = ndi.binary_fill_holes(ndi.binary_closing(cell, disk(max(1, int(round(gap_px + ring_px))))))
    outside = ndi.binary_dilation(cell, iterations=_radius_px(p.open_band_um, px)) & ~cell
    measures = {
        "ring_fraction": float(maps.ring_fraction[k - 1]),
        "area_um2": float(cell.sum()) * px**2,
        "nucleus_area_um2": float(nucleus.sum()) * px**2,
        "open_fraction": float((outside & cytoplasm).sum() / max(outside.sum(), 1)),
        "solidity": float(cell.sum() / max(convex_hull_image(cell).sum(), 1)) if cell.any() else 0.0,
    }
    return cell, measures


def mk_score(measures: dict[str, float], p: MkParams) -> float:
    """Confidence in [0, 1] of an MK candidate: ring fraction x solidity x (1 - open fraction).

    An MK is a nucleus wrapped in its own cytoplasm (ring fraction near 1), compact (solidity near 1)
    and ends at a border (open fraction near 0); a small nucleus among red cells or matrix scores low on
    at least one of them. Candidates outside the area range, or as open as bone, score 0.
    """
    if not p.min_area_um2 <= measures["area_um2"] <= p.max_area_um2:
        return 0.0
    if measures["ring_fraction"] < p.min_ring_fraction or measures["open_fraction"] > p.max_open_fraction:
        return 0.0
    return float(measures["ring_fraction"] * measures["solidity"] * (1.0 - measures["open_fraction"]))


def segment_megakaryocytes(
    stains: StainMaps, pixel_size_um: float, p: MkParams
) -> tuple[np.ndarray, np.ndarray]:
    """MK cells (labels, nucleus + cytoplasm) and their confidence at the maps' pixel size.

    Candidates are nuclear masses (lobes merged) of at least ``min_nucleus_area_um2``; the few that
    exist per tile are examined one by one in their bounding box (:func:`measure_mk_candidate`) and
    kept when :func:`mk_score` is above ``min_score``.
    """
    maps = mk_maps(stains, pixel_size_um, p)
    labels = np.zeros(maps.nuclei.shape, np.int32)
    scores: list[float] = []
    boxes = ndi.find_objects(maps.nuclei)
    height, width = maps.nuclei.shape
    margin = int(np.ceil((p.max_cytoplasm_um + p.ring_gap_um) / pixel_size_um)) + 2
    for k in range(1, len(boxes) + 1):
        rows, cols = boxes[k - 1]
        box = (
            slice(max(rows.start - margin, 0), min(rows.stop + margin, height)),
            slice(max(cols.start - margin, 0), min(cols.stop + margin, width)),
        )
        cell, measures = measure_mk_candidate(maps, int(k), box, pixel_size_um, p)
        score = mk_score(measures, p)
        if score <= 0.0 or score < p.min_score:
            continue
        target = labels[box]
        target[cell & (target == 0)] = len(scores) + 1
        scores.append(score)
    return labels, np.asarray(scores, np.float32)


# ------------------------------------------------------------------------------------------ the plugin

# The last MK pass per (MkParams, pixel size): the mk and hspc segmenters run one after the other on a tile.
_MK_PASS = LastTileResults()


class ClassicalSegmenter:
    """Weight-free H&E segmenter for HSPC nuclei (``mode="hspc"``) or megakaryocytes (``mode="mk"``).

    Args:
        mode: ``"hspc"`` or ``"mk"``.
        **params: fields of :class:`HspcParams` or :class:`MkParams` (micrometres), e.g.
            ``min_area_um2=200.0``; unknown names raise ``TypeError`` at construction.

    Example:
        >>> seg = ClassicalSegmenter(mode="mk", min_area_um2=200.0, max_area_um2=2000.0)
        >>> seg.segment(np.full((256, 256, 3), 240, np.uint8), pixel_size_um=0.1725).n_cells
        0
    """

    name = "classical"

    @classmethod
    def keyword_parameters(cls, arguments: Mapping[str, Any]) -> frozenset[str]:
        """The names ``**params`` accepts for the constructor's named ``arguments`` (the ``mode``)."""
        param_class = HspcParams if arguments["mode"] == "hspc" else MkParams
        return frozenset(f.name for f in dataclasses.fields(param_class))

    def __init__(self, mode: str = "hspc", **params: Any) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        param_class = HspcParams if mode == "hspc" else MkParams
        known = self.keyword_parameters({"mode": mode})
        unknown = sorted(set(params) - known)
        if unknown:
            raise TypeError(f"unknown parameter(s) for classical mode {mode!r}: {', '.join(unknown)}")
        if "threshold_od_range" in params:  # YAML gives a list
            params["threshold_od_range"] = tuple(params["threshold_od_range"])
        self.params: HspcParams | MkParams = param_class(**params)
        # The MK pass: the mode itself, or the HSPC mode's exclusion of MK lobes.
        self._mk_params = (
            MkParams(**self.params.mk_params) if isinstance(self.params, HspcParams) else self.params
        )
        if self.params.max_area_um2 <= self.params.min_area_um2:
            raise ValueError("max_area_um2 must exceed min_area_um2")

    def segment(self, tile_rgb: np.ndarray, pixel_size_um: float) -> Segmentation:
        """Segment one ``(H, W, 3)`` uint8 RGB tile whose pixels are ``pixel_size_um`` wide."""
        if tile_rgb.ndim != 3 or tile_rgb.shape[2] != 3:
            raise ValueError(f"tile_rgb must be (H, W, 3), got {tile_rgb.shape}")
        shape = tile_rgb.shape[:2]
        if self.mode == "mk":
            labels, scores = self._segment_mk(tile_rgb, pixel_size_um)
            factor = working_factor(pixel_size_um, self._mk_params.working_pixel_size_um)
        else:
            labels, scores = self._segment_hspc(tile_rgb, pixel_size_um)
            factor = working_factor(pixel_size_um, self.params.working_pixel_size_um)
        full = unbin_labels(labels, factor, shape)
        if not full.flags.writeable:  # the memoised MK pass at factor 1: hand out a copy
            full = full.copy()
        # A label living only in the binning pad vanishes when cropped: renumber what is left.
        present = np.bincount(full.ravel(), minlength=len(scores) + 1) > 0
        if not present[1:].all():
            full = keep_labels(full, present[1:])
            scores = scores[present[1:]]
        return Segmentation(labels=full.astype(np.int32, copy=False), scores=scores.astype(np.float32))

    def _segment_mk(self, tile_rgb: np.ndarray, pixel_size_um: float) -> tuple[np.ndarray, np.ndarray]:
        """The MK pass at its working resolution; computed once per tile and parameter set, so the ``hspc``
        mode's exclusion of MK lobes reuses the ``mk`` mode's result on the same tile."""
        p = self._mk_params
        key = (repr(p), float(pixel_size_um))  # repr: parameters from YAML may hold lists
        fingerprint = tile_fingerprint(tile_rgb)
        cached = _MK_PASS.get(key, fingerprint)
        if cached is not None:
            return cached
        factor = working_factor(pixel_size_um, p.working_pixel_size_um)
        result = segment_megakaryocytes(separate_he(bin_rgb(tile_rgb, factor)), pixel_size_um * factor, p)
        for array in result:
            array.setflags(write=False)  # shared through the memo
        _MK_PASS.put(key, fingerprint, result)
        return result

    def _segment_hspc(self, tile_rgb: np.ndarray, pixel_size_um: float) -> tuple[np.ndarray, np.ndarray]:
        p = self.params
        if not isinstance(p, HspcParams):
            raise TypeError("the hspc pass needs HspcParams")
        factor = working_factor(pixel_size_um, p.working_pixel_size_um)
        stains = separate_he(bin_rgb(tile_rgb, factor))
        labels, features = segment_nuclei(stains, pixel_size_um * factor, p)
        score = nucleus_score(features, p)
        area = features["area_um2"]
        keep = (score >= p.min_score) & (area >= p.min_area_um2) & (area <= p.max_area_um2)
        if p.exclude_mk_nuclei and keep.any():
            mk_labels, _ = self._segment_mk(tile_rgb, pixel_size_um)
            if mk_labels.max() > 0:
                mk_factor = working_factor(pixel_size_um, self._mk_params.working_pixel_size_um)
                # Nucleus centroids in tile pixels, then in the MK pass's binned pixels.
                y = ((features["centroid_y"] + 0.5) * factor / mk_factor).astype(int)
                x = ((features["centroid_x"] + 0.5) * factor / mk_factor).astype(int)
                y = np.clip(y, 0, mk_labels.shape[0] - 1)
                x = np.clip(x, 0, mk_labels.shape[1] - 1)
                keep &= mk_labels[y, x] == 0
        return keep_labels(labels, keep), score[keep]
