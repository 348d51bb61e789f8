"""The weight-free default segmenter: colour deconvolution, thresholds and marker-controlled watersheds.

This module is the plugin (:class:`ClassicalSegmenter`); the work lives in small modules beside it:

* :mod:`.nuclei` — ``mode: hspc``: nucleus candidates of every small haematopoietic cell (HSPC only after
  labelling and classification), each with a score in [0, 1];
* :mod:`.megakaryocytes` — ``mode: mk``: megakaryocyte candidates (nucleus + cytoplasm), each scored;
* :mod:`.binning` — each mode works at its own coarser pixel size (integer binning) and returns labels
  at the tile's size; :mod:`.label_measures` — vectorised per-label measurements;
* :mod:`mk_hspc.models.stain` — the colour deconvolution both modes share.

Both modes are recall first: a missed cell is lost for good, a false candidate costs one click. ``min_score``
is the operating point; the score of every kept candidate is returned (``Segmentation.scores``) and stored
per cell (the ``score`` column of the cells table). Every size is a micrometre parameter converted once
with the tile's pixel size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
from pydantic import TypeAdapter, ValidationError

from mk_hspc.models.base import Segmentation
from mk_hspc.models.segmenters.binning import bin_rgb, unbin_labels, working_factor
from mk_hspc.models.segmenters.label_measures import keep_labels, label_moments, nucleus_threshold
from mk_hspc.models.segmenters.megakaryocytes import MkParams, segment_megakaryocytes
from mk_hspc.models.segmenters.nuclei import HspcParams, nucleus_score, segment_nuclei
from mk_hspc.models.stain import separate_he
from mk_hspc.models.tile_memo import LastTileResults, tile_fingerprint

MODES = ("hspc", "mk")
_PARAMS_OF_MODE: dict[str, type] = {"hspc": HspcParams, "mk": MkParams}  # the parameters each mode takes

__all__ = [
    "MODES",
    "ClassicalSegmenter",
    "HspcParams",
    "MkParams",
    "bin_rgb",
    "keep_labels",
    "label_moments",
    "nucleus_threshold",
    "unbin_labels",
    "working_factor",
]


# The last MK pass per (MkParams, pixel size): the mk and hspc segmenters run one after the other on a tile.
_MK_PASS = LastTileResults()


class ClassicalSegmenter:
    """Weight-free H&E segmenter: nucleus candidates (``mode="hspc"``) or megakaryocyte candidates (``mode="mk"``).

    Args:
        mode: ``"hspc"`` or ``"mk"``.
        **params: fields of :class:`HspcParams` or :class:`MkParams` (micrometres), e.g.
            ``min_area_um2=200.0``; unknown names raise ``TypeError`` at construction.

    Example:
        >>> seg = ClassicalSegmenter(mode="mk", min_area_um2=100.0, max_area_um2=2000.0)
        >>> seg.segment(np.full((256, 256, 3), 240, np.uint8), pixel_size_um=0.1725).n_cells
        0
    """

    name = "classical"

    @classmethod
    def keyword_parameters(cls, arguments: Mapping[str, Any]) -> frozenset[str]:
        """The names ``**params`` accepts for the constructor's named ``arguments`` (the ``mode``); an
        unknown mode gets the ``mk`` names here and its own problem from :meth:`parameter_problems`."""
        return frozenset(f.name for f in dataclasses.fields(_PARAMS_OF_MODE.get(arguments["mode"], MkParams)))

    @classmethod
    def parameter_problems(cls, params: Mapping[str, Any]) -> list[str]:
        """``"name: problem"`` for each value of ``params`` its mode's dataclass cannot take (a string where a
        number goes, a range that is not two numbers), checked before any tile runs; unknown names are
        reported by the caller (:func:`mk_hspc.engine.plugins.plugin_problems`)."""
        mode = params.get("mode", "hspc")
        if mode not in MODES:
            return [f"mode: must be one of {', '.join(MODES)}, got {mode!r}"]
        known = cls.keyword_parameters({"mode": mode})
        values = {name: value for name, value in params.items() if name in known}
        problems = _type_problems(_PARAMS_OF_MODE[mode], values)
        if mode == "hspc" and not problems and isinstance(values.get("mk_params"), Mapping):
            mk_known = cls.keyword_parameters({"mode": "mk"})
            mk_values = {k: v for k, v in values["mk_params"].items() if k in mk_known}
            problems += [f"mk_params.{p}" for p in _type_problems(MkParams, mk_values)]
            problems += [
                f"mk_params.{name}: unknown parameter of the mk pass"
                for name in set(values["mk_params"]) - mk_known
            ]
        return problems

    def __init__(self, mode: str = "hspc", **params: Any) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        known = self.keyword_parameters({"mode": mode})
        unknown = sorted(set(params) - known)
        if unknown:
            raise TypeError(f"unknown parameter(s) for classical mode {mode!r}: {', '.join(unknown)}")
        for name in ("threshold_od_range", "threshold_contrast_od_range"):  # YAML gives a list
            if name in params:
                params[name] = tuple(params[name])
        self.params: HspcParams | MkParams = _PARAMS_OF_MODE[mode](**params)
        # The MK pass: the mode itself, or the HSPC mode's exclusion of MK lobes.
        self._mk_params = (
            MkParams(**self.params.mk_params) if isinstance(self.params, HspcParams) else self.params
        )
        if self.params.max_area_um2 <= self.params.min_area_um2:
            raise ValueError("max_area_um2 must exceed min_area_um2")

    @property
    def max_area_um2(self) -> float:
        """Largest cell (µm²) this segmenter returns; the segmentation node checks it against the tile overlap."""
        return float(self.params.max_area_um2)

    def segment(self, tile_rgb: np.ndarray, pixel_size_um: float) -> Segmentation:
        """Segment one ``(H, W, 3)`` uint8 RGB tile whose pixels are ``pixel_size_um`` wide."""
        if tile_rgb.ndim != 3 or tile_rgb.shape[2] != 3:
            raise ValueError(f"tile_rgb must be (H, W, 3), got {tile_rgb.shape}")
        shape = tile_rgb.shape[:2]
        if self.mode == "mk":
            labels, scores = self._segment_mk(tile_rgb, pixel_size_um)
            factor = working_factor(pixel_size_um, self._mk_params.working_pixel_size_um)
        else:
            labels, scores = self._segment_hspc(tile_rgb, pixel_size_um)
            factor = working_factor(pixel_size_um, self.params.working_pixel_size_um)
        # Binning pads to ceil(H / factor) rows, so every binned pixel keeps at least one tile pixel and no
        # label can vanish when cropped; checked on the binned labels (1 / factor² of the tile's pixels).
        if labels.shape != tuple(-(-n // factor) for n in shape):
            raise ValueError(f"binned labels {labels.shape} do not cover the tile {shape} at factor {factor}")
        full = unbin_labels(labels, factor, shape)
        if not full.flags.writeable:  # the memoised MK pass at factor 1: hand out a copy
            full = full.copy()
        return Segmentation(labels=full.astype(np.int32, copy=False), scores=scores.astype(np.float32))

    def _segment_mk(self, tile_rgb: np.ndarray, pixel_size_um: float) -> tuple[np.ndarray, np.ndarray]:
        """The MK pass at its working resolution; computed once per tile and parameter set, so the ``hspc``
        mode's exclusion of MK lobes reuses the ``mk`` mode's result on the same tile."""
        p = self._mk_params
        key = (repr(p), float(pixel_size_um))  # repr: parameters from YAML may hold lists
        fingerprint = tile_fingerprint(tile_rgb)
        cached = _MK_PASS.get(key, fingerprint)
        if cached is not None:
            return cached
        factor = working_factor(pixel_size_um, p.working_pixel_size_um)
        result = segment_megakaryocytes(separate_he(bin_rgb(tile_rgb, factor)), pixel_size_um * factor, p)
        for array in result:
            array.setflags(write=False)  # shared through the memo
        _MK_PASS.put(key, fingerprint, result)
        return result

    def _segment_hspc(self, tile_rgb: np.ndarray, pixel_size_um: float) -> tuple[np.ndarray, np.ndarray]:
        p = self.params
        if not isinstance(p, HspcParams):
            raise TypeError("the hspc pass needs HspcParams")
        factor = working_factor(pixel_size_um, p.working_pixel_size_um)
        stains = separate_he(bin_rgb(tile_rgb, factor))
        labels, features = segment_nuclei(stains, pixel_size_um * factor, p)
        score = nucleus_score(features, p)
        area = features["area_um2"]
        keep = (score >= p.min_score) & (area >= p.min_area_um2) & (area <= p.max_area_um2)
        if p.exclude_mk_nuclei and keep.any():
            mk_labels, mk_scores = self._segment_mk(tile_rgb, pixel_size_um)
            if mk_labels.max() > 0:
                mk_factor = working_factor(pixel_size_um, self._mk_params.working_pixel_size_um)
                # Nucleus centroids in tile pixels, then in the MK pass's binned pixels.
                y = ((features["centroid_y"] + 0.5) * factor / mk_factor).astype(int)
                x = ((features["centroid_x"] + 0.5) * factor / mk_factor).astype(int)
                y = np.clip(y, 0, mk_labels.shape[0] - 1)
                x = np.clip(x, 0, mk_labels.shape[1] - 1)
                inside_mk = mk_labels[y, x]
                strong = np.concatenate([[False], mk_scores >= p.exclude_mk_min_score])
                keep &= ~strong[inside_mk]
        return keep_labels(labels, keep), score[keep]


def _type_problems(param_class: type, values: Mapping[str, Any]) -> list[str]:
    """Pydantic's check of ``values`` against a parameter dataclass's annotations, one line per problem."""
    try:
        TypeAdapter(param_class).validate_python(dict(values))
    except ValidationError as error:
        return [
            f"{'.'.join(str(part) for part in problem['loc'])}: {problem['msg']} (got {problem['input']!r})"
            for problem in error.errors()
        ]
    return []
