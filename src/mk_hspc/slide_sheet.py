"""The slide sheet (slide -> group), checked against the study's slides: one group per slide, or a named error.

A lab writes the sheet by hand, so every way it can disagree with the slides folder is reported by slide
name: a slide listed twice with different groups is always an error (it would be counted in two groups);
the same row twice is harmless and only warned about. Rows naming no slide of the study, slides without a
row or with an empty group, and a missing sheet are errors when ``strict`` and warnings otherwise, the
slides concerned then counting as ``"ungrouped"``.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Iterable

import pandas as pd

from mk_hspc.errors import UserError

logger = logging.getLogger(__name__)

UNGROUPED = "ungrouped"
REQUIRED_COLUMNS = ("slide", "group")
_STRICT_KEY = "ingestion.slide_sheet_strict"


class SlideSheetError(UserError, ValueError):
    """The slide sheet cannot give every slide exactly one group; the message names the file and slides."""


def _row(position: int) -> int:
    """Spreadsheet row number of a data row (row 1 is the header), as a lab sees it in Excel."""
    return position + 2


def _did_you_mean(name: str, slides: list[str]) -> str:
    by_case = [slide for slide in slides if slide.casefold() == name.casefold()]
    close = by_case or difflib.get_close_matches(name, slides, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def validate_slide_sheet(
    sheet: pd.DataFrame | None, slides: Iterable[str], *, sheet_path: str, strict: bool
) -> pd.DataFrame:
    """Exactly one group per slide of the study, from the lab's sheet.

    Args:
        sheet: The sheet as read (columns ``slide`` and ``group`` at least, extra columns ignored), or None
            when the file does not exist. Names and groups are compared after stripping blanks.
        slides: The study's slide names (file stems).
        sheet_path: Where the sheet is (or should be), to name it in messages.
        strict: Make unknown rows, slides without a (non-empty) group and a missing sheet errors; when
            False they are logged as warnings, one per slide, and such slides get group ``"ungrouped"``.

    Returns:
        Columns ``slide`` and ``group``, one row per slide of ``slides``, sorted by slide.

    Raises:
        SlideSheetError: a column is missing; a slide is listed with two different groups; with
            ``strict``, any of the problems above (all of them in one message).

    Example:
        >>> sheet = pd.DataFrame({"slide": ["a", "b"], "group": ["ctrl", "treated"]})
        >>> validate_slide_sheet(sheet, ["b", "a"], sheet_path="sheet.csv", strict=True)
          slide    group
        0     a     ctrl
        1     b  treated
    """
    study = sorted(set(slides))
    if sheet is None:
        problems = [f"{sheet_path} does not exist, so no slide has a group ({', '.join(study)})"]
        _report(problems, sheet_path, strict)
        return pd.DataFrame({"slide": study, "group": [UNGROUPED] * len(study)}, dtype=object)

    missing = [column for column in REQUIRED_COLUMNS if column not in sheet.columns]
    if missing:
        raise SlideSheetError(
            f"Slide sheet {sheet_path} lacks column(s) {missing}; it needs columns 'slide' and 'group' "
            f"(it has {list(sheet.columns)})"
        )
    rows = pd.DataFrame(
        {column: sheet[column].fillna("").astype(str).str.strip().to_numpy() for column in REQUIRED_COLUMNS}
    )
    rows["row"] = [_row(position) for position in range(len(rows))]
    rows = rows[(rows["slide"] != "") | (rows["group"] != "")]  # rows of empty cells, as spreadsheets export

    conflicts, problems = [], []
    group_of: dict[str, str] = {}
    for slide, listed in rows.groupby("slide", sort=True):
        numbers = ", ".join(str(row) for row in listed["row"])
        groups = sorted(set(listed["group"]))
        if len(groups) > 1:
            conflicts.append(f"slide {slide!r} is listed with groups {groups} (rows {numbers})")
        elif len(listed) > 1:
            logger.warning(
                "Slide sheet %s lists slide %r %d times with the same group (rows %s); counting it once",
                sheet_path,
                slide,
                len(listed),
                numbers,
            )
        group_of[str(slide)] = groups[0]
    if conflicts:
        raise SlideSheetError(
            f"Slide sheet {sheet_path}: {'; '.join(conflicts)}; a slide can be in one group only"
        )

    for slide in sorted(set(group_of) - set(study)):
        numbers = ", ".join(str(row) for row in rows.loc[rows["slide"] == slide, "row"])
        if slide:
            hint = _did_you_mean(slide, study)
            problems.append(f"slide {slide!r} (row {numbers}) is not a slide of the study{hint}")
        else:
            problems.append(f"row {numbers} has no slide name")
    for slide in study:
        if slide not in group_of:
            problems.append(f"slide {slide!r} has no row")
        elif not group_of[slide]:
            problems.append(f"slide {slide!r} has an empty group")
    _report(problems, sheet_path, strict)

    groups = [group_of.get(slide) or UNGROUPED for slide in study]
    return pd.DataFrame({"slide": study, "group": groups}, dtype=object)


def _report(problems: list[str], sheet_path: str, strict: bool) -> None:
    if not problems:
        return
    if strict:
        raise SlideSheetError(
            f"Slide sheet {sheet_path}: {'; '.join(problems)}. Fix the sheet (columns slide, group; a slide "
            f"is its file stem), or set {_STRICT_KEY}: false to run with such slides {UNGROUPED!r}"
        )
    for problem in problems:
        logger.warning(
            "Slide sheet %s: %s (slides without a group count as %r)", sheet_path, problem, UNGROUPED
        )
