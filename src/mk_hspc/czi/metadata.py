"""What a slide is (pixel size, extent, scenes, pixel type, pyramid), derived from its subblocks and XML.

Geometry comes from the subblock directory as libCZI enumerates it (the ground truth its pixel reads use),
not from a reader library's summary: libCZI-based readers disagree on scenes (aicspylibczi 4.0.1 reports
one scene for a three-scene file). Only layer-0 (full-resolution) subblocks define boxes; pyramid
subblocks never do.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ElementTree
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from mk_hspc.czi.errors import CziSlideError
from mk_hspc.czi.native import SubblockEntry

METRES_TO_UM = 1e6
# Where a slide's pixel size came from (SlideMeta.pixel_size_source).
SOURCE_METADATA = "metadata"
SOURCE_OVERRIDE_MISSING = "override: missing metadata"  # globals: pixel_size_um_override
SOURCE_OVERRIDE_PER_SLIDE = "override: per-slide"  # globals: pixel_size_um_by_slide
SUPPORTED_PIXEL_TYPES = ("Bgr24", "Bgr48", "Gray8", "Gray16")
# Bits per sample of each pixel type, used when the XML does not state ComponentBitCount.
CONTAINER_BITS = {"Gray8": 8, "Bgr24": 8, "Gray16": 16, "Bgr48": 16}


@dataclass(frozen=True)
class Box:
    """An axis-aligned rectangle in absolute CZI pixels (full resolution; x, y may be negative)."""

    x: int
    y: int
    w: int
    h: int

    @property
    def x_end(self) -> int:
        return self.x + self.w

    @property
    def y_end(self) -> int:
        return self.y + self.h

    def intersects(self, other: Box) -> bool:
        return self.x < other.x_end and other.x < self.x_end and self.y < other.y_end and other.y < self.y_end


@dataclass(frozen=True)
class SlideMeta:
    """Facts about one slide that every later stage needs; JSON-friendly through `to_dict`."""

    name: str
    path: str
    pixel_size_um: float
    pixel_size_source: str
    bbox: Box
    scenes: tuple[Box, ...]
    pixel_type: str
    has_pyramid: bool
    compression: str
    file_id: str = ""  # the file's header GUID and size (CziFileLayout.file_id): tiles record it

    def to_dict(self) -> dict:
        """Plain dict (boxes as ``{"x", "y", "w", "h"}``), e.g. for ``slide_meta.json``."""
        return asdict(self) | {"scenes": [asdict(scene) for scene in self.scenes]}


def union_box(entries: list[SubblockEntry]) -> Box:
    x0 = min(entry.x for entry in entries)
    y0 = min(entry.y for entry in entries)
    x1 = max(entry.x + entry.w for entry in entries)
    y1 = max(entry.y + entry.h for entry in entries)
    return Box(x0, y0, x1 - x0, y1 - y0)


def scene_boxes(layer0: list[SubblockEntry]) -> tuple[Box, ...]:
    """One box per scene index, in scene order; a file without an S dimension is one scene."""
    by_scene: dict[int, list[SubblockEntry]] = {}
    for entry in layer0:
        by_scene.setdefault(entry.coords.get("S", 0), []).append(entry)
    return tuple(union_box(by_scene[scene]) for scene in sorted(by_scene))


def parse_xml(path: str, xml: str) -> ElementTree.Element | None:
    """The metadata XML as an element tree (None for a file without metadata)."""
    if not xml.strip():
        return None
    try:
        return ElementTree.fromstring(xml)
    except ElementTree.ParseError as error:
        raise CziSlideError(path, f"corrupt XML metadata ({error})") from None


def pixel_size_from_xml(root: ElementTree.Element | None) -> float | None:
    """Pixel width in µm from ``Scaling/Items/Distance[@Id='X']/Value`` (metres per pixel), or None.

    None when the element is missing, empty, zero, negative or not a number: all of these mean the
    microscope did not record a calibration (e.g. files written by tools that do not set it).
    """
    if root is None:
        return None
    value = root.find("./Metadata/Scaling/Items/Distance[@Id='X']/Value")
    if value is None:
        value = root.find(".//Scaling/Items/Distance[@Id='X']/Value")
    if value is None or value.text is None:
        return None
    try:
        metres = float(value.text)
    except ValueError:
        return None
    if not math.isfinite(metres) or metres <= 0:
        return None
    return metres * METRES_TO_UM


def bit_depth_from_xml(root: ElementTree.Element | None, channel: int, pixel_type: str) -> int:
    """Significant bits per sample of ``channel`` (``ComponentBitCount``), else the container's width.

    Cameras often store 12 or 14 significant bits in a 16-bit container; using the recorded depth maps
    the camera's full range to 0..255 instead of a nearly black image.
    """
    container_bits = CONTAINER_BITS.get(pixel_type, 8)
    if root is None:
        return container_bits
    channels = root.findall(".//Information/Image/Dimensions/Channels/Channel")
    candidates = []
    if channel < len(channels):
        candidates.append(channels[channel].find("ComponentBitCount"))
    candidates.append(root.find(".//Information/Image/ComponentBitCount"))
    for element in candidates:
        if element is not None and element.text and element.text.strip().isdigit():
            bits = int(element.text.strip())
            if 8 <= bits <= container_bits:
                return bits
    return container_bits


def channel_pixel_types(subblocks: Sequence[SubblockEntry]) -> dict[int, str]:
    """Pixel type of every channel index (layer-0 subblocks)."""
    types: dict[int, str] = {}
    for entry in subblocks:
        if entry.is_layer0:
            types.setdefault(entry.coords.get("C", 0), entry.pixel_type)
    return types


def resolve_pixel_size(
    path: str,
    root: ElementTree.Element | None,
    override_um: float | None,
    replace_um: float | None = None,
) -> tuple[float, str]:
    """The slide's pixel size in µm and where it came from (one of the ``SOURCE_*`` strings).

    ``replace_um`` (a per-slide override, ``globals: pixel_size_um_by_slide``) wins over everything: it is
    how a file with a wrong calibration is corrected. Otherwise the metadata value is used, and
    ``override_um`` (one value for a whole study, ``globals: pixel_size_um_override``) only fills in where
    the file has none, so a calibrated file keeps its own calibration even when it is set.
    """
    if replace_um is not None:
        return _positive(path, replace_um, "pixel_size_um_by_slide"), SOURCE_OVERRIDE_PER_SLIDE
    from_xml = pixel_size_from_xml(root)
    if from_xml is not None:
        return from_xml, SOURCE_METADATA
    if override_um is None:
        raise CziSlideError(
            path,
            "no pixel size in the CZI scaling metadata (Scaling/Items/Distance[@Id='X'] missing or 0); "
            "set `pixel_size_um_override` (all such files) or `pixel_size_um_by_slide` (this slide) in "
            "conf/local/globals.yml to the slide's µm per pixel",
        )
    return _positive(path, override_um, "pixel_size_um_override"), SOURCE_OVERRIDE_MISSING


def _positive(path: str, value: float, key: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not (math.isfinite(value) and value > 0)
    ):
        raise CziSlideError(path, f"{key} must be a positive number of µm per pixel, got {value!r}")
    return float(value)


BRIGHTFIELD_PIXEL_TYPES = ("Bgr24", "Bgr48")


def check_brightfield(meta: SlideMeta) -> None:
    """Raise `CziSlideError` for a slide that is not a brightfield RGB image (a grey, e.g. fluorescence, scan).

    Tissue detection scores optical density against white glass and the segmenters unmix H&E: a dark-
    background grey slide became 100 % "tissue", and pooled into the study's one tissue threshold it moved
    the threshold for every other slide (a real Gray16 mosaic took a brightfield slide from 42 % to 0 %).
    """
    if meta.pixel_type not in BRIGHTFIELD_PIXEL_TYPES:
        raise CziSlideError(
            meta.path,
            f"is a {meta.pixel_type} (grey, e.g. fluorescence) image; mk-hspc reads brightfield RGB slides "
            f"({' or '.join(BRIGHTFIELD_PIXEL_TYPES)}, e.g. H&E); remove it from the slides folder or set "
            "ingestion.skip_bad_slides: true",
        )


def check_plausible_pixel_size(meta: SlideMeta, plausible_um: tuple[float, float]) -> None:
    """Raise `CziSlideError` when ``meta.pixel_size_um`` lies outside ``plausible_um`` (inclusive).

    A malformed range is a configuration error (`ValueError`), not a bad slide.

    A brightfield scan of a slide has a pixel size of a few hundredths to a few µm; a value outside the
    range is a wrong calibration (a unit slip, a preview image) and every µm-based result from it would be
    silently wrong. The message says where the value came from and how to correct it.
    """
    if not (
        len(plausible_um) == 2
        and all(math.isfinite(v) and v > 0 for v in plausible_um)
        and plausible_um[0] < plausible_um[1]
    ):
        raise ValueError(
            f"ingestion.plausible_pixel_size_um must be [low, high] with 0 < low < high, got {plausible_um!r}"
        )
    low, high = plausible_um
    value = meta.pixel_size_um
    if low <= value <= high:
        return
    where = f"plausible range {low:g}-{high:g} µm/px for brightfield (ingestion.plausible_pixel_size_um)"
    if meta.pixel_size_source == SOURCE_METADATA:
        raise CziSlideError(
            meta.path,
            f"the CZI metadata says {value:.6g} µm per pixel, outside the {where}. If the file's calibration "
            f"is wrong, set the true value for this slide in conf/local/globals.yml: "
            f"pixel_size_um_by_slide: {{{meta.name}: <µm per pixel>}}",
        )
    key = (
        "pixel_size_um_by_slide"
        if meta.pixel_size_source == SOURCE_OVERRIDE_PER_SLIDE
        else "pixel_size_um_override"
    )
    raise CziSlideError(
        meta.path,
        f"the pixel size {value:.6g} µm per pixel set by {key} ({meta.pixel_size_source}) is outside the "
        f"{where}; correct {key} in globals.yml",
    )


def build_meta(
    path: str,
    subblocks: Sequence[SubblockEntry],
    xml_root: ElementTree.Element | None,
    channel: int,
    pixel_size_um: float | None,
    replace_pixel_size_um: float | None = None,
) -> SlideMeta:
    """Assemble `SlideMeta` for ``channel``; raises `CziSlideError` for unusable files.

    ``pixel_size_um`` and ``replace_pixel_size_um`` are `resolve_pixel_size`'s ``override_um`` and
    ``replace_um``.
    """
    layer0 = [entry for entry in subblocks if entry.is_layer0]
    if not layer0:
        raise CziSlideError(path, "has pyramid subblocks but no full-resolution (layer 0) subblocks")
    types = channel_pixel_types(subblocks)
    if channel not in types:
        raise CziSlideError(path, f"has no channel {channel} (channels: {sorted(types)})")
    pixel_type = types[channel]
    if pixel_type not in SUPPORTED_PIXEL_TYPES:
        raise CziSlideError(
            path, f"pixel type {pixel_type} is not supported (supported: {', '.join(SUPPORTED_PIXEL_TYPES)})"
        )
    size_um, source = resolve_pixel_size(path, xml_root, pixel_size_um, replace_pixel_size_um)
    compressions = sorted({entry.compression for entry in layer0})
    return SlideMeta(
        name=Path(path).stem,
        path=path,
        pixel_size_um=size_um,
        pixel_size_source=source,
        bbox=union_box(layer0),
        scenes=scene_boxes(layer0),
        pixel_type=pixel_type,
        has_pyramid=len(layer0) < len(subblocks),
        compression="+".join(compressions),
    )
