"""Cell counts and densities per slide and group, from the cells table and the sampled tissue area."""

from __future__ import annotations

from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from mk_hspc.slide_sheet import UNGROUPED  # noqa: E402


def count_cells(
    cells: pd.DataFrame,
    tile_sample: pd.DataFrame,
    slide_meta: dict[str, dict[str, Any]],
    slide_groups: pd.DataFrame,
) -> pd.DataFrame:
    """One row per slide and cell type: count, sampled tissue area (mm²) and density (cells / mm²).

    Every slide of ``slide_meta`` gets rows, also one that no sampled tile fell on (area 0, density NaN), so a
    missing slide is visible in the report rather than silently absent. ``slide_groups`` is the validated
    slide sheet (`mk_hspc.slide_sheet.validate_slide_sheet`: one row per slide, columns slide, group).
    """
    px_um = {name: float(meta["pixel_size_um"]) for name, meta in slide_meta.items()}
    tiles = tile_sample.assign(
        tissue_mm2=lambda t: (
            t["tissue_fraction"] * t["core_w"] * t["core_h"] * t["slide"].map(px_um) ** 2 / 1e6
        )
    )
    area = tiles.groupby("slide")["tissue_mm2"].sum().reindex(sorted(slide_meta), fill_value=0.0)
    area = area.rename("sampled_tissue_mm2").rename_axis("slide")
    cell_types = sorted(cells["cell_type"].unique()) if len(cells) else []
    index = pd.MultiIndex.from_product([sorted(area.index), cell_types], names=["slide", "cell_type"])
    counts = cells.groupby(["slide", "cell_type"]).size().reindex(index, fill_value=0).rename("n_cells")
    table = counts.reset_index().merge(area.reset_index(), on="slide", how="left")
    table["density_per_mm2"] = table["n_cells"] / table["sampled_tissue_mm2"].where(
        table["sampled_tissue_mm2"] > 0
    )
    table = table.merge(slide_groups[["slide", "group"]], on="slide", how="left")
    table["group"] = table["group"].fillna(UNGROUPED)
    return table[["slide", "group", "cell_type", "n_cells", "sampled_tissue_mm2", "density_per_mm2"]]


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
        ax.set_title(f"{cell_type.upper()} density in sampled tissue")
        ax.set_ylabel("cells / mm²")
        ax.tick_params(axis="x", rotation=60, labelsize=8)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[g]) for g in groups]
    fig.legend(handles, groups, loc="upper right", fontsize=8, title="group")
    fig.tight_layout(rect=(0, 0, 0.9, 1))
    return fig
