"""The labels contract that classification reads, and parsing of label files into label events.

``labels`` (catalog, ``data/05_model_input/labels.json``)::

    {"version": 1, "labels": [{"cell_id": str, "label": "yes" | "no" | "unsure", "annotator": str,
                               "updated_at": ISO-8601 UTC str}, ...]}

one entry per (cell_id, annotator), the latest; sorted by cell id then annotator. The cell type is parsed
from the cell id (:func:`cell_type_of`). Files imported: this same format (also what the static pages'
"Download annotations JSON" writes) and Label Studio's JSON export of the tasks :mod:`mk_hspc.export.interop`
writes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from mk_hspc.errors import UserError

LABELS_VERSION = 1
LABEL_VALUES = ("yes", "no", "unsure")
# Label Studio choice values (the labelling config in README) -> contract label.
LABEL_STUDIO_CHOICES = {"Yes": "yes", "No": "no", "Unsure": "unsure"}
CELL_ID_PATTERN = re.compile(r"^(?P<tile_id>.+_s\d+_r\d+_c\d+)_(?P<cell_type>[a-z0-9]+)_(?P<label>\d{5,})$")
MAX_ANNOTATOR_CHARS = 100


class LabelFileError(UserError, ValueError):
    """A label file or request body that does not follow a supported format; the message says where."""


@dataclass(frozen=True)
class LabelEvent:
    """One label given to one cell by one annotator at one time; ``event_id`` makes retries idempotent."""

    event_id: str
    cell_id: str
    label: str
    annotator: str
    updated_at: str  # ISO-8601 UTC, normalised by :func:`iso_utc`


def cell_type_of(cell_id: str) -> str:
    """``"mk"`` / ``"hspc"`` from ``{tile_id}_{cell_type}_{label:05d}``."""
    match = CELL_ID_PATTERN.match(cell_id)
    if match is None:
        raise LabelFileError(f"cell id {cell_id!r} does not follow '{{tile_id}}_{{cell_type}}_{{label:05d}}'")
    return match["cell_type"]


def iso_utc(value: str | datetime | None = None) -> str:
    """A timestamp as ``YYYY-MM-DDTHH:MM:SS.ffffffZ`` (UTC; these strings sort chronologically).

    Raises:
        LabelFileError: not an ISO-8601 timestamp, or one without a time zone.
    """
    if value is None:
        moment = datetime.now(UTC)
    elif isinstance(value, datetime):
        moment = value
    else:
        try:
            moment = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        except ValueError:
            raise LabelFileError(f"timestamp {value!r} is not ISO-8601") from None
    if moment.tzinfo is None:
        raise LabelFileError(f"timestamp {value!r} has no time zone (write it in UTC, ending in Z)")
    try:
        moment = moment.astimezone(UTC)
    except OverflowError:
        raise LabelFileError(f"timestamp {value!r} is outside the years 1-9999 in UTC") from None
    # The year zero-padded by hand: strftime's %Y writes 999, not 0999, which would sort after 2026.
    return f"{moment.year:04d}" + moment.strftime("-%m-%dT%H:%M:%S.%fZ")


def check_label(label: Any, where: str) -> str:
    if label not in LABEL_VALUES:
        raise LabelFileError(f"{where}: label {label!r} is not one of {', '.join(LABEL_VALUES)}")
    return label


def check_annotator(annotator: Any, where: str) -> str:
    if not isinstance(annotator, str) or not annotator.strip() or len(annotator) > MAX_ANNOTATOR_CHARS:
        raise LabelFileError(
            f"{where}: annotator must be a non-empty string of at most {MAX_ANNOTATOR_CHARS} characters"
        )
    return annotator.strip()


def labels_payload(rows: Iterable[Mapping[str, str]]) -> dict[str, Any]:
    """The contract document from rows with cell_id, label, annotator, updated_at (latest per pair)."""
    entries = [
        {
            "cell_id": r["cell_id"],
            "label": r["label"],
            "annotator": r["annotator"],
            "updated_at": r["updated_at"],
        }
        for r in rows
    ]
    entries.sort(key=lambda e: (e["cell_id"], e["annotator"]))
    return {"version": LABELS_VERSION, "labels": entries}


def parse_label_file(document: Any, *, source: str) -> list[LabelEvent]:
    """Label events from a contract document or a Label Studio JSON export.

    Event ids are derived from the content (source kind, cell, annotator, time, label), so importing the
    same file twice adds nothing.

    Raises:
        LabelFileError: the document is neither format, or an entry is malformed (names the entry).
    """
    if isinstance(document, dict) and "labels" in document:
        return _parse_contract(document, source)
    if isinstance(document, list):
        return _parse_label_studio(document, source)
    raise LabelFileError(
        f"{source}: neither a labels file ({{'version': 1, 'labels': [...]}}) nor a Label Studio JSON export (a list of tasks)"
    )


def _parse_contract(document: dict[str, Any], source: str) -> list[LabelEvent]:
    if document.get("version") != LABELS_VERSION:
        raise LabelFileError(f"{source}: version {document.get('version')!r} is not {LABELS_VERSION}")
    if not isinstance(document["labels"], list):
        raise LabelFileError(f"{source}: 'labels' must be a list")
    events = []
    for index, entry in enumerate(document["labels"]):
        where = f"{source}: labels[{index}]"
        if not isinstance(entry, dict) or not {"cell_id", "label", "annotator", "updated_at"} <= set(entry):
            raise LabelFileError(f"{where} needs cell_id, label, annotator and updated_at")
        cell_id = _cell_id(entry["cell_id"], where)
        label = check_label(entry["label"], where)
        annotator = check_annotator(entry["annotator"], where)
        updated_at = _given_time(entry["updated_at"], f"{where}.updated_at")
        events.append(
            LabelEvent(
                content_event_id("file", cell_id, annotator, updated_at, label),
                cell_id,
                label,
                annotator,
                updated_at,
            )
        )
    return events


def content_event_id(kind: str, *content: str) -> str:
    """An event id made of its content, unambiguous whatever the parts hold (a JSON list, not ``a:b:c``)."""
    return f"{kind}:{json.dumps(list(content), ensure_ascii=False, separators=(',', ':'))}"


def _given_time(value: Any, where: str) -> str:
    """An imported label's own time, required: "now" would let an old label beat newer ones (and make every
    re-import of the file a new event)."""
    if not isinstance(value, str) or not value:
        raise LabelFileError(
            f"{where}: a label needs the time it was given (an ISO-8601 string), got {value!r}"
        )
    try:
        return iso_utc(value)
    except LabelFileError as exc:
        raise LabelFileError(f"{where}: {exc}") from None


def _cell_id(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise LabelFileError(f"{where}: cell_id must be a string")
    cell_type_of(value)
    return value


def _parse_label_studio(tasks: list[Any], source: str) -> list[LabelEvent]:
    events = []
    for index, task in enumerate(tasks):
        where = f"{source}: task[{index}]"
        if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
            raise LabelFileError(f"{where} is not a Label Studio task (no 'data')")
        cell_id = _cell_id(task["data"].get("cell_id"), where + ".data")
        annotations = task.get("annotations") or []
        if not isinstance(annotations, list):
            raise LabelFileError(f"{where}.annotations must be a list")
        for number, annotation in enumerate(annotations):
            at = f"{where}.annotations[{number}]"
            if not isinstance(annotation, dict) or annotation.get("was_cancelled"):
                continue
            choices = _choices(annotation, at)
            if not choices:
                continue
            if len(choices) > 1 or choices[0] not in LABEL_STUDIO_CHOICES:
                raise LabelFileError(
                    f"{at}: choices {choices!r} are not one of {', '.join(LABEL_STUDIO_CHOICES)}"
                )
            user = annotation.get("completed_by")
            if isinstance(user, dict):
                user = user.get("email") or user.get("id")
            annotator = check_annotator(f"labelstudio:{user}", at)
            updated_at = _given_time(
                annotation.get("updated_at") or annotation.get("created_at"), f"{at}.updated_at"
            )
            label = LABEL_STUDIO_CHOICES[choices[0]]
            events.append(
                LabelEvent(
                    content_event_id("ls", cell_id, annotator, updated_at, label),
                    cell_id,
                    label,
                    annotator,
                    updated_at,
                )
            )
    return events


def _choices(annotation: dict[str, Any], at: str) -> list[Any]:
    """The chosen values of an annotation's ``choices`` results (checked shapes: a clear error, not a crash)."""
    results = annotation.get("result") or []
    if not isinstance(results, list):
        raise LabelFileError(f"{at}.result must be a list")
    chosen: list[Any] = []
    for index, result in enumerate(results):
        if not isinstance(result, dict) or result.get("type") != "choices":
            continue
        value = result.get("value") or {}
        choices = value.get("choices") if isinstance(value, dict) else None
        if not isinstance(value, dict) or not isinstance(choices or [], list):
            raise LabelFileError(
                f"{at}.result[{index}].value must be {{'choices': [...]}}, got {value!r:.80}"
            )
        for choice in choices or []:
            if not isinstance(choice, str):
                raise LabelFileError(f"{at}.result[{index}]: choice {choice!r:.80} is not a string")
            chosen.append(choice)
    return chosen
