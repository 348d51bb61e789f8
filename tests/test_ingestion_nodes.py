"""Ingestion nodes called directly on small files: the demo guard, bad slides, calibration, closing slides."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from mk_hspc.demo import DemoSpec
from mk_hspc.pipelines.ingestion.nodes import prepare_demo_slides
from tests.conftest import write_czi

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

    assert manifest["generated"] is False
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
    assert first == {"generated": True, "out_dir": str(raw), "n_slides": 1}
    assert (raw / "slides" / "demo_01.czi").is_file() and (raw / "slide_sheet.csv").is_file()
    again = prepare_demo_slides(demo_params(raw), str(raw / "slides"))
    assert again["generated"] is False


def test_interrupted_demo_leftovers_do_not_block_the_demo(tmp_path: Path) -> None:
    """A run stopped while writing its first slide leaves only the demo's own temporary file behind."""
    from mk_hspc.demo.writer import MANIFEST_NAME, _write_manifest

    raw = tmp_path / "01_raw"
    (raw / "slides").mkdir(parents=True)
    (raw / "slides" / "demo_01.czi.part").write_bytes(b"half a slide")
    spec = dataclasses.replace(DemoSpec.small(), **TINY_DEMO)
    pending = {"generator_version": "1", "spec": spec.to_dict(), "complete": False}
    _write_manifest(raw / MANIFEST_NAME, pending | {"files": {"slides/demo_01.czi.part": None}})

    assert prepare_demo_slides(demo_params(raw), str(raw / "slides"))["generated"] is True
    assert sorted(p.name for p in (raw / "slides").iterdir()) == ["demo_01.czi"]


def test_demo_sheet_must_be_the_sheet_the_catalog_reads(tmp_path: Path) -> None:
    raw = tmp_path / "01_raw"
    with pytest.raises(ValueError, match=r"elsewhere\.csv"):
        prepare_demo_slides(
            demo_params(raw, slide_sheet=str(tmp_path / "elsewhere.csv")), str(raw / "slides")
        )
    assert not (raw / "slides").exists()
