"""Cell crops cut from one region read per tile: geometry in µm, robust normalisation, outline, encoding.

A tile's window is read once from the slide; every candidate of that tile is cut from that array (never one
slide read per cell). A crop is a square of ``crop_um`` centred on the cell's centroid, padded with white
where it leaves the tile window, stretched per channel between robust percentiles of the tile's tissue and
resized to ``output_px``. The cell's outline is returned as a polygon in crop pixels, so the page draws it
as an SVG overlay that can be hidden, instead of burning it into the image.
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
from numpy.typing import ArrayLike
from PIL import Image
from skimage.measure import find_contours

from mk_hspc.tile_store import CellOutlines

WHITE = 255


@dataclass(frozen=True)
class CropSpec:
    """How one cell type is cropped.

    Attributes:
        crop_um: side of the square crop in µm (context around the cell included).
        output_px: side of the stored image in pixels.
    """

    crop_um: float
    output_px: int


@dataclass(frozen=True)
class Crop:
    """One encoded crop and the cell's outline in the stored image's pixels (SVG points, see
    :func:`display_outlines`)."""

    cell_id: str
    image: bytes
    outline: str


def normalisation_limits(
    tile_rgb: np.ndarray, low_pct: float, high_pct: float
) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (low, high) percentiles of a uint8 RGB tile, on a regular subsample (robust to a few dark
    specks).

    They come from one 256-bin histogram per channel (OpenCV, the tissue selected by a mask rather than
    copied out: 4x faster than NumPy), equal to ``np.percentile``'s (linear interpolation between order
    statistics) without sorting the sample.
    """
    if tile_rgb.dtype != np.uint8 or tile_rgb.ndim != 3 or tile_rgb.shape[2] != 3:
        raise ValueError(f"normalisation limits need uint8 RGB pixels, got {tile_rgb.dtype} {tile_rgb.shape}")
    step = max(1, int(np.sqrt(tile_rgb.shape[0] * tile_rgb.shape[1] / 250_000)))
    sample = np.ascontiguousarray(tile_rgb[::step, ::step])
    high = np.array([histogram_percentile(_histogram(sample, c), high_pct) for c in range(3)])
    # The dark point from the tissue alone: taken over glass too, a tile with little tissue (fat, edges) put
    # it inside the tissue and clipped its darker part to black (19 % of it at 1 % tissue). Tissue: a pixel
    # below the white point less GLASS_MARGIN in some channel (integer values: v < ceil(that limit)).
    glass_from = np.clip(np.ceil(high - GLASS_MARGIN), 0, 255)
    tissue = cv2.bitwise_not(cv2.inRange(sample, glass_from, np.full(3, 255.0)))
    mask = tissue if cv2.countNonZero(tissue) >= MIN_TISSUE_SAMPLES else None
    low = np.array([histogram_percentile(_histogram(sample, c, mask), low_pct) for c in range(3)])
    # A (nearly) uniform tile has low == high: a table from it mapped glass and cells alike to black.
    low = np.minimum(low, np.maximum(high - MIN_SPAN, 0.0))
    high = np.maximum(high, low + MIN_SPAN)
    return low, high


def _histogram(image: np.ndarray, channel: int, mask: np.ndarray | None = None) -> np.ndarray:
    """Counts of the 256 values of one channel of a uint8 ``(h, w, 3)`` image (where ``mask``, if given)."""
    counts = cv2.calcHist([image], [channel], mask, [256], [0, 256])
    return counts.ravel().astype(np.int64)


GLASS_MARGIN = 12  # grey levels below the white point (any channel) that make a pixel tissue
MIN_TISSUE_SAMPLES = 500
MIN_SPAN = 64.0  # grey levels: the least input range stretched to 0..255 (4x contrast at most)


def histogram_percentile(counts: np.ndarray, pct: float) -> float:
    """``np.percentile(values, pct)`` (linear method) of the integer values whose histogram is ``counts``."""
    cumulative = np.cumsum(counts)
    n = int(cumulative[-1])
    if n == 0:
        raise ValueError("percentile of an empty sample")
    rank = (n - 1) * pct / 100.0
    below = int(np.floor(rank))
    # The k-th smallest value (0-based) is the first bin whose cumulative count exceeds k.
    lower, upper = np.searchsorted(cumulative, [below, min(below + 1, n - 1)], side="right")
    return float(lower + (rank - below) * (upper - lower))


def stretch_table(low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """The per-channel lookup table that maps ``low..high`` to ``0..255`` (clipped), ``(1, 256, 3)`` uint8
    (computed once per tile, applied with ``cv2.LUT``)."""
    values = np.arange(256, dtype=np.float32)[:, None]
    table = np.clip((values - low[None, :]) * (255.0 / (high - low)[None, :]), 0, 255)
    return np.round(table).astype(np.uint8)[None, :, :]


def crop_side_px(crop_um: float, pixel_size_um: float, output_px: int) -> int:
    """Side of the crop window in source px: ``crop_um`` rounded, then down to a multiple of the integer
    reduction ``k = side // output_px`` when ``k >= 2`` (< k px less), so that :func:`shrink` trims nothing
    and the image and the outline (mapped onto the same window) share one frame."""
    side = max(4, int(round(crop_um / pixel_size_um)))
    k = side // output_px
    return side - side % k if k >= 2 else side


def crop_box(centroid_x_px: ArrayLike, centroid_y_px: ArrayLike, side: int) -> tuple[Any, Any]:
    """``(x0, y0)`` of square crops of ``side`` px (absolute CZI px) centred on the centroids (scalars or
    arrays, int64).

    The centroid is a mean of pixel indices (pixel ``i`` is centred at ``i``, spans ``[i - .5, i + .5]``);
    ``+ 0.5`` turns it into the pixel-corner frame the window is cut in, so the cell sits at the crop's centre
    (within the half pixel of rounding) instead of half a pixel up-left. Halves round to even.
    """
    x0 = np.round(np.asarray(centroid_x_px, np.float64) + 0.5 - side / 2).astype(np.int64)
    y0 = np.round(np.asarray(centroid_y_px, np.float64) + 0.5 - side / 2).astype(np.int64)
    return x0, y0


def _centroids(cells: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    return (
        np.array([cell["centroid_x_px"] for cell in cells], np.float64),
        np.array([cell["centroid_y_px"] for cell in cells], np.float64),
    )


def crops_region(
    cells_by_spec: list[tuple[list[dict], CropSpec]], pixel_size_um: float
) -> tuple[int, int, int, int]:
    """``(x, y, w, h)`` (absolute CZI px) of the smallest region holding every crop of a tile's cells.

    The export reads this instead of the whole tile window: the window's overlap is as wide as the largest
    cell, while a crop reaches only half its side past its cell's centre, which the tile's core holds (the
    demo's 3000 px tiles: 14 % less read time). A crop reaching past the window (a cell wider than the
    overlap) shows the slide's pixels there instead of white padding.
    """
    x0 = y0 = np.inf
    x1 = y1 = -np.inf
    for cells, spec in cells_by_spec:
        if not cells:
            continue
        side = crop_side_px(spec.crop_um, pixel_size_um, spec.output_px)
        left, top = crop_box(*_centroids(cells), side)
        x0, y0 = min(x0, left.min()), min(y0, top.min())
        x1, y1 = max(x1, left.max() + side), max(y1, top.max() + side)
    if not np.isfinite(x0):
        raise ValueError("no cells to crop")
    return int(x0), int(y0), int(x1 - x0), int(y1 - y0)


def cut_padded(image: np.ndarray, x0: int, y0: int, side: int, fill: int) -> np.ndarray:
    """``image[y0:y0+side, x0:x0+side]`` with out-of-range parts filled with ``fill``."""
    height, width = image.shape[:2]
    out = np.full((side, side, *image.shape[2:]), fill, dtype=image.dtype)
    sx0, sy0 = max(0, x0), max(0, y0)
    sx1, sy1 = min(width, x0 + side), min(height, y0 + side)
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = image[sy0:sy1, sx0:sx1]
    return out


def outline_array(mask: np.ndarray, tolerance_px: float = 0.5) -> np.ndarray:
    """The outer boundary of a boolean mask (its largest part), ``(n, 2)`` (x, y) pixel-corner coordinates.

    Marching squares at level 0.5 puts every vertex on a pixel edge, so the polygon's area is the mask's
    area less the cut corners; it is then simplified (Douglas-Peucker, ``tolerance_px``). Pixel (i, j) spans
    ``[j, j+1] x [i, i+1]``: the coordinate frame QuPath and GeoJSON consumers expect. An array, not a list
    of tuples: the GeoJSON of a study's cells is built from millions of these points.
    """
    if not mask.any():
        return np.zeros((0, 2))
    padded = np.zeros((mask.shape[0] + 2, mask.shape[1] + 2), np.float32)
    padded[1:-1, 1:-1] = mask
    contours = find_contours(padded, 0.5)
    contour = contours[0] if len(contours) == 1 else max(contours, key=_shoelace)
    contour = cv2.approxPolyDP(contour.astype(np.float32)[:, None, :], tolerance_px, True)[:, 0, :]
    # -1 for the padding, +0.5 from pixel centres to pixel corners; (row, col) -> (x, y).
    return contour[:, ::-1].astype(np.float64) - 0.5


def _shoelace(points: np.ndarray) -> float:
    y, x = points[:, 0], points[:, 1]
    return abs(float(np.dot(x[1:], y[:-1]) + x[0] * y[-1] - np.dot(y[1:], x[:-1]) - y[0] * x[-1])) / 2.0


def encode(rgb: np.ndarray, image_format: str, quality: int) -> bytes:
    """WebP or JPEG bytes of an RGB uint8 array."""
    if image_format == "webp":
        buffer = io.BytesIO()
        # method 2: 1.7x faster than Pillow's default 4 for ~5% more bytes on 80-128 px crops.
        Image.fromarray(rgb).save(buffer, format="WEBP", quality=quality, method=2)
        return buffer.getvalue()
    if image_format == "jpeg":
        ok, data = cv2.imencode(
            ".jpg", np.ascontiguousarray(rgb[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, quality]
        )
        if not ok:
            raise ValueError("JPEG encoding failed")
        return data.tobytes()
    raise ValueError(f"image format {image_format!r} is not one of 'webp', 'jpeg'")


def shrink(image: np.ndarray, output_px: int, dst: np.ndarray | None = None) -> np.ndarray:
    """A square ``image`` resized to ``output_px`` (anti-aliased when shrinking; written into ``dst`` if given).

    OpenCV's area average is exact but slow (~0.6 ms for 348 -> 128 px) for non-integer factors, and fast
    for integer ones. So: an integer area reduction by ``k = side // output_px`` (the window trimmed to a
    multiple of ``k``: < ``k`` px, split between its edges; none for the default sizes), then bilinear for the remaining factor in ``[1, 2)``,
    where bilinear weights every source pixel and does not alias. Within a grey level of the direct area
    average on tissue (``tests/test_export.py``), 3-6x faster.
    """
    side = image.shape[0]
    k = side // output_px
    if k >= 2:
        reduced = side // k
        start = (side - reduced * k) // 2  # the trim split between both edges (none for crop_side_px sides)
        end = start + reduced * k
        image = cv2.resize(image[start:end, start:end], (reduced, reduced), interpolation=cv2.INTER_AREA)
    if image.shape[0] == output_px:
        if dst is None:
            return image.copy()
        dst[...] = image
        return dst
    return cv2.resize(image, (output_px, output_px), dst=dst, interpolation=cv2.INTER_LINEAR)


def resized_windows(tile_rgb: np.ndarray, origins_xy: np.ndarray, side: int, images: np.ndarray) -> None:
    """Resize the ``side`` px windows at ``origins_xy`` (tile px; white beyond the tile) into ``images``
    ``(n, px, px, 3)``: one bilinear resize below 2x, :func:`shrink` otherwise.

    One call per window: stacking the windows into one column for a single call gave other pixels (by up to 4
    grey levels for thousands of windows), as OpenCV places the rows of a tall image in float32.
    """
    px = images.shape[1]
    height, width = tile_rgb.shape[:2]
    one_step = side < 2 * px and side != px  # shrink's integer area step needs side >= 2 * px
    for i, (local_x, local_y) in enumerate(origins_xy.tolist()):
        if 0 <= local_x <= width - side and 0 <= local_y <= height - side:
            pixels = tile_rgb[local_y : local_y + side, local_x : local_x + side]
        else:
            pixels = cut_padded(tile_rgb, local_x, local_y, side, WHITE)
        if one_step:
            cv2.resize(pixels, (px, px), dst=images[i], interpolation=cv2.INTER_LINEAR)
        else:
            shrink(pixels, px, dst=images[i])


def display_outlines(
    outlines: CellOutlines, labels: np.ndarray, origins_xy: np.ndarray, side: int, output_px: int
) -> list[str]:
    """The stored outlines of the cells ``labels`` drawn on their crops, as SVG polygon points ``"x y x y ..."``.

    ``origins_xy`` is each crop window's top-left corner in the tile window (px) and ``side`` its size. A
    boundary pixel ``i`` of the window is centred at ``i + 0.5`` (pixel-corner frame); the window's
    ``[0, side)`` is the stored image's ``[0, output_px)``, so the point lands at pixel index
    ``(i + 0.5 - origin) * output_px / side - 0.5`` of the stored image. A cell larger than its crop has its
    polygon cut to the image (:func:`_clip_to_square`: it then runs along the crop's edge). Points are
    rounded (:func:`_round_outward`) and repeats of the same pixel dropped (the stored outline is already
    simplified, :data:`mk_hspc.tile_store.SIMPLIFY_PX`). The page draws the polygon shifted by half a pixel
    (``.crop polygon`` in ``app.css``), through the pixels' centres. Empty for a cell without outline.

    Every step runs on all the cells' points at once, the text too (the digits of all the integers looked up
    in a table, cut per cell at offsets from the numbers' lengths): per cell, only a slice of that text.

    Raises:
        ValueError: a label that is not one of the tile's ``1..N`` of this cell type.
    """
    n_labels = len(outlines.start) - 1
    if len(labels) and (labels.min() < 1 or labels.max() > n_labels):
        bad = sorted({int(v) for v in labels if not 1 <= v <= n_labels})
        raise ValueError(f"labels {bad[:5]} are not among the tile store's 1..{n_labels} of this cell type")
    starts, ends = outlines.start[labels - 1], outlines.start[labels]
    counts = ends - starts
    offsets = np.concatenate([[0], np.cumsum(counts)])
    index = np.repeat(starts - offsets[:-1], counts) + np.arange(offsets[-1])
    cell_of_point = np.repeat(np.arange(len(labels)), counts)
    scaled = (outlines.xy[index] + 0.5 - origins_xy[cell_of_point]) * (output_px / side) - 0.5
    high = output_px - 1
    # (clamped here only to keep the text's widths right: the cells with points outside are redone below)
    points = np.clip(_round_outward(scaled, high / 2), 0, high).astype(np.int64)
    # A point repeating the one before it (within its cell) adds nothing to the polygon.
    keep = np.ones(len(points), bool)
    keep[1:] = (points[1:] != points[:-1]).any(axis=1)
    keep[offsets[:-1][counts > 0]] = True
    kept, kept_cells = points[keep], cell_of_point[keep]
    kept_offsets = np.concatenate([[0], np.cumsum(np.bincount(kept_cells, minlength=len(labels)))])
    text, number_widths = _numbers_text(kept.ravel(), output_px)
    char_offsets = np.concatenate([[0], np.cumsum(number_widths.reshape(-1, 2).sum(axis=1))])
    first_chars = char_offsets[kept_offsets[:-1]].tolist()
    end_chars = (char_offsets[kept_offsets[1:]] - 1).tolist()  # without the last separator
    drawn = [
        text[first:end] if end > first else "" for first, end in zip(first_chars, end_chars, strict=True)
    ]
    # Cells larger than their crop (rare): their polygon cut to the image, one by one.
    outside = ((scaled < 0) | (scaled > high)).any(axis=1)
    for cell in np.unique(cell_of_point[outside]).tolist():
        polygon = _clip_to_square(scaled[offsets[cell] : offsets[cell + 1]], float(high))
        clipped = _round_outward(polygon, high / 2).astype(np.int64)
        if len(clipped):
            clipped = clipped[np.concatenate([[True], (clipped[1:] != clipped[:-1]).any(axis=1)])]
        drawn[cell] = " ".join(map(str, clipped.ravel().tolist()))
    return drawn


def _numbers_text(values: np.ndarray, count: int) -> tuple[str, np.ndarray]:
    """``"%d " % v`` of every value (``0 <= v < count``), joined, and each one's length: the characters of
    each number looked up in a table, not formatted one by one (Python's formatting of the 260,000 numbers of
    the demo study's outlines held the GIL for 30 ms that the other tile worker waited out)."""
    table, widths = _number_table(count)
    chars = table[values]
    used = np.arange(table.shape[1]) < widths[values][:, None]
    return chars[used].tobytes().decode("ascii"), widths[values]


@functools.lru_cache(maxsize=8)
def _number_table(count: int) -> tuple[np.ndarray, np.ndarray]:
    """The ASCII characters of ``"%d " % v`` for ``v < count``, one row each (zero-padded), and their lengths."""
    texts = [b"%d " % value for value in range(count)]
    widths = np.array([len(text) for text in texts], np.int64)
    table = np.zeros((count, int(widths.max())), np.uint8)
    for value, text in enumerate(texts):
        table[value, : len(text)] = np.frombuffer(text, np.uint8)
    return table, widths


def _round_outward(points: np.ndarray, centre: float) -> np.ndarray:
    """Round to the nearest integer, halves away from ``centre`` (the crop's, where its cell is).

    An exact 2x enlargement puts every point on a half: NumPy's halves-to-even moved the whole outline half a
    pixel up and left; rounding them outward on every side draws it where tracing the enlarged mask did.
    """
    return np.where(points < centre, np.ceil(points - 0.5), np.floor(points + 0.5))


def _clip_to_square(polygon: np.ndarray, high: float) -> np.ndarray:
    """The polygon ``(n, 2)`` cut to ``[0, high]²`` (Sutherland-Hodgman: exact, the square being convex).

    Clamping each point on its own instead cut across the crop's corners wherever an edge of the cell
    crossed them (a diamond-shaped cell lost 40 % of its drawn area).
    """
    for axis in (0, 1):
        for bound, sign in ((0.0, 1.0), (high, -1.0)):
            if not len(polygon):
                return polygon
            following = np.roll(polygon, -1, axis=0)
            inside = (polygon[:, axis] - bound) * sign >= 0
            crosses = inside != ((following[:, axis] - bound) * sign >= 0)
            step = following - polygon
            with np.errstate(divide="ignore", invalid="ignore"):
                t = np.where(crosses, (bound - polygon[:, axis]) / step[:, axis], 0.0)
            crossing = polygon + t[:, None] * step
            # Each edge gives its start (if inside) then its crossing (if it crosses), in order.
            candidates = np.stack([polygon, crossing], axis=1).reshape(-1, 2)
            polygon = candidates[np.stack([inside, crosses], axis=1).ravel()]
    return polygon


def tile_crops(
    tile_rgb: np.ndarray,
    window_xy: tuple[int, int],
    outlines: CellOutlines,
    cells: list[dict],
    pixel_size_um: float,
    spec: CropSpec,
    *,
    limits: tuple[np.ndarray, np.ndarray],
    image_format: str = "webp",
    quality: int = 70,
    outlines_xy: tuple[int, int] | None = None,
) -> list[Crop]:
    """Crops of ``cells`` (dicts with ``cell_id``, ``label``, ``centroid_x_px``, ``centroid_y_px``) of one tile.

    The cells' windows are resized into one array, so the stretch and the colour order are one vectorised
    call per batch of ``CROP_BATCH`` cells, and their stored outlines are moved onto the crops at once
    (:func:`display_outlines`); only the resize and the encoding run per cell (in OpenCV, without the GIL).
    No label image is read or cut.

    Args:
        tile_rgb: the tile's pixels, read once (its window, or the part its crops need: :func:`crops_region`).
        window_xy: absolute CZI px of ``tile_rgb``'s top-left corner.
        outlines: the tile store's outlines of this cell type (tile window px, by label).
        cells: the cells to crop.
        pixel_size_um: slide pixel size.
        spec: crop size in µm and output size in px.
        limits: per-channel normalisation limits of the tile.
        image_format: ``webp`` or ``jpeg``.
        quality: encoder quality (0-100).
        outlines_xy: absolute CZI px of the tile window the outlines are in (default ``window_xy``).
    """
    if image_format not in ("webp", "jpeg"):
        raise ValueError(f"image format {image_format!r} is not one of 'webp', 'jpeg'")
    outlines_xy = window_xy if outlines_xy is None else outlines_xy
    table = stretch_table(*limits)
    crops = []
    # Batches of a few MB: large enough for vectorised calls, small enough to stay in malloc's heap (no
    # mmap/munmap and fresh page faults per tile, which contend with the other tile workers').
    for start in range(0, len(cells), CROP_BATCH):
        crops += _crop_batch(
            tile_rgb, window_xy, outlines, outlines_xy, cells[start : start + CROP_BATCH], pixel_size_um,
            spec, table, image_format, quality,
        )  # fmt: skip
    return crops


CROP_BATCH = 64


def _crop_batch(
    tile_rgb: np.ndarray,
    window_xy: tuple[int, int],
    outlines: CellOutlines,
    outlines_xy: tuple[int, int],
    cells: list[dict],
    pixel_size_um: float,
    spec: CropSpec,
    table: np.ndarray,
    image_format: str,
    quality: int,
) -> list[Crop]:
    n, px = len(cells), spec.output_px
    images = np.empty((n, px, px, 3), np.uint8)
    side = crop_side_px(spec.crop_um, pixel_size_um, px)
    window_x, window_y = window_xy
    x0, y0 = crop_box(*_centroids(cells), side)
    origins = np.stack([x0 - window_x, y0 - window_y], axis=1)  # in the pixels' frame
    # Resized first, stretched after: the lookup then runs on the small images, all at once.
    resized_windows(tile_rgb, origins, side, images)
    stretched = cv2.LUT(images.reshape(n * px, px, 3), table)
    if image_format == "jpeg":
        stretched = cv2.cvtColor(stretched, cv2.COLOR_RGB2BGR)  # OpenCV encodes BGR
    stretched = stretched.reshape(n, px, px, 3)
    labels = np.array([int(cell["label"]) for cell in cells], dtype=np.int64)
    # The crop windows' corners in the outlines' frame (the tile window), from the pixels' frame.
    shift = np.array([window_x - outlines_xy[0], window_y - outlines_xy[1]])
    drawn = display_outlines(outlines, labels, origins + shift, side, px)
    crops = []
    jpeg_params = [cv2.IMWRITE_JPEG_QUALITY, quality]
    for i, cell in enumerate(cells):
        if image_format == "jpeg":
            ok, data = cv2.imencode(".jpg", stretched[i], jpeg_params)
            if not ok:
                raise ValueError(f"JPEG encoding of {cell['cell_id']} failed")
            image = data.tobytes()
        else:
            image = encode(stretched[i], image_format, quality)
        crops.append(Crop(str(cell["cell_id"]), image, drawn[i]))
    return crops
