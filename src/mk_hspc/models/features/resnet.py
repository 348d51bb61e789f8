"""ResNet-50 appearance features: the 2048-d global-pool output for a crop around each cell.

Crops are cut and resized for a whole batch of cells in one ``torchvision.ops.roi_align`` call on the
model's device (area-averaging when shrinking, so no aliasing), then go through the network in
batches; there is never one forward pass per cell. Weights come only from a local ``state_dict`` file.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import ndimage as ndi
from torchvision.ops import roi_align

from mk_hspc.models.torch_device import enable_tf32, inference_context, require_file, resolve_device

logger = logging.getLogger(__name__)

# The statistics torchvision's ImageNet weights were trained with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
N_FEATURES = 2048


def cell_crop_boxes(
    labels: np.ndarray, cell_labels: np.ndarray, context_fraction: float, min_crop_px: float
) -> np.ndarray:
    """Square crop box around each cell's bounding box, ``(N, 4)`` float XYXY in pixel-edge coordinates.

    The side is the bounding box's longer side plus ``context_fraction`` of it on each side (at least
    ``min_crop_px``), centred on the bounding box, so cells keep their aspect ratio and some
    surroundings. Rows are NaN for labels absent from ``labels``.
    """
    objects = ndi.find_objects(np.asarray(labels))
    boxes = np.full((len(cell_labels), 4), np.nan)
    for row, label in enumerate(np.asarray(cell_labels, dtype=np.int64)):
        found = objects[label - 1] if 0 < label <= len(objects) else None
        if found is None:
            continue
        rows, cols = found
        side = max(rows.stop - rows.start, cols.stop - cols.start) * (1.0 + 2.0 * context_fraction)
        side = max(side, min_crop_px)
        centre_y, centre_x = (rows.start + rows.stop) / 2.0, (cols.start + cols.stop) / 2.0
        boxes[row] = (centre_x - side / 2, centre_y - side / 2, centre_x + side / 2, centre_y + side / 2)
    return boxes


def normalised_tile(tile_rgb: np.ndarray, device: torch.device) -> torch.Tensor:
    """``(1, 3, H, W)`` float32 tile on ``device`` with ImageNet normalisation (outside the tile reads 0,
    i.e. the mean colour, in ``roi_align``)."""
    tile = torch.from_numpy(np.ascontiguousarray(tile_rgb)).to(device)
    chw = tile.permute(2, 0, 1).to(torch.float32).div(255)
    mean = torch.tensor(IMAGENET_MEAN, device=device)[:, None, None]
    std = torch.tensor(IMAGENET_STD, device=device)[:, None, None]
    return ((chw - mean) / std)[None]


def crop_cells(tile: torch.Tensor, boxes: np.ndarray, crop_size_px: int) -> torch.Tensor:
    """Cut and resize ``boxes`` (pixel-edge XYXY) from a ``(1, 3, H, W)`` tile: ``(N, 3, S, S)``.

    ``roi_align`` with ``aligned=True`` samples pixel centres and averages ``ceil(side / S)``² samples
    per output pixel, i.e. an area-average resize when the crop is larger than ``S``.
    """
    rois = torch.as_tensor(boxes, dtype=torch.float32, device=tile.device)
    rois = torch.cat([torch.zeros(len(rois), 1, device=tile.device), rois], dim=1)
    return roi_align(tile, rois, output_size=crop_size_px, spatial_scale=1.0, sampling_ratio=-1, aligned=True)


def build_resnet50_trunk(weights: str | Path) -> torch.nn.Module:
    """torchvision ResNet-50 with the classifier replaced by identity, weights from a local file.

    Accepts a plain ``state_dict`` (torchvision's format) with or without the ``fc`` head.
    """
    from torchvision.models import resnet50

    path = require_file(weights, "ResNet-50 weights")
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    model = resnet50(weights=None)
    model.fc = torch.nn.Identity()
    model.load_state_dict({k: v for k, v in state_dict.items() if not k.startswith("fc.")}, strict=True)
    return model.eval()


class ResNet50Features:
    """2048 ResNet-50 global-pool features per cell, columns ``resnet50_0000`` .. ``resnet50_2047``.

    Args:
        weights: local torchvision ResNet-50 ``state_dict`` file (e.g. ``data/06_models/resnet50.pth``).
        device: ``auto`` | ``cpu`` | ``cuda``.
        crop_size_px: network input size (224 for ImageNet weights).
        context_fraction: context added on each side of the cell's bounding box, as a fraction of it.
        min_crop_um: smallest crop side, so tiny objects are not blown up to the full input size.
        batch_size: crops per forward pass.
        use_bfloat16: bf16 autocast on CUDA.
    """

    name = "resnet50"

    def __init__(
        self,
        weights: str,
        device: str = "auto",
        crop_size_px: int = 224,
        context_fraction: float = 0.25,
        min_crop_um: float = 0.0,
        batch_size: int = 64,
        use_bfloat16: bool = True,
    ) -> None:
        if crop_size_px < 32:
            raise ValueError(f"crop_size_px must be >= 32 (ResNet-50 downsamples 32x), got {crop_size_px}")
        if context_fraction < 0 or min_crop_um < 0 or batch_size < 1:
            raise ValueError("context_fraction and min_crop_um must be >= 0 and batch_size >= 1")
        self.weights = require_file(weights, "ResNet-50 weights")
        self.device = resolve_device(device)
        self.crop_size_px = int(crop_size_px)
        self.context_fraction = float(context_fraction)
        self.min_crop_um = float(min_crop_um)
        self.batch_size = int(batch_size)
        self.use_bfloat16 = use_bfloat16
        self.columns = [f"{self.name}_{i:04d}" for i in range(N_FEATURES)]
        self._model: torch.nn.Module | None = None

    @property
    def model(self) -> torch.nn.Module:
        """The ResNet-50 trunk on the device, loaded on first use."""
        if self._model is None:
            enable_tf32(self.device)
            logger.info("Loading ResNet-50 weights %s on %s", self.weights, self.device)
            model = build_resnet50_trunk(self.weights).to(self.device)
            if self.device.type == "cuda":
                model = model.to(memory_format=torch.channels_last)
            self._model = model
        return self._model

    def crop_boxes(self, labels: np.ndarray, cell_labels: np.ndarray, pixel_size_um: float) -> np.ndarray:
        """The crop box of each cell (see :func:`cell_crop_boxes`)."""
        return cell_crop_boxes(labels, cell_labels, self.context_fraction, self.min_crop_um / pixel_size_um)

    def extract(
        self, tile_rgb: np.ndarray, labels: np.ndarray, cell_labels: np.ndarray, pixel_size_um: float
    ) -> pd.DataFrame:
        """One float32 row of 2048 features per entry of ``cell_labels`` (NaN for absent labels)."""
        boxes = self.crop_boxes(labels, cell_labels, pixel_size_um)
        features = np.full((len(boxes), N_FEATURES), np.nan, np.float32)
        present = np.flatnonzero(~np.isnan(boxes[:, 0]))
        if present.size:
            with inference_context(self.device, self.use_bfloat16):
                tile = normalised_tile(tile_rgb, self.device)
                for start in range(0, present.size, self.batch_size):
                    rows = present[start : start + self.batch_size]
                    crops = crop_cells(tile, boxes[rows], self.crop_size_px)
                    if self.device.type == "cuda":
                        crops = crops.contiguous(memory_format=torch.channels_last)
                    features[rows] = self.model(crops).float().cpu().numpy()
        return pd.DataFrame(features, columns=self.columns)
