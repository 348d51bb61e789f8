"""Morphology features on shapes whose geometry is known in closed form."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage as ndi
from skimage.draw import disk, ellipse
from skimage.measure import label, regionprops_table

from mk_hspc.models import FeatureExtractor, create_feature_extractor
from mk_hspc.models.features.morphology import MorphologyFeatures, measure_shapes, morphology_columns

RADIUS_PX = 30


def shapes() -> tuple[np.ndarray, np.ndarray]:
    """Label 3: a disc of radius 30 px; label 7: a 20 x 40 px axis-aligned rectangle; label 9: an ellipse."""
    labels = np.zeros((200, 220), np.int32)
    labels[disk((70, 70), RADIUS_PX)] = 3
    labels[150:170, 20:60] = 7
    labels[ellipse(150, 160, 15, 40)] = 9  # semi-axes 15 (rows) and 40 (columns)
    tile = np.full((200, 220, 3), 235, np.uint8)
    tile[labels == 3] = (70, 40, 130)  # purple: haematoxylin-rich
    tile[labels == 7] = (230, 120, 170)  # pink: eosin-rich
    tile[labels == 9] = (120, 80, 150)
    return tile, labels


def extract(pixel_size_um: float, cell_labels=(3, 7, 9)) -> pd.DataFrame:
    tile, labels = shapes()
    return MorphologyFeatures().extract(tile, labels, np.asarray(cell_labels), pixel_size_um)


def test_disc_matches_theory() -> None:
    disc = extract(1.0).iloc[0]
    assert disc["morphology_area_um2"] == pytest.approx(np.pi * RADIUS_PX**2, rel=0.01)
    assert disc["morphology_perimeter_um"] == pytest.approx(2 * np.pi * RADIUS_PX, rel=0.02)
    assert disc["morphology_circularity"] == pytest.approx(1.0, abs=0.03)
    assert disc["morphology_eccentricity"] < 0.1
    assert disc["morphology_equivalent_diameter_um"] == pytest.approx(2 * RADIUS_PX, rel=0.01)
    assert disc["morphology_major_axis_um"] == pytest.approx(disc["morphology_minor_axis_um"], rel=0.02)
    assert disc["morphology_solidity"] > 0.97
    assert disc["morphology_extent"] == pytest.approx(np.pi / 4, abs=0.03)  # digital disc: bbox 2r - 1


def test_rectangle_fills_its_box_and_ellipse_is_eccentric() -> None:
    features = extract(1.0)
    rectangle, ellipse_row = features.iloc[1], features.iloc[2]
    assert rectangle["morphology_extent"] == pytest.approx(1.0)
    assert rectangle["morphology_solidity"] == pytest.approx(1.0)
    assert rectangle["morphology_area_um2"] == pytest.approx(800.0)
    assert rectangle["morphology_aspect_ratio"] == pytest.approx(2.0, rel=0.02)
    assert rectangle["morphology_feret_diameter_max_um"] == pytest.approx(np.hypot(20, 40), rel=0.05)
    # Major axis along the columns: skimage reports the angle from the row axis, +-pi/2 here.
    assert abs(rectangle["morphology_orientation_rad"]) == pytest.approx(np.pi / 2, abs=0.01)
    assert ellipse_row["morphology_eccentricity"] == pytest.approx(np.sqrt(1 - (15 / 40) ** 2), abs=0.02)
    assert ellipse_row["morphology_circularity"] < 0.85


def test_sizes_are_converted_to_micrometres() -> None:
    at_1um, at_half = extract(1.0), extract(0.5)
    for column in ("area_um2", "convex_area_um2"):
        np.testing.assert_allclose(
            at_half[f"morphology_{column}"], 0.25 * at_1um[f"morphology_{column}"], rtol=1e-5
        )
    for column in (
        "perimeter_um",
        "major_axis_um",
        "minor_axis_um",
        "equivalent_diameter_um",
        "feret_diameter_max_um",
    ):
        np.testing.assert_allclose(
            at_half[f"morphology_{column}"], 0.5 * at_1um[f"morphology_{column}"], rtol=1e-5
        )
    for column in ("circularity", "eccentricity", "solidity", "extent", "aspect_ratio", "r_mean"):
        np.testing.assert_allclose(at_half[f"morphology_{column}"], at_1um[f"morphology_{column}"], rtol=1e-5)


def test_intensities_follow_the_colour_of_each_cell() -> None:
    features = extract(1.0)
    disc, rectangle = features.iloc[0], features.iloc[1]
    assert (disc["morphology_r_mean"], disc["morphology_g_mean"], disc["morphology_b_mean"]) == (70, 40, 130)
    assert disc["morphology_r_std"] == 0.0
    assert disc["morphology_haematoxylin_mean"] > rectangle["morphology_haematoxylin_mean"]
    assert rectangle["morphology_eosin_mean"] > disc["morphology_eosin_mean"]


def test_rows_follow_cell_labels_and_missing_labels_are_nan() -> None:
    features = extract(1.0, cell_labels=(7, 42, 3))
    assert list(features.columns) == morphology_columns()
    assert len(features) == 3 and all(dtype == np.float32 for dtype in features.dtypes)
    assert features.loc[0, "morphology_area_um2"] == pytest.approx(800.0)
    assert features.loc[1].isna().all()
    assert features.loc[2, "morphology_area_um2"] == pytest.approx(np.pi * RADIUS_PX**2, rel=0.01)
    # At least the original lab's 22 descriptors, all named after the extractor.
    assert len(morphology_columns()) >= 22 and all(c.startswith("morphology_") for c in features.columns)


def test_empty_label_image_gives_an_empty_frame_with_the_columns() -> None:
    tile = np.full((64, 64, 3), 240, np.uint8)
    empty = MorphologyFeatures().extract(tile, np.zeros((64, 64), np.int32), np.array([], np.int32), 0.25)
    assert empty.empty and list(empty.columns) == morphology_columns()
    absent = MorphologyFeatures().extract(tile, np.zeros((64, 64), np.int32), np.array([1, 2]), 0.25)
    assert absent.shape == (2, len(morphology_columns())) and absent.isna().all().all()


def test_plugin_is_registered_and_checks_its_inputs() -> None:
    extractor = create_feature_extractor("morphology")
    assert isinstance(extractor, FeatureExtractor) and extractor.name == "morphology"
    tile, labels = shapes()
    with pytest.raises(ValueError, match="pixel_size_um"):
        extractor.extract(tile, labels, np.array([3]), 0.0)
    with pytest.raises(ValueError, match="differ"):
        extractor.extract(tile[:100], labels, np.array([3]), 1.0)


def test_shapes_equal_regionprops_and_the_hull_is_within_its_stated_tolerance() -> None:
    # Random blobs of every shape; measure_shapes replaces regionprops_table for speed.
    rng = np.random.default_rng(0)
    labels = label(ndi.gaussian_filter(rng.normal(size=(300, 300)), 4) > 0.02).astype(np.int32)
    props = regionprops_table(
        labels,
        properties=(
            "label", "area", "perimeter_crofton", "axis_major_length", "axis_minor_length",
            "eccentricity", "orientation", "extent", "area_convex", "feret_diameter_max",
        ),
    )  # fmt: skip
    shapes = measure_shapes(labels)
    assert len(props["label"]) > 30
    np.testing.assert_array_equal(shapes["label"], props["label"])
    exact = {
        "area": "area",
        "perimeter": "perimeter_crofton",
        "major": "axis_major_length",
        "minor": "axis_minor_length",
        "eccentricity": "eccentricity",
        "orientation": "orientation",
    }
    for ours, theirs in exact.items():
        np.testing.assert_allclose(shapes[ours], props[theirs], rtol=1e-9, atol=1e-9, err_msg=ours)
    np.testing.assert_allclose(shapes["area"] / shapes["bbox_area"], props["extent"], rtol=1e-12)
    # The hull: polygon of pixel-edge midpoints instead of a rasterised hull.
    big = props["area"] >= 20
    convex_error = np.abs(shapes["area_convex"] - props["area_convex"]) / props["area_convex"]
    assert convex_error[big].max() <= 0.08 and np.median(convex_error[big]) <= 0.02
    assert np.all(shapes["area_convex"] >= shapes["area"])
    assert np.abs(shapes["feret"] - props["feret_diameter_max"]).max() <= 1.0
