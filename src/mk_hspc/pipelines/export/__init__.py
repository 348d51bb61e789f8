"""Export stage: the annotation site, QuPath GeoJSON and Label Studio tasks."""

from mk_hspc.pipelines.export.pipeline import create_pipeline

__all__ = ["create_pipeline"]
