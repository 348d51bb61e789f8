"""Training: one modular pipeline (labels -> training set -> gated MLflow model -> next batch), instantiated
per cell type under the namespaces ``mk`` and ``hspc``."""

from kedro.pipeline import Pipeline, node, pipeline

from mk_hspc.pipelines.train import nodes

CELL_TYPES = ("mk", "hspc")


def classifier_pipeline() -> Pipeline:
    """The per-type template; its free inputs are the shared ``labels``, ``cells`` and ``tile_store``."""
    return pipeline(
        [
            node(
                nodes.make_training_set,
                ["labels", "cells", "tile_store", "params:train", "params:classifier"],
                ["training_set", "training_summary"],
                name="make_training_set",
            ),
            node(
                nodes.train_classifier,
                ["training_set", "training_summary", "params:train", "params:classifier"],
                ["training_report", "model"],
                name="train_classifier",
            ),
            node(
                nodes.select_next_batch,
                [
                    "model",
                    "training_summary",
                    "cells",
                    "labels",
                    "tile_store",
                    "params:train",
                    "params:classifier",
                ],  # fmt: skip
                "next_batch",
                name="select_next_batch",
            ),
        ]
    )


def create_pipeline(**kwargs) -> Pipeline:
    return sum(
        (
            pipeline(
                classifier_pipeline(),
                namespace=cell_type,
                inputs={"labels", "cells", "tile_store"},
                parameters={
                    "params:train": "params:train",
                    "params:classifier": f"params:train.classifiers.{cell_type}",
                },
            )
            for cell_type in CELL_TYPES
        ),
        Pipeline([]),
    )
