"""The demo loop's annotator: labels the demo's candidates from its ground truth (never for a lab's slides:
it needs ``data/01_raw/ground_truth/cells.parquet``)."""

from kedro.pipeline import Pipeline, node, pipeline

from mk_hspc.pipelines.simulate_labels import nodes


def create_pipeline(**kwargs) -> Pipeline:
    return pipeline(
        [
            node(
                nodes.simulate_demo_labels,
                ["cells", "demo_ground_truth", "slide_meta", "params:simulated_annotator"],
                "labels",
                name="simulate_demo_labels",
            )
        ]
    )
