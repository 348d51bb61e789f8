"""Tests of the Kedro `CziSlideDataset`, alone and inside a PartitionedDataset as the catalog uses it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from kedro.io import DataCatalog
from kedro.io.core import DatasetError
from pylibCZIrw import czi as pyczi

from mk_hspc.czi import CziSlide, CziSlideError
from mk_hspc.datasets.czi_slides import CziSlideDataset


def write_czi(path: Path, value: int, pixel_size_um: float | None) -> Path:
    """A 2-tile 64 x 32 Bgr24 slide filled with ``value``; ``pixel_size_um=None`` writes no scaling."""
    with pyczi.create_czi(str(path), exist_ok=True) as writer:
        for x in (0, 32):
            writer.write(np.full((32, 32, 3), value, np.uint8), location=(x, 0))
        scale_m = pixel_size_um * 1e-6 if pixel_size_um else 0.0  # the CZI stores metres per pixel
        writer.write_metadata(scale_x=scale_m, scale_y=scale_m)
    return path


@pytest.fixture
def slide_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "slides"
    folder.mkdir()
    write_czi(folder / "mouse_a.czi", 40, pixel_size_um=0.1725)
    write_czi(folder / "mouse_b.czi", 200, pixel_size_um=None)
    (folder / "slide_sheet.csv").write_text("slide,group\nmouse_a,ctrl\n")  # not a slide: ignored
    return folder


def test_load_returns_a_lazy_slide_and_save_is_refused(slide_folder: Path) -> None:
    dataset = CziSlideDataset(filepath=str(slide_folder / "mouse_a.czi"))
    assert dataset.exists()
    slide = dataset.load()
    assert isinstance(slide, CziSlide)
    assert slide.meta.name == "mouse_a" and slide.meta.pixel_size_um == pytest.approx(0.1725)
    assert np.all(slide.read_region(0, 0, 64, 32) == 40)
    slide.close()
    with pytest.raises(DatasetError, match="read-only"):
        dataset.save(slide)
    assert "mouse_a.czi" in str(dataset)


def test_missing_file_does_not_exist_and_fails_with_named_error(tmp_path: Path) -> None:
    dataset = CziSlideDataset(filepath=str(tmp_path / "absent.czi"))
    assert not dataset.exists()
    with pytest.raises(DatasetError) as caught:  # Kedro wraps the loader's error, keeping it as the cause
        dataset.load()
    assert isinstance(caught.value.__cause__, CziSlideError)
    assert "absent.czi" in str(caught.value) and "does not exist" in str(caught.value)


def test_pixel_size_and_load_args_reach_open_slide(slide_folder: Path) -> None:
    dataset = CziSlideDataset(
        filepath=str(slide_folder / "mouse_b.czi"), pixel_size_um=0.2, load_args={"thread_mode": "lock"}
    )
    with dataset.load() as slide:
        assert slide.meta.pixel_size_um == 0.2 and slide.meta.pixel_size_source == "override"
    assert dataset._describe()["load_args"] == {"thread_mode": "lock"}


def test_partitioned_dataset_gives_one_lazy_loader_per_czi(slide_folder: Path) -> None:
    """The catalog entry of conf/base/catalog.yml (`raw_slides`), pointed at a temp folder."""
    catalog = DataCatalog.from_config(
        {
            "raw_slides": {
                "type": "partitions.PartitionedDataset",
                "path": str(slide_folder),
                "filename_suffix": ".czi",
                "dataset": {"type": "mk_hspc.datasets.czi_slides.CziSlideDataset", "pixel_size_um": 0.5},
            }
        }
    )
    loaders = catalog.load("raw_slides")
    assert sorted(loaders) == ["mouse_a", "mouse_b"]
    slides = {name: load() for name, load in loaders.items()}
    assert slides["mouse_a"].meta.pixel_size_source == "metadata"  # calibrated file keeps its own value
    assert (
        slides["mouse_b"].meta.pixel_size_um == 0.5 and slides["mouse_b"].meta.pixel_size_source == "override"
    )
    assert np.all(slides["mouse_b"].read_region(0, 0, 64, 32, scale=0.5) == 200)
    for slide in slides.values():
        slide.close()
