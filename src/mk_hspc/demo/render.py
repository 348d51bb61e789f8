"""Render one tile of a demo slide as H&E brightfield RGB.

Structures and cells are painted as haematoxylin and eosin *concentration* maps, blurred by the
optics, then turned into colour with the Beer-Lambert law (optical density = c_H * OD_H + c_E * OD_E,
intensity = I0 * 10^-OD) plus camera noise. Working in stain space is what makes overlaps, rims and
stain-strength batch effects look like real H&E rather than painted colours.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from mk_hspc.demo.cells import CellDesigns, Discs, SmallCells, orient_array, small_cell_bank
from mk_hspc.demo.layout import SlideLayout, radius_at
from mk_hspc.demo.spec import DemoSpec
from mk_hspc.demo.texture import PeriodicBank, periodic_blur, periodic_noise, upsample_window, voronoi_bank

LN10 = float(np.log(10.0))

# Stain concentrations (OD units along each stain vector) of the tissue components. They set the look
# of the slide and were matched by eye and by pixel statistics to the BM_GRAZ H&E marrow images.
GLASS_HE = (0.0, 0.006)
FAT_HE = (0.012, 0.025)
FAT_RIM_HE = (0.06, 0.34)
BONE_HE = (0.05, 0.62)
RBC_E = 0.35
NOISE_PERIOD_PX = 1031  # prime, so the camera-noise pattern never lines up with tiles or textures

Stamp = tuple[np.ndarray, np.ndarray, np.ndarray]  # (alpha, c_h, c_e), all (S, S) float32


@dataclass(frozen=True)
class TextureBanks:
    """Textures and stamps shared by all slides of a study (indexed by absolute pixel position)."""

    stroma_h: PeriodicBank
    stroma_e: PeriodicBank
    lamella_jitter: PeriodicBank
    chromatin: PeriodicBank
    granules: PeriodicBank
    foam: PeriodicBank
    camera_noise: PeriodicBank
    small: CellDesigns  # the small-cell designs (all small types), centred on (0, 0)
    small_stamps: tuple[tuple[Stamp, ...], ...]  # [design][orientation] (views, no copies)
    rbc: tuple[Stamp, ...]
    lacunae: tuple[Stamp, ...]


@dataclass(frozen=True)
class SlideScene:
    """Everything needed to render any tile of one slide."""

    layout: SlideLayout
    large: CellDesigns  # MKs, osteoclasts, small-nucleus clusters, debris, at slide-local positions
    small: SmallCells
    rbc: Discs
    lacunae: Discs
    stain_gain_h: float
    stain_gain_e: float
    bank_offset_yx: tuple[int, int]


def _stroma_tiles(rng: np.random.Generator, spec: DemoSpec, period_px: int) -> tuple[np.ndarray, np.ndarray]:
    """Marrow between the labelled cells: small bubbly spaces with thin pink walls, some filled cytoplasm."""
    px = spec.pixel_size_um
    spacing_px = spec.stroma_cell_spacing_um / px
    edge_px, region, n_regions = voronoi_bank(rng, period_px, spacing_px, warp_px=0.8 / px)
    clear = rng.uniform(0, 1, n_regions) < 0.4
    # filled spaces are eosinophilic (pink) with little haematoxylin, as in the BM_GRAZ images
    region_e = np.where(clear, rng.uniform(0.02, 0.06, n_regions), rng.uniform(0.16, 0.36, n_regions))
    region_h = np.where(clear, 0.02, rng.uniform(0.03, 0.10, n_regions))
    membrane = np.exp(-((edge_px / (0.25 / px)) ** 2)) * rng.uniform(0.5, 1.0, n_regions)[region]
    fine = periodic_noise(rng, period_px, 1.2)
    blotch = periodic_noise(rng, period_px, 3.0 / px)
    stroma_e = region_e[region] * (1 + 0.12 * fine) * (1 + 0.25 * blotch) + 0.3 * membrane
    stroma_h = region_h[region] * (1 + 0.2 * fine) + 0.08 * membrane
    stroma_h = periodic_blur(np.clip(stroma_h, 0, None), spec.blur_sigma_px)
    stroma_e = periodic_blur(np.clip(stroma_e, 0, None), spec.blur_sigma_px)
    return stroma_h, stroma_e


def _blur_stamp(alpha: np.ndarray, c_h: np.ndarray, c_e: np.ndarray, sigma_px: float) -> Stamp:
    """Optical blur of a stamp, done on premultiplied colour so edges fade into what lies beneath."""
    if sigma_px > 0:
        a = ndimage.gaussian_filter(alpha, sigma_px, mode="constant")
        safe = np.maximum(a, 1e-4)
        c_h = ndimage.gaussian_filter(c_h * alpha, sigma_px, mode="constant") / safe
        c_e = ndimage.gaussian_filter(c_e * alpha, sigma_px, mode="constant") / safe
        alpha = a
    return alpha.astype(np.float32), c_h.astype(np.float32), c_e.astype(np.float32)


STAMP_PAD_PX = 4  # room around a stamp for its soft edge and the optical blur


def _grid(half: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1].astype(np.float32)
    return yy, xx


def _disc_stamp(radius_y: float, radius_x: float, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Ellipse geometry for a stamp: (alpha with a one-pixel soft edge, normalised radius)."""
    yy, xx = _grid(int(np.ceil(max(radius_y, radius_x))) + STAMP_PAD_PX)
    u = xx * np.cos(angle) + yy * np.sin(angle)
    v = -xx * np.sin(angle) + yy * np.cos(angle)
    rho = np.hypot(u / radius_x, v / radius_y)
    return np.clip((1.0 - rho) * min(radius_x, radius_y) + 0.5, 0, 1), rho


def _rbc_stamps(rng: np.random.Generator, spec: DemoSpec, n: int) -> tuple[Stamp, ...]:
    """Anucleate red cells: eosin-dense discs with a paler centre (biconcave)."""
    stamps = []
    for _ in range(n):
        r = rng.uniform(*spec.rbc_diameter_um) / 2 / spec.pixel_size_um
        alpha, rho = _disc_stamp(r * rng.uniform(0.8, 1.0), r, rng.uniform(0, np.pi))
        c_e = RBC_E * rng.uniform(0.8, 1.1) * (1 - 0.25 * np.exp(-((rho / 0.45) ** 2)))
        stamps.append(_blur_stamp(alpha, np.full_like(alpha, 0.03), c_e, spec.blur_sigma_px))
    return tuple(stamps)


def _lacuna_stamps(rng: np.random.Generator, spec: DemoSpec, n: int) -> tuple[Stamp, ...]:
    """Osteocyte lacunae: a clear almond-shaped space around a thin dark nucleus."""
    stamps = []
    px = spec.pixel_size_um
    for _ in range(n):
        angle = rng.uniform(0, np.pi)
        ry, rx = rng.uniform(1.6, 2.6) / px, rng.uniform(4.0, 6.0) / px
        alpha, _ = _disc_stamp(ry, rx, angle)
        nucleus, _ = _disc_stamp(ry * 0.5, rx * 0.7, angle)
        nucleus = np.pad(nucleus, (alpha.shape[0] - nucleus.shape[0]) // 2)
        stamps.append(_blur_stamp(alpha, 0.03 + 0.85 * nucleus, 0.1 + 0.1 * nucleus, spec.blur_sigma_px))
    return tuple(stamps)


def _cell_pixels(
    d: CellDesigns,
    i: int,
    dy: np.ndarray,
    dx: np.ndarray,
    chromatin: np.ndarray,
    granules: np.ndarray,
    foam: np.ndarray,
) -> Stamp:
    """Alpha and stain concentrations of object ``i`` on the grid of offsets ``(dy, dx)`` from its centre.

    ``dy`` is a column and ``dx`` a row of offsets (both increasing); the textures have the grid's shape.
    The nucleus is the union of the object's lobes; each lobe is evaluated only near itself.
    """
    out = d.outline
    dist = np.hypot(dy, dx)
    cell_edge = radius_at(np.arctan2(dy, dx), out.r0_px[i], out.amps[i], out.phases[i]) - dist
    ys, xs = dy[:, 0], dx[0, :]
    nuc_edge = np.full(cell_edge.shape, -1e3, np.float32)
    for k in np.flatnonzero(d.lobe_valid[i]):
        cy, cx, a, b = d.lobe_dy_px[i, k], d.lobe_dx_px[i, k], d.lobe_a_px[i, k], d.lobe_b_px[i, k]
        reach = max(a, b) + 2.0
        r0, r1 = np.searchsorted(ys, cy - reach), np.searchsorted(ys, cy + reach)
        c0, c1 = np.searchsorted(xs, cx - reach), np.searchsorted(xs, cx + reach)
        if r1 <= r0 or c1 <= c0:
            continue
        ly, lx = ys[r0:r1, None] - cy, xs[None, c0:c1] - cx
        cos, sin = np.cos(d.lobe_angle[i, k]), np.sin(d.lobe_angle[i, k])
        rho = np.hypot((lx * cos + ly * sin) / a, (-lx * sin + ly * cos) / b)
        np.maximum(nuc_edge[r0:r1, c0:c1], (1 - rho) * min(a, b), out=nuc_edge[r0:r1, c0:c1])
    a_nuc = np.clip(nuc_edge + 0.5, 0, 1)
    nuc_h = d.nuc_h[i] * (1 + d.chromatin[i] * chromatin)
    if d.membrane[i] > 0:
        nuc_h = nuc_h + d.membrane[i] * np.exp(-(((nuc_edge - 1.5) / 1.3) ** 2))
    for k in np.flatnonzero(d.nucleolus_r_px[i] > 0):
        r = np.hypot(dy - d.nucleolus_dy_px[i, k], dx - d.nucleolus_dx_px[i, k])
        nuc_h = nuc_h + 0.55 * np.clip(d.nucleolus_r_px[i, k] - r + 0.5, 0, 1)
    holes = 1 - d.foam[i] * foam if d.foam[i] > 0 else 1.0
    cyto_e = d.cyto_e[i] * (1 + d.granules[i] * granules) * holes + 0.03 * np.exp(-((cell_edge / 1.5) ** 2))
    cyto_h = d.cyto_h[i] * (1 + 0.5 * d.granules[i] * granules) * holes
    c_h = cyto_h + a_nuc * (nuc_h - cyto_h)
    c_e = cyto_e + a_nuc * (0.2 - cyto_e)
    opacity = d.cyto_opacity[i]
    alpha = np.clip(cell_edge + 0.5, 0, 1) * (opacity + (1 - opacity) * a_nuc)
    return alpha.astype(np.float32), c_h.astype(np.float32), c_e.astype(np.float32)


def _small_stamp(
    d: CellDesigns, i: int, banks: tuple[PeriodicBank, ...], offset: np.ndarray, blur: float
) -> Stamp:
    """Render small-cell design ``i`` as a square stamp centred on its middle pixel."""
    half = int(np.ceil(d.outline.r_max_px[i])) + STAMP_PAD_PX
    grid = np.arange(-half, half + 1, dtype=np.float32)
    size = 2 * half + 1
    tex = [bank.window(int(offset[0]), int(offset[1]), size, size) for bank in banks]
    return _blur_stamp(*_cell_pixels(d, i, grid[:, None], grid[None, :], *tex), blur)


def _chromatin_texture(rng: np.random.Generator, spec: DemoSpec, period_px: int) -> np.ndarray:
    """Fine grain plus ~1 µm clumps of heterochromatin (zero mean, unit std)."""
    fine = periodic_noise(rng, period_px, 1.3)
    clumps = periodic_noise(rng, period_px, 0.45 / spec.pixel_size_um)
    tex = 0.55 * fine + np.tanh(1.5 * clumps)
    return ((tex - tex.mean()) / tex.std()).astype(np.float32)


def build_banks(spec: DemoSpec, period_px: int = 1024) -> TextureBanks:
    """The study's textures and stamps; deterministic for the spec."""
    rng = np.random.default_rng(np.random.SeedSequence([spec.seed, 7919]))
    window = spec.tile_px
    stroma_h, stroma_e = _stroma_tiles(rng, spec, period_px)
    chromatin = PeriodicBank(_chromatin_texture(rng, spec, 512), 512)
    granules = PeriodicBank(periodic_noise(rng, 512, 0.8), 512)
    # foamy cytoplasm: clear vacuoles where a smooth noise is high
    foam_noise = periodic_noise(rng, 512, 0.5 / spec.pixel_size_um)
    foam = PeriodicBank(np.clip(1.6 * foam_noise - 0.8, 0, 1).astype(np.float32), 512)
    bank = small_cell_bank(rng, spec)
    offsets = rng.integers(0, 512, (len(bank), 2))
    stamps = []
    for i in range(len(bank)):
        stamp = _small_stamp(bank, i, (chromatin, granules, foam), offsets[i], spec.blur_sigma_px)
        stamps.append(tuple(tuple(orient_array(part, o) for part in stamp) for o in range(8)))
    # camera noise, with the +0.5 of round-to-nearest folded in
    noise = (
        rng.standard_normal((NOISE_PERIOD_PX, NOISE_PERIOD_PX)).astype(np.float32) * spec.camera_noise_sigma
    )
    return TextureBanks(
        stroma_h=PeriodicBank(stroma_h, window),
        stroma_e=PeriodicBank(stroma_e, window),
        lamella_jitter=PeriodicBank(periodic_noise(rng, 256, 6.0), window),
        chromatin=chromatin,
        granules=granules,
        foam=foam,
        camera_noise=PeriodicBank(noise + np.float32(0.5), window),
        small=bank,
        small_stamps=tuple(stamps),
        rbc=_rbc_stamps(rng, spec, 12),
        lacunae=_lacuna_stamps(rng, spec, 12),
    )


class _Canvas:
    """Stain-concentration buffers of one tile, in slide-local pixel coordinates."""

    def __init__(self, y0: int, x0: int, h: int, w: int) -> None:
        self.y0, self.x0, self.h, self.w = y0, x0, h, w
        self.c_h = np.full((h, w), GLASS_HE[0], np.float32)
        self.c_e = np.full((h, w), GLASS_HE[1], np.float32)

    def paint(self, rows: slice, cols: slice, alpha, c_h, c_e) -> None:
        """Alpha-composite stain concentrations over what is already there."""
        bh, be = self.c_h[rows, cols], self.c_e[rows, cols]
        bh += alpha * (c_h - bh)
        be += alpha * (c_e - be)

    def stamp(self, top: int, left: int, stamp: Stamp, h_gain: float = 1.0) -> None:
        """Composite a pre-rendered stamp whose top-left pixel is at slide-local (top, left)."""
        alpha, c_h, c_e = stamp
        r0, c0 = max(top, self.y0), max(left, self.x0)
        r1 = min(top + alpha.shape[0], self.y0 + self.h)
        c1 = min(left + alpha.shape[1], self.x0 + self.w)
        if r1 <= r0 or c1 <= c0:
            return
        sr, sc = slice(r0 - top, r1 - top), slice(c0 - left, c1 - left)
        rows, cols = slice(r0 - self.y0, r1 - self.y0), slice(c0 - self.x0, c1 - self.x0)
        c_h = c_h[sr, sc] * np.float32(h_gain) if h_gain != 1.0 else c_h[sr, sc]
        self.paint(rows, cols, alpha[sr, sc], c_h, c_e[sr, sc])

    def bank(self, bank: PeriodicBank, rows: slice, cols: slice, offset: tuple[int, int]) -> np.ndarray:
        """The part of a periodic texture under ``(rows, cols)`` of this canvas."""
        return bank.window(
            self.y0 + rows.start + offset[0],
            self.x0 + cols.start + offset[1],
            rows.stop - rows.start,
            cols.stop - cols.start,
        )


def _large_stamp(
    objs: CellDesigns, i: int, banks: TextureBanks, offset: tuple[int, int], blur_sigma_px: float
) -> tuple[int, int, Stamp]:
    """One MK, osteoclast, nucleus cluster or piece of debris, in its clear halo if it has one.

    Rendered whole (then clipped by the canvas) with textures taken at its absolute position, so that
    an object split over tiles is identical in each.
    """
    out = objs.outline
    cy, cx = float(out.y_px[i]), float(out.x_px[i])
    halo = float(objs.halo_px[i])
    half = int(np.ceil(out.r_max_px[i] + halo)) + STAMP_PAD_PX
    top, left = int(np.floor(cy)) - half, int(np.floor(cx)) - half
    size = 2 * half + 2  # covers [cy - half - 1, cy + half + 1]
    dy = (np.arange(top, top + size, dtype=np.float32) - cy)[:, None]
    dx = (np.arange(left, left + size, dtype=np.float32) - cx)[None, :]
    tex = [
        bank.window(top + offset[0], left + offset[1], size, size)
        for bank in (banks.chromatin, banks.granules, banks.foam)
    ]
    a_cell, c_h, c_e = _cell_pixels(objs, i, dy, dx, *tex)
    if halo > 0:  # the halo is a clear (fat-like) ring the cell sits in
        cell_edge = radius_at(np.arctan2(dy, dx), out.r0_px[i], out.amps[i], out.phases[i]) - np.hypot(dy, dx)
        a_halo = np.clip(cell_edge + halo + 0.5, 0, 1)
        c_h = FAT_HE[0] + a_cell * (c_h - FAT_HE[0])
        c_e = FAT_HE[1] + a_cell * (c_e - FAT_HE[1])
        a_cell = a_halo
    return top, left, _blur_stamp(a_cell, c_h, c_e, blur_sigma_px)


def _in_canvas(y: np.ndarray, x: np.ndarray, pad, canvas: _Canvas) -> np.ndarray:
    return np.flatnonzero(
        (y + pad > canvas.y0)
        & (y - pad < canvas.y0 + canvas.h)
        & (x + pad > canvas.x0)
        & (x - pad < canvas.x0 + canvas.w)
    )


def _paint_discs(canvas: _Canvas, discs: Discs, stamps: tuple[Stamp, ...]) -> None:
    for i in _in_canvas(discs.y_px, discs.x_px, discs.r_max_px + 3, canvas):
        stamp = stamps[discs.variant[i] % len(stamps)]
        half = stamp[0].shape[0] // 2
        canvas.stamp(int(round(discs.y_px[i])) - half, int(round(discs.x_px[i])) - half, stamp)


def _paint_small(canvas: _Canvas, cells: SmallCells, banks: TextureBanks) -> None:
    pad = float(banks.small.outline.r_max_px.max()) + STAMP_PAD_PX + 2
    for i in _in_canvas(cells.y_px, cells.x_px, pad, canvas):
        stamp = banks.small_stamps[cells.variant[i]][cells.orientation[i]]
        half = stamp[0].shape[0] // 2
        canvas.stamp(int(cells.y_px[i]) - half, int(cells.x_px[i]) - half, stamp, float(cells.h_gain[i]))


ANATOMY_BLOCK_PX = 256  # anatomy is painted block by block, skipping blocks a structure does not reach
EDGE_REACH_UM = 2.0  # how far from a boundary its soft edge and rim can show


Box = tuple[slice, slice]


def _field_range(field: np.ndarray, ds: int, y0: int, x0: int, h: int, w: int) -> tuple[float, float]:
    """Min and max of a low-resolution field over what bilinear upsampling of a window reads."""
    sub = field[max(0, y0 // ds - 1) : (y0 + h) // ds + 2, max(0, x0 // ds - 1) : (x0 + w) // ds + 2]
    return float(sub.min()), float(sub.max())


def _upsample(field: np.ndarray, ds: int, canvas: _Canvas, box: Box) -> np.ndarray:
    rows, cols = box
    return upsample_window(
        field,
        ds,
        canvas.y0 + rows.start,
        canvas.x0 + cols.start,
        rows.stop - rows.start,
        cols.stop - cols.start,
    )


def _paint_block(canvas: _Canvas, scene: SlideScene, banks: TextureBanks, spec: DemoSpec, box: Box) -> bool:
    """Paint stroma, bone and fat into one block from the distance fields; False when it is all glass."""
    lay, ds, off = scene.layout, scene.layout.field_downsample, scene.bank_offset_yx
    # edges as linear ramps as wide as a blurred step (slope of a Gaussian-blurred edge at its middle)
    ramp_um = spec.pixel_size_um * max(1.0, 2.5 * spec.blur_sigma_px)
    window = (
        canvas.y0 + box[0].start,
        canvas.x0 + box[1].start,
        box[0].stop - box[0].start,
        box[1].stop - box[1].start,
    )
    t_min, t_max = _field_range(lay.tissue_sdf_um, ds, *window)
    if t_max <= -EDGE_REACH_UM:
        return False
    stroma_h = canvas.bank(banks.stroma_h, *box, off)
    stroma_e = canvas.bank(banks.stroma_e, *box, off)
    a_tissue: np.ndarray | float = 1.0
    if t_min < EDGE_REACH_UM:  # blend to glass across the section edge
        a_tissue = np.clip(_upsample(lay.tissue_sdf_um, ds, canvas, box) / ramp_um + 0.5, 0, 1)
        canvas.c_h[box] = GLASS_HE[0] + a_tissue * (stroma_h - GLASS_HE[0])
        canvas.c_e[box] = GLASS_HE[1] + a_tissue * (stroma_e - GLASS_HE[1])
    else:
        canvas.c_h[box] = stroma_h
        canvas.c_e[box] = stroma_e
    if _field_range(lay.bone_sdf_um, ds, *window)[0] < EDGE_REACH_UM:
        bone = _upsample(lay.bone_sdf_um, ds, canvas, box)
        jitter = canvas.bank(banks.lamella_jitter, *box, off)
        lamellae = np.sin((2 * np.pi / 3.5) * (bone + 2.5 * jitter))
        a_bone = np.clip(-bone / ramp_um + 0.5, 0, 1) * a_tissue
        canvas.paint(*box, a_bone, BONE_HE[0] * (1 + 0.3 * lamellae), BONE_HE[1] * (1 + 0.08 * lamellae))
        canvas.c_e[box] += 0.2 * np.exp(-((bone / 0.5) ** 2)) * a_tissue  # cement line at the surface
    if _field_range(lay.fat_sdf_um, ds, *window)[0] < EDGE_REACH_UM:
        fat = _upsample(lay.fat_sdf_um, ds, canvas, box)
        canvas.paint(*box, np.clip(-fat / ramp_um + 0.5, 0, 1) * a_tissue, FAT_HE[0], FAT_HE[1])
        canvas.paint(*box, np.exp(-((fat / 0.4) ** 2)) * a_tissue, FAT_RIM_HE[0], FAT_RIM_HE[1])
    return True


def _paint_anatomy(canvas: _Canvas, scene: SlideScene, banks: TextureBanks, spec: DemoSpec) -> list[Box]:
    """Paint the tile's anatomy block by block; returns the blocks that hold tissue."""
    tissue_blocks = []
    for by in range(0, canvas.h, ANATOMY_BLOCK_PX):
        for bx in range(0, canvas.w, ANATOMY_BLOCK_PX):
            box = (
                slice(by, min(by + ANATOMY_BLOCK_PX, canvas.h)),
                slice(bx, min(bx + ANATOMY_BLOCK_PX, canvas.w)),
            )
            if _paint_block(canvas, scene, banks, spec, box):
                tissue_blocks.append(box)
    return tissue_blocks


def _to_rgb(
    canvas: _Canvas,
    scene: SlideScene,
    banks: TextureBanks,
    spec: DemoSpec,
    rng: np.random.Generator,
    bgr: bool,
) -> np.ndarray:
    """Beer-Lambert colour (I = I0 * 10^-OD) plus camera noise, as uint8 RGB (or BGR)."""
    c_h, c_e = canvas.c_h, canvas.c_e
    h, w = c_h.shape
    rgb = np.empty((h, w, 3), np.uint8)
    noise_offsets = rng.integers(0, NOISE_PERIOD_PX, (3, 2))
    scratch = np.empty_like(c_h)
    for ch in range(3):
        od = c_h * np.float32(-LN10 * spec.stain_h_od[ch] * scene.stain_gain_h)
        np.multiply(c_e, np.float32(-LN10 * spec.stain_e_od[ch] * scene.stain_gain_e), out=scratch)
        od += scratch
        od += np.float32(np.log(spec.illumination_rgb[ch]))  # I0 folded into the exponent
        np.exp(od, out=od)
        if spec.camera_noise_sigma > 0:
            od += banks.camera_noise.window(int(noise_offsets[ch, 0]), int(noise_offsets[ch, 1]), h, w)
        else:
            od += np.float32(0.5)
        np.clip(od, 0, 255, out=od)
        rgb[..., 2 - ch if bgr else ch] = od
    return rgb


def render_tile(
    scene: SlideScene,
    banks: TextureBanks,
    spec: DemoSpec,
    y0: int,
    x0: int,
    h: int,
    w: int,
    rng: np.random.Generator,
    bgr: bool = False,
) -> np.ndarray:
    """The ``(h, w, 3)`` uint8 RGB pixels of the slide-local window ``(y0, x0, h, w)``.

    ``bgr=True`` returns the channels in CZI's Bgr24 order instead (saves a copy when writing).
    """
    canvas = _Canvas(y0, x0, h, w)
    tissue_blocks = _paint_anatomy(canvas, scene, banks, spec)
    if tissue_blocks:
        _paint_discs(canvas, scene.lacunae, banks.lacunae)
        _paint_discs(canvas, scene.rbc, banks.rbc)
        large = scene.large.outline
        for i in _in_canvas(large.y_px, large.x_px, scene.large.reach_px + STAMP_PAD_PX + 2, canvas):
            top, left, stamp = _large_stamp(
                scene.large, int(i), banks, scene.bank_offset_yx, spec.blur_sigma_px
            )
            canvas.stamp(top, left, stamp)
        _paint_small(canvas, scene.small, banks)
        for box in tissue_blocks:  # uneven eosin uptake across the section
            canvas.c_e[box] *= _upsample(scene.layout.eosin_gain, scene.layout.field_downsample, canvas, box)
    return _to_rgb(canvas, scene, banks, spec, rng, bgr)
