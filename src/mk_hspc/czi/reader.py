"""`CziSlide`: a lazy, thread-safe, picklable handle that reads RGB regions of a CZI slide at any scale.

Pixels are decoded and composed by libCZI through pylibCZIrw (chosen by measurement, see
docs/czi_reader.md). A read never touches more than the requested region: full-resolution reads go
straight to libCZI; low-resolution reads use the file's pyramid layer closest to (and not coarser than)
the requested scale and area-average the rest in horizontal strips, so peak memory is one strip plus the
output, whatever the region size.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mk_hspc.czi import pixels
from mk_hspc.czi.container import CziFileLayout, check_file
from mk_hspc.czi.errors import CziSlideError
from mk_hspc.czi.metadata import (
    SlideMeta,
    bit_depth_from_xml,
    build_meta,
    channel_pixel_types,
    parse_xml,
)
from mk_hspc.czi.native import NativeReader, SubblockEntry, plane_coordinate

THREAD_MODES = ("shared", "lock", "per_thread")
DOWNSAMPLE_METHODS = ("area", "nearest")
# libCZI treats all subblocks whose zoom is within this factor of the coarsest usable one as one layer.
_LAYER_SPAN = 1.9
# A pyramid layer this close to the requested scale serves it directly (stored sizes are rounded, so a
# "2x" layer can have zoom 0.4997).
_ZOOM_TOLERANCE = 0.02
_BYTES_PER_MIB = 2**20


def pyramid_layers(subblocks: Sequence[SubblockEntry], channel: int) -> tuple[float, ...]:
    """Minimum zoom of each pyramid layer of ``channel`` (finest first), layer 0 excluded.

    Subblocks within a factor `_LAYER_SPAN` of a layer's smallest zoom belong to it, as in libCZI.
    """
    zooms = sorted({e.zoom for e in subblocks if not e.is_layer0 and e.coords.get("C", 0) == channel})
    layers: list[float] = []
    for zoom in zooms:
        if not layers or zoom >= layers[-1] * _LAYER_SPAN:
            layers.append(zoom)
    return tuple(reversed(layers))


class CziSlide:
    """Lazy handle on one CZI slide; see `open_slide`.

    Attributes:
        meta: `SlideMeta` of the slide (for the channel chosen at open).
        channel: Channel read when `read_region` is not told otherwise.
    """

    def __init__(
        self,
        path: str | Path,
        pixel_size_um: float | None = None,
        *,
        replace_pixel_size_um: float | None = None,
        channel: int = 0,
        downsample: str = "area",
        area_supersample: int = 8,
        strip_mib: float = 64.0,
        cache_mib: float = 256.0,
        thread_mode: str = "shared",
    ) -> None:
        if downsample not in DOWNSAMPLE_METHODS:
            raise ValueError(f"downsample must be one of {DOWNSAMPLE_METHODS}, got {downsample!r}")
        if thread_mode not in THREAD_MODES:
            raise ValueError(f"thread_mode must be one of {THREAD_MODES}, got {thread_mode!r}")
        if strip_mib <= 0 or cache_mib < 0 or area_supersample < 1:
            raise ValueError("strip_mib must be > 0, cache_mib >= 0 and area_supersample >= 1")
        self._options = {
            "pixel_size_um": pixel_size_um,
            "replace_pixel_size_um": replace_pixel_size_um,
            "channel": channel,
            "downsample": downsample,
            "area_supersample": area_supersample,
            "strip_mib": strip_mib,
            "cache_mib": cache_mib,
            "thread_mode": thread_mode,
        }
        self.path = str(path)
        self.channel = channel
        self._downsample = downsample
        self._area_supersample = area_supersample
        self._strip_bytes = int(strip_mib * _BYTES_PER_MIB)
        self._cache_bytes = int(cache_mib * _BYTES_PER_MIB)
        self._thread_mode = thread_mode

        self._lock = threading.Lock()
        self._local = threading.local()
        self._handles: list[NativeReader] = []
        self._closed = False

        layout = check_file(path)  # what libCZI does not check (truncation, malformed directory entries)
        self._shared = self._open_native()  # opened now so a file libCZI rejects fails at open time
        try:
            subblocks = _checked_subblocks(self._shared, layout)
            xml_root = parse_xml(self.path, _metadata_xml(self._shared, layout))
            self.meta: SlideMeta = dataclasses.replace(
                build_meta(self.path, subblocks, xml_root, channel, pixel_size_um, replace_pixel_size_um),
                file_id=layout.file_id,
            )
        except BaseException:
            self.close()
            raise
        self._pixel_types = channel_pixel_types(subblocks)
        self._bit_depths = {c: bit_depth_from_xml(xml_root, c, t) for c, t in self._pixel_types.items()}
        self._layers = {c: pyramid_layers(subblocks, c) for c in self._pixel_types}
        self._planes = {c: plane_coordinate(subblocks, c) for c in self._pixel_types}
        self.n_subblocks = len(subblocks)

    # ------------------------------------------------------------------ native handles
    def _open_native(self) -> NativeReader:
        handle = _open_libczi(self.path, self._cache_bytes)
        with self._lock:
            self._handles.append(handle)
        return handle

    def _native(self) -> NativeReader:
        if self._closed:
            raise CziSlideError(self.path, "the slide handle is closed")
        if self._thread_mode != "per_thread":
            return self._shared
        handle = getattr(self._local, "handle", None)
        if handle is None:
            handle = self._local.handle = self._open_native()
        return handle

    # ------------------------------------------------------------------ public API
    @property
    def n_channels(self) -> int:
        return len(self._pixel_types)

    @property
    def bit_depth(self) -> int:
        """Significant bits per sample of the default channel (``ComponentBitCount``)."""
        return self._bit_depths[self.channel]

    def read_region(
        self, x: int, y: int, w: int, h: int, scale: float = 1.0, *, channel: int | None = None
    ) -> np.ndarray:
        """Read a region given in absolute full-resolution CZI pixels, resampled by ``scale``.

        Args:
            x, y: Top-left corner in the file's own pixel frame (may be negative).
            w, h: Size in full-resolution pixels.
            scale: Output pixels per full-resolution pixel, ``0 < scale <= 1``.
            channel: Channel to read (default: the one chosen at open).

        Returns:
            ``(round(h * scale), round(w * scale), 3)`` uint8 RGB. Pixels no subblock covers are white
            for RGB (brightfield glass) and black for grey (fluorescence) slides. Grey is replicated to
            three channels; 16-bit samples are mapped linearly from ``0 .. 2**bit_depth - 1`` to ``0 .. 255``.

        Raises:
            ValueError: for a non-positive size or a scale outside ``(0, 1]``.
            CziSlideError: when libCZI fails to decode the data (corrupt subblock) or the slide is closed.
        """
        channel = self.channel if channel is None else channel
        if channel not in self._pixel_types:
            raise ValueError(f"{self.path}: no channel {channel} (channels: {sorted(self._pixel_types)})")
        if w <= 0 or h <= 0:
            raise ValueError(f"region size must be positive, got w={w}, h={h}")
        if not 0 < scale <= 1:
            raise ValueError(f"scale must be in (0, 1], got {scale}")
        out = np.empty((round(h * scale), round(w * scale), 3), np.uint8)
        if out.size == 0:
            return out
        zoom = self._read_zoom(scale, channel)
        native = self._native()
        if self._thread_mode == "lock":
            with self._lock:
                self._fill(native, out, int(x), int(y), scale, zoom, channel)
        else:
            self._fill(native, out, int(x), int(y), scale, zoom, channel)
        return out

    def close(self) -> None:
        """Release the native reader(s); reading afterwards raises `CziSlideError`."""
        with self._lock:
            handles, self._handles = self._handles, []
            self._closed = True
        for handle in handles:
            handle.close()

    def __enter__(self) -> CziSlide:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __getstate__(self) -> dict:
        # Native handles cannot cross processes; a Dask worker re-opens the file by path.
        return {"path": self.path, "options": self._options}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], **state["options"])

    def __repr__(self) -> str:
        bbox = self.meta.bbox
        return (
            f"CziSlide({self.meta.name!r}, {bbox.w}x{bbox.h} px at ({bbox.x}, {bbox.y}), "
            f"{len(self.meta.scenes)} scene(s), {self.meta.pixel_size_um:.4g} um/px, {self.meta.pixel_type})"
        )

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            self.close()

    # ------------------------------------------------------------------ reading
    def _read_zoom(self, scale: float, channel: int) -> float:
        """The zoom to ask libCZI for; `_fill` area-averages from it down to ``scale``.

        libCZI paints the coarsest pyramid layer whose zoom is >= the requested zoom, nearest-neighbour
        resized to that zoom. So: a layer at (about) ``scale`` is read directly, 1:1; otherwise the read
        zoom is the finest usable layer but at most ``area_supersample * scale``, so each output pixel
        averages up to ``area_supersample**2`` samples: enough to suppress aliasing, while the bitmap
        libCZI writes (and the averaging) stays ``area_supersample**2`` times smaller than full resolution
        would be. "nearest" asks libCZI for ``scale`` itself (its own nearest-neighbour).
        """
        if scale == 1:
            return 1.0
        usable = [z for z in self._layers[channel] if z >= scale * (1 - _ZOOM_TOLERANCE)] + [1.0]
        layer_zoom = min(usable)
        if layer_zoom <= scale * (1 + _ZOOM_TOLERANCE):
            return min(scale, layer_zoom)  # served directly by a layer (rounded layers may be a hair coarser)
        if self._downsample == "nearest":
            return scale
        return min(layer_zoom, scale * self._area_supersample)

    def _fill(
        self,
        native: NativeReader,
        out: np.ndarray,
        x: int,
        y: int,
        scale: float,
        zoom: float,
        channel: int,
    ) -> None:
        """Read into ``out`` strip by strip: output rows ``[r0, r1)`` come from full-res rows
        ``y + round(r0 / scale) .. y + round(r1 / scale)``, read at ``zoom`` and area-averaged to fit."""
        out_h, out_w = out.shape[:2]
        pixel_type = self._pixel_types[channel]
        bytes_per_sample = 2 if pixel_type in ("Gray16", "Bgr48") else 1
        samples = 3 if pixel_type.startswith("Bgr") else 1
        src_w = round(out_w / scale)
        # Bytes of the libCZI bitmap per output row (it is reduced before any conversion copy).
        row_bytes = (src_w * zoom) * (zoom / scale) * samples * bytes_per_sample
        rows_per_strip = max(1, int(self._strip_bytes // max(row_bytes, 1)))
        plane = self._planes[channel]
        background = pixels.BACKGROUND_RGB01[pixel_type]
        bit_depth = self._bit_depths[channel]
        for r0 in range(0, out_h, rows_per_strip):
            r1 = min(out_h, r0 + rows_per_strip)
            y0, y1 = y + round(r0 / scale), y + round(r1 / scale)
            roi = (x, y0, src_w, max(1, y1 - y0))
            try:
                raw = native.read(roi, zoom, plane, pixel_type, background)
            except RuntimeError as error:
                raise CziSlideError(
                    self.path, f"reading region {roi} at zoom {zoom:.4g} failed ({error})"
                ) from None
            target = out[r0:r1]
            if raw.shape[0] == 0 or raw.shape[1] == 0:  # ROI thinner than one pixel at this zoom
                target[...] = np.uint8(255 * background[0])
            else:
                pixels.to_rgb8(pixels.fit_to(raw, r1 - r0, out_w), pixel_type, bit_depth, out=target)
            del raw  # free this strip before libCZI allocates the next one: peak memory stays one strip


def _open_libczi(path: str | Path, cache_bytes: int) -> NativeReader:
    try:
        return NativeReader(str(path), cache_bytes)
    except RuntimeError as error:
        raise CziSlideError(path, f"libCZI cannot open it ({error})") from None


def _checked_subblocks(native: NativeReader, layout: CziFileLayout) -> tuple[SubblockEntry, ...]:
    subblocks = native.subblocks()
    if len(subblocks) != len(layout.subblock_positions):
        # libCZI stops enumerating at an entry it cannot parse instead of failing; the rest would read
        # as background.
        raise CziSlideError(
            layout.path,
            f"corrupt: the subblock directory lists {len(layout.subblock_positions)} subblocks but libCZI "
            f"enumerates {len(subblocks)}",
        )
    return subblocks


def _metadata_xml(native: NativeReader, layout: CziFileLayout) -> str:
    if not layout.metadata_position:
        return ""  # libCZI raises for a file without a metadata segment; treat it as empty metadata
    try:
        return native.metadata_xml()
    except RuntimeError as error:
        raise CziSlideError(layout.path, f"libCZI cannot read the XML metadata ({error})") from None


def read_subblocks(path: str | Path) -> tuple[SubblockEntry, ...]:
    """Every subblock of a CZI file as libCZI enumerates it, after the same checks as `open_slide`.

    For tests and benchmarks that look at the stored layout (pyramid subblocks, tile overlaps).
    """
    layout = check_file(path)
    native = _open_libczi(path, cache_bytes=0)
    try:
        return _checked_subblocks(native, layout)
    finally:
        native.close()


def open_slide(path: str | Path, pixel_size_um: float | None = None, **options: object) -> CziSlide:
    """Open a CZI slide lazily (header, directory and metadata only; no pixels are read).

    Args:
        path: The ``.czi`` file.
        pixel_size_um: µm per pixel to use ONLY when the file has no scaling metadata; a calibrated file
            keeps its own value (``meta.pixel_size_source`` says which was used).
        **options: ``replace_pixel_size_um`` (µm per pixel that replaces the file's own value, to correct
            a wrong calibration; source ``"override: per-slide"``) and
            `CziSlide` keywords, all with measured defaults (bench/czi_reader_choice.py):
            ``channel`` (0); ``downsample`` (``"area"``: average, ``"nearest"``: libCZI's nearest
            neighbour); ``area_supersample`` (8: samples per output pixel and axis that "area" averages);
            ``strip_mib`` (64: bitmap budget per strip of a large read); ``cache_mib`` (256: libCZI cache
            of decoded compressed subblocks, 0 = off); ``thread_mode`` (``"shared"``: one native reader
            for all threads, ``"lock"``: one reader used by one thread at a time, ``"per_thread"``).

    Raises:
        CziSlideError: the file is missing, not a CZI, truncated, corrupt, has no usable pixel size or an
            unsupported pixel type; the message names the file and the reason. (Whether a pixel size is
            plausible is `check_plausible_pixel_size`'s call, not the reader's.)

    Example:
        >>> with open_slide("slide.czi") as slide:  # doctest: +SKIP
        ...     box = slide.meta.scenes[0]
        ...     thumb = slide.read_region(box.x, box.y, box.w, box.h, scale=1 / 32)
    """
    return CziSlide(path, pixel_size_um, **options)
