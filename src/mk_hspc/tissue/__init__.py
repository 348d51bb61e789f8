"""Tissue detection from low-resolution reads: thumbnails, a pooled threshold, tissue maps and their figure."""

from mk_hspc.tissue.detect import (
    MAX_OD,
    calibrate_tissue_threshold,
    score_histogram,
    threshold_from_histogram,
    tissue_mask,
    tissue_score_thumbnail,
)
from mk_hspc.tissue.maps import TissueMap
from mk_hspc.tissue.overlay import tissue_overlay_figure
from mk_hspc.tissue.protocols import BoxLike, SlideLike, SlideMetaLike
from mk_hspc.tissue.study import build_tissue_maps, slide_tissue_score, tissue_map_from_thumbnail
from mk_hspc.tissue.thumbnail import (
    SlideThumbnail,
    read_slide_thumbnail,
    read_slide_thumbnails,
    read_slide_thumbnails_or_errors,
    thumbnail_downsample,
)

__all__ = [
    "MAX_OD",
    "BoxLike",
    "SlideLike",
    "SlideMetaLike",
    "SlideThumbnail",
    "TissueMap",
    "build_tissue_maps",
    "calibrate_tissue_threshold",
    "read_slide_thumbnail",
    "read_slide_thumbnails",
    "read_slide_thumbnails_or_errors",
    "score_histogram",
    "slide_tissue_score",
    "threshold_from_histogram",
    "thumbnail_downsample",
    "tissue_map_from_thumbnail",
    "tissue_mask",
    "tissue_overlay_figure",
    "tissue_score_thumbnail",
]
