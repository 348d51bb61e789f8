"""Kedro dataset of a folder of CZI slides: ``{slide_name: loader}``, each loader opening one slide lazily.

Which files are slides and how they are named is `mk_hspc.czi.discovery.find_slides` (``.czi`` in any
letter case, recursively, named by file stem, equal stems an error). Loading lists the folder only; a loader
opens (and validates) its slide when called and returns a `CziSlide` handle, never pixels.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

from kedro.io.core import AbstractDataset, DatasetError

from mk_hspc.czi import CziSlide, open_slide
from mk_hspc.czi.container import file_identity
from mk_hspc.czi.discovery import find_slides
from mk_hspc.engine.fingerprint import digest
from mk_hspc.errors import UserError

SlideLoaders = dict[str, Callable[[], CziSlide]]
# `open_slide` options that change how fast pixels are read, never which pixels.
SPEED_OPTIONS = frozenset({"strip_mib", "cache_mib", "thread_mode"})


class UnknownSlideOverrideError(UserError, DatasetError):
    """``pixel_size_um_by_slide`` names a slide the folder does not hold (a typo would go unnoticed)."""


class SlideFolderDataset(AbstractDataset[None, SlideLoaders]):
    """Read-only dataset of every slide below a folder.

    Args:
        path: The slides folder (libCZI reads local files only).
        pixel_size_um: µm per pixel used only for files without scaling metadata (see `open_slide`).
        pixel_size_um_by_slide: ``{slide name: µm per pixel}`` that replaces those slides' own values
            (to correct a wrong calibration); naming a slide that is not in the folder is an error.
        load_args: Further `open_slide` keywords (``channel``, ``downsample``, ``strip_mib``,
            ``cache_mib``, ``thread_mode``).
        metadata: Free-form metadata, ignored by Kedro.

    Example:
        >>> loaders = SlideFolderDataset(path="data/01_raw/slides").load()  # doctest: +SKIP
        >>> with loaders["LAB01"]() as slide:  # doctest: +SKIP
        ...     slide.meta.pixel_size_um
        0.1725
    """

    def __init__(
        self,
        path: str,
        pixel_size_um: float | None = None,
        pixel_size_um_by_slide: Mapping[str, float] | None = None,
        load_args: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self._path = Path(path)
        self._pixel_size_um = pixel_size_um
        self._pixel_size_um_by_slide = dict(pixel_size_um_by_slide or {})
        self._load_args = dict(load_args or {})
        self.metadata = metadata

    def load(self) -> SlideLoaders:
        slides = find_slides(self._path)
        unknown = sorted(set(self._pixel_size_um_by_slide) - set(slides))
        if unknown:
            raise UnknownSlideOverrideError(
                f"pixel_size_um_by_slide names slide(s) {unknown} that are not in {self._path} "
                f"(slides: {sorted(slides)}); a slide is named by its file stem"
            )
        return {
            name: partial(
                open_slide,
                str(path),
                self._pixel_size_um,
                replace_pixel_size_um=self._pixel_size_um_by_slide.get(name),
                **self._load_args,
            )
            for name, path in slides.items()
        }

    def verified_manifest(self) -> dict[str, Any]:
        """What these slides are, for provenance (``mk_hspc.hooks``): each file's identity (header GUID and
        size: a slide replaced under the same name differs, a copy does not), its pixel-size override and the
        reading options that change pixels. Outputs built from them record its digest, so a node is refused
        when its inputs were built from other slides or other pixel sizes than the folder holds now."""
        slides = find_slides(self._path)
        record = {
            "slides": {
                name: {
                    "file": file_identity(path),
                    "pixel_size_um_override": self._pixel_size_um_by_slide.get(name),
                }
                for name, path in sorted(slides.items())
            },
            "pixel_size_um_without_metadata": self._pixel_size_um,
            "pixel_options": {k: v for k, v in sorted(self._load_args.items()) if k not in SPEED_OPTIONS},
        }
        return {"digest": digest(record), "lineage": {}}

    def save(self, data: None) -> None:
        raise DatasetError(f"SlideFolderDataset is read-only; cannot write into {self._path}")

    def _exists(self) -> bool:
        return bool(find_slides(self._path))

    def _describe(self) -> dict[str, Any]:
        return {
            "path": str(self._path),
            "pixel_size_um": self._pixel_size_um,
            "pixel_size_um_by_slide": self._pixel_size_um_by_slide,
            "load_args": self._load_args,
        }
