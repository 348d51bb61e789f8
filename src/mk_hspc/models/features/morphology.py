"""Shape and colour descriptors of segmented cells (the original lab's hand-crafted feature set).

Moments come from one vectorised pass over the tile (:func:`measure_shapes`); lengths and areas are
converted to micrometres with the tile's pixel size so that features are comparable across scanners,
and haematoxylin / eosin intensities come from the same colour deconvolution as the segmenter.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from mk_hspc.models.features.cell_stacks import outline_measures
from mk_hspc.models.segmenters.label_measures import pixel_moments
from mk_hspc.models.stain import optical_density, tile_stain_vectors, unmix

PREFIX = "morphology_"
_CHANNELS = ("r", "g", "b", "haematoxylin", "eosin")
# Output columns (without the prefix), in order.
FEATURE_NAMES: tuple[str, ...] = (
    "area_um2",
    "perimeter_um",
    "convex_area_um2",
    "equivalent_diameter_um",
    "major_axis_um",
    "minor_axis_um",
    "feret_diameter_max_um",
    "aspect_ratio",
    "eccentricity",
    "solidity",
    "extent",
    "circularity",
    "orientation_rad",
    *(f"{channel}_{stat}" for channel in _CHANNELS for stat in ("mean", "std")),
)


def morphology_columns() -> list[str]:
    """The extractor's column names, prefixed (``morphology_area_um2``, ...)."""
    return [PREFIX + name for name in FEATURE_NAMES]


class MorphologyFeatures:
    """Per-cell morphology: sizes in µm / µm², shape ratios, orientation and per-channel intensities.

    Intensities are the mean and standard deviation of R, G, B (0-255) and of the haematoxylin and
    eosin optical densities under each cell's mask. Circularity is ``4 pi area / perimeter^2`` with
    Crofton's perimeter (1 for a disc).

    Example:
        >>> labels = np.zeros((64, 64), np.int32); labels[10:30, 10:40] = 1
        >>> tile = np.full((64, 64, 3), 200, np.uint8)
        >>> df = MorphologyFeatures().extract(tile, labels, np.array([1]), pixel_size_um=0.5)
        >>> float(df.loc[0, "morphology_area_um2"])
        150.0
    """

    name = "morphology"

    def columns(self) -> list[str]:
        """The output columns, in order (part of the tile fingerprint: a new feature recomputes tiles)."""
        return morphology_columns()

    def extract(
        self, tile_rgb: np.ndarray, labels: np.ndarray, cell_labels: np.ndarray, pixel_size_um: float
    ) -> pd.DataFrame:
        """One row per entry of ``cell_labels`` (same order), float32 ``morphology_*`` columns.

        A label that is absent from ``labels`` gives a row of NaN.
        """
        if pixel_size_um <= 0:
            raise ValueError(f"pixel_size_um must be > 0, got {pixel_size_um}")
        if tile_rgb.ndim != 3 or tile_rgb.shape[2] != 3:
            raise ValueError(f"tile_rgb must be (H, W, 3) RGB, got shape {tile_rgb.shape}")
        if tile_rgb.shape[:2] != labels.shape:
            raise ValueError(f"tile {tile_rgb.shape[:2]} and labels {labels.shape} differ in size")
        cell_labels = np.asarray(cell_labels, dtype=np.int64).ravel()
        columns = morphology_columns()
        if cell_labels.size == 0:
            return pd.DataFrame({c: pd.Series(dtype=np.float32) for c in columns})
        # Measure only the requested cells: other labels are zeroed through a lookup table.
        max_label = int(max(labels.max(initial=0), cell_labels.max()))
        wanted = np.zeros(max_label + 1, bool)
        wanted[cell_labels[(cell_labels > 0) & (cell_labels <= max_label)]] = True
        wanted[0] = False
        # One pass over the tile: every later step works on the wanted cells' pixel lists and crops.
        # Flat indices, then rows and columns: a third cheaper than np.nonzero on a 2-D tile.
        flat = np.flatnonzero(labels)
        lab = labels.ravel()[flat]
        keep = wanted[lab]
        rows, cols = np.divmod(flat[keep], labels.shape[1])
        pixels = (rows, cols, lab[keep].astype(np.int64))
        table = self._measure(tile_rgb, labels, pixels, pixel_size_um)
        frame = pd.DataFrame(table).set_index("label").reindex(cell_labels)
        return frame.astype(np.float32).set_axis(columns, axis=1).reset_index(drop=True)

    @staticmethod
    def _measure(
        tile_rgb: np.ndarray,
        labels: np.ndarray,
        pixels: tuple[np.ndarray, np.ndarray, np.ndarray],
        pixel_size_um: float,
    ) -> dict[str, np.ndarray]:
        """Feature arrays keyed by unprefixed name, plus ``label``, of the cells whose ``pixels`` are given."""
        shape = measure_shapes(labels, pixels)
        px = float(pixel_size_um)
        area, perimeter = shape["area"], shape["perimeter"]
        major, minor = shape["major"], shape["minor"]
        with np.errstate(divide="ignore", invalid="ignore"):
            circularity = np.where(perimeter > 0, 4.0 * np.pi * area / perimeter**2, np.nan)
            aspect_ratio = np.where(minor > 0, major / minor, np.nan)
        table = {
            "label": shape["label"],
            "area_um2": area * px**2,
            "perimeter_um": perimeter * px,
            "convex_area_um2": shape["area_convex"] * px**2,
            "equivalent_diameter_um": np.sqrt(4.0 * area / np.pi) * px,
            "major_axis_um": major * px,
            "minor_axis_um": minor * px,
            "feret_diameter_max_um": shape["feret"] * px,
            "aspect_ratio": aspect_ratio,
            "eccentricity": shape["eccentricity"],
            "solidity": area / shape["area_convex"],
            "extent": area / shape["bbox_area"],
            "circularity": circularity,
            "orientation_rad": shape["orientation"],
        }
        table.update(_channel_statistics(tile_rgb, pixels, shape["label"]))
        return {"label": table["label"], **{name: table[name] for name in FEATURE_NAMES}}


def measure_shapes(
    labels: np.ndarray, pixels: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
) -> dict[str, np.ndarray]:
    """Shape measurements (pixels) of every label present, in label order, without ``regionprops``.

    Moments, axes, eccentricity, orientation, bounding boxes and Crofton perimeters equal
    ``skimage.measure.regionprops`` (moments from one ``bincount`` pass; perimeters from every cell's 2x2
    configurations at once, :mod:`~mk_hspc.models.features.cell_stacks`). The convex hull is that of the
    midpoints of the cell's outer pixel edges (the vertices of its 0.5 iso-contour, as marching squares
    draws it), bounded by its support lines in 64 directions: ``area_convex`` is that polygon's area (never
    below the pixel area) and ``feret`` its largest caliper width. skimage instead rasterises the hull and
    traces it again, 40 % of the feature time; the two agree within a few per cent for cells of more than
    ~20 pixels (``tests/test_morphology.py`` states the tolerance).
    """
    if pixels is None:
        rows, cols = np.nonzero(labels)
        pixels = (rows, cols, labels[rows, cols].astype(np.int64))
    rows, cols, lab = pixels
    present = np.flatnonzero(np.bincount(lab)[1:]) + 1 if len(lab) else np.zeros(0, np.int64)
    n_max = int(present[-1]) if len(present) else 0
    out: dict[str, np.ndarray] = {"label": present}
    if n_max == 0:
        for key in (
            "area",
            "perimeter",
            "area_convex",
            "major",
            "minor",
            "feret",
            "eccentricity",
            "orientation",
            "bbox_area",
        ):
            out[key] = np.zeros(0)
        return out
    moments = pixel_moments(rows, cols, lab, n_max)
    index = present - 1
    myy, mxx, mxy = moments["myy"][index], moments["mxx"][index], moments["mxy"][index]
    half_trace, det_term = (myy + mxx) / 2.0, np.sqrt(((myy - mxx) / 2.0) ** 2 + mxy**2)
    l1, l2 = half_trace + det_term, np.maximum(half_trace - det_term, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        eccentricity = np.where(l1 > 0, np.sqrt(np.maximum(1.0 - l2 / l1, 0.0)), 0.0)
    # skimage: 0.5 * atan2(-2 b, c - a) with a = mxx, b = -mxy, c = myy; +-pi/4 when a == c.
    orientation = np.where(
        mxx == myy, np.where(mxy > 0, np.pi / 4.0, -np.pi / 4.0), 0.5 * np.arctan2(2.0 * mxy, myy - mxx)
    )
    # Bounding boxes of the measured cells from their pixels (not a pass over the tile).
    top = np.full(n_max + 1, labels.shape[0])
    left = np.full(n_max + 1, labels.shape[1])
    bottom = np.zeros(n_max + 1, np.int64)
    right = np.zeros(n_max + 1, np.int64)
    np.minimum.at(top, lab, rows)
    np.minimum.at(left, lab, cols)
    np.maximum.at(bottom, lab, rows)
    np.maximum.at(right, lab, cols)
    area = moments["area"][index]
    height, width = bottom[present] - top[present] + 1, right[present] - left[present] + 1
    outline = outline_measures(
        rows, cols, position_of(present, n_max)[lab], top[present], left[present], height, width
    )
    perimeter, feret = outline["perimeter"], outline["feret"]
    area_convex = np.maximum(outline["hull_area"], area)
    bbox_area = (height * width).astype(np.float64)
    out.update(
        area=area,
        perimeter=perimeter,
        area_convex=area_convex,
        major=4.0 * np.sqrt(l1),
        minor=4.0 * np.sqrt(l2),
        feret=feret,
        eccentricity=eccentricity,
        orientation=orientation,
        bbox_area=bbox_area,
    )
    return out


def position_of(present: np.ndarray, n_max: int) -> np.ndarray:
    """Lookup table label -> index of that label in ``present`` (-1 for absent labels)."""
    table = np.full(n_max + 1, -1, np.int64)
    table[present] = np.arange(len(present))
    return table


def _channel_statistics(
    tile_rgb: np.ndarray, pixels: tuple[np.ndarray, np.ndarray, np.ndarray], wanted: np.ndarray
) -> dict[str, np.ndarray]:
    """Mean and standard deviation of R, G, B, haematoxylin and eosin per label in ``wanted``.

    Only the labelled pixels are unmixed (cells cover a small part of a tile); the stain vectors are
    estimated from the whole tile, as the segmenter does. R, G and B of a uint8 tile take one 256-bin
    histogram per cell (one ``bincount`` of ``label * 256 + value``): exact sums of values and squares at
    a third of the cost of weighted sums over every pixel; other dtypes take the weighted sums.
    """
    rows, cols, index = pixels
    if len(rows) == 0:
        return {f"{channel}_{stat}": np.zeros(0) for channel in _CHANNELS for stat in ("mean", "std")}
    vectors, _ = tile_stain_vectors(tile_rgb)
    rgb = np.take(tile_rgb.reshape(-1, 3), rows * tile_rgb.shape[1] + cols, axis=0)  # 5x a 2-D gather
    size = int(wanted.max()) + 1
    count = np.maximum(np.bincount(index, minlength=size)[wanted], 1)

    def weighted_sums(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        values = values.astype(np.float64)
        total = np.bincount(index, weights=values, minlength=size)[wanted]
        return total, np.bincount(index, weights=values * values, minlength=size)[wanted]

    def histogram_sums(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        histogram = np.bincount(key_base + values, minlength=size * 256).reshape(size, 256)[wanted]
        sums = histogram @ level_moments
        return sums[:, 0], sums[:, 1]

    if rgb.dtype == np.uint8:
        key_base = index * 256
        levels = np.arange(256, dtype=np.float64)
        level_moments = np.stack([levels, levels * levels], axis=1)
        rgb_sums = histogram_sums
    else:  # 16-bit or float tiles: values are not histogram bins
        rgb_sums = weighted_sums
    stains = unmix(optical_density(rgb), vectors)
    sums = [rgb_sums(rgb[:, k]) for k in range(3)] + [weighted_sums(stains[:, k]) for k in range(2)]
    statistics = {}
    for channel, (total, total_sq) in zip(_CHANNELS, sums, strict=True):
        mean = total / count
        statistics[f"{channel}_mean"] = mean
        statistics[f"{channel}_std"] = np.sqrt(np.maximum(total_sq / count - mean * mean, 0.0))
    return statistics
