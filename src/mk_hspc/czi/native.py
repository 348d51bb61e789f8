"""The one place that talks to libCZI (through pylibCZIrw): the subblock list, the XML metadata, pixels.

`pylibCZIrw.czi.CziReader.read` makes a throw-away numpy copy of every bitmap just to check its shape
(``np.array(pixel_data).shape``), which doubles peak memory and adds a full memcpy per read (about 25 % of
a 3000 px tile read). Calling the same native accessor directly and viewing the bitmap through the buffer
protocol avoids both. This relies on pylibCZIrw internals, hence the pinned version (6.1.0) and this
module being the only user.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import _pylibCZIrw
import numpy as np
from pylibCZIrw import czi as pyczi

from mk_hspc.czi.errors import CziSlideError

# Dimensions libCZI expects in a plane coordinate when they have more than one index (S is a filter, M a
# tile index; neither belongs in the plane).
PLANE_DIMENSIONS = ("Z", "C", "T", "R", "I", "H", "V", "B")


# libCZI's enum says "UnCompressed"; SlideMeta.compression has always said "Uncompressed" (CONTRACTS.md).
_COMPRESSION_NAMES = {"UnCompressed": "Uncompressed"}


@dataclass(frozen=True)
class SubblockEntry:
    """One subblock as libCZI's directory enumeration describes it (no pixels).

    Attributes:
        index: libCZI's subblock index (the position in the file's directory).
        pixel_type: e.g. ``"Bgr24"``.
        compression: e.g. ``"Zstd1"``.
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
    coords: dict[str, int] = field(default_factory=dict)

    @property
    def is_layer0(self) -> bool:
        return self.stored_w == self.w and self.stored_h == self.h


def _entry(index: int, info: _pylibCZIrw.SubBlockInfo) -> SubblockEntry:
    rect, stored = info.logicalRect, info.physicalSize
    pixel_type = info.pixelType
    # pybind11 names a code outside libCZI's enum "???" (e.g. Bgra32 = 9); keep the code in the name.
    pixel_type_name = pixel_type.name if pixel_type.name != "???" else f"PixelType{int(pixel_type)}"
    mode = info.get_compression_mode()
    compression = (
        mode.name if mode != _pylibCZIrw.CompressionMode.Invalid else f"Compression{info.compressionModeRaw}"
    )
    coords = dict(info.coordinate.to_dict())
    if info.is_mindex_valid():
        coords["M"] = int(info.mIndex)
    return SubblockEntry(
        index=int(index),
        pixel_type=pixel_type_name,
        compression=_COMPRESSION_NAMES.get(compression, compression),
        x=rect.x,
        y=rect.y,
        w=rect.w,
        h=rect.h,
        stored_w=stored.w,
        stored_h=stored.h,
        zoom=float(info.get_zoom()) if rect.w > 0 and rect.h > 0 else 0.0,
        coords=coords,
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
