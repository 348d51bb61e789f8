"""Cells of a demo slide: every object the ground truth lists, with its true type, plus red cells and lacunae.

Two targets (``mk``, ``hspc``) and the confounders a real marrow section puts next to them: lymphocytes,
erythroblasts (partly in islands) and granulocytes with segmented nuclei among the small cells;
osteoclasts on bone surfaces, tight clusters of small nuclei and nucleus-free pink debris among the
MK-sized objects. Every object is a star-shaped outline (:class:`RadialShapes`) holding a nucleus made of
ellipses ("lobes"), so that the rendered pixels and the ground-truth polygons come from the same numbers.

Placement keeps the truth unambiguous: a small cell overlaps another object by at most
``max_overlap_fraction`` of the smaller one (checked on enclosing circles, so the true outlines overlap
less), large objects never touch each other, and everything sits in marrow clear of fat, bone and the
section edge, except osteoclasts, which sit on bone surfaces as they do in real sections.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from mk_hspc.demo.layout import RadialShapes, SlideLayout, radius_at, random_shapes
from mk_hspc.demo.spec import DemoSpec

# The ground truth's types, in the order the table lists them. The first two are the targets.
CELL_TYPES = (
    "mk",
    "hspc",
    "osteoclast",
    "granulocyte",
    "erythroblast",
    "lymphocyte",
    "small_nucleus_cluster",
    "debris",
)
TARGET_TYPES = ("mk", "hspc")
SMALL_TYPES = ("hspc", "lymphocyte", "erythroblast", "granulocyte")  # drawn from a stamp bank
LARGE_TYPES = ("mk", "osteoclast", "small_nucleus_cluster", "debris")  # rendered one by one
TYPE_CODE = {name: code for code, name in enumerate(CELL_TYPES)}

MAX_SMALL_LOBES = 9  # a segmented granulocyte nucleus: up to 5 lobes and the 4 strands between them
MAX_LARGE_LOBES = 16
PLACEMENT_ROUNDS = 8
CLUSTER_SPREAD_UM = 12.0  # a cluster of small cells is a handful of touching cells
ISLAND_SPREAD_UM = 9.0  # an erythroblast island: a tight group of cells
ISLAND_MEAN_SIZE = 8.0
BONE_SEAT_FRACTION = 0.55  # an osteoclast's centre lies this fraction of its half-width off the bone


@dataclass(frozen=True)
class CellDesigns:
    """Objects (or stamp designs) as outline + nucleus lobes + stain look; arrays have one row per object.

    Lobe and nucleolus offsets are in pixels from the outline's centre. The look fields are stain
    concentrations (optical density units, see :mod:`mk_hspc.demo.render`) and texture amplitudes.
    """

    kind: np.ndarray  # int8 code into CELL_TYPES
    outline: RadialShapes
    lobe_dy_px: np.ndarray  # (n, k)
    lobe_dx_px: np.ndarray
    lobe_a_px: np.ndarray  # semi-axes of each ellipse
    lobe_b_px: np.ndarray
    lobe_angle: np.ndarray
    lobe_valid: np.ndarray
    nucleolus_dy_px: np.ndarray  # (n, 2)
    nucleolus_dx_px: np.ndarray
    nucleolus_r_px: np.ndarray  # 0: no nucleolus
    nuc_h: np.ndarray  # haematoxylin of the nucleus
    chromatin: np.ndarray  # contrast of the chromatin texture (clumps)
    membrane: np.ndarray  # extra haematoxylin along the nuclear membrane (open chromatin)
    cyto_h: np.ndarray
    cyto_e: np.ndarray
    cyto_opacity: np.ndarray  # a thin or pale cytoplasm lets the marrow beneath show through
    granules: np.ndarray  # contrast of cytoplasmic granules
    foam: np.ndarray  # vacuolated (foamy) cytoplasm, 0..1
    halo_px: np.ndarray  # width of a clear retraction gap around the object, 0 = none

    def __len__(self) -> int:
        return len(self.outline)

    def take(self, idx: np.ndarray) -> CellDesigns:
        """The designs at ``idx`` (outline included)."""
        fields = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, RadialShapes):
                value = RadialShapes(*(getattr(value, g.name)[idx] for g in dataclasses.fields(value)))
            else:
                value = value[idx]
            fields[f.name] = value
        return CellDesigns(**fields)

    def at(self, y_px: np.ndarray, x_px: np.ndarray) -> CellDesigns:
        """The same designs centred at slide-local ``(y_px, x_px)``."""
        out = self.outline
        moved = RadialShapes(
            np.asarray(y_px, np.float32), np.asarray(x_px, np.float32), out.r0_px, out.amps, out.phases
        )
        return dataclasses.replace(self, outline=moved)

    @property
    def area_px2(self) -> np.ndarray:
        return star_area_px2(self.outline.r0_px, self.outline.amps)

    @property
    def reach_px(self) -> np.ndarray:
        """Radius of the enclosing circle, retraction halo included."""
        return self.outline.r_max_px + self.halo_px

    @property
    def cell_type(self) -> np.ndarray:
        return np.asarray(CELL_TYPES, dtype=object)[self.kind]


@dataclass(frozen=True)
class SmallCells:
    """Placed small cells: integer centre pixel, design (into the bank), orientation (0-7), haematoxylin gain."""

    y_px: np.ndarray
    x_px: np.ndarray
    variant: np.ndarray
    orientation: np.ndarray
    h_gain: np.ndarray

    def __len__(self) -> int:
        return int(self.y_px.shape[0])

    def kind(self, bank: CellDesigns) -> np.ndarray:
        return bank.kind[self.variant]


@dataclass(frozen=True)
class Discs:
    """Small objects drawn from a stamp bank (red cells, osteocyte lacunae): centre and stamp index."""

    y_px: np.ndarray
    x_px: np.ndarray
    variant: np.ndarray
    r_max_px: float

    def __len__(self) -> int:
        return int(self.y_px.shape[0])


def orient_array(image: np.ndarray, orientation: int) -> np.ndarray:
    """One of the 8 symmetries of a square stamp: ``orientation % 4`` quarter turns, then a mirror if >= 4.

    The same views as ``np.rot90`` (counter-clockwise), by slicing: thousands of stamps are oriented.
    """
    turns = orientation % 4
    if turns == 1:
        out = image[:, ::-1].T
    elif turns == 2:
        out = image[::-1, ::-1]
    elif turns == 3:
        out = image.T[:, ::-1]
    else:
        out = image
    return out[:, ::-1] if orientation >= 4 else out


def orient_points(dx: np.ndarray, dy: np.ndarray, orientation: int) -> tuple[np.ndarray, np.ndarray]:
    """Where offsets ``(dx, dy)`` from a stamp's centre land after :func:`orient_array`."""
    for _ in range(orientation % 4):
        dx, dy = dy, -dx  # np.rot90 maps (dy, dx) -> (-dx, dy)
    if orientation >= 4:
        dx = -dx
    return dx, dy


def polygon_xy(shapes: RadialShapes, index: int, n_vertices: int = 64) -> np.ndarray:
    """The outline of one shape as an ``(n_vertices, 2)`` array of slide-local (x, y) pixels."""
    theta = np.linspace(0.0, 2 * np.pi, n_vertices, endpoint=False)
    r = radius_at(theta, shapes.r0_px[index], shapes.amps[index], shapes.phases[index])
    return np.column_stack([shapes.x_px[index] + r * np.cos(theta), shapes.y_px[index] + r * np.sin(theta)])


def small_cell_polygon_xy(
    bank: CellDesigns, cells: SmallCells, index: int, n_vertices: int = 64
) -> np.ndarray:
    """The true outline of placed small cell ``index`` as ``(n_vertices, 2)`` slide-local (x, y) pixels."""
    rel = polygon_xy(bank.outline, int(cells.variant[index]), n_vertices)
    dx, dy = orient_points(rel[:, 0], rel[:, 1], int(cells.orientation[index]))
    return np.column_stack([dx + cells.x_px[index], dy + cells.y_px[index]])


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


def star_area_px2(r0: np.ndarray, amps: np.ndarray) -> np.ndarray:
    return np.pi * r0**2 * (1 + 0.5 * (amps**2).sum(axis=1))


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


def _near_pairs(points: np.ndarray, r_max: np.ndarray) -> np.ndarray:
    """All pairs ``(i, j)`` whose discs may meet (distance < r_i + r_j), as an ``(m, 2)`` array.

    A few large discs among many small ones would make one query radius fit the largest pair, so the
    large ones are queried one by one and the small ones together.
    """
    r_split = 2.0 * float(np.median(r_max))
    small = np.flatnonzero(r_max <= r_split)
    big = np.flatnonzero(r_max > r_split)
    found = [np.zeros((0, 2), np.intp)]
    if len(small) > 1:
        sub = cKDTree(points[small]).query_pairs(r=2 * float(r_max[small].max()), output_type="ndarray")
        found.append(small[sub])
    if len(big):
        tree = cKDTree(points)
        reach = float(r_max.max())
        for b, near in zip(big, tree.query_ball_point(points[big], r_max[big] + reach), strict=True):
            near = np.asarray(near, np.intp)
            near = near[(near != b) & ((r_max[near] <= r_split) | (near > b))]  # big-big pairs once
            found.append(np.column_stack([np.full(len(near), b), near]))
    return np.concatenate(found)


def greedy_accept(
    y: np.ndarray,
    x: np.ndarray,
    r_max: np.ndarray,
    area: np.ndarray,
    max_fraction: float,
    n_fixed: int = 0,
    target: int | np.ndarray | None = None,
    group: np.ndarray | None = None,
) -> np.ndarray:
    """Indices kept when candidates are taken in order and each must respect the overlap rule.

    The first ``n_fixed`` candidates are kept unconditionally (already-placed objects). A later
    candidate is dropped when its enclosing disc overlaps an already-kept one by more than
    ``max_fraction`` of the smaller true ``area``. ``target`` caps how many are kept: one number, or
    one per ``group`` code when candidates of several kinds compete for the same space.
    """
    n = len(y)
    if n == 0:
        return np.zeros(0, np.intp)
    pairs = _near_pairs(np.column_stack([y, x]), r_max)
    conflicts_of: dict[int, list[int]] = {}
    if len(pairs):
        i, j = pairs.min(axis=1), pairs.max(axis=1)
        d = np.hypot(y[i] - y[j], x[i] - x[j])
        frac = circle_overlap_area(d, r_max[i], r_max[j]) / np.minimum(area[i], area[j])
        bad = frac > max_fraction
        i, j = i[bad], j[bad]
        order = np.argsort(j, kind="stable")
        i_list, j_sorted = i[order].tolist(), j[order]
        starts = np.flatnonzero(np.r_[True, np.diff(j_sorted) != 0]).tolist() + [len(j_sorted)]
        for s0, s1 in zip(starts[:-1], starts[1:], strict=True):
            conflicts_of[int(j_sorted[s0])] = i_list[s0:s1]
    if group is None:
        group = np.zeros(n, np.intp)
        caps = [np.inf if target is None else float(target)]
    else:
        caps = [np.inf] * (int(group.max()) + 1) if target is None else np.asarray(target, float).tolist()
    # plain Python in the loop: it runs once per candidate, where numpy's per-call overhead dominates
    kept = [True] * n_fixed + [False] * (n - n_fixed)
    n_kept = [0] * len(caps)
    open_groups = sum(c > 0 for c in caps)
    for k, g in enumerate(group[n_fixed:].tolist(), start=n_fixed):
        if n_kept[g] >= caps[g]:
            continue
        earlier = conflicts_of.get(k)
        if earlier is None or not any(kept[e] for e in earlier):
            kept[k] = True
            n_kept[g] += 1
            if n_kept[g] >= caps[g]:
                open_groups -= 1
                if open_groups == 0:
                    break
    kept = np.asarray(kept, bool)
    return np.flatnonzero(kept[n_fixed:]) + n_fixed


def _candidate_points(
    rng: np.random.Generator,
    layout: SlideLayout,
    n: int,
    clearance_um: np.ndarray,
    cluster_fraction: float,
    spread_px: float = 0.0,
    centres: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Up to ``n`` points in marrow, denser where ``density_gain`` is high, partly in small clusters.

    ``centres`` (``(m, 2)`` y, x) makes every cluster gather around one of those points instead of
    around random ones (erythroblast islands). Returns the points and the index of the
    ``clearance_um`` entry each one satisfies.
    """
    h, w = layout.height_px, layout.width_px
    ys, xs, idx = [np.zeros(0)], [np.zeros(0)], [np.zeros(0, np.intp)]
    got, rounds = 0, 0
    sizes = np.arange(len(clearance_um))
    gain_max = layout.density_gain_max
    while got < n and rounds < 30:
        rounds += 1
        batch = max(1000, 3 * (n - got))
        py, px = rng.uniform(0, h, batch), rng.uniform(0, w, batch)
        n_cluster = int(cluster_fraction * batch)
        if n_cluster and centres is not None and len(centres):
            pick = rng.integers(0, len(centres), n_cluster)
            py[:n_cluster] = centres[pick, 0] + rng.normal(0, spread_px, n_cluster)
            px[:n_cluster] = centres[pick, 1] + rng.normal(0, spread_px, n_cluster)
        elif n_cluster:
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


# ----------------------------------------------------------------------------------------------- designs
def _u(rng: np.random.Generator, lo_hi: tuple[float, float], n: int | tuple[int, ...]) -> np.ndarray:
    return rng.uniform(lo_hi[0], lo_hi[1], n)


def _design(rng: np.random.Generator, kind: str, n: int, n_lobes: int, **values) -> dict[str, np.ndarray]:
    """A dict of design arrays with defaults for whatever a kind does not set."""
    zeros, lobes, two = np.zeros(n), np.zeros((n, n_lobes)), np.zeros((n, 2))
    out = {
        "kind": np.full(n, TYPE_CODE[kind], np.int8),
        "lobe_dy_px": lobes,
        "lobe_dx_px": lobes,
        "lobe_a_px": lobes + 1.0,
        "lobe_b_px": lobes + 1.0,
        "lobe_angle": rng.uniform(0, np.pi, (n, n_lobes)),
        "lobe_valid": np.zeros((n, n_lobes), bool),
        "nucleolus_dy_px": two,
        "nucleolus_dx_px": two,
        "nucleolus_r_px": two,
        "chromatin": zeros + 0.25,
        "membrane": zeros,
        "cyto_opacity": zeros + 1.0,
        "granules": zeros + 0.1,
        "foam": zeros,
        "halo_px": zeros,
    }
    out.update(values)
    return out


def _around_nucleus(
    rng: np.random.Generator, d: dict[str, np.ndarray], rim_px: np.ndarray, max_amp: float
) -> dict[str, np.ndarray]:
    """Give a design a gently irregular outline that keeps ``rim_px`` of cytoplasm around every lobe."""
    reach = np.hypot(d["lobe_dy_px"], d["lobe_dx_px"]) + np.maximum(d["lobe_a_px"], d["lobe_b_px"])
    reach = np.where(d["lobe_valid"], reach, 0.0).max(axis=1)
    amps, phases = random_shapes(rng, len(reach), max_amp=max_amp, n_harmonics=3)
    d["r0_px"] = (reach + rim_px) / (1 - amps.sum(axis=1))
    d["amps"], d["phases"] = amps, phases
    return d


def _ellipse_nucleus(
    rng: np.random.Generator, n: int, diameter_um: np.ndarray, aspect: np.ndarray, px: float, k: int
) -> dict[str, np.ndarray]:
    """One equal-area ellipse of the given diameter per design, centred, in slot 0 of ``k`` lobes."""
    a = diameter_um / 2 / np.sqrt(aspect) / px
    lobes = np.zeros((n, k))
    valid = np.zeros((n, k), bool)
    valid[:, 0] = True
    a_px, b_px = lobes + 1.0, lobes + 1.0
    a_px[:, 0], b_px[:, 0] = a, a * aspect
    return {
        "lobe_a_px": a_px,
        "lobe_b_px": b_px,
        "lobe_valid": valid,
        "lobe_angle": rng.uniform(0, np.pi, (n, k)),
    }


def _hspc_designs(rng: np.random.Generator, spec: DemoSpec, n: int) -> dict[str, np.ndarray]:
    """Blast-like cells: a large round or indented nucleus, often open chromatin with nucleoli, thin rim."""
    px = spec.pixel_size_um
    aspect = rng.uniform(0.7, 1.0, n)
    nucleus = _ellipse_nucleus(rng, n, _u(rng, spec.hspc_nucleus_diameter_um, n), aspect, px, 2)
    a0, b0 = nucleus["lobe_a_px"][:, 0], nucleus["lobe_b_px"][:, 0]
    # a third of them get a second, overlapping ellipse: indented, kidney or irregular nuclei
    second = rng.uniform(0, 1, n) < 0.35
    theta = rng.uniform(0, 2 * np.pi, n)
    nucleus["lobe_valid"][:, 1] = second
    nucleus["lobe_dy_px"] = np.column_stack([np.zeros(n), 0.45 * b0 * np.sin(theta)])
    nucleus["lobe_dx_px"] = np.column_stack([np.zeros(n), 0.45 * b0 * np.cos(theta)])
    nucleus["lobe_a_px"][:, 1] = 0.75 * a0
    nucleus["lobe_b_px"][:, 1] = 0.75 * b0
    open_chromatin = rng.uniform(0, 1, n) < 0.55
    n_nucleoli = np.where(open_chromatin, rng.integers(0, 3, n), 0)
    nl_theta, nl_r = rng.uniform(0, 2 * np.pi, (n, 2)), rng.uniform(0, 0.45, (n, 2)) * b0[:, None]
    d = _design(
        rng,
        "hspc",
        n,
        2,
        **nucleus,
        nucleolus_dy_px=nl_r * np.sin(nl_theta),
        nucleolus_dx_px=nl_r * np.cos(nl_theta),
        nucleolus_r_px=np.where(
            np.arange(2)[None, :] < n_nucleoli[:, None], _u(rng, (0.45, 0.75), (n, 2)) / px, 0
        ),
        nuc_h=np.where(open_chromatin, _u(rng, (0.5, 0.75), n), _u(rng, (0.85, 1.15), n)),
        chromatin=np.where(open_chromatin, 0.4, 0.22),
        membrane=np.where(open_chromatin, 0.5, 0.1),
        cyto_h=_u(rng, (0.05, 0.14), n),
        cyto_e=_u(rng, (0.12, 0.26), n),
        cyto_opacity=_u(rng, (0.45, 0.85), n),
    )
    # the nucleus may sit off-centre within its rim
    rim = _u(rng, spec.hspc_cytoplasm_rim_um, n) / px
    shift, angle = rng.uniform(0, 0.5, n) * rim, rng.uniform(0, 2 * np.pi, n)
    for key, trig in (
        ("lobe_dy_px", np.sin),
        ("lobe_dx_px", np.cos),
        ("nucleolus_dy_px", np.sin),
        ("nucleolus_dx_px", np.cos),
    ):
        d[key] = d[key] + (shift * trig(angle))[:, None]
    return _around_nucleus(rng, d, rim - shift + 0.5, 0.05)


def _lymphocyte_designs(rng: np.random.Generator, spec: DemoSpec, n: int) -> dict[str, np.ndarray]:
    """Small round, very dense nucleus with clumped chromatin and a barely visible pale-blue rim."""
    px = spec.pixel_size_um
    nucleus = _ellipse_nucleus(
        rng, n, _u(rng, spec.lymphocyte_nucleus_diameter_um, n), _u(rng, (0.85, 1.0), n), px, 1
    )
    d = _design(
        rng,
        "lymphocyte",
        n,
        1,
        **nucleus,
        nuc_h=_u(rng, (1.05, 1.35), n),
        chromatin=np.full(n, 0.35),
        membrane=np.full(n, 0.15),
        cyto_h=_u(rng, (0.10, 0.18), n),
        cyto_e=_u(rng, (0.06, 0.12), n),
        cyto_opacity=_u(rng, (0.6, 0.9), n),
    )
    return _around_nucleus(rng, d, _u(rng, (0.3, 0.8), n) / px, 0.03)


def _erythroblast_designs(rng: np.random.Generator, spec: DemoSpec, n: int) -> dict[str, np.ndarray]:
    """Round cell with a small, near-black round nucleus and a greyish-pink (polychromatic) cytoplasm."""
    px = spec.pixel_size_um
    cell_d = _u(rng, spec.erythroblast_diameter_um, n)
    nuc_d = cell_d * rng.uniform(0.42, 0.6, n)
    nucleus = _ellipse_nucleus(rng, n, nuc_d, _u(rng, (0.88, 1.0), n), px, 1)
    d = _design(
        rng,
        "erythroblast",
        n,
        1,
        **nucleus,
        nuc_h=_u(rng, (1.2, 1.6), n),
        chromatin=np.full(n, 0.12),
        cyto_h=_u(rng, (0.04, 0.12), n),
        cyto_e=_u(rng, (0.22, 0.40), n),
        cyto_opacity=_u(rng, (0.75, 0.95), n),
    )
    return _around_nucleus(rng, d, (cell_d - nuc_d) / 2 / px, 0.03)


def _granulocyte_designs(rng: np.random.Generator, spec: DemoSpec, n: int) -> dict[str, np.ndarray]:
    """Segmented (2-5 lobes joined by thin strands) or band nuclei in a pale granular cytoplasm;
    about one in seven is an eosinophil (coarse red-orange granules)."""
    px = spec.pixel_size_um
    k = MAX_SMALL_LOBES
    cell_r = _u(rng, spec.granulocyte_diameter_um, n) / 2 / px
    arc_r = cell_r * rng.uniform(0.38, 0.5, n)
    n_seg = rng.integers(1, 6, n)  # 1 = band: a C-shaped nucleus drawn as six overlapping ellipses
    span = rng.uniform(0.7, 1.35, n) * np.pi
    start = rng.uniform(0, 2 * np.pi, n)
    dy, dx, a, b, ang = (np.zeros((n, k)) for _ in range(5))
    valid = np.zeros((n, k), bool)
    for i in range(n):
        band = n_seg[i] == 1
        m = 6 if band else int(n_seg[i])
        t = start[i] + span[i] * (np.arange(m) / max(m - 1, 1) if m > 1 else np.zeros(1))
        cy, cx = arc_r[i] * np.sin(t), arc_r[i] * np.cos(t)
        la = (rng.uniform(1.1, 1.5, m) if band else rng.uniform(1.3, 1.9, m)) / px
        lb = (rng.uniform(0.85, 1.1, m) if band else rng.uniform(0.9, 1.35, m)) / px
        la = np.minimum(la, 0.9 * (cell_r[i] - arc_r[i]))
        lb = np.minimum(lb, la)
        slots = list(range(m))
        dy[i, :m], dx[i, :m], a[i, :m], b[i, :m] = cy, cx, la, lb
        ang[i, :m] = t + np.pi / 2 + rng.normal(0, 0.3, m)
        if not band:  # thin chromatin strands between consecutive lobes
            for j in range(m - 1):
                s = m + j
                my, mx = (cy[j] + cy[j + 1]) / 2, (cx[j] + cx[j + 1]) / 2
                dy[i, s], dx[i, s] = my, mx
                a[i, s] = max(np.hypot(cy[j + 1] - cy[j], cx[j + 1] - cx[j]) / 2, 0.5 / px)
                b[i, s] = 0.3 / px
                ang[i, s] = np.arctan2(cy[j + 1] - cy[j], cx[j + 1] - cx[j])
                slots.append(s)
        valid[i, slots] = True
    eosinophil = rng.uniform(0, 1, n) < 0.15
    d = _design(
        rng,
        "granulocyte",
        n,
        k,
        lobe_dy_px=dy,
        lobe_dx_px=dx,
        lobe_a_px=a,
        lobe_b_px=b,
        lobe_angle=ang,
        lobe_valid=valid,
        nuc_h=_u(rng, (0.8, 1.1), n),
        chromatin=np.full(n, 0.25),
        membrane=np.full(n, 0.1),
        cyto_h=np.where(eosinophil, 0.02, _u(rng, (0.03, 0.07), n)),
        cyto_e=np.where(eosinophil, _u(rng, (0.5, 0.7), n), _u(rng, (0.16, 0.28), n)),
        cyto_opacity=_u(rng, (0.8, 1.0), n),
        granules=np.where(eosinophil, 0.6, 0.35),
    )
    amps, phases = random_shapes(rng, n, max_amp=0.04, n_harmonics=3)
    d["r0_px"], d["amps"], d["phases"] = cell_r, amps, phases
    return d


def _stack(
    parts: list[dict[str, np.ndarray]], y: np.ndarray | None = None, x: np.ndarray | None = None
) -> CellDesigns:
    """Concatenate design dicts (lobe arrays padded to the widest) into one :class:`CellDesigns`."""
    merged: dict[str, np.ndarray] = {}
    for key in parts[0]:
        arrays = [np.asarray(p[key]) for p in parts]
        if arrays[0].ndim == 2:  # lobes and outline harmonics: pad to the widest with no-ops
            k = max(v.shape[1] for v in arrays)
            fill = {"lobe_valid": False, "amps": 0.0, "phases": 0.0}.get(key, 1.0)
            arrays = [
                np.concatenate([v, np.full((v.shape[0], k - v.shape[1]), fill, v.dtype)], axis=1)
                for v in arrays
            ]
        merged[key] = np.concatenate(arrays)
    n = len(merged["kind"])
    y = np.zeros(n) if y is None else y
    x = np.zeros(n) if x is None else x
    outline = RadialShapes(
        np.asarray(y, np.float32),
        np.asarray(x, np.float32),
        merged.pop("r0_px").astype(np.float32),
        merged.pop("amps").astype(np.float32),
        merged.pop("phases").astype(np.float32),
    )
    cast = {k_: (v if v.dtype in (np.bool_, np.int8) else v.astype(np.float32)) for k_, v in merged.items()}
    return CellDesigns(outline=outline, **cast)


def small_cell_bank(rng: np.random.Generator, spec: DemoSpec) -> CellDesigns:
    """The study-wide bank of small-cell designs (rendered once, placed many times), all types together."""
    n_other = spec.confounder_n_variants
    return _stack(
        [
            _hspc_designs(rng, spec, spec.hspc_n_variants),
            _lymphocyte_designs(rng, spec, n_other),
            _erythroblast_designs(rng, spec, n_other),
            _granulocyte_designs(rng, spec, n_other),
        ]
    )


# ---------------------------------------------------------------------------------------- large objects
def _area_radius(area_um2: np.ndarray, amps: np.ndarray, px: float) -> np.ndarray:
    return np.sqrt(area_um2 / (np.pi * (1 + 0.5 * (amps**2).sum(axis=1)))) / px


def _log_uniform(rng: np.random.Generator, lo_hi: tuple[float, float], n: int) -> np.ndarray:
    return np.exp(rng.uniform(np.log(lo_hi[0]), np.log(lo_hi[1]), n))


def _fit_lobes(d: dict[str, np.ndarray], limit_px: np.ndarray) -> None:
    """Shrink each design's lobes towards its centre until every lobe lies within ``limit_px``."""
    limit = np.asarray(limit_px, float)[:, None]
    size = np.minimum(d["lobe_a_px"], 0.6 * limit)  # a lobe never fills the whole cell
    d["lobe_b_px"] = np.minimum(d["lobe_b_px"], size)
    d["lobe_a_px"] = size
    # pull the lobes' centres in (sizes kept) until the farthest edge is within the limit
    dist = np.hypot(d["lobe_dy_px"], d["lobe_dx_px"])
    room = np.where(d["lobe_valid"], (limit - size) / np.maximum(dist, 1e-6), np.inf)
    pull = np.minimum(1.0, room.min(axis=1))[:, None]
    d["lobe_dy_px"] = d["lobe_dy_px"] * pull
    d["lobe_dx_px"] = d["lobe_dx_px"] * pull


def _mk_designs(rng: np.random.Generator, spec: DemoSpec, n: int) -> dict[str, np.ndarray]:
    """Megakaryocytes from young (small, basophilic, few lobes) to mature (large, pink, many lobes).

    The nucleus is a chain of overlapping ellipses (a folded, lobulated mass), sometimes spread so far
    that lobes look separate, often off-centre; the cytoplasm is finely granular and pink.
    """
    px, k = spec.pixel_size_um, MAX_LARGE_LOBES
    area = _log_uniform(rng, spec.mk_area_um2, n)
    maturity = np.clip(
        np.log(area / spec.mk_area_um2[0]) / np.log(spec.mk_area_um2[1] / spec.mk_area_um2[0]), 0, 1
    )
    amps, phases = random_shapes(rng, n, max_amp=0.10)
    r0 = _area_radius(area, amps, px)
    n_lobes = np.clip(np.round(2 + maturity * 9 + rng.normal(0, 1.5, n)), 2, k).astype(int)
    valid = np.arange(k)[None, :] < n_lobes[:, None]
    separated = rng.uniform(0, 1, n) < 0.25
    step = np.where(separated, rng.uniform(0.3, 0.4, n), rng.uniform(0.1, 0.2, n))
    steps = rng.normal(0, 1, (n, k, 2)) * (step * r0)[:, None, None]
    steps[:, 0] = 0.0
    walk = np.cumsum(steps, axis=1)
    walk -= (walk * valid[..., None]).sum(axis=1, keepdims=True) / n_lobes[:, None, None]
    # eccentric nucleus: real MKs often show it to one side
    shift = rng.uniform(0, 0.22, n) * r0
    shift_angle = rng.uniform(0, 2 * np.pi, n)
    walk[..., 0] += (shift * np.sin(shift_angle))[:, None]
    walk[..., 1] += (shift * np.cos(shift_angle))[:, None]
    nuclear_fraction = np.where(maturity < 0.25, rng.uniform(0.35, 0.5, n), rng.uniform(0.2, 0.38, n))
    lobe_scale = r0 * np.sqrt(nuclear_fraction / n_lobes) * np.where(separated, 1.0, 1.35)
    lobe_a = lobe_scale[:, None] * rng.uniform(0.8, 1.25, (n, k))
    d = _design(
        rng,
        "mk",
        n,
        k,
        lobe_dy_px=walk[..., 0],
        lobe_dx_px=walk[..., 1],
        lobe_a_px=lobe_a,
        lobe_b_px=lobe_a * rng.uniform(0.55, 0.95, (n, k)),
        lobe_valid=valid,
        # real MK nuclei are purple with visible chromatin, not black; the cytoplasm is a pale, even pink
        nuc_h=_u(rng, (0.6, 0.9), n),
        chromatin=np.full(n, 0.45),
        membrane=np.full(n, 0.25),
        cyto_h=np.where(maturity < 0.25, _u(rng, (0.10, 0.16), n), _u(rng, (0.04, 0.08), n)),
        cyto_e=_u(rng, (0.22, 0.36), n),
        granules=_u(rng, (0.06, 0.14), n),
        halo_px=np.where(rng.uniform(0, 1, n) < 0.35, rng.uniform(0.5, 1.5, n) / px, 0.0),
        r0_px=r0,
        amps=amps,
        phases=phases,
    )
    _fit_lobes(d, 0.82 * r0 * (1 - amps.sum(axis=1)))
    return d


def _osteoclast_designs(
    rng: np.random.Generator, spec: DemoSpec, along_rad: np.ndarray
) -> dict[str, np.ndarray]:
    """Multinucleated giant cells elongated along the bone surface (direction ``along_rad``): many
    separate oval nuclei in a deeply eosinophilic, foamy cytoplasm."""
    px, k, n = spec.pixel_size_um, MAX_LARGE_LOBES, len(along_rad)
    area = _log_uniform(rng, spec.osteoclast_area_um2, n)
    amps, phases = random_shapes(rng, n, max_amp=0.06)
    amps[:, 0] = rng.uniform(0.2, 0.32, n)  # the 2θ harmonic elongates the cell
    phases[:, 0] = 2 * along_rad
    r0 = _area_radius(area, amps, px)
    n_nuclei = np.clip(np.round(area / 50.0 * rng.uniform(0.6, 1.2, n)), 3, k).astype(int)
    valid = np.arange(k)[None, :] < n_nuclei[:, None]
    radius, t = np.sqrt(rng.uniform(0, 1, (n, k))), rng.uniform(0, 2 * np.pi, (n, k))
    along = 0.55 * (r0 * (1 + amps[:, 0]))[:, None] * radius * np.cos(t)
    across = 0.45 * (r0 * (1 - amps[:, 0]))[:, None] * radius * np.sin(t)
    cos, sin = np.cos(along_rad)[:, None], np.sin(along_rad)[:, None]
    a = rng.uniform(2.0, 2.8, (n, k)) / px
    d = _design(
        rng,
        "osteoclast",
        n,
        k,
        lobe_dy_px=along * sin + across * cos,
        lobe_dx_px=along * cos - across * sin,
        lobe_a_px=a,
        lobe_b_px=a * rng.uniform(0.6, 0.85, (n, k)),
        lobe_valid=valid,
        nuc_h=_u(rng, (0.65, 0.9), n),
        chromatin=np.full(n, 0.25),
        membrane=np.full(n, 0.3),
        cyto_h=_u(rng, (0.08, 0.14), n),
        cyto_e=_u(rng, (0.40, 0.55), n),
        granules=np.full(n, 0.1),
        foam=_u(rng, (0.25, 0.45), n),
        r0_px=r0,
        amps=amps,
        phases=phases,
    )
    _fit_lobes(d, 0.85 * r0 * (1 - amps.sum(axis=1)))
    return d


def _cluster_designs(rng: np.random.Generator, spec: DemoSpec, n: int) -> dict[str, np.ndarray]:
    """Tight groups of 4-9 small dense nuclei in scant pale cytoplasm: a lobulated dark mass without
    the MK's abundant pink cytoplasm (one ground-truth object per group)."""
    px, k = spec.pixel_size_um, MAX_LARGE_LOBES
    dy, dx, a = np.zeros((n, k)), np.zeros((n, k)), np.ones((n, k))
    valid = np.zeros((n, k), bool)
    for i in range(n):
        m = int(rng.integers(4, 10))
        diameter = rng.uniform(3.8, 5.5) / px
        # compact packing: each new nucleus takes the free spot nearest the group's middle
        pts = [np.zeros(2)]
        while len(pts) < m:
            arr = np.array(pts)
            middle = arr.mean(axis=0)
            t = rng.uniform(0, 2 * np.pi, 48)
            spots = arr[rng.integers(len(arr), size=48)] + diameter * rng.uniform(0.8, 0.95, 48)[:, None] * (
                np.column_stack([np.sin(t), np.cos(t)])
            )
            gaps = np.hypot(*(spots[:, None, :] - arr[None, :, :]).transpose(2, 0, 1)).min(axis=1)
            free = spots[gaps >= 0.78 * diameter]
            if not len(free):
                break
            pts.append(free[np.argmin(np.hypot(*(free - middle).T))])
        pts_arr = np.array(pts)
        pts_arr -= pts_arr.mean(axis=0)
        m = len(pts_arr)
        dy[i, :m], dx[i, :m] = pts_arr[:, 0], pts_arr[:, 1]
        a[i, :m] = diameter / 2 * rng.uniform(0.9, 1.1, m)
        valid[i, :m] = True
    d = _design(
        rng,
        "small_nucleus_cluster",
        n,
        k,
        lobe_dy_px=dy,
        lobe_dx_px=dx,
        lobe_a_px=a,
        lobe_b_px=a * rng.uniform(0.8, 1.0, (n, k)),
        lobe_valid=valid,
        nuc_h=_u(rng, (1.1, 1.4), n),
        chromatin=np.full(n, 0.3),
        membrane=np.full(n, 0.1),
        cyto_h=_u(rng, (0.06, 0.12), n),
        cyto_e=_u(rng, (0.10, 0.20), n),
        cyto_opacity=_u(rng, (0.5, 0.8), n),
    )
    return _around_nucleus(rng, d, _u(rng, (0.6, 1.2), n) / px, 0.06)


def _debris_designs(rng: np.random.Generator, spec: DemoSpec, n: int) -> dict[str, np.ndarray]:
    """MK-sized eosinophilic material without a nucleus (cytoplasm cut off its cell, protein clumps)."""
    px = spec.pixel_size_um
    area = _log_uniform(rng, spec.debris_area_um2, n)
    amps, phases = random_shapes(rng, n, max_amp=0.22, n_harmonics=5)
    return _design(
        rng,
        "debris",
        n,
        1,
        nuc_h=np.zeros(n),
        cyto_h=_u(rng, (0.02, 0.06), n),
        cyto_e=_u(rng, (0.30, 0.60), n),
        cyto_opacity=_u(rng, (0.85, 1.0), n),
        granules=_u(rng, (0.05, 0.3), n),
        foam=_u(rng, (0.0, 0.3), n),
        r0_px=_area_radius(area, amps, px),
        amps=amps,
        phases=phases,
    )


def _osteoclast_candidates(
    rng: np.random.Generator, spec: DemoSpec, layout: SlideLayout, n: int
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Up to ``n`` osteoclasts seated on bone surfaces, clear of fat and of the section edge."""
    px = spec.pixel_size_um
    if n == 0 or float(layout.bone_sdf_um.min()) >= 0:
        return np.zeros(0), np.zeros(0), _osteoclast_designs(rng, spec, np.zeros(0))
    ys, xs = [], []
    for _ in range(30):
        py = rng.uniform(0, layout.height_px, 4000)
        px_ = rng.uniform(0, layout.width_px, 4000)
        sdf = layout.sample("bone_sdf_um", py, px_)
        ok = (sdf > 0) & (sdf < 8.0)
        ys.append(py[ok]), xs.append(px_[ok])
        if sum(len(v) for v in ys) >= 6 * n:
            break
    y, x = np.concatenate(ys)[: 6 * n], np.concatenate(xs)[: 6 * n]
    # the bone's outward normal from the distance field's gradient (finite differences, 1 µm apart)
    h = 1.0 / px
    gy = layout.sample("bone_sdf_um", y + h, x) - layout.sample("bone_sdf_um", y - h, x)
    gx = layout.sample("bone_sdf_um", y, x + h) - layout.sample("bone_sdf_um", y, x - h)
    norm = np.maximum(np.hypot(gy, gx), 1e-6)
    ny, nx = gy / norm, gx / norm
    d = _osteoclast_designs(rng, spec, np.arctan2(ny, nx) + np.pi / 2)
    half_width_um = d["r0_px"] * (1 - d["amps"][:, 0]) * px
    move_px = (BONE_SEAT_FRACTION * half_width_um - layout.sample("bone_sdf_um", y, x)) / px
    y, x = y + move_px * ny, x + move_px * nx
    inside = (y >= 0) & (y < layout.height_px) & (x >= 0) & (x < layout.width_px)
    seated = np.abs(layout.sample("bone_sdf_um", y, x) - BONE_SEAT_FRACTION * half_width_um) < 2.0
    reach_um = d["r0_px"] * (1 + np.abs(d["amps"]).sum(axis=1)) * px
    clear = (layout.sample("fat_sdf_um", y, x) > reach_um) & (layout.sample("tissue_sdf_um", y, x) > reach_um)
    keep = np.flatnonzero(inside & seated & clear)
    return y[keep], x[keep], {key: v[keep] for key, v in d.items()}


def _large_objects(
    rng: np.random.Generator, spec: DemoSpec, layout: SlideLayout, mk_factor: float
) -> CellDesigns:
    """MKs (never touching each other), then osteoclasts, clusters and debris (touching nothing large)."""
    px, area = spec.pixel_size_um, layout.marrow_area_mm2
    counts = {
        "mk": int(rng.poisson(spec.mk_per_mm2 * mk_factor * area)),
        "osteoclast": int(rng.poisson(spec.osteoclast_per_mm2 * area)),
        "small_nucleus_cluster": int(rng.poisson(spec.nucleus_cluster_per_mm2 * area)),
        "debris": int(rng.poisson(spec.debris_per_mm2 * area)),
    }
    parts, ys, xs = [], [], []
    for kind, make in (
        ("mk", _mk_designs),
        ("small_nucleus_cluster", _cluster_designs),
        ("debris", _debris_designs),
    ):
        d = make(rng, spec, 3 * counts[kind] + 4)
        reach = d["r0_px"] * (1 + np.abs(d["amps"]).sum(axis=1)) + d["halo_px"]
        y, x, which = _candidate_points(rng, layout, len(reach), reach * px + 2.0, 0.0)
        parts.append({key: v[which] for key, v in d.items()})
        ys.append(y), xs.append(x)
    oy, ox, od = _osteoclast_candidates(rng, spec, layout, 3 * counts["osteoclast"] + 4)
    parts.insert(1, od)
    ys.insert(1, oy), xs.insert(1, ox)
    candidates = _stack(parts, np.concatenate(ys), np.concatenate(xs))
    group = np.searchsorted(
        np.cumsum([len(p["kind"]) for p in parts]), np.arange(len(candidates)), side="right"
    )
    targets = np.array([counts[k] for k in LARGE_TYPES])
    padded = candidates.reach_px + 0.5 * spec.mk_gap_um / px
    keep = greedy_accept(
        candidates.outline.y_px,
        candidates.outline.x_px,
        padded,
        candidates.area_px2,
        0.0,
        target=targets,
        group=group,
    )
    return candidates.take(keep)


def place_cells(
    rng: np.random.Generator,
    spec: DemoSpec,
    layout: SlideLayout,
    bank: CellDesigns,
    mk_factor: float,
    hspc_factor: float,
) -> tuple[CellDesigns, SmallCells]:
    """Place the slide's large objects (MKs, osteoclasts, clusters, debris), then its small cells around them.

    Group factors scale the targets only (``mk`` and ``hspc``); confounder densities are the same in
    every group, as they would be in a real study.
    """
    px = spec.pixel_size_um
    large = _large_objects(rng, spec, layout, mk_factor)
    area = layout.marrow_area_mm2
    density = {
        "hspc": spec.hspc_per_mm2 * hspc_factor,
        "lymphocyte": spec.lymphocyte_per_mm2,
        "erythroblast": spec.erythroblast_per_mm2,
        "granulocyte": spec.granulocyte_per_mm2,
    }
    wanted = np.array([int(round(density[t] * area)) for t in SMALL_TYPES])
    n_islands = int(
        rng.poisson(spec.erythroblast_per_mm2 * area * spec.erythroblast_island_fraction / ISLAND_MEAN_SIZE)
    )
    islands_y, islands_x, _ = _candidate_points(rng, layout, n_islands, np.array([10.0]), 0.0)
    islands = np.column_stack([islands_y, islands_x])
    v_rmax = bank.outline.r_max_px
    bank_group = np.array([SMALL_TYPES.index(CELL_TYPES[c]) for c in bank.kind])
    placed_y, placed_x = large.outline.y_px.astype(float), large.outline.x_px.astype(float)
    placed_r, placed_area = large.reach_px.astype(float), large.area_px2.astype(float)
    hy, hx, which = np.zeros(0), np.zeros(0), np.zeros(0, np.intp)
    # Rounds of fresh candidates fill the gaps that rejections leave, until each type's target density
    # is reached or the marrow is saturated; the types compete for space in one shuffled order.
    for _ in range(PLACEMENT_ROUNDS):
        got = np.bincount(bank_group[which], minlength=len(SMALL_TYPES))
        missing = wanted - got
        if (missing <= 0).all():
            break
        cy, cx, cv = [], [], []
        for g, kind in enumerate(SMALL_TYPES):
            if missing[g] <= 0:
                continue
            designs = np.flatnonzero(bank_group == g)
            is_ery = kind == "erythroblast"
            y, x, k = _candidate_points(
                rng,
                layout,
                3 * int(missing[g]) + 16,
                v_rmax[designs] * px + 0.3,
                spec.erythroblast_island_fraction if is_ery else spec.hspc_cluster_fraction,
                (ISLAND_SPREAD_UM if is_ery else CLUSTER_SPREAD_UM) / px,
                centres=islands if is_ery else None,
            )
            cy.append(y), cx.append(x), cv.append(designs[k])
        # Erythroblast islands are placed first (they are fixed structures of the marrow, and so the
        # group factors cannot crowd them out); the other types compete in one shuffled order.
        cv_all = np.concatenate(cv)
        first = bank_group[cv_all] == SMALL_TYPES.index("erythroblast")
        order = np.concatenate([np.flatnonzero(first), rng.permutation(np.flatnonzero(~first))])
        # stamps sit on whole pixels; outlines are exact about them
        cy_a = np.round(np.concatenate(cy)[order])
        cx_a = np.round(np.concatenate(cx)[order])
        cv_a = cv_all[order]
        keep = greedy_accept(
            np.concatenate([placed_y, cy_a]),
            np.concatenate([placed_x, cx_a]),
            np.concatenate([placed_r, v_rmax[cv_a]]),
            np.concatenate([placed_area, bank.area_px2[cv_a]]),
            spec.max_overlap_fraction,
            n_fixed=len(placed_y),
            target=np.maximum(missing, 0),
            group=np.concatenate([np.zeros(len(placed_y), np.intp), bank_group[cv_a]]),
        ) - len(placed_y)
        if keep.size == 0:
            break
        hy, hx, which = (
            np.concatenate([hy, cy_a[keep]]),
            np.concatenate([hx, cx_a[keep]]),
            np.concatenate([which, cv_a[keep]]),
        )
        placed_y, placed_x = np.concatenate([placed_y, cy_a[keep]]), np.concatenate([placed_x, cx_a[keep]])
        placed_r = np.concatenate([placed_r, v_rmax[cv_a[keep]]])
        placed_area = np.concatenate([placed_area, bank.area_px2[cv_a[keep]]])
    n = len(hy)
    small = SmallCells(
        y_px=hy.astype(np.int64),
        x_px=hx.astype(np.int64),
        variant=which.astype(np.intp),
        orientation=rng.integers(0, 8, n),
        h_gain=rng.uniform(0.85, 1.15, n).astype(np.float32),
    )
    return large, small


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
