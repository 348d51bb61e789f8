"""The Dask executor: tiles segmented by the workers of a ``dask.distributed`` cluster.

Why this shape:

- **Only tile specs travel.** The run's plain configuration (plugin conf, slide paths, store folder, expected
  fingerprint) reaches each worker once, in a :class:`RunPlugin` (a ``WorkerPlugin``, so a worker that joins
  late or is restarted after a crash gets it too). Each worker builds its plugins from that conf on its first
  tile (models are never pickled through the scheduler), opens the slides itself by path, reads its tiles
  straight from the CZI files and writes each result with the same atomic ``write_tile_result`` as the local
  executor. A task returns a few numbers, never pixels.
- **Identical results.** Resume decisions are taken before any task is submitted, by the same code as the
  local executor, and each worker recomputes the run fingerprint from the plugins it built; a worker whose
  code, packages or weights differ from the driver's is refused (its tiles would not match).
- **Back-pressure.** At most ``max_tiles_in_flight_per_worker`` tiles per live worker are submitted at once
  (a sliding window over ``distributed.wait(..., FIRST_COMPLETED)``); the scheduler holds only that many.
- **Faults.** A task that raises is retried ``retries`` times by Dask; the tasks of a worker that dies are
  rescheduled on the others by the scheduler (a tile that was on ``allowed_failures`` dying workers is given
  up as ``KilledWorker``). A tile that still fails is recorded in ``failed_tiles`` exactly like a local
  failure, so the tile store dataset writes ``failures.json`` and ends the run non-zero. Nothing waits
  forever: workers must join within ``startup_timeout_s``, and when no tile finishes for ``stall_timeout_s``
  the unfinished tiles are recorded as failed and the run ends.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import os
import resource
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distributed import WorkerPlugin
from tqdm.auto import tqdm

from mk_hspc.engine.fingerprint import digest
from mk_hspc.engine.prefetch import StageError, release_free_heap
from mk_hspc.errors import UserError, describe_error
from mk_hspc.models.registry import plugin_class

logger = logging.getLogger(__name__)

CLUSTER_KINDS = ("local", "address", "slurm")
# Keyword arguments of dask_jobqueue.SLURMCluster (its job class's and the cluster's) that the conf may set;
# the run itself owns the others (scheduler, loop, asynchronous, ...).
_SLURM_OWN_ARGUMENTS = frozenset(
    {"self", "scheduler", "name", "loop", "asynchronous", "job_cls", "job_kwargs", "base_class_kwargs"}
)


class DaskExecutorError(RuntimeError):
    """The Dask cluster could not run the segmentation (no workers, a worker set up differently, ...)."""


class WorkerSetupError(DaskExecutorError):
    """A worker could not prepare the run (plugins, fingerprint, store folder); every tile would fail."""


class TileTaskError(RuntimeError):
    """One tile failed on a worker at ``stage`` (read, process, write); picklable, names the tile."""

    def __init__(self, stage: str, tile_id: str, error: str, user_error: bool = False) -> None:
        super().__init__(f"{stage} failed for tile {tile_id}: {error}")
        self.stage = stage
        self.tile_id = tile_id
        self.error = error
        self.user_error = user_error  # the cause was bad input (mk_hspc.errors.UserError), not a bug

    @classmethod
    def of(cls, stage: str, tile_id: str, exc: BaseException) -> TileTaskError:
        return cls(stage, tile_id, describe_error(exc), isinstance(exc, UserError))

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.stage, self.tile_id, self.error, self.user_error))


@dataclass(frozen=True)
class DaskSettings:
    """``segmentation.executor.dask`` (see ``conf/base/parameters_segmentation.yml``).

    Attributes:
        cluster: ``local`` (a LocalCluster of worker processes on this machine), ``address`` (an existing
            scheduler at ``address``) or ``slurm`` (``dask_jobqueue.SLURMCluster`` from ``slurm``).
        address: scheduler address for ``cluster: address``, e.g. ``tcp://10.0.0.5:8786``.
        n_workers: worker processes of a local cluster; ``auto`` is one per usable core
            (``os.sched_getaffinity``, divided by ``threads_per_worker``), or one per GPU when a learned
            (torch) plugin is chosen and CUDA is available.
        threads_per_worker: tiles a worker works on at once (reads and writes overlap; the model itself runs
            one tile at a time per worker).
        memory_limit: per worker of a local cluster (``"6GiB"``); ``auto`` is Dask's (memory / workers). A
            worker above 95% of it is restarted by its nanny and its tiles rescheduled.
        max_tiles_in_flight_per_worker: tiles submitted per live worker at once (back-pressure).
        retries: extra attempts of a tile whose task raised before it is recorded as failed.
        allowed_failures: dying workers a tile may be on before Dask gives it up (``KilledWorker``); applies
            to the schedulers this run starts (local, slurm).
        startup_timeout_s: how long to wait for the first worker (all of them for a local cluster).
        stall_timeout_s: no tile finished for this long ends the run with the unfinished tiles failed.
        dashboard_address: the scheduler's dashboard (e.g. ``127.0.0.1:8787``); None: no dashboard.
        slurm_jobs: SLURM jobs to submit (``slurm.jobs``).
        slurm_cluster: keyword arguments of ``SLURMCluster`` (``slurm.cluster``: cores, processes, memory,
            queue, account, walltime, job_extra_directives, job_script_prologue, ...).
    """

    cluster: str = "local"
    address: str | None = None
    n_workers: int | str = "auto"
    threads_per_worker: int = 1
    memory_limit: str = "auto"
    max_tiles_in_flight_per_worker: int = 2
    retries: int = 2
    allowed_failures: int = 3
    startup_timeout_s: float = 120.0
    stall_timeout_s: float = 1800.0
    dashboard_address: str | None = None
    slurm_jobs: int = 1
    slurm_cluster: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None) -> DaskSettings:
        """From the ``segmentation.executor.dask`` block (missing keys take the defaults above)."""
        params = dict(params or {})
        slurm = dict(params.pop("slurm", None) or {})
        settings = cls(
            **params,
            slurm_jobs=int(slurm.get("jobs", 1)),
            slurm_cluster=dict(slurm.get("cluster") or {}),
        )
        if settings.cluster not in CLUSTER_KINDS:
            raise ValueError(f"segmentation.executor.dask.cluster must be one of {CLUSTER_KINDS}")
        if settings.cluster == "address" and not settings.address:
            raise ValueError("segmentation.executor.dask.address is needed with cluster: address")
        return settings


@dataclass(frozen=True)
class DaskRun:
    """What the Dask executor needs beyond the tiles: its settings and the plain plugin conf to build from.

    Attributes:
        settings: cluster, window, retries, timeouts.
        segmentation: the ``segmentation`` parameters block (plain data); each worker builds its plugins
            from it with :func:`mk_hspc.engine.plugins.build_plugins`.
        client: an existing ``distributed.Client`` to use instead of building a cluster (tests, notebooks).
    """

    settings: DaskSettings
    segmentation: Mapping[str, Any]
    client: Any = None


@dataclass
class DaskOutcome:
    """What the workers did (folded into ``RunSummary`` by ``segment_tiles``)."""

    n_done: int = 0
    totals: dict[str, int] = field(default_factory=dict)
    busy_s: dict[str, float] = field(default_factory=dict)
    failures: list[dict[str, str]] = field(default_factory=list)
    max_in_flight: int = 0
    info: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------- workers
@dataclass(frozen=True)
class WorkerJob:
    """The run as a worker sees it: plain data (and slides, which pickle as their path and options)."""

    token: str
    segmentation: Mapping[str, Any]
    fingerprint_params: Mapping[str, Any]
    params_hash: str
    slides: Mapping[str, Any]
    pixel_sizes_um: Mapping[str, float]
    store_dir: str
    fsync: bool
    label_chunk_px: int
    release_memory_every_tiles: int | None


class _WorkerState:
    """One run's plugins and slides inside one worker process, built on the first tile."""

    def __init__(self, job: WorkerJob) -> None:
        self.job = job
        self.segmenters: Mapping[str, Any] | None = None
        self.extractors: Sequence[Any] = ()
        self.build_lock = threading.Lock()
        self.model_lock = threading.Lock()  # one tile at a time through the models, as in the local engine
        self.n_written = 0
        self.counter_lock = threading.Lock()
        self.setup_error: str | None = None

    def ensure_built(self) -> None:
        with self.build_lock:
            if self.setup_error is not None:
                raise WorkerSetupError(self.setup_error)
            if self.segmenters is not None:
                return
            try:
                self._build()
            except WorkerSetupError as exc:
                self.setup_error = str(exc)
                raise
            except Exception as exc:
                self.setup_error = (
                    f"{_worker_name()}: building the plugins failed: {type(exc).__name__}: {exc}"
                )
                raise WorkerSetupError(self.setup_error) from exc

    def _build(self) -> None:
        from mk_hspc.engine.plugins import build_plugins
        from mk_hspc.engine.tile_work import compute_params_hash

        job = self.job
        if not Path(job.store_dir).is_dir():
            raise WorkerSetupError(
                f"{_worker_name()} cannot see the tile store folder {job.store_dir}: every worker needs the "
                "project's data on a shared filesystem at the same path"
            )
        segmentation = _with_worker_device(job.segmentation)
        cache_key = (job.params_hash, digest(segmentation, length=32))
        with _PLUGIN_CACHE_LOCK:
            cached = _PLUGIN_CACHE.get(cache_key)
        if cached is not None:  # a later run with the same plugins in this worker: models stay loaded
            self.segmenters, self.extractors = cached
            return
        segmenters, extractors = build_plugins(segmentation)
        params_hash = compute_params_hash(segmenters, extractors, job.fingerprint_params)
        if params_hash != job.params_hash:
            raise WorkerSetupError(
                f"{_worker_name()} computes the run fingerprint {params_hash}, the driver {job.params_hash}: "
                "its mk_hspc code, packages or weights differ from the driver's, so its tiles would not match; "
                "install the same environment on every worker"
            )
        self.segmenters, self.extractors = segmenters, extractors
        with _PLUGIN_CACHE_LOCK:  # one set of models per worker: a new fingerprint replaces the old one
            _PLUGIN_CACHE.clear()
            _PLUGIN_CACHE[cache_key] = (segmenters, extractors)

    def tile_written(self) -> None:
        every = self.job.release_memory_every_tiles
        with self.counter_lock:
            self.n_written += 1
            due = every is not None and self.n_written % every == 0
        if due:
            release_free_heap()

    def close(self) -> None:
        for slide in self.job.slides.values():
            close = getattr(slide, "close", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    close()


_STATES: dict[str, _WorkerState] = {}
_STATES_LOCK = threading.Lock()
# Plugins built in this worker process, keyed by run fingerprint and conf (device included).
_PLUGIN_CACHE: dict[tuple[str, str], tuple[Mapping[str, Any], Sequence[Any]]] = {}
_PLUGIN_CACHE_LOCK = threading.Lock()


def _worker_name() -> str:
    try:
        from distributed import get_worker

        worker = get_worker()
        return f"worker {worker.name} ({worker.address}, pid {os.getpid()})"
    except ValueError:
        return f"process {os.getpid()}"


def _with_worker_device(segmentation: Mapping[str, Any]) -> dict[str, Any]:
    """The conf with ``device`` set to this worker's GPU when a local cluster spreads workers over GPUs.

    Worker ``i`` of a local cluster (named 0..n-1) takes ``cuda:i % n_gpus`` when ``device`` is ``auto`` or
    ``cuda`` and several GPUs are visible; a SLURM job usually sees one GPU (``cuda:0``). The device never
    enters the fingerprint (it does not change what a plugin computes).
    """
    conf = copy.deepcopy(dict(segmentation))
    if conf.get("device", "auto") not in ("auto", "cuda") or not uses_learned_plugins(conf):
        return conf
    n_gpus = cuda_device_count()
    if n_gpus > 1:
        try:
            from distributed import get_worker

            index = int(get_worker().name)
        except (ValueError, TypeError):
            return conf
        conf["device"] = f"cuda:{index % n_gpus}"
    return conf


class RunPlugin(WorkerPlugin):
    """Worker plugin carrying one run's :class:`WorkerJob` to every worker (late and restarted ones too).

    ``setup`` only registers the job (cheap, on the worker's event loop); the plugins are built by the
    first tile task, in a task thread, so loading a model never blocks the worker's heartbeat.
    """

    def __init__(self, job: WorkerJob) -> None:
        self.job = job
        self.name = f"mk-hspc-run-{job.token}"

    def setup(self, worker: Any) -> None:
        with _STATES_LOCK:
            _STATES.setdefault(self.job.token, _WorkerState(self.job))

    def teardown(self, worker: Any) -> None:
        with _STATES_LOCK:
            state = _STATES.pop(self.job.token, None)
        if state is not None:
            state.close()


def tile_task(token: str, spec: Any) -> dict[str, Any]:
    """Segment one tile on a worker: read it from its CZI file, run the models, write its file atomically.

    Returns counts and timings only. Raises :class:`TileTaskError` naming the stage and the tile (Dask
    retries it), or :class:`WorkerSetupError` when the worker cannot run this job at all.
    """
    from mk_hspc.engine.tile_work import _cells_per_type, _normalise_tile, process_tile
    from mk_hspc.tile_store import write_tile_result

    with _STATES_LOCK:
        state = _STATES.get(token)
    if state is None:
        raise WorkerSetupError(f"{_worker_name()} has no job {token} (its worker plugin did not run)")
    state.ensure_built()
    job = state.job
    timings: dict[str, float] = {}
    cpu_started = time.thread_time()

    started = time.perf_counter()
    try:
        slide = job.slides[spec.slide]
        tile_rgb = _normalise_tile(slide.read_region(spec.x, spec.y, spec.w, spec.h), spec)
    except Exception as exc:
        raise TileTaskError.of("read", spec.tile_id, exc) from exc
    timings["read"] = time.perf_counter() - started

    started = time.perf_counter()
    with state.model_lock:
        try:
            result = process_tile(
                tile_rgb,
                spec,
                job.pixel_sizes_um[spec.slide],
                state.segmenters,
                state.extractors,
                job.params_hash,
                slide_file_id=str(getattr(slide.meta, "file_id", "")),
            )
        except Exception as exc:
            raise TileTaskError.of("process", spec.tile_id, exc) from exc
    del tile_rgb
    timings["process"] = time.perf_counter() - started

    started = time.perf_counter()
    try:
        write_tile_result(job.store_dir, result, fsync=job.fsync, label_chunk_px=job.label_chunk_px)
    except Exception as exc:
        raise TileTaskError.of("write", spec.tile_id, exc) from exc
    timings["write"] = time.perf_counter() - started
    cells = _cells_per_type(result, state.segmenters)  # the local engine's counts, WIDER included
    del result
    state.tile_written()
    return {
        "tile_id": spec.tile_id,
        "cells": cells,
        "busy_s": timings,
        "cpu_s": time.thread_time() - cpu_started,  # this tile's CPU time, whatever else runs on the machine
        "worker": _worker_name(),
        "peak_rss_mib": peak_rss_mib(),
    }


def peak_rss_mib() -> float:
    """This process's peak RSS in MiB (``VmHWM``).

    Not ``getrusage``'s ``ru_maxrss``: Linux carries it over a fork + exec, so a worker spawned by a large
    driver would report the driver's peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux, bytes on macOS


# ---------------------------------------------------------------------------------------------- cluster
def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, which a batch system or ``taskset`` may narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cuda_device_count() -> int:
    """Visible CUDA devices (0 without torch or CUDA)."""
    try:
        import torch
    except ImportError:
        return 0
    return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0


def uses_learned_plugins(segmentation: Mapping[str, Any]) -> bool:
    """Whether a chosen plugin is a learned (torch) one: its constructor takes a ``device``."""
    from mk_hspc.engine.plugins import DEVICE_PARAMETER, chosen_plugins

    segmenters, features = chosen_plugins(segmentation)
    return any(
        DEVICE_PARAMETER in inspect.signature(plugin_class(choice.group, choice.name)).parameters
        for choice in [*segmenters.values(), *features]
    )


def resolve_n_workers(settings: DaskSettings, segmentation: Mapping[str, Any]) -> tuple[int, str]:
    """Worker processes of a local cluster, and why (for the log)."""
    if settings.n_workers != "auto":
        return int(settings.n_workers), "set in segmentation.executor.dask.n_workers"
    if segmentation.get("device", "auto") != "cpu" and uses_learned_plugins(segmentation):
        n_gpus = cuda_device_count()
        if n_gpus:
            return n_gpus, f"one per GPU ({n_gpus} visible) for the learned plugins"
    cores = usable_cores()
    return max(1, cores // settings.threads_per_worker), f"{cores} usable core(s)"


def slurm_cluster(settings: DaskSettings) -> Any:
    """A ``dask_jobqueue.SLURMCluster`` from ``slurm.cluster`` (no job is submitted until it is scaled)."""
    from dask_jobqueue import SLURMCluster

    unknown = sorted(set(settings.slurm_cluster) - slurm_cluster_arguments())
    if unknown:
        raise ValueError(
            f"segmentation.executor.dask.slurm.cluster: unknown SLURMCluster argument(s) {unknown}; "
            f"accepted: {', '.join(sorted(slurm_cluster_arguments()))}"
        )
    return SLURMCluster(**dict(settings.slurm_cluster))


def slurm_cluster_arguments() -> frozenset[str]:
    """The keyword arguments ``SLURMCluster`` accepts (its cluster's and its job class's)."""
    from dask_jobqueue.core import Job, JobQueueCluster
    from dask_jobqueue.slurm import SLURMJob

    names: set[str] = set()
    for function in (JobQueueCluster.__init__, Job.__init__, SLURMJob.__init__):
        names |= set(inspect.signature(function).parameters)
    return frozenset(names - _SLURM_OWN_ARGUMENTS)


@contextlib.contextmanager
def _quiet_distributed_logs() -> Iterator[None]:
    """Dask's own INFO lines (workers starting and closing, comms closed at shutdown, with tracebacks) would
    bury the run's log; warnings and errors still show. DEBUG (e.g. DASK_LOGGING__DISTRIBUTED=debug) is kept."""
    loggers = [logging.getLogger(name) for name in ("distributed", "dask_jobqueue")]
    previous = [log.level for log in loggers]
    for log in loggers:
        if log.level in (logging.NOTSET, logging.INFO):  # distributed sets INFO itself on import
            log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for log, level in zip(loggers, previous, strict=True):
            log.setLevel(level)


@contextlib.contextmanager
def dask_client(settings: DaskSettings, segmentation: Mapping[str, Any]) -> Iterator[Any]:
    """A ``distributed.Client`` on the configured cluster, closed (and its cluster with it) on exit.

    Raises:
        DaskExecutorError: no worker joined within ``startup_timeout_s`` (names the cluster).
    """
    import dask
    from distributed import Client, LocalCluster

    with contextlib.ExitStack() as stack:
        stack.enter_context(_quiet_distributed_logs())
        # Read by the schedulers started here (local, slurm); an external scheduler keeps its own.
        config: dict[str, Any] = {"distributed.scheduler.allowed-failures": settings.allowed_failures}
        if "DASK_LOGGING__DISTRIBUTED" not in os.environ:  # local workers log warnings only, like the driver
            environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}))
            config["distributed.nanny.pre-spawn-environ"] = environ | {"DASK_LOGGING__DISTRIBUTED": "warning"}
        stack.enter_context(dask.config.set(config))
        expected = 1
        if settings.cluster == "address":
            where = f"the scheduler at {settings.address}"
            try:
                client = Client(settings.address, timeout=settings.startup_timeout_s)
            except OSError as exc:
                raise DaskExecutorError(f"cannot reach {where}: {exc}") from exc
        elif settings.cluster == "slurm":
            cluster = stack.enter_context(slurm_cluster(settings))
            cluster.scale(jobs=settings.slurm_jobs)
            where = f"SLURM ({settings.slurm_jobs} job(s))"
            client = Client(cluster)
        else:
            n_workers, why = resolve_n_workers(settings, segmentation)
            logger.info(
                "Dask: a local cluster of %d worker process(es) x %d thread(s) (%s)",
                n_workers,
                settings.threads_per_worker,
                why,
            )
            cluster = stack.enter_context(
                LocalCluster(
                    n_workers=n_workers,
                    threads_per_worker=settings.threads_per_worker,
                    processes=True,
                    host="127.0.0.1",
                    memory_limit=settings.memory_limit,
                    dashboard_address=settings.dashboard_address,
                    # Without a dashboard the scheduler still serves /health: on any free port, so two
                    # runs on one machine never collide on 8787.
                    scheduler_kwargs={} if settings.dashboard_address else {"dashboard_address": ":0"},
                    silence_logs=logging.WARNING,
                )
            )
            where = f"the local cluster ({n_workers} workers)"
            expected = n_workers
            client = Client(cluster)
        stack.enter_context(client)
        try:
            client.wait_for_workers(expected, timeout=settings.startup_timeout_s)
        except TimeoutError as exc:
            raise DaskExecutorError(
                f"no Dask worker of {where} joined within {settings.startup_timeout_s:.0f} s "
                "(segmentation.executor.dask.startup_timeout_s)"
            ) from exc
        yield client


# ------------------------------------------------------------------------------------------------- run
def run_on_dask(
    todo: Sequence[Any],
    dask_run: DaskRun,
    job_fields: Mapping[str, Any],
    *,
    progress: bool,
    isolate_failures: bool,
) -> DaskOutcome:
    """Segment ``todo`` (tile specs, already filtered by the resume rules) on a Dask cluster.

    ``job_fields`` are the :class:`WorkerJob` fields but the token. Returns the outcome; raises
    :class:`StageError` when a write fails (the output is at fault, as in the local executor) or, without
    ``isolate_failures``, on the first failed tile; :class:`DaskExecutorError` when the cluster cannot run.
    """
    job = WorkerJob(token=uuid.uuid4().hex[:12], **job_fields)
    if not todo:
        return DaskOutcome()
    with contextlib.ExitStack() as stack:
        client = dask_run.client
        if client is None:
            client = stack.enter_context(dask_client(dask_run.settings, dask_run.segmentation))
        plugin = RunPlugin(job)
        client.register_plugin(plugin, name=plugin.name)
        stack.callback(_unregister, client, plugin.name)
        return _drive(client, todo, job, dask_run.settings, progress, isolate_failures)


def _unregister(client: Any, name: str) -> None:
    with contextlib.suppress(Exception):
        client.unregister_worker_plugin(name)


def _drive(
    client: Any,
    todo: Sequence[Any],
    job: WorkerJob,
    settings: DaskSettings,
    progress: bool,
    isolate_failures: bool,
) -> DaskOutcome:
    """Submit tiles through a sliding window and collect their outcomes until every tile is settled."""
    from distributed import wait

    outcome = DaskOutcome()
    totals: Counter[str] = Counter()
    busy_s: Counter[str] = Counter()
    peak_rss_mib: dict[str, float] = {}
    cpu_s = 0.0
    queue = iter(todo)
    pending: dict[Any, Any] = {}  # future -> spec
    exhausted = False
    n_workers = _live_workers(client)
    n_workers_checked = time.monotonic()
    failure: BaseException | None = None

    bar = tqdm(total=len(todo), desc="segmentation (dask)", unit="tile", disable=not progress, smoothing=0.1)
    try:
        while True:
            if time.monotonic() - n_workers_checked > 1.0:
                n_workers, n_workers_checked = _live_workers(client), time.monotonic()
            window = max(1, n_workers) * settings.max_tiles_in_flight_per_worker
            while not exhausted and len(pending) < window:
                spec = next(queue, None)
                if spec is None:
                    exhausted = True
                    break
                future = client.submit(
                    tile_task,
                    job.token,
                    spec,
                    key=f"tile-{spec.tile_id}-{job.token}",
                    retries=settings.retries,
                    pure=False,
                )
                pending[future] = spec
            outcome.max_in_flight = max(outcome.max_in_flight, len(pending))
            if not pending:
                break
            try:
                done, _ = wait(list(pending), timeout=settings.stall_timeout_s, return_when="FIRST_COMPLETED")
            except TimeoutError:
                done = set()
            if not done:
                _record_stall(outcome, pending, queue, settings, client, bar)
                break
            for future in done:
                spec = pending.pop(future)
                if future.status == "finished":
                    result = future.result()
                    outcome.n_done += 1
                    totals.update(result["cells"])
                    busy_s.update(result["busy_s"])
                    cpu_s += result["cpu_s"]
                    peak_rss_mib[result["worker"]] = max(
                        peak_rss_mib.get(result["worker"], 0.0), result["peak_rss_mib"]
                    )
                    if result["cells"]:  # before the update that draws the line (see prefetch._Run)
                        bar.set_postfix(dict(totals), refresh=False)
                    bar.update(1)
                    continue
                record = _failure_record(future, spec)
                if record["stage"] in ("write", "setup") or not isolate_failures:
                    failure = _as_error(future, record)
                    break
                outcome.failures.append(record)
                bar.update(1)
            if failure is not None:
                break
    finally:
        bar.close()
        for future in pending:
            future.cancel()
    outcome.totals = dict(totals)
    outcome.busy_s = dict(busy_s)
    outcome.info = {
        "kind": "dask",
        "workers_seen": len(peak_rss_mib),
        "tile_cpu_s": round(cpu_s, 3),
        "peak_rss_mib_per_worker": {name: round(rss, 1) for name, rss in sorted(peak_rss_mib.items())},
    }
    if failure is not None:
        raise failure
    return outcome


def _live_workers(client: Any) -> int:
    try:
        return len(client.nthreads())
    except Exception:  # the scheduler is briefly unreachable: keep the window small
        return 1


def _failure_record(future: Any, spec: Any) -> dict[str, Any]:
    """The ``failed_tiles`` entry of a tile whose task ended in error (same keys as the local executor)."""
    from distributed import KilledWorker

    exc = future.exception()
    user_error = False
    if isinstance(exc, TileTaskError):
        stage, error, user_error = exc.stage, exc.error, exc.user_error
    elif isinstance(exc, KilledWorker):
        stage = "worker"
        error = (
            f"the tile was on {exc.last_worker.address if exc.last_worker else 'a worker'} and other workers "
            "that died while working on it (out of memory? a crash in a library?); Dask gave it up"
        )
    elif isinstance(exc, WorkerSetupError):
        stage, error = "setup", str(exc)
    else:  # not wrapped by tile_task: described as tile_task describes a cause
        stage, error, user_error = "process", describe_error(exc), isinstance(exc, UserError)
    return {
        "tile_id": spec.tile_id,
        "slide": spec.slide,
        "stage": stage,
        "error": error,
        "user_error": user_error,
    }


def _as_error(future: Any, record: Mapping[str, str]) -> BaseException:
    exc = future.exception()
    if isinstance(exc, WorkerSetupError):
        return exc
    error = StageError(record["stage"], f"tile {record['tile_id']}", RuntimeError(record["error"]))
    error.__cause__ = exc
    return error


def _record_stall(
    outcome: DaskOutcome,
    pending: dict[Any, Any],
    queue: Iterator[Any],
    settings: DaskSettings,
    client: Any,
    bar: tqdm,
) -> None:
    """No tile finished for ``stall_timeout_s``: every unfinished tile is recorded failed; the run ends."""
    n_workers = _live_workers(client)
    reason = (
        f"no tile finished within {settings.stall_timeout_s:g} s "
        f"(segmentation.executor.dask.stall_timeout_s) with {n_workers} worker(s) alive; the run stopped"
    )
    logger.error("Dask executor: %s", reason)
    for spec in [*pending.values(), *queue]:
        outcome.failures.append(
            {
                "tile_id": spec.tile_id,
                "slide": spec.slide,
                "stage": "timeout",
                "error": reason,
                "user_error": False,
            }
        )
        bar.update(1)


def print_slurm_job_script(conf_dir: str = "conf", env: str = "slurm") -> str:
    """The SLURM job script ``kedro run --env <env>`` would submit, built from the conf, submitting nothing.

    ``python -m mk_hspc.engine.dask_executor [ENV]`` prints it (run in the project folder).
    """
    from kedro.config import OmegaConfigLoader

    from mk_hspc.settings import CONFIG_LOADER_ARGS

    loader = OmegaConfigLoader(conf_dir, **{**CONFIG_LOADER_ARGS, "default_run_env": env})
    executor = loader["parameters"]["segmentation"].get("executor") or {}
    settings = DaskSettings.from_params(executor.get("dask"))
    if settings.cluster != "slurm":
        raise SystemExit(
            f"conf env {env!r}: segmentation.executor.dask.cluster is {settings.cluster!r}, not slurm"
        )
    with slurm_cluster(settings) as cluster:
        script = cluster.job_script()
    print(script)
    return script


if __name__ == "__main__":
    import sys

    print_slurm_job_script(env=sys.argv[1] if len(sys.argv) > 1 else "slurm")
