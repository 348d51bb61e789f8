"""Plugins from conf: the segmenter of each cell type and the feature extractors, built with their parameters.

Every plugin keeps its parameters under its own name, and one key selects what runs: ``name`` for the
segmenter of a cell type, ``enabled`` for a feature extractor. So an environment (``conf/gpu``) switches a
model by overriding that key alone, and a soft merge of conf never mixes one plugin's parameters into
another's::

    segmentation:
      segmenters:
        mk: {name: classical, params: {classical: {mode: mk}, sam2: {checkpoint: ...}}}
      features:                                     # run in this order
        morphology: {enabled: true, params: {}}
        resnet50: {enabled: false, params: {weights: ...}}

Parameter names are checked against each plugin's constructor before anything is built, so a misspelt key
stops the run at its start with the key's full path, instead of being ignored or failing deep in a run.
"""

from __future__ import annotations

import inspect
import logging
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mk_hspc.errors import UserError
from mk_hspc.models import create_feature_extractor, create_segmenter
from mk_hspc.models.base import FeatureExtractor, Segmenter
from mk_hspc.models.registry import FEATURE_GROUP, SEGMENTER_GROUP, available_plugins, plugin_class
from mk_hspc.params_schema import ParameterError

logger = logging.getLogger(__name__)

# The run-wide ``segmentation.device`` goes to every plugin whose constructor takes this parameter.
DEVICE_PARAMETER = "device"
_NAMED_KINDS = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


@dataclass(frozen=True)
class PluginChoice:
    """One plugin to build: entry-point group and name, its parameters, and their dotted key in conf."""

    group: str
    name: str
    params: Mapping[str, Any]
    key: str


class TileOverlapError(UserError, ValueError):
    """A segmenter's largest cell is wider than the tiles' overlap: cells could be split at tile edges."""


def chosen_plugins(segmentation: Mapping[str, Any]) -> tuple[dict[str, PluginChoice], list[PluginChoice]]:
    """The segmenter chosen for each cell type and the enabled feature extractors (in conf order)."""
    segmenters = {}
    for cell_type, spec in segmentation["segmenters"].items():
        name = spec["name"]
        params = (spec.get("params") or {}).get(name) or {}
        key = f"segmentation.segmenters.{cell_type}.params.{name}"
        segmenters[cell_type] = PluginChoice(SEGMENTER_GROUP, name, params, key)
    features = [
        PluginChoice(FEATURE_GROUP, name, spec.get("params") or {}, f"segmentation.features.{name}.params")
        for name, spec in (segmentation.get("features") or {}).items()
        if spec["enabled"]
    ]
    return segmenters, features


def accepted_parameters(plugin: type, params: Mapping[str, Any]) -> tuple[frozenset[str] | None, list[str]]:
    """``(accepted, required)`` parameter names of ``plugin(**params)``; ``accepted`` is None when the
    constructor takes ``**kwargs`` without naming them (see :class:`mk_hspc.models.base.Segmenter`)."""
    signature = inspect.signature(plugin)
    named = {name: p for name, p in signature.parameters.items() if p.kind in _NAMED_KINDS}
    required = [name for name, p in named.items() if p.default is inspect.Parameter.empty]
    accepted: frozenset[str] | None = frozenset(named)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()):
        declared = getattr(plugin, "keyword_parameters", None)
        if declared is None:
            return None, required
        arguments = {name: params.get(name, p.default) for name, p in named.items()}
        accepted |= declared(arguments)
    return accepted, required


def _parameter_problems(choice: PluginChoice) -> list[str]:
    plugin = plugin_class(choice.group, choice.name)
    accepted, required = accepted_parameters(plugin, choice.params)
    problems = [
        f"{choice.key}.{name}: missing (the {choice.name!r} plugin requires it)"
        for name in required
        if name not in choice.params and name != DEVICE_PARAMETER
    ]
    if accepted is not None:
        problems += [
            f"{choice.key}.{name}: unknown parameter of the {choice.name!r} plugin; "
            f"accepted: {', '.join(sorted(accepted))}"
            for name in sorted(set(choice.params) - accepted)
        ]
    # A plugin may check its values too (types, ranges): refused here, not by every tile later.
    check = getattr(plugin, "parameter_problems", None) or (
        lambda params: annotation_problems(plugin, params)
    )
    problems += [f"{choice.key}.{problem}" for problem in check(choice.params)]
    return problems


def annotation_problems(plugin: type, params: Mapping[str, Any]) -> list[str]:
    """``"name: problem"`` for each value that its constructor parameter's type hint refuses (pydantic, lax:
    ``8`` passes for a float, ``"big"`` does not), so that a learned plugin's bad value stops the run at its
    start like the classical plugin's, instead of at the first tile; plugins with their own
    ``parameter_problems`` (nested parameter dataclasses) use that instead."""
    from pydantic import TypeAdapter, ValidationError

    try:
        hints = typing.get_type_hints(plugin.__init__)
    except (NameError, TypeError):  # an annotation that cannot be resolved: nothing to check against
        return []
    problems = []
    for name, value in params.items():
        if name not in hints:
            continue
        try:
            TypeAdapter(hints[name]).validate_python(value)
        except ValidationError as error:
            first = error.errors()[0]
            problems.append(f"{name}: {first['msg']} (got {value!r})")
    return problems


def plugin_problems(segmentation: Mapping[str, Any]) -> list[str]:
    """Every unknown plugin name and every unknown or missing parameter of a chosen plugin, each with its
    dotted key. Only the chosen plugins are loaded (a learned model's module imports torch)."""
    available = {group: available_plugins(group) for group in (SEGMENTER_GROUP, FEATURE_GROUP)}

    def unknown(key: str, group: str, name: str) -> str:
        return f"{key}: no plugin named {name!r} in {group}; available: {', '.join(available[group])}"

    problems = []
    for cell_type, spec in segmentation["segmenters"].items():
        key = f"segmentation.segmenters.{cell_type}"
        if spec["name"] not in available[SEGMENTER_GROUP]:
            problems.append(unknown(f"{key}.name", SEGMENTER_GROUP, spec["name"]))
        problems += [
            unknown(f"{key}.params.{name}", SEGMENTER_GROUP, name)
            for name in spec.get("params") or {}
            if name not in available[SEGMENTER_GROUP]
        ]
    problems += [
        unknown(f"segmentation.features.{name}", FEATURE_GROUP, name)
        for name in segmentation.get("features") or {}
        if name not in available[FEATURE_GROUP]
    ]
    segmenters, features = chosen_plugins(segmentation)
    for choice in [*segmenters.values(), *features]:
        if choice.name in available[choice.group]:
            problems += _parameter_problems(choice)
    return problems


def _with_device(choice: PluginChoice, device: str) -> dict[str, Any]:
    """A plugin's parameters, plus the run-wide ``device`` when its constructor takes one."""
    params = dict(choice.params)
    takes_device = DEVICE_PARAMETER in inspect.signature(plugin_class(choice.group, choice.name)).parameters
    if takes_device and DEVICE_PARAMETER not in params:
        params[DEVICE_PARAMETER] = device
    return params


def build_plugins(segmentation: Mapping[str, Any]) -> tuple[dict[str, Segmenter], list[FeatureExtractor]]:
    """Segmenters by cell type and feature extractors, as chosen in ``parameters_segmentation.yml``.

    Raises:
        ParameterError: an unknown plugin name, or an unknown or missing plugin parameter (all of them,
            each with its dotted key); nothing is built then.
    """
    problems = plugin_problems(segmentation)
    if problems:
        raise ParameterError(problems)
    device = segmentation.get("device", "auto")
    segmenters, features = chosen_plugins(segmentation)
    built = {
        cell_type: create_segmenter(choice.name, **_with_device(choice, device))
        for cell_type, choice in segmenters.items()
    }
    extractors = [
        create_feature_extractor(choice.name, **_with_device(choice, device)) for choice in features
    ]
    return built, extractors


def check_overlap_covers_cells(segmenters: Mapping[str, Any], largest_cell_um: float) -> None:
    """Refuse segmenters that may report cells wider than the tile overlap (they could be split or cut).

    A segmenter's bound is its ``max_area_um2`` (attribute or ``params`` field); a cell of that area is at
    least ``2 sqrt(area / pi)`` µm across. Segmenters without a bound are logged, since nothing can be
    checked.
    """
    for cell_type, segmenter in segmenters.items():
        max_area_um2 = getattr(segmenter, "max_area_um2", None)
        if max_area_um2 is None:
            max_area_um2 = getattr(getattr(segmenter, "params", None), "max_area_um2", None)
        if max_area_um2 is None:
            logger.warning(
                "The %s segmenter has no max_area_um2: cells wider than the %.0f µm tile overlap "
                "(ingestion.tiles.largest_cell_um) could be split at tile edges",
                cell_type,
                largest_cell_um,
            )
            continue
        diameter_um = 2.0 * math.sqrt(float(max_area_um2) / math.pi)
        if diameter_um > largest_cell_um:
            raise TileOverlapError(
                f"segmentation.segmenters.{cell_type}: max_area_um2 = {max_area_um2} allows cells "
                f"{diameter_um:.1f} µm across, more than ingestion.tiles.largest_cell_um = {largest_cell_um} "
                "(the tile overlap); raise largest_cell_um to at least that, or lower max_area_um2"
            )
