"""Cell counts and densities per slide and group, from the cells table and the sampled tissue area (cores)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def count_cells(
    cells: pd.DataFrame,
    tile_sample: pd.DataFrame,
    slide_meta: Mapping[str, Mapping[str, Any]],
    slide_groups: pd.DataFrame,
    cell_types: Sequence[str],
    failed_tiles: Iterable[str] = (),
) -> pd.DataFrame:
    """One row per slide and configured cell type: count, sampled tissue area (mm²) and density (cells / mm²).

    A tile's cells are those whose centroid is in its core, so its tissue area is the core's area times the
    core's tissue fraction (not the window's, which overlaps the neighbours). Every slide of ``slide_meta``
    gets a row per cell type, zeros included, also a slide that no sampled tile fell on (area 0, density
    NaN): a missing slide is visible in the report rather than silently absent.

    Args:
        cells: the cells table (``slide``, ``cell_type``).
        tile_sample: the sampled tiles (``slide``, ``core_w``, ``core_h``, ``core_tissue_fraction``).
        slide_meta: ``slide -> metadata`` with ``pixel_size_um``; the slides to report.
        slide_groups: one row per slide (``slide``, ``group``), from the validated slide sheet.
        cell_types: the configured cell types (e.g. the segmenters' keys).
        failed_tiles: sampled tiles that could not be segmented (left out with ``skip_bad_slides``): their
            area is not counted, and each slide's number of them is reported in ``n_failed_tiles``.
    """
    if "core_tissue_fraction" not in tile_sample.columns:
        raise ValueError(
            "tile_sample has no core_tissue_fraction column (made by an older version); rerun ingestion"
        )
    slides = sorted(slide_meta)
    failed = tile_sample["tile_id"].astype(str).isin(set(failed_tiles))
    n_failed = (
        failed.groupby(tile_sample["slide"].astype(str)).sum().reindex(slides, fill_value=0).astype("int64")
    )
    tile_sample = tile_sample[~failed]
    px_um = pd.Series({name: float(slide_meta[name]["pixel_size_um"]) for name in slides}, dtype=float)
    pixel_area_mm2 = tile_sample["slide"].astype(str).map(px_um).astype(float) ** 2 / 1e6
    tissue_mm2 = (
        tile_sample["core_tissue_fraction"].astype(float)
        * tile_sample["core_w"].astype(float)
        * tile_sample["core_h"].astype(float)
        * pixel_area_mm2
    )
    area = tissue_mm2.groupby(tile_sample["slide"].astype(str)).sum().reindex(slides, fill_value=0.0)
    area = area.astype(float).rename("sampled_tissue_mm2").rename_axis("slide")
    index = pd.MultiIndex.from_product([slides, sorted(cell_types)], names=["slide", "cell_type"])
    counts = (
        cells.groupby([cells["slide"].astype(str), cells["cell_type"].astype(str)])
        .size()
        .reindex(index, fill_value=0)
        .astype("int64")
        .rename("n_cells")
    )
    table = counts.reset_index().merge(area.reset_index(), on="slide", how="left")
    table["density_per_mm2"] = table["n_cells"] / table["sampled_tissue_mm2"].where(
        table["sampled_tissue_mm2"] > 0
    )
    groups = slide_groups.set_index("slide")["group"]
    ungrouped = sorted(set(slides) - set(groups.index))
    if ungrouped:
        raise ValueError(f"slide_groups has no group for slide(s) {ungrouped}; rerun ingestion")
    table["group"] = table["slide"].map(groups)
    table["n_failed_tiles"] = table["slide"].map(n_failed).astype("int64")
    return table[
        ["slide", "group", "cell_type", "n_cells", "sampled_tissue_mm2", "density_per_mm2", "n_failed_tiles"]
    ]


# What the segmenters' cell types are before classification: the `hspc` key (kept: cell ids use it)
# holds nucleus candidates of every small haematopoietic cell; HSPCs are the ones the classifier keeps.
CELL_TYPE_TITLES = {
    "mk": "MK candidates",
    "hspc": "Nucleus candidates (HSPC after classification)",
}


def cell_counts_figure(counts: pd.DataFrame) -> Figure:
    """Density per slide for each cell type, slides ordered and coloured by group."""
    cell_types = sorted(counts["cell_type"].unique())
    fig, axes = plt.subplots(
        1, max(len(cell_types), 1), figsize=(5.5 * max(len(cell_types), 1), 4.2), squeeze=False
    )
    groups = sorted(counts["group"].unique())
    colours = {group: plt.get_cmap("tab10")(i % 10) for i, group in enumerate(groups)}
    for ax, cell_type in zip(axes[0], cell_types, strict=False):
        rows = counts[counts["cell_type"] == cell_type].sort_values(["group", "slide"])
        ax.bar(rows["slide"], rows["density_per_mm2"], color=[colours[g] for g in rows["group"]])
        # A slide no sampled tile fell on has no density: said on the plot, not left as an empty slot
        # that reads as zero.
        for slide in rows.loc[rows["density_per_mm2"].isna(), "slide"]:
            ax.annotate("no tissue\nsampled", (slide, 0), xytext=(0, 4), textcoords="offset points",
                        ha="center", va="bottom", fontsize=7, color="0.4", rotation=90)  # fmt: skip
        ax.set_title(f"{CELL_TYPE_TITLES.get(cell_type, cell_type)}: density in sampled tissue", fontsize=10)
        ax.set_ylabel("cells / mm²")
        ax.tick_params(axis="x", rotation=60, labelsize=8)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[g]) for g in groups]
    fig.legend(handles, groups, loc="upper right", fontsize=8, title="group")
    fig.tight_layout(rect=(0, 0, 0.9, 1))
    return fig
