"""Export: crops from one region read per tile, pages and index (escaped), QuPath GeoJSON, Label Studio."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import shapely
from PIL import Image
from shapely.geometry import shape

from mk_hspc.export.build import plan_site, write_site
from mk_hspc.export.crops import CropSpec, crop_box, crop_side_px, crops_region, cut_padded, outline_array
from mk_hspc.export.files import safe_relative, write_files
from mk_hspc.export.interop import label_studio_tasks, qupath_geojson
from mk_hspc.export.site import assign_pages
from mk_hspc.labels.contract import parse_label_file
from mk_hspc.params_schema import ParameterError, validate_parameters
from tests.annotation_fixtures import EVIL_SLIDE, EXPORT_PARAMS, Study, make_study
from tests.test_parameters import load_parameters


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Study:
    return make_study(tmp_path_factory.mktemp("study"))


class CountingSlide:
    def __init__(self, slide, reads: list) -> None:
        self._slide, self._reads = slide, reads

    def read_region(self, *args, **kwargs):
        self._reads.append(args)
        return self._slide.read_region(*args, **kwargs)

    def close(self) -> None:
        self._slide.close()


@pytest.fixture(scope="module")
def site(study: Study, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    reads: list = []
    loaders = {name: (lambda f=f: CountingSlide(f(), reads)) for name, f in study.loaders().items()}
    folder = tmp_path_factory.mktemp("site") / "site"
    write_site(plan_site(study.cells, study.store, loaders, EXPORT_PARAMS), folder)
    return folder, reads


def test_one_region_read_per_tile_and_one_crop_per_cell(study: Study, site: tuple[Path, list]) -> None:
    """One read per tile, of the part of its window that its crops need (crops_region), never one per cell."""
    folder, reads = site
    expected = []
    for tile_id in study.store.tiles:
        tile_cells = study.cells[study.cells["tile_id"] == tile_id]
        needed = [
            (
                tile_cells[tile_cells["cell_type"] == cell_type].to_dict("records"),
                CropSpec(c["crop_um"], c["output_px"]),
            )
            for cell_type, c in EXPORT_PARAMS["cell_types"].items()
        ]
        expected.append(crops_region(needed, study.store.read(tile_id).pixel_size_um))
    assert sorted(reads) == sorted(expected)
    crops = sorted(folder.glob("crops/*/*.webp"))
    assert sorted(p.stem for p in crops) == sorted(study.cells["cell_id"])
    for crop in crops:
        image = Image.open(io.BytesIO(crop.read_bytes()))
        cell_type = crop.stem.rsplit("_", 2)[1]
        side = EXPORT_PARAMS["cell_types"][cell_type]["output_px"]
        assert image.format == "WEBP" and image.size == (side, side)


def test_crop_is_centred_on_the_cell_and_normalised(site: tuple[Path, list], study: Study) -> None:
    folder, _ = site
    mk = study.cells[study.cells["cell_type"] == "mk"].iloc[0]
    image = np.asarray(Image.open(folder / "crops" / mk["tile_id"] / f"{mk['cell_id']}.webp").convert("RGB"))
    centre, corner = image[28:36, 28:36].mean(), image[:6, :6].mean()
    assert centre < corner - 60  # the dark MK sits in the middle of pale tissue
    assert image.max() >= 240  # stretched: the tissue's bright end maps near white


def test_pages_hold_every_cell_once_in_score_order(study: Study, site: tuple[Path, list]) -> None:
    folder, _ = site
    index = json.loads((folder / "cells.json").read_text())["cells"]
    assert sorted(index) == sorted(study.cells["cell_id"])
    for cell_type in ("mk", "hspc"):
        expected = study.cells[study.cells["cell_type"] == cell_type].sort_values("score", ascending=False)
        seen = []
        pages = sorted((folder / "pages" / cell_type).glob("*.html"))
        assert len(pages) == -(-len(expected) // EXPORT_PARAMS["page_size"])
        for page in pages:
            ids = [
                chunk.split('"', 1)[0].replace("&lt;", "<").replace("&gt;", ">")
                for chunk in page.read_text().split('data-cell="')[1:]
            ]
            assert len(ids) <= EXPORT_PARAMS["page_size"]
            seen += ids
        assert seen == expected["cell_id"].tolist()


def test_slide_names_are_escaped_everywhere(site: tuple[Path, list]) -> None:
    folder, _ = site
    for page in [folder / "index.html", *folder.glob("pages/*/*.html")]:
        text = page.read_text()
        assert "<img src=x" not in text
    index = (folder / "index.html").read_text()
    assert "&lt;img src=x onerror=alert(1)&gt;" in index


def test_site_paths_cannot_leave_the_folder() -> None:
    for bad in ("../x", "/etc/passwd", "a/../../b", "a\\..\\b", "a/./b", "a//b"):
        with pytest.raises(ValueError, match="leave the site"):
            safe_relative(bad)
    assert str(safe_relative("crops/t/c.webp")) == "crops/t/c.webp"


def test_site_files_are_written_in_place_and_never_through_a_link(tmp_path: Path) -> None:
    site, outside = tmp_path / "site", tmp_path / "outside.txt"
    write_files(site, {"index.html": b"a" * 5000, "crops/t/c.jpg": b"c"})
    write_files(site, {"index.html": b"b", "crops/t/c.jpg": b"d" * 9000})  # shorter and longer rewrites
    assert (site / "index.html").read_bytes() == b"b" and (site / "crops/t/c.jpg").read_bytes() == b"d" * 9000
    outside.write_bytes(b"keep")
    (site / "crops/t/link.jpg").symlink_to(outside)  # planted in a reused folder
    with pytest.raises(OSError):
        write_files(site, {"crops/t/link.jpg": b"x"})
    assert outside.read_bytes() == b"keep"
    with pytest.raises(ValueError, match="leave the site"):
        write_files(site, {"../escape.txt": b"x"})
    assert not (tmp_path / "escape.txt").exists()


def test_orders_by_slide_and_seeded_random(study: Study) -> None:
    by_slide = assign_pages(study.cells, ["mk"], 3, "slide", 0)
    assert by_slide["slide"].tolist() == sorted(by_slide["slide"].tolist())
    first = assign_pages(study.cells, ["mk"], 3, "random", 7)["cell_id"].tolist()
    assert first == assign_pages(study.cells, ["mk"], 3, "random", 7)["cell_id"].tolist()
    assert sorted(first) == sorted(study.cells.loc[study.cells["cell_type"] == "mk", "cell_id"])


def test_crop_geometry_pads_outside_the_window() -> None:
    side = crop_side_px(crop_um=10.0, pixel_size_um=0.5, output_px=20)
    # The pixel centred at index 10 spans [9.5, 10.5]: a 20 px window centred on it starts at 0.5, rounded.
    assert (crop_box(10.0, 10.0, side), side) == ((0, 0), 20)
    assert crop_box(10.5, 9.5, side) == (1, 0)
    # 923 px at a 7x reduction to 128: 917 px (131 x 7), so shrink trims nothing.
    assert crop_side_px(60.0, 0.065, 128) == 917
    image = np.zeros((8, 8, 3), np.uint8)
    out = cut_padded(image, -4, -4, 10, fill=255)
    assert out.shape == (10, 10, 3) and out[0, 0, 0] == 255 and out[5, 5, 0] == 0


def test_outline_matches_the_mask() -> None:
    mask = np.zeros((40, 40), bool)
    mask[5:25, 8:30] = True
    polygon = shapely.Polygon(outline_array(mask, tolerance_px=0.1))
    assert polygon.is_valid
    assert polygon.bounds == pytest.approx((8, 5, 30, 25), abs=0.5)
    assert polygon.area == pytest.approx(mask.sum(), rel=0.02)


def test_qupath_geojson_is_valid_and_in_the_bounding_box_frame(study: Study) -> None:
    collections = qupath_geojson(study.cells, study.store, study.slide_meta, ["mk", "hspc"], 0.5)
    assert sorted(collections) == sorted(study.slide_meta)
    for slide, make in collections.items():
        collection = json.loads(json.dumps(make()))
        assert collection["type"] == "FeatureCollection"
        cells = study.cells[study.cells["slide"] == slide].set_index("cell_id")
        assert sorted(f["properties"]["name"] for f in collection["features"]) == sorted(cells.index)
        bbox = study.slide_meta[slide]["bbox"]
        for feature in collection["features"][:4]:
            geometry = shape(feature["geometry"])
            assert geometry.is_valid and feature["properties"]["objectType"] == "detection"
            cell = cells.loc[feature["properties"]["name"]]
            assert feature["properties"]["classification"]["name"] == cell["cell_type"]
            # The outline comes from the tile store's label image: same place and size as the stored cell.
            assert geometry.centroid.x == pytest.approx(cell["centroid_x_px"] - bbox["x"] + 0.5, abs=0.6)
            assert geometry.centroid.y == pytest.approx(cell["centroid_y_px"] - bbox["y"] + 0.5, abs=0.6)
            assert geometry.area == pytest.approx(cell["area_px"], rel=0.08)
            assert feature["properties"]["measurements"]["area_um2"] == pytest.approx(cell["area_um2"])
            # Every pixel of the cell in the tile store's label image lies inside the outline.
            tile = study.store.read(cell["tile_id"])
            rows, cols = np.nonzero(tile.labels[cell["cell_type"]] == cell["label"])
            centres = shapely.points(
                cols + tile.window[0] - bbox["x"] + 0.5, rows + tile.window[1] - bbox["y"] + 0.5
            )
            assert shapely.contains(geometry.buffer(0.5), centres).mean() == 1.0
        assert bbox["x"] != 0  # the fixture's slides are away from the CZI origin, so the shift is tested


def test_label_studio_tasks_round_trip_through_the_importer(study: Study) -> None:
    tasks = label_studio_tasks(study.cells, ["mk", "hspc"], "webp", "http://127.0.0.1:8765/")
    assert len(tasks) == len(study.cells)
    assert tasks[0]["data"]["image"].startswith("http://127.0.0.1:8765/crops/")
    assert "%3Cimg" in next(t["data"]["image"] for t in tasks if t["data"]["slide"] == EVIL_SLIDE)
    # What Label Studio exports after labelling (JSON export): the tasks with annotations added.
    choices = ["Yes", "No", "Unsure"]
    exported = [
        {
            **task,
            "id": number,
            "annotations": [
                {
                    "id": 100 + number,
                    "completed_by": {"id": 3, "email": "ann@lab.org"},
                    "result": [
                        {
                            "from_name": "label",
                            "to_name": "image",
                            "type": "choices",
                            "value": {"choices": [choices[number % 3]]},
                        }
                    ],
                    "was_cancelled": False,
                    "updated_at": "2026-11-30T06:00:00.123456Z",
                }
            ],
        }
        for number, task in enumerate(tasks)
    ]
    events = parse_label_file(json.loads(json.dumps(exported)), source="ls.json")
    assert [(e.cell_id, e.label) for e in events] == [
        (t["data"]["cell_id"], ["yes", "no", "unsure"][n % 3]) for n, t in enumerate(tasks)
    ]
    assert {e.annotator for e in events} == {"labelstudio:ann@lab.org"}


def test_export_parameters_are_checked() -> None:
    params = load_parameters()
    validate_parameters(params)
    params["export"] = {
        **params["export"],
        "order": "size",
        "cell_types": {"rbc": {"crop_um": 5, "output_px": 32}},
    }
    with pytest.raises(ParameterError) as error:
        validate_parameters(params)
    assert "export.order" in str(error.value) and "export.cell_types.rbc" in str(error.value)


def test_readme_gives_the_label_studio_config_the_importer_expects() -> None:
    from mk_hspc.export.interop import LABEL_STUDIO_CONFIG

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert LABEL_STUDIO_CONFIG in readme


def test_a_site_folder_is_made_durable_with_one_syncfs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    from mk_hspc import atomic_io as atomic

    folder = tmp_path / "site"
    folder.mkdir()
    for number in range(atomic.SYNCFS_MIN_FILES + 1):
        (folder / f"{number}.webp").write_bytes(b"x")
    calls = {"fsync": 0, "syncfs": 0}
    real_syncfs = atomic._syncfs
    monkeypatch.setattr(os, "fsync", lambda fd: calls.__setitem__("fsync", calls["fsync"] + 1))
    monkeypatch.setattr(atomic, "_syncfs", lambda path: calls.__setitem__("syncfs", 1) or real_syncfs(path))
    atomic.fsync_tree(folder)
    assert calls == {"fsync": 0, "syncfs": 1}
    atomic.fsync_tree(folder / "0.webp")  # a single file: fsync as before
    assert calls["fsync"] >= 1


def test_the_index_lists_a_slide_without_candidates(study: Study) -> None:
    from mk_hspc.export.site import assign_pages, render_index

    pages = assign_pages(study.cells, ["mk", "hspc"], 4, "score", 0)
    index = render_index(pages, ["mk", "hspc"], [*study.slide_meta, "EMPTY"])
    assert "<th scope=row>EMPTY</th><td>0</td>" in index


def test_site_paths_are_the_files_a_site_holds(study: Study, site: tuple[Path, list]) -> None:
    folder, _ = site
    content = plan_site(study.cells, study.store, study.loaders(), EXPORT_PARAMS)
    on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert content.paths is not None and content.paths() == on_disk


def test_a_reused_site_renames_its_files_to_the_new_names(study: Study, tmp_path: Path) -> None:
    """JPEG -> WebP over a reused folder: every crop file is renamed and rewritten, none created or left."""
    folder = tmp_path / "site"
    write_site(
        plan_site(study.cells, study.store, study.loaders(), {**EXPORT_PARAMS, "image_format": "jpeg"}),
        folder,
    )
    inodes = {p.stat().st_ino for p in folder.rglob("*.jpg")}
    webp = plan_site(study.cells, study.store, study.loaders(), {**EXPORT_PARAMS, "image_format": "webp"})
    write_site(webp, folder)
    on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert on_disk == webp.paths() and not any(folder.rglob("*.jpg"))
    assert {p.stat().st_ino for p in folder.rglob("*.webp")} <= inodes  # the JPEG files' inodes
    fresh = tmp_path / "fresh"
    write_site(
        plan_site(study.cells, study.store, study.loaders(), {**EXPORT_PARAMS, "image_format": "webp"}), fresh
    )
    assert all((folder / name).read_bytes() == (fresh / name).read_bytes() for name in on_disk)


def test_the_next_batch_leads_the_pages_in_rank_order() -> None:
    """`kedro run --pipelines export_next_batch`: the cells the classifier most needs come first; the rest
    follow in the configured order, every cell exactly once."""
    cells = pd.DataFrame(
        {
            "cell_id": [f"s_s0_r000_c000_mk_{i:05d}" for i in range(1, 8)],
            "cell_type": "mk",
            "slide": "s",
            "tile_id": "s_s0_r000_c000",
            "label": range(1, 8),
            "score": [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3],
        }
    )
    first = ["s_s0_r000_c000_mk_00006", "s_s0_r000_c000_mk_00002", "other_s0_r000_c000_hspc_00001"]
    pages = assign_pages(cells, ["mk"], 3, "score", 0, first=first)
    assert pages["cell_id"].str[-1].tolist() == ["6", "2", "1", "3", "4", "5", "7"]
    assert pages["page"].tolist() == [1, 1, 1, 2, 2, 2, 3]


def test_a_next_batch_of_other_candidates_is_refused_naming_them() -> None:
    from mk_hspc.pipelines.export_next_batch.nodes import build_next_batch_site

    cells = pd.DataFrame({"cell_id": ["s_s0_r000_c000_mk_00001"]})
    stale = pd.DataFrame({"cell_id": ["old_s0_r000_c000_mk_00009"], "batch_rank": [0]})
    with pytest.raises(ValueError, match="old_s0_r000_c000_mk_00009"):
        build_next_batch_site(cells, None, {}, stale, stale.iloc[:0], {})
