"""Integer binning of RGB tiles towards a working pixel size, and back for label images."""

from __future__ import annotations

import numpy as np


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


def radius_px(radius_um: float, pixel_size_um: float) -> int:
    return max(1, int(round(radius_um / pixel_size_um)))
