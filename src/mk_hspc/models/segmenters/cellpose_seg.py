"""Cellpose 4 (CP-SAM) segmenter for HSPCs, loaded only from a local weights file.

Cellpose falls back to *downloading* ``cpsam_v2`` when ``pretrained_model`` is not an existing path
(``cellpose.models.CellposeModel.__init__``), so this plugin checks the path itself and never hands
Cellpose a name it could resolve online. Large tiles go through Cellpose's own 256 px block tiling
(``tile_overlap``, ``batch_size``); the cell diameter is given in micrometres and converted with the
tile's pixel size, so Cellpose rescales every slide to its 30 px training diameter.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi
from skimage.segmentation import relabel_sequential

from mk_hspc.models.base import Segmentation
from mk_hspc.models.torch_device import require_file, resolve_device

logger = logging.getLogger(__name__)


def filter_and_relabel(labels: np.ndarray, min_area_px: float, max_area_px: float) -> np.ndarray:
    """Drop instances outside ``[min_area_px, max_area_px]`` and number the rest 1..N (int32)."""
    labels = np.asarray(labels)
    areas = np.bincount(labels.ravel())
    drop = (areas < min_area_px) | (areas > max_area_px)
    drop[0] = False
    if drop.any():
        labels = np.where(drop[labels], 0, labels)
    return relabel_sequential(labels.astype(np.int32, copy=False))[0].astype(np.int32, copy=False)


def mean_probability(cellprob_logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-instance confidence: mean sigmoid of Cellpose's cell-probability logits under each mask."""
    n_cells = int(labels.max())
    if n_cells == 0:
        return np.zeros(0, np.float32)
    probability = 1.0 / (1.0 + np.exp(-np.asarray(cellprob_logits, np.float32)))
    return np.asarray(ndi.mean(probability, labels, np.arange(1, n_cells + 1)), np.float32)


class CellposeSegmenter:
    """HSPC segmenter: a Cellpose 4 model read from ``weights``.

    Args:
        weights: local Cellpose 4 weights file (e.g. ``data/06_models/cpsam``); never downloaded.
        device: ``auto`` | ``cpu`` | ``cuda``.
        diameter_um: typical HSPC diameter; Cellpose rescales the tile so that it is 30 px.
        flow_threshold: Cellpose's flow-error threshold (higher keeps more, less regular masks).
        cellprob_threshold: Cellpose's cell-probability logit threshold (lower gives more/larger masks).
        min_area_um2: smallest instance kept (also passed to Cellpose as ``min_size``).
        max_area_um2: largest instance kept; ``None`` = no upper bound.
        tile_overlap: overlap fraction of Cellpose's 256 px blocks.
        batch_size: 256 px blocks per network forward.
        use_bfloat16: bf16 weights; ``None`` = on CUDA only (bf16 on CPU is slow and less exact).
        niter: flow-dynamics iterations; ``None`` = Cellpose's default (scaled with the diameter).
        normalize: Cellpose's per-channel percentile normalisation (bool or its dict of options).

    Example:
        >>> seg = CellposeSegmenter(weights="data/06_models/cpsam", diameter_um=8.0)  # doctest: +SKIP
        >>> seg.segment(tile_rgb, pixel_size_um=0.1725).n_cells  # doctest: +SKIP
    """

    name = "cellpose"

    def __init__(
        self,
        weights: str,
        device: str = "auto",
        diameter_um: float = 8.0,
        flow_threshold: float = 0.4,
        cellprob_threshold: float = 0.0,
        min_area_um2: float = 10.0,
        max_area_um2: float | None = None,
        tile_overlap: float = 0.1,
        batch_size: int = 8,
        use_bfloat16: bool | None = None,
        niter: int | None = None,
        normalize: bool | dict[str, Any] = True,
    ) -> None:
        if diameter_um <= 0:
            raise ValueError(f"diameter_um must be > 0, got {diameter_um}")
        if max_area_um2 is not None and max_area_um2 <= min_area_um2:
            raise ValueError(f"max_area_um2 ({max_area_um2}) must exceed min_area_um2 ({min_area_um2})")
        if not 0.0 <= tile_overlap < 1.0:
            raise ValueError(f"tile_overlap must be in [0, 1), got {tile_overlap}")
        self.weights = require_file(weights, "Cellpose weights")
        self.device = resolve_device(device)
        self.diameter_um = float(diameter_um)
        self.flow_threshold = float(flow_threshold)
        self.cellprob_threshold = float(cellprob_threshold)
        self.min_area_um2 = float(min_area_um2)
        self.max_area_um2 = None if max_area_um2 is None else float(max_area_um2)
        self.tile_overlap = float(tile_overlap)
        self.batch_size = int(batch_size)
        # As configured (None: bf16 where the model runs on CUDA), not resolved here: the fingerprint holds
        # public attributes, and a driver without a GPU must compute the same one as its GPU workers.
        self.use_bfloat16 = None if use_bfloat16 is None else bool(use_bfloat16)
        self.niter = niter
        self.normalize = normalize
        self._model: Any = None

    @property
    def model(self) -> Any:
        """The ``cellpose.models.CellposeModel``, loaded on first use."""
        if self._model is None:
            from cellpose import models

            weights = require_file(self.weights, "Cellpose weights")  # re-check: never let Cellpose fetch
            logger.info("Loading Cellpose weights %s on %s", weights, self.device)
            self._model = models.CellposeModel(
                gpu=self.device.type == "cuda",
                pretrained_model=str(Path(weights).resolve()),
                device=self.device,
                use_bfloat16=self.device.type == "cuda" if self.use_bfloat16 is None else self.use_bfloat16,
            )
        return self._model

    def eval_kwargs(self, pixel_size_um: float) -> dict[str, Any]:
        """Keyword arguments for ``CellposeModel.eval`` at this pixel size (µm converted to pixels)."""
        return {
            "channel_axis": -1,
            "diameter": self.diameter_um / pixel_size_um,
            "flow_threshold": self.flow_threshold,
            "cellprob_threshold": self.cellprob_threshold,
            "min_size": max(1, round(self.min_area_um2 / pixel_size_um**2)),
            "tile_overlap": self.tile_overlap,
            "batch_size": self.batch_size,
            "niter": self.niter,
            "normalize": self.normalize,
        }

    def segment(self, tile_rgb: np.ndarray, pixel_size_um: float) -> Segmentation:
        """Segment HSPCs in one ``(H, W, 3)`` uint8 RGB tile."""
        masks, flows, _ = self.model.eval(tile_rgb, **self.eval_kwargs(pixel_size_um))
        max_area_px = np.inf if self.max_area_um2 is None else self.max_area_um2 / pixel_size_um**2
        labels = filter_and_relabel(masks, self.min_area_um2 / pixel_size_um**2, max_area_px)
        return Segmentation(labels=labels, scores=mean_probability(flows[2], labels))
