"""A segmentation run described as data, executed when the tile store dataset saves it.

The tile store is far too large to pass between nodes, and tiles are written one by one as they finish
(resume needs exactly that). So the segmentation node returns a :class:`SegmentationPlan` (which tiles, which
slides, which plugins) and the catalog's tile store dataset executes it into its folder, the same way a
Spark DataFrame is computed when its dataset writes it. All I/O stays in the catalog, and kedro-viz shows
the real data flow: tile sample -> segmentation -> tile store -> cells table.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from mk_hspc.engine.dask_executor import DaskRun
from mk_hspc.engine.tile_work import RunSummary, SegmentationSettings, SlideLike, segment_tiles
from mk_hspc.models.base import FeatureExtractor, Segmenter

logger = logging.getLogger(__name__)


@dataclass
class SegmentationPlan:
    """Everything a segmentation run needs; :meth:`run` executes it into a tile store folder.

    Attributes:
        tile_sample: the tiles to segment (contract ``tile_sample``).
        slide_openers: ``slide -> zero-argument opener`` (the catalog's lazy slide loaders).
        segmenters: ``cell_type -> segmenter``.
        feature_extractors: run on the kept cells.
        settings: threads, queue bounds, progress.
        params: configuration folded into the parameters hash.
        skip_failed_tiles: a store whose failed tiles (bad slides, corrupt regions) are recorded and left out
            still counts as complete (``ingestion.skip_bad_slides``); otherwise failures end the run.
        dask: run the tiles on a Dask cluster instead of this process's threads (same results).
    """

    tile_sample: pd.DataFrame
    slide_openers: Mapping[str, Callable[[], SlideLike]]
    segmenters: Mapping[str, Segmenter]
    feature_extractors: Sequence[FeatureExtractor] = ()
    settings: SegmentationSettings = field(default_factory=SegmentationSettings)
    params: Mapping[str, Any] = field(default_factory=dict)
    skip_failed_tiles: bool = False
    dask: DaskRun | None = None

    def run(self, store_dir: Path) -> RunSummary:
        """Segment every tile not already done; a slide or tile that fails is recorded, the rest goes on.

        Every opened slide is closed on every path. Returns the summary; the caller decides what failures
        mean (the tile store dataset refuses to mark the store complete).
        """
        slide_names = sorted(set(self.tile_sample["slide"].astype(str)))
        with contextlib.ExitStack() as stack:
            slides: dict[str, SlideLike] = {}
            unopened: dict[str, str] = {}
            for name in slide_names:
                if name not in self.slide_openers:
                    unopened[name] = "the slide is no longer in the slides folder"
                    continue
                try:
                    slide = self.slide_openers[name]()
                except Exception as exc:  # a slide that cannot be opened fails its tiles, not the run
                    unopened[name] = f"{type(exc).__name__}: {exc}"
                    continue
                slides[name] = slide
                close = getattr(slide, "close", None)
                if close is not None:
                    stack.callback(close)
            runnable = self.tile_sample[~self.tile_sample["slide"].astype(str).isin(unopened)]
            summary = segment_tiles(
                runnable,
                slides,
                store_dir,
                self.segmenters,
                self.feature_extractors,
                self.settings,
                params=self.params,
                isolate_failures=True,
                dask=self.dask,
            )
        if unopened:
            not_opened = self.tile_sample[self.tile_sample["slide"].astype(str).isin(unopened)]
            summary.failed_tiles.extend(
                {"tile_id": str(t), "slide": str(s), "stage": "open", "error": unopened[str(s)]}
                for t, s in zip(not_opened["tile_id"], not_opened["slide"], strict=True)
            )
            summary.failed_tiles.sort(key=lambda failure: failure["tile_id"])
        return summary
