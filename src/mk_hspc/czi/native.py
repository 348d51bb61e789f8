"""The one place that talks to libCZI (through pylibCZIrw's compiled module).

`pylibCZIrw.czi.CziReader.read` makes a throw-away numpy copy of every bitmap just to check its shape
(``np.array(pixel_data).shape``), which doubles peak memory and adds a full memcpy per read (about 25 % of
a 3000 px tile read). Calling the same native accessor directly and viewing the bitmap through the buffer
protocol avoids both. This relies on pylibCZIrw internals, hence the pinned version (6.1.0) and this
module being the only user.
"""

from __future__ import annotations

import _pylibCZIrw
import numpy as np
from pylibCZIrw import czi as pyczi

from mk_hspc.czi.container import CziContainer

# Dimensions libCZI expects in a plane coordinate when they have more than one index (S is a filter, M a
# tile index; neither belongs in the plane).
PLANE_DIMENSIONS = ("Z", "C", "T", "R", "I", "H", "V", "B")


def plane_coordinate(container: CziContainer, channel: int) -> str:
    """libCZI plane string such as ``"C1 T0"``: every dimension with several indices, at ``channel`` / 0.

    Dimensions with a single index must be left out (libCZI rejects e.g. ``C0`` for a file without C).
    """
    indices: dict[str, set[int]] = {}
    for entry in container.subblocks:
        for name, start in entry.coords.items():
            if name in PLANE_DIMENSIONS:
                indices.setdefault(name, set()).add(start)
    parts = []
    for name in PLANE_DIMENSIONS:
        values = indices.get(name, set())
        if len(values) > 1:
            parts.append(f"{name}{channel if name == 'C' else min(values)}")
    return " ".join(parts)


class NativeReader:
    """One libCZI reader: decodes and composes the subblocks of a region into a bitmap."""

    def __init__(self, path: str, cache_bytes: int) -> None:
        cache = pyczi.CacheOptions(max_memory_usage=cache_bytes) if cache_bytes else None
        self._reader = pyczi.CziReader(path, cache_options=cache)

    def read(
        self,
        roi: tuple[int, int, int, int],
        zoom: float,
        plane: str,
        pixel_type: str,
        background_rgb01: tuple[float, float, float],
    ) -> np.ndarray:
        """Bitmap ``(h, w, samples)`` of ``roi`` at ``zoom`` (h, w = int(roi size * zoom)), samples in
        memory order (B, G, R for Bgr types); rows may be padded, so the array can be non-contiguous.

        libCZI releases the GIL while it works, so reads from several threads run in parallel.
        """
        rect = _pylibCZIrw.IntRect()
        rect.x, rect.y, rect.w, rect.h = roi
        color = _pylibCZIrw.RgbFloatColor()
        color.r, color.g, color.b = background_rgb01
        bitmap = self._reader._czi_reader.GetSingleChannelScalingTileAccessorData(
            _pylibCZIrw.PixelType.__members__[pixel_type], rect, color, float(zoom), plane, ""
        )
        return np.asarray(bitmap)  # a view that keeps the native bitmap alive

    def cache_bytes_used(self) -> int:
        return int(self._reader.get_cache_info().memory_usage)

    def close(self) -> None:
        self._reader.close()
