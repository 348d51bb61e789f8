"""Per-cell outline measures computed for many cells at once (``mk_hspc.models.features.cell_stacks``)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi
from scipy.spatial import ConvexHull
from skimage.measure import label, perimeter_crofton

from mk_hspc.models.features import cell_stacks
from mk_hspc.models.features.morphology import MorphologyFeatures, _channel_statistics
from mk_hspc.models.stain import macenko_stain_vectors, optical_density, tile_stain_vectors, unmix


def _blobs(seed: int, size: int = 400, sigma: float = 5.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    blobs = label(ndi.gaussian_filter(rng.normal(size=(size, size)), sigma) > 0.03).astype(np.int32)
    # One large cell, so that several size classes (stacks of 16 ... 256 px) are measured together.
    yy, xx = np.mgrid[:size, :size]
    blobs[((yy - 200) / 90.0) ** 2 + ((xx - 180) / 40.0) ** 2 <= 1] = blobs.max() + 1
    return blobs


def _measure(labels: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    rows, cols = np.nonzero(labels)
    lab = labels[rows, cols]
    present = np.unique(lab)
    index = np.searchsorted(present, lab)
    boxes = [ndi.find_objects(labels)[k - 1] for k in present]
    top = np.array([b[0].start for b in boxes])
    left = np.array([b[1].start for b in boxes])
    height = np.array([b[0].stop - b[0].start for b in boxes])
    width = np.array([b[1].stop - b[1].start for b in boxes])
    return present, cell_stacks.outline_measures(rows, cols, index, top, left, height, width)


def _exact_midpoint_hull(mask: np.ndarray) -> tuple[float, float]:
    """Hull of every outer pixel-edge midpoint by Qhull (the reference the stacks approximate)."""
    r, c = np.nonzero(mask)
    points = np.concatenate([np.c_[r, c - 0.5], np.c_[r, c + 0.5], np.c_[r - 0.5, c], np.c_[r + 0.5, c]])
    hull = ConvexHull(points)
    vertices = points[hull.vertices]
    diameter = np.hypot(*(vertices[:, None, :] - vertices[None, :, :]).transpose(2, 0, 1)).max()
    return float(hull.volume), float(diameter)


@pytest.mark.parametrize("stack_pixels", [1 << 22, 1 << 12])  # one stack per size class, or many chunks
def test_perimeters_equal_skimage_crofton_for_every_cell(monkeypatch, stack_pixels: int) -> None:
    monkeypatch.setattr(cell_stacks, "_STACK_PIXELS", stack_pixels)
    labels = _blobs(1)
    present, measures = _measure(labels)
    assert len(present) > 40 and measures["perimeter"].shape == present.shape
    expected = [perimeter_crofton(labels == k, 4) for k in present]
    np.testing.assert_allclose(measures["perimeter"], expected, rtol=1e-12)


def test_hull_is_the_exact_midpoint_hull_for_most_cells_and_never_larger() -> None:
    labels = _blobs(2)
    present, measures = _measure(labels)
    big = [k for k in range(len(present)) if (labels == present[k]).sum() >= 6]
    exact = np.array([_exact_midpoint_hull(labels == present[k]) for k in big])
    area, diameter = measures["hull_area"][big], measures["feret"][big]
    assert np.all(area <= exact[:, 0] + 1e-9)  # an inscribed polygon
    relative = (exact[:, 0] - area) / exact[:, 0]
    assert np.median(relative) < 1e-12 and relative.max() < 0.03
    np.testing.assert_allclose(diameter, exact[:, 1], rtol=0.002)


def test_a_single_row_of_pixels_has_the_hull_of_its_edge_midpoints() -> None:
    labels = np.zeros((20, 20), np.int32)
    labels[5, 3:13] = 1
    _, measures = _measure(labels)
    # Edge midpoints: (5, 2.5) and (5, 12.5) at the ends, (4.5, c) and (5.5, c) along: a 9 x 1 band + 2 tips.
    assert measures["hull_area"][0] == pytest.approx(9.5)
    assert measures["feret"][0] == pytest.approx(10.0)
    assert measures["perimeter"][0] == pytest.approx(perimeter_crofton(labels == 1, 4))


def test_no_cells_give_empty_measures() -> None:
    empty = np.zeros(0, np.int64)
    measures = cell_stacks.outline_measures(empty, empty, empty, empty, empty, empty, empty)
    assert all(len(v) == 0 for v in measures.values())


def test_channel_statistics_equal_plain_per_cell_mean_and_std() -> None:
    rng = np.random.default_rng(3)
    tile = rng.integers(0, 256, size=(120, 140, 3), dtype=np.uint8)
    labels = _blobs(4, size=140, sigma=3.0)[:120]
    rows, cols = np.nonzero(labels)
    lab = labels[rows, cols].astype(np.int64)
    wanted = np.unique(lab)
    statistics = _channel_statistics(tile, (rows, cols, lab), wanted)
    vectors, _ = tile_stain_vectors(tile)
    stains = unmix(optical_density(tile), vectors)
    for i, k in enumerate(wanted[:25]):
        mask = labels == k
        for c, name in enumerate(("r", "g", "b")):
            values = tile[..., c][mask].astype(np.float64)
            assert statistics[f"{name}_mean"][i] == pytest.approx(values.mean(), rel=1e-12)
            assert statistics[f"{name}_std"][i] == pytest.approx(values.std(), rel=1e-9, abs=1e-9)
        for c, name in enumerate(("haematoxylin", "eosin")):
            values = stains[..., c][mask].astype(np.float64)
            assert statistics[f"{name}_mean"][i] == pytest.approx(values.mean(), rel=1e-6, abs=1e-7)
            assert statistics[f"{name}_std"][i] == pytest.approx(values.std(), rel=1e-4, abs=1e-6)


def test_remembered_stain_vectors_follow_the_tile() -> None:
    rng = np.random.default_rng(5)
    pink = np.clip(rng.normal((230, 150, 200), 20, size=(300, 300, 3)), 0, 255).astype(np.uint8)
    purple = np.clip(rng.normal((120, 80, 170), 20, size=(300, 300, 3)), 0, 255).astype(np.uint8)
    tile = np.where(rng.random((300, 300, 1)) < 0.4, purple, pink)
    first, _ = tile_stain_vectors(tile)
    again, _ = tile_stain_vectors(tile)
    np.testing.assert_array_equal(first, again)
    again[0, 0] = 99.0  # a caller editing its copy does not change the remembered vectors
    np.testing.assert_array_equal(tile_stain_vectors(tile)[0], first)
    other = tile.copy()
    other[::2, ::2] = purple[::2, ::2]  # more haematoxylin: another tile, another estimate
    changed, _ = tile_stain_vectors(other)
    flat = other.reshape(-1, 3)
    np.testing.assert_allclose(
        changed, macenko_stain_vectors(optical_density(flat[:: max(1, len(flat) // 800_000)]))[0]
    )


@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
def test_channel_statistics_of_tiles_that_are_not_8_bit(dtype) -> None:
    labels = np.zeros((10, 10), np.int32)
    labels[0:3, 0:3], labels[5:8, 5:8] = 1, 2
    tile = np.full((10, 10, 3), 100, dtype)
    tile[0, 0] = 300  # above 8 bits: a histogram bin of the next cell if taken as one
    tile[6, 6] = 400
    rows, cols = np.nonzero(labels)
    statistics = _channel_statistics(
        tile, (rows, cols, labels[rows, cols].astype(np.int64)), np.array([1, 2])
    )
    np.testing.assert_allclose(statistics["r_mean"], [(8 * 100 + 300) / 9, (8 * 100 + 400) / 9])
    np.testing.assert_allclose(statistics["g_std"], [np.std([100] * 8 + [300]), np.std([100] * 8 + [400])])


def test_a_tile_that_is_not_rgb_is_refused() -> None:
    labels = np.ones((8, 8), np.int32)
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        MorphologyFeatures().extract(np.zeros((8, 8, 4), np.uint8), labels, np.array([1]), 0.5)
