"""The threaded engine: bounded memory, order-independent results, prompt and clean failure handling."""

from __future__ import annotations

import os
import platform
import random
import signal
import threading
import time

import pytest

from mk_hspc.engine.prefetch import StageError, release_free_heap, run_prefetched


class LiveItems:
    """Counts items between read and the end of their write: the engine's real memory footprint."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.live = 0
        self.max_live = 0

    def up(self) -> None:
        with self.lock:
            self.live += 1
            self.max_live = max(self.max_live, self.live)

    def down(self) -> None:
        with self.lock:
            self.live -= 1


def _jitter(rng_seed: int) -> None:
    time.sleep(random.Random(rng_seed).uniform(0, 0.004))


def test_threaded_output_equals_sequential_and_memory_is_bounded():
    items = list(range(60))
    live = LiveItems()
    outputs: dict[int, int] = {}
    write_threads: set[str] = set()
    process_threads: set[str] = set()
    done_hooks: list[str] = []

    def read(item: int) -> list[int]:
        live.up()
        _jitter(item)
        return [item] * 1000

    def process(item: int, data: list[int]) -> int:
        process_threads.add(threading.current_thread().name)
        _jitter(item + 1000)
        return sum(data) + item

    def write(item: int, result: int) -> None:
        write_threads.add(threading.current_thread().name)
        _jitter(item + 2000)
        outputs[item] = result
        live.down()

    stats = run_prefetched(
        items,
        read,
        process,
        write,
        n_readers=3,
        n_writers=2,
        read_queue_size=2,
        write_queue_size=3,
        progress=False,
        describe=lambda result: {"total": result},
        on_item_done=lambda: done_hooks.append(threading.current_thread().name),
    )
    expected = {item: item * 1000 + item for item in items}
    assert outputs == expected
    assert stats.n_items == len(items)
    assert stats.totals == {"total": sum(expected.values())}
    assert set(stats.busy_s) == {"read", "process", "write"} and all(v > 0 for v in stats.busy_s.values())
    # CPU time of the stage threads: never above their wall time inside the stage (timer resolution aside)
    assert set(stats.cpu_s) == set(stats.busy_s)
    assert all(0 <= stats.cpu_s[stage] <= stats.busy_s[stage] + 0.01 for stage in stats.busy_s)
    # the queues never held more than their bound, and live items never exceeded what the bounds allow
    assert 1 <= stats.max_read_queue <= 2
    assert 1 <= stats.max_write_queue <= 3
    assert live.max_live <= 3 + 2 + 1 + 3 + 2
    assert stats.max_in_flight <= 3 + 2 + 1 + 3 + 2
    assert process_threads == {
        threading.current_thread().name
    }  # the model stage owns one thread: the caller's
    assert len(write_threads) >= 1 and threading.current_thread().name not in write_threads
    assert len(done_hooks) == len(items) and set(done_hooks) <= write_threads


def test_slow_model_keeps_readers_waiting_on_the_bound():
    """With a slow model the readers run ahead only as far as the queue allows."""
    reads_started: list[int] = []
    processed: list[int] = []

    def process(item: int, data: int) -> int:
        time.sleep(0.01)
        # when the model starts item k, at most queue + readers + k + 1 items can have been read
        assert len(reads_started) <= 2 + 2 + len(processed) + 1
        processed.append(item)
        return data

    stats = run_prefetched(
        range(25),
        lambda i: reads_started.append(i) or i,
        process,
        lambda i, r: None,
        n_readers=2,
        read_queue_size=2,
        progress=False,
        total=25,
    )
    assert stats.n_items == 25 and stats.max_read_queue == 2


@pytest.mark.parametrize("stage", ["read", "process", "write"])
def test_failure_in_any_stage_names_the_item_and_stops_the_rest(stage):
    baseline_threads = threading.active_count()
    touched: list[int] = []

    def maybe_fail(where: str, item: int) -> None:
        touched.append(item)
        if where == stage and item == 7:
            raise OSError("disk on fire")

    def read(item):
        maybe_fail("read", item)
        return item

    processed: list[int] = []
    written: list[int] = []

    def process(item, data):
        maybe_fail("process", item)
        processed.append(item)
        return data

    def write(item, result):
        maybe_fail("write", item)
        written.append(item)

    with pytest.raises(StageError, match=r"tile-7") as caught:
        run_prefetched(
            range(10_000),
            read,
            process,
            write,
            key=lambda i: f"tile-{i}",
            n_readers=2,
            n_writers=2,
            progress=False,
        )
    assert caught.value.stage == stage and caught.value.item_key == "tile-7"
    assert isinstance(caught.value.__cause__, OSError)
    assert max(touched) < 1000  # stopped promptly, did not run through the remaining items
    assert threading.active_count() == baseline_threads  # every engine thread has ended
    if stage != "write":  # results computed before the failure are still saved
        assert sorted(written) == sorted(processed)


def test_keyboard_interrupt_stops_threads_and_propagates():
    baseline_threads = threading.active_count()

    def process(item, data):
        if item == 5:
            raise KeyboardInterrupt
        return data

    with pytest.raises(KeyboardInterrupt):
        run_prefetched(range(1000), lambda i: i, process, lambda i, r: None, progress=False)
    assert threading.active_count() == baseline_threads


@pytest.mark.skipif(
    threading.current_thread() is not threading.main_thread(), reason="signals need the main thread"
)
def test_sigterm_exits_cleanly_and_restores_the_handler():
    baseline_threads = threading.active_count()
    previous = signal.getsignal(signal.SIGTERM)
    written: list[int] = []

    def process(item, data):
        if item == 3:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler interrupts this sleep
        return data

    with pytest.raises(SystemExit) as caught:
        run_prefetched(range(1000), lambda i: i, process, lambda i, r: written.append(i), progress=False)
    assert caught.value.code == 128 + signal.SIGTERM
    assert threading.active_count() == baseline_threads
    assert signal.getsignal(signal.SIGTERM) is previous
    assert len(written) < 1000


def test_invalid_bounds_are_rejected():
    with pytest.raises(ValueError):
        run_prefetched([1], lambda i: i, lambda i, d: d, lambda i, r: None, read_queue_size=0, progress=False)
    with pytest.raises(ValueError):
        run_prefetched([1], lambda i: i, lambda i, d: d, lambda i, r: None, n_readers=0, progress=False)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc-specific")
def test_free_heap_is_released_on_glibc():
    assert release_free_heap() is True


class RecordingBar:
    """A tqdm stand-in that records ``(count, postfix)`` whenever an update would draw the line."""

    instances: list[RecordingBar] = []

    def __init__(self, *_: object, **__: object) -> None:
        self.n, self.postfix, self.drawn = 0, {}, []
        RecordingBar.instances.append(self)

    def __enter__(self) -> RecordingBar:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        return None

    def update(self, n: int = 1) -> None:
        self.n += n
        self.drawn.append((self.n, dict(self.postfix)))

    def set_postfix(self, totals: dict, refresh: bool = True) -> None:
        self.postfix = dict(totals)


def test_progress_bar_shows_each_tiles_counts_when_it_counts_the_tile(monkeypatch):
    """The running totals are set before the bar advances: the line that reaches 100 % already shows every
    tile's counts (before, each update drew the previous totals and closing drew a second, different 100 %
    line)."""
    import mk_hspc.engine.prefetch as prefetch

    RecordingBar.instances.clear()
    monkeypatch.setattr(prefetch, "tqdm", RecordingBar)
    run_prefetched(
        range(5),
        read=lambda i: i,
        process=lambda i, d: d,
        write=lambda i, r: None,
        describe=lambda r: {"cells": 2},
        n_writers=1,
    )
    (bar,) = RecordingBar.instances
    assert bar.drawn == [(k, {"cells": 2 * k}) for k in range(1, 6)]
