"""Kedro datasets of the annotation stage: the static site folder and the SQLite label store.

``AnnotationSiteDataset`` is wrapped in :class:`~mk_hspc.datasets.atomic.AtomicDataset` in the catalog (the
site is written into a temporary folder and swapped in whole, with a manifest); saving runs the per-tile
crop work of a :class:`~mk_hspc.export.site.SiteContent`. ``LabelStoreDataset`` loads the live label
store (a database the annotation server writes click by click; it is never replaced by a save).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kedro.io import AbstractDataset, DatasetError

from mk_hspc.export.build import write_site
from mk_hspc.export.site import CELLS_INDEX, SiteContent
from mk_hspc.labels.store import LabelStore


@dataclass(frozen=True)
class AnnotationSite:
    """A written site: its folder and ``cell_id -> (slide, cell_type, page path)`` of every exported cell."""

    root: Path
    cells: dict[str, tuple[str, str, str]]


class AnnotationSiteDataset(AbstractDataset[SiteContent, AnnotationSite]):
    """The site folder (see :mod:`mk_hspc.export.site` for its layout).

    Args:
        path: the site's folder.
        metadata: free-form metadata, ignored by Kedro.
    """

    # A save leaves the folder holding exactly the new site, whatever it held: AtomicDataset may hand it the
    # replaced site's folder to overwrite (``reuse_replaced``).
    REWRITES_WHOLE_FOLDER = True

    def __init__(self, path: str, metadata: dict[str, Any] | None = None) -> None:
        self._path = Path(path)
        self.metadata = metadata
        # Filled by save (see mk_hspc.datasets.atomic.WRITTEN_SHA256_ATTRIBUTE).
        self.written_sha256: dict[str, str] | None = None

    def save(self, data: SiteContent) -> None:
        write_site(data, self._path)
        # The sha256 of every file, hashed as it was written: AtomicDataset's digest without reading them back.
        self.written_sha256 = data.file_sha256

    def load(self) -> AnnotationSite:
        index_file = self._path / CELLS_INDEX
        try:
            index = json.loads(index_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise DatasetError(f"annotation site {self._path}: cannot read {CELLS_INDEX} ({exc})") from None
        return AnnotationSite(self._path, {cell_id: tuple(v) for cell_id, v in index["cells"].items()})

    def _exists(self) -> bool:
        return (self._path / CELLS_INDEX).is_file()

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path)}


class LabelStoreDataset(AbstractDataset[None, LabelStore]):
    """The SQLite label store (created empty on first load); written by the annotation server, never saved.

    Args:
        filepath: the database file.
        metadata: free-form metadata, ignored by Kedro.
    """

    def __init__(self, filepath: str, metadata: dict[str, Any] | None = None) -> None:
        self._filepath = Path(filepath)
        self.metadata = metadata

    @property
    def filepath(self) -> Path:
        return self._filepath

    def load(self) -> LabelStore:
        return LabelStore(self._filepath)

    def save(self, data: None) -> None:
        raise DatasetError(
            f"the label store {self._filepath} is written by `kedro annotate`, never by a node"
        )

    def _exists(self) -> bool:
        return self._filepath.is_file()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath)}
