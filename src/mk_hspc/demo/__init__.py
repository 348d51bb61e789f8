"""The demo study: synthetic H&E bone-marrow slides written as real CZI files, with ground truth.

It is the project's embedded default (no lab data, no weights): it runs the pipeline end to end and gives
tests a ground truth that types every object (targets ``mk`` and ``hspc`` and typed confounders). It is
not where thresholds are tuned: real images decide quality.
"""

from mk_hspc.demo.spec import DemoSpec, GroupSpec
from mk_hspc.demo.writer import (
    DemoStudy,
    demo_files,
    load_tissue_truth,
    make_demo_study,
    slide_sheet,
    tile_tissue_fraction_truth,
)

__all__ = [
    "DemoSpec",
    "DemoStudy",
    "GroupSpec",
    "demo_files",
    "load_tissue_truth",
    "make_demo_study",
    "slide_sheet",
    "tile_tissue_fraction_truth",
]
