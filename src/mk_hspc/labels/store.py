"""The SQLite label store behind ``kedro annotate``: every click durable before it is acknowledged.

Tables: ``events`` keeps every label event ever received (the history), unique by the client's event id, so
a retried request adds nothing; ``latest`` holds one row per (cell, annotator): the event with the latest
``updated_at`` (ties: the later arrival). WAL journal with ``synchronous=FULL``: a committed transaction
survives a kill or a power cut, and readers never block the writer.

``updated_at`` is the client's time of the click (so a label queued offline and sent later does not beat a
newer one), clamped to the server's clock so that a client clock running ahead cannot pin a label forever.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mk_hspc.errors import UserError
from mk_hspc.labels.contract import LabelEvent, iso_utc, labels_payload

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL UNIQUE,
    cell_id TEXT NOT NULL,
    label TEXT NOT NULL CHECK (label IN ('yes', 'no', 'unsure')),
    annotator TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    received_at TEXT NOT NULL,
    source TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS latest (
    cell_id TEXT NOT NULL,
    annotator TEXT NOT NULL,
    label TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (cell_id, annotator)
);
"""


class EventConflictError(UserError, ValueError):
    """An event id already stored with other content (cell, label or annotator): a client bug or a reused id.

    Acknowledging it would claim a label was stored that is not; the whole request is refused instead.
    """


class LabelStore:
    """Thread-safe SQLite label store (one connection, serialised by a lock).

    Args:
        path: the database file (created with its folder when missing).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(SCHEMA)

    def record(self, events: Iterable[LabelEvent], *, source: str) -> dict[str, int]:
        """Store events in one transaction (durable on return); already known event ids are skipped.

        Returns:
            ``{"added": n, "duplicates": m}``.

        Raises:
            EventConflictError: an event id is already stored for another cell, label or annotator; nothing
                of this call is stored.
        """
        now = iso_utc()
        added = duplicates = 0
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for event in events:
                    updated_at = min(event.updated_at, now)
                    cursor = self._db.execute(
                        # ON CONFLICT (event_id), not INSERT OR IGNORE: that would also skip CHECK violations.
                        "INSERT INTO events (event_id, cell_id, label, annotator, updated_at, received_at, source)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (event_id) DO NOTHING",
                        (
                            event.event_id,
                            event.cell_id,
                            event.label,
                            event.annotator,
                            updated_at,
                            now,
                            source,
                        ),
                    )
                    if cursor.rowcount == 0:
                        stored = self._db.execute(
                            "SELECT cell_id, label, annotator FROM events WHERE event_id = ?",
                            (event.event_id,),
                        ).fetchone()
                        if tuple(stored) != (event.cell_id, event.label, event.annotator):
                            raise EventConflictError(
                                f"event id {event.event_id[:120]!r} is already stored for {stored[0]} = "
                                f"{stored[1]} by {stored[2]}; a new label needs a new event id"
                            )
                        duplicates += 1  # a retry of a stored event: acknowledged again, stored once
                        continue
                    added += 1
                    self._db.execute(
                        "INSERT INTO latest (cell_id, annotator, label, updated_at, seq) VALUES (?, ?, ?, ?, ?)"
                        " ON CONFLICT (cell_id, annotator) DO UPDATE SET label = excluded.label,"
                        " updated_at = excluded.updated_at, seq = excluded.seq"
                        " WHERE excluded.updated_at >= latest.updated_at",
                        (event.cell_id, event.annotator, event.label, updated_at, cursor.lastrowid),
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return {"added": added, "duplicates": duplicates}

    def latest(self, annotator: str | None = None) -> list[dict[str, str]]:
        """The current label of every (cell, annotator), optionally of one annotator."""
        query = "SELECT cell_id, label, annotator, updated_at FROM latest"
        args: tuple[Any, ...] = ()
        if annotator is not None:
            query += " WHERE annotator = ?"
            args = (annotator,)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY cell_id, annotator", args).fetchall()
        return [dict(zip(("cell_id", "label", "annotator", "updated_at"), row, strict=True)) for row in rows]

    def history(self, cell_id: str) -> list[dict[str, str]]:
        """Every event of a cell, in arrival order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT event_id, label, annotator, updated_at, received_at, source FROM events WHERE cell_id = ? ORDER BY seq",
                (cell_id,),
            ).fetchall()
        names = ("event_id", "label", "annotator", "updated_at", "received_at", "source")
        return [dict(zip(names, row, strict=True)) for row in rows]

    def count_events(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM events").fetchone()[0])

    def payload(self) -> dict[str, Any]:
        """The labels contract document of the current labels (see :mod:`mk_hspc.labels.contract`)."""
        return labels_payload(self.latest())

    def close(self) -> None:
        with self._lock:
            self._db.close()
