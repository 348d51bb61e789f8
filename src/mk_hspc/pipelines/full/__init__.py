"""full stage."""

from mk_hspc.pipelines.full.pipeline import create_pipeline

__all__ = ["create_pipeline"]
