"""The per-slide QC figure: thumbnail, tissue mask, tile grid, tissue tiles and sampled tiles in one view.

Built on ``matplotlib.figure.Figure`` directly (no pyplot), so it needs no GUI backend and leaks no global state.
"""

from __future__ import annotations

from collections.abc import Iterable

import matplotlib.colors
import numpy as np
import pandas as pd
from matplotlib.collections import PatchCollection
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from mk_hspc.tissue.maps import TissueMap

#: Colour-blind-safe colours (Okabe-Ito) for the overlay's layers.
TISSUE_COLOR = "#009E73"
TISSUE_TILE_COLOR = "#0072B2"
SAMPLED_TILE_COLOR = "#E69F00"
GRID_COLOR = "#808080"


def _tile_rectangles(tiles: pd.DataFrame, tissue_map: TissueMap) -> list[Rectangle]:
    """Tile windows as rectangles in millimetres from the map origin."""
    mm_per_px = tissue_map.pixel_size_um / 1000.0
    return [
        Rectangle(
            ((x - tissue_map.origin_x) * mm_per_px, (y - tissue_map.origin_y) * mm_per_px),
            w * mm_per_px,
            h * mm_per_px,
        )  # fmt: skip
        for x, y, w, h in tiles[["x", "y", "w", "h"]].itertuples(index=False)
    ]


def tissue_overlay_figure(
    tissue_map: TissueMap,
    tile_index_of_slide: pd.DataFrame,
    sampled_tile_ids: Iterable[str],
    *,
    thumbnail_rgb: np.ndarray | None = None,
    max_size_in: float = 9.0,
    tissue_alpha: float = 0.22,
) -> Figure:
    """Draw the tissue map and the tile decisions of one slide over its thumbnail.

    Args:
        tissue_map: the slide's tissue map.
        tile_index_of_slide: the slide's rows of the tile index (``x, y, w, h, is_tissue, tile_id``).
        sampled_tile_ids: ids of sampled tiles (ids of other slides are ignored).
        thumbnail_rgb: ``(H, W, 3)`` uint8 in the map's frame; defaults to ``tissue_map.thumbnail`` (a grey
            background when the map carries none).
        max_size_in: the longer side of the figure in inches.
        tissue_alpha: opacity of the tissue tint.
    """
    height, width = tissue_map.mask.shape
    if thumbnail_rgb is None:
        thumbnail_rgb = tissue_map.thumbnail
    if thumbnail_rgb is None:
        thumbnail_rgb = np.full((height, width, 3), 235, np.uint8)
    if thumbnail_rgb.shape[:2] != (height, width):
        raise ValueError(
            f"thumbnail {thumbnail_rgb.shape[:2]} and tissue map {(height, width)} differ in shape"
        )
    mm_per_map_px = tissue_map.um_per_px / 1000.0
    extent = (0.0, width * mm_per_map_px, height * mm_per_map_px, 0.0)

    aspect = height / max(width, 1)
    fig_w = max_size_in if aspect <= 1 else max(max_size_in / aspect, 4.0)
    fig_h = max(fig_w * aspect, 3.0) + 1.2  # room for the title and the legend
    fig = Figure(figsize=(fig_w, fig_h), layout="constrained")
    ax = fig.add_subplot()
    ax.imshow(thumbnail_rgb, extent=extent, interpolation="antialiased")

    tint = np.zeros((height, width, 4), np.float32)
    tint[tissue_map.mask] = (*matplotlib.colors.to_rgb(TISSUE_COLOR), tissue_alpha)
    ax.imshow(tint, extent=extent, interpolation="nearest")
    if tissue_map.mask.any() and not tissue_map.mask.all():
        centers_x = (np.arange(width) + 0.5) * mm_per_map_px
        centers_y = (np.arange(height) + 0.5) * mm_per_map_px
        ax.contour(centers_x, centers_y, tissue_map.mask.astype(np.float32), levels=[0.5],
                   colors=[TISSUE_COLOR], linewidths=1.0)  # fmt: skip

    sampled = set(sampled_tile_ids)
    tiles = tile_index_of_slide
    is_tissue = tiles["is_tissue"].astype(bool).to_numpy()
    is_sampled = tiles["tile_id"].isin(sampled).to_numpy()
    layers = [
        (~is_tissue, dict(facecolor="none", edgecolor=GRID_COLOR, linewidth=0.4, alpha=0.5)),
        (is_tissue & ~is_sampled, dict(facecolor="none", edgecolor=TISSUE_TILE_COLOR, linewidth=0.9)),
        (is_sampled, dict(facecolor=SAMPLED_TILE_COLOR + "55", edgecolor=SAMPLED_TILE_COLOR, linewidth=1.6)),
    ]
    for selected, style in layers:
        if selected.any():
            ax.add_collection(PatchCollection(_tile_rectangles(tiles.loc[selected], tissue_map), **style))

    ax.set_xlim(extent[0], extent[1])
    ax.set_ylim(extent[2], extent[3])
    ax.set_aspect("equal")
    ax.set_xlabel("x (mm)")
    ax.set_ylabel("y (mm)")
    ax.tick_params(labelsize=8)
    n_tiles, n_tissue, n_sampled = len(tiles), int(is_tissue.sum()), int(is_sampled.sum())
    share = 100.0 * n_tissue / n_tiles if n_tiles else 0.0
    ax.set_title(
        f"{tissue_map.slide}\n{n_tiles} tiles, {n_tissue} with tissue ({share:.0f}%), {n_sampled} sampled"
        f"  ·  tissue {tissue_map.tissue_area_um2 / 1e6:.1f} mm²",
        fontsize=10,
    )
    handles = [
        Patch(facecolor=TISSUE_COLOR, alpha=0.5, edgecolor=TISSUE_COLOR, label="tissue"),
        Patch(facecolor="none", edgecolor=GRID_COLOR, label="tile"),
        Patch(facecolor="none", edgecolor=TISSUE_TILE_COLOR, linewidth=1.2, label="tissue tile"),
        Patch(
            facecolor=SAMPLED_TILE_COLOR + "55",
            edgecolor=SAMPLED_TILE_COLOR,
            linewidth=1.6,
            label="sampled tile",
        ),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols=4, frameon=False, fontsize=8)
    return fig
