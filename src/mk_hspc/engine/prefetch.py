"""Three-stage threaded engine: readers -> bounded queue -> one model worker -> bounded queue -> writers.

Why this shape: reading a CZI region and writing an HDF5 file are I/O and library work that can overlap
with the model, while the model itself (GPU) must stay on one thread. Both queues are bounded, so at
most ``n_readers + read_queue_size + 1 + write_queue_size + n_writers`` items are alive at any time,
whatever the number of slides or tiles (memory stays flat). The model worker is the calling thread,
which also makes Ctrl-C and SIGTERM land where the run is controlled.

Any failure stops every stage promptly (each thread finishes at most the item in its hands; writers also
save the results already waiting for them, at most ``write_queue_size``, unless writing is what failed) and
is raised in the caller as :class:`StageError` naming the item. Results never depend on thread timing as
long as ``process`` depends only on its item and ``write`` only on its item and result.
"""

from __future__ import annotations

import ctypes
import queue
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from tqdm.auto import tqdm

Item = TypeVar("Item")
Data = TypeVar("Data")
Result = TypeVar("Result")

_END = object()  # a producer finished; one per reader / one per writer
_STOPPED = object()  # returned by a stop-aware get when the run is being stopped


class StageError(RuntimeError):
    """A stage failed on one item; ``item_key`` names the item (e.g. the tile id), ``stage`` the stage."""

    def __init__(self, stage: str, item_key: str, cause: BaseException) -> None:
        super().__init__(f"{stage} failed for {item_key}: {type(cause).__name__}: {cause}")
        self.stage = stage
        self.item_key = item_key


def _stage_error(stage: str, key: str, exc: BaseException) -> StageError:
    """``exc`` as the :class:`StageError` of ``stage``, unless a stage function raised one naming its own part
    (a tile worker that reads and cuts in its read stage)."""
    if isinstance(exc, StageError):
        return exc
    error = StageError(stage, key, exc)
    error.__cause__ = exc
    return error


@dataclass
class EngineStats:
    """What a run did, including the instrumented high-water marks of both queues and of live items."""

    n_items: int = 0
    elapsed_s: float = 0.0
    max_read_queue: int = 0
    max_write_queue: int = 0
    max_in_flight: int = 0
    totals: dict[str, int] = field(default_factory=dict)
    busy_s: dict[str, float] = field(default_factory=dict)  # summed time inside read / process / write
    # summed CPU time of the threads inside each stage (below busy_s when a stage waits for a core or I/O)
    cpu_s: dict[str, float] = field(default_factory=dict)
    failures: list[StageError] = field(default_factory=list)  # items skipped under ``isolate_failures``

    @property
    def items_per_s(self) -> float:
        return self.n_items / self.elapsed_s if self.elapsed_s > 0 else 0.0


class _BoundedQueue(queue.Queue):
    """A ``queue.Queue`` that records its largest size (updated under the queue's own lock)."""

    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError(f"queue size must be >= 1, got {maxsize}")
        super().__init__(maxsize)
        self.high_water = 0

    def _put(self, item: Any) -> None:
        super()._put(item)
        self.high_water = max(self.high_water, len(self.queue))


class StageClock:
    """Busy and CPU seconds per stage, summed over the threads that ran it (thread-safe)."""

    def __init__(self) -> None:
        self.busy_s: Counter[str] = Counter()
        self.cpu_s: Counter[str] = Counter()
        self._lock = threading.Lock()

    def timed(self, stage: str, func: Callable[..., Any], *args: Any) -> Any:
        """``func(*args)``, its wall and thread CPU time added to ``stage`` (also when it raises)."""
        started, cpu_started = time.perf_counter(), time.thread_time()
        try:
            return func(*args)
        finally:
            elapsed, cpu = time.perf_counter() - started, time.thread_time() - cpu_started
            with self._lock:
                self.busy_s[stage] += elapsed
                self.cpu_s[stage] += cpu


class _Run:
    """Shared state of one engine run: stop flag, first error, live-item accounting, progress."""

    def __init__(self, poll_interval_s: float, bar: tqdm) -> None:
        self.stop = threading.Event()  # readers and the model stop; writers drain what is already computed
        self.abort = threading.Event()  # writers stop too (a write failed)
        self.poll_interval_s = poll_interval_s
        self.error: StageError | None = None
        self._lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        self.n_done = 0
        self.totals: Counter[str] = Counter()
        self.clock = StageClock()
        self.failures: list[StageError] = []
        self._bar = bar

    def skip(self, stage: str, key: str, exc: BaseException) -> None:
        """Record an item's failure and go on with the others (``isolate_failures``)."""
        error = _stage_error(stage, key, exc)
        with self._lock:
            self.in_flight -= 1
            self.failures.append(error)
            self._bar.update(1)

    def fail(self, stage: str, key: str, exc: BaseException) -> None:
        with self._lock:
            if self.error is None:
                self.error = _stage_error(stage, key, exc)
        if stage == "write":
            self.abort.set()
        self.stop.set()

    def started(self) -> None:
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def finished(self, counts: Mapping[str, int]) -> None:
        with self._lock:
            self.in_flight -= 1
            self.n_done += 1
            self.totals.update(counts)
            if counts:  # before the update, which draws the line: it shows this tile's counts too
                self._bar.set_postfix(dict(self.totals), refresh=False)
            self._bar.update(1)

    def put(self, q: queue.Queue, obj: Any, cancel: threading.Event) -> bool:
        """Put unless ``cancel`` is set; False means cancelled (the object was dropped)."""
        while not cancel.is_set():
            try:
                q.put(obj, timeout=self.poll_interval_s)
                return True
            except queue.Full:
                continue
        return False

    def get(self, q: queue.Queue, cancel: threading.Event) -> Any:
        """Get unless ``cancel`` is set; ``_STOPPED`` means cancelled."""
        while not cancel.is_set():
            try:
                return q.get(timeout=self.poll_interval_s)
            except queue.Empty:
                continue
        return _STOPPED


def run_prefetched(
    items: Iterable[Item],
    read: Callable[[Item], Data],
    process: Callable[[Item, Data], Result],
    write: Callable[[Item, Result], Any],
    *,
    key: Callable[[Item], str] = str,
    n_readers: int = 2,
    n_writers: int = 1,
    read_queue_size: int = 2,
    write_queue_size: int = 2,
    progress: bool = True,
    description: str = "tiles",
    describe: Callable[[Result], Mapping[str, int]] | None = None,
    total: int | None = None,
    on_item_done: Callable[[], Any] | None = None,
    poll_interval_s: float = 0.05,
    isolate_failures: bool = False,
) -> EngineStats:
    """Run ``write(item, process(item, read(item)))`` for every item with overlapped stages.

    Args:
        items: work items (e.g. tile specs); consumed once, in order, by the readers.
        read: I/O stage (reader threads), e.g. read and normalise a tile.
        process: model stage, always on the calling thread (owns the GPU).
        write: output stage (writer threads), e.g. write the tile's HDF5 file.
        key: names an item in error messages (e.g. its tile id).
        n_readers: reader threads.
        n_writers: writer threads.
        read_queue_size: bound of the queue between readers and the model worker (items).
        write_queue_size: bound of the queue between the model worker and the writers (results).
        progress: show a tqdm bar (items/s, plus the running totals of ``describe``).
        description: label of the progress bar.
        describe: counts to accumulate per written result (e.g. ``{"cells": 12}``), shown as postfix.
        total: number of items for the progress bar (defaults to ``len(items)`` when available).
        on_item_done: called by a writer thread once an item is written and its data dropped (e.g.
            :func:`release_free_heap`).
        poll_interval_s: how often blocked threads look at the stop flag (bounds the stop latency).
        isolate_failures: an item whose read or process raises an ``Exception`` is recorded in
            ``EngineStats.failures`` and the run goes on with the other items (one bad region must not stop a
            study). Write failures still stop the run: they concern the output, not the item (a full disk).

    Raises:
        StageError: the first failure of any stage, naming the item; the other stages are stopped.
        KeyboardInterrupt / SystemExit: after Ctrl-C or SIGTERM, once every thread has stopped.
    """
    if n_readers < 1 or n_writers < 1:
        raise ValueError(f"need at least one reader and one writer, got {n_readers} / {n_writers}")
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    read_q = _BoundedQueue(read_queue_size)
    write_q = _BoundedQueue(write_queue_size)
    source = iter(items)
    source_lock = threading.Lock()
    started_at = time.perf_counter()

    with tqdm(total=total, desc=description, unit="tile", disable=not progress, smoothing=0.1) as bar:
        run = _Run(poll_interval_s, bar)

        # Each stage hands an item on and drops its own reference before blocking on the next one, so the
        # queue bounds really bound the memory (no stale tile kept alive by a loop variable).
        def read_one(item: Item) -> bool:
            run.started()
            try:
                data = run.clock.timed("read", read, item)
            except Exception as exc:
                if isolate_failures:
                    run.skip("read", key(item), exc)
                    return True
                run.fail("read", key(item), exc)
                return False
            except BaseException as exc:  # reported to the caller as StageError
                run.fail("read", key(item), exc)
                return False
            return run.put(read_q, (item, data), run.stop)

        def reader() -> None:
            while not run.stop.is_set():
                with source_lock:
                    item = next(source, _END)
                if item is _END or not read_one(item):
                    break
            run.put(read_q, _END, run.stop)

        def write_one(got: tuple[Item, Result]) -> bool:
            item, result = got
            try:
                run.clock.timed("write", write, item, result)
                counts = describe(result) if describe else {}
            except BaseException as exc:  # reported to the caller as StageError
                run.fail("write", key(item), exc)
                return False
            run.finished(counts)
            return True

        def writer() -> None:
            # Writers run until their end marker, even while stopping: results already computed are saved.
            while True:
                got = run.get(write_q, run.abort)
                if got is _STOPPED or got is _END:
                    return
                ok = write_one(got)
                del got
                if not ok:
                    return
                if on_item_done is not None:
                    on_item_done()

        readers = [
            threading.Thread(target=reader, name=f"tile-reader-{i}", daemon=True) for i in range(n_readers)
        ]
        writers = [
            threading.Thread(target=writer, name=f"tile-writer-{i}", daemon=True) for i in range(n_writers)
        ]
        try:
            with _sigterm_as_exit():
                for thread in readers + writers:
                    thread.start()
                _model_loop(run, read_q, write_q, process, key, n_readers, isolate_failures)
        finally:
            # Reached after the last item, a failure, Ctrl-C or SIGTERM alike: readers stop, writers finish
            # the bounded backlog and end (unless writing itself failed), then every thread is joined.
            run.stop.set()
            for thread in writers:
                if thread.ident is not None:
                    run.put(write_q, _END, run.abort)
            for thread in readers + writers:
                if thread.ident is not None:
                    thread.join()
    if run.error is not None:
        raise run.error
    return EngineStats(
        n_items=run.n_done,
        elapsed_s=time.perf_counter() - started_at,
        max_read_queue=read_q.high_water,
        max_write_queue=write_q.high_water,
        max_in_flight=run.max_in_flight,
        totals=dict(run.totals),
        busy_s=dict(run.clock.busy_s),
        cpu_s=dict(run.clock.cpu_s),
        failures=list(run.failures),
    )


def _model_loop(
    run: _Run,
    read_q: queue.Queue,
    write_q: queue.Queue,
    process: Callable[[Any, Any], Any],
    key: Callable[[Any], str],
    n_readers: int,
    isolate_failures: bool = False,
) -> None:
    """Process items as they arrive until every reader has finished or the run stops."""
    finished_readers = 0
    while finished_readers < n_readers:
        got = run.get(read_q, run.stop)
        if got is _STOPPED:
            return
        if got is _END:
            finished_readers += 1
            continue
        item, data = got
        del got  # drop the queue's tuple so the tile can be freed as soon as ``process`` is done with it
        try:
            result = run.clock.timed("process", process, item, data)
        except Exception as exc:  # reported to the caller as StageError, or recorded and skipped
            del data
            if isolate_failures:
                run.skip("process", key(item), exc)
                continue
            run.fail("process", key(item), exc)
            return
        del data
        if not run.put(write_q, (item, result), run.abort):
            return
        del result


def release_free_heap() -> bool:
    """Give the C heap's free pages back to the OS (glibc ``malloc_trim``); False where there is no glibc.

    Why: tile buffers are freed by other threads than the ones that allocated them, and glibc keeps freed
    memory in per-thread arenas (raising its mmap threshold after large frees), so RSS creeps up over a
    run although live data is bounded by the queues. Trimming after each tile keeps RSS at the live data;
    it costs far less than forcing every large allocation through ``mmap``, which doubled CZI read times
    (measured in ``bench/segmentation_node_bench.py``).
    """
    try:
        malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return False
    malloc_trim(ctypes.c_size_t(0))
    return True


@contextmanager
def _sigterm_as_exit():
    """Turn SIGTERM into ``SystemExit(143)`` in the calling thread so the engine shuts down cleanly.

    Only possible from the main thread (Python's rule for signal handlers); elsewhere SIGTERM keeps its
    current handling.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, _handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
