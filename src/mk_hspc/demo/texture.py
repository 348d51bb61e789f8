"""Noise fields and periodic texture banks for the demo slides.

Everything a slide needs at full resolution is either a low-resolution field upsampled on demand
(smooth variation) or a small *periodic* bank indexed by absolute pixel position (fine texture),
so that tiles render independently yet join without seams, and memory stays bounded.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma_px: float) -> np.ndarray:
    """Gaussian-filtered white noise rescaled to zero mean and unit standard deviation (float32).

    Wide filters are applied on a decimated grid and interpolated back: the result is just as smooth
    and costs a fraction of a full-size convolution.
    """
    step = max(1, int(sigma_px // 4))
    coarse_shape = (-(-shape[0] // step) + 1, -(-shape[1] // step) + 1)
    field = ndimage.gaussian_filter(
        rng.standard_normal(coarse_shape).astype(np.float32), sigma_px / step, mode="reflect"
    )
    if step > 1:
        field = resample_grid(field, step, 1, shape)
    field -= field.mean()
    field /= max(float(field.std()), 1e-6)
    return field


def periodic_blur(image: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian blur of a periodic image (exact wrap-around, via the FFT; cost independent of sigma)."""
    fy = np.fft.fftfreq(image.shape[0])[:, None]
    fx = np.fft.rfftfreq(image.shape[1])[None, :]
    kernel = np.exp(-2.0 * (np.pi * sigma_px) ** 2 * (fy**2 + fx**2))
    return np.fft.irfft2(np.fft.rfft2(image) * kernel, s=image.shape).astype(np.float32)


def periodic_noise(rng: np.random.Generator, period_px: int, sigma_px: float) -> np.ndarray:
    """Smooth noise that tiles seamlessly (filtered with wrap-around), zero mean, unit std (float32)."""
    field = periodic_blur(rng.standard_normal((period_px, period_px)), sigma_px)
    field -= field.mean()
    field /= max(float(field.std()), 1e-6)
    return field


def voronoi_bank(
    rng: np.random.Generator, period_px: int, spacing_px: float, warp_px: float
) -> tuple[np.ndarray, np.ndarray, int]:
    """A periodic, domain-warped Voronoi tessellation: packed cells with curved borders.

    Returns:
        ``(edge_px, region_id, n_regions)``: distance of each pixel to the nearest cell border
        (half the gap between the nearest and second-nearest seed, float32) and the seed index of
        each pixel (int32).
    """
    if period_px % 2:
        raise ValueError("period_px must be even")
    n_seeds = max(4, round(period_px**2 / spacing_px**2))
    seeds = rng.uniform(0, period_px, size=(n_seeds, 2))
    tree = cKDTree(seeds, boxsize=period_px)
    # query every other pixel (4x cheaper) and interpolate: the border distance is piecewise smooth
    half = period_px // 2
    warp_y = periodic_noise(rng, half, spacing_px / 6) * warp_px
    warp_x = periodic_noise(rng, half, spacing_px / 6) * warp_px
    yy, xx = np.mgrid[0:half, 0:half].astype(np.float32) * 2
    pts = np.column_stack([(yy + warp_y).ravel(), (xx + warp_x).ravel()]) % period_px
    dist, idx = tree.query(pts, k=2)
    edge_half = ((dist[:, 1] - dist[:, 0]) / 2.0).astype(np.float32).reshape(half, half)
    edge_px = np.empty((period_px, period_px), np.float32)
    right = np.roll(edge_half, -1, axis=1)
    edge_px[0::2, 0::2] = edge_half
    edge_px[0::2, 1::2] = 0.5 * (edge_half + right)
    edge_px[1::2] = 0.5 * (edge_px[0::2] + np.roll(edge_px[0::2], -1, axis=0))
    region = np.repeat(np.repeat(idx[:, 0].astype(np.int32).reshape(half, half), 2, axis=0), 2, axis=1)
    return edge_px, region, n_seeds


class PeriodicBank:
    """A periodic texture stored pre-tiled, so that any window up to ``max_window`` is a plain slice."""

    def __init__(self, tile: np.ndarray, max_window: int) -> None:
        self.period = tile.shape[0]
        reps = -(-(self.period + max_window) // self.period)
        self.data = np.tile(tile, (reps, reps) + (1,) * (tile.ndim - 2))[
            : self.period + max_window, : self.period + max_window
        ]
        self.max_window = max_window

    def window(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """The ``(h, w)`` window whose top-left is at absolute ``(y0, x0)`` (a view when it fits)."""
        if h <= self.max_window and w <= self.max_window:
            oy, ox = y0 % self.period, x0 % self.period
            return self.data[oy : oy + h, ox : ox + w]
        ys = np.arange(y0, y0 + h) % self.period
        xs = np.arange(x0, x0 + w) % self.period
        return self.data[ys[:, None], xs[None, :]]


def _phase_lerp(src: np.ndarray, lo: int, ds: int, start: int, n_out: int) -> np.ndarray:
    """Linear upsampling along axis 0 by an integer factor, one output phase at a time (no gathers).

    ``src[j]`` is low-resolution sample ``lo + j``; full-resolution pixel ``p`` sits at low-resolution
    coordinate ``(p + 0.5) / ds - 0.5``. Pixels of one phase share their weight and step one sample
    per ``ds`` pixels, so each phase is two slices and a blend.
    """
    out = np.empty((n_out,) + src.shape[1:], np.float32)
    for q in range(min(ds, n_out)):
        coord = (start + q + 0.5) / ds - 0.5
        i0 = int(np.floor(coord))
        weight = np.float32(coord - i0)
        m = len(range(q, n_out, ds))
        j0 = i0 - lo
        a, b = src[j0 : j0 + m], src[j0 + 1 : j0 + 1 + m]
        out[q::ds] = a + weight * (b - a)
    return out


def _low_range(start: int, n_out: int, ds: int, n_low: int) -> tuple[int, np.ndarray]:
    lo = int(np.floor((start + 0.5) / ds - 0.5))
    hi = int(np.floor((start + n_out - 0.5) / ds - 0.5)) + 1
    return lo, np.clip(np.arange(lo, hi + 1), 0, n_low - 1)


def upsample_window(field: np.ndarray, downsample: int, y0: int, x0: int, h: int, w: int) -> np.ndarray:
    """Bilinearly upsample the window ``(y0, x0, h, w)`` (full-resolution, slide-local px) of a field.

    ``field[i, j]`` is the value at the centre of the ``downsample``-px block ``(i, j)``; coordinates
    outside the field are clamped to its edge. Every window uses the same formula, so neighbouring
    tiles match at their border.
    """
    lo_y, rows = _low_range(y0, h, downsample, field.shape[0])
    lo_x, cols = _low_range(x0, w, downsample, field.shape[1])
    sub = field[rows[:, None], cols[None, :]].astype(np.float32, copy=False)
    # columns first, while the array is still small, then rows as contiguous slices
    wide = np.ascontiguousarray(_phase_lerp(np.ascontiguousarray(sub.T), lo_x, downsample, x0, w).T)
    return _phase_lerp(wide, lo_y, downsample, y0, h)


def sample_field(field: np.ndarray, downsample: int, y_px: np.ndarray, x_px: np.ndarray) -> np.ndarray:
    """Bilinear values of a low-resolution field at full-resolution slide-local points (edge-clamped)."""
    coords = np.stack(
        [(np.asarray(y_px) + 0.5) / downsample - 0.5, (np.asarray(x_px) + 0.5) / downsample - 0.5]
    )
    return ndimage.map_coordinates(field, coords, order=1, mode="nearest")


def resample_grid(field: np.ndarray, ds_from: int, ds_to: int, shape_to: tuple[int, int]) -> np.ndarray:
    """Bilinear resampling from one block grid to a finer one that shares the full-resolution frame."""
    if ds_from % ds_to:
        raise ValueError("ds_from must be a multiple of ds_to")
    factor = ds_from // ds_to
    # A block of the finer grid is one pixel of an image downsampled by ds_to, so the same
    # phase-wise interpolation applies with the ratio of the two downsamples.
    lo_y, rows = _low_range(0, shape_to[0], factor, field.shape[0])
    lo_x, cols = _low_range(0, shape_to[1], factor, field.shape[1])
    sub = field[rows[:, None], cols[None, :]].astype(np.float32, copy=False)
    wide = np.ascontiguousarray(_phase_lerp(np.ascontiguousarray(sub.T), lo_x, factor, 0, shape_to[1]).T)
    return _phase_lerp(wide, lo_y, factor, 0, shape_to[0])
