"""Label API edges: reused event ids, annotator names with colons, malformed imports and timestamps, a
cross-site export request, overlapping saves of the labels dataset."""

from __future__ import annotations

from pathlib import Path

import pytest
from starlette.testclient import TestClient

from mk_hspc.annotate.app import create_app
from mk_hspc.datasets.annotation import AnnotationSite
from mk_hspc.labels.contract import LabelFileError, parse_label_file
from mk_hspc.labels.store import LabelStore

A = "S1_s0_r000_c000_mk_00001"
B = "S1_s0_r000_c000_mk_00002"


@pytest.fixture
def server(tmp_path: Path):
    root = tmp_path / "site"
    root.mkdir()
    (root / "index.html").write_text("<!doctype html>")
    site = AnnotationSite(
        root, {A: ("S1", "mk", "pages/mk/0001.html"), B: ("S1", "mk", "pages/mk/0001.html")}
    )
    store = LabelStore(tmp_path / "labels.sqlite3")
    saved: list = []
    app = create_app(
        site,
        store,
        default_annotator="ann",
        save_labels=lambda p: saved.append(p) or "labels.json",
        max_body_bytes=65536,
        max_import_bytes=1_000_000,
    )
    return TestClient(app, raise_server_exceptions=False), store, saved


def post(client, events, annotator="ann"):
    return client.post("/api/labels", json={"annotator": annotator, "events": events})


def test_reused_event_id_with_different_content_is_refused_not_silently_acked(server) -> None:
    client, store, _ = server
    assert post(client, [{"event_id": "e1", "cell_id": A, "label": "yes"}]).status_code == 200
    # Same event id, different label: a client bug or a collision. The promise: a clear 4xx, nothing changed.
    # Today: 200 {"acked": ["e1"]} while the label stays "yes" -> an acknowledged click that is not stored.
    reply = post(client, [{"event_id": "e1", "cell_id": A, "label": "no"}])
    assert reply.status_code in (409, 422), reply.json()


def test_duplicate_event_id_with_different_content_in_one_request_is_refused(server) -> None:
    client, store, _ = server
    reply = post(
        client,
        [{"event_id": "e1", "cell_id": A, "label": "yes"}, {"event_id": "e1", "cell_id": B, "label": "no"}],
    )
    # Today: 200, both "acked", but B's label is dropped.
    assert reply.status_code in (409, 422) or {r["cell_id"] for r in store.latest()} == {A, B}


def test_acks_name_the_event_ids_sent_when_the_annotator_has_a_colon(server) -> None:
    client, store, _ = server
    reply = post(client, [{"event_id": "uuid-1", "cell_id": A, "label": "yes"}], annotator="lab:alice")
    assert reply.status_code == 200
    # The page drops from its queue only the ids it finds in "acked" (app.js flush): today the reply is
    # ["alice:uuid-1"], so the page resends the event forever in a tight loop.
    assert reply.json()["acked"] == ["uuid-1"]


def test_event_ids_of_different_annotators_do_not_collide(server) -> None:
    client, store, _ = server
    assert post(client, [{"event_id": "b:c", "cell_id": A, "label": "yes"}], annotator="a").status_code == 200
    reply = post(client, [{"event_id": "c", "cell_id": B, "label": "no"}], annotator="a:b")
    assert reply.status_code == 200
    # Both "a" + "b:c" and "a:b" + "c" are stored as event id "a:b:c": the second click is acked, not stored.
    assert {(r["cell_id"], r["annotator"]) for r in store.latest()} == {(A, "a"), (B, "a:b")}


def test_deeply_nested_json_body_gets_a_4xx_not_a_500(server) -> None:
    client, store, _ = server
    reply = client.post("/api/labels", content=b"[" * 60000, headers={"content-type": "application/json"})
    assert 400 <= reply.status_code < 500, reply.status_code  # today: 500 (RecursionError escapes)


@pytest.mark.parametrize(
    "annotation",
    [
        {
            "completed_by": 1,
            "updated_at": "2026-01-01T00:00:00Z",
            "result": [{"type": "choices", "value": ["Yes"]}],
        },
        {
            "completed_by": 1,
            "updated_at": "2026-01-01T00:00:00Z",
            "result": [{"type": "choices", "value": {"choices": 5}}],
        },
        {
            "completed_by": 1,
            "updated_at": "2026-01-01T00:00:00Z",
            "result": [{"type": "choices", "value": {"choices": [["Yes"]]}}],
        },
    ],
    ids=["value-is-a-list", "choices-is-a-number", "choice-is-a-list"],
)
def test_malformed_label_studio_import_gets_a_4xx_not_a_500(server, annotation) -> None:
    client, store, _ = server
    document = [{"data": {"cell_id": A}, "annotations": [annotation]}]
    reply = client.post("/api/import", json=document)
    assert reply.status_code == 422, reply.status_code  # today: 500 (AttributeError / TypeError)
    assert store.count_events() == 0


def test_label_file_with_wrong_types_raises_label_file_error() -> None:
    # `kedro annotate import` catches ValueError only: anything else is a traceback, not a clear message.
    document = [{"data": {"cell_id": A}, "annotations": 3}]
    with pytest.raises(LabelFileError):
        parse_label_file(document, source="f.json")


def test_contract_entry_with_null_updated_at_is_refused() -> None:
    # A labels file entry "updated_at": null is taken as *now* (iso_utc(None)): the label silently gets the
    # import time (beating newer labels) and a new event id on every import.
    document = {
        "version": 1,
        "labels": [{"cell_id": A, "label": "yes", "annotator": "x", "updated_at": None}],
    }
    with pytest.raises(LabelFileError):
        parse_label_file(document, source="f.json")


def test_label_studio_annotation_without_times_is_refused(server) -> None:
    """Without its own time an imported label got the import time: it beat newer labels, and every re-import
    of the file added it again (the time is part of an imported event's id)."""
    client, store, _ = server
    document = [
        {
            "data": {"cell_id": A},
            "annotations": [
                {"completed_by": 1, "result": [{"type": "choices", "value": {"choices": ["Yes"]}}]}
            ],
        }
    ]
    reply = client.post("/api/import", json=document)
    assert reply.status_code == 422 and "annotations[0].updated_at" in reply.json()["error"]
    assert store.count_events() == 0
    with_time = [
        {
            **document[0],
            "annotations": [{**document[0]["annotations"][0], "created_at": "2026-01-01T00:00:00Z"}],
        }
    ]
    assert client.post("/api/import", json=with_time).json()["added"] == 1
    assert client.post("/api/import", json=with_time).json() == {"events": 1, "added": 0, "duplicates": 1}


def test_a_timestamp_before_year_1000_does_not_count_as_the_newest(server) -> None:
    client, store, _ = server
    post(client, [{"event_id": "new", "cell_id": A, "label": "yes", "time": "2026-01-01T00:00:00Z"}])
    post(client, [{"event_id": "old", "cell_id": A, "label": "no", "time": "0999-01-01T00:00:00Z"}])
    # iso_utc writes year 999 as "999-..." (strftime %Y, unpadded): it sorts after "2026-..." and is then
    # clamped to the server's clock, so the oldest click wins.
    assert store.latest()[0]["label"] == "yes", store.history(A)


def test_export_cannot_be_triggered_by_another_site(server) -> None:
    client, store, saved = server
    # A cross-site page can send this without a preflight (fetch mode no-cors, or a <form method=post>).
    reply = client.post(
        "/api/export", headers={"origin": "http://evil.example", "content-type": "text/plain"}
    )
    assert reply.status_code in (403, 415) and saved == []


def test_two_overlapping_saves_of_the_labels_dataset_both_succeed(tmp_path: Path, monkeypatch) -> None:
    """`POST /api/export` runs `catalog.save("labels")` in Starlette's thread pool, and `kedro annotate export`
    may run beside the server: two saves of the same AtomicDataset overlap. Without a lock the second one's
    cleanup of leftovers deleted the first one's temporary file, and the first save failed."""
    import threading

    import mk_hspc.datasets.atomic as atomic

    final = tmp_path / "labels.json"
    first = atomic.AtomicDataset("json.JSONDataset", str(final))
    second = atomic.AtomicDataset("json.JSONDataset", str(final))
    real_failpoint = atomic.failpoint
    errors: list[BaseException] = []
    started = threading.Event()

    def save_second() -> None:
        started.set()
        try:
            second.save({"version": 1, "labels": [], "by": "second"})
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    other = threading.Thread(target=save_second)

    def overlap(name: str) -> None:
        if name == "atomic:labels.json:written" and not other.is_alive() and not started.is_set():
            other.start()  # the other save starts while this one is half-way
            started.wait()
            other.join(0.5)  # it cannot finish (or clean up) while this save holds the output
        real_failpoint(name)

    monkeypatch.setattr(atomic, "failpoint", overlap)
    first.save({"version": 1, "labels": [], "by": "first"})
    other.join(10)
    assert not errors and not other.is_alive()
    assert first.load()["by"] == "second"  # the later save waits, then replaces the output whole


@pytest.mark.parametrize("time", ["9999-12-31T23:59:59-01:00", "0001-01-01T00:00:00+01:00"])
def test_a_timestamp_out_of_range_in_utc_gets_a_4xx_not_a_500(server, time: str) -> None:
    client, store, _ = server
    reply = post(client, [{"event_id": "e", "cell_id": A, "label": "yes", "time": time}])
    assert reply.status_code == 422, reply.status_code  # today: 500 (OverflowError from astimezone)
    assert store.count_events() == 0


def test_exporting_the_store_never_drops_labels_only_the_file_holds(tmp_path: Path) -> None:
    """`kedro annotate export` (and POST /api/export) wrote the store's labels over labels.json: 5,212 simulated
    labels were replaced by 2 clicks without a word. Now it refuses, naming how to keep them."""
    from mk_hspc.annotate.cli import LabelsWouldBeLostError, _save_labels
    from mk_hspc.datasets.atomic import AtomicDataset

    class Catalog:
        def __init__(self) -> None:
            self.labels = AtomicDataset("json.JSONDataset", str(tmp_path / "labels.json"))

        def get(self, name):
            return self.labels

        def exists(self, name):
            return self.labels.exists()

        def load(self, name):
            return self.labels.load()

        def save(self, name, data):
            self.labels.save(data)

    def entry(cell, label, when="2026-01-01T00:00:00.000000Z"):
        return {"cell_id": cell, "label": label, "annotator": "ann", "updated_at": when}

    catalog = Catalog()
    simulated = {"version": 1, "labels": [entry(A, "yes"), entry(B, "no")]}
    catalog.save("labels", simulated)
    clicks = {"version": 1, "labels": [entry(A, "no", "2026-02-01T00:00:00.000000Z")]}
    with pytest.raises(
        LabelsWouldBeLostError, match=r"1 label\(s\) the label store lacks.*kedro annotate import"
    ):
        _save_labels(catalog, clicks)
    assert catalog.load("labels") == simulated  # nothing written
    both = {"version": 1, "labels": [clicks["labels"][0], entry(B, "no")]}
    _save_labels(catalog, both)  # the store holds everything (A newer): written
    assert catalog.load("labels") == both
    _save_labels(catalog, clicks, replace=True)  # asked for
    assert catalog.load("labels") == clicks


def test_annotate_before_any_export_says_to_export_first() -> None:
    """`kedro annotate` with no exported site ended in a traceback."""
    import click
    from kedro.io import DatasetError

    from mk_hspc.annotate.cli import _load_site

    class NoSite:
        def load(self, name):
            raise DatasetError(
                "data/08_reporting/annotation_site does not exist; run the pipeline that writes it"
            )

    with pytest.raises(click.ClickException, match="kedro run --pipelines export"):
        _load_site(NoSite())


def test_annotate_warns_when_the_site_was_exported_from_another_cells_table(tmp_path: Path) -> None:
    """After switching studies (or segmenting again) `kedro annotate` served the old site without a word."""
    from mk_hspc.annotate.cli import _site_behind_cells
    from mk_hspc.datasets.atomic import AtomicDataset

    cells = AtomicDataset("json.JSONDataset", str(tmp_path / "cells.json"))
    cells.save({"cells": 1})
    site = AtomicDataset("json.JSONDataset", str(tmp_path / "site.json"))
    site.lineage = {"cells": str(cells.verified_manifest()["digest"])[:16]}
    site.save({"site": 1})
    catalog = type(
        "Catalog", (), {"get": lambda self, name: {"cells": cells, "annotation_site": site}[name]}
    )()
    assert _site_behind_cells(catalog) is None
    cells.save({"cells": 2})  # a new study's candidates
    assert "kedro run --pipelines export" in _site_behind_cells(catalog)
