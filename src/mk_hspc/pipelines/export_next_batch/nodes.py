"""The next round of labelling: the site exported again with each type's next batch on its first pages."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pandas as pd

from mk_hspc.czi import CziSlide
from mk_hspc.datasets.tile_store import TileStore
from mk_hspc.export.build import plan_site
from mk_hspc.export.site import SiteContent


def build_next_batch_site(
    cells: pd.DataFrame,
    tile_store: TileStore,
    raw_slides: Mapping[str, Callable[[], CziSlide]],
    mk_next_batch: pd.DataFrame,
    hspc_next_batch: pd.DataFrame,
    export: dict[str, Any],
) -> SiteContent:
    """The annotation site of every candidate, each type's pages starting with its next batch in rank order.

    The same site (every cell, same ids and crops), so labels given on either export are the same labels; only
    the page order puts the cells the classifier most needs first.

    Raises:
        ValueError: a batch names cells the cells table lacks (a batch from another study or segmentation).
    """
    ids = [
        str(cell_id)
        for batch in (mk_next_batch, hspc_next_batch)
        if len(batch)
        for cell_id in batch.sort_values("batch_rank", kind="stable")["cell_id"]
    ]
    unknown = sorted(set(ids) - set(cells["cell_id"].astype(str)))
    if unknown:
        raise ValueError(
            f"the next batch names {len(unknown)} cell(s) the cells table lacks, e.g. {unknown[:3]}: it was "
            "selected on other candidates; run `kedro run --pipelines train` again"
        )
    return plan_site(cells, tile_store, raw_slides, {**export, "first_cell_ids": ids})
