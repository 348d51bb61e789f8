"""One run per project data folder: a second run is refused at once, naming the holder; a dead holder frees it."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mk_hspc.hooks import RunLockHooks

HOLD_LOCK = textwrap.dedent(
    """
    import sys, time
    from mk_hspc.hooks import RunLockHooks
    hooks = RunLockHooks()  # kept alive, as Kedro keeps its hooks
    hooks.before_pipeline_run({"project_path": sys.argv[1]})
    print("holding", flush=True)
    time.sleep(60)
    """
)


def test_a_second_run_is_refused_naming_the_holder_and_a_killed_holder_frees_the_lock(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(RuntimeError, match=rf"holds the project data folder .*pid {holder.pid} "):
            RunLockHooks().before_pipeline_run({"project_path": str(tmp_path)})
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    hooks = RunLockHooks()
    hooks.before_pipeline_run({"project_path": str(tmp_path)})  # the kernel released the dead holder's lock
    hooks.after_pipeline_run()


def test_the_lock_is_released_after_a_failed_run(tmp_path: Path) -> None:
    first = RunLockHooks()
    first.before_pipeline_run({"project_path": str(tmp_path)})
    first.on_pipeline_error()
    second = RunLockHooks()
    second.before_pipeline_run({"project_path": str(tmp_path)})
    second.after_pipeline_run()
