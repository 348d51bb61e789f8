"""Detection scoring: one-to-one matching of detected cell centroids to annotated cells.

Point annotations (BM_GRAZ nucleus dots) are matched inside a distance gate by optimal assignment
(the most pairs, then the smallest total distance), so a detection is never credited twice and the score
does not depend on the order of the detections. Outline annotations (the demo's cell polygons) are
matched by containment: a centroid inside a true cell claims it, once.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage as ndi
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree


@dataclass(frozen=True)
class DetectionScores:
    """Precision / recall / F1 of one set of detections against one set of annotated points."""

    tp: int
    fp: int
    fn: int
    precision: float
    recall: float
    f1: float
    n_true: int
    n_pred: int

    def to_dict(self) -> dict:
        return asdict(self)


def match_points(pred_xy: np.ndarray, true_xy: np.ndarray, radius: float) -> tuple[int, int, int, np.ndarray]:
    """Match predicted to true points one-to-one within ``radius`` by optimal assignment.

    Pairs farther apart than ``radius`` are never matched; among the admissible pairings the one with the
    most pairs and, for that count, the smallest total distance is chosen (pairs outside the gate get a
    cost larger than any sum of admissible costs, so the solver only uses them when nothing else fits).

    Args:
        pred_xy: ``(N, 2)`` predicted points (x, y), any unit shared with ``true_xy`` and ``radius``.
        true_xy: ``(M, 2)`` annotated points.
        radius: distance gate, inclusive.

    Returns:
        ``(tp, fp, fn, pairs)`` where ``pairs`` is a ``(tp, 2)`` int array of (pred index, true index).
    """
    pred_xy = np.asarray(pred_xy, dtype=np.float64).reshape(-1, 2)
    true_xy = np.asarray(true_xy, dtype=np.float64).reshape(-1, 2)
    n_pred, n_true = len(pred_xy), len(true_xy)
    empty = np.zeros((0, 2), dtype=np.int64)
    if n_pred == 0 or n_true == 0:
        return 0, n_pred, n_true, empty

    # Only pairs inside the gate matter; solving per connected component of the gate graph keeps the
    # assignment problems small on tiles with thousands of cells.
    tree_pred, tree_true = cKDTree(pred_xy), cKDTree(true_xy)
    # ``ndarray`` output keeps zero distances (coincident points), which a sparse matrix may drop.
    near = tree_pred.sparse_distance_matrix(tree_true, radius, output_type="ndarray")
    if len(near) == 0:
        return 0, n_pred, n_true, empty
    rows, cols, dists = near["i"].astype(np.int64), near["j"].astype(np.int64), near["v"]

    graph = coo_matrix((np.ones_like(dists), (rows, cols + n_pred)), shape=(n_pred + n_true,) * 2)
    _, component = connected_components(graph, directed=False)
    pair_component = component[rows]

    order = np.argsort(pair_component, kind="stable")
    rows, cols, dists, pair_component = rows[order], cols[order], dists[order], pair_component[order]
    bounds = np.flatnonzero(np.diff(pair_component)) + 1
    pairs: list[np.ndarray] = []
    for r, c, d in zip(np.split(rows, bounds), np.split(cols, bounds), np.split(dists, bounds), strict=True):
        if len(r) == 1:
            pairs.append(np.array([[r[0], c[0]]]))
            continue
        urow, rloc = np.unique(r, return_inverse=True)
        ucol, cloc = np.unique(c, return_inverse=True)
        # Cost outside the gate exceeds any sum of admissible costs: maximise the pair count first.
        forbidden = radius * (min(len(urow), len(ucol)) + 1) + 1.0
        cost = np.full((len(urow), len(ucol)), forbidden)
        cost[rloc, cloc] = d
        ri, ci = linear_sum_assignment(cost)
        keep = cost[ri, ci] < forbidden
        pairs.append(np.stack([urow[ri[keep]], ucol[ci[keep]]], axis=1))
    matched = np.concatenate(pairs).astype(np.int64) if pairs else empty
    tp = len(matched)
    return tp, n_pred - tp, n_true - tp, matched


def detection_scores(pred_xy: np.ndarray, true_xy: np.ndarray, radius: float) -> DetectionScores:
    """Precision, recall and F1 of ``pred_xy`` against ``true_xy`` under :func:`match_points`.

    Empty sets score 1.0 where nothing was to be found and nothing was predicted (no error was made).
    """
    tp, fp, fn, _ = match_points(pred_xy, true_xy, radius)
    return scores_from_counts(tp, fp, fn)


def match_points_to_regions(
    pred_xy: np.ndarray, region_labels: np.ndarray
) -> tuple[int, int, int, np.ndarray]:
    """Match predicted points to annotated regions one-to-one: a point matches the region it falls in.

    For ground truth given as outlines (the demo's cell polygons rasterised to an instance image), a
    detection is correct when its centroid lies inside a true cell; a second detection inside the same
    cell is a false positive (a split cell), a cell without any is a false negative.

    Args:
        pred_xy: ``(N, 2)`` predicted points (x, y) in the pixels of ``region_labels``.
        region_labels: ``(H, W)`` instance image of the true regions, 0 = background, 1..M.

    Returns:
        ``(tp, fp, fn, pairs)`` with ``pairs`` a ``(tp, 2)`` int array of (pred index, region label - 1).
    """
    pred_xy = np.asarray(pred_xy, dtype=np.float64).reshape(-1, 2)
    n_true = int(region_labels.max()) if region_labels.size else 0
    height, width = region_labels.shape
    col = np.round(pred_xy[:, 0]).astype(np.int64)
    row = np.round(pred_xy[:, 1]).astype(np.int64)
    inside = (row >= 0) & (row < height) & (col >= 0) & (col < width)
    hit = np.zeros(len(pred_xy), np.int64)
    hit[inside] = region_labels[row[inside], col[inside]]
    # The first detection falling in a region claims it; later ones in the same region are duplicates.
    candidates = np.flatnonzero(hit > 0)
    _, first = np.unique(hit[candidates], return_index=True)
    chosen = candidates[first]
    pairs = np.stack([chosen, hit[chosen] - 1], axis=1).astype(np.int64)
    tp = len(pairs)
    return tp, len(pred_xy) - tp, n_true - tp, pairs


def scores_from_counts(tp: int, fp: int, fn: int) -> DetectionScores:
    """:class:`DetectionScores` of given counts (shared by the point and region matchers)."""
    precision = tp / (tp + fp) if tp + fp else 1.0 if fn == 0 else 0.0
    recall = tp / (tp + fn) if tp + fn else 1.0 if fp == 0 else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return DetectionScores(
        tp=tp, fp=fp, fn=fn, precision=precision, recall=recall, f1=f1, n_true=tp + fn, n_pred=tp + fp
    )


def points_covered(points_xy: np.ndarray, labels: np.ndarray, radius_px: float) -> np.ndarray:
    """Whether each point lies inside a region of ``labels`` grown by ``radius_px`` (a Euclidean dilation).

    Megakaryocyte centres are annotated by eye (about ±10 px), so a candidate "finds" a point when the
    point is within ``radius_px`` of the candidate's mask; points outside the image are never covered.

    Args:
        points_xy: ``(N, 2)`` points (x, y) in the pixels of ``labels``.
        labels: ``(H, W)`` mask or instance image (anything non-zero is a candidate).
        radius_px: growth radius, inclusive; 0 means the point must fall on the mask itself.

    Returns:
        ``(N,)`` bool.
    """
    points_xy = np.asarray(points_xy, dtype=np.float64).reshape(-1, 2)
    col = np.round(points_xy[:, 0]).astype(np.int64)
    row = np.round(points_xy[:, 1]).astype(np.int64)
    height, width = labels.shape
    inside = (row >= 0) & (row < height) & (col >= 0) & (col < width)
    covered = np.zeros(len(points_xy), bool)
    if not inside.any() or not np.any(labels):
        return covered
    distance = ndi.distance_transform_edt(labels == 0)
    covered[inside] = distance[row[inside], col[inside]] <= radius_px
    return covered
