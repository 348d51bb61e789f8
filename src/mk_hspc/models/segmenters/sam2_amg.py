"""SAM2 automatic-mask-generator segmenter for megakaryocytes that never upsamples a mask to the whole tile.

SAM2's own ``SAM2AutomaticMaskGenerator`` spends most of its time outside the networks: every mask of a
prompt batch is upsampled to the full crop (a 3000 px tile costs gigabytes per batch of 64 prompts),
filtered there, and run-length encoded one mask at a time in Python. :class:`WindowedMaskGenerator`
runs the same algorithm (same point grids, crops, network calls, filters, NMS) but

* drops masks by predicted IoU and by a low-resolution area estimate *before* upsampling anything;
* evaluates the bilinear upsampling of SAM2's low-resolution logits only inside each mask's window:
  bilinear interpolation can only exceed a threshold next to a low-resolution pixel that does, so the
  window (the low-resolution mask's box grown by one low-resolution pixel) contains the whole
  full-resolution mask. Stability scores, boxes, the crop-edge filter and areas are therefore exact;
* applies the MK area range (in µm², converted once per pixel size) before NMS, so masks that are not
  MKs cannot suppress MKs.

Apart from the area range the kept masks equal SAM2's (checked in ``tests/test_learned_models.py``).
The image encoder sees each crop exactly as in SAM2, so its whole-tile encoding can be reused by
:mod:`mk_hspc.models.features.sam2_embedding`; loading and encoding live in :mod:`mk_hspc.models.sam2_backbone`.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops.boxes import batched_nms, box_area

from mk_hspc.models.base import Segmentation
from mk_hspc.models.sam2_backbone import (
    DEFAULT_CONFIG,
    WHOLE_TILE_FEATURES,
    ImageFeatures,
    check_sam2_config,
    encode_image,
    load_sam2_model,
)
from mk_hspc.models.tile_memo import tile_fingerprint
from mk_hspc.models.torch_device import enable_tf32, inference_context, require_file, resolve_device

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# Windowed mask generation
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AmgSettings:
    """SAM2 automatic-mask-generator settings (same meaning and units as ``SAM2AutomaticMaskGenerator``).

    Defaults are the lab's MK settings. ``min_mask_region_area`` is passed on as SAM2 does, i.e. as the
    hole/sprinkle area filled in SAM2's low-resolution logits; SAM2 skips that step when its CUDA
    extension (``sam2._C``) is not built, and so does this module. ``crop_edge_atol_px`` is SAM2's fixed
    tolerance for "touches a crop edge". ``window_budget_px`` caps the pixels evaluated in one batched
    call (memory), not the result.
    """

    points_per_side: int = 24
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.5
    stability_score_thresh: float = 0.4
    stability_score_offset: float = 1.0
    mask_threshold: float = 0.0
    box_nms_thresh: float = 0.7
    crop_n_layers: int = 1
    crop_nms_thresh: float = 0.7
    crop_overlap_ratio: float = 512 / 1500
    crop_n_points_downscale_factor: int = 1
    min_mask_region_area: int = 500
    multimask_output: bool = True
    crop_edge_atol_px: float = 20.0
    window_budget_px: int = 2**24

    def __post_init__(self) -> None:
        for name in ("pred_iou_thresh", "stability_score_thresh", "box_nms_thresh", "crop_nms_thresh"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.points_per_side < 1 or self.points_per_batch < 1 or self.crop_n_layers < 0:
            raise ValueError("points_per_side and points_per_batch must be >= 1 and crop_n_layers >= 0")


@dataclass
class MaskProposals:
    """Masks kept by the generator, held as SAM2 low-resolution logits (cheap) plus exact statistics.

    Attributes:
        low_res_logits: ``(N, s, s)`` float32 decoder logits (``s`` = image size / 4).
        crop_boxes: ``(N, 4)`` int64 XYXY (end exclusive) crop each mask was predicted in (tile px).
        boxes: ``(N, 4)`` int64 XYXY (inclusive) full-resolution mask boxes in tile pixels.
        areas: ``(N,)`` full-resolution mask areas in pixels.
        predicted_iou: ``(N,)`` the model's predicted mask quality.
        stability_score: ``(N,)`` SAM2's stability score (full resolution).
        mask_threshold: logit threshold of the masks.
    """

    low_res_logits: torch.Tensor
    crop_boxes: torch.Tensor
    boxes: torch.Tensor
    areas: torch.Tensor
    predicted_iou: torch.Tensor
    stability_score: torch.Tensor
    mask_threshold: float = 0.0

    def __len__(self) -> int:
        return int(self.predicted_iou.shape[0])

    def full_res_masks(self, budget_px: int = 2**24) -> list[tuple[int, int, np.ndarray]]:
        """Every mask at full tile resolution inside its window, as ``(y0, x0, bool array)`` on the CPU.

        Evaluated in batched chunks of at most ~``budget_px`` pixels, one device-to-host copy each.
        """
        positive = self.low_res_logits > self.mask_threshold
        windows = logit_windows(positive, self.crop_boxes)
        sizes = ((windows[:, 1] - windows[:, 0]) * (windows[:, 3] - windows[:, 2])).tolist()
        rows = windows.tolist()
        masks: list[tuple[int, int, np.ndarray]] = [(0, 0, np.zeros((0, 0), bool))] * len(self)
        for chunk in _chunks_by_size(sizes, budget_px):
            values, valid = sample_windows(self.low_res_logits[chunk], self.crop_boxes[chunk], windows[chunk])
            binary = ((values > self.mask_threshold) & valid).cpu().numpy()
            for position, index in enumerate(chunk.tolist()):
                y0, y1, x0, x1 = rows[index]
                masks[index] = (y0, x0, binary[position, : y1 - y0, : x1 - x0])
        return masks


def logit_windows(positive: torch.Tensor, crop_boxes: torch.Tensor) -> torch.Tensor:
    """Tile-pixel windows ``(N, 4)`` as ``[y0, y1, x0, x1)`` that contain every full-resolution pixel
    whose bilinear upsampling of the low-resolution mask ``positive`` ``(N, h, w)`` can be positive.

    SAM2 upsamples with ``align_corners=False``: full-resolution pixel ``x`` of a crop of size ``W``
    samples low-resolution position ``(x + 0.5) * w / W - 0.5`` and mixes its two neighbours, so it can
    only be positive within one low-resolution pixel of a positive one. Empty masks get empty windows.
    """
    windows = []
    for axis, (start_col, stop_col) in ((2, (1, 3)), (1, (0, 2))):  # rows (y), then columns (x)
        hit = positive.any(dim=axis)
        low_size = hit.shape[1]
        first = torch.argmax(hit.to(torch.uint8), dim=1).to(torch.float64)
        last = (low_size - 1 - torch.argmax(hit.flip(1).to(torch.uint8), dim=1)).to(torch.float64)
        start = crop_boxes[:, start_col].to(torch.float64)
        size = crop_boxes[:, stop_col].to(torch.float64) - start
        lo = torch.floor((first - 0.5) * size / low_size - 0.5).clamp(min=0)
        hi = torch.minimum(torch.ceil((last + 1.5) * size / low_size - 0.5) + 1, size)
        empty = ~hit.any(dim=1)
        hi = torch.where(empty, lo, hi)
        windows += [start + lo, start + hi]
    return torch.stack(windows, dim=1).to(torch.int64)


def sample_windows(
    low_res_logits: torch.Tensor, crop_boxes: torch.Tensor, windows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM2's full-resolution logits inside each window, batched: ``(values, valid)`` of shape
    ``(N, Hmax, Wmax)`` where ``valid`` marks the pixels that belong to each mask's own window.

    Samples the low-resolution logits at full-resolution pixel centres with the rule of
    ``F.interpolate(..., mode="bilinear", align_corners=False)`` (edge clamping = ``border`` padding),
    i.e. the values SAM2 computes for the whole crop, here only inside the windows.
    """
    device = low_res_logits.device
    heights, widths = windows[:, 1] - windows[:, 0], windows[:, 3] - windows[:, 2]
    max_h = max(int(heights.max()), 1) if len(windows) else 1
    max_w = max(int(widths.max()), 1) if len(windows) else 1
    ys = windows[:, :1] + torch.arange(max_h, device=device)[None]
    xs = windows[:, 2:3] + torch.arange(max_w, device=device)[None]
    crop_y0, crop_x0 = crop_boxes[:, 1:2].to(torch.float64), crop_boxes[:, 0:1].to(torch.float64)
    crop_h = (crop_boxes[:, 3:4] - crop_boxes[:, 1:2]).to(torch.float64)
    crop_w = (crop_boxes[:, 2:3] - crop_boxes[:, 0:1]).to(torch.float64)
    gy = ((ys.to(torch.float64) + 0.5 - crop_y0) / crop_h * 2 - 1).to(torch.float32)
    gx = ((xs.to(torch.float64) + 0.5 - crop_x0) / crop_w * 2 - 1).to(torch.float32)
    n = len(windows)
    grid = torch.stack([gx[:, None, :].expand(n, max_h, max_w), gy[:, :, None].expand(n, max_h, max_w)], -1)
    values = F.grid_sample(
        low_res_logits[:, None].float(),
        grid,
        mode="bilinear",
        padding_mode="border",
        align_corners=False,
    )[:, 0]
    valid = (ys < windows[:, 1:2])[:, :, None] & (xs < windows[:, 3:4])[:, None, :]
    return values, valid


def _sam2_extension_built() -> bool:
    return importlib.util.find_spec("sam2._C") is not None


def _near_crop_edge(
    boxes: torch.Tensor, crop_box: list[int], tile_box: list[int], atol: float
) -> torch.Tensor:
    """SAM2's ``is_box_near_crop_edge`` for boxes already in tile pixels."""
    boxes = boxes.to(torch.float32)
    crop = torch.as_tensor(crop_box, dtype=torch.float32, device=boxes.device)
    tile = torch.as_tensor(tile_box, dtype=torch.float32, device=boxes.device)
    near_crop = torch.isclose(boxes, crop[None], atol=atol, rtol=0)
    near_tile = torch.isclose(boxes, tile[None], atol=atol, rtol=0)
    return torch.any(near_crop & ~near_tile, dim=1)


def _cat(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}


def _select(data: dict[str, torch.Tensor], keep: torch.Tensor) -> dict[str, torch.Tensor]:
    return {key: value[keep] for key, value in data.items()}


class WindowedMaskGenerator:
    """SAM2's automatic mask generator, with masks evaluated at full resolution only inside their windows."""

    def __init__(self, model: Any, settings: AmgSettings) -> None:
        from sam2.utils.amg import build_all_layer_point_grids
        from sam2.utils.transforms import SAM2Transforms

        self.model = model
        self.settings = settings
        self.point_grids = build_all_layer_point_grids(
            settings.points_per_side, settings.crop_n_layers, settings.crop_n_points_downscale_factor
        )
        self._transforms = SAM2Transforms(
            resolution=model.image_size,
            mask_threshold=settings.mask_threshold,
            max_hole_area=settings.min_mask_region_area,
            max_sprinkle_area=settings.min_mask_region_area,
        )
        self._fill_holes = settings.min_mask_region_area > 0 and _sam2_extension_built()
        if settings.min_mask_region_area > 0 and not self._fill_holes:
            logger.info("sam2._C is not built: low-res hole/sprinkle removal skipped (as SAM2 does)")

    def generate(
        self,
        tile: torch.Tensor,
        area_range_px: tuple[float, float] = (0.0, math.inf),
        prefilter_margin: float = 0.25,
        fingerprint: tuple[tuple[int, ...], int] | None = None,
    ) -> MaskProposals:
        """Propose masks for an ``(H, W, 3)`` uint8 tile tensor on the model's device.

        Args:
            tile: the full-resolution tile.
            area_range_px: masks outside this full-resolution area range are dropped before NMS.
            prefilter_margin: relative slack of the cheap low-resolution area estimate used to skip
                masks far outside ``area_range_px`` before any full-resolution work.
            fingerprint: when given, the whole-tile encoder output is published under it for reuse.
        """
        from sam2.utils.amg import generate_crop_boxes

        height, width = int(tile.shape[0]), int(tile.shape[1])
        crop_boxes, layer_idxs = generate_crop_boxes(
            (height, width), self.settings.crop_n_layers, self.settings.crop_overlap_ratio
        )
        merged = _cat(
            [
                self._process_crop(tile, crop_box, layer, area_range_px, prefilter_margin, fingerprint)
                for crop_box, layer in zip(crop_boxes, layer_idxs, strict=True)
            ]
        )
        if len(crop_boxes) > 1 and merged["iou"].numel():
            # Duplicates across crops: prefer the mask from the smaller crop (as SAM2).
            keep = batched_nms(
                merged["boxes"].float(),
                1.0 / box_area(merged["crop_boxes"].float()),
                torch.zeros_like(merged["boxes"][:, 0]),
                iou_threshold=self.settings.crop_nms_thresh,
            )
            merged = _select(merged, keep)
        return MaskProposals(
            low_res_logits=merged["low_res"],
            crop_boxes=merged["crop_boxes"],
            boxes=merged["boxes"],
            areas=merged["area"],
            predicted_iou=merged["iou"],
            stability_score=merged["stability"],
            mask_threshold=self.settings.mask_threshold,
        )

    def _process_crop(
        self,
        tile: torch.Tensor,
        crop_box: list[int],
        layer: int,
        area_range_px: tuple[float, float],
        prefilter_margin: float,
        fingerprint: tuple[tuple[int, ...], int] | None,
    ) -> dict[str, torch.Tensor]:
        x0, y0, x1, y1 = crop_box
        tile_box = [0, 0, int(tile.shape[1]), int(tile.shape[0])]
        features = encode_image(self.model, tile[y0:y1, x0:x1])
        if fingerprint is not None and list(crop_box) == tile_box:
            WHOLE_TILE_FEATURES.put(id(self.model), fingerprint, features)
        crop_hw = (y1 - y0, x1 - x0)
        crop_boxes = torch.tensor([crop_box], dtype=torch.int64, device=tile.device)
        points_for_crop = self.point_grids[layer] * np.array(crop_hw)[None, ::-1]
        parts = []
        for start in range(0, len(points_for_crop), self.settings.points_per_batch):
            points = points_for_crop[start : start + self.settings.points_per_batch]
            part = self._decode_and_filter(
                features, points, crop_hw, crop_boxes, area_range_px, prefilter_margin
            )
            edge = _near_crop_edge(part["boxes"], crop_box, tile_box, self.settings.crop_edge_atol_px)
            parts.append(_select(part, ~edge))
        merged = _cat(parts)
        keep = batched_nms(
            merged["boxes"].float(),
            merged["iou"],
            torch.zeros_like(merged["boxes"][:, 0]),
            iou_threshold=self.settings.box_nms_thresh,
        )
        merged = _select(merged, keep)
        merged["crop_boxes"] = crop_boxes.expand(len(keep), 4)
        return merged

    def _decode_and_filter(
        self,
        features: ImageFeatures,
        points: np.ndarray,
        crop_hw: tuple[int, int],
        crop_boxes: torch.Tensor,
        area_range_px: tuple[float, float],
        prefilter_margin: float,
    ) -> dict[str, torch.Tensor]:
        """Decode one prompt batch and apply SAM2's per-mask filters plus the area range."""
        settings = self.settings
        low_res, iou = self._decode(features, points, crop_hw)
        if settings.pred_iou_thresh > 0.0:
            keep = iou > settings.pred_iou_thresh
            low_res, iou = low_res[keep], iou[keep]
        if self._fill_holes:
            # SAM2 fills holes in the low-res logits before upsampling; resizing to the same size is exact.
            low_res = self._transforms.postprocess_masks(low_res[:, None], low_res.shape[-2:])[:, 0]
        # Cheap area estimate from the low-res mask: skip masks far outside the range before any full-res work.
        low_px_area = crop_hw[0] * crop_hw[1] / (low_res.shape[-2] * low_res.shape[-1])
        estimate = (low_res > settings.mask_threshold).flatten(1).sum(1) * low_px_area
        keep = (estimate >= area_range_px[0] * (1 - prefilter_margin)) & (
            estimate <= area_range_px[1] * (1 + prefilter_margin)
        )
        low_res, iou = low_res[keep], iou[keep]

        stats = self._full_res_statistics(low_res, crop_boxes.expand(len(low_res), 4))
        # Masks without pixels are never cells (SAM2 would keep them with a NaN stability score).
        keep = (stats["area"] >= max(area_range_px[0], 1)) & (stats["area"] <= area_range_px[1])
        if settings.stability_score_thresh > 0.0:
            keep &= stats["stability"] >= settings.stability_score_thresh
        return _select({"low_res": low_res, "iou": iou, **stats}, keep)

    def _decode(
        self, features: ImageFeatures, points: np.ndarray, crop_hw: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """SAM2's prompt encoder + mask decoder for single-point prompts (``SAM2ImagePredictor._predict``
        without the upsampling): ``(N * masks_per_point, s, s)`` logits and predicted IoUs."""
        device = features.image_embed.device
        coords = torch.as_tensor(points, dtype=torch.float32, device=device)
        coords = self._transforms.transform_coords(coords, normalize=True, orig_hw=crop_hw)
        labels = torch.ones(coords.shape[0], dtype=torch.int, device=device)
        sparse, dense = self.model.sam_prompt_encoder(
            points=(coords[:, None, :], labels[:, None]), boxes=None, masks=None
        )
        low_res, iou, _, _ = self.model.sam_mask_decoder(
            image_embeddings=features.image_embed,
            image_pe=self.model.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=self.settings.multimask_output,
            repeat_image=coords.shape[0] > 1,
            high_res_features=features.high_res_feats,
        )
        return low_res.flatten(0, 1).float(), iou.flatten(0, 1).float()

    def _full_res_statistics(
        self, low_res: torch.Tensor, crop_boxes: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Exact full-resolution stability score, area and box of each mask, in memory-bounded chunks.

        The window is taken at the lower stability threshold, which contains the other two masks.
        """
        settings = self.settings
        lower = settings.mask_threshold - settings.stability_score_offset
        upper = settings.mask_threshold + settings.stability_score_offset
        windows = logit_windows(low_res > lower, crop_boxes)
        sizes = ((windows[:, 1] - windows[:, 0]) * (windows[:, 3] - windows[:, 2])).tolist()
        n = len(low_res)
        stability = torch.zeros(n, device=low_res.device)
        area = torch.zeros(n, dtype=torch.int64, device=low_res.device)
        boxes = torch.zeros(n, 4, dtype=torch.int64, device=low_res.device)
        for chunk in _chunks_by_size(sizes, settings.window_budget_px):
            values, valid = sample_windows(low_res[chunk], crop_boxes[chunk], windows[chunk])
            intersections = ((values > upper) & valid).flatten(1).sum(1)
            unions = ((values > lower) & valid).flatten(1).sum(1)
            stability[chunk] = intersections / unions
            binary = (values > settings.mask_threshold) & valid
            area[chunk] = binary.flatten(1).sum(1)
            boxes[chunk] = _binary_boxes(binary, windows[chunk])
        return {"stability": stability, "area": area, "boxes": boxes}


def _chunks_by_size(sizes: list[int], budget_px: int) -> list[torch.Tensor]:
    """Group indices (largest first) so that ``len(group) * max size in group`` stays within budget."""
    order = sorted(range(len(sizes)), key=lambda i: -sizes[i])
    chunks: list[list[int]] = []
    for index in order:
        if chunks and (len(chunks[-1]) + 1) * max(sizes[chunks[-1][0]], 1) <= budget_px:
            chunks[-1].append(index)
        else:
            chunks.append([index])
    return [torch.tensor(chunk, dtype=torch.int64) for chunk in chunks]


def _binary_boxes(binary: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
    """Inclusive XYXY tile-pixel boxes of ``(N, h, w)`` window masks; ``[0, 0, 0, 0]`` when empty (as SAM2)."""
    from sam2.utils.amg import batched_mask_to_box

    boxes = batched_mask_to_box(binary).to(torch.int64)
    offset = torch.stack([windows[:, 2], windows[:, 0], windows[:, 2], windows[:, 0]], dim=1)
    empty = ~binary.flatten(1).any(1)
    return torch.where(empty[:, None], torch.zeros_like(boxes), boxes + offset)


# --------------------------------------------------------------------------------------------------
# From proposals to one instance label image
# --------------------------------------------------------------------------------------------------


def resolve_overlaps(
    proposals: MaskProposals,
    tile_hw: tuple[int, int],
    min_unclaimed_fraction: float,
    min_area_px: float = 0.0,
) -> Segmentation:
    """Paint proposals into one label image, best predicted IoU first.

    A mask whose still unclaimed part is below ``min_unclaimed_fraction`` of its area (or below
    ``min_area_px``) is dropped as a duplicate of, or mostly covered by, better masks; otherwise its
    unclaimed pixels get the next label. Scores are the kept masks' predicted IoU.
    """
    labels = np.zeros(tile_hw, np.int32)
    scores: list[float] = []
    predicted_iou = proposals.predicted_iou.float().cpu().numpy()
    masks = proposals.full_res_masks()
    for index in np.argsort(-predicted_iou, kind="stable"):
        y0, x0, mask = masks[index]
        area = int(mask.sum())
        if area == 0:
            continue
        window = labels[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]]
        unclaimed = mask & (window == 0)
        n_unclaimed = int(unclaimed.sum())
        if n_unclaimed == 0 or n_unclaimed < min_area_px or n_unclaimed < min_unclaimed_fraction * area:
            continue  # (a mask wholly claimed by better ones has no pixel left, whatever the thresholds)
        scores.append(float(predicted_iou[index]))
        window[unclaimed] = len(scores)
    return Segmentation(labels=labels, scores=np.asarray(scores, np.float32))


class Sam2Segmenter:
    """MK segmenter: SAM2 automatic masks between ``min_area_um2`` and ``max_area_um2``.

    Args:
        checkpoint: local SAM2 checkpoint (``.pt`` with a ``"model"`` state dict); never downloaded.
        config: SAM2 model config inside the sam2 package, matching the checkpoint.
        device: ``auto`` | ``cpu`` | ``cuda``.
        min_area_um2: smallest MK kept.
        max_area_um2: largest MK kept.
        area_prefilter_margin: relative slack of the low-resolution area estimate that skips masks far
            outside the range before any full-resolution work (the exact area decides).
        min_unclaimed_fraction: a mask is kept only if at least this fraction of it is not already
            covered by masks with a higher predicted IoU.
        image_size: override of SAM2's input size (tests only; released checkpoints use 1024).
        use_bfloat16: bf16 autocast on CUDA (SAM2's recommended inference mode).
        **amg_settings: :class:`AmgSettings` fields (points_per_side, pred_iou_thresh, ...).

    Example:
        >>> seg = Sam2Segmenter(checkpoint="data/06_models/sam2.1_hiera_large.pt")  # doctest: +SKIP
        >>> seg.segment(tile_rgb, pixel_size_um=0.1725).n_cells  # doctest: +SKIP
    """

    name = "sam2"

    @classmethod
    def keyword_parameters(cls, arguments: Mapping[str, Any]) -> frozenset[str]:
        """The names ``**amg_settings`` accepts: the :class:`AmgSettings` fields."""
        return frozenset(f.name for f in fields(AmgSettings))

    def __init__(
        self,
        checkpoint: str,
        config: str = DEFAULT_CONFIG,
        device: str = "auto",
        min_area_um2: float = 200.0,
        max_area_um2: float = 2000.0,
        area_prefilter_margin: float = 0.25,
        min_unclaimed_fraction: float = 0.5,
        image_size: int | None = None,
        use_bfloat16: bool = True,
        **amg_settings: Any,
    ) -> None:
        if not 0 <= min_area_um2 < max_area_um2:
            raise ValueError(f"need 0 <= min_area_um2 < max_area_um2, got {min_area_um2}, {max_area_um2}")
        if not 0.0 <= min_unclaimed_fraction <= 1.0:
            raise ValueError(f"min_unclaimed_fraction must be in [0, 1], got {min_unclaimed_fraction}")
        if not 0.0 <= area_prefilter_margin < 1.0:
            raise ValueError(f"area_prefilter_margin must be in [0, 1), got {area_prefilter_margin}")
        self.settings = AmgSettings(**amg_settings)
        self.config = check_sam2_config(config)
        self.checkpoint = require_file(checkpoint, "SAM2 checkpoint")
        self.device = resolve_device(device)
        self.min_area_um2 = float(min_area_um2)
        self.max_area_um2 = float(max_area_um2)
        self.area_prefilter_margin = float(area_prefilter_margin)
        self.min_unclaimed_fraction = float(min_unclaimed_fraction)
        self.image_size = image_size
        self.use_bfloat16 = use_bfloat16
        self._generator: WindowedMaskGenerator | None = None

    @property
    def generator(self) -> WindowedMaskGenerator:
        """The mask generator, built (and SAM2 loaded) on first use."""
        if self._generator is None:
            enable_tf32(self.device)
            model = load_sam2_model(self.config, self.checkpoint, self.device, self.image_size)
            self._generator = WindowedMaskGenerator(model, self.settings)
        return self._generator

    def area_range_px(self, pixel_size_um: float) -> tuple[float, float]:
        """The MK area range in full-resolution pixels at this pixel size."""
        return self.min_area_um2 / pixel_size_um**2, self.max_area_um2 / pixel_size_um**2

    def propose(self, tile_rgb: np.ndarray, pixel_size_um: float) -> MaskProposals:
        """All masks that pass SAM2's filters and the MK area range, before overlaps are resolved."""
        with inference_context(self.device, self.use_bfloat16):
            tile = torch.from_numpy(np.ascontiguousarray(tile_rgb)).to(self.device)
            return self.generator.generate(
                tile,
                area_range_px=self.area_range_px(pixel_size_um),
                prefilter_margin=self.area_prefilter_margin,
                fingerprint=tile_fingerprint(tile_rgb),
            )

    def segment(self, tile_rgb: np.ndarray, pixel_size_um: float) -> Segmentation:
        """Segment MKs in one ``(H, W, 3)`` uint8 RGB tile."""
        proposals = self.propose(tile_rgb, pixel_size_um)
        with torch.inference_mode():
            return resolve_overlaps(
                proposals,
                tile_rgb.shape[:2],
                min_unclaimed_fraction=self.min_unclaimed_fraction,
                min_area_px=self.area_range_px(pixel_size_um)[0],
            )
