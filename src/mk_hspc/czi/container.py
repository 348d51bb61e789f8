"""The CZI container itself: file header, subblock directory and metadata segment, read with plain I/O.

libCZI decodes and composes pixels, but it accepts a half-written file at open time and only fails on the
first read deep inside a run. Parsing the (small) header and directory here first lets `open_slide` reject a
corrupt, truncated or non-CZI file up front with a message that says why, and gives every higher layer the
per-subblock facts (pyramid layers, scenes, compression) without decoding a pixel. Layout per the ZISRAW
(CZI) file-format specification: every segment starts with a 32-byte header (16-byte ASCII id, allocated
size, used size).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mk_hspc.czi.errors import CziSlideError

SEGMENT_HEADER_BYTES = 32
_FILE_MAGIC = b"ZISRAWFILE"
_DIRECTORY_MAGIC = b"ZISRAWDIRECTORY"
_SUBBLOCK_MAGIC = b"ZISRAWSUBBLOCK"
_METADATA_MAGIC = b"ZISRAWMETADATA"
# FileHeader data: Major, Minor, 2 x reserved, 2 GUIDs, FilePart, DirectoryPosition, MetadataPosition,
# UpdatePending, AttachmentDirectoryPosition.
_FILE_HEADER = struct.Struct("<iiii16s16siqqiq")
_DIRECTORY_FIXED_BYTES = 128  # EntryCount (int32) + 124 reserved bytes
# DirectoryEntryDV: SchemaType "DV", PixelType, FilePosition, FilePart, Compression, PyramidType, 5 spare,
# DimensionCount; followed by DimensionCount x DimensionEntryDV.
_ENTRY = struct.Struct("<2siqiiB5xi")
_DIMENSION = struct.Struct("<4siifi")  # Dimension, Start, Size, StartCoordinate, StoredSize
_SUBBLOCK_FIXED = struct.Struct("<iiq")  # MetadataSize, AttachmentSize, DataSize
_SUBBLOCK_MIN_HEADER_BYTES = 256  # fixed part + directory entry are padded to at least this
_METADATA_DATA_BYTES = 256  # XmlSize, AttachmentSize, 248 spare
_MAX_DIMENSIONS = 64  # a sanity bound: real files carry about 10 dimension entries per subblock

PIXEL_TYPES: dict[int, str] = {
    0: "Gray8",
    1: "Gray16",
    2: "Gray32Float",
    3: "Bgr24",
    4: "Bgr48",
    8: "Bgr96Float",
    9: "Bgra32",
    10: "Gray64ComplexFloat",
    11: "Bgr192ComplexFloat",
    12: "Gray32",
    13: "Gray64",
}
COMPRESSIONS: dict[int, str] = {0: "Uncompressed", 1: "Jpg", 2: "Lzw", 4: "JpgXr", 5: "Zstd0", 6: "Zstd1"}
# numpy dtype and samples per pixel of the pixel types whose raw bytes `read_raw_subblock` can interpret.
_RAW_LAYOUT: dict[str, tuple[str, int]] = {
    "Gray8": ("u1", 1),
    "Gray16": ("<u2", 1),
    "Gray32Float": ("<f4", 1),
    "Bgr24": ("u1", 3),
    "Bgr48": ("<u2", 3),
}


@dataclass(frozen=True)
class SubblockEntry:
    """One subblock as the directory describes it (no pixels).

    Attributes:
        index: Position in the directory (libCZI uses the same numbering).
        file_position: Byte offset of the subblock segment.
        pixel_type: e.g. ``"Bgr24"``.
        compression: e.g. ``"Zstd1"``.
        x, y, w, h: Logical rectangle in absolute CZI pixels (full resolution).
        stored_w, stored_h: Stored bitmap size; smaller than ``w, h`` for pyramid subblocks.
        coords: Start index of every other dimension present (``"C"``, ``"S"``, ``"M"``, ...).
    """

    index: int
    file_position: int
    pixel_type: str
    compression: str
    x: int
    y: int
    w: int
    h: int
    stored_w: int
    stored_h: int
    coords: dict[str, int] = field(default_factory=dict)

    @property
    def zoom(self) -> float:
        """Stored / logical size: 1.0 on layer 0, e.g. 0.5 for a 2x pyramid subblock."""
        return self.stored_w / self.w if self.w >= self.h else self.stored_h / self.h

    @property
    def is_layer0(self) -> bool:
        return self.stored_w == self.w and self.stored_h == self.h


@dataclass(frozen=True)
class CziContainer:
    """Validated header facts and the full subblock directory of one file."""

    path: str
    file_size: int
    version: tuple[int, int]
    metadata_position: int
    subblocks: tuple[SubblockEntry, ...]


def _read_exact(handle, position: int, n_bytes: int) -> bytes:
    handle.seek(position)
    return handle.read(n_bytes)


def _segment_id(header: bytes) -> bytes:
    return header[:16].rstrip(b"\0")


def read_container(path: str | Path) -> CziContainer:
    """Read and validate the file header and the subblock directory.

    Checks: the file exists and is non-empty; it starts with the ``ZISRAWFILE`` magic; the directory
    segment lies inside the file and carries its magic; every directory entry is well formed; the last
    subblock segment ends inside the file (a file cut short loses its tail first). It reads a few hundred
    kilobytes at most, whatever the slide size.

    Raises:
        CziSlideError: naming the file and what is wrong with it.
    """
    path = Path(path)
    try:
        file_size = os.path.getsize(path)
        handle = open(path, "rb")  # noqa: SIM115 - closed in the finally below
    except FileNotFoundError:
        raise CziSlideError(path, "file does not exist") from None
    except IsADirectoryError:
        raise CziSlideError(path, "is a directory, not a CZI file") from None
    except OSError as error:
        raise CziSlideError(path, f"cannot be read ({error.strerror or error})") from None
    try:
        return _parse(path, handle, file_size)
    finally:
        handle.close()


def _parse(path: Path, handle, file_size: int) -> CziContainer:
    if file_size == 0:
        raise CziSlideError(path, "empty file (0 bytes), not a CZI image")
    head = _read_exact(handle, 0, SEGMENT_HEADER_BYTES + _FILE_HEADER.size)
    if _segment_id(head) != _FILE_MAGIC:
        raise CziSlideError(
            path, f"not a CZI file: it starts with {head[:10]!r}, a CZI file starts with {_FILE_MAGIC!r}"
        )
    if len(head) < SEGMENT_HEADER_BYTES + _FILE_HEADER.size:
        raise CziSlideError(path, f"truncated: only {file_size} bytes, too short for the CZI file header")
    major, minor, _, _, _, _, _, directory_position, metadata_position, _, _ = _FILE_HEADER.unpack_from(
        head, SEGMENT_HEADER_BYTES
    )
    if directory_position <= 0 or directory_position + SEGMENT_HEADER_BYTES + 4 > file_size:
        raise CziSlideError(
            path,
            f"truncated or corrupt: the subblock directory should start at byte {directory_position} "
            f"but the file has {file_size} bytes",
        )
    directory_head = _read_exact(handle, directory_position, SEGMENT_HEADER_BYTES + _DIRECTORY_FIXED_BYTES)
    if _segment_id(directory_head) != _DIRECTORY_MAGIC:
        raise CziSlideError(
            path,
            f"corrupt: no subblock directory (segment {_DIRECTORY_MAGIC.decode()}) at byte {directory_position}",
        )
    (used_size,) = struct.unpack_from("<q", directory_head, 24)
    (n_entries,) = struct.unpack_from("<i", directory_head, SEGMENT_HEADER_BYTES)
    entries_start = directory_position + SEGMENT_HEADER_BYTES + _DIRECTORY_FIXED_BYTES
    # UsedSize may be 0 in old writers; then the entries run to the end of the file at most.
    entries_end = directory_position + SEGMENT_HEADER_BYTES + used_size if used_size > 0 else file_size
    if n_entries < 0 or entries_end > file_size:
        raise CziSlideError(
            path,
            f"truncated: the subblock directory at byte {directory_position} needs {used_size} bytes "
            f"but the file has {file_size} bytes",
        )
    if n_entries == 0:
        raise CziSlideError(path, "contains no image subblocks")
    blob = _read_exact(handle, entries_start, entries_end - entries_start)
    subblocks = _parse_entries(path, blob, n_entries)
    _check_last_subblock(path, handle, file_size, subblocks)
    if metadata_position and metadata_position + SEGMENT_HEADER_BYTES > file_size:
        raise CziSlideError(
            path, f"truncated: the metadata segment should start at byte {metadata_position} of {file_size}"
        )
    return CziContainer(str(path), file_size, (major, minor), metadata_position, subblocks)


def _parse_entries(path: Path, blob: bytes, n_entries: int) -> tuple[SubblockEntry, ...]:
    entries = []
    offset = 0
    for index in range(n_entries):
        if offset + _ENTRY.size > len(blob):
            raise CziSlideError(
                path, f"truncated: the subblock directory ends after {index} of {n_entries} entries"
            )
        schema, pixel_type, file_position, _, compression, _, n_dims = _ENTRY.unpack_from(blob, offset)
        offset += _ENTRY.size
        if schema != b"DV" or not 0 < n_dims <= _MAX_DIMENSIONS:
            raise CziSlideError(path, f"corrupt: subblock directory entry {index} is malformed")
        if offset + n_dims * _DIMENSION.size > len(blob):
            raise CziSlideError(path, f"truncated: the subblock directory ends inside entry {index}")
        coords: dict[str, int] = {}
        rect = {"X": (0, 0, 0), "Y": (0, 0, 0)}
        for _ in range(n_dims):
            name, start, size, _, stored_size = _DIMENSION.unpack_from(blob, offset)
            offset += _DIMENSION.size
            key = name.rstrip(b"\0 ").decode("ascii", "replace")
            if key in rect:
                rect[key] = (start, size, stored_size)
            else:
                coords[key] = start
        (x, w, stored_w), (y, h, stored_h) = rect["X"], rect["Y"]
        if w <= 0 or h <= 0 or stored_w <= 0 or stored_h <= 0:
            raise CziSlideError(path, f"corrupt: subblock {index} has an empty or negative size")
        entries.append(
            SubblockEntry(
                index=index,
                file_position=file_position,
                pixel_type=PIXEL_TYPES.get(pixel_type, f"Unknown{pixel_type}"),
                compression=COMPRESSIONS.get(compression, f"Unknown{compression}"),
                x=x,
                y=y,
                w=w,
                h=h,
                stored_w=stored_w,
                stored_h=stored_h,
                coords=coords,
            )
        )
    return tuple(entries)


def _subblock_layout(handle, entry: SubblockEntry) -> tuple[int, int, int, int]:
    """Return (data offset, data size, segment end, used size) of one subblock segment."""
    head = _read_exact(handle, entry.file_position, SEGMENT_HEADER_BYTES + _SUBBLOCK_FIXED.size + _ENTRY.size)
    if (
        len(head) < SEGMENT_HEADER_BYTES + _SUBBLOCK_FIXED.size + _ENTRY.size
        or _segment_id(head) != _SUBBLOCK_MAGIC
    ):
        return -1, -1, -1, -1
    metadata_size, attachment_size, data_size = _SUBBLOCK_FIXED.unpack_from(head, SEGMENT_HEADER_BYTES)
    (n_dims,) = struct.unpack_from("<i", head, SEGMENT_HEADER_BYTES + _SUBBLOCK_FIXED.size + _ENTRY.size - 4)
    entry_bytes = _ENTRY.size + n_dims * _DIMENSION.size
    fixed = max(_SUBBLOCK_MIN_HEADER_BYTES, _SUBBLOCK_FIXED.size + entry_bytes)
    data_offset = entry.file_position + SEGMENT_HEADER_BYTES + fixed + metadata_size
    segment_end = data_offset + data_size + attachment_size
    return data_offset, data_size, segment_end, fixed + metadata_size + data_size + attachment_size


def _check_last_subblock(path: Path, handle, file_size: int, subblocks: tuple[SubblockEntry, ...]) -> None:
    last = max(subblocks, key=lambda entry: entry.file_position)
    if last.file_position + SEGMENT_HEADER_BYTES > file_size:
        raise CziSlideError(
            path, f"truncated: subblock {last.index} should start at byte {last.file_position} of {file_size}"
        )
    _, _, segment_end, _ = _subblock_layout(handle, last)
    if segment_end < 0:
        raise CziSlideError(path, f"corrupt: no subblock segment at byte {last.file_position}")
    if segment_end > file_size:
        raise CziSlideError(
            path,
            f"truncated: the last subblock ends at byte {segment_end} but the file has {file_size} bytes",
        )


def read_metadata_xml(container: CziContainer) -> str:
    """Return the XML metadata document ("" when the file has none)."""
    if not container.metadata_position:
        return ""
    with open(container.path, "rb") as handle:
        head = _read_exact(handle, container.metadata_position, SEGMENT_HEADER_BYTES + 4)
        if _segment_id(head) != _METADATA_MAGIC:
            raise CziSlideError(
                container.path, f"corrupt: no metadata segment at byte {container.metadata_position}"
            )
        (xml_size,) = struct.unpack_from("<i", head, SEGMENT_HEADER_BYTES)
        xml_start = container.metadata_position + SEGMENT_HEADER_BYTES + _METADATA_DATA_BYTES
        if xml_size < 0 or xml_start + xml_size > container.file_size:
            raise CziSlideError(container.path, "truncated: the XML metadata runs past the end of the file")
        return _read_exact(handle, xml_start, xml_size).decode("utf-8", "replace").rstrip("\0")


def subblock_data_range(container: CziContainer, entry: SubblockEntry) -> tuple[int, int]:
    """Byte offset and size of one subblock's (possibly compressed) pixel data in the file."""
    with open(container.path, "rb") as handle:
        data_offset, data_size, _, _ = _subblock_layout(handle, entry)
    if data_offset < 0:
        raise CziSlideError(container.path, f"corrupt: no subblock segment at byte {entry.file_position}")
    return data_offset, data_size


def read_raw_subblock(container: CziContainer, entry: SubblockEntry) -> np.ndarray:
    """Return the stored pixels of one uncompressed subblock, ``(stored_h, stored_w, samples)``.

    This bypasses libCZI entirely (samples are in file order, i.e. B, G, R for Bgr24), so tests and
    benchmarks can check what libCZI composes against the bytes on disk, e.g. that a half-resolution read
    is served from a pyramid subblock.
    """
    if entry.compression != "Uncompressed" or entry.pixel_type not in _RAW_LAYOUT:
        raise ValueError(
            f"raw access needs an uncompressed subblock, got {entry.compression} {entry.pixel_type}"
        )
    dtype, samples = _RAW_LAYOUT[entry.pixel_type]
    data_offset, data_size = subblock_data_range(container, entry)
    expected = entry.stored_w * entry.stored_h * samples * np.dtype(dtype).itemsize
    if data_size < expected:
        raise CziSlideError(
            container.path, f"corrupt: subblock {entry.index} holds {data_size} of {expected} bytes"
        )
    with open(container.path, "rb") as handle:
        raw = _read_exact(handle, data_offset, expected)
    return np.frombuffer(raw, dtype=dtype).reshape(entry.stored_h, entry.stored_w, samples)
