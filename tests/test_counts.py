"""Counts and densities per slide and group."""

from __future__ import annotations

import pandas as pd
import pytest

from mk_hspc.pipelines.segmentation.counts import cell_counts_figure, count_cells

NO_GROUPS = pd.DataFrame({"slide": pd.Series(dtype=str), "group": pd.Series(dtype=str)})


@pytest.fixture
def tile_sample() -> pd.DataFrame:
    # Two 1000x1000 px tiles at 0.5 µm/px = 0.25 mm² each; half and full tissue.
    return pd.DataFrame(
        {
            "tile_id": ["a_s0_r000_c000", "b_s0_r000_c000"],
            "slide": ["a", "b"],
            "core_w": [1000, 1000],
            "core_h": [1000, 1000],
            "tissue_fraction": [0.5, 1.0],
        }
    )


def test_counts_and_densities_per_slide_and_group(tile_sample: pd.DataFrame) -> None:
    cells = pd.DataFrame(
        {"slide": ["a", "a", "b", "b", "b"], "cell_type": ["mk", "hspc", "hspc", "hspc", "hspc"]}
    )
    groups = pd.DataFrame({"slide": ["a", "b"], "group": ["F_vehicle", "M_treated"]})
    meta = {"a": {"pixel_size_um": 0.5}, "b": {"pixel_size_um": 0.5}}
    counts = count_cells(cells, tile_sample, meta, groups).set_index(["slide", "cell_type"])
    assert counts.loc[("a", "mk"), "n_cells"] == 1
    assert counts.loc[("b", "mk"), "n_cells"] == 0  # absent types are explicit zeros
    assert counts.loc[("a", "hspc"), "sampled_tissue_mm2"] == pytest.approx(0.125)
    assert counts.loc[("b", "hspc"), "density_per_mm2"] == pytest.approx(3 / 0.25)
    assert counts.loc[("b", "hspc"), "group"] == "M_treated"
    assert len(cell_counts_figure(counts.reset_index()).axes) == 2


def test_slide_without_a_group_row_is_ungrouped(tile_sample: pd.DataFrame) -> None:
    cells = pd.DataFrame({"slide": ["a"], "cell_type": ["mk"]})
    meta = {"a": {"pixel_size_um": 0.5}, "b": {"pixel_size_um": 0.5}}
    counts = count_cells(cells, tile_sample, meta, NO_GROUPS)
    assert set(counts["group"]) == {"ungrouped"}


def test_slide_without_sampled_tiles_is_reported(tile_sample: pd.DataFrame) -> None:
    cells = pd.DataFrame({"slide": ["a"], "cell_type": ["mk"]})
    meta = {name: {"pixel_size_um": 0.5} for name in ("a", "b", "c")}
    counts = count_cells(cells, tile_sample, meta, NO_GROUPS).set_index("slide")
    assert counts.loc["c", "sampled_tissue_mm2"] == 0.0
    assert counts.loc["c", "n_cells"] == 0 and pd.isna(counts.loc["c", "density_per_mm2"])
