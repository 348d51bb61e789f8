"""Write a demo study: real CZI mosaics of synthetic H&E marrow plus their ground truth.

Layout of ``out_dir``::

    slides/<slide>.czi                 Bgr24 mosaic (one subblock set per generation tile), zstd
    ground_truth/cells.parquet         one row per object (targets and confounders) with its true type and outline
    ground_truth/tissue/<slide>.npz    boolean tissue mask at a stated downsample and origin
    slide_sheet.csv                    slide, group, sex, treatment
    demo_manifest.json                 the spec and the files written; a rerun with the same spec does nothing

Slides are generated tile by tile (memory stays bounded) and in parallel processes, one per slide.

The writer only ever replaces or deletes its own files: those its manifest lists, unchanged since (same size
and modification time). The manifest is written before generation starts (listing the files about to be
written) and again at the end with their stamps, so an interrupted run can be resumed. Any other file in
the way (a lab's ``slide_sheet.csv`` or ``ground_truth/``) stops the writer with an error naming it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing as mp
import os
import queue as queue_module
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from mk_hspc.demo.cells import (
    CELL_TYPES,
    TARGET_TYPES,
    place_cells,
    place_discs,
    polygon_area_px2,
    polygon_centroid,
    polygon_xy,
    small_cell_polygon_xy,
)
from mk_hspc.demo.layout import build_layout
from mk_hspc.demo.render import SlideScene, TextureBanks, build_banks, render_tile
from mk_hspc.demo.spec import GENERATOR_VERSION, DemoSpec

logger = logging.getLogger(__name__)

MANIFEST_NAME = "demo_manifest.json"
CELL_COLUMNS = [
    "cell_id",
    "slide",
    "cell_type",
    "centroid_x_px",
    "centroid_y_px",
    "area_um2",
    "bbox_x",
    "bbox_y",
    "bbox_w",
    "bbox_h",
    "polygon_xy",
    "is_target",
]


@dataclass(frozen=True)
class DemoStudy:
    """Where a demo study lives; ``generated`` is False when an identical study was already there."""

    out_dir: Path
    spec: DemoSpec
    slide_paths: dict[str, Path]
    cells_path: Path
    tissue_dir: Path
    slide_sheet_path: Path
    manifest_path: Path
    generated: bool

    def tissue_path(self, slide: str) -> Path:
        return self.tissue_dir / f"{slide}.npz"


def slide_name(index: int) -> str:
    return f"demo_{index + 1:02d}"


def _slide_rng(spec: DemoSpec, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([spec.seed, index, stream]))


def slide_origin(spec: DemoSpec, index: int) -> tuple[int, int]:
    """Absolute CZI position of the slide's top-left pixel; never (0, 0), negative for some slides."""
    x, y = _slide_rng(spec, index, 0).integers(*spec.origin_range_px, size=2)
    if index == 0:  # guarantee a negative origin somewhere
        x = -abs(int(x)) - 1
    return int(x), int(y) or 1


def build_scene(spec: DemoSpec, index: int, banks: TextureBanks) -> SlideScene:
    """Draw one slide's anatomy and cells (deterministic for the spec's seed and the slide index)."""
    group = spec.groups[index % len(spec.groups)]
    layout = build_layout(_slide_rng(spec, index, 1), spec)
    large, small = place_cells(
        _slide_rng(spec, index, 2),
        spec,
        layout,
        banks.small,
        group.mk_density_factor,
        group.hspc_density_factor,
    )
    rng = _slide_rng(spec, index, 3)
    px = spec.pixel_size_um
    rbc_r = spec.rbc_diameter_um[1] / 2 / px
    rbc = place_discs(
        rng, layout, int(rng.poisson(spec.rbc_per_mm2 * layout.marrow_area_mm2)), rbc_r, 12, "marrow", px
    )
    bone_mm2 = float((layout.bone_sdf_um < 0).sum()) * (layout.field_downsample * px / 1000) ** 2
    lacunae = place_discs(rng, layout, int(rng.poisson(600.0 * bone_mm2)), 6.0 / px, 12, "bone", px)
    gain_h, gain_e = 1.0 + spec.stain_strength_jitter * rng.uniform(-1, 1, 2)
    offset = tuple(int(v) for v in rng.integers(0, 1 << 16, 2))
    return SlideScene(layout, large, small, rbc, lacunae, float(gain_h), float(gain_e), offset)


def _truth_rows(
    polygons: list[np.ndarray], slide: str, cell_type: str, origin: tuple[int, int], px_um: float
) -> list[dict]:
    """Ground-truth rows from slide-local outlines (pixel-centre convention, like regionprops)."""
    rows = []
    for i, local_xy in enumerate(polygons):
        xy = local_xy.copy()
        xy[:, 0] += origin[0]
        xy[:, 1] += origin[1]
        area_px2 = polygon_area_px2(xy)
        cx, cy = polygon_centroid(xy)
        x0, y0 = np.floor(xy.min(axis=0)).astype(int)
        x1, y1 = np.ceil(xy.max(axis=0)).astype(int)
        rows.append(
            {
                "cell_id": f"{slide}_{cell_type}_{i:05d}",
                "slide": slide,
                "cell_type": cell_type,
                "centroid_x_px": cx,
                "centroid_y_px": cy,
                "area_um2": area_px2 * px_um**2,
                "bbox_x": int(x0),
                "bbox_y": int(y0),
                "bbox_w": int(x1 - x0 + 1),
                "bbox_h": int(y1 - y0 + 1),
                "polygon_xy": np.round(xy.ravel(), 2).tolist(),
                "is_target": cell_type in TARGET_TYPES,
            }
        )
    return rows


def _write_czi(
    path: Path,
    scene: SlideScene,
    banks: TextureBanks,
    spec: DemoSpec,
    index: int,
    origin: tuple[int, int],
    tick,
) -> None:
    """Render the slide tile by tile straight into a CZI mosaic (written to a temp name, then renamed)."""
    from pylibCZIrw import czi as pyczi

    tmp = path.with_suffix(".czi.part")
    tmp.unlink(missing_ok=True)
    tile = spec.tile_px
    with pyczi.create_czi(str(tmp), exist_ok=True, compression_options=spec.compression) as writer:
        for ty in range(0, spec.height_px, tile):
            for tx in range(0, spec.width_px, tile):
                h, w = min(tile, spec.height_px - ty), min(tile, spec.width_px - tx)
                rng = np.random.default_rng(np.random.SeedSequence([spec.seed, index, 4, ty, tx]))
                bgr = render_tile(scene, banks, spec, ty, tx, h, w, rng, bgr=True)  # CZI stores Bgr24
                writer.write(
                    data=bgr,
                    location=(origin[0] + tx, origin[1] + ty),
                    plane={"T": 0, "Z": 0, "C": 0},
                )
                tick(1)
        writer.write_metadata(
            document_name=path.stem,
            channel_names={0: "TL Brightfield"},
            # libCZI stores scaling in metres (the Distance/Value of the XML), whatever the docstring says
            scale_x=spec.pixel_size_um * 1e-6,
            scale_y=spec.pixel_size_um * 1e-6,
        )
    os.replace(tmp, path)


def _n_tiles(spec: DemoSpec) -> int:
    return -(-spec.width_px // spec.tile_px) * -(-spec.height_px // spec.tile_px)


_BANKS: dict[str, TextureBanks] = {}


def _banks_for(spec: DemoSpec) -> TextureBanks:
    """The study's banks, built once per process (they depend on the whole spec, not only the seed)."""
    key = json.dumps(spec.to_dict(), sort_keys=True)
    if key not in _BANKS:
        _BANKS.clear()
        _BANKS[key] = build_banks(spec)
    return _BANKS[key]


def _generate_slide(out_dir: Path, spec: DemoSpec, index: int, queue: Any = None, tick=None) -> list[dict]:
    """Write one slide's CZI and tissue truth; returns its ground-truth cell rows."""
    name = slide_name(index)
    origin = slide_origin(spec, index)
    banks = _banks_for(spec)
    scene = build_scene(spec, index, banks)
    if tick is None:

        def tick(n: int) -> None:
            if queue is not None:
                queue.put(n)

    _write_czi(out_dir / "slides" / f"{name}.czi", scene, banks, spec, index, origin, tick)
    np.savez_compressed(
        out_dir / "ground_truth" / "tissue" / f"{name}.npz",
        mask=scene.layout.tissue_mask,
        origin_x=origin[0],
        origin_y=origin[1],
        downsample=scene.layout.tissue_mask_downsample,
        pixel_size_um=spec.pixel_size_um,
        slide=name,
    )
    px = spec.pixel_size_um
    polygons: dict[str, list[np.ndarray]] = {cell_type: [] for cell_type in CELL_TYPES}
    for i, cell_type in enumerate(scene.large.cell_type):
        polygons[cell_type].append(polygon_xy(scene.large.outline, i, n_vertices=96))
    small_types = scene.small.kind(banks.small)
    for i in range(len(scene.small)):
        polygons[CELL_TYPES[small_types[i]]].append(small_cell_polygon_xy(banks.small, scene.small, i))
    rows: list[dict] = []
    for cell_type in CELL_TYPES:  # targets first, then the confounders, each numbered from 0
        rows += _truth_rows(polygons[cell_type], name, cell_type, origin, px)
    return rows


def _manifest(spec: DemoSpec) -> dict[str, Any]:
    return {"generator_version": GENERATOR_VERSION, "spec": spec.to_dict()}


def _study(out_dir: Path, spec: DemoSpec, generated: bool) -> DemoStudy:
    return DemoStudy(
        out_dir=out_dir,
        spec=spec,
        slide_paths={
            slide_name(i): out_dir / "slides" / f"{slide_name(i)}.czi" for i in range(spec.n_slides)
        },
        cells_path=out_dir / "ground_truth" / "cells.parquet",
        tissue_dir=out_dir / "ground_truth" / "tissue",
        slide_sheet_path=out_dir / "slide_sheet.csv",
        manifest_path=out_dir / MANIFEST_NAME,
        generated=generated,
    )


def _study_files(study: DemoStudy) -> list[Path]:
    """Every file writing ``study`` creates or replaces (the slides' temporary ``.czi.part`` names too)."""
    paths = [study.cells_path, study.slide_sheet_path]
    for name, path in study.slide_paths.items():
        paths += [path, path.with_suffix(".czi.part"), study.tissue_path(name)]
    return paths


def _stamp(path: Path) -> dict[str, int]:
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _read_manifest(manifest_path: Path) -> dict[str, Any] | None:
    """The manifest as written by this module, None when there is none; an alien file is an error."""
    if not manifest_path.exists():
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
        DemoSpec.from_dict(manifest["spec"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise FileExistsError(
            f"{manifest_path} is not a demo manifest this writer can read ({error}); the demo writer does "
            "not overwrite files it cannot prove it wrote. Move it away (and anything else of the old study) "
            "or choose another demo.out_dir."
        ) from None
    return manifest


# Files a lab writes itself under the same names (its slide sheet, its ground truth): the writer claims them
# only with a stamp that proves it wrote them, never on the word of an unfinished run's plan.
LAB_FILES = ("slide_sheet.csv", "ground_truth/cells.parquet")


def _owned_files(out_dir: Path, manifest: dict[str, Any] | None) -> set[Path]:
    """Files of ``out_dir`` the writer wrote, by its manifest: listed and unchanged since.

    A file listed without a stamp was about to be written by a run that did not finish: a generated slide or
    tissue file of it is the writer's, but a slide sheet or ground-truth table there now may be the lab's,
    written after the interruption, so those count only with a matching stamp. A manifest from before files
    were listed names its spec, which gives the files (the lab files again only as stamped ones: none).
    """
    if manifest is None:
        return set()
    listed = manifest.get("files")
    if listed is None:
        listed = {
            path.relative_to(out_dir).as_posix(): None
            for path in _study_files(_study(out_dir, DemoSpec.from_dict(manifest["spec"]), False))
        }
    owned = set()
    for relative, stamp in listed.items():
        path = out_dir / relative
        planned_only = stamp is None and relative not in LAB_FILES
        if planned_only or (stamp is not None and path.is_file() and _stamp(path) == stamp):
            owned.add(path)
    return owned


def demo_files(out_dir: Path | str) -> set[Path]:
    """Files in ``out_dir`` that the demo writer wrote (finished or not) and nobody changed since."""
    out_dir = Path(out_dir)
    return _owned_files(out_dir, _read_manifest(out_dir / MANIFEST_NAME))


def _write_manifest(manifest_path: Path, manifest: dict[str, Any]) -> None:
    tmp = manifest_path.with_suffix(".json.part")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, manifest_path)


def slide_sheet(spec: DemoSpec) -> pd.DataFrame:
    """Slides spread evenly over the groups (slide i goes to group i mod n_groups)."""
    rows = []
    for i in range(spec.n_slides):
        group = spec.groups[i % len(spec.groups)]
        rows.append(
            {"slide": slide_name(i), "group": group.name, "sex": group.sex, "treatment": group.treatment}
        )
    return pd.DataFrame(rows)


def make_demo_study(
    out_dir: Path | str, spec: DemoSpec, progress: bool = True, n_workers: int = 2
) -> DemoStudy:
    """Write the demo study described by ``spec`` into ``out_dir`` (idempotent).

    When ``out_dir`` already holds a complete study written from the same spec (and generator
    version), nothing is rewritten. ``n_workers`` slides are generated at once in separate
    processes; the output does not depend on it.

    Raises:
        FileExistsError: a file the study would write is already there and the writer did not write it
            (see the module docstring); the message names it. Nothing is written or deleted then.

    Example:
        >>> study = make_demo_study("data/01_raw", DemoSpec.small())  # doctest: +SKIP
        >>> sorted(study.slide_paths)[:1]  # doctest: +SKIP
        ['demo_01']
    """
    out_dir = Path(out_dir)
    study = _study(out_dir, spec, generated=False)
    manifest_path = study.manifest_path
    wanted = json.loads(json.dumps(_manifest(spec)))
    old = _read_manifest(manifest_path)
    owned = _owned_files(out_dir, old)
    planned = _study_files(study)
    if (
        old is not None
        and {key: old.get(key) for key in wanted} == wanted
        and old.get("complete", True)  # manifests without the flag were written last, so complete
        and all(path in owned and path.is_file() for path in planned if not path.name.endswith(".part"))
    ):
        logger.info("Demo study in %s is up to date; not regenerating", out_dir)
        return study
    foreign = [path for path in planned if path.exists() and path not in owned]
    if foreign:
        raise FileExistsError(
            f"The demo writer will not overwrite {foreign[0]}: it did not write it (its manifest "
            f"{manifest_path} does not list it, or the file changed since). Move it away or choose another "
            "demo.out_dir" + (f" ({len(foreign) - 1} more file(s) in the way)" if len(foreign) > 1 else "")
        )
    for path in owned - set(planned):  # the files of an older demo study
        path.unlink(missing_ok=True)
    relative = [path.relative_to(out_dir).as_posix() for path in planned]
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_manifest(manifest_path, wanted | {"complete": False, "files": dict.fromkeys(relative)})
    for sub in ("slides", "ground_truth/tissue"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)

    total = spec.n_slides * _n_tiles(spec)
    rows: list[dict] = []
    with tqdm(total=total, desc="demo slides (tiles)", unit="tile", disable=not progress) as bar:
        if n_workers <= 1 or spec.n_slides == 1:
            for i in range(spec.n_slides):
                rows += _generate_slide(out_dir, spec, i, tick=bar.update)
        else:
            rows += _generate_parallel(out_dir, spec, min(n_workers, spec.n_slides), bar)

    cells = pd.DataFrame(rows, columns=CELL_COLUMNS)
    cells.to_parquet(out_dir / "ground_truth" / "cells.parquet", index=False)
    slide_sheet(spec).to_csv(out_dir / "slide_sheet.csv", index=False)
    written = {name: _stamp(path) for name, path in zip(relative, planned, strict=True) if path.exists()}
    _write_manifest(manifest_path, wanted | {"complete": True, "files": written})
    return _study(out_dir, spec, generated=True)


def _generate_parallel(out_dir: Path, spec: DemoSpec, n_workers: int, bar: tqdm) -> list[dict]:
    """One process per slide at a time; workers report finished tiles through a queue for the bar."""
    ctx = mp.get_context("spawn")  # fork is unsafe once torch/kedro threads exist in the parent
    with ctx.Manager() as manager:
        queue = manager.Queue()
        with ProcessPoolExecutor(max_workers=n_workers, mp_context=ctx) as pool:
            futures = [pool.submit(_generate_slide, out_dir, spec, i, queue) for i in range(spec.n_slides)]
            while not all(f.done() for f in futures):
                with contextlib.suppress(queue_module.Empty):
                    bar.update(queue.get(timeout=0.2))
            while not queue.empty():
                bar.update(queue.get())
            rows: list[dict] = []
            for future in futures:  # in slide order, so the table is deterministic
                rows += future.result()
    return rows


def load_tissue_truth(npz_path: Path | str) -> tuple[np.ndarray, int, int, int]:
    """``(mask, origin_x, origin_y, downsample)`` of a ground-truth tissue file."""
    with np.load(npz_path) as data:
        return data["mask"], int(data["origin_x"]), int(data["origin_y"]), int(data["downsample"])


def tile_tissue_fraction_truth(npz_path: Path | str, x: int, y: int, w: int, h: int) -> float:
    """True fraction of the absolute-pixel box ``(x, y, w, h)`` covered by tissue.

    Each mask cell ``(i, j)`` stands for the full-resolution block starting at
    ``(origin_x + j * downsample, origin_y + i * downsample)``; the fraction weights each cell by its
    exact overlap with the box. Area outside the slide counts as glass.
    """
    mask, ox, oy, ds = load_tissue_truth(npz_path)
    if w <= 0 or h <= 0:
        raise ValueError("box must have positive size")

    def overlap(start: int, size: int, origin: int, n: int) -> np.ndarray:
        lo = origin + np.arange(n) * ds
        return np.clip(np.minimum(lo + ds, start + size) - np.maximum(lo, start), 0, None).astype(np.float64)

    wy = overlap(y, h, oy, mask.shape[0])
    wx = overlap(x, w, ox, mask.shape[1])
    return float(wy @ mask.astype(np.float64) @ wx) / (w * h)


__all__ = [
    "DemoStudy",
    "demo_files",
    "load_tissue_truth",
    "make_demo_study",
    "slide_sheet",
    "tile_tissue_fraction_truth",
]
