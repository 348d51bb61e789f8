"""Fingerprints of everything that decides a tile's result, so that a changed input always recomputes.

A tile result depends on: the plugins' classes and parameters (numbers normalised, so ``250 == 250.0``),
the code that runs them (source of the plugin's module and of every module of its package or of ``mk_hspc``
that it uses), the engine and reader code around them (tile work, cell ownership, the store, CZI decoding), the
versions of the third-party packages that code imports, the *content* of weight files (not their paths),
the feature columns, and per tile the slide's pixel size and the tile geometry. The first five make the
run's ``params_hash``; the tile store records the per-tile part (pixel size, window, core, the slide
file's identity) beside it.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import inspect
import json
import logging
import math
import os
import sys
import threading
import types
from collections.abc import Mapping, Sequence
from dataclasses import asdict, is_dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from mk_hspc.atomic_io import write_json_atomic

logger = logging.getLogger(__name__)

_NOT_PLAIN = object()
# Parameter names whose string value is a file whose content (not path) decides the result.
WEIGHT_PARAM_NAMES = frozenset({"weights", "checkpoint", "pretrained_model", "model_path"})
_DIGEST_CACHE_ENV = "MK_HSPC_DIGEST_CACHE"
ENGINE_MODULES = ("mk_hspc.engine.tile_work", "mk_hspc.czi.reader")
_digest_lock = threading.Lock()


def normalise(value: Any) -> Any:
    """``value`` as canonical JSON data, or ``_NOT_PLAIN`` for things that are not data (models, tensors).

    Integers become floats (``250`` and ``250.0`` are the same setting), tuples become lists, paths strings,
    dataclasses dicts; NaN and infinities are spelt as strings (JSON has none).
    """
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, np.generic):
        value = value.item()
        if isinstance(value, bool):
            return value
    if isinstance(value, int | float):
        number = float(value)
        return number if math.isfinite(number) else repr(number)
    if isinstance(value, Path):
        return str(value)
    if is_dataclass(value) and not isinstance(value, type):
        return normalise(asdict(value))
    if isinstance(value, list | tuple):
        items = [normalise(v) for v in value]
        return _NOT_PLAIN if any(v is _NOT_PLAIN for v in items) else items
    if isinstance(value, Mapping):
        items = {str(k): normalise(v) for k, v in value.items()}
        return _NOT_PLAIN if any(v is _NOT_PLAIN for v in items.values()) else items
    return _NOT_PLAIN


def digest(payload: Any, length: int = 16) -> str:
    """Short sha256 of canonical JSON of ``payload`` (normalised first)."""
    plain = normalise(payload)
    if plain is _NOT_PLAIN:
        raise TypeError("only plain data (numbers, strings, lists, mappings) can be fingerprinted")
    return hashlib.sha256(json.dumps(plain, sort_keys=True).encode()).hexdigest()[:length]


def file_sha256(path: str | Path) -> str:
    """Content digest of a file, cached by (absolute path, size, mtime, inode) so weights hash once.

    The cache is a small JSON file (``$MK_HSPC_DIGEST_CACHE`` or ``~/.cache/mk_hspc/file_digests.json``);
    a changed file has another size/mtime/inode and is hashed again. An empty file is an error: it is
    never valid weights, and failing here names the file instead of failing on the first tile.
    """
    resolved = Path(path).expanduser().resolve()
    stat = resolved.stat()
    if stat.st_size == 0:
        raise ValueError(f"weights file {str(resolved)!r} is empty (0 bytes); copy the real file there")
    key = f"{resolved}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ino}"
    cache_path = Path(
        os.environ.get(_DIGEST_CACHE_ENV, Path.home() / ".cache" / "mk_hspc" / "file_digests.json")
    )
    with _digest_lock:
        cached = _read_cache(cache_path)
        if key in cached:
            return cached[key]
        sha = hashlib.sha256()
        with open(resolved, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                sha.update(block)
        cached[key] = sha.hexdigest()
        _write_cache(cache_path, cached)
        return cached[key]


def _read_cache(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(path: Path, data: dict[str, str]) -> None:
    """Best effort (a read-only home only costs re-hashing); atomic so a crash never leaves bad JSON."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, data, fsync=False)
    except OSError as exc:
        logger.debug("Could not write the digest cache %s: %s", path, exc)


def _with_weight_digests(params: dict[str, Any], owner: str) -> dict[str, Any]:
    """Replace weight-file paths by ``{"sha256": ...}`` so that moving a file changes nothing and editing
    its content changes everything."""
    out = {}
    for name, value in params.items():
        if name in WEIGHT_PARAM_NAMES and isinstance(value, str) and Path(value).expanduser().is_file():
            try:
                out[name] = {"sha256": file_sha256(value)}
            except ValueError as exc:
                raise ValueError(f"{owner} parameter {name!r}: {exc}") from None
        else:
            out[name] = value
    return out


@cache
def _module_sources(module_name: str) -> tuple[tuple[str, str], ...]:
    """``(module, sha256 of its source)`` for a module and every module of its own top-level package and of
    ``mk_hspc`` that it uses, transitively, sorted (a lab plugin's helper modules count as much as ours)."""
    packages = {"mk_hspc", module_name.split(".")[0]}
    seen: dict[str, str] = {}
    stack = [module_name]
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        module = sys.modules.get(name) or importlib.import_module(name)
        source_file = getattr(module, "__file__", None)
        seen[name] = (
            hashlib.sha256(Path(source_file).read_bytes()).hexdigest()[:16]
            if source_file and Path(source_file).is_file()
            else "no-source"
        )
        stack.extend(dep for dep in _imported_modules(module) if dep.split(".")[0] in packages)
    return tuple(sorted(seen.items()))


def _imported_modules(module: types.ModuleType) -> set[str]:
    """Names of the modules that ``module``'s globals come from (its imports, whatever their form)."""
    names = set()
    for value in vars(module).values():
        if isinstance(value, types.ModuleType):
            names.add(value.__name__)
        else:
            origin = getattr(value, "__module__", None)
            if isinstance(origin, str) and (inspect.isclass(value) or inspect.isfunction(value)):
                names.add(origin)
    return names


@cache
def _packages_distributions() -> Mapping[str, list[str]]:
    """Import name -> distributions, once per process: the scan stats every installed file (seconds)."""
    return importlib.metadata.packages_distributions()


@cache
def _package_versions(module_name: str) -> tuple[tuple[str, str], ...]:
    """Versions of the third-party distributions imported by a module and its ``mk_hspc`` dependencies."""
    top_levels = set()
    for name, _ in _module_sources(module_name):
        top_levels |= {dep.split(".")[0] for dep in _imported_modules(sys.modules[name])}
    distributions = _packages_distributions()
    versions = {}
    for top in sorted(top_levels - {"mk_hspc"}):
        for dist in distributions.get(top, ()):
            try:
                versions[dist] = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                continue
    return tuple(sorted(versions.items()))


def plugin_fingerprint(plugin: object) -> dict[str, Any]:
    """Class, name, normalised parameters (weights by content), code and package versions of a plugin.

    Parameters are the plugin's public attributes (a ``params`` mapping or dataclass included); values that
    are not data (models, tensors, devices) are left out. An extractor that declares its output columns
    (``columns()``) has them included.
    """
    cls = type(plugin)
    raw = (
        {k: v for k, v in vars(plugin).items() if not k.startswith("_")}
        if hasattr(plugin, "__dict__")
        else {}
    )
    if "params" not in raw and getattr(plugin, "params", None) is not None:
        raw["params"] = plugin.params  # e.g. a property
    params = {}
    for name, value in sorted(raw.items()):
        plain = normalise(value)
        if plain is not _NOT_PLAIN:
            params[str(name)] = plain
    owner = f"{getattr(plugin, 'name', cls.__name__)!s}"
    fingerprint = {
        "class": f"{cls.__module__}.{cls.__qualname__}",
        "name": getattr(plugin, "name", ""),
        "params": _with_weight_digests(params, owner),
        "code": dict(_module_sources(cls.__module__)),
        "packages": dict(_package_versions(cls.__module__)),
    }
    columns = getattr(plugin, "columns", None)
    if callable(columns):
        fingerprint["columns"] = [str(c) for c in columns()]
    return fingerprint


def run_fingerprint(
    segmenters: Mapping[str, object],
    feature_extractors: Sequence[object] = (),
    params: Mapping[str, Any] | None = None,
    format_version: int = 0,
) -> str:
    """Fingerprint of the run-wide part of every tile's result (plugins, code, packages, weights, conf)."""
    extra = normalise(dict(params or {}))
    if extra is _NOT_PLAIN:
        raise TypeError("params must be plain data (numbers, strings, lists, mappings) to be fingerprinted")
    return digest(
        {
            "format_version": format_version,
            # The code around the plugins that shapes a result: tile work and ownership, the store, the reader.
            "engine": {root: dict(_module_sources(root)) for root in ENGINE_MODULES},
            "segmenters": {cell_type: plugin_fingerprint(seg) for cell_type, seg in segmenters.items()},
            "features": [plugin_fingerprint(extractor) for extractor in feature_extractors],
            "params": _weights_in_nested(extra),
        }
    )


def _weights_in_nested(value: Any) -> Any:
    """Weight paths anywhere in nested conf (``segmenters.mk.params.checkpoint``) by content digest."""
    if isinstance(value, dict):
        value = _with_weight_digests(value, "segmentation")
        return {k: _weights_in_nested(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_weights_in_nested(v) for v in value]
    return value
