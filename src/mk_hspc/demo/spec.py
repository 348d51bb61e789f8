"""The demo study's specification: every knob of the synthetic H&E marrow slides in one dataclass."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# Bumped whenever the generator's output for a given spec changes, so that make_demo_study rewrites a study
# of an older generator instead of calling it up to date (the ingestion pipeline calls it only for an empty
# slides folder: a demo already in data/01_raw stays as it is). 2: typed confounders, lobulated MKs,
# chromatin texture; 3: a marrow-like mix of the small nucleated cells (HSPC 20%).
GENERATOR_VERSION = "3"


@dataclass(frozen=True)
class GroupSpec:
    """One experimental group of the study (sex x treatment) and how it shifts cell densities."""

    name: str
    sex: str
    treatment: str
    mk_density_factor: float = 1.0
    hspc_density_factor: float = 1.0


def _default_groups() -> tuple[GroupSpec, ...]:
    # Treated groups have more MKs and HSPCs so per-group reports have an effect to show.
    return (
        GroupSpec("F_vehicle", "F", "vehicle", 1.0, 1.0),
        GroupSpec("F_treated", "F", "treated", 1.6, 1.25),
        GroupSpec("M_vehicle", "M", "vehicle", 0.85, 0.9),
        GroupSpec("M_treated", "M", "treated", 1.4, 1.15),
    )


@dataclass(frozen=True)
class DemoSpec:
    """What the demo study looks like; the same spec and seed always give the same files.

    Sizes are in pixels of ``pixel_size_um``; densities are per mm² of marrow (tissue that is
    neither fat nor bone). Ranges are ``(low, high)`` tuples sampled per slide or per object.
    Stain vectors are optical densities per unit concentration for (R, G, B); the defaults are
    Macenko estimates on the BM_GRAZ H&E marrow images (close to the usual Macenko reference).
    """

    n_slides: int = 8
    width_px: int = 12000
    height_px: int = 9000
    pixel_size_um: float = 0.1725
    tile_px: int = 2048
    seed: int = 0
    groups: tuple[GroupSpec, ...] = field(default_factory=_default_groups)
    # Slide layout
    origin_range_px: tuple[int, int] = (-60000, 150000)
    tissue_fraction_range: tuple[float, float] = (0.40, 0.60)
    tissue_blob_scale_um: float = 220.0
    fat_fraction_range: tuple[float, float] = (0.10, 0.22)
    vacuole_diameter_um: tuple[float, float] = (30.0, 100.0)
    vacuole_gap_um: float = 1.5
    fat_cluster_fraction: float = 0.6
    trabeculae_per_mm2: float = 2.0
    trabecula_width_um: tuple[float, float] = (15.0, 60.0)
    trabecula_length_um: tuple[float, float] = (300.0, 1200.0)
    # Targets (ground truth types "mk" and "hspc"; the group factors scale these two only). The small
    # nucleated cells are 5,000 / mm² in all, of which HSPCs 20%: still generous (in real marrow blasts and
    # progenitors are a few percent, maturing myeloid and erythroid cells most of the rest) but no longer
    # the 60% majority of generator 2, which made the HSPC labels a balanced, easy task unlike a lab's.
    hspc_per_mm2: float = 1000.0
    hspc_cluster_fraction: float = 0.4
    hspc_n_variants: int = 400
    hspc_nucleus_diameter_um: tuple[float, float] = (5.5, 10.0)
    hspc_cytoplasm_rim_um: tuple[float, float] = (0.6, 1.8)
    mk_per_mm2: float = 15.0
    mk_area_um2: tuple[float, float] = (200.0, 2000.0)
    max_overlap_fraction: float = 0.2
    mk_gap_um: float = 3.0
    # Confounders (in the ground truth with their own types, the same density in every group)
    confounder_n_variants: int = 120  # stamp designs per small confounder type
    lymphocyte_per_mm2: float = 1000.0
    lymphocyte_nucleus_diameter_um: tuple[float, float] = (4.5, 6.5)
    erythroblast_per_mm2: float = 1500.0
    erythroblast_diameter_um: tuple[float, float] = (7.0, 10.0)
    erythroblast_island_fraction: float = 0.7  # the rest are scattered
    granulocyte_per_mm2: float = 1500.0
    granulocyte_diameter_um: tuple[float, float] = (10.0, 13.5)
    osteoclast_per_mm2: float = 3.0  # of marrow; they sit on bone surfaces
    osteoclast_area_um2: tuple[float, float] = (200.0, 1500.0)
    nucleus_cluster_per_mm2: float = 8.0
    debris_per_mm2: float = 5.0
    debris_area_um2: tuple[float, float] = (200.0, 2000.0)
    # Background (not in the ground truth)
    rbc_per_mm2: float = 1500.0
    rbc_diameter_um: tuple[float, float] = (5.5, 7.0)
    stroma_cell_spacing_um: float = 5.5
    # Optics and stain
    stain_h_od: tuple[float, float, float] = (0.62, 0.70, 0.36)
    stain_e_od: tuple[float, float, float] = (0.12, 0.90, 0.42)
    stain_strength_jitter: float = 0.12
    illumination_rgb: tuple[float, float, float] = (243.0, 242.0, 245.0)
    blur_sigma_px: float = 1.0
    camera_noise_sigma: float = 2.0
    # Outputs
    field_downsample: int = 4
    tissue_mask_downsample: int = 16
    compression: str = "zstd1:ExplicitLevel=1"

    def __post_init__(self) -> None:
        # Accept what YAML/JSON give (lists, dicts) so that overrides from conf/ just work.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "groups":
                value = tuple(g if isinstance(g, GroupSpec) else GroupSpec(**g) for g in value)
            elif isinstance(value, list):
                value = tuple(value)
            object.__setattr__(self, f.name, value)
        if self.tissue_mask_downsample % self.field_downsample:
            raise ValueError("tissue_mask_downsample must be a multiple of field_downsample")
        if self.n_slides < 1 or self.width_px < 256 or self.height_px < 256:
            raise ValueError("a demo study needs at least one slide of at least 256 x 256 px")
        if self.pixel_size_um <= 0 or self.tile_px < 64:
            raise ValueError("pixel_size_um must be > 0 and tile_px >= 64")
        if not self.groups:
            raise ValueError("a demo study needs at least one group")
        if not 0.0 <= self.max_overlap_fraction < 1.0:
            raise ValueError("max_overlap_fraction must be in [0, 1)")

    @classmethod
    def default(cls) -> DemoSpec:
        """The main run's study: 8 slides in 4 groups, each ~2.1 x 1.6 mm (about 12 tiles of 3000 px)."""
        return cls()

    @classmethod
    def small(cls) -> DemoSpec:
        """A study for tests: 4 small slides (one per group) written in a few seconds, MKs and the MK-sized
        confounders made common."""
        return cls(
            n_slides=4,
            width_px=2400,
            height_px=2000,
            tile_px=1024,
            mk_per_mm2=80.0,
            hspc_n_variants=120,
            confounder_n_variants=40,
            osteoclast_per_mm2=40.0,
            nucleus_cluster_per_mm2=60.0,
            debris_per_mm2=40.0,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (tuples become lists) used by the manifest."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DemoSpec:
        """Inverse of :meth:`to_dict`."""
        return cls(**data)
