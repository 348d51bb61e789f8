"""Counts and densities per slide and group."""

from __future__ import annotations

import pandas as pd
import pytest

from mk_hspc.counts import cell_counts_figure, count_cells

GROUPS = pd.DataFrame({"slide": ["a", "b", "c"], "group": ["F_vehicle", "M_treated", "M_treated"]})
META = {name: {"pixel_size_um": 0.5} for name in ("a", "b")}


@pytest.fixture
def tile_sample() -> pd.DataFrame:
    # Two 1000x1000 px cores at 0.5 µm/px = 0.25 mm² each; windows overlap their neighbours, so the window's
    # tissue fraction differs from the core's: densities must use the core's.
    return pd.DataFrame(
        {
            "tile_id": ["a_s0_r000_c000", "b_s0_r000_c000"],
            "slide": ["a", "b"],
            "w": [1200, 1200],
            "h": [1200, 1200],
            "core_w": [1000, 1000],
            "core_h": [1000, 1000],
            "tissue_fraction": [0.3, 0.9],
            "core_tissue_fraction": [0.5, 1.0],
        }
    )


def test_counts_and_densities_per_slide_and_group(tile_sample: pd.DataFrame) -> None:
    cells = pd.DataFrame(
        {"slide": ["a", "a", "b", "b", "b"], "cell_type": ["mk", "hspc", "hspc", "hspc", "hspc"]}
    )
    counts = count_cells(cells, tile_sample, META, GROUPS, ["mk", "hspc"]).set_index(["slide", "cell_type"])
    assert counts.loc[("a", "mk"), "n_cells"] == 1
    assert counts.loc[("b", "mk"), "n_cells"] == 0  # absent types are explicit zeros
    assert counts.loc[("a", "hspc"), "sampled_tissue_mm2"] == pytest.approx(0.125)  # core area x core tissue
    assert counts.loc[("b", "hspc"), "density_per_mm2"] == pytest.approx(3 / 0.25)
    assert counts.loc[("b", "hspc"), "group"] == "M_treated"
    figure = cell_counts_figure(counts.reset_index())
    assert len(figure.axes) == 2
    # Honest names: before classification the `hspc` type is nucleus candidates, not HSPCs.
    titles = sorted(ax.get_title() for ax in figure.axes)
    assert titles[0].startswith("MK candidates") and titles[1].startswith("Nucleus candidates (HSPC after")


def test_every_slide_and_configured_type_has_a_row_even_with_no_cells(tile_sample: pd.DataFrame) -> None:
    no_cells = pd.DataFrame({"slide": pd.Series([], dtype=str), "cell_type": pd.Series([], dtype=str)})
    counts = count_cells(no_cells, tile_sample, META, GROUPS, ["mk", "hspc"])
    assert sorted(zip(counts["slide"], counts["cell_type"], strict=True)) == [
        ("a", "hspc"),
        ("a", "mk"),
        ("b", "hspc"),
        ("b", "mk"),
    ]
    assert (counts["n_cells"] == 0).all() and (counts["density_per_mm2"] == 0).all()


def test_an_empty_tile_sample_gives_zero_area_rows(tile_sample: pd.DataFrame) -> None:
    empty = tile_sample.iloc[:0].astype({"slide": object})
    no_cells = pd.DataFrame({"slide": pd.Series([], dtype=object), "cell_type": pd.Series([], dtype=object)})
    counts = count_cells(no_cells, empty, META, GROUPS, ["mk", "hspc"])
    assert len(counts) == 4
    assert (counts["sampled_tissue_mm2"] == 0).all() and counts["density_per_mm2"].isna().all()


def test_slide_without_sampled_tiles_is_reported(tile_sample: pd.DataFrame) -> None:
    cells = pd.DataFrame({"slide": ["a"], "cell_type": ["mk"]})
    meta = {name: {"pixel_size_um": 0.5} for name in ("a", "b", "c")}
    counts = count_cells(cells, tile_sample, meta, GROUPS, ["mk"]).set_index("slide")
    assert counts.loc["c", "sampled_tissue_mm2"] == 0.0
    assert counts.loc["c", "n_cells"] == 0 and pd.isna(counts.loc["c", "density_per_mm2"])


def test_a_tile_sample_without_core_tissue_is_refused(tile_sample: pd.DataFrame) -> None:
    with pytest.raises(ValueError, match="core_tissue_fraction"):
        count_cells(
            tile_sample.iloc[:0], tile_sample.drop(columns="core_tissue_fraction"), META, GROUPS, ["mk"]
        )


def test_failed_tiles_count_no_area_and_are_reported_per_slide(tile_sample: pd.DataFrame) -> None:
    cells = pd.DataFrame({"slide": ["a", "b"], "cell_type": ["mk", "mk"]})
    counts = count_cells(cells, tile_sample, META, GROUPS, ["mk"], failed_tiles=["b_s0_r000_c000"])
    by_slide = counts.set_index("slide")
    assert by_slide.loc["b", "n_failed_tiles"] == 1 and by_slide.loc["a", "n_failed_tiles"] == 0
    assert by_slide.loc["b", "sampled_tissue_mm2"] == 0.0 and pd.isna(by_slide.loc["b", "density_per_mm2"])


def test_a_slide_without_sampled_tissue_is_marked_on_the_plot(tile_sample: pd.DataFrame) -> None:
    """Its density is NaN: the bar slot was empty, which reads as zero."""
    cells = pd.DataFrame({"slide": ["a"], "cell_type": ["mk"]})
    counts = count_cells(cells, tile_sample[tile_sample["slide"] == "a"], META, GROUPS, ["mk"])
    assert (
        counts.set_index("slide").loc["b", "density_per_mm2"]
        != counts.set_index("slide").loc["b", "density_per_mm2"]
    )
    figure = cell_counts_figure(counts)
    texts = [t.get_text() for t in figure.axes[0].texts]
    assert texts == ["no tissue\nsampled"]
