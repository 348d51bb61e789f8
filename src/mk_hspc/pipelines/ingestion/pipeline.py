"""Ingestion: slides -> metadata, slide groups, tissue maps, tile grid, pooled sample, overlays."""

from kedro.pipeline import Pipeline, node, pipeline

from mk_hspc.pipelines.ingestion import nodes


def create_pipeline(**kwargs) -> Pipeline:
    return pipeline(
        [
            node(
                nodes.prepare_demo_slides,
                ["params:demo", "params:ingestion.slides_dir"],
                "demo_manifest",
                name="prepare_demo_slides",
            ),
            node(
                nodes.read_slide_metadata,
                ["raw_slides", "demo_manifest", "params:ingestion"],
                "slide_meta",
                name="read_slide_metadata",
            ),
            node(
                nodes.make_slide_groups,
                [
                    "slide_sheet",
                    "slide_meta",
                    "params:ingestion.slide_sheet_strict",
                    "params:demo.slide_sheet",
                ],
                "slide_groups",
                name="validate_slide_sheet",
            ),
            node(
                nodes.make_tissue_maps,
                ["raw_slides", "slide_meta", "params:ingestion"],
                ["tissue_maps", "tissue_calibration"],
                name="make_tissue_maps",
            ),
            node(
                nodes.make_tile_index,
                ["slide_meta", "tissue_maps", "params:ingestion"],
                "tile_index",
                name="make_tile_index",
            ),
            node(
                nodes.make_tile_sample, ["tile_index", "params:ingestion"], "tile_sample", name="sample_tiles"
            ),
            node(
                nodes.plot_tissue_overlays,
                ["tissue_maps", "tile_index", "tile_sample"],
                "tissue_overlays",
                name="plot_tissue_overlays",
            ),
        ]
    )
