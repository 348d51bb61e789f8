"""The fast binary operations of the MK pass give scipy's pixels exactly (random masks, edges, empties)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.morphology import disk

from mk_hspc.models.segmenters.binary_morphology import (
    band_around,
    closed_by_disk,
    dilated_by_disk,
    eroded_by_disk,
    holes_filled,
)


def random_masks(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        shape = tuple(int(v) for v in rng.integers(1, 90, 2))
        smooth = ndi.gaussian_filter(rng.random(shape), rng.uniform(0.5, 4.0))
        yield smooth > np.quantile(smooth, rng.uniform(0.2, 0.9)), int(rng.integers(1, 10))
    yield np.zeros((7, 9), bool), 2
    yield np.ones((7, 9), bool), 2
    yield np.eye(12, dtype=bool), 3  # thin, touching every edge


@pytest.mark.parametrize("seed", [0, 1])
def test_each_operation_equals_scipy(seed: int) -> None:
    for mask, radius in random_masks(150, seed):
        assert np.array_equal(dilated_by_disk(mask, radius), ndi.binary_dilation(mask, disk(radius)))
        assert np.array_equal(eroded_by_disk(mask, radius), ndi.binary_erosion(mask, disk(radius)))
        assert np.array_equal(closed_by_disk(mask, radius), ndi.binary_closing(mask, disk(radius)))
        assert np.array_equal(holes_filled(mask), ndi.binary_fill_holes(mask))
        expected_band = ndi.binary_dilation(mask, iterations=radius) & ~mask
        assert np.array_equal(band_around(mask, radius), expected_band)


def test_a_hole_open_to_the_edge_is_not_filled() -> None:
    ring = np.zeros((9, 9), bool)
    ring[2:7, 2:7] = True
    ring[3:6, 3:6] = False  # an enclosed hole: filled
    assert holes_filled(ring)[4, 4]
    ring[4, 2] = False  # a channel to the outside (4-connected): stays background
    assert not holes_filled(ring)[4, 4]
