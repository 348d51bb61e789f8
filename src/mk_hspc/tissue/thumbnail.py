"""Low-resolution reads of whole slides: one thumbnail per slide, never a full-resolution canvas.

On a slide with a pyramid the reader serves the thumbnail from a low-resolution layer; on a slide without one
it must decode every subblock once. Either way each scene is cut into large blocks that a thread pool reads at
the thumbnail's scale (the CZI reader releases the GIL while it decodes), and the blocks of ALL slides go
through one pool, so the threads stay busy across slide boundaries and the thumbnails cost about one pass of
decoding.

A slide that cannot be read (``read_region`` raises `CziSlideError`, e.g. a corrupt subblock) is reported
as such, by slide, so a caller can drop it and keep the others.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from mk_hspc.czi.errors import CziSlideError
from mk_hspc.tissue.protocols import BoxLike, SlideLike


@dataclass(frozen=True)
class SlideThumbnail:
    """A slide's union bounding box read at ``1 / downsample`` of full resolution.

    Attributes:
        slide: slide name.
        rgb: ``(H, W, 3)`` uint8; pixels outside every scene are 255 (they are never read).
        valid: ``(H, W)`` bool, True where the pixel lies inside a scene and was read.
        origin_x, origin_y: absolute CZI pixel of the top-left corner of thumbnail pixel ``(0, 0)``.
        downsample: full-resolution pixels per thumbnail pixel (an integer, so blocks line up exactly).
        pixel_size_um: full-resolution pixel size.
    """

    slide: str
    rgb: np.ndarray
    valid: np.ndarray
    origin_x: int
    origin_y: int
    downsample: int
    pixel_size_um: float

    @property
    def um_per_px(self) -> float:
        return self.downsample * self.pixel_size_um


@dataclass(frozen=True)
class _Block:
    """One read: a full-resolution box and where its thumbnail goes in the slide's canvas."""

    slide_index: int
    x: int
    y: int
    w: int
    h: int
    row: int
    col: int


def thumbnail_downsample(pixel_size_um: float, map_um_per_px: float) -> int:
    """Integer downsample that brings ``pixel_size_um`` closest to ``map_um_per_px`` (at least 1)."""
    if pixel_size_um <= 0 or map_um_per_px <= 0:
        raise ValueError(f"pixel sizes must be positive, got {pixel_size_um=} {map_um_per_px=}")
    return max(1, round(map_um_per_px / pixel_size_um))


def _scene_blocks(
    slide_index: int, box: BoxLike, bbox: BoxLike, downsample: int, block_px: int
) -> Iterator[_Block]:
    """Cut a scene into blocks of about ``block_px`` (a whole number of thumbnail pixels each)."""
    row0 = round((box.y - bbox.y) / downsample)
    col0 = round((box.x - bbox.x) / downsample)
    step = max(1, block_px // downsample) * downsample
    for dy in range(0, box.h, step):
        for dx in range(0, box.w, step):
            yield _Block(
                slide_index,
                box.x + dx,
                box.y + dy,
                min(step, box.w - dx),
                min(step, box.h - dy),
                row0 + dy // downsample,
                col0 + dx // downsample,
            )


def read_slide_thumbnails(
    slides: Sequence[SlideLike],
    map_um_per_px: float = 8.0,
    *,
    threads: int = 2,
    block_px: int = 8192,
) -> list[SlideThumbnail]:
    """Read every slide at about ``map_um_per_px``, the blocks of all slides sharing one thread pool.

    Args:
        slides: slides to read.
        map_um_per_px: wanted thumbnail pixel size; the downsample is the nearest integer.
        threads: reader threads.
        block_px: block side in full-resolution pixels. Large blocks waste little: a block edge that cuts a
            subblock makes the reader decode that subblock for both blocks (unless its cache still holds it).

    Raises:
        CziSlideError: a slide could not be read (the first such slide in order; the message names its file).
    """
    results = read_slide_thumbnails_or_errors(slides, map_um_per_px, threads=threads, block_px=block_px)
    for result in results:
        if isinstance(result, CziSlideError):
            raise result
    return results  # type: ignore[return-value]  # no errors left


def read_slide_thumbnails_or_errors(
    slides: Sequence[SlideLike],
    map_um_per_px: float = 8.0,
    *,
    threads: int = 2,
    block_px: int = 8192,
) -> list[SlideThumbnail | CziSlideError]:
    """:func:`read_slide_thumbnails`, but a slide whose read fails gives its `CziSlideError` in its place.

    The other slides are read in full; the failed slide's remaining blocks are not read.
    """
    canvases = []
    blocks: list[_Block] = []
    for index, slide in enumerate(slides):
        meta = slide.meta
        downsample = thumbnail_downsample(meta.pixel_size_um, map_um_per_px)
        shape = (math.ceil(meta.bbox.h / downsample), math.ceil(meta.bbox.w / downsample))
        canvases.append((np.full((*shape, 3), 255, np.uint8), np.zeros(shape, bool), downsample))
        for box in meta.scenes:
            blocks.extend(_scene_blocks(index, box, meta.bbox, downsample, block_px))

    errors: list[CziSlideError | None] = [None] * len(slides)

    def read(block: _Block) -> np.ndarray | None:
        if errors[block.slide_index] is not None:
            return None
        scale = 1.0 / canvases[block.slide_index][2]
        try:
            return slides[block.slide_index].read_region(block.x, block.y, block.w, block.h, scale=scale)
        except CziSlideError as error:
            errors[block.slide_index] = errors[block.slide_index] or error
            return None

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for block, pixels in zip(blocks, pool.map(read, blocks), strict=True):
            if pixels is None:
                continue
            rgb, valid, downsample = canvases[block.slide_index]
            # The reader returns round(size / downsample) pixels, so a block whose last map pixel holds less
            # than half a map pixel of the scene comes back one short, and tissue at the scene's right or
            # bottom edge went missing from the last cores' fractions. That partial pixel takes its
            # neighbour's value (edge replication, as the reader itself pads a bitmap one pixel short).
            missing_rows = max(0, math.ceil(block.h / downsample) - pixels.shape[0])
            missing_cols = max(0, math.ceil(block.w / downsample) - pixels.shape[1])
            if (missing_rows or missing_cols) and pixels.size:
                pixels = np.pad(pixels, ((0, missing_rows), (0, missing_cols), (0, 0)), mode="edge")
            rows = max(0, min(pixels.shape[0], rgb.shape[0] - block.row))
            cols = max(0, min(pixels.shape[1], rgb.shape[1] - block.col))
            rgb[block.row : block.row + rows, block.col : block.col + cols] = pixels[:rows, :cols]
            valid[block.row : block.row + rows, block.col : block.col + cols] = True
    return [
        error
        or SlideThumbnail(
            slide=slide.meta.name,
            rgb=rgb,
            valid=valid,
            origin_x=slide.meta.bbox.x,
            origin_y=slide.meta.bbox.y,
            downsample=downsample,
            pixel_size_um=slide.meta.pixel_size_um,
        )
        for slide, (rgb, valid, downsample), error in zip(slides, canvases, errors, strict=True)
    ]


def read_slide_thumbnail(
    slide: SlideLike, map_um_per_px: float = 8.0, *, threads: int = 2, block_px: int = 8192
) -> SlideThumbnail:
    """:func:`read_slide_thumbnails` of one slide."""
    return read_slide_thumbnails([slide], map_um_per_px, threads=threads, block_px=block_px)[0]
