"""The page against an in-process server in a real browser (Playwright + Debian's /usr/bin/chromium): its queue of
label events (events it could not store, replies that refused nothing) and the annotator the server proposes."""

from __future__ import annotations

import contextlib
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import CHROMIUM

pytest.importorskip("playwright.sync_api", reason="pip package playwright is not installed")
if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is absent (Debian: apt-get install -y chromium)", allow_module_level=True)

import uvicorn  # noqa: E402

from mk_hspc.annotate.app import create_app  # noqa: E402
from mk_hspc.datasets.annotation import AnnotationSite  # noqa: E402
from mk_hspc.labels.store import LabelStore  # noqa: E402
from tests.annotate_server import free_port  # noqa: E402

A = "S1_s0_r000_c000_mk_00001"
B = "S1_s0_r000_c000_mk_00002"
ASSETS = Path(__file__).resolve().parents[1] / "src" / "mk_hspc" / "export" / "assets"
PAGE = (
    '<!doctype html><html><head><meta charset=utf-8></head><body data-root="">'
    "<span id=progress></span><span id=save-state></span><input type=checkbox id=only-unlabelled>"
    "<input type=checkbox id=show-outlines checked><input id=annotator><button id=download>d</button>"
    f'<main><figure class=cell data-cell="{A}"></figure><figure class=cell data-cell="{B}"></figure></main>'
    '<script src="assets/app.js"></script></body></html>'
)


def site_with_page(tmp_path: Path) -> AnnotationSite:
    """A one-page site of cells A and B with the packaged app.js."""
    root = tmp_path / "site"
    (root / "assets").mkdir(parents=True)
    shutil.copy(ASSETS / "app.js", root / "assets" / "app.js")
    (root / "page.html").write_text(PAGE)
    return AnnotationSite(root, {A: ("S1", "mk", "page.html"), B: ("S1", "mk", "page.html")})


@contextlib.contextmanager
def serving(app: Any) -> Iterator[int]:
    """``app`` on loopback in a uvicorn thread for the block; yields its port."""
    server = uvicorn.Server(uvicorn.Config(app, port=free_port(), log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        yield server.config.port
    finally:
        server.should_exit = True
        thread.join(5)


def busy_at_times(app: Any, busy: dict[str, Any]) -> Any:
    """``app`` answering 503 ("overloaded", a JSON body) to label posts while ``busy["on"]``, at most
    ``busy["left"]`` times: a server that could not store them now, and refused nothing."""
    from starlette.responses import JSONResponse

    async def maybe_busy(scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST" and busy["on"] and busy["left"]:
            busy["left"] -= 1
            await JSONResponse({"error": "overloaded"}, status_code=503)(scope, receive, send)
            return
        await app(scope, receive, send)

    return maybe_busy


def test_a_click_made_while_browser_storage_is_full_still_reaches_the_server(
    tmp_path: Path, browser: Any
) -> None:
    site = site_with_page(tmp_path)
    store = LabelStore(tmp_path / "labels.sqlite3")
    record = store.record

    def slow_record(events, *, source):  # a slow disk or network: the reply comes after the next click
        time.sleep(1.0)
        return record(events, source=source)

    store.record = slow_record  # type: ignore[method-assign]
    with serving(create_app(site, store, default_annotator="alice")) as port:
        page = browser.new_page()
        # localStorage quota reached: every setItem throws (as a full 5 MB origin does).
        page.add_init_script(
            "const set = Storage.prototype.setItem; Storage.prototype.setItem = function (k, v) {"
            " if (window.__full) { throw new DOMException('quota', 'QuotaExceededError'); }"
            " return set.call(this, k, v); };"
        )
        page.goto(f"http://127.0.0.1:{port}/page.html")
        page.wait_for_function("document.getElementById('save-state').dataset.state === 'saved'")
        page.evaluate("window.__full = true")
        page.click(f'figure[data-cell="{A}"] button[value=yes]')
        page.wait_for_timeout(200)
        page.click(f'figure[data-cell="{B}"] button[value=no]')
        page.wait_for_timeout(4000)
        page.close()
    labels = {row["cell_id"]: row["label"] for row in store.latest("alice")}
    # Before: {A: "yes"} only. On A's ack, flush() reloaded the queue from localStorage (where B's event could
    # not be stored) and so dropped B's event from memory: B was never sent, though shown labelled.
    assert labels == {A: "yes", B: "no"}


def test_a_label_the_server_could_not_store_now_is_sent_again_later(tmp_path: Path, browser: Any) -> None:
    """A 503 with a JSON body (an overloaded server, a proxy in front of it) refused nothing: the page keeps the
    label queued and sends it again, instead of dropping it as if the label itself were refused (before: any
    non-200 JSON reply to a single event dropped it)."""
    site = site_with_page(tmp_path)
    store = LabelStore(tmp_path / "labels.sqlite3")
    busy = {"on": True, "left": 2}  # enough for the page's batch-of-one retry too
    with serving(busy_at_times(create_app(site, store, default_annotator="alice"), busy)) as port:
        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{port}/page.html")
        page.wait_for_function("document.getElementById('save-state').dataset.state === 'saved'")
        page.click(f'figure[data-cell="{A}"] button[value=yes]')
        # The page's 3 s server check sends the label again.
        _poll(lambda: store.latest("alice"), timeout_s=15, step_s=0.2)
        page.close()
    assert {row["cell_id"]: row["label"] for row in store.latest("alice")} == {A: "yes"}


def test_a_refused_label_stays_reported_after_the_server_was_busy_and_back(
    tmp_path: Path, browser: Any
) -> None:
    """A refusal must not go unnoticed: the page kept one message for it and for "busy, will retry", so a 503
    afterwards replaced it and the next successful save cleared both (the page then said "saved")."""
    site = site_with_page(tmp_path)
    unknown = "S1_s0_r000_c000_mk_00003"  # on the page, not in the site's cells index: the server refuses it
    page_html = (site.root / "page.html").read_text()
    (site.root / "page.html").write_text(
        page_html.replace("</main>", f'<figure class=cell data-cell="{unknown}"></figure></main>')
    )
    store = LabelStore(tmp_path / "labels.sqlite3")
    busy = {"on": False, "left": 2}

    def state_text(page: Any) -> str:
        return page.text_content("#save-state") or ""

    with serving(busy_at_times(create_app(site, store, default_annotator="alice"), busy)) as port:
        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{port}/page.html")
        page.wait_for_function("document.getElementById('save-state').dataset.state === 'saved'")
        page.click(f'figure[data-cell="{unknown}"] button[value=yes]')
        _poll(lambda: "refused" in state_text(page), timeout_s=10, step_s=0.1)
        assert "a label was refused" in state_text(page)
        busy["on"] = True
        page.click(f'figure[data-cell="{A}"] button[value=yes]')
        # busy twice, then the page's 3 s server check sends it again
        _poll(lambda: store.latest("alice"), timeout_s=15, step_s=0.2)
        page.wait_for_timeout(500)
        shown = state_text(page)
        page.close()
    assert {row["cell_id"]: row["label"] for row in store.latest("alice")} == {A: "yes"}
    assert "a label was refused" in shown, shown


def test_labels_are_kept_under_the_annotator_the_server_proposed(tmp_path: Path, browser: Any) -> None:
    """A page with no annotator yet takes the server's default one; its clicks must be stored in the browser
    under that annotator, not under 'anonymous' (after a reload the page shows that annotator's labels)."""
    site = site_with_page(tmp_path)
    store = LabelStore(tmp_path / "labels.sqlite3")
    with serving(create_app(site, store, default_annotator="alice")) as port:
        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{port}/page.html")
        page.wait_for_function("document.getElementById('save-state').dataset.state === 'saved'")
        assert page.input_value("#annotator") == "alice"
        page.click(f'figure[data-cell="{A}"] button[value=yes]')
        stored = page.evaluate("JSON.parse(localStorage.getItem('mkhspc.labels.v2'))")
        page.close()
    assert {who for who, labels in stored.items() if labels} == {"alice"} and stored["alice"][A][
        "label"
    ] == "yes"


def _poll(condition: Callable[[], Any], timeout_s: float, step_s: float) -> None:
    """Check ``condition`` every ``step_s`` until it holds or ``timeout_s`` passes (the caller asserts after).
    Polled from Python: the page's CSP forbids the eval that a polling ``wait_for_function`` needs."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not condition():
        time.sleep(step_s)
