"""Shape and colour descriptors of segmented cells (the original lab's hand-crafted feature set).

One ``skimage.measure.regionprops_table`` call per tile measures every cell; lengths and areas are
converted to micrometres with the tile's pixel size so that features are comparable across scanners,
and haematoxylin / eosin intensities come from the same colour deconvolution as the segmenter.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from skimage.measure import regionprops_table

from mk_hspc.models.stain import macenko_stain_vectors, optical_density, unmix

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
        subset = np.where(wanted[labels], labels, 0).astype(np.int32, copy=False)
        table = self._measure(tile_rgb, subset, pixel_size_um)
        frame = pd.DataFrame(table).set_index("label").reindex(cell_labels)
        return frame.astype(np.float32).set_axis(columns, axis=1).reset_index(drop=True)

    @staticmethod
    def _measure(tile_rgb: np.ndarray, labels: np.ndarray, pixel_size_um: float) -> dict[str, np.ndarray]:
        """Feature arrays keyed by unprefixed name, plus ``label``."""
        props = regionprops_table(
            labels,
            properties=(
                "label",
                "area",
                "perimeter_crofton",
                "area_convex",
                "equivalent_diameter_area",
                "axis_major_length",
                "axis_minor_length",
                "feret_diameter_max",
                "eccentricity",
                "solidity",
                "extent",
                "orientation",
            ),
        )
        px = float(pixel_size_um)
        area = props["area"].astype(np.float64)
        # Crofton's estimate is within ~1% of 2*pi*r for digital discs (the chain-code perimeter is 3-4%
        # high), so circularity stays close to 1 for round nuclei.
        perimeter = props["perimeter_crofton"].astype(np.float64)
        major, minor = props["axis_major_length"], props["axis_minor_length"]
        with np.errstate(divide="ignore", invalid="ignore"):
            circularity = np.where(perimeter > 0, 4.0 * np.pi * area / perimeter**2, np.nan)
            aspect_ratio = np.where(minor > 0, major / minor, np.nan)
        table = {
            "label": props["label"],
            "area_um2": area * px**2,
            "perimeter_um": perimeter * px,
            "convex_area_um2": props["area_convex"] * px**2,
            "equivalent_diameter_um": props["equivalent_diameter_area"] * px,
            "major_axis_um": major * px,
            "minor_axis_um": minor * px,
            "feret_diameter_max_um": props["feret_diameter_max"] * px,
            "aspect_ratio": aspect_ratio,
            "eccentricity": props["eccentricity"],
            "solidity": props["solidity"],
            "extent": props["extent"],
            "circularity": circularity,
            "orientation_rad": props["orientation"],
        }
        table.update(_channel_statistics(tile_rgb, labels, props["label"]))
        return {"label": table["label"], **{name: table[name] for name in FEATURE_NAMES}}


def _channel_statistics(
    tile_rgb: np.ndarray, labels: np.ndarray, wanted: np.ndarray
) -> dict[str, np.ndarray]:
    """Mean and standard deviation of R, G, B, haematoxylin and eosin per label in ``wanted``.

    Only the labelled pixels are unmixed (cells cover a small part of a tile); the stain vectors are
    estimated from the whole tile, as the segmenter does.
    """
    rows, cols = np.nonzero(labels)
    if len(rows) == 0:
        return {f"{channel}_{stat}": np.zeros(0) for channel in _CHANNELS for stat in ("mean", "std")}
    vectors, _ = macenko_stain_vectors(optical_density(tile_rgb))
    rgb = tile_rgb[rows, cols]
    stains = unmix(optical_density(rgb), vectors)
    channels = np.concatenate([rgb.astype(np.float64), stains.astype(np.float64)], axis=1)
    index = labels[rows, cols]
    size = int(wanted.max()) + 1
    count = np.maximum(np.bincount(index, minlength=size)[wanted], 1)
    statistics = {}
    for k, channel in enumerate(_CHANNELS):
        values = channels[:, k]
        mean = np.bincount(index, weights=values, minlength=size)[wanted] / count
        mean_sq = np.bincount(index, weights=values * values, minlength=size)[wanted] / count
        statistics[f"{channel}_mean"] = mean
        statistics[f"{channel}_std"] = np.sqrt(np.maximum(mean_sq - mean * mean, 0.0))
    return statistics
