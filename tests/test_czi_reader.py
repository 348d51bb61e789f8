"""Tests of `mk_hspc.czi`: metadata and pixels of real CZI files, written CZIs with known content, pyramid
use, bounded memory, bad files, threads and pickling."""

from __future__ import annotations

import json
import pickle
import struct
import subprocess
import sys
import threading
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from pylibCZIrw import czi as pyczi

from mk_hspc.czi import Box, CziSlide, CziSlideError, open_slide
from mk_hspc.czi.container import read_raw_subblock, subblock_data_range
from mk_hspc.czi.native import NativeReader
from mk_hspc.czi.reader import read_subblocks

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PIXEL_SIZE_UM = 0.25


def shared_file(relative: str) -> Path:
    path = SHARED_DATA / relative
    if not path.is_file():
        pytest.skip(f"shared test data not available: {path}")
    return path


def write_czi(
    path: Path,
    tiles: list[tuple[np.ndarray, tuple[int, int]]],
    *,
    scenes: list[int] | None = None,
    pixel_size_um: float | None = PIXEL_SIZE_UM,
    compression: str | None = None,
) -> Path:
    """Write a CZI with pylibCZIrw; RGB tiles are given in CZI memory order (B, G, R)."""
    with pyczi.create_czi(str(path), exist_ok=True, compression_options=compression) as writer:
        for index, (tile, location) in enumerate(tiles):
            writer.write(tile, location=location, scene=scenes[index] if scenes else 0)
        # pylibCZIrw writes scale_x verbatim as the CZI Distance value, which is metres per pixel.
        scale_m = pixel_size_um * 1e-6 if pixel_size_um else 0.0
        writer.write_metadata(scale_x=scale_m, scale_y=scale_m)
    return path


def gray16_to_uint8(values: np.ndarray, bit_depth: int) -> np.ndarray:
    return np.clip(np.round(values.astype(np.float64) * 255 / (2**bit_depth - 1)), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- shared files: metadata
# Facts from ../shared/data/*/SOURCES.md: pixel type, bbox (x, y, w, h), scenes, µm/px, pyramid, compression.
SHARED_FACTS = {
    "aicspylibczi/RGB-8bit.czi": ("Bgr24", (0, 0, 924, 624), 1, 1.0833, False, "Uncompressed"),
    "aicspylibczi/RGB-multichannel.czi": ("Bgr24", (0, 0, 147, 81), 1, 2.958, False, "Uncompressed"),
    "aicspylibczi/mosaic_test.czi": ("Gray16", (0, 0, 1756, 624), 1, 1.0833, False, "Uncompressed"),
    "aicspylibczi/tiles.czi": ("Gray8", (-127, -128, 510, 512), 1, 0.8303, False, "Uncompressed"),
    "czitools/1_tileregion.czi": ("Gray16", (118583, 88865, 1480, 570), 1, 0.4, True, "Uncompressed"),
    "czitools/S3_1Pos_2Mosaic_T1_Z1_CH1.czi": ("Gray16", (0, 0, 645, 514), 3, 1.6, False, "Zstd1"),
    "czitools/WellD6-7_S2.czi": ("Gray16", (0, 0, 90544, 440), 2, 0.1, True, "Uncompressed"),
    "czitools/WellD6_S1.czi": ("Gray16", (0, 0, 544, 440), 1, 0.1, True, "Uncompressed"),
}


@pytest.mark.shared_data
@pytest.mark.parametrize("relative", sorted(SHARED_FACTS))
def test_shared_file_metadata_matches_sources(relative: str) -> None:
    path = shared_file(relative)
    pixel_type, bbox, n_scenes, pixel_size_um, has_pyramid, compression = SHARED_FACTS[relative]
    with open_slide(path) as slide:
        meta = slide.meta
        assert meta.name == path.stem
        assert meta.pixel_type == pixel_type
        assert meta.bbox == Box(*bbox)
        assert len(meta.scenes) == n_scenes
        assert meta.pixel_size_um == pytest.approx(pixel_size_um, abs=1e-3)
        assert meta.pixel_size_source == "metadata"
        assert meta.has_pyramid is has_pyramid
        assert meta.compression == compression
        json.dumps(meta.to_dict())  # JSON-ready for slide_meta.json
        # Scene boxes are computed from the subblock directory; libCZI (via pylibCZIrw) must agree.
        with pyczi.open_czi(str(path)) as reader:
            libczi_scenes = reader.scenes_bounding_rectangle_no_pyramid
        if libczi_scenes:
            assert meta.scenes == tuple(Box(*libczi_scenes[s]) for s in sorted(libczi_scenes))


@pytest.mark.shared_data
def test_three_scene_file_has_three_disjoint_scene_boxes() -> None:
    """aicspylibczi 4.0.1 reports S=1 for this file; the directory has subblocks with S=0, 1 and 2."""
    with open_slide(shared_file("czitools/S3_1Pos_2Mosaic_T1_Z1_CH1.czi")) as slide:
        assert slide.meta.scenes == (Box(145, 0, 295, 122), Box(0, 213, 64, 64), Box(293, 277, 352, 237))
        for scene in slide.meta.scenes:
            pixels = slide.read_region(scene.x, scene.y, scene.w, scene.h)
            assert pixels.shape == (scene.h, scene.w, 3)
            assert pixels.mean() > 0  # each scene holds image data (Zstd1-compressed)


@pytest.mark.shared_data
def test_missing_scaling_raises_unless_overridden() -> None:
    path = shared_file("czitools/newCZI_compressed.czi")
    with pytest.raises(CziSlideError) as caught:
        open_slide(path)
    assert caught.value.path == str(path)
    assert "newCZI_compressed.czi" in str(caught.value) and "pixel_size_um" in str(caught.value)
    with open_slide(path, pixel_size_um=0.1725) as slide:
        assert slide.meta.pixel_size_um == 0.1725
        assert slide.meta.pixel_size_source == "override: missing metadata"
        assert slide.meta.compression == "Zstd0"
        assert slide.read_region(0, 0, 512, 512).shape == (512, 512, 3)


@pytest.mark.shared_data
def test_override_does_not_replace_a_recorded_pixel_size() -> None:
    with open_slide(shared_file("czitools/WellD6_S1.czi"), pixel_size_um=0.1725) as slide:
        assert slide.meta.pixel_size_um == pytest.approx(0.1)
        assert slide.meta.pixel_size_source == "metadata"


# ----------------------------------------------------------------------------- shared files: pixels
@pytest.mark.shared_data
def test_negative_origin_read_matches_stored_subblocks() -> None:
    path = shared_file("aicspylibczi/tiles.czi")
    subblocks = read_subblocks(path)
    with open_slide(path) as slide:
        for channel in (0, 1):
            first = next(e for e in subblocks if e.coords["C"] == channel and e.coords["M"] == 0)
            assert (first.x, first.y) == (-127, -128)
            stored = read_raw_subblock(path, first)[..., 0]
            pixels = slide.read_region(-127, -128, 254, 256, channel=channel)  # M1 overlaps 2 columns
            assert np.array_equal(pixels[..., 0], stored[:, :254])
            assert np.array_equal(pixels[..., 0], pixels[..., 2])  # grey replicated to RGB


@pytest.mark.shared_data
def test_overlapping_tiles_higher_m_index_is_drawn_on_top() -> None:
    path = shared_file("czitools/1_tileregion.czi")
    subblocks = read_subblocks(path)
    tiles = {e.coords["M"]: e for e in subblocks if e.is_layer0}
    m0, m1 = tiles[0], tiles[1]
    overlap_w = m0.x + m0.w - m1.x  # 40 px shared by M0 and M1 (rows above M6's overlap)
    with open_slide(path) as slide:
        pixels = slide.read_region(m1.x, m1.y, overlap_w, 270)[..., 0]
        depth = slide.bit_depth
    stored_m0 = gray16_to_uint8(read_raw_subblock(path, m0)[:270, m1.x - m0.x :, 0], depth)
    stored_m1 = gray16_to_uint8(read_raw_subblock(path, m1)[:270, :overlap_w, 0], depth)
    assert np.array_equal(pixels, stored_m1)
    assert not np.array_equal(pixels, stored_m0)


@pytest.mark.shared_data
def test_gray16_is_scaled_by_the_recorded_bit_depth() -> None:
    """WellD6 records ComponentBitCount 14: 0..16383 maps onto 0..255 (not >>8, which would cap at 63)."""
    path = shared_file("czitools/WellD6_S1.czi")
    subblocks = read_subblocks(path)
    stored = read_raw_subblock(path, next(e for e in subblocks if e.is_layer0))[..., 0]
    with open_slide(path) as slide:
        assert slide.bit_depth == 14
        pixels = slide.read_region(0, 0, 544, 440)
    assert stored.max() == 16383 and pixels.max() == 255
    assert np.array_equal(pixels[..., 1], gray16_to_uint8(stored, 14))


@pytest.mark.shared_data
def test_multichannel_rgb_reads_channel_zero_by_default_and_any_channel_on_request() -> None:
    path = shared_file("aicspylibczi/RGB-multichannel.czi")
    subblocks = read_subblocks(path)
    stored = {e.coords["C"]: read_raw_subblock(path, e) for e in subblocks}
    with open_slide(path) as slide:
        assert slide.n_channels == 7
        default = slide.read_region(0, 0, 147, 81)
        third = slide.read_region(0, 0, 147, 81, channel=3)
        with pytest.raises(ValueError, match="no channel 7"):
            slide.read_region(0, 0, 10, 10, channel=7)
    assert np.array_equal(default, stored[0][..., ::-1])  # stored B, G, R -> returned R, G, B
    assert np.array_equal(third, stored[3][..., ::-1])
    assert not np.array_equal(default, third)


@pytest.mark.shared_data
@pytest.mark.parametrize("relative", ["czitools/1_tileregion.czi", "czitools/WellD6_S1.czi"])
def test_half_resolution_read_is_served_from_the_pyramid_subblock(relative: str) -> None:
    path = shared_file(relative)
    subblocks = read_subblocks(path)
    pyramid = next(e for e in subblocks if not e.is_layer0)
    assert pyramid.zoom == 0.5
    with open_slide(path) as slide:
        half = slide.read_region(pyramid.x, pyramid.y, pyramid.w, pyramid.h, scale=0.5)[..., 0]
        full = slide.read_region(pyramid.x, pyramid.y, pyramid.w, pyramid.h)[..., 0].astype(np.float64)
        stored = gray16_to_uint8(read_raw_subblock(path, pyramid)[..., 0], slide.bit_depth)
    assert half.shape == (pyramid.stored_h, pyramid.stored_w)
    assert np.array_equal(half, stored)  # exactly the stored pyramid pixels ...
    naive = full.reshape(half.shape[0], 2, half.shape[1], 2).mean(axis=(1, 3))
    assert np.abs(naive - half).mean() > 1.0  # ... which a downsample of full resolution does not reproduce


@pytest.mark.shared_data
def test_far_apart_scenes_are_read_per_scene_without_the_union_canvas() -> None:
    with open_slide(shared_file("czitools/WellD6-7_S2.czi")) as slide:
        union = slide.meta.bbox
        assert union.w * union.h * 3 > 100 * 2**20  # the empty canvas would be > 100 MiB of RGB
        tracemalloc.start()
        try:
            scenes = [slide.read_region(s.x, s.y, s.w, s.h) for s in slide.meta.scenes]
            _, peak_bytes = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert [s.shape for s in scenes] == [(440, 544, 3), (440, 544, 3)]
    assert all(s.min() > 0 for s in scenes)  # image data, no background fill
    assert peak_bytes < 4 * 2**20


@pytest.mark.shared_data
def test_area_downsample_equals_block_mean_and_does_not_depend_on_strip_size() -> None:
    path = shared_file("aicspylibczi/mosaic_test.czi")
    with open_slide(path) as slide, open_slide(path, strip_mib=0.05) as thin_strips:
        full = slide.read_region(0, 0, 1756, 624).astype(np.float64)
        quarter = slide.read_region(0, 0, 1756, 624, scale=0.25)
        assert np.array_equal(thin_strips.read_region(0, 0, 1756, 624, scale=0.25), quarter)
        assert np.array_equal(thin_strips.read_region(0, 0, 1756, 624), full.astype(np.uint8))
    block_mean = full.reshape(156, 4, 439, 4, 3).mean(axis=(1, 3))
    assert np.abs(block_mean - quarter).max() <= 1.0


# ----------------------------------------------------------------------------- written files
def test_bgr24_is_returned_as_rgb_and_uncovered_area_is_white(tmp_path: Path) -> None:
    tile = np.zeros((32, 48, 3), np.uint8)
    tile[..., 0], tile[..., 1], tile[..., 2] = 10, 120, 230  # B, G, R of a pink-red
    path = write_czi(tmp_path / "colour.czi", [(tile, (100, 50))])
    with open_slide(path) as slide:
        assert slide.meta.pixel_type == "Bgr24"
        assert slide.meta.pixel_size_um == pytest.approx(PIXEL_SIZE_UM)
        pixels = slide.read_region(90, 50, 58, 32)
    assert tuple(pixels[0, 20]) == (230, 120, 10)  # R, G, B
    assert np.all(pixels[:, :10] == 255)  # left of the tile: glass, white


def test_gray_is_replicated_and_uncovered_area_is_black(tmp_path: Path) -> None:
    gray8 = np.arange(64 * 64, dtype=np.uint32).reshape(64, 64).astype(np.uint8)
    gray16 = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    path8 = write_czi(tmp_path / "g8.czi", [(gray8, (0, 0))])
    path16 = write_czi(tmp_path / "g16.czi", [(gray16, (0, 0))])
    with open_slide(path8) as slide8, open_slide(path16) as slide16:
        pixels8 = slide8.read_region(-16, 0, 80, 64)
        pixels16 = slide16.read_region(0, 0, 64, 64)
        assert slide16.bit_depth == 16  # pylibCZIrw records no ComponentBitCount: the full 16 bits
    assert np.array_equal(pixels8[:, 16:, 0], gray8) and np.array_equal(pixels8[..., 0], pixels8[..., 2])
    assert np.all(pixels8[:, :16] == 0)
    assert np.array_equal(pixels16[..., 0], gray16_to_uint8(gray16, 16))


@pytest.mark.parametrize(
    ("w", "h", "scale"), [(301, 150, 0.5), (333, 99, 1 / 3), (1000, 700, 1 / 16), (5, 5, 0.1)]
)
def test_output_shape_is_rounded_region_size(tmp_path: Path, w: int, h: int, scale: float) -> None:
    tile = np.full((400, 400, 3), 128, np.uint8)
    path = write_czi(
        tmp_path / "s.czi", [(tile, (0, 0)), (tile, (400, 0)), (tile, (0, 400)), (tile, (400, 400))]
    )
    with open_slide(path) as slide:
        pixels = slide.read_region(7, 3, w, h, scale)
    assert pixels.shape == (round(h * scale), round(w * scale), 3)
    assert pixels.dtype == np.uint8


def test_invalid_reads_raise(tmp_path: Path) -> None:
    path = write_czi(tmp_path / "s.czi", [(np.zeros((16, 16, 3), np.uint8), (0, 0))])
    slide = open_slide(path)
    for bad_scale in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="scale"):
            slide.read_region(0, 0, 8, 8, bad_scale)
    with pytest.raises(ValueError, match="positive"):
        slide.read_region(0, 0, 0, 8)
    slide.close()
    with pytest.raises(CziSlideError, match="closed"):
        slide.read_region(0, 0, 8, 8)


def test_written_scenes_far_apart_get_one_box_each(tmp_path: Path) -> None:
    tile = np.full((64, 64, 3), 90, np.uint8)
    path = write_czi(tmp_path / "scenes.czi", [(tile, (0, 0)), (tile, (200_000, 500))], scenes=[0, 1])
    with open_slide(path) as slide:
        assert slide.meta.scenes == (Box(0, 0, 64, 64), Box(200_000, 500, 64, 64))
        assert slide.meta.bbox == Box(0, 0, 200_064, 564)
        far = slide.read_region(200_000, 500, 64, 64)
    assert np.all(far == 90)


_UNDER_ADDRESS_LIMIT = """
import resource, sys
from mk_hspc.czi import open_slide
path, x, y, w, h, scale, extra_bytes = sys.argv[1:]
slide = open_slide(path, cache_mib=0)
slide.read_region(0, 0, 512, 512)  # warm up libraries, thread pools and malloc arenas before limiting
slide.read_region(0, 0, 2048, 2048, 1 / 16)
vm_bytes = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (vm_bytes + int(extra_bytes), resource.RLIM_INFINITY))
try:
    out = slide.read_region(int(x), int(y), int(w), int(h), float(scale))
    print("ok", *out.shape)
except BaseException as error:  # MemoryError from numpy or std::bad_alloc from libCZI
    print("failed", type(error).__name__)
"""


@pytest.fixture(scope="module")
def large_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8000 x 6000 RGB (137 MiB decoded) of 1000 px Zstd tiles; cheap to write because tiles are flat."""
    path = tmp_path_factory.mktemp("large") / "large.czi"
    tiles = [
        (np.full((1000, 1000, 3), (x // 1000 * 20 + y // 1000 * 5) % 256, np.uint8), (x, y))
        for y in range(0, 6000, 1000)
        for x in range(0, 8000, 1000)
    ]
    return write_czi(path, tiles, compression="zstd1:ExplicitLevel=1")


def _read_under_limit(path: Path, region: tuple[int, int, int, int], scale: float, extra_bytes: int) -> str:
    args = [str(path), *map(str, region), str(scale), str(extra_bytes)]
    run = subprocess.run([sys.executable, "-c", _UNDER_ADDRESS_LIMIT, *args], capture_output=True, text=True)
    return run.stdout.strip()


def test_reads_stay_far_below_the_full_canvas_under_an_address_space_limit(large_slide: Path) -> None:
    canvas_bytes = 8000 * 6000 * 3
    limit = canvas_bytes // 2  # less than half the full-resolution canvas may be added
    assert _read_under_limit(large_slide, (3000, 2000, 1024, 1024), 1.0, limit) == "ok 1024 1024 3"
    assert _read_under_limit(large_slide, (0, 0, 8000, 6000), 1 / 16, limit) == "ok 375 500 3"
    # Control: the same limit does stop a read that needs the whole canvas, so it really bites.
    assert _read_under_limit(large_slide, (0, 0, 8000, 6000), 1.0, limit).startswith("failed")


def test_large_slide_low_resolution_is_area_averaged(large_slide: Path) -> None:
    with open_slide(large_slide) as area, open_slide(large_slide, downsample="nearest") as nearest:
        # A 1000 px tile boundary inside an output pixel: area mixes both tiles, nearest picks one.
        low_area = area.read_region(992, 0, 16, 16, 1 / 16)
        low_nearest = nearest.read_region(992, 0, 16, 16, 1 / 16)
    assert low_area.shape == low_nearest.shape == (1, 1, 3)
    assert int(low_area[0, 0, 0]) == 10  # mean of 8 columns of 0 and 8 columns of 20
    assert int(low_nearest[0, 0, 0]) in (0, 20)


# ----------------------------------------------------------------------------- bad files
def _truncated_copy(source: Path, target: Path) -> Path:
    data = source.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    return target


def test_bad_files_raise_named_errors_at_open(tmp_path: Path) -> None:
    good = write_czi(
        tmp_path / "good.czi", [(np.zeros((256, 256, 3), np.uint8), (x, 0)) for x in range(0, 1024, 256)]
    )
    (tmp_path / "empty.czi").write_bytes(b"")
    (tmp_path / "notes.czi").write_text("these are my notes, not an image\n" * 40)
    cases = {
        tmp_path / "empty.czi": "empty file",
        tmp_path / "notes.czi": "not a CZI file",
        _truncated_copy(good, tmp_path / "half.czi"): "truncated",
        tmp_path / "missing.czi": "does not exist",
        tmp_path: "directory",
    }
    for path, reason in cases.items():
        with pytest.raises(CziSlideError) as caught:
            open_slide(path)
        assert caught.value.path == str(path)
        assert str(path) in str(caught.value) and reason in caught.value.reason
        assert pickle.loads(pickle.dumps(caught.value)).reason == caught.value.reason


@pytest.mark.shared_data
def test_truncated_real_file_with_directory_up_front_raises_at_open(tmp_path: Path) -> None:
    """mosaic_test.czi keeps its directory before the pixels: half of it still has a whole directory."""
    half = _truncated_copy(shared_file("aicspylibczi/mosaic_test.czi"), tmp_path / "mosaic_half.czi")
    with pytest.raises(CziSlideError, match="truncated"):
        open_slide(half)


def test_corrupt_subblock_data_raises_named_error_on_read(tmp_path: Path) -> None:
    tile = np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8)
    path = write_czi(tmp_path / "z.czi", [(tile, (0, 0))], compression="zstd1:ExplicitLevel=1")
    payload, _ = subblock_data_range(path, 0)
    data = bytearray(path.read_bytes())
    data[payload : payload + 16] = bytes(16)  # wipe the Zstd header of the only subblock
    path.write_bytes(bytes(data))
    with open_slide(path) as slide, pytest.raises(CziSlideError) as caught:
        slide.read_region(0, 0, 64, 64)
    assert str(path) in str(caught.value) and "failed" in caught.value.reason


def _four_tile_czi(path: Path) -> Path:
    return write_czi(path, [(np.full((256, 256, 3), 100, np.uint8), (x, 0)) for x in range(0, 1024, 256)])


def _directory_entry_offsets(data: bytes) -> list[int]:
    """Byte offset of every subblock directory entry (ZISRAW layout, see mk_hspc.czi.container)."""
    (directory,) = struct.unpack_from("<q", data, 32 + 4 * 4 + 2 * 16 + 4)
    (n_entries,) = struct.unpack_from("<i", data, directory + 32)
    offsets, offset = [], directory + 32 + 128
    for _ in range(n_entries):
        offsets.append(offset)
        offset += 32 + 20 * struct.unpack_from("<i", data, offset + 28)[0]
    return offsets


def _patched_copy(source: Path, target: Path, offset: int, payload: bytes) -> Path:
    data = bytearray(source.read_bytes())
    data[offset : offset + len(payload)] = payload
    target.write_bytes(bytes(data))
    return target


def test_pylibczirw_silently_drops_subblocks_after_a_malformed_directory_entry(tmp_path: Path) -> None:
    """Why `check_file` walks the directory: libCZI opens such a file without an error, enumerates the
    entries before the damage only and reads the rest of the slide as background. If a later pylibCZIrw
    raises here instead, the walk may be replaced by that error."""
    good = _four_tile_czi(tmp_path / "good.czi")
    third = _directory_entry_offsets(good.read_bytes())[2]
    bad = _patched_copy(good, tmp_path / "bad_entry.czi", third, b"XX")  # schema "DV" -> "XX"
    with pyczi.open_czi(str(bad)) as reader:
        seen: list[int] = []
        reader.enumerate_subblocks(lambda index, info: seen.append(index) or True)
        assert len(seen) == 2
        assert reader.read(roi=(0, 0, 1024, 256), plane={}).mean() < 100  # tiles 3 and 4: background
    with pytest.raises(CziSlideError) as caught:
        open_slide(bad)
    assert caught.value.path == str(bad)
    assert caught.value.reason == "corrupt: subblock directory entry 2 is malformed"


def test_pylibczirw_opens_a_file_truncated_after_its_directory(tmp_path: Path) -> None:
    """Why `check_file` checks the last subblock's end: libCZI only fails on the first read of a missing
    subblock. Simulated by moving the last subblock beyond the end of a file (pylibCZIrw itself writes the
    directory last, so cutting its files loses the directory, which libCZI does notice)."""
    good = _four_tile_czi(tmp_path / "good.czi")
    last = _directory_entry_offsets(good.read_bytes())[-1]
    beyond = good.stat().st_size + 4096
    bad = _patched_copy(good, tmp_path / "cut.czi", last + 6, struct.pack("<q", beyond))  # FilePosition
    with pyczi.open_czi(str(bad)) as reader:
        seen: list[int] = []
        reader.enumerate_subblocks(lambda index, info: seen.append(index) or True)
        assert len(seen) == 4
        with pytest.raises(RuntimeError, match="Not enough data"):
            reader.read(roi=(768, 0, 256, 256), plane={})
    with pytest.raises(CziSlideError) as caught:
        open_slide(bad)
    assert caught.value.path == str(bad)
    assert caught.value.reason.startswith(f"truncated: subblock 3 should start at byte {beyond}")


def test_other_directory_damage_raises_named_errors_at_open(tmp_path: Path) -> None:
    good = _four_tile_czi(tmp_path / "good.czi")
    data = good.read_bytes()
    second = _directory_entry_offsets(data)[1]
    (directory,) = struct.unpack_from("<q", data, 32 + 4 * 4 + 2 * 16 + 4)
    cases = {
        # libCZI enumerates a zero-width subblock and reads its area as background
        _patched_copy(good, tmp_path / "w0.czi", second + 32 + 8, struct.pack("<i", 0)): (
            "corrupt: subblock 1 has an empty or negative size"
        ),
        _patched_copy(
            good, tmp_path / "magic.czi", directory, b"GARBAGE_GARBAGE!"
        ): "corrupt: no subblock directory",
        _patched_copy(good, tmp_path / "count.czi", directory + 32, struct.pack("<i", 10**8)): "truncated",
        _patched_copy(good, tmp_path / "meta.czi", 32 + 4 * 4 + 2 * 16 + 4 + 8, struct.pack("<q", 10**12)): (
            "truncated: the metadata segment"
        ),
    }
    for path, reason in cases.items():
        with pytest.raises(CziSlideError) as caught:
            open_slide(path)
        assert caught.value.path == str(path) and caught.value.reason.startswith(reason)


def test_a_subblock_count_libczi_disagrees_with_is_an_error(tmp_path: Path, monkeypatch) -> None:
    path = _four_tile_czi(tmp_path / "good.czi")
    monkeypatch.setattr(NativeReader, "subblocks", lambda self: ())
    with pytest.raises(CziSlideError, match="lists 4 subblocks but libCZI enumerates 0"):
        open_slide(path)


def test_subblocks_come_from_libczi_with_names_and_zoom(tmp_path: Path) -> None:
    path = write_czi(
        tmp_path / "z.czi", [(np.zeros((64, 96), np.uint16), (-5, 7))], compression="zstd0:ExplicitLevel=1"
    )
    (entry,) = read_subblocks(path)
    assert (entry.x, entry.y, entry.w, entry.h, entry.stored_w, entry.stored_h) == (-5, 7, 96, 64, 96, 64)
    assert (entry.pixel_type, entry.compression, entry.zoom, entry.is_layer0) == (
        "Gray16",
        "Zstd0",
        1.0,
        True,
    )
    assert entry.coords == {"Z": 0, "C": 0, "T": 0, "S": 0, "M": 0}  # M from libCZI's mIndex


# ----------------------------------------------------------------------------- threads and pickling
@pytest.mark.parametrize("thread_mode", ["shared", "lock", "per_thread"])
def test_concurrent_reads_equal_sequential_reads(large_slide: Path, thread_mode: str) -> None:
    rng = np.random.default_rng(7)
    regions = [
        (int(x), int(y), 700, 500)
        for x, y in zip(rng.integers(0, 7300, 24), rng.integers(0, 5500, 24), strict=False)
    ]
    with open_slide(large_slide, thread_mode=thread_mode) as slide:
        expected = [slide.read_region(*r) for r in regions]
        seen_threads: set[int] = set()

        def read(region: tuple[int, int, int, int]) -> np.ndarray:
            seen_threads.add(threading.get_ident())
            return slide.read_region(*region)

        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(read, regions))
    assert len(seen_threads) > 1
    assert all(np.array_equal(a, b) for a, b in zip(expected, got, strict=True))


def test_pickled_slide_reopens_by_path_and_reads_the_same(tmp_path: Path) -> None:
    tile = np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    path = write_czi(tmp_path / "p.czi", [(tile, (-32, 10))], pixel_size_um=None)
    with open_slide(path, pixel_size_um=0.5, downsample="nearest") as slide:
        clone = pickle.loads(pickle.dumps(slide))
        assert isinstance(clone, CziSlide) and clone is not slide
        assert clone.meta == slide.meta and clone.meta.pixel_size_source == "override: missing metadata"
        assert np.array_equal(
            clone.read_region(-32, 10, 64, 64, 0.5), slide.read_region(-32, 10, 64, 64, 0.5)
        )
        clone.close()
