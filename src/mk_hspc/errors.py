"""Errors written for the person running the pipeline, and their short display at the command line.

Bad input (a parameter, a slide sheet, a label file, a stale output) stops a run with a message that names
the file or key and the problem. Kedro lets such an error reach Python's top level, which prints ~50 lines
of click, pluggy and Kedro frames above that one message. :func:`install_brief_excepthook` shows it alone
(with a hint how to get the traceback back); any other error keeps its full traceback, as it is a bug.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from types import TracebackType

TRACEBACK_ENV_VAR = "MK_HSPC_TRACEBACK"  # set to 1 for the full traceback of user errors too
TRACEBACK_OFF = ("", "0", "false", "no", "off")  # its values that keep user errors brief


class UserError(Exception):
    """Mixin of errors whose message names the file or key and the problem: shown without a traceback."""


def describe_error(exc: BaseException) -> str:
    """One line for a record of a failure: a user error's own message; anything else prefixed with its type
    (a bug's bare message can be as short as ``'typo_key'`` for a ``KeyError``)."""
    return str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"


def user_error_in(exc: BaseException) -> UserError | None:
    """The first :class:`UserError` along ``exc``'s explicit causes (``raise ... from``: how Kedro wraps a
    dataset's error), if any. An implicit context is not followed: an error raised while another was being
    handled is a new problem (often a bug) and keeps its traceback."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, UserError):
            return current
        seen.add(id(current))
        current = current.__cause__
    return None


def brief_message(exc: BaseException) -> str | None:
    """The lines to print instead of a traceback, or None when ``exc`` deserves its traceback."""
    user = user_error_in(exc)
    if user is None or os.environ.get(TRACEBACK_ENV_VAR, "").strip().lower() not in TRACEBACK_OFF:
        return None
    return f"Error: {user}\n({type(user).__name__}; {TRACEBACK_ENV_VAR}=1 shows the full traceback)"


Hook = Callable[[type[BaseException], BaseException, TracebackType | None], object]


def install_brief_excepthook() -> None:
    """Show uncaught user errors briefly (:func:`brief_message`); others go to the previous hook. Idempotent."""
    previous: Hook = sys.excepthook
    if getattr(previous, "_mk_hspc_brief", False):
        return

    def hook(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        message = brief_message(exc)
        if message is None:
            previous(kind, exc, tb)
        else:
            print(message, file=sys.stderr)

    hook._mk_hspc_brief = True  # type: ignore[attr-defined]
    sys.excepthook = hook
