"""The annotation site with the next batch of the active-learning round on its first pages."""

from mk_hspc.pipelines.export_next_batch.pipeline import create_pipeline

__all__ = ["create_pipeline"]
