"""Segmentation: sampled tiles -> tile store -> cells table -> counts per slide and group."""

from kedro.pipeline import Pipeline, node, pipeline

from mk_hspc.pipelines.segmentation import nodes


def create_pipeline(**kwargs) -> Pipeline:
    return pipeline(
        [
            node(
                nodes.segment_sampled_tiles,
                ["tile_sample", "raw_slides", "params:segmentation", "params:ingestion"],
                "tile_store",
                name="segment_sampled_tiles",
            ),
            node(
                nodes.make_cells_table,
                ["tile_store", "tile_sample"],
                "cells",
                name="make_cells_table",
            ),
            node(
                nodes.summarise_cell_counts,
                [
                    "cells",
                    "tile_store",
                    "tile_sample",
                    "slide_meta",
                    "slide_groups",
                    "params:segmentation.segmenters",
                ],
                ["cell_counts", "cell_counts_plot"],
                name="summarise_cell_counts",
            ),
        ]
    )
