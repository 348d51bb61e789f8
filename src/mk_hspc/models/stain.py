"""Colour deconvolution of H&E tiles into haematoxylin and eosin optical-density maps.

Brightfield H&E follows Beer-Lambert: the optical density ``OD = -log10(I / I0)`` of a pixel is a
non-negative mix of one OD vector per stain. Ruifrok & Johnston's fixed vectors (``skimage.color.rgb2hed``)
leak eosin into haematoxylin whenever a lab's stain hue differs from theirs, so the vectors are
estimated per tile with Macenko's method (Macenko et al., ISBI 2009: the two extreme angles of the
tissue ODs in their principal plane) and pulled back to a reference when the tile has too little
tissue or the estimate is implausible (tiles of pure fat, pure eosin or pure nuclei).

Concentrations are in OD units per unit-length stain vector, so thresholds on them are physical
(``0.1`` = a tenth of an optical density) rather than tied to one scanner's 8-bit values.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from mk_hspc.models.tile_memo import LastTileResults

# Macenko et al.'s reference vectors (rows: haematoxylin, eosin), widely used as H&E defaults.
REFERENCE_H_OD: tuple[float, float, float] = (0.5626, 0.7201, 0.4062)
REFERENCE_E_OD: tuple[float, float, float] = (0.2159, 0.8012, 0.5581)


@dataclass(frozen=True)
class StainMaps:
    """Per-pixel stain concentrations of one tile and the stain vectors that produced them.

    Attributes:
        haematoxylin: ``(H, W)`` float32 haematoxylin optical density (nuclei are high).
        eosin: ``(H, W)`` float32 eosin optical density (cytoplasm, matrix, red cells are high).
        od_total: ``(H, W)`` float32 summed RGB optical density (0 on glass/fat, high on tissue).
        stain_vectors: ``(2, 3)`` unit OD vectors (rows: haematoxylin, eosin) used for the unmixing.
        estimated: whether the vectors were estimated from this tile (False: reference fallback).
    """

    haematoxylin: np.ndarray
    eosin: np.ndarray
    od_total: np.ndarray
    stain_vectors: np.ndarray
    estimated: bool


def optical_density(rgb: np.ndarray, background_intensity: float = 255.0) -> np.ndarray:
    """``(..., 3)`` float32 optical density ``-log10(I / I0)`` of RGB values, clipped at 0.

    Args:
        rgb: ``(..., 3)`` RGB values (uint8, or float on the 0-255 scale such as a binned tile).
        background_intensity: the intensity of unstained glass ``I0``; 255 suits white-balanced scans.
    """
    rgb = np.asarray(rgb)
    if rgb.dtype == np.uint8:
        return _od_table(float(background_intensity))[rgb]  # 256-entry lookup: no log per pixel
    intensity = np.maximum(rgb.astype(np.float32), 1.0)
    od = -np.log10(intensity / np.float32(background_intensity))
    return np.maximum(od, 0.0, out=od)


@lru_cache(maxsize=8)
def _od_table(background_intensity: float) -> np.ndarray:
    values = np.maximum(np.arange(256, dtype=np.float64), 1.0)
    return np.maximum(-np.log10(values / background_intensity), 0.0).astype(np.float32)


def _unit(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, np.float64)
    return vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)


def _angle_deg(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.degrees(np.arccos(np.clip(np.dot(_unit(a), _unit(b)), -1.0, 1.0))))


def macenko_stain_vectors(
    od: np.ndarray,
    *,
    min_od: float = 0.15,
    angle_percentile: float = 1.0,
    min_pixels: int = 2000,
    max_pixels: int = 200_000,
    max_deviation_deg: float = 25.0,
    reference: tuple[tuple[float, float, float], tuple[float, float, float]] = (
        REFERENCE_H_OD,
        REFERENCE_E_OD,
    ),
) -> tuple[np.ndarray, bool]:
    """Estimate unit H and E OD vectors of a tile (Macenko et al. 2009) with a reference fallback.

    Args:
        od: ``(..., 3)`` optical densities (see :func:`optical_density`).
        min_od: pixels whose every channel is below this OD are glass/fat and ignored.
        angle_percentile: robust extremes of the angle distribution (percent at each end).
        min_pixels: fewer tissue pixels than this give the reference vectors.
        max_pixels: tissue pixels are subsampled evenly to at most this many (speed).
        max_deviation_deg: an estimated vector farther than this from its reference is replaced by the
            reference (a tile without nuclei or without eosin cannot show both stain directions).
        reference: reference (haematoxylin, eosin) OD vectors.

    Returns:
        ``((2, 3) float64 unit vectors [H, E], estimated)``; ``estimated`` is False when either
        vector fell back to the reference.
    """
    ref = _unit(np.asarray(reference, np.float64))
    flat = od.reshape(-1, 3)
    # An even subsample is as good for two directions as all pixels of a large tile, and much faster.
    flat = flat[:: max(1, len(flat) // (4 * max_pixels))]
    tissue = flat[np.all(flat > min_od, axis=1)]
    if len(tissue) < min_pixels:
        return ref, False
    if len(tissue) > max_pixels:
        tissue = tissue[:: int(np.ceil(len(tissue) / max_pixels))]
    tissue = tissue.astype(np.float64)
    # Principal plane of the tissue ODs (the two largest eigenvectors of the covariance).
    _, eigvecs = np.linalg.eigh(np.cov(tissue, rowvar=False))
    plane = eigvecs[:, 1:3]
    # Orient the plane's axes so that stain vectors (all positive) have positive coordinates.
    plane = plane * np.where(plane.sum(axis=0) < 0, -1.0, 1.0)
    projected = tissue @ plane
    angles = np.arctan2(projected[:, 1], projected[:, 0])
    lo, hi = np.percentile(angles, [angle_percentile, 100.0 - angle_percentile])
    extremes = _unit(np.stack([plane @ [np.cos(a), np.sin(a)] for a in (lo, hi)]))
    # Haematoxylin looks blue because it absorbs red: the extreme with the larger red OD (Macenko's rule).
    order = np.argsort([-v[0] for v in extremes])
    vectors = extremes[order]
    estimated = True
    for k in range(2):
        if np.any(vectors[k] <= 0) or _angle_deg(vectors[k], ref[k]) > max_deviation_deg:
            vectors[k] = ref[k]
            estimated = False
    return vectors, estimated


def tile_stain_vectors(rgb: np.ndarray, **kwargs: float) -> tuple[np.ndarray, bool]:
    """:func:`macenko_stain_vectors` of an RGB tile without converting every pixel to optical density.

    The estimate uses an even subsample of the pixels anyway; taking that subsample from the RGB values
    first gives the very same pixels (hence the same vectors) at a fraction of the cost. The last
    estimate is remembered by the subsample's hash: the feature extractor asks once per cell type
    for the same tile.
    """
    flat = np.asarray(rgb).reshape(-1, 3)
    max_pixels = int(kwargs.get("max_pixels", 200_000))
    sample = np.ascontiguousarray(flat[:: max(1, len(flat) // (4 * max_pixels))])
    # ~1 ms on the subsample; 128 bits, where a CRC of two consecutive tiles could collide.
    fingerprint = (sample.shape, sample.dtype.str, hashlib.blake2b(sample.data, digest_size=16).digest())
    key = ("tile_stain_vectors", tuple(sorted(kwargs.items())))
    remembered = _LAST_VECTORS.get(key, fingerprint)
    if remembered is None:
        remembered = macenko_stain_vectors(optical_density(sample), **kwargs)
        _LAST_VECTORS.put(key, fingerprint, remembered)
    vectors, estimated = remembered
    return vectors.copy(), estimated  # a copy: callers may edit theirs


_LAST_VECTORS = LastTileResults()


def unmix(od: np.ndarray, stain_vectors: np.ndarray) -> np.ndarray:
    """Least-squares stain concentrations ``(..., 2)`` float32 of ODs ``(..., 3)`` for ``(2, 3)`` vectors."""
    pinv = np.linalg.pinv(np.asarray(stain_vectors, np.float64).T).astype(np.float32)  # (2, 3)
    concentrations = np.empty((*od.shape[:-1], 2), np.float32)
    for k in range(2):  # three multiply-adds per stain beat a generic matrix product on (H, W, 3)
        concentrations[..., k] = od[..., 0] * pinv[k, 0] + od[..., 1] * pinv[k, 1] + od[..., 2] * pinv[k, 2]
    return concentrations


def separate_he(
    rgb: np.ndarray,
    *,
    background_intensity: float = 255.0,
    estimate_vectors: bool = True,
    min_od: float = 0.15,
    max_deviation_deg: float = 25.0,
) -> StainMaps:
    """Haematoxylin and eosin OD maps of an RGB H&E tile.

    Args:
        rgb: ``(H, W, 3)`` RGB tile.
        background_intensity: intensity of glass, see :func:`optical_density`.
        estimate_vectors: estimate the stain vectors from the tile (Macenko); False uses the reference.
        min_od: per-channel OD below which a pixel is not tissue (for the vector estimate).
        max_deviation_deg: largest accepted angle between an estimated and a reference vector.
    """
    od = optical_density(rgb, background_intensity)
    if estimate_vectors:
        vectors, estimated = macenko_stain_vectors(od, min_od=min_od, max_deviation_deg=max_deviation_deg)
    else:
        vectors, estimated = _unit(np.asarray((REFERENCE_H_OD, REFERENCE_E_OD))), False
    concentrations = unmix(od, vectors)
    return StainMaps(
        haematoxylin=np.ascontiguousarray(concentrations[..., 0]),
        eosin=np.ascontiguousarray(concentrations[..., 1]),
        od_total=od[..., 0] + od[..., 1] + od[..., 2],
        stain_vectors=vectors,
        estimated=estimated,
    )
