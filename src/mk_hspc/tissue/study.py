"""Tissue maps of a whole study: read every slide's thumbnail, calibrate one threshold, cut every mask."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mk_hspc.czi.errors import CziSlideError
from mk_hspc.tissue.detect import (
    MAX_OD,
    score_histogram,
    threshold_from_histogram,
    tissue_mask,
    tissue_score_thumbnail,
)
from mk_hspc.tissue.maps import TissueMap
from mk_hspc.tissue.protocols import SlideLike
from mk_hspc.tissue.thumbnail import SlideThumbnail, read_slide_thumbnails_or_errors

logger = logging.getLogger(__name__)


def slide_tissue_score(
    thumbnail: SlideThumbnail, *, smooth_sigma_um: float = 0.0, unscanned_rgb_max: int = 0
) -> np.ndarray:
    """:func:`~mk_hspc.tissue.detect.tissue_score_thumbnail` of a thumbnail, smoothing given in micrometres."""
    return tissue_score_thumbnail(
        thumbnail.rgb,
        valid=thumbnail.valid,
        smooth_sigma_px=smooth_sigma_um / thumbnail.um_per_px,
        unscanned_rgb_max=unscanned_rgb_max,
    )


def tissue_map_from_thumbnail(
    thumbnail: SlideThumbnail,
    score_map: np.ndarray,
    threshold: float,
    *,
    fill_holes_max_um2: float = 250_000.0,
    min_object_um2: float = 20_000.0,
) -> TissueMap:
    """Cut one slide's score map at the study threshold into a :class:`TissueMap` in the thumbnail's frame."""
    mask = tissue_mask(
        score_map,
        threshold,
        thumbnail.um_per_px,
        fill_holes_max_um2=fill_holes_max_um2,
        min_object_um2=min_object_um2,
    )
    return TissueMap(
        slide=thumbnail.slide,
        mask=mask,
        origin_x=thumbnail.origin_x,
        origin_y=thumbnail.origin_y,
        downsample=float(thumbnail.downsample),
        pixel_size_um=thumbnail.pixel_size_um,
        threshold=threshold,
        thumbnail=thumbnail.rgb,
    )


def build_tissue_maps(
    slides: Mapping[str, SlideLike] | Sequence[SlideLike],
    *,
    map_um_per_px: float = 8.0,
    smooth_sigma_um: float = 0.0,
    fill_holes_max_um2: float = 250_000.0,
    min_object_um2: float = 20_000.0,
    unscanned_rgb_max: int = 0,
    histogram_bins: int = 1024,
    threshold_method: str = "triangle",
    min_threshold_od: float = 0.0,
    max_threshold_od: float = MAX_OD,
    threads: int = 2,
    block_px: int = 8192,
    skip_unreadable: bool = False,
) -> tuple[dict[str, TissueMap], dict[str, Any]]:
    """Tissue maps of every slide, all cut at one threshold calibrated on all slides together.

    Pass 1 reads every slide's thumbnail once (low resolution, all slides through one thread pool) and adds
    its score histogram to the pooled one; pass 2 recomputes each score map from the kept thumbnail
    (milliseconds) and cuts it. Memory is the thumbnails, which the maps keep anyway for the QC figure.

    A slide that cannot be read (`CziSlideError`, e.g. a corrupt subblock) stops the study with that error,
    which names the file; with ``skip_unreadable`` it is dropped with a warning instead, recorded in the
    calibration's ``skipped_slides``, and the threshold is calibrated on the remaining slides.

    Returns:
        ``(maps by slide name, calibration)``; the calibration is JSON-ready: method, threshold, pooled
        histogram size, per slide the tissue share and the threshold a per-slide calibration would give,
        and ``skipped_slides`` (``{slide: error}``).
    """
    named = dict(slides) if isinstance(slides, Mapping) else {slide.meta.name: slide for slide in slides}
    score_args = {"smooth_sigma_um": smooth_sigma_um, "unscanned_rgb_max": unscanned_rgb_max}
    names = sorted(named)
    read = read_slide_thumbnails_or_errors(
        [named[name] for name in names], map_um_per_px, threads=threads, block_px=block_px
    )
    thumbnails: dict[str, SlideThumbnail] = {}
    skipped: dict[str, str] = {}
    for name, result in zip(names, read, strict=True):
        if isinstance(result, SlideThumbnail):
            thumbnails[name] = result
        elif not skip_unreadable:
            raise result
        else:
            logger.warning("Skipping slide %s in the tissue stage, it cannot be read: %s", name, result)
            skipped[name] = str(result)
    if names and not thumbnails:
        raise CziSlideError(
            ", ".join(names),
            "no slide could be read for the tissue maps (all were skipped, see the warnings)",
        )
    histograms = {
        name: score_histogram(slide_tissue_score(thumbnail, **score_args), bins=histogram_bins)
        for name, thumbnail in thumbnails.items()
    }
    pooled = np.sum(list(histograms.values()), axis=0)
    threshold = float(
        np.clip(threshold_from_histogram(pooled, method=threshold_method), min_threshold_od, max_threshold_od)
    )

    maps: dict[str, TissueMap] = {}
    per_slide: dict[str, dict[str, float | None]] = {}
    for name, thumbnail in thumbnails.items():
        score = slide_tissue_score(thumbnail, **score_args)
        maps[name] = tissue_map_from_thumbnail(
            thumbnail, score, threshold, fill_holes_max_um2=fill_holes_max_um2, min_object_um2=min_object_um2
        )
        n_scanned = int(histograms[name].sum())
        per_slide[name] = {
            "tissue_area_mm2": maps[name].tissue_area_um2 / 1e6,
            "tissue_share_of_scanned": float(maps[name].mask.sum()) / n_scanned if n_scanned else 0.0,
            "own_threshold_od": threshold_from_histogram(histograms[name], method=threshold_method)
            if n_scanned
            else None,
        }
    calibration = {
        "method": f"{threshold_method} threshold on the pooled histogram of darkest-channel optical density",
        "threshold_od": threshold,
        "n_slides": len(maps),
        "n_pixels": int(pooled.sum()),
        "histogram_bins": histogram_bins,
        "map_um_per_px": map_um_per_px,
        "per_slide": per_slide,
        "skipped_slides": skipped,
    }
    return maps, calibration
