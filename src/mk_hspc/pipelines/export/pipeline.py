"""Export: cells + tile store + slides -> annotation site, QuPath GeoJSON, Label Studio tasks."""

from kedro.pipeline import Pipeline, node, pipeline

from mk_hspc.pipelines.export import nodes


def create_pipeline(**kwargs) -> Pipeline:
    return pipeline(
        [
            node(
                nodes.build_annotation_site,
                ["cells", "tile_store", "raw_slides", "params:export"],
                "annotation_site",
                name="build_annotation_site",
            ),
            node(
                nodes.make_qupath_geojson,
                ["cells", "tile_store", "slide_meta", "params:export"],
                "qupath_geojson",
                name="make_qupath_geojson",
            ),
            node(
                nodes.make_label_studio_tasks,
                ["cells", "params:export"],
                "label_studio_tasks",
                name="make_label_studio_tasks",
            ),
        ]
    )
