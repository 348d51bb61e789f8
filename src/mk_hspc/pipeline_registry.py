"""Project pipelines: one per stage, and the composed default run."""

from __future__ import annotations

from kedro.framework.project import find_pipelines
from kedro.pipeline import Pipeline

# The stages `kedro run` (no --pipeline) runs, in order: the main job on the embedded default.
DEFAULT_STAGES = ("ingestion", "segmentation")


def register_pipelines() -> dict[str, Pipeline]:
    """Stages are discovered from ``mk_hspc.pipelines``; ``__default__`` composes them end to end.

    Kedro only imports the pipelines a run asks for, so the default is composed from those present.
    """
    pipelines = find_pipelines(raise_errors=True)
    pipelines["__default__"] = sum(
        (pipelines[name] for name in DEFAULT_STAGES if name in pipelines), Pipeline([])
    )
    return pipelines
