"""Vectorised per-label measurements and label-image operations shared by the classical segmenter."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu


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
    """Area, centroid, central second moments (``myy``, ``mxx``, ``mxy``) and minor/major axis lengths (px)
    of labels ``1..n_labels``.

    The axes are those of the ellipse with the same second moments (as ``skimage.measure.regionprops``),
    computed with ``bincount`` so that thousands of nuclei cost one pass over the image.
    """
    rows, cols = np.nonzero(labels)
    return pixel_moments(rows, cols, labels[rows, cols], n_labels)


def pixel_moments(
    rows: np.ndarray, cols: np.ndarray, lab: np.ndarray, n_labels: int
) -> dict[str, np.ndarray]:
    """:func:`label_moments` of labelled pixels given as coordinate lists (``lab`` in ``1..n_labels``)."""
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
        "myy": myy,
        "mxx": mxx,
        "mxy": mxy,
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


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))
