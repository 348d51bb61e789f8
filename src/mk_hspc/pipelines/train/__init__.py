"""train stage."""

from mk_hspc.pipelines.train.pipeline import create_pipeline

__all__ = ["create_pipeline"]
