"""The slide sheet checked against the study's slides: one group per slide, or a named error / warning."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import pytest
from kedro.io import DataCatalog
from kedro.io.core import DatasetError

from mk_hspc.datasets.slide_sheet import SlideSheetDataset
from mk_hspc.pipelines.ingestion.nodes import make_slide_groups
from mk_hspc.slide_sheet import SlideSheetError, validate_slide_sheet
from tests.conftest import catalog_entry

SLIDES = ["lab01", "lab02", "lab03"]
PATH = "data/01_raw/slide_sheet.csv"


def sheet(*rows: tuple[str, str]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["slide", "group"])


def check(table: pd.DataFrame | None, strict: bool = True) -> pd.DataFrame:
    return validate_slide_sheet(table, SLIDES, sheet_path=PATH, strict=strict)


def test_one_row_per_slide_sorted_extra_columns_and_blanks_ignored() -> None:
    table = sheet(("lab02", " treated "), ("lab01", "control"), ("lab03", "NA")).assign(sex=["F", "M", "F"])
    groups = check(table)
    assert groups.to_dict("list") == {
        "slide": ["lab01", "lab02", "lab03"],
        "group": ["control", "treated", "NA"],
    }


def test_conflicting_duplicate_is_an_error_naming_slide_and_rows_even_when_lenient() -> None:
    table = sheet(("lab01", "control"), ("lab02", "treated"), ("lab03", "control"), ("lab02", "control"))
    for strict in (True, False):
        with pytest.raises(SlideSheetError, match=r"'lab02'.*\['control', 'treated'\].*rows 3, 5"):
            check(table, strict=strict)


def test_identical_duplicate_is_counted_once_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    table = sheet(("lab01", "control"), ("lab02", "treated"), ("lab01", "control"), ("lab03", "control"))
    with caplog.at_level(logging.WARNING, logger="mk_hspc.slide_sheet"):
        groups = check(table)
    assert groups["slide"].tolist() == SLIDES and groups.loc[0, "group"] == "control"
    assert "'lab01' 2 times" in caplog.text


def test_strict_names_every_problem_in_one_error() -> None:
    table = sheet(("lab01", "control"), ("LAB02", "treated"), ("lab03", ""), ("lab09", "control"))
    with pytest.raises(SlideSheetError) as caught:
        check(table)
    message = str(caught.value)
    assert PATH in message
    assert "'LAB02' (row 3) is not a slide of the study (did you mean 'lab02'?)" in message
    assert "'lab09' (row 5) is not a slide of the study" in message
    assert "'lab02' has no row" in message
    assert "'lab03' has an empty group" in message
    assert "slide_sheet_strict: false" in message


def test_lenient_warns_per_slide_and_leaves_them_ungrouped(caplog: pytest.LogCaptureFixture) -> None:
    table = sheet(("lab01", "control"), ("lab03", ""), ("lab09", "control"))
    with caplog.at_level(logging.WARNING, logger="mk_hspc.slide_sheet"):
        groups = check(table, strict=False)
    assert groups["group"].tolist() == ["control", "ungrouped", "ungrouped"]
    warned = [record.getMessage() for record in caplog.records]
    assert len(warned) == 3
    assert any("'lab02' has no row" in text for text in warned)
    assert any("'lab03' has an empty group" in text for text in warned)
    assert any("'lab09' (row 4) is not a slide" in text for text in warned)


def test_missing_sheet_is_an_error_when_strict_and_all_ungrouped_otherwise(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with pytest.raises(SlideSheetError, match=f"{PATH} does not exist"):
        check(None)
    with caplog.at_level(logging.WARNING, logger="mk_hspc.slide_sheet"):
        groups = check(None, strict=False)
    assert groups["group"].tolist() == ["ungrouped"] * 3
    assert "lab01, lab02, lab03" in caplog.text


def test_missing_columns_name_the_file_and_the_columns() -> None:
    table = pd.DataFrame({"name": ["lab01"], "cohort": ["x"]})
    for strict in (True, False):
        with pytest.raises(SlideSheetError, match=r"slide_sheet.csv lacks column\(s\) \['slide', 'group'\]"):
            check(table, strict=strict)


def test_catalog_sheet_is_text_and_none_when_missing(tmp_path: Path) -> None:
    csv = tmp_path / "slide_sheet.csv"
    catalog = DataCatalog.from_config({"slide_sheet": catalog_entry("slide_sheet", filepath=str(csv))})
    assert catalog.load("slide_sheet") is None
    csv.write_text("slide,group\nlab01,NA\nlab02,\n")
    loaded = catalog.load("slide_sheet")
    assert loaded.to_dict("list") == {"slide": ["lab01", "lab02"], "group": ["NA", ""]}
    with pytest.raises(DatasetError, match="read-only"):
        SlideSheetDataset(filepath=str(csv)).save(loaded)


def test_node_checks_the_sheet_against_slide_meta() -> None:
    slide_meta = {name: {} for name in SLIDES}
    table = sheet(("lab01", "a"), ("lab02", "b"), ("lab03", "a"))
    groups = make_slide_groups(table, slide_meta, True, PATH)
    assert groups.to_dict("list") == {"slide": SLIDES, "group": ["a", "b", "a"]}
    with pytest.raises(SlideSheetError, match="'lab03' has no row"):
        make_slide_groups(table.iloc[:2], slide_meta, True, PATH)
