"""SAM2 image-embedding features: the encoder's 256-channel map pooled under each cell's mask.

The encoder runs once per tile (the whole tile resized to SAM2's input size, as
``SAM2ImagePredictor.set_image`` does); each cell's feature vector is the mean of the embedding
weighted by how many of the cell's pixels fall in each embedding cell. The SAM2 model is shared with
the ``sam2`` segmenter through :func:`~mk_hspc.models.sam2_backbone.load_sam2_model` (same
config + checkpoint + device -> same object), and when the segmenter has just encoded the same tile
its whole-tile encoding is reused instead of running the encoder again.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy import sparse

from mk_hspc.models.sam2_backbone import (
    DEFAULT_CONFIG,
    WHOLE_TILE_FEATURES,
    check_sam2_config,
    encode_image,
    load_sam2_model,
)
from mk_hspc.models.tile_memo import tile_fingerprint
from mk_hspc.models.torch_device import enable_tf32, inference_context, require_file, resolve_device


def embedding_cell_index(tile_hw: tuple[int, int], grid_hw: tuple[int, int]) -> np.ndarray:
    """``(H, W)`` index of the embedding cell that contains each tile pixel's centre.

    SAM2 stretches the tile to a square input, so embedding row ``i`` covers tile rows
    ``[i * H / G, (i + 1) * H / G)``.
    """
    rows = np.minimum(
        ((np.arange(tile_hw[0]) + 0.5) * grid_hw[0] / tile_hw[0]).astype(np.int64), grid_hw[0] - 1
    )
    cols = np.minimum(
        ((np.arange(tile_hw[1]) + 0.5) * grid_hw[1] / tile_hw[1]).astype(np.int64), grid_hw[1] - 1
    )
    return rows[:, None] * grid_hw[1] + cols[None, :]


def pool_embedding(embedding: np.ndarray, labels: np.ndarray, cell_labels: np.ndarray) -> np.ndarray:
    """Mask-weighted mean of a ``(C, Gh, Gw)`` embedding under each cell: ``(N, C)`` float32.

    Each embedding cell is weighted by the number of the cell's pixels it covers; rows are NaN for
    labels absent from ``labels``.
    """
    channels, grid_h, grid_w = embedding.shape
    cell_labels = np.asarray(cell_labels, dtype=np.int64)
    row_of_label = np.full(int(max(labels.max(initial=0), cell_labels.max(initial=0))) + 1, -1, np.int64)
    row_of_label[cell_labels[cell_labels > 0]] = np.flatnonzero(cell_labels > 0)
    rows = row_of_label[labels.ravel()]
    wanted = rows >= 0
    cells = embedding_cell_index(labels.shape, (grid_h, grid_w)).ravel()[wanted]
    weights = sparse.coo_matrix(
        (np.ones(cells.size, np.float64), (rows[wanted], cells)), shape=(len(cell_labels), grid_h * grid_w)
    ).tocsr()
    pixel_counts = np.asarray(weights.sum(axis=1)).ravel()
    pooled = weights @ embedding.reshape(channels, -1).T.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        pooled = pooled / pixel_counts[:, None]
    return pooled.astype(np.float32)


class Sam2EmbeddingFeatures:
    """256 SAM2 embedding features per cell, columns ``sam2_embedding_000`` .. ``sam2_embedding_255``.

    Args:
        checkpoint: local SAM2 checkpoint (same file as the ``sam2`` segmenter to share the model).
        config: SAM2 model config inside the sam2 package.
        device: ``auto`` | ``cpu`` | ``cuda``.
        image_size: override of SAM2's input size (tests only).
        use_bfloat16: bf16 autocast on CUDA.
        reuse_segmenter_encoding: reuse the ``sam2`` segmenter's encoding of the same tile when present.
    """

    name = "sam2_embedding"

    def __init__(
        self,
        checkpoint: str,
        config: str = DEFAULT_CONFIG,
        device: str = "auto",
        image_size: int | None = None,
        use_bfloat16: bool = True,
        reuse_segmenter_encoding: bool = True,
    ) -> None:
        self.config = check_sam2_config(config)
        self.checkpoint = require_file(checkpoint, "SAM2 checkpoint")
        self.device = resolve_device(device)
        self.image_size = image_size
        self.use_bfloat16 = use_bfloat16
        self.reuse_segmenter_encoding = reuse_segmenter_encoding
        self._model: Any = None

    @property
    def model(self) -> Any:
        """The shared SAM2 model, loaded on first use."""
        if self._model is None:
            enable_tf32(self.device)
            self._model = load_sam2_model(self.config, self.checkpoint, self.device, self.image_size)
        return self._model

    def tile_embedding(self, tile_rgb: np.ndarray) -> np.ndarray:
        """The ``(256, G, G)`` float32 image embedding of the whole tile (``G`` = image size / 16)."""
        model = self.model
        cached = None
        if self.reuse_segmenter_encoding:
            cached = WHOLE_TILE_FEATURES.get(id(model), tile_fingerprint(tile_rgb))
        if cached is None:
            with inference_context(self.device, self.use_bfloat16):
                tile = torch.from_numpy(np.ascontiguousarray(tile_rgb)).to(self.device)
                cached = encode_image(model, tile)
        return cached.image_embed[0].float().cpu().numpy()

    def extract(
        self, tile_rgb: np.ndarray, labels: np.ndarray, cell_labels: np.ndarray, pixel_size_um: float
    ) -> pd.DataFrame:
        """One float32 row of 256 features per entry of ``cell_labels`` (NaN for absent labels)."""
        columns = [f"{self.name}_{i:03d}" for i in range(self.model.hidden_dim)]
        if len(cell_labels) == 0:
            return pd.DataFrame(np.zeros((0, len(columns)), np.float32), columns=columns)
        pooled = pool_embedding(self.tile_embedding(tile_rgb), labels, cell_labels)
        return pd.DataFrame(pooled, columns=columns)
