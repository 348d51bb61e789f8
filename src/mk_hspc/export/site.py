"""The static annotation site: pages of N cells per cell type, an index, crops as image files, page assets.

Layout (every name derived from the stable cell id)::

    index.html                      counts per slide and cell type, pages, labelling progress
    cells.json                      every exported cell: id, slide, cell type, page (the server's whitelist)
    assets/app.js, assets/app.css   one copy for all pages
    pages/<cell_type>/<nnnn>.html   N cells each, ordered by ``order`` (score | slide | random)
    crops/<tile_id>/<cell_id>.webp  one small image per cell, lazy-loaded by the pages

Every piece of text that comes from data (slide names, ids) is HTML-escaped and URL-quoted; the pages work
from a static host or a plain file (labels in localStorage) and, served by ``kedro annotate``, store every
click on the server.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any
from urllib.parse import quote

import numpy as np
import pandas as pd

ORDERS = ("score", "slide", "random")
ASSET_NAMES = ("app.js", "app.css")
CELLS_INDEX = "cells.json"
LABEL_CHOICES = ("yes", "no", "unsure")


Outline = str  # SVG polygon points "x y x y ..." in the crop image's pixels (crops.display_outlines)


@dataclass(frozen=True)
class TileWork:
    """One tile's share of the site, in two stages (timed and named apart in errors; a tile worker runs both).

    Attributes:
        tile_id: the tile (names it in errors).
        read: reads the tile's pixels and its cells' outlines (slide and tile store I/O).
        cut: pixels -> ``({site-relative path: bytes}, {cell_id: outline})``, the tile's crops.
    """

    tile_id: str
    read: Callable[[], Any]
    cut: Callable[[Any], tuple[dict[str, bytes], dict[str, Outline]]]


@dataclass
class SiteContent:
    """What the site dataset writes: crops tile by tile, then the pages (which need the crops' outlines).

    Attributes:
        tiles: the per-tile work, in tile order.
        render: ``outlines -> {site-relative path: bytes}``: index, pages, assets, cells index.
        prepare: drafts what ``render`` can before the outlines exist; run while the tiles are cut, so
            that only the outlines are left to fill in after the last tile (``render`` works without it).
        paths: every site-relative path the site will hold (crops and the rest), when known: a reused
            folder's files that the new site lacks are then renamed to new names instead of deleted
            while as many are created.
        threads: tile workers (each reads a tile, then cuts and encodes its crops).
        close: called once every tile has run (closes the slides the reads opened).
        stats: filled in by :func:`mk_hspc.export.build.write_site` (counts and busy time per stage).
        file_sha256: filled in by :func:`mk_hspc.export.build.write_site`: ``{site-relative path: sha256 hex}``
            of every file of the written site.
    """

    tiles: list[TileWork]
    render: Callable[[dict[str, Outline]], dict[str, bytes]]
    prepare: Callable[[], Any] = lambda: None
    paths: Callable[[], frozenset[str]] | None = None
    threads: int = 1
    close: Callable[[], None] = lambda: None
    stats: dict[str, Any] = field(default_factory=dict)
    file_sha256: dict[str, str] = field(default_factory=dict)


def crop_path(tile_id: str, cell_id: str, image_format: str) -> str:
    """Site-relative path of a cell's crop (file system form, not URL-quoted)."""
    suffix = "jpg" if image_format == "jpeg" else image_format
    return f"crops/{tile_id}/{cell_id}.{suffix}"


_URL_SAFE = re.compile(r"[A-Za-z0-9_.~/-]*")


def url(path: str) -> str:
    """A site-relative path as a URL path (each segment percent-encoded)."""
    if _URL_SAFE.fullmatch(path):  # the usual ids: nothing to encode (quote would return it unchanged)
        return path
    return "/".join(quote(part, safe="") for part in path.split("/"))


def order_cells(cells: pd.DataFrame, order: str, seed: int, first: Sequence[str] = ()) -> pd.DataFrame:
    """The cells of one type in page order: ``score`` (highest first), ``slide`` (slide, tile, label) or
    ``random`` (a permutation fixed by ``seed``); ties and the base order are by cell id, so it is stable.

    ``first``: cell ids that lead, in that order (the next annotation batch), before the rest in ``order``.
    """
    base = cells.sort_values("cell_id", kind="stable")
    if order == "score":
        ordered = base.sort_values("score", ascending=False, kind="stable")
    elif order == "slide":
        ordered = base.sort_values(["slide", "tile_id", "label"], kind="stable")
    elif order == "random":
        ordered = base.iloc[np.random.default_rng(seed).permutation(len(base))]
    else:
        raise ValueError(f"export.order {order!r} is not one of {', '.join(ORDERS)}")
    if not len(first):
        return ordered
    rank = ordered["cell_id"].astype(str).map({cell_id: i for i, cell_id in enumerate(first)})
    leading = ordered[rank.notna()].iloc[np.argsort(rank[rank.notna()].to_numpy(), kind="stable")]
    return pd.concat([leading, ordered[rank.isna()]])


def assign_pages(
    cells: pd.DataFrame,
    cell_types: Iterable[str],
    page_size: int,
    order: str,
    seed: int,
    first: Sequence[str] = (),
) -> pd.DataFrame:
    """Cells with ``page`` (1-based, per cell type) and ``position`` columns, in page order (``first``: see
    :func:`order_cells`)."""
    frames = []
    for cell_type in cell_types:
        of_type = order_cells(cells[cells["cell_type"] == cell_type], order, seed, first)
        positions = np.arange(len(of_type))
        frames.append(of_type.assign(page=positions // page_size + 1, position=positions % page_size))
    if not frames:
        return cells.iloc[0:0].assign(page=[], position=[])
    return pd.concat(frames, ignore_index=True)


def page_path(cell_type: str, page: int) -> str:
    return f"pages/{cell_type}/{page:04d}.html"


def _esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _head(title: str, root: str) -> str:
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width,initial-scale=1">'
        f'<title>{_esc(title)}</title><link rel=stylesheet href="{root}assets/app.css"></head>'
    )


@dataclass(frozen=True)
class PageDraft:
    """A page rendered but for its cells' outlines, which only the cut tiles give.

    The page is ``pieces[0] + outline(cell_ids[0]) + pieces[1] + ... + outline(cell_ids[-1]) + pieces[-1]``,
    so drafting (escaping, URLs, markup) can run while tiles are still being read.
    """

    pieces: list[str]
    cell_ids: list[str]

    def fill(self, outlines: Mapping[str, Outline]) -> str:
        parts = [self.pieces[0]]
        for cell_id, piece in zip(self.cell_ids, self.pieces[1:], strict=True):
            parts += (outlines.get(cell_id, ""), piece)
        return "".join(parts)


def render_page(
    cell_type: str,
    page: int,
    n_pages: int,
    rows: pd.DataFrame,
    outlines: Mapping[str, Outline],
    output_px: int,
    image_format: str,
) -> str:
    """One page of cells: crops (lazy), outlines as SVG, slide and score as escaped text."""
    return draft_page(cell_type, page, n_pages, rows, output_px, image_format).fill(outlines)


def draft_page(
    cell_type: str, page: int, n_pages: int, rows: pd.DataFrame, output_px: int, image_format: str
) -> PageDraft:
    """:func:`render_page` without the outlines (see :class:`PageDraft`)."""
    root = "../../"
    nav = [f'<a href="{root}index.html">Index</a>']
    if page > 1:
        nav.append(f'<a rel=prev href="{page - 1:04d}.html">&larr; Page {page - 1}</a>')
    if page < n_pages:
        nav.append(f'<a rel=next href="{page + 1:04d}.html">Page {page + 1} &rarr;</a>')
    escaped_slides: dict[str, str] = {}
    crop_size = f"width={output_px} height={output_px}"
    viewbox = f'<svg viewBox="0 0 {output_px} {output_px}"><polygon points="'
    title = f"{cell_type.upper()} page {page} of {n_pages}"
    head = (
        _head(title, root)
        + f'<body data-root="{root}" data-cell-type="{_esc(cell_type)}" data-page="{page}">'
        + _toolbar(title, nav)
        + "<main class=grid>"
    )
    pieces, cell_ids = [], rows["cell_id"].astype(str).tolist()
    caption = ""  # the previous cell's caption, which opens the next piece
    for cell_id, tile_id, slide, score in zip(
        cell_ids,
        rows["tile_id"].astype(str),
        rows["slide"].astype(str),
        rows["score"].astype(float),
        strict=True,
    ):
        esc_id = _esc(cell_id)
        if slide not in escaped_slides:
            escaped_slides[slide] = _esc(slide)
        esc_slide = escaped_slides[slide]
        src = _esc(root + url(crop_path(tile_id, cell_id, image_format)))
        pieces.append(
            (caption or head)
            + f'<figure class=cell data-cell="{esc_id}"><div class=crop><img loading=lazy decoding=async '
            f'{crop_size} alt="{esc_id}" src="{src}">{viewbox}'
        )
        caption = (
            f'"/></svg></div><figcaption><span class=slide title="{esc_slide}">{esc_slide}</span> '
            f"<span class=score>{score:.2f}</span></figcaption></figure>"
        )
    pieces.append((caption or head) + f'</main><script src="{root}assets/app.js"></script></body></html>')
    return PageDraft(pieces, cell_ids)


def _toolbar(title: str, nav: list[str]) -> str:
    return (
        f"<header><h1>{_esc(title)}</h1><nav>{' '.join(nav)}</nav>"
        "<div class=tools><span id=progress></span> <span id=save-state class=state></span>"
        "<label><input type=checkbox id=only-unlabelled> unlabelled only</label>"
        "<label><input type=checkbox id=show-outlines checked> outlines</label>"
        "<label>annotator <input id=annotator size=10 autocomplete=off></label>"
        "<button id=download type=button>Download annotations JSON</button></div>"
        "<p class=help>Click Yes / No / ? or press <kbd>y</kbd> <kbd>n</kbd> <kbd>u</kbd>; "
        "arrows move.</p></header>"
    )


def render_index(pages: pd.DataFrame, cell_types: list[str], slides: list[str] | None = None) -> str:
    """Counts per slide and cell type (every slide of ``slides``, zeros included), links to every page, and
    a progress cell filled in by the script."""
    counts = (
        pages.groupby(["slide", "cell_type"])
        .size()
        .unstack(fill_value=0)
        .reindex(columns=cell_types, fill_value=0)
    )
    if slides is not None:
        counts = counts.reindex(sorted(set(slides) | set(counts.index)), fill_value=0)
    head = "".join(f"<th>{_esc(t)}</th><th>labelled</th>" for t in cell_types)
    body = []
    for slide, row in counts.iterrows():
        cells = "".join(
            f'<td>{int(row[t])}</td><td class=done data-slide="{_esc(slide)}" data-type="{_esc(t)}"></td>'
            for t in cell_types
        )
        body.append(f"<tr><th scope=row>{_esc(slide)}</th>{cells}</tr>")
    links = []
    for cell_type in cell_types:
        of_type = pages[pages["cell_type"] == cell_type]
        page_links = " ".join(
            f'<a href="{url(page_path(cell_type, int(p)))}">{int(p)}</a>'
            for p in sorted(of_type["page"].unique())
        )
        links.append(
            f"<h2>{_esc(cell_type.upper())} ({len(of_type)} cells)</h2><p class=pages>{page_links}</p>"
        )
    return (
        _head("mk-hspc annotation", "")
        + '<body data-root="" class=index>'
        + _toolbar("mk-hspc annotation", [])
        + f"<main><table><thead><tr><th>slide</th>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
        + "".join(links)
        + '</main><script src="assets/app.js"></script></body></html>'
    )


def cells_index(pages: pd.DataFrame) -> dict[str, Any]:
    """``cells.json``: ``{"version": 1, "cells": {cell_id: [slide, cell_type, page path]}}``."""
    # Plain column lists: itertuples over the (Arrow-backed) table took 40 ms for 5,000 cells.
    columns = (pages[name].astype(str).tolist() for name in ("cell_id", "slide", "cell_type"))
    page_numbers = pages["page"].astype(int).tolist()
    return {
        "version": 1,
        "cells": {
            cell_id: [slide, cell_type, page_path(cell_type, page)]
            for cell_id, slide, cell_type, page in zip(*columns, page_numbers, strict=True)
        },
    }


def asset_files() -> dict[str, bytes]:
    folder = resources.files("mk_hspc.export") / "assets"
    return {f"assets/{name}": (folder / name).read_bytes() for name in ASSET_NAMES}


def page_files(
    pages: pd.DataFrame,
    outlines: Mapping[str, Outline],
    cell_types: list[str],
    output_px: Mapping[str, int],
    image_format: str,
    slides: list[str] | None = None,
) -> dict[str, bytes]:
    """Index, cells index, assets and every page, as bytes."""
    return fill_pages(draft_pages(pages, cell_types, output_px, image_format, slides), outlines)


@dataclass(frozen=True)
class SiteDraft:
    """Every file of the site but the crops: finished ones (index, cells index, assets) and page drafts."""

    files: dict[str, bytes]
    pages: dict[str, PageDraft]


def draft_pages(
    pages: pd.DataFrame,
    cell_types: list[str],
    output_px: Mapping[str, int],
    image_format: str,
    slides: list[str] | None = None,
) -> SiteDraft:
    """What :func:`page_files` writes, all but the outlines (they come from the cut tiles)."""
    files = {"index.html": render_index(pages, cell_types, slides).encode(), **asset_files()}
    files[CELLS_INDEX] = json.dumps(cells_index(pages), separators=(",", ":")).encode()
    drafts = {}
    for cell_type in cell_types:
        of_type = pages[pages["cell_type"] == cell_type]
        n_pages = int(of_type["page"].max()) if len(of_type) else 0
        for page, rows in of_type.groupby("page", sort=True):
            drafts[page_path(cell_type, int(page))] = draft_page(
                cell_type, int(page), n_pages, rows, output_px[cell_type], image_format
            )
    return SiteDraft(files, drafts)


def fill_pages(draft: SiteDraft, outlines: Mapping[str, Outline]) -> dict[str, bytes]:
    """The site's files but the crops, the outlines filled in."""
    return {**draft.files, **{path: page.fill(outlines).encode() for path, page in draft.pages.items()}}


def site_paths(pages: pd.DataFrame, cell_types: Iterable[str], image_format: str) -> frozenset[str]:
    """Every site-relative path of the site of ``pages`` (crops, pages, index, cells index, assets)."""
    crops = map(
        crop_path,
        pages["tile_id"].astype(str).tolist(),
        pages["cell_id"].astype(str).tolist(),
        [image_format] * len(pages),
    )
    page_keys = pages[pages["cell_type"].isin(list(cell_types))][["cell_type", "page"]].drop_duplicates()
    page_files = (page_path(str(t), int(p)) for t, p in page_keys.itertuples(index=False))
    fixed = ["index.html", CELLS_INDEX, *(f"assets/{name}" for name in ASSET_NAMES)]
    return frozenset([*crops, *page_files, *fixed])
