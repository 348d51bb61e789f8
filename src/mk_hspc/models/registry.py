"""Find and build plugins registered under the ``mk_hspc.segmenters`` / ``mk_hspc.features`` entry points."""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

from mk_hspc.models.base import FeatureExtractor, Segmenter

SEGMENTER_GROUP = "mk_hspc.segmenters"
FEATURE_GROUP = "mk_hspc.features"


def available_plugins(group: str) -> list[str]:
    """Names registered in an entry-point group (built-ins and any installed lab plugins)."""
    return sorted(ep.name for ep in entry_points(group=group))


def plugin_class(group: str, name: str) -> type:
    """The class registered as ``name`` in ``group`` (not instantiated)."""
    matches = [ep for ep in entry_points(group=group) if ep.name == name]
    if not matches:
        raise KeyError(
            f"No plugin named {name!r} in entry-point group {group!r}; "
            f"available: {', '.join(available_plugins(group)) or 'none'}"
        )
    return matches[0].load()


def create_segmenter(name: str, **params: Any) -> Segmenter:
    """Build the segmenter registered as ``name`` with its parameters from ``conf/``."""
    segmenter = plugin_class(SEGMENTER_GROUP, name)(**params)
    if not isinstance(segmenter, Segmenter):
        raise TypeError(f"Segmenter plugin {name!r} does not implement the Segmenter protocol")
    return segmenter


def create_feature_extractor(name: str, **params: Any) -> FeatureExtractor:
    """Build the feature extractor registered as ``name`` with its parameters from ``conf/``."""
    extractor = plugin_class(FEATURE_GROUP, name)(**params)
    if not isinstance(extractor, FeatureExtractor):
        raise TypeError(f"Feature plugin {name!r} does not implement the FeatureExtractor protocol")
    return extractor
