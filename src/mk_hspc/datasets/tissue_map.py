"""Kedro dataset for one slide's tissue map (mask + thumbnail + geometry) as a compressed ``.npz``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from kedro.io import AbstractDataset

from mk_hspc.tissue import TissueMap


class TissueMapDataset(AbstractDataset[TissueMap, TissueMap]):
    """Stores a ``TissueMap``; written to a temporary file and renamed so a crash never leaves half a file."""

    def __init__(self, filepath: str, metadata: dict[str, Any] | None = None) -> None:
        self._filepath = Path(filepath)
        self.metadata = metadata

    def load(self) -> TissueMap:
        return TissueMap.from_npz(self._filepath)

    def save(self, data: TissueMap) -> None:
        self._filepath.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._filepath.with_name(f".{self._filepath.name}.tmp")
        with open(tmp, "wb") as handle:
            data.to_npz(handle)
        os.replace(tmp, self._filepath)

    def _exists(self) -> bool:
        return self._filepath.is_file()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath)}
