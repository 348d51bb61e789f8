"""Plugins from conf: the segmenter of each cell type and the feature extractors, built with their parameters."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from mk_hspc.models import create_feature_extractor, create_segmenter
from mk_hspc.models.base import FeatureExtractor, Segmenter
from mk_hspc.models.registry import FEATURE_GROUP, SEGMENTER_GROUP, plugin_class


def _plugin_params(group: str, spec: Mapping[str, Any], device: str) -> dict[str, Any]:
    """A plugin's parameters, plus the run-wide ``device`` when its constructor takes one."""
    params = dict(spec.get("params") or {})
    if "device" not in params and "device" in inspect.signature(plugin_class(group, spec["name"])).parameters:
        params["device"] = device
    return params


def build_plugins(segmentation: Mapping[str, Any]) -> tuple[dict[str, Segmenter], list[FeatureExtractor]]:
    """Segmenters by cell type and feature extractors, as chosen in ``parameters_segmentation.yml``."""
    device = segmentation.get("device", "auto")
    segmenters = {
        cell_type: create_segmenter(spec["name"], **_plugin_params(SEGMENTER_GROUP, spec, device))
        for cell_type, spec in segmentation["segmenters"].items()
    }
    extractors = [
        create_feature_extractor(spec["name"], **_plugin_params(FEATURE_GROUP, spec, device))
        for spec in segmentation.get("features") or []
    ]
    return segmenters, extractors
