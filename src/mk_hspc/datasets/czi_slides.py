"""Kedro dataset that loads one CZI slide as a lazy `CziSlide` handle (never its pixels).

Inside a ``partitions.PartitionedDataset`` with ``filename_suffix: .czi`` a folder of slides becomes a dict
``{slide_name: loader}``; calling a loader opens (and validates) that slide only.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

from kedro.io.core import AbstractDataset, DatasetError

from mk_hspc.czi import CziSlide, open_slide


class CziSlideDataset(AbstractDataset[None, CziSlide]):
    """Read-only dataset of one ``.czi`` file.

    Args:
        filepath: Local path of the slide (libCZI reads local files only).
        pixel_size_um: µm per pixel used only when the file lacks scaling metadata (see `open_slide`).
        load_args: Further `open_slide` keywords (``channel``, ``downsample``, ``strip_mib``,
            ``cache_mib``, ``thread_mode``).
        metadata: Free-form metadata, ignored by Kedro.

    Example:
        >>> CziSlideDataset(filepath="data/01_raw/slides/a.czi").load().meta.pixel_size_um  # doctest: +SKIP
        0.1725
    """

    def __init__(
        self,
        filepath: str,
        pixel_size_um: float | None = None,
        load_args: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self._filepath = PurePosixPath(filepath)
        self._pixel_size_um = pixel_size_um
        self._load_args = dict(load_args or {})
        self.metadata = metadata

    def load(self) -> CziSlide:
        return open_slide(str(self._filepath), self._pixel_size_um, **self._load_args)

    def save(self, data: None) -> None:
        raise DatasetError(f"CziSlideDataset is read-only; cannot write {self._filepath}")

    def _exists(self) -> bool:
        return Path(self._filepath).is_file()

    def _describe(self) -> dict[str, Any]:
        return {
            "filepath": str(self._filepath),
            "pixel_size_um": self._pixel_size_um,
            "load_args": self._load_args,
        }
