"""Slide-level anatomy of a demo slide: section outline, bone trabeculae and fat vacuoles.

Each structure is kept as a low-resolution *signed distance field* in micrometres (positive outside
the structure for bone and fat, positive inside for tissue), so any tile can be rendered with smooth,
anti-aliased boundaries by bilinear upsampling, and cells can be placed clear of every structure.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from mk_hspc.demo.spec import DemoSpec
from mk_hspc.demo.texture import resample_grid, sample_field, smooth_noise

SDF_CLIP_UM = 40.0  # distance fields saturate here: only boundaries and clearances matter
EOSIN_VARIATION_UM = 80.0  # length scale of uneven eosin uptake across a section
CELLULARITY_VARIATION_UM = 40.0  # length scale of denser and sparser marrow


@dataclass
class SlideLayout:
    """Everything about a slide's anatomy that tiles need; fields are at ``field_downsample``.

    Attributes:
        tissue_sdf_um: signed distance to the section edge, positive inside tissue.
        bone_sdf_um: signed distance to bone, negative inside trabeculae.
        fat_sdf_um: signed distance to fat vacuoles, negative inside a vacuole.
        eosin_gain: smooth multiplicative eosin variation (staining unevenness), around 1.
        density_gain: smooth cellularity variation used to place cells, around 1.
        tissue_mask: ground-truth tissue mask at ``tissue_mask_downsample`` (block centres).
        marrow_area_mm2: tissue that is neither bone nor fat, where cells live.
    """

    width_px: int
    height_px: int
    field_downsample: int
    tissue_sdf_um: np.ndarray
    bone_sdf_um: np.ndarray
    fat_sdf_um: np.ndarray
    eosin_gain: np.ndarray
    density_gain: np.ndarray
    tissue_mask: np.ndarray
    tissue_mask_downsample: int
    marrow_area_mm2: float

    @functools.cached_property
    def density_gain_max(self) -> float:
        return max(float(self.density_gain.max()), 1e-6)

    def sample(self, name: str, y_px: np.ndarray, x_px: np.ndarray) -> np.ndarray:
        """Values of field ``name`` at slide-local full-resolution points."""
        return sample_field(getattr(self, name), self.field_downsample, y_px, x_px)

    @functools.cached_property
    def marrow_sdf_um(self) -> np.ndarray:
        """Signed distance to the nearest non-marrow structure (edge, bone, fat), positive in marrow."""
        return np.minimum(np.minimum(self.tissue_sdf_um, self.bone_sdf_um), self.fat_sdf_um)

    def marrow_clearance_um(self, y_px: np.ndarray, x_px: np.ndarray) -> np.ndarray:
        """Distance from each point to the nearest non-marrow structure (edge, bone, fat).

        Sampled from one precomputed field (the minimum of the three): placement asks this for
        hundreds of thousands of candidate points.
        """
        return self.sample("marrow_sdf_um", y_px, x_px)


def _grid_shape(height_px: int, width_px: int, downsample: int) -> tuple[int, int]:
    return -(-height_px // downsample), -(-width_px // downsample)


def _tissue_fields(
    rng: np.random.Generator, spec: DemoSpec, shape_t: tuple[int, int], shape_f: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """A blobby section outline: thresholded smooth noise inside an elliptical envelope.

    Returns the ground-truth mask at ``tissue_mask_downsample`` and the tissue SDF at ``field_downsample``.
    """
    ds_t, ds_f, px_um = spec.tissue_mask_downsample, spec.field_downsample, spec.pixel_size_um
    sigma = spec.tissue_blob_scale_um / (px_um * ds_t)
    yy, xx = np.mgrid[0 : shape_t[0], 0 : shape_t[1]].astype(np.float32)
    envelope = 1.0 - ((yy / shape_t[0] - 0.5) / 0.5) ** 2 - ((xx / shape_t[1] - 0.5) / 0.5) ** 2
    score = (
        1.6 * envelope
        + 0.45 * smooth_noise(rng, shape_t, sigma)
        + 0.2 * smooth_noise(rng, shape_t, sigma / 3)
    )
    # the scan region is the section's bounding box plus a margin: keep tissue off the slide border
    margin = 0.06 * min(shape_t)
    to_border = np.minimum(np.minimum(yy, shape_t[0] - 1 - yy), np.minimum(xx, shape_t[1] - 1 - xx))
    score -= 3.0 * np.clip(1.0 - to_border / margin, 0.0, 1.0)
    target = rng.uniform(*spec.tissue_fraction_range)
    mask = score > np.quantile(score, 1.0 - target)
    border = max(2, round(0.02 * min(shape_t)))
    mask[:border], mask[-border:], mask[:, :border], mask[:, -border:] = False, False, False, False
    labels, n = ndimage.label(mask)
    if n > 1:
        sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1))
        mask = labels == 1 + int(np.argmax(sizes))
    mask = ndimage.binary_fill_holes(mask)
    smooth = ndimage.gaussian_filter(mask.astype(np.float32), 1.5)
    truth = smooth > 0.5
    level = resample_grid(smooth, ds_t, ds_f, shape_f)
    gy, gx = np.gradient(level)
    grad = np.hypot(gy, gx)
    sdf = (level - 0.5) / np.maximum(grad, 1e-6) * (ds_f * px_um)
    return truth, np.clip(sdf, -SDF_CLIP_UM, SDF_CLIP_UM).astype(np.float32)


def _points_where(rng: np.random.Generator, field: np.ndarray, above: float, n: int) -> np.ndarray:
    """``n`` random grid positions (row, col) where ``field > above``, by rejection (no full scans)."""
    picks = []
    for _ in range(50):
        cand = np.column_stack(
            [rng.integers(0, field.shape[0], 4 * n), rng.integers(0, field.shape[1], 4 * n)]
        )
        picks.append(cand[field[cand[:, 0], cand[:, 1]] > above])
        if sum(len(p) for p in picks) >= n:
            break
    found = np.concatenate(picks)
    if len(found) == 0:
        return np.zeros((0, 2), np.intp)
    return found[np.arange(n) % len(found)]


def _segment_sdf(
    grid_yx: tuple[np.ndarray, np.ndarray], p0: np.ndarray, p1: np.ndarray, hw0: float, hw1: float
) -> np.ndarray:
    """Distance (µm) to a capsule whose half-width goes linearly from ``hw0`` to ``hw1``."""
    yy, xx = grid_yx
    d = p1 - p0
    t = np.clip(((yy - p0[0]) * d[0] + (xx - p0[1]) * d[1]) / max(float(d @ d), 1e-9), 0.0, 1.0)
    dist = np.hypot(yy - (p0[0] + t * d[0]), xx - (p0[1] + t * d[1]))
    return dist - (hw0 + t * (hw1 - hw0))


def _bone_sdf(
    rng: np.random.Generator, spec: DemoSpec, tissue_sdf: np.ndarray, tissue_area_mm2: float
) -> np.ndarray:
    """Trabeculae as random-walk bands of varying width, rasterised as a min over capsules."""
    ds_um = spec.field_downsample * spec.pixel_size_um
    sdf = np.full(tissue_sdf.shape, SDF_CLIP_UM, np.float32)
    inside = _points_where(rng, tissue_sdf, 20.0, 64)
    # real femur sections nearly always show some trabecular bone
    n_trabeculae = max(1, int(rng.poisson(spec.trabeculae_per_mm2 * tissue_area_mm2)))
    if inside.size == 0:
        return sdf
    step_um = 30.0
    for _ in range(n_trabeculae):
        start = inside[rng.integers(len(inside))] * ds_um  # (y, x) in µm
        heading = rng.uniform(0, 2 * np.pi)
        n_steps = max(2, round(rng.uniform(*spec.trabecula_length_um) / step_um))
        base_hw = rng.uniform(*spec.trabecula_width_um) / 2.0
        points, widths = [start], [base_hw]
        for _ in range(n_steps):
            heading += rng.normal(0.0, 0.25)
            points.append(points[-1] + step_um * np.array([np.sin(heading), np.cos(heading)]))
            widths.append(
                float(np.clip(widths[-1] * np.exp(rng.normal(0, 0.12)), 0.5 * base_hw, 1.6 * base_hw))
            )
        for p0, p1, hw0, hw1 in zip(points[:-1], points[1:], widths[:-1], widths[1:], strict=True):
            reach = max(hw0, hw1) + SDF_CLIP_UM
            lo = np.floor((np.minimum(p0, p1) - reach) / ds_um).astype(int).clip(0)
            hi = np.ceil((np.maximum(p0, p1) + reach) / ds_um).astype(int) + 1
            hi = np.minimum(hi, sdf.shape)
            if np.any(hi <= lo):
                continue
            yy, xx = np.mgrid[lo[0] : hi[0], lo[1] : hi[1]].astype(np.float32)
            grid = ((yy + 0.5) * ds_um, (xx + 0.5) * ds_um)
            window = sdf[lo[0] : hi[0], lo[1] : hi[1]]
            np.minimum(window, _segment_sdf(grid, p0, p1, hw0, hw1), out=window)
    return sdf


@dataclass(frozen=True)
class RadialShapes:
    """Star-shaped outlines: radius(θ) = r0 * (1 + Σ_k amps[k] cos((k + 2) θ - phases[k])).

    Coordinates are slide-local full-resolution pixels; ``r0_px`` is the mean radius.
    """

    y_px: np.ndarray
    x_px: np.ndarray
    r0_px: np.ndarray
    amps: np.ndarray
    phases: np.ndarray

    def __len__(self) -> int:
        return int(self.y_px.shape[0])

    @property
    def r_max_px(self) -> np.ndarray:
        return self.r0_px * (1.0 + np.abs(self.amps).sum(axis=1))

    @property
    def r_min_px(self) -> np.ndarray:
        return self.r0_px * (1.0 - np.abs(self.amps).sum(axis=1))


def radius_at(theta: np.ndarray, r0: float, amps: np.ndarray, phases: np.ndarray) -> np.ndarray:
    """Radius of one star-shaped outline at angles ``theta``."""
    factor = np.ones_like(theta)
    for k, (amp, phase) in enumerate(zip(amps, phases, strict=True)):
        factor += amp * np.cos((k + 2) * theta - phase)
    return r0 * factor


def random_shapes(
    rng: np.random.Generator, n: int, max_amp: float, n_harmonics: int = 4
) -> tuple[np.ndarray, np.ndarray]:
    """Random harmonic amplitudes (decaying with order) and phases for ``n`` outlines."""
    decay = 1.0 / np.arange(1, n_harmonics + 1)
    amps = rng.uniform(0.0, max_amp, size=(n, n_harmonics)) * decay / decay.sum() * 1.5
    return amps.astype(np.float32), rng.uniform(0, 2 * np.pi, size=(n, n_harmonics)).astype(np.float32)


def _fat_vacuoles(
    rng: np.random.Generator,
    spec: DemoSpec,
    tissue_sdf: np.ndarray,
    bone_sdf: np.ndarray,
    tissue_area_mm2: float,
) -> RadialShapes:
    """Adipocyte vacuoles of mixed sizes placed by rejection until the slide's fat fraction is reached."""
    px_um, ds = spec.pixel_size_um, spec.field_downsample
    target_um2 = rng.uniform(*spec.fat_fraction_range) * tissue_area_mm2 * 1e6
    grid_points = _points_where(rng, tissue_sdf, -10.0, 4000)
    centres = (grid_points + rng.uniform(0, 1, grid_points.shape)) * ds
    n_try = len(centres)
    lo, hi = np.log(spec.vacuole_diameter_um[0] / 2), np.log(spec.vacuole_diameter_um[1] / 2)
    r_um = np.exp(rng.uniform(lo, hi, n_try))
    amps, phases = random_shapes(rng, n_try, max_amp=0.16, n_harmonics=5)
    r_px = r_um / px_um
    r_max = r_px * (1 + amps.sum(axis=1))
    gap_px = spec.vacuole_gap_um / px_um
    kept: list[int] = []
    area_um2 = 0.0
    for i in range(n_try):
        if area_um2 >= target_um2:
            break
        if kept and rng.uniform() < spec.fat_cluster_fraction:
            # adipocytes come in clusters: try the new one right beside an existing one
            k = kept[rng.integers(len(kept))]
            angle = rng.uniform(0, 2 * np.pi)
            reach = r_max[k] + r_max[i] + gap_px * rng.uniform(1.0, 3.0)
            centres[i] = centres[k] + reach * np.array([np.sin(angle), np.cos(angle)])
            if sample_field(tissue_sdf, ds, centres[i, :1], centres[i, 1:])[0] < -10.0:
                continue
        if sample_field(bone_sdf, ds, centres[i, :1], centres[i, 1:])[0] < r_max[i] * px_um + 3.0:
            continue
        if kept:
            k = np.asarray(kept)
            dist = np.hypot(centres[k, 0] - centres[i, 0], centres[k, 1] - centres[i, 1])
            if np.any(dist < r_max[k] + r_max[i] + gap_px):
                continue
        kept.append(i)
        area_um2 += np.pi * r_um[i] ** 2
    k = np.asarray(kept, np.intp)
    return RadialShapes(
        centres[k, 0].astype(np.float32),
        centres[k, 1].astype(np.float32),
        r_px[k].astype(np.float32),
        amps[k],
        phases[k],
    )


def _fat_sdf(shapes: RadialShapes, spec: DemoSpec, shape_f: tuple[int, int]) -> np.ndarray:
    """Approximate signed distance (µm) to the vacuoles: radial distance to each outline, min over vacuoles."""
    ds, px_um = spec.field_downsample, spec.pixel_size_um
    sdf = np.full(shape_f, SDF_CLIP_UM, np.float32)
    reach_px = SDF_CLIP_UM / px_um
    for i in range(len(shapes)):
        cy, cx, r0 = shapes.y_px[i], shapes.x_px[i], shapes.r0_px[i]
        half = shapes.r_max_px[i] + reach_px
        lo_y, lo_x = max(0, int((cy - half) // ds)), max(0, int((cx - half) // ds))
        hi_y, hi_x = min(shape_f[0], int((cy + half) // ds) + 2), min(shape_f[1], int((cx + half) // ds) + 2)
        if hi_y <= lo_y or hi_x <= lo_x:
            continue
        yy, xx = np.mgrid[lo_y:hi_y, lo_x:hi_x].astype(np.float32)
        dy, dx = (yy + 0.5) * ds - 0.5 - cy, (xx + 0.5) * ds - 0.5 - cx
        dist = (
            np.hypot(dy, dx) - radius_at(np.arctan2(dy, dx), r0, shapes.amps[i], shapes.phases[i])
        ) * px_um
        window = sdf[lo_y:hi_y, lo_x:hi_x]
        np.minimum(window, dist, out=window)
    return sdf


def build_layout(rng: np.random.Generator, spec: DemoSpec) -> SlideLayout:
    """Draw one slide's anatomy (deterministic for the generator's state)."""
    ds_f, px_um = spec.field_downsample, spec.pixel_size_um
    shape_t = _grid_shape(spec.height_px, spec.width_px, spec.tissue_mask_downsample)
    shape_f = _grid_shape(spec.height_px, spec.width_px, ds_f)
    tissue_mask, tissue_sdf = _tissue_fields(rng, spec, shape_t, shape_f)
    block_mm2 = (ds_f * px_um / 1000.0) ** 2
    tissue_area_mm2 = float((tissue_sdf > 0).sum()) * block_mm2
    bone_sdf = _bone_sdf(rng, spec, tissue_sdf, tissue_area_mm2)
    vacuoles = _fat_vacuoles(rng, spec, tissue_sdf, bone_sdf, tissue_area_mm2)
    fat_sdf = _fat_sdf(vacuoles, spec, shape_f)
    marrow = (tissue_sdf > 0) & (bone_sdf > 0) & (fat_sdf > 0)
    coarse = 8 * ds_f
    coarse_um = coarse * px_um
    coarse_shape = _grid_shape(spec.height_px, spec.width_px, coarse)
    eosin = 1.0 + 0.12 * smooth_noise(rng, coarse_shape, EOSIN_VARIATION_UM / coarse_um)
    density = np.exp(0.35 * smooth_noise(rng, coarse_shape, CELLULARITY_VARIATION_UM / coarse_um))
    layout = SlideLayout(
        width_px=spec.width_px,
        height_px=spec.height_px,
        field_downsample=ds_f,
        tissue_sdf_um=tissue_sdf,
        bone_sdf_um=bone_sdf,
        fat_sdf_um=fat_sdf,
        eosin_gain=resample_grid(eosin, coarse, ds_f, shape_f),
        density_gain=resample_grid(density, coarse, ds_f, shape_f),
        tissue_mask=tissue_mask,
        tissue_mask_downsample=spec.tissue_mask_downsample,
        marrow_area_mm2=float(marrow.sum()) * block_mm2,
    )
    return layout
