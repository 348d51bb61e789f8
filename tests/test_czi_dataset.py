"""Tests of slide discovery and the Kedro `SlideFolderDataset`, alone and as conf/base/catalog.yml declares it."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from kedro.io import DataCatalog
from kedro.io.core import DatasetError

from mk_hspc.czi import CziSlide, CziSlideError
from mk_hspc.czi.discovery import DuplicateSlideNameError, find_slides
from mk_hspc.datasets.slide_folder import SlideFolderDataset
from tests.conftest import catalog_entry, write_czi


@pytest.fixture
def slide_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "slides"
    write_czi(folder / "mouse_a.czi", 40, pixel_size_um=0.1725)
    write_czi(folder / "mouse_b.czi", 200, pixel_size_um=None)
    (folder / "slide_sheet.csv").write_text("slide,group\nmouse_a,ctrl\n")  # not a slide: ignored
    return folder


def test_catalog_finds_czi_in_any_letter_case_and_sub_folder_named_by_stem(slide_folder: Path) -> None:
    write_czi(slide_folder / "LAB01.CZI", 90, pixel_size_um=0.25)
    write_czi(slide_folder / "batch 2" / "deeper" / "lab02.Czi", 120, pixel_size_um=0.25)
    (slide_folder / "notes.txt").write_text("not a slide")
    (slide_folder / "half_written.czi.part").write_bytes(b"\0" * 64)

    catalog = DataCatalog.from_config(
        {"raw_slides": catalog_entry("raw_slides", path=str(slide_folder), pixel_size_um=0.5)}
    )
    loaders = catalog.load("raw_slides")

    assert list(loaders) == ["LAB01", "lab02", "mouse_a", "mouse_b"]
    for name, load in loaders.items():
        with load() as slide:
            assert slide.meta.name == name  # the key later stages join on is the slide's own name
    with loaders["lab02"]() as slide:
        assert np.all(slide.read_region(0, 0, 64, 32) == 120)


def test_equal_stems_are_an_error_naming_both_files(tmp_path: Path) -> None:
    write_czi(tmp_path / "site_a" / "mouse_1.czi", 10, 0.2)
    write_czi(tmp_path / "site_b" / "MOUSE_1.CZI", 20, 0.2)
    with pytest.raises(DuplicateSlideNameError) as caught:
        find_slides(tmp_path)
    message = str(caught.value)
    assert str(tmp_path / "site_a" / "mouse_1.czi") in message
    assert str(tmp_path / "site_b" / "MOUSE_1.CZI") in message

    with pytest.raises(DatasetError, match="MOUSE_1.CZI"):  # and the catalog surfaces it unchanged
        SlideFolderDataset(path=str(tmp_path)).load()


@pytest.mark.parametrize("file_name", ["..czi", "...czi", "....CZI"])
def test_a_slide_named_only_dots_is_an_error_naming_the_file(tmp_path: Path, file_name: str) -> None:
    """``...czi`` would be slide ``..``: its tile files (``<store>/<slide>/<tile>.h5``) would leave the store."""
    write_czi(tmp_path / file_name, 10, 0.2)
    with pytest.raises(ValueError, match=re.escape(file_name)):
        find_slides(tmp_path)


def test_load_lists_slides_without_opening_them(slide_folder: Path) -> None:
    (slide_folder / "not_a_slide.czi").write_text("a spreadsheet, renamed")
    dataset = SlideFolderDataset(path=str(slide_folder))
    loaders = dataset.load()  # the bad file does not fail the listing...
    assert sorted(loaders) == ["mouse_a", "mouse_b", "not_a_slide"]
    with pytest.raises(CziSlideError, match="not_a_slide.czi"):  # ...only opening it, with its name
        loaders["not_a_slide"]()
    slide = loaders["mouse_a"]()
    assert isinstance(slide, CziSlide) and slide.meta.pixel_size_um == pytest.approx(0.1725)
    slide.close()


def test_pixel_size_and_load_args_reach_open_slide(slide_folder: Path) -> None:
    dataset = SlideFolderDataset(path=str(slide_folder), pixel_size_um=0.2, load_args={"thread_mode": "lock"})
    loaders = dataset.load()
    with loaders["mouse_b"]() as slide:
        assert slide.meta.pixel_size_um == 0.2
    with loaders["mouse_a"]() as slide:  # a calibrated file keeps its own value
        assert slide.meta.pixel_size_um == pytest.approx(0.1725)
    assert dataset._describe()["load_args"] == {"thread_mode": "lock"}


def test_save_is_refused_and_a_missing_folder_holds_no_slides(tmp_path: Path) -> None:
    dataset = SlideFolderDataset(path=str(tmp_path / "absent"))
    assert not dataset.exists()
    assert dataset.load() == {}
    with pytest.raises(DatasetError, match="read-only"):
        dataset.save({})
    assert "absent" in str(dataset)
