"""Labels: label store -> labels JSON (what `kedro annotate export` also writes)."""

from kedro.pipeline import Pipeline, node, pipeline

from mk_hspc.pipelines.labels import nodes


def create_pipeline(**kwargs) -> Pipeline:
    return pipeline([node(nodes.export_labels, "label_store", "labels", name="export_labels")])
