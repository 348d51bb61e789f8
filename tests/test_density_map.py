"""The per-slide density map: cells per mm² of tissue, tissue without cells shown as 0, glass left blank."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mk_hspc.classify.results import density_grid, density_map
from mk_hspc.tissue.maps import TissueMap

PIXEL_UM, DOWNSAMPLE = 0.5, 20  # map pixels of 10 µm


def tissue_map() -> TissueMap:
    """A 400 x 300 µm map (origin at CZI px (1000, 2000)): tissue in the left half, a sliver at x 300-310 µm."""
    mask = np.zeros((30, 40), bool)
    mask[:, :20] = True
    mask[:, 30] = True
    return TissueMap("s", mask, 1000, 2000, DOWNSAMPLE, PIXEL_UM, 0.5)


def cells_at(points_um: list[tuple[float, float]]) -> pd.DataFrame:
    """Cells at ``(x, y)`` µm from the map's top-left corner, in absolute µm as the cells table holds them."""
    xy = np.asarray(points_um, float).reshape(-1, 2)
    return pd.DataFrame(
        {
            "centroid_x_um": xy[:, 0] + 1000 * PIXEL_UM,
            "centroid_y_um": xy[:, 1] + 2000 * PIXEL_UM,
            "cell_type": "mk",
            "is_cell": True,
        }
    )


def test_density_is_per_mm2_of_tissue_and_tissue_without_cells_is_zero_not_blank() -> None:
    cells = cells_at([(50, 50), (60, 40), (150, 250), (305, 150)])  # the last one on the sliver
    density, extent = density_grid(cells, tissue_map(), bin_um=100)
    assert density.shape == (3, 4) and extent == (0.0, 400.0, 300.0, 0.0)
    # bin (0, 0): 2 cells in 0.01 mm² of tissue; (2, 1): one cell
    assert density[0, 0] == pytest.approx(200.0) and density[2, 1] == pytest.approx(100.0)
    # tissue without cells: a density of 0, drawn
    assert not np.ma.is_masked(density[1, 0]) and density[1, 0] == 0.0
    # glass, and a 10 % sliver of tissue (one cell on it is no density): blank
    assert density.mask[:, 2].all() and density.mask[:, 3].all()


def test_a_bin_half_tissue_counts_its_tissue_only() -> None:
    mask = np.zeros((10, 10), bool)
    mask[:, :5] = True  # one 100 µm bin, half tissue
    half = TissueMap("s", mask, 0, 0, DOWNSAMPLE, PIXEL_UM, 0.5)
    cells = pd.DataFrame(
        {"centroid_x_um": [20.0], "centroid_y_um": [50.0], "cell_type": "mk", "is_cell": True}
    )
    density, _ = density_grid(cells, half, bin_um=100)
    assert density[0, 0] == pytest.approx(200.0)  # 1 cell / 0.005 mm², not / 0.01


def test_the_map_draws_one_panel_per_cell_type() -> None:
    cells = pd.concat([cells_at([(50, 50)]), cells_at([(60, 60)]).assign(cell_type="hspc")])
    figure = density_map(cells, tissue_map(), ["mk", "hspc"])
    titles = [ax.get_title() for ax in figure.axes if ax.get_title()]  # (the colour bars have none)
    assert titles == ["s: MK (1 cells)", "s: HSPC (1 cells)"]
