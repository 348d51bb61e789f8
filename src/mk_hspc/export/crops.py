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

import cv2
import numpy as np
from PIL import Image
from skimage.measure import find_contours

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
    """One encoded crop and the cell's outline in the stored image's pixels (SVG points, see :func:`mask_outline`)."""

    cell_id: str
    image: bytes
    outline: str


def normalisation_limits(
    tile_rgb: np.ndarray, low_pct: float, high_pct: float
) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (low, high) percentiles of the tile, on a regular subsample (robust to a few dark specks).

    For uint8 pixels they come from one 256-bin histogram per channel, equal to ``np.percentile``'s
    (linear interpolation between order statistics) without sorting the sample.
    """
    step = max(1, int(np.sqrt(tile_rgb.shape[0] * tile_rgb.shape[1] / 250_000)))
    sample = tile_rgb[::step, ::step].reshape(-1, tile_rgb.shape[-1])
    high = _percentiles(sample, high_pct)  # the white point: glass, where there is any
    # The dark point from the tissue alone: taken over glass too, a tile with little tissue (fat, edges)
    # put it inside the tissue and clipped its darker part to black (19 % of it at 1 % tissue).
    tissue = sample[(sample.astype(np.int16) < high - GLASS_MARGIN).any(axis=1)]
    low = _percentiles(tissue if len(tissue) >= MIN_TISSUE_SAMPLES else sample, low_pct)
    # A (nearly) uniform tile has low == high: a table from it mapped glass and cells alike to black.
    low = np.minimum(low, np.maximum(high - MIN_SPAN, 0.0))
    high = np.maximum(high, low + MIN_SPAN)
    return low, high


GLASS_MARGIN = 12  # grey levels below the white point (any channel) that make a pixel tissue
MIN_TISSUE_SAMPLES = 500
MIN_SPAN = 64.0  # grey levels: the least input range stretched to 0..255 (4x contrast at most)


def _percentiles(sample: np.ndarray, pct: float) -> np.ndarray:
    """Per-channel ``np.percentile`` (linear) of ``(n, channels)`` values; uint8 through one histogram each."""
    if sample.dtype == np.uint8:
        return np.array(
            [
                histogram_percentile(np.bincount(sample[:, c], minlength=256), pct)
                for c in range(sample.shape[1])
            ]
        )
    return np.percentile(sample.astype(np.float32), pct, axis=0).astype(np.float64)


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
    and the image and the outline (traced on the same window) share one frame."""
    side = max(4, int(round(crop_um / pixel_size_um)))
    k = side // output_px
    return side - side % k if k >= 2 else side


def crop_box(centroid_x_px: float, centroid_y_px: float, side: int) -> tuple[int, int]:
    """``(x0, y0)`` of a square crop of ``side`` px (absolute CZI px) centred on the centroid.

    The centroid is a mean of pixel indices (pixel ``i`` is centred at ``i``, spans ``[i - .5, i + .5]``);
    ``+ 0.5`` turns it into the pixel-corner frame the window is cut in, so the cell sits at the crop's centre
    (within the half pixel of rounding) instead of half a pixel up-left.
    """
    x0 = int(round(centroid_x_px + 0.5 - side / 2))
    y0 = int(round(centroid_y_px + 0.5 - side / 2))
    return x0, y0


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


def display_outline(mask: np.ndarray, output_px: int) -> str:
    """The mask's outline at the stored image's resolution, for drawing over the crop (:func:`mask_outline`).

    Traced on the mask resized to ``output_px`` (OpenCV, C speed): detail finer than a displayed pixel is
    invisible anyway. :func:`outline_array` is the exact, slower outline used where coordinates matter.
    """
    small = cv2.resize(mask.astype(np.uint8), (output_px, output_px), interpolation=cv2.INTER_NEAREST_EXACT)
    return mask_outline(small)


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


def mask_outline(mask: np.ndarray) -> str:
    """Outline of the largest part of a uint8 0/1 mask, simplified, as SVG polygon points ``"x y x y ..."``.

    The points are the column and row indices of boundary pixels (OpenCV's trace, integers): pixel ``(x, y)``
    spans ``[x, x+1] x [y, y+1]`` in the image, so the page draws the polygon shifted by half a pixel
    (``.crop polygon`` in ``app.css``) to run through the boundary pixels' centres. Integers format ~10x
    faster than floats and make shorter pages. Empty when the mask is empty.
    """
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return ""
    points = cv2.approxPolyDP(max(contours, key=cv2.contourArea), 0.7, True).ravel().tolist()
    return _svg_format(len(points)) % tuple(points)


@functools.cache
def _svg_format(n_numbers: int) -> str:
    """``"%d %d ... %d"``: one %-format of all the numbers is twice as fast as joining their ``str``."""
    return " ".join(["%d"] * n_numbers)


def tile_crops(
    tile_rgb: np.ndarray,
    window_xy: tuple[int, int],
    labels: np.ndarray,
    cells: list[dict],
    pixel_size_um: float,
    spec: CropSpec,
    *,
    limits: tuple[np.ndarray, np.ndarray],
    image_format: str = "webp",
    quality: int = 70,
) -> list[Crop]:
    """Crops of ``cells`` (dicts with ``cell_id``, ``label``, ``centroid_x_px``, ``centroid_y_px``) of one tile.

    The cells' windows are resized into one array (and their label windows, nearest neighbour, into
    another), so the stretch, the colour order and the masks are one vectorised call per batch of
    ``CROP_BATCH`` cells; only the outline trace and the encoding run per cell (both in OpenCV, without
    the GIL).

    Args:
        tile_rgb: the tile window's pixels, read once.
        window_xy: absolute CZI px of the window's top-left corner.
        labels: the tile's label image of this cell type (same shape as the window).
        cells: the cells to crop.
        pixel_size_um: slide pixel size.
        spec: crop size in µm and output size in px.
        limits: per-channel normalisation limits of the tile.
        image_format: ``webp`` or ``jpeg``.
        quality: encoder quality (0-100).
    """
    if image_format not in ("webp", "jpeg"):
        raise ValueError(f"image format {image_format!r} is not one of 'webp', 'jpeg'")
    table = stretch_table(*limits)
    crops = []
    # Batches of a few MB: large enough for vectorised calls, small enough to stay in malloc's heap (no
    # mmap/munmap and fresh page faults per tile, which contend with the reader thread's).
    for start in range(0, len(cells), CROP_BATCH):
        crops += _crop_batch(
            tile_rgb, window_xy, labels, cells[start : start + CROP_BATCH], pixel_size_um, spec,
            table, image_format, quality,
        )  # fmt: skip
    return crops


CROP_BATCH = 64


def _crop_batch(
    tile_rgb: np.ndarray,
    window_xy: tuple[int, int],
    labels: np.ndarray,
    cells: list[dict],
    pixel_size_um: float,
    spec: CropSpec,
    table: np.ndarray,
    image_format: str,
    quality: int,
) -> list[Crop]:
    n, px = len(cells), spec.output_px
    images = np.empty((n, px, px, 3), np.uint8)
    own_labels = np.empty((n, px, px), labels.dtype)
    # crop_box inlined (the same arithmetic), one bounds check for pixels and labels: ~3 us less per crop.
    side = crop_side_px(spec.crop_um, pixel_size_um, px)
    half, (window_x, window_y), (height, width) = side / 2 - 0.5, window_xy, tile_rgb.shape[:2]
    # Below 2x, shrink is one bilinear resize (its integer area step needs side >= 2 * px).
    one_step = side < 2 * px and side != px
    for i, cell in enumerate(cells):
        local_x = int(round(cell["centroid_x_px"] - half)) - window_x
        local_y = int(round(cell["centroid_y_px"] - half)) - window_y
        if 0 <= local_x <= width - side and 0 <= local_y <= height - side:
            pixels = tile_rgb[local_y : local_y + side, local_x : local_x + side]
            own = labels[local_y : local_y + side, local_x : local_x + side]
        else:
            pixels = cut_padded(tile_rgb, local_x, local_y, side, WHITE)
            own = cut_padded(labels, local_x, local_y, side, 0)
        # Resized first, stretched after: the lookup then runs on the small images, all at once.
        if one_step:
            cv2.resize(pixels, (px, px), dst=images[i], interpolation=cv2.INTER_LINEAR)
        else:
            shrink(pixels, px, dst=images[i])
        # Nearest neighbour keeps label values whole: resizing the labels then comparing equals
        # comparing then resizing the mask. The exact variant samples each output pixel's centre; plain
        # INTER_NEAREST samples its corner, which put the outline half a displayed pixel right and down.
        cv2.resize(own, (px, px), dst=own_labels[i], interpolation=cv2.INTER_NEAREST_EXACT)
    stretched = cv2.LUT(images.reshape(n * px, px, 3), table)
    if image_format == "jpeg":
        stretched = cv2.cvtColor(stretched, cv2.COLOR_RGB2BGR)  # OpenCV encodes BGR
    stretched = stretched.reshape(n, px, px, 3)
    values = np.array([int(cell["label"]) for cell in cells], dtype=own_labels.dtype)
    masks = (own_labels == values[:, None, None]).view(np.uint8)
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
        crops.append(Crop(str(cell["cell_id"]), image, mask_outline(masks[i])))
    return crops
