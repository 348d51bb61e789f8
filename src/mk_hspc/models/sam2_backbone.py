"""Load SAM2 once per process and encode images with it: shared by the ``sam2`` segmenter and the
``sam2_embedding`` feature extractor (one model in memory, and a tile's encoding reused by both).

Weights come from a local checkpoint only; the config must be one shipped inside the ``sam2`` package.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torchvision.transforms import functional as TF

from mk_hspc.models.tile_memo import LastTileResults
from mk_hspc.models.torch_device import require_file

logger = logging.getLogger(__name__)

DEFAULT_CONFIG = "configs/sam2.1/sam2.1_hiera_l.yaml"
# SAM2's preprocessing (sam2.utils.transforms.SAM2Transforms): ImageNet statistics.
_SAM2_PIXEL_MEAN = (0.485, 0.456, 0.406)
_SAM2_PIXEL_STD = (0.229, 0.224, 0.225)

_MODEL_CACHE: dict[tuple[str, str, str, int | None], Any] = {}
_MODEL_LOCK = threading.Lock()


def check_sam2_config(config: str) -> str:
    """Return ``config`` if it names a model config shipped inside the ``sam2`` package, else raise.

    SAM2 resolves configs through Hydra relative to its package (``configs/sam2.1/sam2.1_hiera_l.yaml``).
    """
    if not (resources.files("sam2") / config).is_file():
        shipped = sorted(str(p.relative_to(Path(str(resources.files("sam2"))))) for p in _sam2_configs())
        raise ValueError(f"Unknown SAM2 config {config!r}; configs shipped with sam2: {', '.join(shipped)}")
    return config


def _sam2_configs() -> list[Path]:
    return list((Path(str(resources.files("sam2"))) / "configs").rglob("*.yaml"))


def load_sam2_model(
    config: str, checkpoint: str | Path, device: torch.device, image_size: int | None = None
) -> Any:
    """Build SAM2 from a packaged config and a local checkpoint, once per process per (config, ckpt, device).

    The segmenter and the embedding extractor call this with the same arguments and get the same
    model object, so the (large) image encoder is loaded once. ``image_size`` overrides the model's
    input size (1024 for the released checkpoints); smaller sizes are only meant for tests.
    """
    check_sam2_config(config)
    ckpt = require_file(checkpoint, "SAM2 checkpoint")
    key = (config, str(ckpt.resolve()), str(device), image_size)
    with _MODEL_LOCK:
        if key not in _MODEL_CACHE:
            from sam2.build_sam import build_sam2

            overrides = [f"++model.image_size={int(image_size)}"] if image_size else []
            logger.info("Loading SAM2 %s from %s on %s", config, ckpt, device)
            _MODEL_CACHE[key] = build_sam2(
                config, str(ckpt), device=str(device), mode="eval", hydra_overrides_extra=overrides
            )
        return _MODEL_CACHE[key]


@dataclass(frozen=True)
class ImageFeatures:
    """SAM2 image-encoder output for one image, as ``SAM2ImagePredictor.set_image`` stores it.

    Attributes:
        image_embed: ``(1, 256, S/16, S/16)`` lowest-resolution features (``S`` = model image size),
            including SAM2's ``no_mem_embed`` like ``SAM2ImagePredictor.get_image_embedding``.
        high_res_feats: the two higher-resolution feature maps the mask decoder also reads.
    """

    image_embed: torch.Tensor
    high_res_feats: list[torch.Tensor]


def image_to_model_input(image_rgb: torch.Tensor, image_size: int) -> torch.Tensor:
    """``(H, W, 3)`` uint8 tensor -> ``(1, 3, S, S)`` normalised float, exactly as SAM2Transforms does."""
    chw = image_rgb.permute(2, 0, 1).contiguous().to(torch.float32).div(255)
    chw = TF.resize(chw, [image_size, image_size], antialias=True)
    return TF.normalize(chw, _SAM2_PIXEL_MEAN, _SAM2_PIXEL_STD)[None]


def encode_image(model: Any, image_rgb: torch.Tensor) -> ImageFeatures:
    """Run SAM2's image encoder once on an ``(H, W, 3)`` uint8 tensor on the model's device.

    Mirrors ``SAM2ImagePredictor.set_image`` but resizes on the model's device (SAM2 resizes on the
    CPU) and reads the feature-map sizes from the model instead of assuming a 1024 px input.
    """
    backbone_out = model.forward_image(image_to_model_input(image_rgb, model.image_size))
    _, vision_feats, _, feat_sizes = model._prepare_backbone_features(backbone_out)
    if model.directly_add_no_mem_embed:
        vision_feats[-1] = vision_feats[-1] + model.no_mem_embed
    maps = [
        feat.permute(1, 2, 0).reshape(1, -1, *size)
        for feat, size in zip(vision_feats, feat_sizes, strict=True)
    ]
    return ImageFeatures(image_embed=maps[-1], high_res_feats=maps[:-1])


# The last whole-tile encoder output per model (keyed by ``id(model)``), so the embedding extractor reuses
# the segmenter's encoding of the same tile instead of running the encoder again.
WHOLE_TILE_FEATURES = LastTileResults()
