"""Up-front checks of a CZI file that libCZI lacks, read with plain I/O; and raw subblock bytes for tests.

libCZI (through pylibCZIrw) enumerates the subblocks and reads the metadata and pixels, and it rejects an
empty, non-CZI or directory-less file with a clean error. Measured on damaged copies
(bench/czi_subblock_enumeration.py, docs/czi_reader.md) it misses two kinds of damage at open time:

- a file cut short after its directory (ZEN may write the directory before the pixels): libCZI opens it
  and fails only on the first read of a missing subblock, deep inside a run;
- a malformed directory entry: libCZI silently stops enumerating there, so the rest of the slide reads
  as background without any error.

`check_file` catches both by reading the file header, the directory's entry count and each entry's file
position (not its coordinates: those come from libCZI), and the last subblock's segment header, i.e. a
few hundred kilobytes at most. Layout per the ZISRAW (CZI) file-format specification: every segment
starts with a 32-byte header (16-byte ASCII id, allocated size, used size).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mk_hspc.czi.errors import CziSlideError
from mk_hspc.czi.native import SubblockEntry

SEGMENT_HEADER_BYTES = 32
_FILE_MAGIC = b"ZISRAWFILE"
_DIRECTORY_MAGIC = b"ZISRAWDIRECTORY"
_SUBBLOCK_MAGIC = b"ZISRAWSUBBLOCK"
# FileHeader data: Major, Minor, 2 x reserved, 2 GUIDs, FilePart, DirectoryPosition, MetadataPosition,
# UpdatePending, AttachmentDirectoryPosition.
_FILE_HEADER = struct.Struct("<iiii16s16siqqiq")
_DIRECTORY_FIXED_BYTES = 128  # EntryCount (int32) + 124 reserved bytes
# DirectoryEntryDV: SchemaType "DV", PixelType, FilePosition, FilePart, Compression, PyramidType, 5 spare,
# DimensionCount; followed by DimensionCount x 20-byte DimensionEntryDV.
_ENTRY = struct.Struct("<2siqiiB5xi")
_ENTRY_POSITION = struct.Struct("<q")  # FilePosition, at byte 6 of an entry
_ENTRY_POSITION_OFFSET = 6
_ENTRY_DIMENSION_COUNT = struct.Struct("<i")  # DimensionCount, the entry's last fixed field
_DIMENSION_BYTES = 20
_SUBBLOCK_FIXED = struct.Struct("<iiq")  # MetadataSize, AttachmentSize, DataSize
_SUBBLOCK_MIN_HEADER_BYTES = 256  # fixed part + directory entry are padded to at least this
_MAX_DIMENSIONS = 64  # a sanity bound: real files carry about 10 dimension entries per subblock

# numpy dtype and samples per pixel of the pixel types whose raw bytes `read_raw_subblock` can interpret.
_RAW_LAYOUT: dict[str, tuple[str, int]] = {
    "Gray8": ("u1", 1),
    "Gray16": ("<u2", 1),
    "Gray32Float": ("<f4", 1),
    "Bgr24": ("u1", 3),
    "Bgr48": ("<u2", 3),
}


@dataclass(frozen=True)
class CziFileLayout:
    """What `check_file` found: where the segments are, not what the subblocks hold.

    Attributes:
        path: The file.
        file_size: Its size in bytes.
        metadata_position: Byte offset of the XML metadata segment, 0 when the file has none.
        subblock_positions: Byte offset of every subblock segment, in directory order (libCZI's index).
        file_guid: The header's FileGuid (hex): a scanner or writer gives every written file its own.
    """

    path: str
    file_size: int
    metadata_position: int
    subblock_positions: tuple[int, ...]
    file_guid: str = ""

    @property
    def file_id(self) -> str:
        """Identity of the file's content for fingerprints: GUID and size (a replaced or re-exported slide
        under the same name differs; a copy or a move does not)."""
        return f"{self.file_guid}:{self.file_size}"


def file_identity(path: str | Path) -> str:
    """:attr:`CziFileLayout.file_id` from the file header alone (one small read, also for 20 GB slides), for
    provenance; a file that is not a readable CZI gets its size and modification time instead (the
    ingestion nodes, not provenance, report what is wrong with it)."""
    path = Path(path)
    try:
        stat = path.stat()
        with open(path, "rb") as handle:
            head = handle.read(SEGMENT_HEADER_BYTES + _FILE_HEADER.size)
    except OSError as error:
        return f"unreadable:{error.errno}"
    if _segment_id(head) != _FILE_MAGIC or len(head) < SEGMENT_HEADER_BYTES + _FILE_HEADER.size:
        return f"not-czi:{stat.st_size}:{stat.st_mtime_ns}"
    file_guid = _FILE_HEADER.unpack_from(head, SEGMENT_HEADER_BYTES)[5]
    return f"{file_guid.hex()}:{stat.st_size}"


def _read_at(handle, position: int, n_bytes: int) -> bytes:
    handle.seek(position)
    return handle.read(n_bytes)


def _segment_id(header: bytes) -> bytes:
    return header[:16].rstrip(b"\0")


def check_file(path: str | Path) -> CziFileLayout:
    """Check what libCZI does not before it opens the file: magic, directory entries, truncation.

    Checks: the file exists and is non-empty; it starts with the ``ZISRAWFILE`` magic; the directory
    segment lies inside the file and carries its magic; every directory entry is well formed (schema
    ``DV``, a sane dimension count); the last subblock segment and the metadata segment start inside the
    file and the last subblock ends inside it (a file cut short loses its tail first).

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
        return _check(path, handle, file_size)
    finally:
        handle.close()


def _check(path: Path, handle, file_size: int) -> CziFileLayout:
    if file_size == 0:
        raise CziSlideError(path, "empty file (0 bytes), not a CZI image")
    head = _read_at(handle, 0, SEGMENT_HEADER_BYTES + _FILE_HEADER.size)
    if _segment_id(head) != _FILE_MAGIC:
        raise CziSlideError(
            path, f"not a CZI file: it starts with {head[:10]!r}, a CZI file starts with {_FILE_MAGIC!r}"
        )
    if len(head) < SEGMENT_HEADER_BYTES + _FILE_HEADER.size:
        raise CziSlideError(path, f"truncated: only {file_size} bytes, too short for the CZI file header")
    _, _, _, _, _, file_guid, _, directory_position, metadata_position, _, _ = _FILE_HEADER.unpack_from(
        head, SEGMENT_HEADER_BYTES
    )
    if directory_position <= 0 or directory_position + SEGMENT_HEADER_BYTES + 4 > file_size:
        raise CziSlideError(
            path,
            f"truncated or corrupt: the subblock directory should start at byte {directory_position} "
            f"but the file has {file_size} bytes",
        )
    directory_head = _read_at(handle, directory_position, SEGMENT_HEADER_BYTES + _DIRECTORY_FIXED_BYTES)
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
    positions = _entry_positions(
        path, _read_at(handle, entries_start, entries_end - entries_start), n_entries
    )
    _check_last_subblock(path, handle, file_size, positions)
    if metadata_position and metadata_position + SEGMENT_HEADER_BYTES > file_size:
        raise CziSlideError(
            path, f"truncated: the metadata segment should start at byte {metadata_position} of {file_size}"
        )
    return CziFileLayout(str(path), file_size, metadata_position, positions, file_guid.hex())


def _entry_positions(path: Path, blob: bytes, n_entries: int) -> tuple[int, ...]:
    """FilePosition of every directory entry; entries are variable-length, so each one is walked."""
    positions = []
    offset = 0
    for index in range(n_entries):
        if offset + _ENTRY.size > len(blob):
            raise CziSlideError(
                path, f"truncated: the subblock directory ends after {index} of {n_entries} entries"
            )
        (n_dims,) = _ENTRY_DIMENSION_COUNT.unpack_from(blob, offset + _ENTRY.size - 4)
        if blob[offset : offset + 2] != b"DV" or not 0 < n_dims <= _MAX_DIMENSIONS:
            raise CziSlideError(path, f"corrupt: subblock directory entry {index} is malformed")
        positions.append(_ENTRY_POSITION.unpack_from(blob, offset + _ENTRY_POSITION_OFFSET)[0])
        offset += _ENTRY.size + n_dims * _DIMENSION_BYTES
    if offset > len(blob):
        raise CziSlideError(path, f"truncated: the subblock directory ends inside entry {n_entries - 1}")
    return tuple(positions)


def _subblock_layout(handle, position: int) -> tuple[int, int, int]:
    """Return (data offset, data size, segment end) of the subblock segment at ``position``, or -1s."""
    head = _read_at(handle, position, SEGMENT_HEADER_BYTES + _SUBBLOCK_FIXED.size + _ENTRY.size)
    if (
        len(head) < SEGMENT_HEADER_BYTES + _SUBBLOCK_FIXED.size + _ENTRY.size
        or _segment_id(head) != _SUBBLOCK_MAGIC
    ):
        return -1, -1, -1
    metadata_size, attachment_size, data_size = _SUBBLOCK_FIXED.unpack_from(head, SEGMENT_HEADER_BYTES)
    (n_dims,) = struct.unpack_from("<i", head, SEGMENT_HEADER_BYTES + _SUBBLOCK_FIXED.size + _ENTRY.size - 4)
    entry_bytes = _ENTRY.size + n_dims * _DIMENSION_BYTES
    fixed = max(_SUBBLOCK_MIN_HEADER_BYTES, _SUBBLOCK_FIXED.size + entry_bytes)
    data_offset = position + SEGMENT_HEADER_BYTES + fixed + metadata_size
    return data_offset, data_size, data_offset + data_size + attachment_size


def _check_last_subblock(path: Path, handle, file_size: int, positions: tuple[int, ...]) -> None:
    index, position = max(enumerate(positions), key=lambda item: item[1])
    if position + SEGMENT_HEADER_BYTES > file_size:
        raise CziSlideError(
            path, f"truncated: subblock {index} should start at byte {position} of {file_size}"
        )
    _, _, segment_end = _subblock_layout(handle, position)
    if segment_end < 0:
        raise CziSlideError(path, f"corrupt: no subblock segment at byte {position}")
    if segment_end > file_size:
        raise CziSlideError(
            path,
            f"truncated: the last subblock ends at byte {segment_end} but the file has {file_size} bytes",
        )


def subblock_data_range(path: str | Path, index: int) -> tuple[int, int]:
    """Byte offset and size of subblock ``index``'s (possibly compressed) pixel data in the file.

    For tests that damage a subblock's payload on purpose; pylibCZIrw exposes no file positions.
    """
    layout = check_file(path)
    with open(path, "rb") as handle:
        data_offset, data_size, _ = _subblock_layout(handle, layout.subblock_positions[index])
    if data_offset < 0:
        raise CziSlideError(path, f"corrupt: no subblock segment at byte {layout.subblock_positions[index]}")
    return data_offset, data_size


def read_raw_subblock(path: str | Path, entry: SubblockEntry) -> np.ndarray:
    """Return the stored pixels of one uncompressed subblock, ``(stored_h, stored_w, samples)``.

    This bypasses libCZI entirely (samples are in file order, i.e. B, G, R for Bgr24), so tests and
    benchmarks can check what libCZI composes against the bytes on disk, e.g. that a half-resolution read
    is served from a pyramid subblock. pylibCZIrw has no call that returns one subblock's stored bytes.
    """
    if entry.compression != "Uncompressed" or entry.pixel_type not in _RAW_LAYOUT:
        raise ValueError(
            f"raw access needs an uncompressed subblock, got {entry.compression} {entry.pixel_type}"
        )
    dtype, samples = _RAW_LAYOUT[entry.pixel_type]
    data_offset, data_size = subblock_data_range(path, entry.index)
    expected = entry.stored_w * entry.stored_h * samples * np.dtype(dtype).itemsize
    if data_size < expected:
        raise CziSlideError(path, f"corrupt: subblock {entry.index} holds {data_size} of {expected} bytes")
    with open(path, "rb") as handle:
        raw = _read_at(handle, data_offset, expected)
    return np.frombuffer(raw, dtype=dtype).reshape(entry.stored_h, entry.stored_w, samples)
