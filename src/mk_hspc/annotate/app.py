"""The annotation server as a Starlette app: the static site, the label API, progress, import and export.

Routes (all under the site root):

- ``GET /<path>``: a file of the site; anything that resolves outside the site folder is refused (404).
- ``GET /api/health``: ``{"ok": true, "annotator": default annotator}`` (the page's server check).
- ``GET /api/labels?annotator=A``: that annotator's current labels ``{cell_id: label}``.
- ``POST /api/labels``: ``{"annotator": A, "events": [{"event_id", "cell_id", "label", "time"}]}``; stored and
  committed (fsync) before the reply ``{"acked": [event ids]}``; a retried event id is acknowledged again and
  stored once, and an id already stored (or repeated in the request) with another cell or label is refused
  (409 / 422), so an acknowledgement always means the label is stored. A malformed body, an unknown cell or label, or a body over ``max_body_bytes`` is refused
  with a 4xx naming the problem, and nothing of it is stored.
- ``GET /api/progress``: labelled / total per slide and cell type (any annotator).
- ``POST /api/import``: a labels file or a Label Studio JSON export (``mk_hspc.labels.contract``).
- ``POST /api/export``: writes the labels dataset (the catalog's ``labels``) and returns its size.

POST bodies must be ``application/json`` and come from the site itself (``Origin``), so that another web
page open in the same browser cannot write labels; on loopback only loopback ``Host`` names are served.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from mk_hspc.datasets.annotation import AnnotationSite
from mk_hspc.labels.contract import (
    LabelEvent,
    LabelFileError,
    check_annotator,
    check_label,
    content_event_id,
    iso_utc,
    parse_label_file,
)
from mk_hspc.labels.store import EventConflictError, LabelStore

MAX_EVENTS_PER_REQUEST = 500
MAX_EVENT_ID_CHARS = 100
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'",
    "Referrer-Policy": "no-referrer",
}


class RequestError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=SECURITY_HEADERS)


def _check_post(request: Request) -> None:
    """Every POST: JSON only, and from this site. A cross-site page can send a "simple" text/plain POST to
    a local server without asking, but not an application/json one (the browser's CORS preflight gets no
    permission here); a foreign ``Origin`` is refused outright."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise RequestError(415, "send the body as Content-Type: application/json")
    origin = request.headers.get("origin")
    if origin is not None and urlsplit(origin).netloc != request.headers.get("host"):
        raise RequestError(403, f"requests from other sites ({origin[:100]}) are refused")


async def _read_json(request: Request, limit: int) -> Any:
    _check_post(request)
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise RequestError(413, f"request body over {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestError(413, f"request body over {limit} bytes")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"request body is not valid JSON ({exc})") from None
    except RecursionError:
        raise RequestError(400, "request body is nested too deeply") from None


def parse_label_request(body: Any, known_cells: dict[str, Any]) -> list[LabelEvent]:
    """Validate a ``POST /api/labels`` body completely (all or nothing) into events."""
    if not isinstance(body, dict) or not isinstance(body.get("events"), list):
        raise RequestError(422, "body must be {'annotator': str, 'events': [...]}")
    try:
        annotator = check_annotator(body.get("annotator"), "annotator")
    except LabelFileError as exc:
        raise RequestError(422, str(exc)) from None
    if len(body["events"]) > MAX_EVENTS_PER_REQUEST:
        raise RequestError(413, f"at most {MAX_EVENTS_PER_REQUEST} events per request")
    events = []
    seen: dict[str, tuple[str, Any]] = {}
    for index, event in enumerate(body["events"]):
        where = f"events[{index}]"
        if not isinstance(event, dict):
            raise RequestError(422, f"{where} must be an object")
        event_id, cell_id = event.get("event_id"), event.get("cell_id")
        if not isinstance(event_id, str) or not 0 < len(event_id) <= MAX_EVENT_ID_CHARS:
            raise RequestError(422, f"{where}.event_id must be a string of 1-{MAX_EVENT_ID_CHARS} characters")
        if not isinstance(cell_id, str) or cell_id not in known_cells:
            raise RequestError(422, f"{where}.cell_id {str(cell_id)[:120]!r} is not a cell of this site")
        try:
            label = check_label(event.get("label"), where)
            updated_at = iso_utc(event.get("time")) if event.get("time") is not None else iso_utc()
        except LabelFileError as exc:
            raise RequestError(422, str(exc)) from None
        if seen.setdefault(event_id, (cell_id, label)) != (cell_id, label):
            raise RequestError(
                422, f"{where}.event_id {event_id!r} is used twice in this request for other labels"
            )
        events.append(LabelEvent(page_event_id(annotator, event_id), cell_id, label, annotator, updated_at))
    return events


def page_event_id(annotator: str, client_event_id: str) -> str:
    """The stored id of a page click: the annotator and the page's own id, unambiguous whatever they hold
    (``annotator:id`` made ``a`` + ``b:c`` and ``a:b`` + ``c`` one event)."""
    return content_event_id("page", annotator, client_event_id)


def resolve_site_file(root: Path, path: str) -> Path | None:
    """The file ``path`` names inside ``root``, or None when it does not exist or would leave the site."""
    if "\0" in path or "\\" in path:
        return None
    parts = [part for part in path.split("/") if part]
    if any(part in (".", "..") or part.startswith(".") for part in parts):
        return None  # also hides dotfiles (the manifest, temporary siblings)
    root = root.resolve()
    candidate = root.joinpath(*parts) if parts else root
    if candidate.is_dir():
        candidate = candidate / "index.html"
    try:
        resolved = candidate.resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    if not resolved.is_relative_to(root) or not resolved.is_file():
        return None
    return resolved


def create_app(
    site: AnnotationSite,
    store: LabelStore,
    *,
    default_annotator: str,
    save_labels: Callable[[dict[str, Any]], str] | None = None,
    max_body_bytes: int = 65536,
    max_import_bytes: int = 50_000_000,
    allowed_hosts: list[str] | None = None,
) -> Starlette:
    """The app serving ``site`` and storing labels in ``store``.

    Args:
        site: the exported site (its folder and the cells it holds).
        store: the label store.
        default_annotator: the annotator name the page proposes.
        save_labels: writes the labels contract document (the catalog's ``labels``); returns where.
        max_body_bytes: largest ``POST /api/labels`` body.
        max_import_bytes: largest ``POST /api/import`` body.
        allowed_hosts: ``Host`` header names served (others get 400): the loopback names when bound to
            loopback, so that a web page cannot reach the server through DNS rebinding. None: any.
    """
    known = site.cells

    async def health(request: Request) -> Response:
        return JSONResponse({"ok": True, "annotator": default_annotator, "cells": len(known)})

    async def get_labels(request: Request) -> Response:
        annotator = request.query_params.get("annotator")
        if not annotator:
            return _error(422, "query parameter 'annotator' is required")
        rows = await run_in_threadpool(store.latest, annotator)
        return JSONResponse({"labels": {row["cell_id"]: row["label"] for row in rows}})

    async def post_labels(request: Request) -> Response:
        try:
            body = await _read_json(request, max_body_bytes)
            events = parse_label_request(body, known)
        except RequestError as exc:
            return _error(exc.status, str(exc))
        try:
            result = await run_in_threadpool(store.record, events, source="page")
        except EventConflictError as exc:
            return _error(409, str(exc))
        # The page's own ids, as sent: it drops from its queue exactly the ids it finds here.
        return JSONResponse(
            {"acked": list(dict.fromkeys(event["event_id"] for event in body["events"])), **result}
        )

    async def progress(request: Request) -> Response:
        rows = await run_in_threadpool(store.latest)
        labelled = {row["cell_id"] for row in rows}
        totals: Counter = Counter()
        done: Counter = Counter()
        for cell_id, (slide, cell_type, _page) in known.items():
            totals[(slide, cell_type)] += 1
            done[(slide, cell_type)] += cell_id in labelled
        return JSONResponse(
            {
                "labelled": sum(done.values()),
                "total": len(known),
                "by_slide": [
                    {
                        "slide": slide,
                        "cell_type": cell_type,
                        "labelled": done[(slide, cell_type)],
                        "total": total,
                    }
                    for (slide, cell_type), total in sorted(totals.items())
                ],
            }
        )

    async def import_labels(request: Request) -> Response:
        try:
            document = await _read_json(request, max_import_bytes)
            events = parse_label_file(document, source="uploaded file")
        except RequestError as exc:
            return _error(exc.status, str(exc))
        except LabelFileError as exc:
            return _error(422, str(exc))
        unknown = sorted({e.cell_id for e in events} - set(known))
        if unknown:
            return _error(422, f"{len(unknown)} cell id(s) are not cells of this site, e.g. {unknown[:3]}")
        try:
            result = await run_in_threadpool(store.record, events, source="import")
        except EventConflictError as exc:
            return _error(409, str(exc))
        return JSONResponse({"events": len(events), **result})

    async def export_labels(request: Request) -> Response:
        try:
            _check_post(request)
        except RequestError as exc:
            return _error(exc.status, str(exc))
        if save_labels is None:
            return _error(404, "this server was started without a labels dataset")
        payload = await run_in_threadpool(store.payload)
        try:
            where = await run_in_threadpool(save_labels, payload)
        except ValueError as exc:  # e.g. the file holds labels the store lacks: nothing written
            return _error(409, str(exc))
        return JSONResponse({"labels": len(payload["labels"]), "written": where})

    async def static(request: Request) -> Response:
        path = request.path_params.get("path", "")
        if path == "":
            return RedirectResponse("/index.html")
        file = resolve_site_file(site.root, path)
        if file is None:
            return PlainTextResponse("not found", status_code=404, headers=SECURITY_HEADERS)
        headers = dict(SECURITY_HEADERS)
        if file.suffix in (".webp", ".jpg", ".jpeg"):
            headers["Cache-Control"] = "max-age=86400"
        else:
            headers["Cache-Control"] = "no-cache"
        return FileResponse(file, headers=headers)

    routes = [
        Route("/api/health", health),
        Route("/api/labels", get_labels, methods=["GET"]),
        Route("/api/labels", post_labels, methods=["POST"]),
        Route("/api/progress", progress),
        Route("/api/import", import_labels, methods=["POST"]),
        Route("/api/export", export_labels, methods=["POST"]),
        Route("/{path:path}", static, methods=["GET", "HEAD"]),
    ]
    middleware = []
    if allowed_hosts is not None:
        middleware.append(Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts))
    return Starlette(routes=routes, middleware=middleware)
