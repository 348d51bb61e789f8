"""The two plugin protocols every model implements: a segmenter and a feature extractor.

A segmenter turns an RGB tile into an instance label image; a feature extractor turns a tile,
its label image and the labels of the cells to describe into a named feature matrix. The
segmentation node only ever talks to these two protocols, so a lab's own model (StarDist,
InstanSeg, ...) plugs in through an entry point without touching the core.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class Segmentation:
    """Result of segmenting one tile.

    Attributes:
        labels: ``(H, W)`` int32 instance image, 0 = background, 1..N = cells (consecutive).
        scores: ``(N,)`` float32 confidence per label (index ``k - 1`` for label ``k``); 1.0 where
            the method has no notion of confidence.
    """

    labels: np.ndarray
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))

    def __post_init__(self) -> None:
        if self.labels.ndim != 2:
            raise ValueError(f"labels must be 2-D, got shape {self.labels.shape}")
        n_cells = int(self.labels.max()) if self.labels.size else 0
        if self.scores.size == 0 and n_cells:
            object.__setattr__(self, "scores", np.ones(n_cells, np.float32))
        if self.scores.shape != (n_cells,):
            raise ValueError(f"scores has shape {self.scores.shape}, expected ({n_cells},)")

    @property
    def n_cells(self) -> int:
        return int(self.scores.shape[0])


@runtime_checkable
class Segmenter(Protocol):
    """Turns an RGB tile into instance labels.

    Implementations are constructed once per run from parameters (``__init__(**params)``) and then
    called per tile from a single model-worker thread, so they may keep models on the GPU. The run checks
    the parameter names in conf against the constructor's signature before building anything; a
    constructor that takes ``**kwargs`` names what they may hold in a classmethod
    ``keyword_parameters(arguments) -> frozenset[str]`` (``arguments``: its named parameters, defaults
    applied), or else checks them itself.
    """

    name: str

    def segment(self, tile_rgb: np.ndarray, pixel_size_um: float) -> Segmentation:
        """Segment one ``(H, W, 3)`` uint8 RGB tile whose pixels are ``pixel_size_um`` wide."""
        ...


@runtime_checkable
class FeatureExtractor(Protocol):
    """Describes cells of a tile as a feature matrix with named columns (built like a :class:`Segmenter`)."""

    name: str

    def extract(
        self, tile_rgb: np.ndarray, labels: np.ndarray, cell_labels: np.ndarray, pixel_size_um: float
    ) -> pd.DataFrame:
        """Return one row per entry of ``cell_labels`` (same order), float32 columns prefixed by ``name``."""
        ...
