"""Labels stage: the label store's current labels -> the labels JSON dataset classification reads."""

from mk_hspc.pipelines.labels.pipeline import create_pipeline

__all__ = ["create_pipeline"]
