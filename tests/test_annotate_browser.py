"""`kedro annotate` in a real browser (Playwright driving Debian's /usr/bin/chromium, headless).

Needs the Debian package `chromium` (``apt-get install -y chromium``) and the `playwright` pip package;
skipped with the reason when either is absent. Playwright never downloads a browser here. A screenshot of a
labelled page is saved to ``build/test-artifacts/annotation_page.png``.
"""

from __future__ import annotations

import json
import os
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.annotate_server import Server, command_env, free_port, project_with_site
from tests.annotation_fixtures import EVIL_SLIDE, Study
from tests.conftest import CHROMIUM

ARTIFACTS = Path(__file__).resolve().parents[1] / "build" / "test-artifacts"
PAGE = "pages/mk/0001.html"

if os.environ.get("CI") and not CHROMIUM.exists():
    # CI installs it (Makefile `install`): a skip there would hide a missing install step.
    raise RuntimeError(f"{CHROMIUM} is absent on CI; `make install` installs the Debian package chromium")
sync_api = pytest.importorskip("playwright.sync_api", reason="pip package playwright is not installed")
if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is absent (Debian: apt-get install -y chromium)", allow_module_level=True)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Study, Path]]:
    root = tmp_path_factory.mktemp("browser")
    project, study = project_with_site(root)
    server = Server(project, command_env(root), free_port()).start()
    yield server, study, project
    server.stop()


def server_labels(server: Server, annotator: str) -> dict[str, str]:
    with urllib.request.urlopen(f"{server.url}api/labels?annotator={annotator}", timeout=5) as reply:
        return json.loads(reply.read())["labels"]


def wait_saved(page: Any) -> None:
    page.wait_for_selector('#save-state[data-state="saved"]', timeout=10_000)


def test_label_by_mouse_and_keyboard_reload_and_sigkill(setup, browser) -> None:
    server, study, _ = setup
    context = browser.new_context()
    page = context.new_page()
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    page.goto(server.url + PAGE)
    page.fill("#annotator", "alice")
    page.dispatch_event("#annotator", "change")
    cells = page.eval_on_selector_all("figure.cell", "els => els.map(e => e.dataset.cell)")
    assert len(cells) == 4
    # Mouse on the first cell, then the keyboard: arrow to the next, n, u (each label moves on).
    page.click("figure.cell >> nth=0 >> button[value=yes]")
    page.keyboard.press("ArrowRight")
    page.keyboard.press("n")
    page.keyboard.press("u")
    wait_saved(page)
    expected = {cells[0]: "yes", cells[1]: "no", cells[2]: "unsure"}
    assert server_labels(server, "alice") == expected
    # The slide named like an attack is shown as text, and nothing ran.
    captions = page.eval_on_selector_all("figcaption .slide", "els => els.map(e => e.textContent)")
    assert EVIL_SLIDE in captions and dialogs == []
    assert page.locator("figure.cell img").count() == 4

    page.reload()
    wait_saved(page)
    shown = page.eval_on_selector_all("figure.cell", "els => els.map(e => e.dataset.label || null)")
    assert shown == ["yes", "no", "unsure", None]
    assert page.inner_text("#progress") == "3 / 4 labelled on this page"
    page.check("#only-unlabelled")
    assert page.eval_on_selector_all("figure.cell", "els => els.filter(e => !e.hidden).length") <= 2
    page.uncheck("#only-unlabelled")
    page.uncheck("#show-outlines")
    assert not page.locator("figure.cell svg").first.is_visible()
    page.check("#show-outlines")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "annotation_page.png"), full_page=True)

    # SIGKILL right after an acknowledged click: the label is on disk.
    page.click("figure.cell >> nth=3 >> button[value=no]")
    wait_saved(page)
    server.kill()
    expected[cells[3]] = "no"
    # A click while the server is down is queued in the browser ...
    page.click("figure.cell >> nth=0 >> button[value=no]")
    page.wait_for_selector('#save-state[data-state="offline"]', timeout=10_000)
    server.start()
    # ... and sent when the server is back.
    wait_saved(page)
    expected[cells[0]] = "no"
    assert server_labels(server, "alice") == expected
    # A fresh browser (nothing in localStorage) shows what the server has.
    fresh = browser.new_context().new_page()
    fresh.add_init_script("localStorage.setItem('mkhspc.annotator', 'alice')")
    fresh.goto(server.url + PAGE)
    # (Locator waits, not wait_for_function: the pages' CSP forbids the eval that polling a string needs.)
    sync_api.expect(fresh.locator("figure.cell[data-label]")).to_have_count(4, timeout=10_000)
    context.close()


def test_static_fallback_download_is_imported_by_the_server(setup, browser, tmp_path: Path) -> None:
    server, study, project = setup
    site = project / "data" / "08_reporting" / "annotation_site"
    context = browser.new_context(accept_downloads=True)
    page = context.new_page()
    page.goto((site / "pages" / "hspc" / "0001.html").as_uri())
    page.wait_for_selector('#save-state[data-state="offline"]')
    page.fill("#annotator", "bob")
    page.dispatch_event("#annotator", "change")
    page.click("figure.cell >> nth=0 >> button[value=yes]")
    page.keyboard.press("ArrowRight")
    page.keyboard.press("n")
    cells = page.eval_on_selector_all("figure.cell", "els => els.map(e => e.dataset.cell)")
    with page.expect_download() as download_info:
        page.click("#download")
    path = tmp_path / "annotations.json"
    download_info.value.save_as(path)
    document = json.loads(path.read_text())
    assert document["version"] == 1
    assert {(e["cell_id"], e["label"], e["annotator"]) for e in document["labels"]} == {
        (cells[0], "yes", "bob"),
        (cells[1], "no", "bob"),
    }
    request = urllib.request.Request(
        server.url + "api/import", data=path.read_bytes(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=5) as reply:
        assert json.loads(reply.read())["added"] == 2
    assert server_labels(server, "bob") == {cells[0]: "yes", cells[1]: "no"}
    context.close()


def raw_get(port: int, target: str) -> tuple[int, bytes]:
    """A GET with the request target sent exactly as given (no client-side normalisation of ``..``)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, data.split(b"\r\n\r\n", 1)[-1]


@pytest.mark.parametrize(
    "target",
    [
        "/../project/pyproject.toml",
        "/..%2f..%2fpyproject.toml",
        "/%2e%2e/%2e%2e/pyproject.toml",
        "/%252e%252e/%252e%252e/pyproject.toml",
        "/crops/..%5c..%5cpyproject.toml",
        "//etc/passwd",
        "/%2fetc%2fpasswd",
        "/.%2e/.%2e/.%2e/.%2e/etc/passwd",
        "/annotation_site.manifest.json",
        "/../annotation_site.manifest.json",
    ],
)
def test_paths_outside_the_site_are_refused(setup, target: str) -> None:
    server, _, _ = setup
    status, body = raw_get(server.port, target)
    assert status in (400, 404)
    assert b"[project]" not in body and b"root:" not in body and b"digest" not in body
    assert raw_get(server.port, "/cells.json")[0] == 200


def test_the_server_listens_on_loopback_only(setup) -> None:
    server, _, _ = setup
    process = psutil.Process(server.process.pid)
    listening = [c.laddr for c in process.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN]
    assert listening and {address.ip for address in listening} == {"127.0.0.1"}


def test_a_refused_queued_label_does_not_take_good_ones_with_it(setup, browser) -> None:
    server, study, _ = setup
    good = sorted(study.cells["cell_id"])[-1]
    queue = [
        {
            "event_id": "stale-1",
            "cell_id": "OLD_s0_r000_c000_mk_00001",
            "label": "yes",
            "time": "2026-11-30T06:00:00Z",
            "annotator": "carol",
        },
        {
            "event_id": "good-1",
            "cell_id": good,
            "label": "no",
            "time": "2026-11-30T06:00:01Z",
            "annotator": "carol",
        },
    ]
    context = browser.new_context()
    context.add_init_script(
        f"if (!sessionStorage.getItem('seeded')) {{ sessionStorage.setItem('seeded', '1');"
        f" localStorage.setItem('mkhspc.queue.v1', {json.dumps(json.dumps(queue))});"
        " localStorage.setItem('mkhspc.annotator', 'carol'); }"
    )
    page = context.new_page()
    page.goto(server.url + "index.html")
    page.wait_for_selector('#save-state[data-state="error"]', timeout=10_000)
    assert "not a cell of this site" in page.inner_text("#save-state")
    assert server_labels(server, "carol") == {good: "no"}
    # Served, the index shows every annotator's progress from the label store.
    sync_api.expect(page.locator("td.done").first).not_to_have_text("", timeout=10_000)
    done = page.eval_on_selector_all("td.done", "els => els.reduce((n, e) => n + Number(e.textContent), 0)")
    with urllib.request.urlopen(server.url + "api/progress", timeout=5) as reply:
        assert done == json.loads(reply.read())["labelled"] > 0
    context.close()
