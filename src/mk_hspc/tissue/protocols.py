"""The minimal slide interface the tissue and tiling code needs (anything shaped like ``mk_hspc.czi.CziSlide``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np


class BoxLike(Protocol):
    """A rectangle in absolute CZI pixels at full resolution."""

    @property
    def x(self) -> int: ...
    @property
    def y(self) -> int: ...
    @property
    def w(self) -> int: ...
    @property
    def h(self) -> int: ...


class SlideMetaLike(Protocol):
    """The metadata fields tissue detection and tiling read."""

    @property
    def name(self) -> str: ...
    @property
    def pixel_size_um(self) -> float: ...
    @property
    def bbox(self) -> BoxLike: ...
    @property
    def scenes(self) -> Sequence[BoxLike]: ...


@runtime_checkable
class SlideLike(Protocol):
    """A readable slide: metadata plus a thread-safe region reader.

    ``read_region(x, y, w, h, scale)`` returns ``(round(h * scale), round(w * scale), 3)`` uint8 RGB of the
    full-resolution box ``(x, y, w, h)`` in absolute CZI pixels, as ``mk_hspc.czi.CziSlide`` does.
    """

    @property
    def meta(self) -> SlideMetaLike: ...

    def read_region(self, x: int, y: int, w: int, h: int, scale: float = 1.0) -> np.ndarray: ...
