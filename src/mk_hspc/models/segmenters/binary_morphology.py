"""Exact, faster equivalents of a few scipy.ndimage binary operations, for the per-candidate MK masks.

Each function gives the same pixels as the scipy call named in its docstring (tested on random masks and on
the MK candidates of the BM_GRAZ images); it exists because the scipy call is the slower way to get them
at the sizes the MK pass uses: distance transforms cost O(pixels) where a disc-shaped structuring element
costs O(pixels x radius²), and one labelling pass replaces scipy's fill-holes propagation, which iterates a
dilation until nothing changes. (At radius 2 px the structuring element is faster; the tile-wide MK maps
keep scipy there.)
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi


def dilated_by_disk(mask: np.ndarray, radius: int) -> np.ndarray:
    """``ndi.binary_dilation(mask, disk(radius))``: the pixels within ``radius`` of the mask (Euclidean)."""
    if not mask.any():
        return np.zeros_like(mask)
    return ndi.distance_transform_edt(~mask) <= radius


def eroded_by_disk(mask: np.ndarray, radius: int) -> np.ndarray:
    """``ndi.binary_erosion(mask, disk(radius))``: the pixels farther than ``radius`` from the background,
    where outside the array counts as background (scipy's ``border_value=0``)."""
    return (ndi.distance_transform_edt(np.pad(mask, 1)) > radius)[1:-1, 1:-1]


def closed_by_disk(mask: np.ndarray, radius: int) -> np.ndarray:
    """``ndi.binary_closing(mask, disk(radius))``, pixel for pixel, through two distance transforms.

    Why: a pixel is in the dilation by a disc of radius r when its distance to the mask is <= r, and in
    the erosion when its distance to the nearest background pixel (outside the array counts as background,
    as scipy's ``border_value=0``) is > r; two exact Euclidean distance transforms cost O(pixels), the
    structuring-element passes O(pixels x r²) (about half the time at the radii used here, tested equal).
    """
    return eroded_by_disk(dilated_by_disk(mask, radius), radius)


def holes_filled(mask: np.ndarray) -> np.ndarray:
    """``ndi.binary_fill_holes(mask)``, pixel for pixel: background pieces (4-connected, as scipy's default
    structure) that do not reach the array's edge become foreground. One labelling pass instead of scipy's
    propagation from the border, which iterates a dilation until nothing changes."""
    background, _ = ndi.label(~mask)
    edge = np.concatenate([background[0], background[-1], background[:, 0], background[:, -1]])
    open_to_edge = np.zeros(int(background.max()) + 1, bool)
    open_to_edge[edge] = True
    open_to_edge[0] = False  # label 0: the mask itself
    return ~open_to_edge[background]


def band_around(mask: np.ndarray, width: int) -> np.ndarray:
    """Pixels within ``width`` 4-connected steps outside ``mask``: ``ndi.binary_dilation(mask,
    iterations=width) & ~mask`` from one city-block distance transform instead of ``width`` passes."""
    if not mask.any():
        return np.zeros_like(mask)
    return (ndi.distance_transform_cdt(~mask, metric="taxicab") <= width) & ~mask
