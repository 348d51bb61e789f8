"""CZI slide reading: lazy, thread-safe, picklable handles that return RGB regions in absolute CZI pixels."""

from mk_hspc.czi.errors import CziSlideError
from mk_hspc.czi.metadata import Box, SlideMeta, check_plausible_pixel_size
from mk_hspc.czi.reader import CziSlide, open_slide

__all__ = ["Box", "CziSlide", "CziSlideError", "SlideMeta", "check_plausible_pixel_size", "open_slide"]
