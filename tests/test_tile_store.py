"""The HDF5 tile store: round trip, atomic writes, and never trusting partial, damaged or stale files."""

from __future__ import annotations

import dataclasses
import logging

import h5py
import numpy as np
import pandas as pd
import pytest

from mk_hspc.tile_store import (
    FORMAT_VERSION,
    TMP_SUFFIX,
    TileResult,
    TileStatus,
    is_tile_done,
    label_outlines,
    read_tile_outlines,
    read_tile_result,
    remove_temporary_files,
    slide_from_tile_id,
    tile_path,
    tile_status,
    write_tile_result,
)

LZ4_FILTER_ID = 32004
TILE_ID = "slide_b_2_s1_r003_c004"


def make_result(params_hash: str = "abc123", n_cells: int = 3) -> TileResult:
    rng = np.random.default_rng(1)
    labels = np.zeros((300, 260), np.int32)
    for k in range(1, n_cells + 1):
        labels[20 * k : 20 * k + 10, 30 : 30 + 5 * k] = k
    cell_ids = [f"{TILE_ID}_mk_{k:05d}" for k in range(1, n_cells + 1)]
    cells = pd.DataFrame(
        {
            "cell_id": cell_ids,
            "cell_type": ["mk"] * n_cells,
            "label": np.arange(1, n_cells + 1, dtype=np.int32),
            "centroid_x_um": rng.random(n_cells),
            "area_um2": rng.random(n_cells),
            "score": np.ones(n_cells, np.float32),
            "bbox_x": np.arange(n_cells, dtype=np.int64),
        }
    )
    features = {
        "morphology": pd.DataFrame(
            rng.random((n_cells, 2)).astype(np.float32),
            columns=["morphology_a", "morphology_b"],
            index=pd.Index(cell_ids, name="cell_id"),
        ),
        "resnet50": pd.DataFrame(
            rng.random((n_cells, 8)).astype(np.float32),
            columns=[f"resnet50_{i:04d}" for i in range(8)],
            index=pd.Index(cell_ids, name="cell_id"),
        ),
    }
    return TileResult(
        tile_id=TILE_ID,
        slide="slide_b_2",
        window=(-50, 100, 260, 300),
        core=(-40, 110, 240, 280),
        pixel_size_um=0.1725,
        params_hash=params_hash,
        labels={"mk": labels, "hspc": np.zeros_like(labels)},
        cells=cells,
        features=features,
        segmenters={"mk": "classical", "hspc": "classical"},
    )


def test_slide_is_parsed_from_tile_id_even_with_underscores():
    assert slide_from_tile_id(TILE_ID) == "slide_b_2"
    with pytest.raises(ValueError):
        slide_from_tile_id("not-a-tile")


def test_round_trip_preserves_everything(tmp_path):
    result = make_result()
    path = write_tile_result(tmp_path, result, label_chunk_px=128)
    assert path == tmp_path / "slide_b_2" / f"{TILE_ID}.h5"
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind
    back = read_tile_result(tmp_path, TILE_ID)
    assert (back.tile_id, back.slide, back.window, back.core) == (
        result.tile_id,
        result.slide,
        result.window,
        result.core,
    )
    assert back.pixel_size_um == result.pixel_size_um and back.params_hash == result.params_hash
    assert back.segmenters == result.segmenters
    assert list(back.labels) == ["mk", "hspc"]
    for name, labels in result.labels.items():
        assert back.labels[name].dtype == np.int32 and np.array_equal(back.labels[name], labels)
    pd.testing.assert_frame_equal(back.cells, result.cells, check_dtype=False)
    for column in ("label", "score", "bbox_x"):
        assert back.cells[column].dtype == result.cells[column].dtype
    for name, frame in result.features.items():
        pd.testing.assert_frame_equal(back.features[name], frame)
    only_morphology = read_tile_result(tmp_path, TILE_ID, include_labels=False, feature_names=["morphology"])
    assert only_morphology.labels == {} and list(only_morphology.features) == ["morphology"]


def test_labels_are_chunked_and_lz4_compressed(tmp_path):
    path = write_tile_result(tmp_path, make_result(), label_chunk_px=128)
    with h5py.File(path, "r") as h5:
        dataset = h5["labels/mk"]
        assert dataset.chunks == (128, 128)
        plist = dataset.id.get_create_plist()
        assert [plist.get_filter(i)[0] for i in range(plist.get_nfilters())] == [LZ4_FILTER_ID]
        assert dataset.id.get_storage_size() < dataset.size * 4 / 10  # mostly background: compresses well
        # only chunks holding cells are stored; background chunks read back as 0 (checked in the round trip)
        assert 0 < dataset.id.get_num_chunks() < 3 * 3
        assert h5["labels/hspc"].id.get_num_chunks() == 0


def boundary_pixels(mask: np.ndarray) -> set[tuple[int, int]]:
    """(x, y) of the mask's pixels with a 4-neighbour outside it (or outside the image)."""
    padded = np.pad(mask, 1)
    inner = padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    rows, cols = np.nonzero(mask & ~inner)
    return set(zip(cols.tolist(), rows.tolist(), strict=True))


def test_outlines_are_stored_per_cell_type_on_each_cells_boundary(tmp_path):
    """Every cell's outline runs over its own boundary pixels, around all of it (its largest part)."""
    labels = np.zeros((120, 100), np.int32)
    labels[10:30, 5:40] = 1  # a rectangle
    rows, cols = np.mgrid[0:120, 0:100]
    labels[(cols - 70) ** 2 + (rows - 60) ** 2 <= 15**2] = 2  # a disc
    labels[100:120, 90:100] = 3  # at the window's corner
    labels[50:52, 5:7] = 3  # and a small second part, which the outline leaves out
    result = make_result()
    result.labels = {"mk": labels, "hspc": np.zeros_like(labels)}
    write_tile_result(tmp_path, result)
    read = read_tile_outlines(tmp_path, TILE_ID, ["mk", "hspc"])
    assert (read.tile_id, read.slide, read.window) == (TILE_ID, "slide_b_2", (-50, 100, 260, 300))
    assert read.outlines["hspc"].xy.shape == (0, 2) and list(read.outlines["hspc"].start) == [0]
    outlines = read.outlines["mk"]
    assert outlines.xy.dtype == np.int32 and len(outlines.start) == 4
    for label, part in ((1, labels == 1), (2, labels == 2), (3, (labels == 3) & (rows >= 100))):
        points = outlines.of(label)
        assert set(map(tuple, points.tolist())) <= boundary_pixels(part), label
        # around the whole part: the polygon through the points covers it but for its boundary's half pixels
        x, y = points[:, 0].astype(float), points[:, 1].astype(float)
        polygon_area = abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))) / 2
        assert part.sum() - len(boundary_pixels(part)) <= polygon_area <= part.sum(), label
    assert np.array_equal(outlines.xy, label_outlines(labels).xy)
    with pytest.raises(KeyError, match="no outlines 'blob'"):
        read_tile_outlines(tmp_path, TILE_ID, ["blob"])


def test_outlines_traced_in_the_cells_tables_boxes_equal_those_found_in_the_image(tmp_path):
    """The writer traces each cell in its cells-table box (no pass over the image); the result is the same,
    and a table that does not describe the labels falls back to finding them."""
    labels = np.zeros((300, 260), np.int32)
    labels[20:60, 10:50] = 1
    labels[100:130, 200:260] = 2  # touching the window's right edge
    labels[250:300, 0:20] = 3
    result = make_result()
    x, y = result.window[:2]
    boxes = {1: (10, 20, 40, 40), 2: (200, 100, 60, 30), 3: (0, 250, 20, 50)}  # x, y, w, h in the window
    result.cells = result.cells.assign(
        bbox_x=[x + boxes[k][0] for k in (1, 2, 3)],
        bbox_y=[y + boxes[k][1] for k in (1, 2, 3)],
        bbox_w=[boxes[k][2] for k in (1, 2, 3)],
        bbox_h=[boxes[k][3] for k in (1, 2, 3)],
    )
    result.labels = {"mk": labels, "hspc": np.zeros_like(labels)}
    expected = label_outlines(labels)
    write_tile_result(tmp_path, result)
    assert np.array_equal(read_tile_outlines(tmp_path, TILE_ID, ["mk"]).outlines["mk"].xy, expected.xy)
    # boxes that are not the cells' (a table from another tile, or wrong): found in the image instead
    for row, column, value in ((1, "bbox_x", x + 250), (0, "bbox_w", 20), (2, "bbox_h", -3)):
        wrong = result.cells.copy()
        wrong.loc[row, column] = value
        write_tile_result(tmp_path, dataclasses.replace(result, cells=wrong))
        traced = read_tile_outlines(tmp_path, TILE_ID, ["mk"]).outlines["mk"]
        assert np.array_equal(traced.xy, expected.xy), (column, value)


def test_a_tile_file_of_the_previous_format_is_stale(tmp_path):
    """A version-2 file has no outlines: the run recomputes it rather than an export failing on it later."""
    path = write_tile_result(tmp_path, make_result("abc123"))
    with h5py.File(path, "a") as h5:
        h5.attrs["format_version"] = FORMAT_VERSION - 1
        del h5["outlines"]
    assert tile_status(tmp_path, TILE_ID, "abc123") is TileStatus.STALE


def test_empty_tile_round_trips(tmp_path):
    result = make_result(n_cells=0)
    result.features = {"morphology": result.features["morphology"].iloc[:0]}
    write_tile_result(tmp_path, result)
    back = read_tile_result(tmp_path, TILE_ID)
    assert len(back.cells) == 0 and back.features["morphology"].shape == (0, 2)


def test_status_distinguishes_done_missing_stale_and_invalid(tmp_path, caplog):
    assert tile_status(tmp_path, TILE_ID, "abc123") is TileStatus.MISSING
    write_tile_result(tmp_path, make_result("abc123"))
    assert is_tile_done(tmp_path, TILE_ID, "abc123")
    assert tile_status(tmp_path, TILE_ID, "other") is TileStatus.STALE
    assert not is_tile_done(tmp_path, TILE_ID, "other")
    assert tile_status(tmp_path, TILE_ID, "abc123", window=(-50, 100, 260, 300)) is TileStatus.DONE
    assert tile_status(tmp_path, TILE_ID, "abc123", window=(0, 100, 260, 300)) is TileStatus.STALE
    assert tile_status(tmp_path, TILE_ID, "abc123", core=(0, 0, 1, 1)) is TileStatus.STALE

    # a file whose completion marker is missing (e.g. written by another tool) is not trusted
    with h5py.File(tile_path(tmp_path, TILE_ID), "a") as h5:
        del h5.attrs["complete"]
    assert tile_status(tmp_path, TILE_ID, "abc123") is TileStatus.INVALID
    with pytest.raises(ValueError, match="incomplete"):
        read_tile_result(tmp_path, TILE_ID)

    # a truncated file (a crash of a non-atomic writer, a damaged disk) is not trusted and is logged
    write_tile_result(tmp_path, make_result("abc123"))
    path = tile_path(tmp_path, TILE_ID)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with caplog.at_level(logging.WARNING, logger="mk_hspc.tile_store"):
        assert tile_status(tmp_path, TILE_ID, "abc123") is TileStatus.INVALID
    assert "unreadable" in caplog.text


def test_failed_write_leaves_previous_file_and_no_temporary(tmp_path):
    write_tile_result(tmp_path, make_result("first"))
    broken = make_result("second")
    broken.features = {"morphology": object()}  # fails half-way through writing
    with pytest.raises(AttributeError):
        write_tile_result(tmp_path, broken)
    folder = tmp_path / "slide_b_2"
    assert [p.name for p in folder.iterdir()] == [f"{TILE_ID}.h5"]
    assert is_tile_done(tmp_path, TILE_ID, "first")


def test_leftover_temporary_files_are_removed_and_never_count(tmp_path):
    write_tile_result(tmp_path, make_result())
    folder = tmp_path / "slide_b_2"
    leftover = folder / f"{TILE_ID}.deadbeef0000{TMP_SUFFIX}"
    leftover.write_bytes(b"\x89HDF\r\n partial")
    other = folder / "slide_b_2_s1_r000_c000.0123456789ab.h5.tmp"
    other.write_bytes(b"")
    assert tile_status(tmp_path, "slide_b_2_s1_r000_c000", "abc123") is TileStatus.MISSING
    removed = remove_temporary_files(tmp_path)
    assert sorted(removed) == sorted([leftover, other])
    assert [p.name for p in folder.iterdir()] == [f"{TILE_ID}.h5"]
    assert remove_temporary_files(tmp_path / "absent") == []


FULL_DISK_WRITE = """
import resource, signal, sys
import numpy as np, pandas as pd
from mk_hspc.tile_store import TileResult, write_tile_result
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit, writes fail with EFBIG like on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
labels = np.random.default_rng(0).integers(0, 1000, (1500, 1500)).astype(np.int32)  # incompressible
cells = pd.DataFrame({"cell_id": pd.Series(["a"], dtype="str"), "label": np.array([1], np.int32)})
write_tile_result(sys.argv[1], TileResult(
    tile_id="s_s0_r000_c000", slide="s", window=(0, 0, 1500, 1500), core=(0, 0, 1500, 1500),
    pixel_size_um=0.5, params_hash="new", labels={"mk": labels}, cells=cells))
"""


def test_a_full_disk_is_an_error_not_a_crash_and_keeps_the_previous_tile(tmp_path):
    import subprocess
    import sys

    previous = make_result(params_hash="old")
    previous = TileResult(**{**previous.__dict__, "tile_id": "s_s0_r000_c000", "slide": "s"})
    write_tile_result(tmp_path, previous)
    result = subprocess.run(
        [sys.executable, "-c", FULL_DISK_WRITE, str(tmp_path)], capture_output=True, text=True
    )
    assert result.returncode == 1, (result.returncode, result.stderr[-2000:])  # -11 was a segfault
    assert "File too large" in result.stderr
    assert is_tile_done(tmp_path, "s_s0_r000_c000", "old", slide="s")
    assert [p.name for p in (tmp_path / "s").iterdir()] == ["s_s0_r000_c000.h5"]
