"""Segmentation stage."""

from mk_hspc.pipelines.segmentation.pipeline import create_pipeline

__all__ = ["create_pipeline"]
