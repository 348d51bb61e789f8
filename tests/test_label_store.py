"""The SQLite label store and the labels contract: durable, idempotent, latest wins, history kept."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from mk_hspc.labels.contract import LabelEvent, LabelFileError, cell_type_of, iso_utc, parse_label_file
from mk_hspc.labels.store import LabelStore

CELL = "S1_s0_r000_c001_mk_00003"


def event(event_id: str, label: str, at: str, annotator: str = "ann", cell: str = CELL) -> LabelEvent:
    return LabelEvent(event_id, cell, label, annotator, iso_utc(at))


def test_wal_and_full_sync(tmp_path: Path) -> None:
    store = LabelStore(tmp_path / "labels.sqlite3")
    assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_retried_event_is_stored_once_and_latest_wins_with_history(tmp_path: Path) -> None:
    path = tmp_path / "labels.sqlite3"
    store = LabelStore(path)
    assert store.record([event("e1", "yes", "2026-01-01T10:00:00Z")], source="t") == {
        "added": 1,
        "duplicates": 0,
    }
    assert store.record([event("e1", "yes", "2026-01-01T10:00:00Z")], source="t") == {
        "added": 0,
        "duplicates": 1,
    }
    store.record([event("e2", "no", "2026-01-01T10:05:00Z")], source="t")
    # A label queued offline and sent late (older click time) does not beat the newer one.
    store.record([event("e3", "unsure", "2026-01-01T10:01:00Z")], source="t")
    store.record([event("e4", "yes", "2026-01-01T09:00:00Z", annotator="other")], source="t")
    store.close()
    reopened = LabelStore(path)
    assert [(r["annotator"], r["label"]) for r in reopened.latest()] == [("ann", "no"), ("other", "yes")]
    assert [h["event_id"] for h in reopened.history(CELL)] == ["e1", "e2", "e3", "e4"]
    assert reopened.payload()["labels"][0] == {
        "cell_id": CELL,
        "label": "no",
        "annotator": "ann",
        "updated_at": "2026-01-01T10:05:00.000000Z",
    }


def test_a_client_clock_ahead_is_clamped_to_the_server_clock(tmp_path: Path) -> None:
    store = LabelStore(tmp_path / "labels.sqlite3")
    store.record([event("e1", "yes", "2099-01-01T00:00:00Z")], source="t")
    store.record([event("e2", "no", "2026-01-01T00:00:00Z")], source="t")
    assert store.latest()[0]["updated_at"] <= iso_utc()


def test_a_failed_transaction_stores_nothing(tmp_path: Path) -> None:
    store = LabelStore(tmp_path / "labels.sqlite3")
    with pytest.raises(sqlite3.IntegrityError):
        store.record(
            [event("e1", "yes", "2026-01-01T10:00:00Z"), event("e2", "maybe", "2026-01-01T10:00:00Z")],
            source="t",
        )
    assert store.count_events() == 0 and store.latest() == []


def test_contract_round_trip_and_cell_type() -> None:
    payload = {
        "version": 1,
        "labels": [
            {"cell_id": CELL, "label": "yes", "annotator": "ann", "updated_at": "2026-01-01T10:00:00Z"}
        ],
    }
    events = parse_label_file(payload, source="f.json")
    assert [(e.cell_id, e.label, e.annotator, e.updated_at) for e in events] == [
        (CELL, "yes", "ann", "2026-01-01T10:00:00.000000Z")
    ]
    assert parse_label_file(payload, source="f.json") == events  # same ids: importing twice adds nothing
    assert cell_type_of(CELL) == "mk" and cell_type_of("a_b_s1_r002_c003_hspc_00012") == "hspc"


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"version": 2, "labels": []}, "version"),
        (
            {
                "version": 1,
                "labels": [
                    {
                        "cell_id": CELL,
                        "label": "maybe",
                        "annotator": "a",
                        "updated_at": "2026-01-01T00:00:00Z",
                    }
                ],
            },
            "maybe",
        ),
        (
            {
                "version": 1,
                "labels": [
                    {"cell_id": "x", "label": "yes", "annotator": "a", "updated_at": "2026-01-01T00:00:00Z"}
                ],
            },
            "cell id",
        ),
        (
            {
                "version": 1,
                "labels": [
                    {"cell_id": CELL, "label": "yes", "annotator": "a", "updated_at": "2026-01-01 00:00"}
                ],
            },
            "time zone",
        ),
        ({"something": 1}, "neither"),
    ],
)
def test_malformed_label_files_are_refused_naming_the_problem(document: object, message: str) -> None:
    with pytest.raises(LabelFileError, match=message):
        parse_label_file(document, source="f.json")
