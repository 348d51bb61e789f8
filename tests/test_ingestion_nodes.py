"""Ingestion nodes called directly on small files: the demo guard, bad slides, calibration, closing slides."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mk_hspc.czi import CziSlide, CziSlideError
from mk_hspc.datasets.slide_folder import SlideFolderDataset
from mk_hspc.demo import DemoSpec
from mk_hspc.pipelines.ingestion.nodes import (
    make_tile_index,
    make_tissue_maps,
    prepare_demo_slides,
    read_slide_metadata,
)
from tests.conftest import corrupt_first_subblock, write_czi

TINY_DEMO = {
    "n_slides": 1,
    "width_px": 700,
    "height_px": 600,
    "tile_px": 256,
    "hspc_n_variants": 40,
}


def demo_params(raw: Path, **changes: Any) -> dict[str, Any]:
    return {
        "generate_if_empty": True,
        "out_dir": str(raw),
        "slide_sheet": str(raw / "slide_sheet.csv"),
        "spec": "small",
        "overrides": TINY_DEMO,
    } | changes


# ---------------------------------------------------------------------------------------- demo guard
def test_upper_case_lab_slide_is_a_study_and_its_sheet_is_left_alone(tmp_path: Path) -> None:
    raw = tmp_path / "01_raw"
    write_czi(raw / "slides" / "LAB01.CZI", 90, pixel_size_um=0.25)
    sheet = raw / "slide_sheet.csv"
    sheet.write_text("slide,group\nLAB01,control\n")

    manifest = prepare_demo_slides(demo_params(raw), str(raw / "slides"))

    assert manifest == {"slides_dir": str(raw / "slides")}
    assert sheet.read_text() == "slide,group\nLAB01,control\n"
    assert sorted(p.name for p in (raw / "slides").iterdir()) == ["LAB01.CZI"]


def test_folder_with_files_but_no_slides_is_an_error_not_a_demo(tmp_path: Path) -> None:
    raw = tmp_path / "01_raw"
    (raw / "slides").mkdir(parents=True)
    (raw / "slides" / "LAB01.ndpi").write_bytes(b"another scanner's format")

    with pytest.raises(FileExistsError, match=r"not empty.*LAB01\.ndpi"):
        prepare_demo_slides(demo_params(raw), str(raw / "slides"))
    assert sorted(p.name for p in (raw / "slides").iterdir()) == ["LAB01.ndpi"]
    assert not (raw / "slide_sheet.csv").exists()


def test_demo_never_replaces_a_labs_slide_sheet(tmp_path: Path) -> None:
    raw = tmp_path / "01_raw"
    (raw / "slides").mkdir(parents=True)
    (raw / "slides" / ".DS_Store").write_bytes(b"\0")  # hidden files do not make a folder non-empty
    sheet = raw / "slide_sheet.csv"
    sheet.write_text("slide,group\nLAB01,control\n")

    with pytest.raises(FileExistsError, match="slide_sheet.csv"):
        prepare_demo_slides(demo_params(raw), str(raw / "slides"))
    assert sheet.read_text() == "slide,group\nLAB01,control\n"
    assert not list((raw / "slides").glob("*.czi"))


def test_empty_folder_gets_the_demo_and_a_rerun_keeps_it(tmp_path: Path) -> None:
    raw = tmp_path / "01_raw"
    first = prepare_demo_slides(demo_params(raw), str(raw / "slides"))
    assert first == {"slides_dir": str(raw / "slides")}
    assert (raw / "slides" / "demo_01.czi").is_file() and (raw / "slide_sheet.csv").is_file()
    written = (raw / "slides" / "demo_01.czi").stat().st_mtime_ns
    again = prepare_demo_slides(demo_params(raw), str(raw / "slides"))
    assert again == first  # the same record: downstream lineage does not change on a rerun
    assert (raw / "slides" / "demo_01.czi").stat().st_mtime_ns == written


def test_interrupted_demo_leftovers_do_not_block_the_demo(tmp_path: Path) -> None:
    """A run stopped while writing its first slide leaves only the demo's own temporary file behind."""
    from mk_hspc.demo.writer import MANIFEST_NAME, _write_manifest

    raw = tmp_path / "01_raw"
    (raw / "slides").mkdir(parents=True)
    (raw / "slides" / "demo_01.czi.part").write_bytes(b"half a slide")
    spec = dataclasses.replace(DemoSpec.small(), **TINY_DEMO)
    pending = {"generator_version": "1", "spec": spec.to_dict(), "complete": False}
    _write_manifest(raw / MANIFEST_NAME, pending | {"files": {"slides/demo_01.czi.part": None}})

    assert prepare_demo_slides(demo_params(raw), str(raw / "slides")) == {"slides_dir": str(raw / "slides")}
    assert sorted(p.name for p in (raw / "slides").iterdir()) == ["demo_01.czi"]


def test_demo_sheet_must_be_the_sheet_the_catalog_reads(tmp_path: Path) -> None:
    raw = tmp_path / "01_raw"
    with pytest.raises(ValueError, match=r"elsewhere\.csv"):
        prepare_demo_slides(
            demo_params(raw, slide_sheet=str(tmp_path / "elsewhere.csv")), str(raw / "slides")
        )
    assert not (raw / "slides").exists()


# ---------------------------------------------------------------------------------------- bad slides
def ingestion_params(slides_dir: Path, **changes: Any) -> dict[str, Any]:
    return {
        "slides_dir": str(slides_dir),
        "skip_bad_slides": False,
        "plausible_pixel_size_um": [0.05, 6.0],
        "tissue": {"map_um_per_px": 4.0, "fill_holes_max_um2": 1000.0, "min_object_um2": 100.0},
        "tiles": {"tile_px": 128, "largest_cell_um": 10.0, "min_tissue_fraction": 0.15},
    } | changes


@pytest.fixture
def zstd_study(tmp_path: Path) -> Path:
    """Three compressed slides; lab02's first subblock is corrupt (it opens, but cannot be read)."""
    folder = tmp_path / "slides"
    for name, value in (("lab01", 150), ("lab02", 160), ("lab03", 170)):
        write_czi(folder / f"{name}.czi", value, 0.5, size_px=256, compression="zstd1:ExplicitLevel=1")
    corrupt_first_subblock(folder / "lab02.czi")
    return folder


def test_slide_failing_while_read_is_skipped_by_the_tissue_stage(
    zstd_study: Path, caplog: pytest.LogCaptureFixture
) -> None:
    loaders = SlideFolderDataset(path=str(zstd_study)).load()
    params = ingestion_params(zstd_study, skip_bad_slides=True)
    meta = read_slide_metadata(loaders, {}, params)
    assert sorted(meta) == ["lab01", "lab02", "lab03"]  # the corrupt subblock is only found by reading

    with caplog.at_level(logging.WARNING):
        maps, calibration = make_tissue_maps(loaders, meta, params)

    assert sorted(maps) == ["lab01", "lab03"]
    assert calibration["n_slides"] == 2 and isinstance(calibration["threshold_od"], float)
    assert list(calibration["skipped_slides"]) == ["lab02"]
    assert "lab02.czi" in calibration["skipped_slides"]["lab02"]
    assert "Skipping slide lab02" in caplog.text
    tiles = make_tile_index(meta, {name: (lambda m=m: m) for name, m in maps.items()}, params)
    assert set(tiles["slide"]) == {"lab01", "lab03"}


def test_slide_failing_while_read_stops_the_run_naming_it_by_default(zstd_study: Path) -> None:
    loaders = SlideFolderDataset(path=str(zstd_study)).load()
    params = ingestion_params(zstd_study)
    meta = read_slide_metadata(loaders, {}, params)
    with pytest.raises(CziSlideError) as caught:
        make_tissue_maps(loaders, meta, params)
    assert caught.value.path == str(zstd_study / "lab02.czi")


# ---------------------------------------------------------------------------------------- closing slides
def recording(loaders: dict[str, Callable[[], CziSlide]]) -> tuple[dict[str, Callable[[], CziSlide]], list]:
    """The same loaders, remembering every slide they open."""
    opened: list[CziSlide] = []

    def wrap(load: Callable[[], CziSlide]) -> Callable[[], CziSlide]:
        def open_and_record() -> CziSlide:
            slide = load()
            opened.append(slide)
            return slide

        return open_and_record

    return {name: wrap(load) for name, load in loaders.items()}, opened


def assert_all_closed(slides: list[CziSlide]) -> None:
    assert slides
    for slide in slides:
        with pytest.raises(CziSlideError, match="closed"):
            slide.read_region(0, 0, 8, 8)


def test_slides_opened_before_a_bad_one_are_closed(zstd_study: Path) -> None:
    (zstd_study / "lab02b.czi").write_text("not a CZI")
    loaders, opened = recording(SlideFolderDataset(path=str(zstd_study)).load())
    with pytest.raises(CziSlideError, match="lab02b"):
        read_slide_metadata(loaders, {}, ingestion_params(zstd_study))
    assert len(opened) == 2  # lab01 and lab02 opened before lab02b failed
    assert_all_closed(opened)


def test_slides_are_closed_when_the_tissue_stage_fails_and_when_it_succeeds(zstd_study: Path) -> None:
    loaders, opened = recording(SlideFolderDataset(path=str(zstd_study)).load())
    meta = read_slide_metadata(loaders, {}, ingestion_params(zstd_study))
    assert_all_closed(opened)
    opened.clear()
    with pytest.raises(CziSlideError, match="lab02"):
        make_tissue_maps(loaders, meta, ingestion_params(zstd_study))
    assert len(opened) == 3
    assert_all_closed(opened)
    opened.clear()
    make_tissue_maps(loaders, meta, ingestion_params(zstd_study, skip_bad_slides=True))
    assert_all_closed(opened)


@pytest.mark.parametrize("exists", [False, True])
def test_a_lab_slides_folder_without_slides_names_the_folder_not_the_demo(
    tmp_path: Path, exists: bool
) -> None:
    """globals: slides_dir pointing at a missing (typo, unmounted share) or empty folder said
    'demo.out_dir/slides ... must be the slides folder', which points a lab at the demo."""
    raw = tmp_path / "raw"
    lab = tmp_path / "scanner" / "study1"
    if exists:
        lab.mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=("holds no .czi" if exists else "does not exist")) as refused:
        prepare_demo_slides(demo_params(raw), str(lab))
    assert str(lab) in str(refused.value) and "slides_dir" in str(refused.value)


def test_a_grey_fluorescence_slide_is_a_bad_slide_named_or_skipped(tmp_path: Path, shared_data: Path) -> None:
    """A Gray16 fluorescence mosaic was accepted: its dark background scored as tissue (a 100 % map) and,
    pooled into the one study threshold, moved a brightfield slide's tissue share from 42 % to 0 %."""
    import shutil

    from mk_hspc.pipelines.ingestion.nodes import open_slides

    folder = tmp_path / "slides"
    folder.mkdir()
    shutil.copy(shared_data / "aicspylibczi" / "RGB-multichannel.czi", folder / "bright.czi")
    shutil.copy(shared_data / "aicspylibczi" / "mosaic_test.czi", folder / "fluo.czi")
    loaders = SlideFolderDataset(path=str(folder)).load()
    with (
        pytest.raises(CziSlideError, match=r"fluo\.czi.*Gray16.*brightfield RGB"),
        open_slides(loaders, False),
    ):
        pass
    with open_slides(loaders, skip_bad_slides=True) as slides:
        assert sorted(slides) == ["bright"]
