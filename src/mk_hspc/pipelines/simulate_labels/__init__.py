"""simulate_labels stage."""

from mk_hspc.pipelines.simulate_labels.pipeline import create_pipeline

__all__ = ["create_pipeline"]
