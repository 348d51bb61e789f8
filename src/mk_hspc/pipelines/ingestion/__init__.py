"""Ingestion stage."""

from mk_hspc.pipelines.ingestion.pipeline import create_pipeline

__all__ = ["create_pipeline"]
