"""Cells of a demo slide: HSPC-like and MK-like ground truth, red cells and osteocyte lacunae.

Placement keeps the truth unambiguous: a ground-truth cell overlaps another by at most
``max_overlap_fraction`` of the smaller one (checked on enclosing circles, so the true outlines
overlap less), MKs never touch each other, and every cell sits in marrow clear of fat, bone and the
section edge. Shapes are star-shaped outlines (:class:`RadialShapes`) so that the rendered pixels and
the ground-truth polygons come from the same formula.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from mk_hspc.demo.layout import RadialShapes, SlideLayout, radius_at, random_shapes
from mk_hspc.demo.spec import DemoSpec

MAX_LOBES = 8
PLACEMENT_ROUNDS = 6
CLUSTER_SPREAD_UM = 12.0  # a cluster of HSPC-like cells is a handful of touching cells


@dataclass(frozen=True)
class HspcVariants:
    """A study-wide bank of HSPC-like cell designs (rendered once, placed many times).

    Each design is a dark, roughly elliptical nucleus inside a thin basophilic cytoplasm rim, centred
    on (0, 0). Placed cells pick a design, one of 8 orientations (rotations by 90° and mirroring) and
    a stain gain, which keeps rendering cheap while the ground-truth outline stays exact.
    """

    outline: RadialShapes
    nuc_dy_px: np.ndarray
    nuc_dx_px: np.ndarray
    nuc_r0_px: np.ndarray  # semi-major axis of the nucleus
    nuc_aspect: np.ndarray  # minor / major axis
    nuc_angle: np.ndarray
    nuc_amps: np.ndarray
    nuc_phases: np.ndarray
    open_chromatin: np.ndarray  # bool: pale nucleus with a dark membrane instead of a dense one
    nuc_h: np.ndarray
    cyto_h: np.ndarray
    cyto_e: np.ndarray
    cyto_opacity: np.ndarray  # the rim lets some of the marrow beneath show through

    def __len__(self) -> int:
        return len(self.outline)

    @property
    def area_px2(self) -> np.ndarray:
        return star_area_px2(self.outline.r0_px, self.outline.amps)


@dataclass(frozen=True)
class HspcCells:
    """Placed HSPC-like cells: integer centre pixel, design, orientation (0-7) and haematoxylin gain."""

    y_px: np.ndarray
    x_px: np.ndarray
    variant: np.ndarray
    orientation: np.ndarray
    h_gain: np.ndarray

    def __len__(self) -> int:
        return int(self.y_px.shape[0])


def orient_array(image: np.ndarray, orientation: int) -> np.ndarray:
    """One of the 8 symmetries of a square stamp: ``orientation % 4`` quarter turns, then a mirror if >= 4."""
    out = np.rot90(image, orientation % 4)
    return out[:, ::-1] if orientation >= 4 else out


def orient_points(dx: np.ndarray, dy: np.ndarray, orientation: int) -> tuple[np.ndarray, np.ndarray]:
    """Where offsets ``(dx, dy)`` from a stamp's centre land after :func:`orient_array`."""
    for _ in range(orientation % 4):
        dx, dy = dy, -dx  # np.rot90 maps (dy, dx) -> (-dx, dy)
    if orientation >= 4:
        dx = -dx
    return dx, dy


@dataclass(frozen=True)
class MkCells:
    """Giant cells: granular pink cytoplasm around a multilobed nucleus made of overlapping ellipses."""

    outline: RadialShapes
    lobe_dy_px: np.ndarray  # (n, MAX_LOBES)
    lobe_dx_px: np.ndarray
    lobe_a_px: np.ndarray
    lobe_b_px: np.ndarray
    lobe_angle: np.ndarray
    lobe_valid: np.ndarray
    halo_px: np.ndarray  # width of the clear retraction gap around the cell, 0 = none
    nuc_h: np.ndarray
    cyto_e: np.ndarray

    def __len__(self) -> int:
        return len(self.outline)


@dataclass(frozen=True)
class Discs:
    """Small objects drawn from a stamp bank (red cells, osteocyte lacunae): centre and stamp index."""

    y_px: np.ndarray
    x_px: np.ndarray
    variant: np.ndarray
    r_max_px: float

    def __len__(self) -> int:
        return int(self.y_px.shape[0])


def polygon_xy(shapes: RadialShapes, index: int, n_vertices: int = 64) -> np.ndarray:
    """The outline of one shape as an ``(n_vertices, 2)`` array of slide-local (x, y) pixels."""
    theta = np.linspace(0.0, 2 * np.pi, n_vertices, endpoint=False)
    r = radius_at(theta, shapes.r0_px[index], shapes.amps[index], shapes.phases[index])
    return np.column_stack([shapes.x_px[index] + r * np.cos(theta), shapes.y_px[index] + r * np.sin(theta)])


def polygon_area_px2(xy: np.ndarray) -> float:
    """Shoelace area of a closed polygon given as ``(n, 2)`` vertices."""
    x, y = xy[:, 0], xy[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def polygon_centroid(xy: np.ndarray) -> tuple[float, float]:
    """Area centroid ``(x, y)`` of a closed simple polygon (the true cell centroid, not its seed point)."""
    x, y = xy[:, 0], xy[:, 1]
    x1, y1 = np.roll(x, -1), np.roll(y, -1)
    cross = x * y1 - x1 * y
    six_area = 3.0 * cross.sum()
    return float(((x + x1) * cross).sum() / six_area), float(((y + y1) * cross).sum() / six_area)


def circle_overlap_area(d: np.ndarray, r1: np.ndarray, r2: np.ndarray) -> np.ndarray:
    """Area of the intersection of two discs at centre distance ``d`` (vectorised lens formula)."""
    d, r1, r2 = np.broadcast_arrays(np.asarray(d, float), np.asarray(r1, float), np.asarray(r2, float))
    out = np.zeros(d.shape)
    inside = d <= np.abs(r1 - r2)
    out[inside] = np.pi * np.minimum(r1, r2)[inside] ** 2
    lens = (d < r1 + r2) & ~inside
    dd, a, b = d[lens], r1[lens], r2[lens]
    alpha = np.arccos(np.clip((dd**2 + a**2 - b**2) / (2 * dd * a), -1, 1))
    beta = np.arccos(np.clip((dd**2 + b**2 - a**2) / (2 * dd * b), -1, 1))
    root = np.sqrt(np.clip((-dd + a + b) * (dd + a - b) * (dd - a + b) * (dd + a + b), 0, None))
    out[lens] = a**2 * alpha + b**2 * beta - 0.5 * root
    return out


def greedy_accept(
    y: np.ndarray,
    x: np.ndarray,
    r_max: np.ndarray,
    area: np.ndarray,
    max_fraction: float,
    n_fixed: int = 0,
    target: int | None = None,
) -> np.ndarray:
    """Indices kept when candidates are taken in order and each must respect the overlap rule.

    The first ``n_fixed`` candidates are kept unconditionally (already-placed cells). A later
    candidate is dropped when its enclosing disc overlaps an already-kept one by more than
    ``max_fraction`` of the smaller true ``area``.
    """
    n = len(y)
    if n == 0:
        return np.zeros(0, np.intp)
    tree = cKDTree(np.column_stack([y, x]))
    pairs = tree.query_pairs(r=2 * float(r_max.max()), output_type="ndarray")
    conflicts_of: dict[int, np.ndarray] = {}
    if len(pairs):
        i, j = pairs.min(axis=1), pairs.max(axis=1)
        d = np.hypot(y[i] - y[j], x[i] - x[j])
        frac = circle_overlap_area(d, r_max[i], r_max[j]) / np.minimum(area[i], area[j])
        bad = frac > max_fraction
        i, j = i[bad], j[bad]
        order = np.argsort(j, kind="stable")
        i, j = i[order], j[order]
        splits = np.flatnonzero(np.diff(j)) + 1
        for js, is_ in zip(np.split(j, splits), np.split(i, splits), strict=True):
            if js.size:
                conflicts_of[int(js[0])] = is_
    kept = np.zeros(n, bool)
    kept[:n_fixed] = True
    n_kept = 0
    for k in range(n_fixed, n):
        if target is not None and n_kept >= target:
            break
        earlier = conflicts_of.get(k)
        if earlier is None or not kept[earlier].any():
            kept[k] = True
            n_kept += 1
    return np.flatnonzero(kept[n_fixed:]) + n_fixed


def _candidate_points(
    rng: np.random.Generator,
    layout: SlideLayout,
    n: int,
    clearance_um: np.ndarray,
    cluster_fraction: float,
    spread_px: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Up to ``n`` points in marrow, denser where ``density_gain`` is high, partly in small clusters.

    Returns the points and the index of the ``clearance_um`` entry each one satisfies.
    """
    h, w = layout.height_px, layout.width_px
    ys, xs, idx = [np.zeros(0)], [np.zeros(0)], [np.zeros(0, np.intp)]
    got, rounds = 0, 0
    sizes = np.arange(len(clearance_um))
    gain_max = max(float(layout.density_gain.max()), 1e-6)
    while got < n and rounds < 30:
        rounds += 1
        batch = max(1000, 3 * (n - got))
        py, px = rng.uniform(0, h, batch), rng.uniform(0, w, batch)
        n_cluster = int(cluster_fraction * batch)
        if n_cluster:
            parents = rng.integers(0, batch, max(1, n_cluster // 8))
            pick = rng.choice(parents, n_cluster)
            py[:n_cluster] = py[pick] + rng.normal(0, spread_px, n_cluster)
            px[:n_cluster] = px[pick] + rng.normal(0, spread_px, n_cluster)
        which = rng.choice(sizes, batch)
        ok = (py >= 0) & (py < h) & (px >= 0) & (px < w)
        py, px, which = py[ok], px[ok], which[ok]
        gain = layout.sample("density_gain", py, px)
        ok = rng.uniform(0, 1, len(py)) < gain / gain_max
        ok &= layout.marrow_clearance_um(py, px) >= clearance_um[which]
        ys.append(py[ok]), xs.append(px[ok]), idx.append(which[ok])
        got += int(ok.sum())
    y, x, k = np.concatenate(ys)[:n], np.concatenate(xs)[:n], np.concatenate(idx)[:n]
    order = rng.permutation(len(y))
    return y[order], x[order], k[order]


def _mk_params(rng: np.random.Generator, spec: DemoSpec, n: int) -> dict[str, np.ndarray]:
    px_um = spec.pixel_size_um
    area_um2 = np.exp(rng.uniform(np.log(spec.mk_area_um2[0]), np.log(spec.mk_area_um2[1]), n))
    amps, phases = random_shapes(rng, n, max_amp=0.07)
    r0_px = np.sqrt(area_um2 / (np.pi * (1 + 0.5 * (amps**2).sum(axis=1)))) / px_um
    n_lobes = rng.integers(4, MAX_LOBES + 1, n)
    valid = np.arange(MAX_LOBES)[None, :] < n_lobes[:, None]
    # lobes chain from the centre by a short random walk so that they overlap into one mass
    steps = rng.normal(0, 0.26, (n, MAX_LOBES, 2)) * r0_px[:, None, None]
    steps[:, 0] = 0.0
    walk = np.cumsum(steps, axis=1)
    walk -= (walk * valid[..., None]).sum(axis=1, keepdims=True) / n_lobes[:, None, None]
    lobe_scale = r0_px[:, None] * rng.uniform(0.24, 0.34, (n, 1))
    lobe_a = lobe_scale * rng.uniform(0.8, 1.25, (n, MAX_LOBES))
    lobe_b = lobe_a * rng.uniform(0.55, 0.95, (n, MAX_LOBES))
    # keep the nucleus inside the cytoplasm with a margin
    reach = np.hypot(walk[..., 0], walk[..., 1]) + lobe_a
    shrink = np.minimum(1.0, 0.8 * r0_px[:, None] / np.maximum(reach, 1e-6)).min(axis=1, keepdims=True)
    return {
        "r0_px": r0_px.astype(np.float32),
        "amps": amps,
        "phases": phases,
        "lobe_dy_px": (walk[..., 0] * shrink).astype(np.float32),
        "lobe_dx_px": (walk[..., 1] * shrink).astype(np.float32),
        "lobe_a_px": (lobe_a * shrink).astype(np.float32),
        "lobe_b_px": (lobe_b * shrink).astype(np.float32),
        "lobe_angle": rng.uniform(0, np.pi, (n, MAX_LOBES)).astype(np.float32),
        "lobe_valid": valid,
        "halo_px": np.where(rng.uniform(0, 1, n) < 0.35, rng.uniform(0.5, 1.5, n) / px_um, 0.0).astype(
            np.float32
        ),
        "nuc_h": rng.uniform(0.9, 1.25, n).astype(np.float32),
        "cyto_e": rng.uniform(0.28, 0.42, n).astype(np.float32),
    }


def hspc_variants(rng: np.random.Generator, spec: DemoSpec, n: int) -> HspcVariants:
    """``n`` HSPC-like cell designs drawn from the spec's size ranges."""
    params = _hspc_params(rng, spec, n)
    zeros = np.zeros(n, np.float32)
    return HspcVariants(outline=_outline(zeros, zeros, params), **params)


def _hspc_params(rng: np.random.Generator, spec: DemoSpec, n: int) -> dict[str, np.ndarray]:
    px_um = spec.pixel_size_um
    aspect = rng.uniform(0.7, 1.0, n)
    diameter_um = rng.uniform(*spec.hspc_nucleus_diameter_um, n)
    nuc_r0 = diameter_um / 2 / np.sqrt(aspect) / px_um  # equal-area ellipse of that diameter
    nuc_amps, nuc_phases = random_shapes(rng, n, max_amp=0.08, n_harmonics=3)
    nuc_reach = nuc_r0 * (1 + nuc_amps.sum(axis=1))
    rim_px = rng.uniform(*spec.hspc_cytoplasm_rim_um, n) / px_um
    offset = rng.uniform(0, 0.5, n) * rim_px
    angle = rng.uniform(0, 2 * np.pi, n)
    amps, phases = random_shapes(rng, n, max_amp=0.04, n_harmonics=3)
    r0 = (nuc_reach + offset + rim_px) / (1 - amps.sum(axis=1))
    open_chromatin = rng.uniform(0, 1, n) < 0.45
    return {
        "r0_px": r0.astype(np.float32),
        "amps": amps,
        "phases": phases,
        "nuc_dy_px": (offset * np.sin(angle)).astype(np.float32),
        "nuc_dx_px": (offset * np.cos(angle)).astype(np.float32),
        "nuc_r0_px": nuc_r0.astype(np.float32),
        "nuc_aspect": aspect.astype(np.float32),
        "nuc_angle": rng.uniform(0, np.pi, n).astype(np.float32),
        "nuc_amps": nuc_amps,
        "nuc_phases": nuc_phases,
        "open_chromatin": open_chromatin,
        "nuc_h": np.where(open_chromatin, rng.uniform(0.5, 0.75, n), rng.uniform(0.85, 1.2, n)).astype(
            np.float32
        ),
        "cyto_h": rng.uniform(0.03, 0.10, n).astype(np.float32),
        "cyto_e": rng.uniform(0.12, 0.28, n).astype(np.float32),
        "cyto_opacity": rng.uniform(0.4, 0.8, n).astype(np.float32),
    }


def _take(params: dict[str, np.ndarray], idx: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[idx] for k, v in params.items()}


def _outline(y: np.ndarray, x: np.ndarray, params: dict[str, np.ndarray]) -> RadialShapes:
    return RadialShapes(
        y.astype(np.float32),
        x.astype(np.float32),
        params.pop("r0_px"),
        params.pop("amps"),
        params.pop("phases"),
    )


def star_area_px2(r0: np.ndarray, amps: np.ndarray) -> np.ndarray:
    return np.pi * r0**2 * (1 + 0.5 * (amps**2).sum(axis=1))


def place_cells(
    rng: np.random.Generator,
    spec: DemoSpec,
    layout: SlideLayout,
    variants: HspcVariants,
    mk_factor: float,
    hspc_factor: float,
) -> tuple[MkCells, HspcCells]:
    """Place the slide's MKs (never touching each other), then its HSPCs around them."""
    px_um = spec.pixel_size_um
    n_mk = int(rng.poisson(spec.mk_per_mm2 * mk_factor * layout.marrow_area_mm2))
    mk = _mk_params(rng, spec, 3 * n_mk + 4)
    mk_rmax = mk["r0_px"] * (1 + mk["amps"].sum(axis=1)) + mk["halo_px"]
    my, mx, which = _candidate_points(rng, layout, len(mk_rmax), mk_rmax * px_um + 2.0, 0.0)
    mk = _take(mk, which)
    mk_rmax = mk_rmax[which] + 0.5 * spec.mk_gap_um / px_um
    # MKs must not touch: a zero overlap budget on discs padded by half the gap
    keep = greedy_accept(my, mx, mk_rmax, star_area_px2(mk["r0_px"], mk["amps"]), 0.0, target=n_mk)
    mk = _take(mk, keep)
    my, mx, mk_rmax = my[keep], mx[keep], mk_rmax[keep]
    mk_area = star_area_px2(mk["r0_px"], mk["amps"])

    n_hspc = int(round(spec.hspc_per_mm2 * hspc_factor * layout.marrow_area_mm2))
    v_rmax = variants.outline.r_max_px
    placed_y, placed_x, placed_r, placed_area = my, mx, mk_rmax, mk_area
    hy, hx, which = np.zeros(0), np.zeros(0), np.zeros(0, np.intp)
    # Rounds of fresh candidates fill the gaps that rejections leave, until the target density is
    # reached or the marrow is saturated.
    for _ in range(PLACEMENT_ROUNDS):
        missing = n_hspc - len(hy)
        if missing <= 0:
            break
        cy, cx, cv = _candidate_points(
            rng,
            layout,
            2 * missing + 16,
            v_rmax * px_um + 0.3,
            spec.hspc_cluster_fraction,
            CLUSTER_SPREAD_UM / px_um,
        )
        cy, cx = np.round(cy), np.round(cx)  # stamps sit on whole pixels; outlines are exact about them
        keep = greedy_accept(
            np.concatenate([placed_y, cy]),
            np.concatenate([placed_x, cx]),
            np.concatenate([placed_r, v_rmax[cv]]),
            np.concatenate([placed_area, variants.area_px2[cv]]),
            spec.max_overlap_fraction,
            n_fixed=len(placed_y),
            target=missing,
        ) - len(placed_y)
        if keep.size == 0:
            break
        hy, hx, which = (
            np.concatenate([hy, cy[keep]]),
            np.concatenate([hx, cx[keep]]),
            np.concatenate([which, cv[keep]]),
        )
        placed_y, placed_x = np.concatenate([placed_y, cy[keep]]), np.concatenate([placed_x, cx[keep]])
        placed_r = np.concatenate([placed_r, v_rmax[cv[keep]]])
        placed_area = np.concatenate([placed_area, variants.area_px2[cv[keep]]])
    n = len(hy)
    hspc = HspcCells(
        y_px=hy.astype(np.int64),
        x_px=hx.astype(np.int64),
        variant=which.astype(np.intp),
        orientation=rng.integers(0, 8, n),
        h_gain=rng.uniform(0.85, 1.15, n).astype(np.float32),
    )
    return MkCells(outline=_outline(my, mx, mk), **mk), hspc


def hspc_polygon_xy(variants: HspcVariants, cells: HspcCells, index: int, n_vertices: int = 64) -> np.ndarray:
    """The true outline of placed HSPC ``index`` as ``(n_vertices, 2)`` slide-local (x, y) pixels."""
    rel = polygon_xy(variants.outline, int(cells.variant[index]), n_vertices)
    dx, dy = orient_points(rel[:, 0], rel[:, 1], int(cells.orientation[index]))
    return np.column_stack([dx + cells.x_px[index], dy + cells.y_px[index]])


def place_discs(
    rng: np.random.Generator,
    layout: SlideLayout,
    n: int,
    r_max_px: float,
    n_variants: int,
    where: str,
    px_um: float,
) -> Discs:
    """Scatter ``n`` bank-drawn objects in marrow (``where="marrow"``) or inside bone (``"bone"``)."""
    ys, xs = [np.zeros(0)], [np.zeros(0)]
    got, rounds = 0, 0
    # red cells pool where nucleated cells are sparse (sinusoids)
    rbc_weight_max = float(layout.density_gain.min()) ** -2
    while got < n and rounds < 30:
        rounds += 1
        batch = max(500, 4 * (n - got))
        py, px = rng.uniform(0, layout.height_px, batch), rng.uniform(0, layout.width_px, batch)
        if where == "bone":
            ok = (layout.sample("bone_sdf_um", py, px) < -r_max_px * px_um - 1.0) & (
                layout.sample("tissue_sdf_um", py, px) > r_max_px * px_um
            )
        else:
            gain = layout.sample("density_gain", py, px) ** -2
            ok = rng.uniform(0, 1, batch) < gain / rbc_weight_max
            ok &= layout.marrow_clearance_um(py, px) >= r_max_px * px_um
        ys.append(py[ok]), xs.append(px[ok])
        got += int(ok.sum())
    y, x = np.concatenate(ys)[:n], np.concatenate(xs)[:n]
    return Discs(y.astype(np.float32), x.astype(np.float32), rng.integers(0, n_variants, len(y)), r_max_px)
