"""Full run: all tissue tiles -> tile store (finished sampled tiles reused) -> cells -> validated models ->
final cells, counts and densities per slide and group, plots, group comparison."""

from kedro.pipeline import Pipeline, node, pipeline

from mk_hspc.pipelines.full import nodes
from mk_hspc.pipelines.segmentation import nodes as segmentation


def create_pipeline(**kwargs) -> Pipeline:
    return pipeline(
        [
            node(nodes.make_full_tile_sample, "tile_index", "full_tile_sample", name="make_full_tile_sample"),
            node(
                segmentation.segment_sampled_tiles,
                ["full_tile_sample", "raw_slides", "params:segmentation", "params:ingestion"],
                "full_tile_store",
                name="segment_all_tissue_tiles",
            ),
            node(
                segmentation.make_cells_table,
                ["full_tile_store", "full_tile_sample"],
                "full_cells",
                name="make_full_cells_table",
            ),
            node(
                nodes.apply_validated_models,
                ["full_cells", "full_tile_store", "labels", "params:train"],
                "final_cells",
                name="apply_validated_models",
            ),
            node(
                nodes.summarise_final_counts,
                [
                    "final_cells",
                    "full_tile_sample",
                    "full_tile_store",
                    "slide_meta",
                    "slide_groups",
                    "slide_sheet",
                    "tissue_maps",
                    "params:train",
                ],
                ["final_counts", "group_comparison", "final_plots"],
                name="summarise_final_counts",
            ),
        ]
    )
