"""Project pipelines: one per stage, and the composed default run."""

from __future__ import annotations

from kedro.framework.project import find_pipelines
from kedro.pipeline import Pipeline


def register_pipelines() -> dict[str, Pipeline]:
    """Stages are discovered from ``mk_hspc.pipelines``; ``__default__`` runs them end to end."""
    pipelines = find_pipelines(raise_errors=True)
    pipelines["__default__"] = pipelines["ingestion"] + pipelines["segmentation"]
    return pipelines
