"""The one place that talks to libCZI (through pylibCZIrw): the subblock list, the XML metadata, pixels.

`pylibCZIrw.czi.CziReader.read` makes a throw-away numpy copy of every bitmap just to check its shape
(``np.array(pixel_data).shape``), which doubles peak memory and adds a full memcpy per read (about 25 % of
a 3000 px tile read). Calling the same native accessor directly and viewing the bitmap through the buffer
protocol avoids both. This relies on pylibCZIrw internals, hence the pinned version (6.1.0) and this
module being the only user.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import _pylibCZIrw
import numpy as np
from pylibCZIrw import czi as pyczi

from mk_hspc.czi.errors import CziSlideError

# Dimensions libCZI expects in a plane coordinate when they have more than one index (S is a filter, M a
# tile index; neither belongs in the plane).
PLANE_DIMENSIONS = ("Z", "C", "T", "R", "I", "H", "V", "B")


# Names of libCZI's pixel-type and compression codes (compression: the raw code in the file), read once:
# looking an enum's name up per subblock costs more than the rest of the enumeration. "UnCompressed" is
# renamed because SlideMeta.compression has always said "Uncompressed" (CONTRACTS.md).
_PIXEL_TYPE_NAMES = {int(code): name for name, code in _pylibCZIrw.PixelType.__members__.items()}
_COMPRESSION_NAMES = {int(code): name for name, code in _pylibCZIrw.CompressionMode.__members__.items()} | {
    int(_pylibCZIrw.CompressionMode.UnCompressed): "Uncompressed"
}


class SubblockEntry(NamedTuple):
    """One subblock as libCZI's directory enumeration describes it (no pixels).

    A named tuple rather than a dataclass: a whole-slide scan has tens of thousands of subblocks, and
    building frozen dataclasses took a third of the enumeration time.

    Attributes:
        index: libCZI's subblock index (the position in the file's directory).
        pixel_type: e.g. ``"Bgr24"``; ``"PixelType<code>"`` for a code libCZI does not know.
        compression: e.g. ``"Zstd1"``; ``"Compression<code>"`` for a code libCZI does not know.
        x, y, w, h: Logical rectangle in absolute CZI pixels (full resolution).
        stored_w, stored_h: Stored bitmap size; smaller than ``w, h`` for pyramid subblocks.
        zoom: Stored / logical size as libCZI computes it: 1.0 on layer 0, e.g. 0.5 for a 2x pyramid
            subblock.
        coords: Start index of every other dimension present (``"C"``, ``"S"``, ``"M"``, ...).
    """

    index: int
    pixel_type: str
    compression: str
    x: int
    y: int
    w: int
    h: int
    stored_w: int
    stored_h: int
    zoom: float
    coords: dict[str, int]

    @property
    def is_layer0(self) -> bool:
        return self.stored_w == self.w and self.stored_h == self.h


def _entry(index: int, info: _pylibCZIrw.SubBlockInfo) -> SubblockEntry:
    rect, stored = info.logicalRect, info.physicalSize
    x, y, w, h = rect.x, rect.y, rect.w, rect.h
    pixel_type = int(info.pixelType)
    compression = info.compressionModeRaw
    coords = info.coordinate.to_dict()
    if info.is_mindex_valid():
        coords["M"] = info.mIndex
    return SubblockEntry(
        index,
        _PIXEL_TYPE_NAMES.get(pixel_type) or f"PixelType{pixel_type}",
        _COMPRESSION_NAMES.get(compression) or f"Compression{compression}",
        x,
        y,
        w,
        h,
        stored.w,
        stored.h,
        info.get_zoom() if w > 0 and h > 0 else 0.0,
        coords,
    )


def plane_coordinate(subblocks: Sequence[SubblockEntry], channel: int) -> str:
    """libCZI plane string such as ``"C1 T0"``: every dimension with several indices, at ``channel`` / 0.

    Dimensions with a single index must be left out (libCZI rejects e.g. ``C0`` for a file without C).
    """
    indices: dict[str, set[int]] = {}
    for entry in subblocks:
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
        self.path = path
        self._reader = pyczi.CziReader(path, cache_options=cache)

    def subblocks(self) -> tuple[SubblockEntry, ...]:
        """Every subblock in directory order, from libCZI's in-memory directory (reads no file data).

        Raises:
            CziSlideError: for a subblock with an empty or negative logical or stored size (libCZI
                enumerates it, and reads leave its area as background).
        """
        entries: list[SubblockEntry] = []
        self._reader.enumerate_subblocks(lambda index, info: entries.append(_entry(index, info)) or True)
        for entry in entries:
            if min(entry.w, entry.h, entry.stored_w, entry.stored_h) <= 0:
                raise CziSlideError(
                    self.path, f"corrupt: subblock {entry.index} has an empty or negative size"
                )
        return tuple(entries)

    def metadata_xml(self) -> str:
        """The XML metadata document; raises RuntimeError when libCZI cannot read it."""
        return self._reader.raw_metadata

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
