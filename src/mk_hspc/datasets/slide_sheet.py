"""Kedro dataset of the lab's slide sheet (CSV): the table as text, or None when the file does not exist.

A missing sheet is a finding for `mk_hspc.slide_sheet.validate_slide_sheet` to report (an error or a
warning, by ``ingestion.slide_sheet_strict``), not a load failure, so it reaches the node as None.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
from kedro.io.core import AbstractDataset, DatasetError


class SlideSheetDataset(AbstractDataset[None, pd.DataFrame | None]):
    """Read-only CSV with every cell read as text (``NA`` is a group name, not a missing value).

    Args:
        filepath: The CSV file.
        metadata: Free-form metadata, ignored by Kedro.
    """

    def __init__(self, filepath: str, metadata: dict[str, Any] | None = None) -> None:
        self._filepath = Path(filepath)
        self.metadata = metadata

    def load(self) -> pd.DataFrame | None:
        if not self._filepath.is_file():
            return None
        return pd.read_csv(self._filepath, dtype=str, keep_default_na=False, na_filter=False)

    def save(self, data: pd.DataFrame | None) -> None:
        raise DatasetError(f"SlideSheetDataset is read-only; the lab writes {self._filepath}")

    def _exists(self) -> bool:
        return self._filepath.is_file()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath)}
