"""Pixel size: where it comes from (metadata, study-wide fallback, per-slide override) and whether it is plausible."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml
from kedro.io.core import DatasetError

from mk_hspc.czi import CziSlideError, check_plausible_pixel_size, open_slide
from mk_hspc.czi.discovery import find_slides
from mk_hspc.datasets.slide_folder import SlideFolderDataset
from mk_hspc.pipelines.ingestion.nodes import read_slide_metadata
from tests.conftest import REPO_ROOT, write_czi

PLAUSIBLE = yaml.safe_load((REPO_ROOT / "conf" / "base" / "parameters_ingestion.yml").read_text())[
    "ingestion"
]["plausible_pixel_size_um"]


def ingestion(slides_dir: Path, **changes: object) -> dict[str, object]:
    return {
        "slides_dir": str(slides_dir),
        "skip_bad_slides": False,
        "plausible_pixel_size_um": PLAUSIBLE,
    } | changes


@pytest.fixture
def study(tmp_path: Path) -> Path:
    """Two H&E-like slides: lab01 calibrated at 0.1725 µm/px, lab02 whose metadata says 84.7 µm/px."""
    folder = tmp_path / "slides"
    write_czi(folder / "lab01.czi", 180, pixel_size_um=0.1725)
    write_czi(folder / "lab02.czi", 180, pixel_size_um=84.7)
    write_czi(folder / "lab03.czi", 180, pixel_size_um=None)
    return folder


def test_implausible_metadata_stops_the_run_naming_file_value_and_fix(study: Path) -> None:
    loaders = SlideFolderDataset(path=str(study), pixel_size_um=0.25).load()
    with pytest.raises(CziSlideError) as caught:
        read_slide_metadata(loaders, {}, ingestion(study))
    assert caught.value.path.endswith("lab02.czi")
    assert "84.7 µm per pixel" in str(caught.value)
    assert "pixel_size_um_by_slide: {lab02: <µm per pixel>}" in str(caught.value)


def test_implausible_slide_is_skipped_with_a_warning_when_asked(
    study: Path, caplog: pytest.LogCaptureFixture
) -> None:
    loaders = SlideFolderDataset(path=str(study), pixel_size_um=0.25).load()
    with caplog.at_level(logging.WARNING):
        meta = read_slide_metadata(loaders, {}, ingestion(study, skip_bad_slides=True))
    assert sorted(meta) == ["lab01", "lab03"]
    assert "lab02" in caplog.text and "84.7" in caplog.text


def test_per_slide_override_replaces_metadata_and_every_source_is_recorded(study: Path) -> None:
    loaders = SlideFolderDataset(
        path=str(study), pixel_size_um=0.25, pixel_size_um_by_slide={"lab02": 0.2}
    ).load()
    meta = read_slide_metadata(loaders, {}, ingestion(study))
    assert {name: (m["pixel_size_um"], m["pixel_size_source"]) for name, m in meta.items()} == {
        "lab01": (pytest.approx(0.1725), "metadata"),
        "lab02": (0.2, "override: per-slide"),
        "lab03": (0.25, "override: missing metadata"),
    }


@pytest.mark.parametrize(
    ("by_slide", "fallback", "culprit", "key"),
    [
        ({"lab02": 84.7}, 0.25, "lab02", "pixel_size_um_by_slide"),
        ({"lab02": 0.2}, 172.5, "lab03", "pixel_size_um_override"),
    ],
)
def test_implausible_override_is_an_error_naming_its_key(
    study: Path, by_slide: dict[str, float], fallback: float, culprit: str, key: str
) -> None:
    loaders = SlideFolderDataset(
        path=str(study), pixel_size_um=fallback, pixel_size_um_by_slide=by_slide
    ).load()
    with pytest.raises(CziSlideError, match=f"set by {key}") as caught:
        read_slide_metadata(loaders, {}, ingestion(study))
    assert caught.value.path.endswith(f"{culprit}.czi")


def test_override_for_a_slide_that_does_not_exist_is_an_error_naming_it(study: Path) -> None:
    dataset = SlideFolderDataset(path=str(study), pixel_size_um_by_slide={"lab2": 0.2, "lab01": 0.2})
    with pytest.raises(DatasetError, match=r"\['lab2'\] that are not in"):
        dataset.load()


def test_per_slide_override_must_be_a_positive_number(study: Path) -> None:
    with pytest.raises(CziSlideError, match="pixel_size_um_by_slide must be a positive number"):
        open_slide(study / "lab01.czi", replace_pixel_size_um=-0.2)


def test_malformed_range_is_a_configuration_error(study: Path) -> None:
    with open_slide(study / "lab01.czi") as slide:
        for bad in ([2.0, 0.05], [0.05], [0.0, 2.0]):
            with pytest.raises(ValueError, match="ingestion.plausible_pixel_size_um"):
                check_plausible_pixel_size(slide.meta, bad)


@pytest.mark.shared_data
def test_every_calibrated_shared_czi_is_plausible(shared_data: Path) -> None:
    """Real files (brightfield and fluorescence, 0.1 to 2.96 µm/px) pass the default range unchanged."""
    checked = 0
    for folder in ("aicspylibczi", "czitools"):
        for name, path in find_slides(shared_data / folder).items():
            if name == "newCZI_compressed":  # no scaling metadata at all
                continue
            with open_slide(path) as slide:
                check_plausible_pixel_size(slide.meta, PLAUSIBLE)
                checked += 1
    assert checked == 8
