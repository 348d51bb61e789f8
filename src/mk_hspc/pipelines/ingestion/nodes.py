"""Ingestion nodes: slides -> metadata, slide groups, tissue maps, tile grid, pooled tile sample, overlays.

Thin wrappers: the logic lives in ``mk_hspc.czi``, ``mk_hspc.slide_sheet``, ``mk_hspc.tissue`` and
``mk_hspc.tiling``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from mk_hspc.czi import CziSlide, CziSlideError, check_plausible_pixel_size
from mk_hspc.czi.discovery import find_slides
from mk_hspc.czi.metadata import check_brightfield
from mk_hspc.slide_sheet import validate_slide_sheet
from mk_hspc.tiling import build_tile_grid, sample_tiles
from mk_hspc.tissue import TissueMap, build_tissue_maps, tissue_overlay_figure

logger = logging.getLogger(__name__)

SlideLoaders = Mapping[str, Callable[[], CziSlide]]


def _visible_files(folder: Path) -> list[Path]:
    """Files below ``folder``, leaving out hidden ones (``.DS_Store``, ``.gitkeep``, anything in ``.git/``)."""
    if not folder.is_dir():
        return []
    return sorted(
        path
        for path in folder.rglob("*")
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    )


def prepare_demo_slides(demo: dict[str, Any], slides_dir: str) -> dict[str, Any]:
    """Write the demo study into an empty slides folder (the embedded default); never touch a lab's files.

    Slides are found as the catalog finds them (`find_slides`). With none, the folder must hold no other
    file either (hidden files and the demo writer's own leftovers aside): a folder of files that are not
    slides (wrong suffix, a half-finished copy) is an error, not a cue to write the demo next to them.
    """
    slides_path = Path(slides_dir)
    existing = find_slides(slides_path)
    if existing:
        # The same record whether the demo was written now or earlier, and whatever files the folder holds:
        # it orders the nodes after this one and is part of their lineage, so it must not change because a
        # rerun found the slides in place or a bad file was dropped in (the next node names that file).
        logger.info("%d slide(s) already in %s; no demo written", len(existing), slides_path)
        return {"slides_dir": str(slides_path)}
    from mk_hspc.demo import DemoSpec, demo_files, make_demo_study  # heavy: only when there are no slides

    out_dir = Path(demo["out_dir"])
    demo_slides_dir = (out_dir / "slides").resolve() == slides_path.resolve()
    demo_own = {path.resolve() for path in demo_files(out_dir)} if demo_slides_dir else set()
    others = [path for path in _visible_files(slides_path) if path.resolve() not in demo_own]
    if others:
        shown = ", ".join(str(path.relative_to(slides_path)) for path in others[:5])
        raise FileExistsError(
            f"The slides folder {slides_path.resolve()} is not empty but has no slides (.czi files, any "
            f"letter case): {len(others)} other file(s), e.g. {shown}. Put the study's .czi files there, "
            "or empty the folder to run on the demo study."
        )
    if not demo["generate_if_empty"]:
        raise FileNotFoundError(
            f"No .czi slides in {slides_path.resolve()}; put the study's slides there "
            "(or set demo.generate_if_empty: true to run on the demo study)"
        )
    if not demo_slides_dir:
        # A slides folder of the lab's own (globals: slides_dir) with no slides: a typo, an unmounted share,
        # or a scan still copying; the demo is written only into its own folder, so say what is missing.
        state = "does not exist" if not slides_path.exists() else "holds no .czi files (any letter case)"
        raise FileNotFoundError(
            f"No slides: the slides folder {slides_path.resolve()} {state}. Check globals: slides_dir "
            f"(conf/local/globals.yml); the demo study is written only when the slides folder is "
            f"demo.out_dir/slides ({out_dir / 'slides'})."
        )
    if Path(demo["slide_sheet"]).resolve() != (out_dir / "slide_sheet.csv").resolve():
        raise ValueError(
            f"The demo writes its slide sheet to {out_dir / 'slide_sheet.csv'} but the catalog reads "
            f"{demo['slide_sheet']} (globals: slide_sheet); point them at the same file to run the demo"
        )
    spec = getattr(DemoSpec, demo.get("spec", "default"))()
    spec = dataclasses.replace(spec, **(demo.get("overrides") or {}))
    logger.info("No slides in %s: writing the demo study (%d slides)", slides_path, spec.n_slides)
    make_demo_study(out_dir, spec)
    return {"slides_dir": str(slides_path)}


def _open_checked(
    load: Callable[[], CziSlide], plausible_pixel_size_um: tuple[float, float] | None
) -> CziSlide:
    slide = load()
    with ExitStack() as stack:
        stack.enter_context(slide)  # closed if a check fails
        check_brightfield(slide.meta)
        if plausible_pixel_size_um is not None:
            check_plausible_pixel_size(slide.meta, plausible_pixel_size_um)
        stack.pop_all()
    return slide


def _open_into(
    stack: ExitStack,
    raw_slides: SlideLoaders,
    skip_bad_slides: bool,
    only: set[str] | None,
    plausible_pixel_size_um: tuple[float, float] | None,
) -> dict[str, CziSlide]:
    slides: dict[str, CziSlide] = {}
    for name in sorted(raw_slides):
        if only is not None and name not in only:
            continue
        try:
            slide = _open_checked(raw_slides[name], plausible_pixel_size_um)
        except CziSlideError as exc:
            if not skip_bad_slides:
                raise
            logger.warning("Skipping bad slide %s: %s", name, exc)
            continue
        slides[name] = stack.enter_context(slide)
    return slides


@contextmanager
def open_slides(
    raw_slides: SlideLoaders,
    skip_bad_slides: bool,
    only: set[str] | None = None,
    plausible_pixel_size_um: tuple[float, float] | None = None,
) -> Iterator[dict[str, CziSlide]]:
    """Open each slide lazily for a ``with`` block that closes every one of them however it ends.

    A bad file (`CziSlideError` at open) stops the run, named, unless ``skip_bad_slides``: then it is
    skipped with a warning. With ``plausible_pixel_size_um``, a slide whose pixel size lies outside it is a
    bad slide too (`check_plausible_pixel_size`), as is one that is not a brightfield RGB image
    (`check_brightfield`).
    """
    with ExitStack() as stack:
        yield _open_into(stack, raw_slides, skip_bad_slides, only, plausible_pixel_size_um)


def read_slide_metadata(
    raw_slides: SlideLoaders, demo_manifest: dict[str, Any], ingestion: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """Metadata of every readable slide; this is also the list of slides later nodes use."""
    del demo_manifest  # only orders this node after the demo writer
    if not raw_slides:
        raise FileNotFoundError(f"No .czi slides found in {Path(ingestion['slides_dir']).resolve()}")
    plausible = tuple(ingestion["plausible_pixel_size_um"])
    with open_slides(raw_slides, ingestion["skip_bad_slides"], plausible_pixel_size_um=plausible) as slides:
        if not slides:
            raise CziSlideError(ingestion["slides_dir"], "no readable slide in the folder (all were skipped)")
        return {name: slide.meta.to_dict() for name, slide in slides.items()}


def make_slide_groups(
    slide_sheet: pd.DataFrame | None,
    slide_meta: dict[str, dict[str, Any]],
    slide_sheet_strict: bool,
    sheet_path: str,
) -> pd.DataFrame:
    """One group per slide of the study from the lab's sheet (see `validate_slide_sheet`).

    ``sheet_path`` is where the catalog's ``slide_sheet`` reads from (globals ``slide_sheet``), passed only
    to name the file in messages.
    """
    return validate_slide_sheet(slide_sheet, slide_meta, sheet_path=sheet_path, strict=slide_sheet_strict)


def make_tissue_maps(
    raw_slides: SlideLoaders, slide_meta: dict[str, dict[str, Any]], ingestion: dict[str, Any]
) -> tuple[dict[str, TissueMap], dict[str, Any]]:
    """Low-resolution tissue maps of all slides with one threshold calibrated on all of them together.

    A slide that fails while being read stops the run, named, unless ``skip_bad_slides``: then it gets no
    map (and so no tiles) and the calibration's ``skipped_slides`` says why.
    """
    with open_slides(raw_slides, skip_bad_slides=False, only=set(slide_meta)) as slides:
        return build_tissue_maps(slides, skip_unreadable=ingestion["skip_bad_slides"], **ingestion["tissue"])


def make_tile_index(
    slide_meta: dict[str, dict[str, Any]],
    tissue_maps: Mapping[str, Callable[[], TissueMap]],
    ingestion: dict[str, Any],
) -> pd.DataFrame:
    """The tile grid of every slide that has a tissue map, with each tile's tissue fraction."""
    names = sorted(set(slide_meta) & set(tissue_maps))
    loaded = {name: tissue_maps[name]() for name in names}
    tiles = ingestion["tiles"]
    return build_tile_grid(
        {name: slide_meta[name] for name in names},
        loaded,
        tile_px=tiles["tile_px"],
        overlap_um=tiles["largest_cell_um"],
        min_tissue_fraction=tiles["min_tissue_fraction"],
    )


def make_tile_sample(tile_index: pd.DataFrame, ingestion: dict[str, Any]) -> pd.DataFrame:
    """Seeded sample of tissue tiles drawn from the pooled tiles of all slides."""
    return sample_tiles(tile_index, **ingestion["sampling"])


def plot_tissue_overlays(
    tissue_maps: Mapping[str, Callable[[], TissueMap]], tile_index: pd.DataFrame, tile_sample: pd.DataFrame
) -> dict[str, Figure]:
    """One PNG per slide: thumbnail, tissue outline, tissue tiles and the sampled ones."""
    sampled = set(tile_sample["tile_id"])
    figures = {}
    for name in sorted(tissue_maps):
        tiles = tile_index[tile_index["slide"] == name]
        figures[f"{name}.png"] = tissue_overlay_figure(tissue_maps[name](), tiles, sampled)
    return figures
