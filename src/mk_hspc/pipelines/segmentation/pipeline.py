"""Segmentation: sampled tiles -> tile store -> cells table -> counts per slide and group."""

from kedro.pipeline import Pipeline, node, pipeline

from mk_hspc.pipelines.segmentation import nodes


def create_pipeline(**kwargs) -> Pipeline:
    return pipeline(
        [
            node(
                nodes.segment_sampled_tiles,
                ["tile_sample", "slide_meta", "raw_slides", "params:segmentation"],
                "segmentation_run",
                name="segment_sampled_tiles",
            ),
            node(
                nodes.make_cells_table,
                ["segmentation_run", "tile_sample", "params:segmentation"],
                "cells",
                name="make_cells_table",
            ),
            node(
                nodes.summarise_cell_counts,
                ["cells", "tile_sample", "slide_meta", "slide_groups"],
                ["cell_counts", "cell_counts_plot"],
                name="summarise_cell_counts",
            ),
        ]
    )
