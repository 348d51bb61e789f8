"""Project hooks: parameters validated, a run lock on the data folder, and provenance of every output.

Provenance: every output written through :class:`~mk_hspc.datasets.atomic.AtomicDataset` (and the tile
store) records in its manifest the digests of the inputs it was built from, and theirs in turn. Before a
node runs, its inputs must belong together: when one input records that it was built from another input
(or from a common ancestor) with a different digest than the one present now, the node is refused, naming
both. That is what stops, e.g., counting an old cells table against a new tile sample after a crash. An input
built with other parameters than this run's is refused too, even when it agrees with every other input (a
run killed before it rewrote anything leaves an old state that is consistent, but not for these parameters).
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout
from kedro.framework.hooks import hook_impl

from mk_hspc.atomic_io import write_json_atomic
from mk_hspc.engine.fingerprint import digest
from mk_hspc.errors import UserError, install_brief_excepthook
from mk_hspc.params_schema import validate_parameters

logger = logging.getLogger(__name__)

LOCK_NAME = ".mk_hspc_run.lock"
HOLDER_NAME = ".mk_hspc_run.holder.json"


class BriefErrorHooks:
    """Shows bad input as its message alone (:func:`mk_hspc.errors.install_brief_excepthook`).

    Installed once Kedro has configured logging: its rich handler replaces ``sys.excepthook`` when it is set
    up (e.g. a ``kedro run`` from a sub-folder falls back to Kedro's rich logging config), so a hook
    installed before would be dropped; installed after, it wraps rich's. Nothing changes on import.
    """

    @hook_impl
    def after_context_created(self, context: Any) -> None:
        install_brief_excepthook()


class ParameterValidationHooks:
    """Stops ``kedro run`` before its first node when the merged parameters (conf envs and ``--params``)
    break the schema, with a message naming every offending key (:class:`~mk_hspc.params_schema.ParameterError`)."""

    @hook_impl(tryfirst=True)  # before the run lock is taken: a refused run holds nothing
    def before_pipeline_run(self, pipeline: Any, catalog: Any) -> None:
        parameters = catalog.load("parameters")
        validate_parameters(parameters)
        segments = "params:segmentation" in pipeline.inputs()
        applies_models = any(node.name == "apply_validated_models" for node in pipeline.nodes)
        if not (segments or applies_models):
            return
        from mk_hspc.engine.plugins import build_plugins, check_overlap_covers_cells

        plugins = build_plugins(parameters["segmentation"])  # once for both checks
        if segments:
            # Checked before ingestion rewrites anything: segmenters that may report cells wider than the tile
            # overlap would only be refused by the segmentation node, after the tile index was replaced.
            check_overlap_covers_cells(plugins[0], float(parameters["ingestion"]["tiles"]["largest_cell_um"]))
        if applies_models:
            # Before the full run segments every tissue tile: a model it would refuse is refused now.
            from mk_hspc.pipelines.full.nodes import check_models_before_the_full_run

            check_models_before_the_full_run(parameters["train"], parameters["segmentation"], *plugins)


class RunLockHeldError(UserError, RuntimeError):
    """Another run holds the project's data folder (the message says which process and how to go on)."""


class StaleInputError(UserError, RuntimeError):
    """A node's inputs were not built from one another's current versions."""


def input_record(name: str, dataset: Any, data: Any) -> tuple[str, dict[str, str]] | None:
    """``(digest, lineage)`` of one node input, or None for inputs without provenance (raw files)."""
    if _is_parameter(name):
        return parameter_digest(data), {}
    verified_manifest = getattr(dataset, "verified_manifest", None)
    if verified_manifest is None:
        return None
    manifest = verified_manifest()
    return str(manifest["digest"])[:16], dict(manifest.get("lineage") or {})


def check_inputs_belong_together(
    node_name: str, records: Mapping[str, tuple[str, dict[str, str]]]
) -> dict[str, str]:
    """The lineage of the node's outputs; raises when two inputs disagree about a shared ancestor.

    Args:
        node_name: for the message.
        records: ``input name -> (digest, lineage)`` of the inputs that have provenance.

    Raises:
        StaleInputError: an input was built from another input's (or a shared ancestor's) other version.
    """
    lineage: dict[str, str] = {}
    claimed_by: dict[str, str] = {}
    for name, (own_digest, ancestors) in sorted(records.items()):
        for ancestor, ancestor_digest in sorted({**ancestors, name: own_digest}.items()):
            if ancestor in lineage and lineage[ancestor] != ancestor_digest:
                other = claimed_by[ancestor]
                raise StaleInputError(
                    f"Node {node_name!r}: its inputs do not belong together: {_as_seen(name, ancestor)} "
                    f"is {ancestor_digest}, but {_as_seen(other, ancestor)} is {lineage[ancestor]}. "
                    f"One of them is stale (e.g. left by an interrupted run): rerun from {ancestor!r} "
                    f"(kedro run --from-inputs {ancestor}) or the whole pipeline."
                )
            lineage[ancestor] = ancestor_digest
            claimed_by.setdefault(ancestor, name)
    return lineage


# Settings that decide how a result is computed, never what it is (threads, queues, progress bars, where the
# tiles run): a change of them must not make finished outputs stale.
NOT_RESULT_KEYS = frozenset({"runtime", "executor"})


def parameter_digest(value: Any) -> str:
    """Digest of a parameter value without the keys in :data:`NOT_RESULT_KEYS`, at any depth."""
    return digest(_without_runtime(value))


def _without_runtime(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _without_runtime(v) for k, v in value.items() if k not in NOT_RESULT_KEYS}
    if isinstance(value, list | tuple):
        return [_without_runtime(v) for v in value]
    return value


def _is_parameter(name: str) -> bool:
    return name == "parameters" or name.startswith("params:")


def check_parameters_are_current(
    node_name: str,
    records: Mapping[str, tuple[str, dict[str, str]]],
    current_digest: Callable[[str], str | None],
) -> None:
    """Refuses inputs built with parameters other than this run's.

    Args:
        node_name: for the message.
        records: ``input name -> (digest, lineage)`` of the inputs that have provenance.
        current_digest: digest of a parameter (``params:ingestion``) as this run has it, None when unset.

    Raises:
        StaleInputError: an input's lineage records a parameter with another digest than the current one.
    """
    for name, (_, ancestors) in sorted(records.items()):
        for ancestor, recorded in sorted(ancestors.items()):
            if not _is_parameter(ancestor):
                continue
            current = current_digest(ancestor)
            if current != recorded:
                raise StaleInputError(
                    f"Node {node_name!r}: its input {name!r} was built with another {ancestor!r} ({recorded}) "
                    f"than this run's ({current or 'not set'}): it is stale (the parameters changed and the "
                    f"nodes that build it have not run since, or were interrupted). If it was built with a "
                    f"one-off --params or --env, pass the same to this run too (or put the value in "
                    f"conf/local); otherwise rerun from {ancestor!r} (kedro run --from-inputs {ancestor}) or "
                    "the whole pipeline."
                )


def _as_seen(holder: str, ancestor: str) -> str:
    return f"{ancestor!r}" if holder == ancestor else f"the {ancestor!r} that {holder!r} was built from"


class ProvenanceHooks:
    """Refuses nodes whose inputs do not belong together, and hands each output its lineage to record."""

    def __init__(self) -> None:
        self._catalog: Any = None
        self._lineage_by_node: dict[str, dict[str, str]] = {}

    @hook_impl
    def before_node_run(self, node: Any, catalog: Any, inputs: dict[str, Any]) -> None:
        self._catalog = catalog
        records = {}
        for name, data in inputs.items():
            record = input_record(name, catalog.get(name), data)
            if record is not None:
                records[name] = record
        self._lineage_by_node[node.name] = check_inputs_belong_together(node.name, records)

        def current_digest(parameter: str) -> str | None:
            dataset = catalog.get(parameter)
            return None if dataset is None else parameter_digest(dataset.load())

        check_parameters_are_current(node.name, records, current_digest)

    @hook_impl
    def before_dataset_saved(self, dataset_name: str, data: Any, node: Any) -> None:
        dataset = self._catalog.get(dataset_name) if self._catalog is not None else None
        if dataset is not None and hasattr(dataset, "lineage"):
            dataset.lineage = dict(self._lineage_by_node.get(node.name, {}))


def run_lock_path(project_path: str | Path) -> Path:
    return Path(project_path) / "data" / LOCK_NAME


class RunLockHooks:
    """One run at a time per project data folder: a second run refuses at once, naming the holder.

    An OS-level lock (``filelock``) is released by the kernel when its holder dies, so a killed run never
    leaves the project locked; the holder file only says who holds it. Within one process (a notebook), the
    next run releases what an interrupted run of the same hooks still holds.
    """

    def __init__(self) -> None:
        self._lock: FileLock | None = None

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any]) -> None:
        # A run of this process that ended without its closing hooks (Kedro calls none when a
        # before_pipeline_run hook or a KeyboardInterrupt stops it) must not lock out the next one.
        self._release()
        lock_path = run_lock_path(run_params["project_path"])
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(lock_path, timeout=0)
        holder_path = lock_path.with_name(HOLDER_NAME)
        try:
            lock.acquire()
        except Timeout:
            raise RunLockHeldError(
                f"Another mk-hspc run holds the project data folder {lock_path.parent} "
                f"({_describe_holder(holder_path)}); wait for it to finish or stop it, then run again."
            ) from None
        self._lock = lock
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "user": _user(),
            "started_unix_s": round(time.time(), 3),
            "command": " ".join(sys.argv),
        }
        write_json_atomic(holder_path, holder, fsync=False)

    @hook_impl
    def after_pipeline_run(self) -> None:
        self._release()

    @hook_impl
    def on_pipeline_error(self) -> None:
        self._release()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None


def _describe_holder(holder_path: Path) -> str:
    try:
        holder = json.loads(holder_path.read_text())
    except (OSError, ValueError):
        return "holder unknown"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started_unix_s", 0)))
    return (
        f"pid {holder.get('pid')} on {holder.get('host')} by {holder.get('user')}, started {started}: "
        f"{holder.get('command')}"
    )


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"
