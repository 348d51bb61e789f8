"""Megakaryocyte candidates of the classical segmenter (``mode: mk``).

A megakaryocyte is a large cell whose dark, often multilobed nucleus sits in abundant eosinophilic
cytoplasm. Lobes are merged into one nuclear mass by a closing at the lobe-gap scale. MK-like cytoplasm
is even, eosinophilic, non-nuclear tissue that survives an opening (so the thin rims of small cells and
of fat vacuoles do not count). Every nuclear mass large enough and partly ringed by such cytoplasm is a
candidate: its cell is the mass plus the cytoplasm around it, and its score (:func:`mk_score`) says how
much it looks like an MK: how much of its ring is cytoplasm, how compact the cell is and whether it ends
at a border (bone and matrix go on). Osteoclasts and clusters of small nuclei stay candidates with
lower scores: labels and the classifier decide, the segmenter only must not miss an MK (recall first).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from skimage.morphology import convex_hull_image, disk
from skimage.segmentation import relabel_sequential

from mk_hspc.models.segmenters.binary_morphology import band_around, closed_by_disk, holes_filled
from mk_hspc.models.segmenters.binning import radius_px
from mk_hspc.models.segmenters.label_measures import local_std, nucleus_threshold
from mk_hspc.models.stain import StainMaps


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
            of one MK (one cell, not two halves split between them); 0 (the default) turns this off: on
            real marrow it chains neighbouring cells into one cell larger than any MK, losing the MK.
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
        min_ring_fraction: share of that ring that must be cytoplasm for a mass to be a candidate at
            all; low (recall first): the share also enters the score.
        max_cytoplasm_um: farthest a pixel of the cell can be from its nucleus.
        open_band_um: width of the band just outside the cell examined for ``max_open_fraction``.
        max_open_fraction: largest share of that band that may still be MK-like cytoplasm: an MK ends at
            a border, bone and matrix go on (cut only by the reach limit or by a neighbouring candidate);
            1 (the default) keeps open candidates, whose score the open share lowers instead.
        min_area_um2: smallest MK (nucleus + cytoplasm).
        max_area_um2: largest MK.
        min_score: candidates with a lower score (ring fraction x solidity x closedness, see
            :func:`mk_score`) are dropped: the operating point, low (recall first).
    """

    working_pixel_size_um: float = 0.7
    smooth_um: float = 0.7
    min_tissue_od: float = 0.25
    threshold_od_range: tuple[float, float] = (0.2, 0.6)
    threshold_scale: float = 0.7
    lobe_gap_um: float = 1.5
    lobe_merge_um: float = 0.0
    min_nucleus_area_um2: float = 30.0
    cytoplasm_eosin_od: float = 0.2
    cytoplasm_max_haematoxylin: float = 0.4
    texture_smooth_um: float = 0.35
    texture_window_um: float = 2.0
    cytoplasm_max_texture_od: float = 0.12
    cytoplasm_opening_um: float = 1.4
    ring_gap_um: float = 1.5
    ring_width_um: float = 3.0
    min_ring_fraction: float = 0.15
    max_cytoplasm_um: float = 20.0
    open_band_um: float = 1.4
    max_open_fraction: float = 1.0
    min_area_um2: float = 100.0
    max_area_um2: float = 2000.0
    min_score: float = 0.3


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
        to_nearest: distance (working pixels) of every pixel to that nearest candidate: within the pixels
            that ``nearest`` gives to a candidate, its distance to that candidate's nucleus.
    """

    nuclei: np.ndarray
    ring_fraction: np.ndarray
    cytoplasm: np.ndarray
    nearest: np.ndarray
    to_nearest: np.ndarray


def mk_maps(stains: StainMaps, pixel_size_um: float, p: MkParams) -> MkMaps:
    """Candidate MK nuclei, their ring fractions and the MK-cytoplasm mask of a tile."""
    px = pixel_size_um
    h = ndi.gaussian_filter(stains.haematoxylin, p.smooth_um / px)
    e = ndi.gaussian_filter(stains.eosin, p.smooth_um / px)
    tissue = stains.od_total > p.min_tissue_od
    threshold = nucleus_threshold(h, tissue, p.threshold_od_range)
    # Lobes of one MK nucleus are separated by thin gaps: a closing at that scale makes them one mass.
    merged = ndi.binary_closing(h > threshold * p.threshold_scale, disk(radius_px(p.lobe_gap_um, px)))
    merged = holes_filled(merged)
    masses, n_masses = ndi.label(merged)
    od_smooth = ndi.gaussian_filter(stains.od_total, p.texture_smooth_um / px)
    texture = local_std(od_smooth, radius_px(p.texture_window_um, px), where=~merged)
    cytoplasm = (
        tissue
        & ~merged
        & (e > p.cytoplasm_eosin_od)
        & (h < threshold * p.cytoplasm_max_haematoxylin)
        & (texture < p.cytoplasm_max_texture_od)
    )
    cytoplasm = ndi.binary_opening(cytoplasm, disk(radius_px(p.cytoplasm_opening_um, px)))
    none = MkMaps(
        np.zeros_like(masses), np.zeros(0), cytoplasm, np.zeros_like(masses), np.zeros(masses.shape)
    )
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
    if p.lobe_merge_um <= 0:
        nuclei = relabel_sequential(np.where(is_candidate, masses, 0))[0].astype(np.int32)
        n_nuclei = int(nuclei.max())
        to_nearest, (iy, ix) = ndi.distance_transform_edt(nuclei == 0, return_indices=True)
        ring_of = np.zeros(n_nuclei + 1)
        ring_of[nuclei.ravel()] = np.concatenate([[0.0], ring_fraction])[masses.ravel()]
        return MkMaps(nuclei, ring_of[1:], cytoplasm, nuclei[iy, ix], to_nearest)
    # Lobes farther apart than the closing joins are still one nucleus when cytoplasm fills the space
    # between them: group candidates linked through cytoplasm within lobe_merge_um of them.
    to_candidate, (iy, ix) = ndi.distance_transform_edt(~is_candidate, return_indices=True)
    halo = ndi.binary_dilation(cytoplasm, disk(radius_px(p.ring_gap_um, px)))
    groups, _ = ndi.label(is_candidate | ((to_candidate <= p.lobe_merge_um / px) & halo))
    nuclei = relabel_sequential(np.where(is_candidate, groups, 0))[0].astype(np.int32)
    n_nuclei = int(nuclei.max())
    weights = np.where(is_candidate, ring_fraction[np.maximum(masses, 1) - 1], 0.0)
    area = np.bincount(nuclei.ravel(), minlength=n_nuclei + 1)[1:]
    group_ring = np.bincount(nuclei.ravel(), weights=weights.ravel(), minlength=n_nuclei + 1)[1:] / area
    return MkMaps(nuclei, group_ring, cytoplasm, nuclei[iy, ix], to_candidate)


def measure_mk_candidate(
    maps: MkMaps,
    k: int,
    box: tuple[slice, slice],
    pixel_size_um: float,
    p: MkParams,
    score_floor: float = 0.0,
) -> tuple[np.ndarray, dict[str, float]]:
    """The cell a candidate nucleus ``k`` forms (mask within ``box``) and its measurements.

    Args:
        score_floor: when ring fraction x (1 - open fraction), an upper bound of :func:`mk_score`, is
            below this, the convex hull is not computed and ``solidity`` is reported as 0 (the caller
            drops such a candidate anyway; the hull is the costliest measure).

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
    # Only pixels nearest to k count below, and there the tile-wide distance is the distance to k.
    owned = maps.nearest[box] == k
    to_nucleus = maps.to_nearest[box]
    ring = owned & (to_nucleus > gap_px) & (to_nucleus <= gap_px + ring_px)
    reachable = cytoplasm & owned & (to_nucleus <= reach_px)
    # The cell: cytoplasm connected to the ring, joined to the nucleus across the blurred halo.
    parts, _ = ndi.label(reachable)
    touching = np.unique(parts[ring & reachable])
    grown = nucleus | np.isin(parts, touching[touching > 0])
    # The closing, the band outside and the hull stay within closing_px + band_px of the grown cell:
    # working on that part of the box gives the same masks (zero beyond it either way) on fewer pixels.
    closing_px, band_px = max(1, int(round(gap_px + ring_px))), radius_px(p.open_band_um, px)
    near = _grown(ndi.find_objects(grown.view(np.uint8))[0], closing_px + band_px + 1, grown.shape)
    cell = holes_filled(closed_by_disk(grown[near], closing_px))
    outside = band_around(cell, band_px)
    ring_fraction = float(maps.ring_fraction[k - 1])
    open_fraction = float((outside & cytoplasm[near]).sum() / max(outside.sum(), 1))
    hopeless = ring_fraction * (1.0 - open_fraction) < score_floor
    measures = {
        "ring_fraction": ring_fraction,
        "area_um2": float(cell.sum()) * px**2,
        "nucleus_area_um2": float(nucleus.sum()) * px**2,
        "open_fraction": open_fraction,
        "solidity": 0.0
        if hopeless or not cell.any()
        else float(cell.sum() / max(convex_hull_image(cell).sum(), 1)),
    }
    whole = np.zeros_like(grown)
    whole[near] = cell
    return whole, measures


def _grown(box: tuple[slice, slice], margin_px: int, shape: tuple[int, ...]) -> tuple[slice, slice]:
    """``box`` grown by ``margin_px`` on every side, clipped to an array of ``shape``."""
    rows, cols = box
    return (
        slice(max(rows.start - margin_px, 0), min(rows.stop + margin_px, shape[0])),
        slice(max(cols.start - margin_px, 0), min(cols.stop + margin_px, shape[1])),
    )


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
    margin = int(np.ceil((p.max_cytoplasm_um + p.ring_gap_um) / pixel_size_um)) + 2
    for k in range(1, len(boxes) + 1):
        # The score is at most the ring fraction (solidity and closedness are <= 1): a candidate that
        # cannot reach min_score is not measured at all (same result, most candidates skipped).
        if maps.ring_fraction[k - 1] < p.min_score:
            continue
        box = _grown(boxes[k - 1], margin, maps.nuclei.shape)
        cell, measures = measure_mk_candidate(maps, int(k), box, pixel_size_um, p, score_floor=p.min_score)
        score = mk_score(measures, p)
        if score <= 0.0 or score < p.min_score:
            continue
        target = labels[box]
        painted = cell & (target == 0)
        if not painted.any():
            continue  # wholly inside an earlier cell (its closing and hole fill took it): no pixel to label
        target[painted] = len(scores) + 1
        scores.append(score)
    return labels, np.asarray(scores, np.float32)
