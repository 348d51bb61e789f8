"""Per-cell outline measurements for thousands of cells at once, without a Python loop over cells.

Cells are scattered from their pixel lists into zero-bordered square stacks, one stack per size class
(the next power of two of the bounding box plus its border), so that one array operation measures every
cell of a class. A tile of ~750 nuclei costs a handful of array passes instead of ~750 calls of
``perimeter_crofton`` and ``ConvexHull``, each with its own overhead (about 0.3 ms per cell, 40 % of the
classical path's morphology time on a 3000 px tile). Nothing in numpy, scipy or skimage measures many
labels' Crofton perimeters or hulls in one call, hence this module.
"""

from __future__ import annotations

import numpy as np

# skimage.measure.perimeter_crofton (directions=4): weight of each 2x2 configuration code.
_CROFTON_4 = np.array(
    [
        0.0,
        np.pi / 4 * (1 + 1 / np.sqrt(2)),
        np.pi / (4 * np.sqrt(2)),
        np.pi / (2 * np.sqrt(2)),
        0.0,
        np.pi / 4 * (1 + 1 / np.sqrt(2)),
        0.0,
        np.pi / (4 * np.sqrt(2)),
        np.pi / 4,
        np.pi / 2,
        np.pi / (4 * np.sqrt(2)),
        np.pi / (4 * np.sqrt(2)),
        np.pi / 4,
        np.pi / 2,
        0.0,
        0.0,
    ]
)
# Directions in which the hull's extreme points are looked for (angle step 2 pi / 64), see support_hulls.
N_DIRECTIONS = 64
_SMALLEST_STACK_PX = 16
_STACK_PIXELS = 1 << 22  # pixels per stack (a chunk of one size class): bounds the working memory


def outline_measures(
    rows: np.ndarray,
    cols: np.ndarray,
    cell_index: np.ndarray,
    top: np.ndarray,
    left: np.ndarray,
    height: np.ndarray,
    width: np.ndarray,
) -> dict[str, np.ndarray]:
    """Crofton perimeter, convex-hull area and largest caliper width (px) of every cell.

    Args:
        rows, cols: coordinates of the cells' pixels.
        cell_index: the cell ``0..n-1`` of each pixel.
        top, left, height, width: each cell's bounding box (``n`` entries).

    Returns:
        ``perimeter`` (equal to ``skimage.measure.perimeter_crofton(mask, 4)`` of the cell's mask),
        ``hull_area`` and ``feret`` (largest diameter) of the convex hull of the cell's outer pixel-edge
        midpoints (the vertices of its 0.5 iso-contour), from its extreme points in
        :data:`N_DIRECTIONS` directions (:func:`support_hulls`).
    """
    n = len(top)
    out = {key: np.zeros(n) for key in ("perimeter", "hull_area", "feret")}
    if n == 0:
        return out
    # +2: a zero row and column on each side, so that every 2x2 window that touches the cell is inside.
    side = np.maximum(np.maximum(height, width) + 2, _SMALLEST_STACK_PX)
    size_class = np.ceil(np.log2(side)).astype(np.int64)
    chunk = np.zeros(n, np.int64)
    for value in np.unique(size_class):
        members = np.flatnonzero(size_class == value)
        chunk[members] = np.arange(len(members)) // max(1, _STACK_PIXELS >> (2 * int(value)))
    cell_group = size_class * n + chunk
    pixel_group = cell_group[cell_index]
    position = np.zeros(n, np.int64)
    for group in np.unique(cell_group):  # a few groups: one mask each beats sorting the pixels
        cells = np.flatnonzero(cell_group == group)
        position[cells] = np.arange(len(cells))
        pixels = np.flatnonzero(pixel_group == group)
        index = cell_index[pixels]
        stack_px = 1 << int(size_class[cells[0]])
        stack = np.zeros((len(cells), stack_px, stack_px), bool)
        stack[position[index], rows[pixels] - top[index] + 1, cols[pixels] - left[index] + 1] = True
        out["perimeter"][cells] = crofton_perimeters(stack)
        out["hull_area"][cells], out["feret"][cells] = support_hulls(stack)
    return out


def crofton_perimeters(stack: np.ndarray) -> np.ndarray:
    """``perimeter_crofton(mask, 4)`` of every ``(n, s, s)`` mask whose first/last rows and columns are 0."""
    n = stack.shape[0]
    s = stack.view(np.uint8)
    # The code skimage's convolution gives each 2x2 window: 1 own pixel, 2 above, 4 left, 8 above-left.
    code = s[:, 1:, 1:] + 2 * s[:, :-1, 1:] + 4 * s[:, 1:, :-1] + 8 * s[:, :-1, :-1]
    keyed = code.astype(np.int32) + (np.arange(n, dtype=np.int32) * 16)[:, None, None]
    histogram = np.bincount(keyed.ravel(), minlength=16 * n).reshape(n, 16)
    return histogram @ _CROFTON_4


def support_hulls(stack: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(area, largest diameter)`` of the convex hull of each mask's outer pixel-edge midpoints.

    The point farthest along each of :data:`N_DIRECTIONS` directions is a vertex of the hull, and in the
    order of the directions these vertices go round the hull: their polygon is inscribed in the hull and
    misses only vertices whose outward normals all fall within one angle step (nearly straight runs of
    the outline). Its area and largest vertex distance are therefore lower bounds of the hull's, exact for
    most cells: on 11,181 candidates of four BM_GRAZ images the area was exact for the median cell, within
    0.7 % for 99 % of them and 2.4 % at worst; the diameter was exact for all. Thin elongated shapes lose
    most (a 34 x 4 px random blob: 7.5 %), as long straight runs hide the vertices between directions.
    Only each row's and column's extreme edge midpoints can lie on the hull, so only those enter.
    """
    n, side, _ = stack.shape
    rows_any, cols_any = stack.any(axis=2), stack.any(axis=1)
    index = np.arange(side, dtype=np.float64)
    left = np.argmax(stack, axis=2) - 0.5
    right = side - np.argmax(stack[:, :, ::-1], axis=2) - 0.5
    top = np.argmax(stack, axis=1) - 0.5
    bottom = side - np.argmax(stack[:, ::-1, :], axis=1) - 0.5
    y = np.concatenate([np.broadcast_to(index, (n, side))] * 2 + [top, bottom], axis=1)
    x = np.concatenate([left, right] + [np.broadcast_to(index, (n, side))] * 2, axis=1)
    valid = np.concatenate([rows_any, rows_any, cols_any, cols_any], axis=1)
    # Absent rows and columns repeat a point of the cell, so that they can never be the only farthest.
    first = np.argmax(valid, axis=1)[:, None]
    x = np.where(valid, x, np.take_along_axis(x, first, axis=1))
    y = np.where(valid, y, np.take_along_axis(y, first, axis=1))
    angles = np.arange(N_DIRECTIONS) * (2.0 * np.pi / N_DIRECTIONS)
    directions = np.stack([np.cos(angles), np.sin(angles)])
    points = np.stack([x, y], axis=2)
    farthest = np.empty((n, N_DIRECTIONS), np.int64)
    step = max(1, (1 << 20) // (points.shape[1] * N_DIRECTIONS))  # cells per product: ~8 MB at a time
    for start in range(0, n, step):
        farthest[start : start + step] = (points[start : start + step] @ directions).argmax(axis=1)
    vx = np.take_along_axis(x, farthest, axis=1)
    vy = np.take_along_axis(y, farthest, axis=1)
    # Shoelace over the vertices in angular order (repeated vertices add nothing).
    area = 0.5 * np.abs((vx * np.roll(vy, -1, axis=1) - np.roll(vx, -1, axis=1) * vy).sum(axis=1))
    # Largest vertex distance: every pair is some shift apart in the cyclic order.
    squared = np.zeros(n)
    for shift in range(1, N_DIRECTIONS // 2 + 1):
        dx, dy = vx - np.roll(vx, -shift, axis=1), vy - np.roll(vy, -shift, axis=1)
        squared = np.maximum(squared, (dx * dx + dy * dy).max(axis=1))
    diameter = np.sqrt(squared)
    return area, diameter
