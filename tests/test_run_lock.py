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


def test_a_run_stopped_before_its_closing_hooks_does_not_lock_out_the_next_run_of_the_process(
    tmp_path: Path,
) -> None:
    hooks = RunLockHooks()  # Kedro keeps one instance per process (settings.HOOKS)
    hooks.before_pipeline_run({"project_path": str(tmp_path)})
    # ... a KeyboardInterrupt or a failing before_pipeline_run hook: neither closing hook is called ...
    hooks.before_pipeline_run({"project_path": str(tmp_path)})
    hooks.after_pipeline_run()


def test_a_run_refused_for_its_parameters_holds_no_lock(tmp_path: Path) -> None:
    from filelock import FileLock
    from kedro.framework.hooks.manager import _create_hook_manager

    from mk_hspc import settings
    from mk_hspc.hooks import run_lock_path
    from mk_hspc.params_schema import ParameterError

    class BadParameters:
        def load(self, name: str) -> dict:
            return {"ingestion": {"tiles": {"tile_px": 2999.5}}}

    hook_manager = _create_hook_manager()
    for hooks in settings.HOOKS:  # registered as Kedro registers the project's hooks
        hook_manager.register(type(hooks)())
    with pytest.raises(ParameterError, match="tile_px"):
        hook_manager.hook.before_pipeline_run(
            run_params={"project_path": str(tmp_path)}, pipeline=None, catalog=BadParameters()
        )
    lock = FileLock(run_lock_path(tmp_path), timeout=0)
    lock.acquire()  # free: the refused run never took it
    lock.release()
