"""Reuse of a result between plugins that run on the same tile one after the other.

The segmentation node runs every plugin on a tile before the next tile, so a plugin can hand an expensive
intermediate (SAM2's whole-tile encoding, the classical MK pass) to the next plugin that needs the same
thing for the same pixels, instead of computing it twice.
"""

from __future__ import annotations

import threading
import zlib
from collections.abc import Hashable
from typing import Any

import numpy as np

TileFingerprint = tuple[tuple[int, ...], int]


def tile_fingerprint(tile_rgb: np.ndarray) -> TileFingerprint:
    """Cheap identity of a tile's pixels (shape + CRC32, ~10 ms for 3000x3000 RGB)."""
    return tile_rgb.shape, zlib.crc32(np.ascontiguousarray(tile_rgb).data)


class LastTileResults:
    """The last result stored under each key, returned only for the tile it was computed on.

    One entry per key keeps memory at one result per producer, whatever the number of tiles. Values are
    shared, not copied: treat them as read-only.
    """

    def __init__(self) -> None:
        self._entries: dict[Hashable, tuple[Hashable, Any]] = {}
        self._lock = threading.Lock()

    def put(self, key: Hashable, fingerprint: Hashable, value: Any) -> None:
        with self._lock:
            self._entries[key] = (fingerprint, value)

    def get(self, key: Hashable, fingerprint: Hashable) -> Any | None:
        with self._lock:
            entry = self._entries.get(key)
        return entry[1] if entry is not None and entry[0] == fingerprint else None
