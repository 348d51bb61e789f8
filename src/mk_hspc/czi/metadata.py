"""What a slide is (pixel size, extent, scenes, pixel type, pyramid), derived from the container and its XML.

Geometry comes from the subblock directory rather than from a reader library: libCZI-based readers disagree
on scenes (aicspylibczi 4.0.1 reports one scene for a three-scene file) and the directory is the ground
truth they both read. Only layer-0 (full-resolution) subblocks define boxes; pyramid subblocks never do.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ElementTree
from dataclasses import asdict, dataclass
from pathlib import Path

from mk_hspc.czi.container import CziContainer, SubblockEntry
from mk_hspc.czi.errors import CziSlideError

METRES_TO_UM = 1e6
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


def channel_pixel_types(container: CziContainer) -> dict[int, str]:
    """Pixel type of every channel index (layer-0 subblocks)."""
    types: dict[int, str] = {}
    for entry in container.subblocks:
        if entry.is_layer0:
            types.setdefault(entry.coords.get("C", 0), entry.pixel_type)
    return types


def resolve_pixel_size(
    path: str, root: ElementTree.Element | None, override_um: float | None
) -> tuple[float, str]:
    """The metadata pixel size; the override only fills in where the file has none.

    The override is one value for a whole study (``globals: pixel_size_um_override``), so a calibrated
    file keeps its own calibration even when the override is set.
    """
    from_xml = pixel_size_from_xml(root)
    if from_xml is not None:
        return from_xml, "metadata"
    if override_um is None:
        raise CziSlideError(
            path,
            "no pixel size in the CZI scaling metadata (Scaling/Items/Distance[@Id='X'] missing or 0); "
            "set `pixel_size_um` in parameters (globals: pixel_size_um_override) to the slide's µm per pixel",
        )
    if not (math.isfinite(override_um) and override_um > 0):
        raise CziSlideError(path, f"pixel_size_um override must be a positive number, got {override_um!r}")
    return float(override_um), "override"


def build_meta(
    container: CziContainer, xml_root: ElementTree.Element | None, channel: int, pixel_size_um: float | None
) -> SlideMeta:
    """Assemble `SlideMeta` for ``channel``; raises `CziSlideError` for unusable files."""
    path = container.path
    layer0 = [entry for entry in container.subblocks if entry.is_layer0]
    if not layer0:
        raise CziSlideError(path, "has pyramid subblocks but no full-resolution (layer 0) subblocks")
    types = channel_pixel_types(container)
    if channel not in types:
        raise CziSlideError(path, f"has no channel {channel} (channels: {sorted(types)})")
    pixel_type = types[channel]
    if pixel_type not in SUPPORTED_PIXEL_TYPES:
        raise CziSlideError(
            path, f"pixel type {pixel_type} is not supported (supported: {', '.join(SUPPORTED_PIXEL_TYPES)})"
        )
    size_um, source = resolve_pixel_size(path, xml_root, pixel_size_um)
    compressions = sorted({entry.compression for entry in layer0})
    return SlideMeta(
        name=Path(path).stem,
        path=path,
        pixel_size_um=size_um,
        pixel_size_source=source,
        bbox=union_box(layer0),
        scenes=scene_boxes(layer0),
        pixel_type=pixel_type,
        has_pyramid=len(layer0) < len(container.subblocks),
        compression="+".join(compressions),
    )
