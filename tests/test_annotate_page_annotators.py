"""The annotation page in a real browser (Playwright + Debian's /usr/bin/chromium, skipped when absent): what it
shows after the annotator name changes on a shared browser.

The page is a real rendered page (``render_page`` + the packaged assets) on a plain static HTTP server (no
``kedro annotate``: ``api/health`` answers 404, so the page works from localStorage only).
"""

from __future__ import annotations

import functools
import http.server
import threading
from collections.abc import Iterator
from typing import Any

import pandas as pd
import pytest

from mk_hspc.export.site import asset_files, render_page
from tests.conftest import CHROMIUM

sync_api = pytest.importorskip("playwright.sync_api", reason="pip package playwright is not installed")
if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is absent (Debian: apt-get install -y chromium)", allow_module_level=True)

CELLS = [f"s1_s0_r000_c000_mk_{n:05d}" for n in (1, 2, 3)]


@pytest.fixture(scope="module")
def site_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("static_site")
    rows = pd.DataFrame(
        {"cell_id": CELLS, "tile_id": ["s1_s0_r000_c000"] * 3, "slide": ["s1"] * 3, "score": [0.9, 0.8, 0.7]}
    )
    page = root / "pages" / "mk" / "0001.html"
    page.parent.mkdir(parents=True)
    page.write_text(render_page("mk", 1, 1, rows, {c: "10 10 60 10 60 60" for c in CELLS}, 128, "jpeg"))
    for name, data in asset_files().items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/pages/mk/0001.html"
    server.shutdown()


def test_another_annotator_does_not_see_the_first_ones_labels_as_theirs(site_url: str, browser: Any) -> None:
    """alice labels a cell on a shared browser; bob then types his name. The page must not show alice's
    label as bob's (pressed button, green background, "1 / 3 labelled", hidden by "unlabelled only"): bob
    would skip a cell he never labelled."""
    page = browser.new_context().new_page()
    page.goto(site_url)
    page.fill("#annotator", "alice")
    page.dispatch_event("#annotator", "change")
    page.click("figure.cell >> nth=0 >> button[value=yes]")
    assert page.inner_text("#progress") == "1 / 3 labelled on this page"

    page.fill("#annotator", "bob")
    page.dispatch_event("#annotator", "change")
    page.reload()
    assert page.input_value("#annotator") == "bob"
    shown = page.eval_on_selector_all("figure.cell", "els => els.map(e => e.dataset.label || null)")
    assert shown == [None, None, None], f"bob's page shows {shown}"
    assert page.inner_text("#progress") == "0 / 3 labelled on this page"

    # Back to alice: her label is still hers (kept per annotator, not replaced by bob's view).
    page.fill("#annotator", "alice")
    page.dispatch_event("#annotator", "change")
    shown = page.eval_on_selector_all("figure.cell", "els => els.map(e => e.dataset.label || null)")
    assert shown == ["yes", None, None]
    assert page.inner_text("#progress") == "1 / 3 labelled on this page"
