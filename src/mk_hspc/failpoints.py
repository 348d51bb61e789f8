"""Named fail points: deterministic crash moments for the fault benchmark and tests.

Crash safety can only be shown by crashing at the worst moments (a file written but not renamed, a manifest
renamed but not its data, ...), which a timer hits by luck only. Code calls :func:`failpoint` at those
moments; when ``MK_HSPC_FAILPOINT`` names that point (optionally ``name@N`` for its N-th hit), the process
kills itself with SIGKILL, exactly as the OOM killer or a power cut would. Unset, a fail point costs one
dictionary lookup.
"""

from __future__ import annotations

import os
import signal
import threading

ENV_VAR = "MK_HSPC_FAILPOINT"
_hits: dict[str, int] = {}
_lock = threading.Lock()


def failpoint(name: str) -> None:
    """SIGKILL this process if ``$MK_HSPC_FAILPOINT`` is ``name`` or ``name@N`` and this is hit N."""
    wanted = os.environ.get(ENV_VAR)
    if not wanted or not wanted.startswith(name):
        return
    point, _, nth = wanted.partition("@")
    if point != name:
        return
    with _lock:
        _hits[name] = _hits.get(name, 0) + 1
        hit = _hits[name]
    if hit >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
