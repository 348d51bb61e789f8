"""The annotation server in-process (Starlette TestClient): labels, progress, import/export, refusals."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from mk_hspc.annotate.app import create_app, resolve_site_file
from mk_hspc.datasets.annotation import AnnotationSiteDataset
from mk_hspc.export.build import plan_site
from mk_hspc.labels.store import LabelStore
from tests.annotation_fixtures import EVIL_SLIDE, EXPORT_PARAMS, Study, make_study


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Study:
    return make_study(tmp_path_factory.mktemp("study"))


@pytest.fixture(scope="module")
def site_dataset(study: Study, tmp_path_factory: pytest.TempPathFactory) -> AnnotationSiteDataset:
    root = tmp_path_factory.mktemp("site")
    dataset = AnnotationSiteDataset(str(root / "site"))
    dataset.save(plan_site(study.cells, study.store, study.loaders(), EXPORT_PARAMS))
    (root / "secret.txt").write_text("top secret")
    return dataset


@pytest.fixture
def server(site_dataset: AnnotationSiteDataset, tmp_path: Path) -> tuple[TestClient, LabelStore, list]:
    store = LabelStore(tmp_path / "labels.sqlite3")
    saved: list[dict[str, Any]] = []
    app = create_app(
        site_dataset.load(),
        store,
        default_annotator="ann",
        save_labels=lambda payload: saved.append(payload) or "labels.json",
        max_body_bytes=4096,
        max_import_bytes=100_000,
    )
    return TestClient(app), store, saved


def cell_ids(study: Study, n: int) -> list[str]:
    return study.cells["cell_id"].tolist()[:n]


def post(client: TestClient, events: list[dict[str, Any]], annotator: str = "ann") -> Any:
    return client.post("/api/labels", json={"annotator": annotator, "events": events})


def test_labels_are_acknowledged_stored_once_and_read_back(server, study: Study) -> None:
    client, store, _ = server
    a, b = cell_ids(study, 2)
    events = [
        {"event_id": "e1", "cell_id": a, "label": "yes"},
        {"event_id": "e2", "cell_id": b, "label": "no"},
    ]
    reply = post(client, events)
    assert reply.status_code == 200 and reply.json()["acked"] == ["e1", "e2"]
    assert post(client, events).json() == {"acked": ["e1", "e2"], "added": 0, "duplicates": 2}
    assert client.get("/api/labels", params={"annotator": "ann"}).json() == {"labels": {a: "yes", b: "no"}}
    assert store.count_events() == 2
    progress = client.get("/api/progress").json()
    assert progress["labelled"] == 2 and progress["total"] == len(study.cells)
    assert {row["slide"] for row in progress["by_slide"]} == {EVIL_SLIDE, "S2"}


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"{not json", 400, "not valid JSON"),
        (
            json.dumps(
                {"annotator": "ann", "events": [{"event_id": "e", "cell_id": "nope", "label": "yes"}]}
            ),
            422,
            "not a cell",
        ),
        (
            json.dumps(
                {"annotator": "ann", "events": [{"event_id": "e", "cell_id": "CELL", "label": "maybe"}]}
            ),
            422,
            "maybe",
        ),
        (json.dumps({"annotator": "", "events": []}), 422, "annotator"),
        (
            json.dumps(
                {
                    "annotator": "ann",
                    "events": [{"event_id": "e", "cell_id": "CELL", "label": "yes", "time": "yesterday"}],
                }
            ),
            422,
            "ISO-8601",
        ),
        (json.dumps([1, 2]), 422, "body must be"),
        (
            json.dumps(
                {
                    "annotator": "ann",
                    "events": [{"event_id": "x" * 50, "cell_id": "CELL", "label": "yes"}] * 60,
                }
            ),
            413,
            "over 4096 bytes",
        ),
    ],
)
def test_malformed_requests_get_a_clear_4xx_and_change_nothing(
    server, study: Study, body, status, message
) -> None:
    client, store, _ = server
    good = {"event_id": "ok", "cell_id": cell_ids(study, 1)[0], "label": "yes"}
    body = body.replace("CELL", cell_ids(study, 1)[0]) if isinstance(body, str) else body
    if isinstance(body, str) and '"events": [{' in body and status == 422 and "nope" in body:
        # an unknown cell among good events: the whole request is refused
        body = json.dumps({"annotator": "ann", "events": [good, *json.loads(body)["events"]]})
    reply = client.post("/api/labels", content=body, headers={"content-type": "application/json"})
    assert reply.status_code == status and message in reply.json()["error"]
    assert store.count_events() == 0 and store.latest() == []


def test_static_download_and_label_studio_exports_are_imported(server, study: Study) -> None:
    client, store, saved = server
    a, b = cell_ids(study, 2)
    download = {
        "version": 1,
        "labels": [
            {"cell_id": a, "label": "unsure", "annotator": "static", "updated_at": "2026-11-30T06:00:00.000Z"}
        ],
    }
    assert client.post("/api/import", json=download).json()["added"] == 1
    assert client.post("/api/import", json=download).json()["duplicates"] == 1
    label_studio = [
        {
            "id": 1,
            "data": {"cell_id": b, "image": "x"},
            "annotations": [
                {
                    "completed_by": 7,
                    "updated_at": "2026-11-30T06:00:00Z",
                    "result": [{"type": "choices", "value": {"choices": ["No"]}}],
                }
            ],
        }
    ]
    assert client.post("/api/import", json=label_studio).json()["added"] == 1
    unknown = {"version": 1, "labels": [{**download["labels"][0], "cell_id": "S9_s0_r000_c000_mk_00001"}]}
    reply = client.post("/api/import", json=unknown)
    assert reply.status_code == 422 and "not cells of this site" in reply.json()["error"]
    assert client.post("/api/export", json={}).json()["labels"] == 2
    assert saved[-1]["version"] == 1
    assert {(e["cell_id"], e["label"], e["annotator"]) for e in saved[-1]["labels"]} == {
        (a, "unsure", "static"),
        (b, "no", "labelstudio:7"),
    }


@pytest.mark.parametrize(
    "path",
    [
        "../secret.txt",
        "a/../../secret.txt",
        "/etc/passwd",
        "%2e%2e/secret.txt",
        "..%2fsecret.txt",
        ".",
        "cells.json/..",
        "../site.manifest.json",
    ],
)
def test_paths_outside_the_site_resolve_to_nothing(site_dataset: AnnotationSiteDataset, path: str) -> None:
    from urllib.parse import unquote

    root = site_dataset.load().root
    assert resolve_site_file(root, unquote(path)) is None or resolve_site_file(
        root, unquote(path)
    ).is_relative_to(root.resolve())
    assert resolve_site_file(root, "cells.json") == (root / "cells.json").resolve()


def test_pages_are_served_with_security_headers(server) -> None:
    client, _, _ = server
    reply = client.get("/index.html")
    assert reply.status_code == 200 and "script-src 'self'" in reply.headers["content-security-policy"]
    assert "&lt;img src=x onerror=alert(1)&gt;" in reply.text and "<img src=x" not in reply.text
    assert client.get("/", follow_redirects=False).headers["location"] == "/index.html"


def test_other_sites_cannot_write_labels(server, study: Study) -> None:
    client, store, _ = server
    body = json.dumps(
        {"annotator": "ann", "events": [{"event_id": "e", "cell_id": cell_ids(study, 1)[0], "label": "yes"}]}
    )
    # A cross-site form or fetch without preflight can only send text/plain ...
    reply = client.post("/api/labels", content=body, headers={"content-type": "text/plain"})
    assert reply.status_code == 415
    # ... and a page of another origin is named by its Origin header.
    reply = client.post(
        "/api/labels",
        content=body,
        headers={"content-type": "application/json", "origin": "http://evil.example"},
    )
    assert reply.status_code == 403 and "other sites" in reply.json()["error"]
    assert store.count_events() == 0


def test_on_loopback_only_loopback_host_names_are_served(
    site_dataset: AnnotationSiteDataset, tmp_path: Path
) -> None:
    app = create_app(
        site_dataset.load(),
        LabelStore(tmp_path / "l.sqlite3"),
        default_annotator="a",
        allowed_hosts=["127.0.0.1"],
    )
    client = TestClient(app, base_url="http://127.0.0.1:8765")
    assert client.get("/index.html").status_code == 200
    # DNS rebinding: a page of attacker.example resolved to 127.0.0.1 sends its own name as Host.
    assert client.get("/api/health", headers={"host": "attacker.example:8765"}).status_code == 400
