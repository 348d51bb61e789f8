"""Model plugins: segmenters and feature extractors behind one protocol each (see ``base``)."""

from mk_hspc.models.base import FeatureExtractor, Segmentation, Segmenter
from mk_hspc.models.registry import available_plugins, create_feature_extractor, create_segmenter

__all__ = [
    "FeatureExtractor",
    "Segmentation",
    "Segmenter",
    "available_plugins",
    "create_feature_extractor",
    "create_segmenter",
]
