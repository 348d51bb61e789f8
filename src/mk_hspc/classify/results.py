"""The full run's results: classified cells, counts and densities per slide and group, plots, group tests."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from scipy import stats  # noqa: E402

from mk_hspc.slide_sheet import UNGROUPED  # noqa: E402
from mk_hspc.tissue.maps import TissueMap  # noqa: E402


def classify_cells(
    cells: pd.DataFrame, features: pd.DataFrame, model: Any, feature_names: list[str], threshold: float
) -> pd.DataFrame:
    """``cells`` of one type with ``probability`` (P(yes)) and ``is_cell`` (probability >= threshold)."""
    missing = [c for c in feature_names if c not in features.columns]
    if missing:
        raise ValueError(
            f"the model needs features the full run lacks: {missing[:10]} (enable their extractors)"
        )
    if len(cells) == 0:
        return cells.assign(probability=pd.Series(dtype=float), is_cell=pd.Series(dtype=bool))
    matrix = features.loc[cells["cell_id"].astype(str), feature_names].astype("float64")
    probability = model.predict_proba(matrix)[:, list(model.classes_).index(1)]
    return cells.assign(probability=probability, is_cell=probability >= threshold)


def counts_figure(counts: pd.DataFrame) -> Figure:
    """Counts and densities per group, one point per slide (jittered), with the group medians.

    With adjusted counts (``n_cells_adjusted``), those are the filled points and the medians, and the plain
    accepted counts are drawn hollow beside them, so that the size of the correction is visible.
    """
    cell_types = sorted(counts["cell_type"].unique())
    fig, axes = plt.subplots(2, len(cell_types), figsize=(5 * len(cell_types), 7.5), squeeze=False)
    groups = sorted(counts["group"].unique())
    rng = np.random.default_rng(0)
    adjusted = "n_cells_adjusted" in counts.columns and counts["n_cells_adjusted"].notna().any()
    for col, cell_type in enumerate(cell_types):
        rows = counts[counts["cell_type"] == cell_type]
        for row, (value, headline, label) in enumerate(
            (
                ("n_cells", "n_cells_adjusted", "cells per slide"),
                ("density_per_mm2", "density_adjusted_per_mm2", "cells / mm² tissue"),
            )
        ):
            ax = axes[row][col]
            for i, group in enumerate(groups):
                in_group = rows["group"] == group
                jitter = i + rng.uniform(-0.12, 0.12, int(in_group.sum()))
                values = rows.loc[in_group, headline if adjusted else value].to_numpy(float)
                ax.scatter(jitter, values, s=22, zorder=3, label="adjusted" if adjusted and i == 0 else None)
                if adjusted:
                    plain = rows.loc[in_group, value].to_numpy(float)
                    ax.scatter(jitter, plain, s=22, zorder=2, facecolors="none", edgecolors="grey",
                               label="accepted" if i == 0 else None)  # fmt: skip
                if len(values):
                    ax.hlines(np.nanmedian(values), i - 0.25, i + 0.25, color="black")
            if adjusted:
                ax.legend(fontsize=7, loc="best")
            ax.set_xticks(
                range(len(groups)),
                [f"{g}\n(n={int((rows['group'] == g).sum())})" for g in groups],
                fontsize=8,
            )
            ax.set_ylabel(label)
            ax.set_title(f"{cell_type.upper()}: {label}")
    fig.tight_layout()
    return fig


def area_histograms(final_cells: pd.DataFrame) -> Figure:
    """Area distribution per cell type of the accepted cells."""
    cell_types = sorted(final_cells["cell_type"].unique()) or ["none"]
    fig, axes = plt.subplots(1, len(cell_types), figsize=(5 * len(cell_types), 3.8), squeeze=False)
    for ax, cell_type in zip(axes[0], cell_types, strict=True):
        areas = final_cells.loc[(final_cells["cell_type"] == cell_type) & final_cells["is_cell"], "area_um2"]
        ax.hist(areas, bins=30, color="tab:purple")
        ax.set_title(f"{cell_type.upper()} area (n = {len(areas)})")
        ax.set_xlabel("area (µm²)")
    fig.tight_layout()
    return fig


# Bins with less tissue are left blank: a few cells over a sliver are no density.
MIN_BIN_TISSUE_FRACTION = 0.25


def density_grid(
    cells: pd.DataFrame, tissue_map: TissueMap, *, bin_um: float = 100.0
) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """Cells per mm² of *tissue* in ``bin_um`` squares over the tissue map, and the grid's extent (µm).

    The result is masked where a bin holds less than :data:`MIN_BIN_TISSUE_FRACTION` tissue, so tissue
    without cells shows as a density of 0 and glass shows nothing; dividing by the whole bin instead
    under-counted every bin at the tissue's edge.

    Args:
        cells: the cells to count (``centroid_x_um``, ``centroid_y_um``).
        tissue_map: the slide's tissue mask (its frame and pixel size place the bins).
    """
    um_per_px = tissue_map.um_per_px
    h, w = tissue_map.mask.shape
    n_x, n_y = max(1, int(np.ceil(w * um_per_px / bin_um))), max(1, int(np.ceil(h * um_per_px / bin_um)))
    edges = ((0, n_y * bin_um), (0, n_x * bin_um))
    origin_x_um = tissue_map.origin_x * tissue_map.pixel_size_um
    origin_y_um = tissue_map.origin_y * tissue_map.pixel_size_um
    counts, _, _ = np.histogram2d(
        cells["centroid_y_um"].to_numpy(float) - origin_y_um,
        cells["centroid_x_um"].to_numpy(float) - origin_x_um,
        bins=(n_y, n_x),
        range=edges,
    )
    rows, cols = np.nonzero(tissue_map.mask)
    tissue_px, _, _ = np.histogram2d(
        (rows + 0.5) * um_per_px, (cols + 0.5) * um_per_px, bins=(n_y, n_x), range=edges
    )
    tissue_mm2 = tissue_px * (um_per_px / 1000.0) ** 2
    enough = tissue_mm2 >= MIN_BIN_TISSUE_FRACTION * (bin_um / 1000.0) ** 2
    density = np.divide(counts, tissue_mm2, out=np.zeros_like(counts), where=enough)
    return np.ma.masked_array(density, mask=~enough), (0.0, n_x * bin_um, n_y * bin_um, 0.0)


def density_map(
    final_cells: pd.DataFrame, tissue_map: TissueMap, cell_types: list[str], *, bin_um: float = 100.0
) -> Figure:
    """The slide's thumbnail with each cell type's density (cells / mm² of tissue, :func:`density_grid`)."""
    cells = final_cells[final_cells["is_cell"].astype(bool)]
    fig, axes = plt.subplots(1, len(cell_types), figsize=(5.5 * len(cell_types), 4.5), squeeze=False)
    h, w = tissue_map.mask.shape
    um_per_px = tissue_map.um_per_px
    extent_um = (0.0, w * um_per_px, h * um_per_px, 0.0)
    background = tissue_map.thumbnail if tissue_map.thumbnail is not None else tissue_map.mask
    for ax, cell_type in zip(axes[0], cell_types, strict=True):
        ax.imshow(background, extent=extent_um, cmap="gray" if background.ndim == 2 else None)
        rows = cells[cells["cell_type"] == cell_type]
        density, grid_extent = density_grid(rows, tissue_map, bin_um=bin_um)
        image = ax.imshow(density, extent=grid_extent, alpha=0.6, cmap="magma", vmin=0)
        fig.colorbar(image, ax=ax, label="cells / mm² of tissue", shrink=0.8)
        ax.set_title(f"{tissue_map.slide}: {cell_type.upper()} ({len(rows)} cells)")
        ax.set_xlabel("µm")
    fig.tight_layout()
    return fig


def slide_factors(slide_groups: pd.DataFrame, slide_sheet: pd.DataFrame | None) -> pd.DataFrame:
    """One row per slide: ``group`` (validated) plus the slide sheet's other columns (e.g. sex, treatment)."""
    factors = slide_groups[["slide", "group"]].astype(str)
    if slide_sheet is None or "slide" not in slide_sheet.columns:
        return factors
    extra = [c for c in slide_sheet.columns if c not in ("slide", "group")]
    # Stripped as validate_slide_sheet strips (a hand-written " s1 " is slide s1, "F " is level F); a blank
    # cell is no level at all.
    sheet = slide_sheet[["slide", *extra]].astype(str).apply(lambda column: column.str.strip())
    sheet = sheet.replace({"": np.nan, "nan": np.nan}).drop_duplicates("slide")
    return factors.merge(sheet, on="slide", how="left")


def group_comparison(
    counts: pd.DataFrame, factors: pd.DataFrame | None = None, value: str = "density_per_mm2"
) -> pd.DataFrame:
    """Per cell type and factor, the slides' densities compared across the factor's levels by a rank test.

    Two levels: Mann-Whitney U (two-sided); more: Kruskal-Wallis H. Slides are the units (one value each);
    n per level is shown, and a level with fewer than 2 slides makes the test undefined (p = NaN, with the
    reason), never a p-value from a single slide.

    Args:
        counts: per slide and cell type (``slide, cell_type, group``, ``value``).
        factors: per slide, the columns to compare by (default: ``group`` of ``counts``).
    """
    if factors is None:
        factors = counts[["slide", "group"]].drop_duplicates()
    table = counts.drop(columns=[c for c in factors.columns if c != "slide" and c in counts.columns])
    table = table.merge(factors, on="slide", how="left")
    rows = []
    for factor in [c for c in factors.columns if c != "slide"]:
        for cell_type, rows_of_type in table.groupby("cell_type"):
            rows.append(_compare(rows_of_type, factor, cell_type, value))
    return pd.DataFrame(rows)


def _compare(table: pd.DataFrame, factor: str, cell_type: str, value: str) -> dict[str, Any]:
    # Slides without a level (no group in a non-strict sheet, a blank factor cell) are not a group of their own.
    without = table[factor].isna() | (table[factor].astype(str) == UNGROUPED)
    left_out = int(table.loc[without, "slide"].nunique())
    samples = {str(g): t[value].dropna().to_numpy(float) for g, t in table[~without].groupby(factor)}
    n_by_level = {g: len(v) for g, v in samples.items()}
    medians = {g: float(np.median(v)) if len(v) else float("nan") for g, v in samples.items()}
    record = {
        "cell_type": cell_type,
        "factor": factor,
        "value": value,
        "levels": ", ".join(samples),
        "n_per_level": ", ".join(f"{g}: {n}" for g, n in n_by_level.items()),
        "median_per_level": ", ".join(f"{g}: {m:.1f}" for g, m in medians.items()),
    }
    notes = [f"{left_out} slide(s) without a {factor} left out"] if left_out else []
    if len(samples) < 2 or min(n_by_level.values()) < 2:
        return record | {
            "test": "none",
            "statistic": np.nan,
            "p_value": np.nan,
            "note": "; ".join(["needs >= 2 levels with >= 2 slides each", *notes]),
        }
    test = "Mann-Whitney U" if len(samples) == 2 else "Kruskal-Wallis H"
    if len(samples) > 2 and len(np.unique(np.concatenate(list(samples.values())))) == 1:
        # Every slide has the same value (e.g. no cell anywhere): nothing differs. Kruskal-Wallis' H is 0/0
        # there (scipy: NaN); Mann-Whitney gives p = 1 for two such groups, so p = 1 here too, with the reason.
        tied = "; ".join(["all values tied", *notes])
        return record | {"test": test, "statistic": np.nan, "p_value": 1.0, "note": tied}
    if len(samples) == 2:
        result = stats.mannwhitneyu(*samples.values(), alternative="two-sided")
    else:
        result = stats.kruskal(*samples.values())
    return record | {
        "test": test,
        "statistic": float(result.statistic),
        "p_value": float(result.pvalue),
        "note": "; ".join(notes),
    }


def density_maps(
    final_cells: pd.DataFrame, tissue_maps: Mapping[str, Callable[[], TissueMap]], cell_types: list[str]
) -> dict[str, Figure]:
    """One density map per slide (by slide name)."""
    figures = {}
    for slide in sorted(tissue_maps):
        rows = final_cells[final_cells["slide"] == slide]
        figures[f"density_{slide}"] = density_map(rows, tissue_maps[slide](), cell_types)
    return figures
