"""The next labelling round: `kedro run --pipelines export_next_batch` after `--pipelines train`."""

from kedro.pipeline import Pipeline, node, pipeline

from mk_hspc.pipelines.export_next_batch import nodes


def create_pipeline(**kwargs) -> Pipeline:
    return pipeline(
        [
            node(
                nodes.build_next_batch_site,
                ["cells", "tile_store", "raw_slides", "mk.next_batch", "hspc.next_batch", "params:export"],
                "annotation_site",
                name="build_next_batch_site",
            )
        ]
    )
