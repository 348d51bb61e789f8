"""The tissue map of one slide: a low-resolution boolean mask placed in absolute CZI pixels, and its file form."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np


@dataclass(frozen=True)
class TissueMap:
    """A slide's boolean tissue mask at low resolution, placed in absolute CZI pixels.

    Map pixel ``(r, c)`` covers full-resolution pixels ``[origin_x + c * downsample, ... + downsample)`` by
    ``[origin_y + r * downsample, ... + downsample)``.

    Attributes:
        slide: slide name.
        mask: ``(H, W)`` bool, True = tissue (enclosed fat and vessels included).
        origin_x, origin_y: absolute CZI pixel of the top-left corner of map pixel ``(0, 0)``.
        downsample: full-resolution pixels per map pixel.
        pixel_size_um: full-resolution pixel size.
        threshold: the study-wide tissue-score threshold the mask was cut at.
        thumbnail: optional ``(H, W, 3)`` uint8 RGB the mask was computed from (for the QC figure).
    """

    slide: str
    mask: np.ndarray
    origin_x: int
    origin_y: int
    downsample: float
    pixel_size_um: float
    threshold: float
    thumbnail: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.mask.ndim != 2:
            raise ValueError(f"mask must be 2-D, got shape {self.mask.shape}")
        if self.thumbnail is not None and self.thumbnail.shape != (*self.mask.shape, 3):
            raise ValueError(f"thumbnail shape {self.thumbnail.shape} does not match mask {self.mask.shape}")
        if self.downsample <= 0 or self.pixel_size_um <= 0:
            raise ValueError("downsample and pixel_size_um must be positive")

    @property
    def um_per_px(self) -> float:
        """Size of one map pixel in micrometres."""
        return self.downsample * self.pixel_size_um

    @property
    def tissue_area_um2(self) -> float:
        return float(self.mask.sum()) * self.um_per_px**2

    def window_fractions(self, x: np.ndarray, y: np.ndarray, w: np.ndarray, h: np.ndarray) -> np.ndarray:
        """Tissue fraction of each full-resolution window ``(x, y, w, h)`` (absolute CZI px), area-weighted.

        Map pixels cut by a window edge count by the part inside it (exact for a piecewise-constant mask:
        the integral image interpolated bilinearly); whatever lies outside the map counts as no tissue.
        """
        x, y, w, h = (np.asarray(v, dtype=np.float64) for v in (x, y, w, h))
        integral = np.zeros((self.mask.shape[0] + 1, self.mask.shape[1] + 1), np.float64)
        integral[1:, 1:] = self.mask.cumsum(0).cumsum(1)
        u0 = (x - self.origin_x) / self.downsample
        v0 = (y - self.origin_y) / self.downsample
        u1 = u0 + w / self.downsample
        v1 = v0 + h / self.downsample
        corners = _bilinear(integral, u1, v1) - _bilinear(integral, u0, v1) - _bilinear(integral, u1, v0)
        tissue_px = corners + _bilinear(integral, u0, v0)
        window_px = (w / self.downsample) * (h / self.downsample)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(window_px > 0, np.clip(tissue_px / window_px, 0.0, 1.0), 0.0)

    def to_npz(self, file: str | os.PathLike | BinaryIO) -> None:
        """Write the map as a compressed ``.npz`` (path or binary file object)."""
        arrays = {
            "mask": self.mask.astype(bool),
            "slide": np.array(self.slide),
            "origin_xy": np.array([self.origin_x, self.origin_y], np.int64),
            "downsample": np.float64(self.downsample),
            "pixel_size_um": np.float64(self.pixel_size_um),
            "threshold": np.float64(self.threshold),
        }
        if self.thumbnail is not None:
            arrays["thumbnail"] = self.thumbnail
        np.savez_compressed(file, **arrays)

    @classmethod
    def from_npz(cls, file: str | os.PathLike | BinaryIO | bytes) -> TissueMap:
        """Read a map written by :meth:`to_npz` (path, binary file object or the file's bytes)."""
        if isinstance(file, bytes):
            file = io.BytesIO(file)
        with np.load(file) as data:
            return cls(
                slide=str(data["slide"]),
                mask=data["mask"].astype(bool),
                origin_x=int(data["origin_xy"][0]),
                origin_y=int(data["origin_xy"][1]),
                downsample=float(data["downsample"]),
                pixel_size_um=float(data["pixel_size_um"]),
                threshold=float(data["threshold"]),
                thumbnail=data["thumbnail"] if "thumbnail" in data.files else None,
            )


def _bilinear(integral: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Integral image at fractional corner coordinates ``(u, v)`` (columns, rows), clamped to the map."""
    u = np.clip(u, 0.0, integral.shape[1] - 1)
    v = np.clip(v, 0.0, integral.shape[0] - 1)
    u0 = np.clip(np.floor(u).astype(np.int64), 0, max(integral.shape[1] - 2, 0))
    v0 = np.clip(np.floor(v).astype(np.int64), 0, max(integral.shape[0] - 2, 0))
    u1 = np.minimum(u0 + 1, integral.shape[1] - 1)
    v1 = np.minimum(v0 + 1, integral.shape[0] - 1)
    fu = u - u0
    fv = v - v0
    top = integral[v0, u0] * (1 - fu) + integral[v0, u1] * fu
    bottom = integral[v1, u0] * (1 - fu) + integral[v1, u1] * fu
    return top * (1 - fv) + bottom * fv
