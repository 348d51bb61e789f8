"""A segmenter that finds nothing, instantly: benchmarks the read/write path without any model cost."""

from __future__ import annotations

import numpy as np

from mk_hspc.models.base import Segmentation


class NoopSegmenter:
    """Returns an empty label image of the tile's size (no cells)."""

    name = "noop"

    def segment(self, tile_rgb: np.ndarray, pixel_size_um: float) -> Segmentation:
        """Return an all-background ``(H, W)`` int32 label image for an ``(H, W, 3)`` tile."""
        return Segmentation(labels=np.zeros(tile_rgb.shape[:2], np.int32))
