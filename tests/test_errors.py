"""User errors reach the command line as their message alone; bugs keep their traceback."""

from __future__ import annotations

import sys
from pathlib import Path

import kedro
import pytest

from mk_hspc import errors
from mk_hspc.datasets.atomic import StaleOutputError
from mk_hspc.errors import (
    UserError,
    brief_message,
    describe_error,
    install_brief_excepthook,
    user_error_in,
)
from mk_hspc.params_schema import ParameterError
from tests.conftest import _run_kedro, make_project_copy


class BadSheet(UserError, ValueError):
    pass


def _raised(make: type[BaseException] | None = None) -> BaseException:
    try:
        try:
            raise BadSheet("sheet.csv: slide 'a' has two groups")
        except BadSheet as inner:
            if make is None:
                raise
            raise make("Failed while loading data from dataset 'slide_sheet'") from inner
    except BaseException as exc:  # noqa: BLE001 - the test inspects whatever was raised
        return exc


def test_user_error_is_found_along_the_chain_of_causes() -> None:
    assert isinstance(user_error_in(_raised()), BadSheet)
    wrapped = _raised(RuntimeError)  # as Kedro wraps a dataset's error
    assert isinstance(user_error_in(wrapped), BadSheet)
    assert user_error_in(KeyError("x")) is None
    suppressed = RuntimeError("a bug")
    suppressed.__context__, suppressed.__suppress_context__ = BadSheet("x"), True  # `raise ... from None`
    assert user_error_in(suppressed) is None


def test_an_error_raised_while_handling_a_user_error_keeps_its_traceback() -> None:
    try:
        try:
            raise BadSheet("sheet.csv: slide 'a' has two groups")
        except BadSheet:
            None.group  # noqa: B018 - a bug in the error handling
    except AttributeError as exc:
        assert isinstance(exc.__context__, BadSheet)
        assert user_error_in(exc) is None and brief_message(exc) is None


def test_project_errors_written_for_users_are_user_errors() -> None:
    from mk_hspc.classify.labels import LabelsError
    from mk_hspc.classify.tracking import ModelNotValidatedError
    from mk_hspc.czi.discovery import DuplicateSlideNameError
    from mk_hspc.czi.errors import CziSlideError
    from mk_hspc.datasets.slide_folder import UnknownSlideOverrideError
    from mk_hspc.datasets.tile_store import BadInputTilesError, TileFailuresError
    from mk_hspc.engine.plugins import TileOverlapError
    from mk_hspc.hooks import RunLockHeldError, StaleInputError
    from mk_hspc.labels.contract import LabelFileError
    from mk_hspc.labels.store import EventConflictError
    from mk_hspc.models.torch_device import WeightsFileError, WeightsNotFoundError
    from mk_hspc.slide_sheet import SlideSheetError

    user_errors = (
        ParameterError, StaleOutputError, StaleInputError, SlideSheetError, DuplicateSlideNameError,
        CziSlideError, LabelsError, LabelFileError, EventConflictError, ModelNotValidatedError,
        RunLockHeldError, TileOverlapError, UnknownSlideOverrideError, WeightsFileError, WeightsNotFoundError,
        BadInputTilesError,
    )  # fmt: skip
    for kind in user_errors:
        assert issubclass(kind, UserError), kind
    # Tiles that failed on a bug are not bad input: that error keeps its traceback.
    assert not issubclass(TileFailuresError, UserError)
    assert issubclass(WeightsNotFoundError, FileNotFoundError)  # callers that catch the built-in still do


def test_describe_error_names_the_type_of_anything_but_a_user_error() -> None:
    assert describe_error(KeyError("typo_key")) == "KeyError: 'typo_key'"
    assert describe_error(BadSheet("sheet.csv: two groups")) == "sheet.csv: two groups"


def test_brief_message_names_the_error_and_how_to_see_the_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(errors.TRACEBACK_ENV_VAR, raising=False)
    message = brief_message(_raised(RuntimeError))
    assert message == (
        "Error: sheet.csv: slide 'a' has two groups\n(BadSheet; MK_HSPC_TRACEBACK=1 shows the full traceback)"
    )
    assert brief_message(ValueError("a bug")) is None
    monkeypatch.setenv(errors.TRACEBACK_ENV_VAR, "false")
    assert brief_message(_raised()) is not None
    for on in ("1", "true", "yes"):
        monkeypatch.setenv(errors.TRACEBACK_ENV_VAR, on)
        assert brief_message(_raised()) is None


def test_the_hook_prints_user_errors_and_hands_the_rest_on(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv(errors.TRACEBACK_ENV_VAR, raising=False)
    handed_on: list[BaseException] = []
    monkeypatch.setattr(sys, "excepthook", lambda kind, exc, tb: handed_on.append(exc))
    install_brief_excepthook()
    install_brief_excepthook()  # idempotent: one brief hook in front of the previous one
    user, bug = _raised(), ValueError("a bug")
    sys.excepthook(type(user), user, user.__traceback__)
    sys.excepthook(type(bug), bug, bug.__traceback__)
    assert handed_on == [bug]
    assert capsys.readouterr().err.startswith("Error: sheet.csv: slide 'a' has two groups\n")


@pytest.mark.slow
def test_kedro_run_with_a_bad_parameter_prints_the_message_without_a_traceback(tmp_path: Path) -> None:
    project = make_project_copy(tmp_path / "project")
    args = ("run", "--pipelines", "segmentation", "--params", "segmentation.device=tpu")
    result = _run_kedro(project, args, timeout=300)
    assert result.returncode == 1
    assert (
        "Error: Invalid parameters:\n  segmentation.device: should be auto, cpu, cuda or cuda:N, got 'tpu'"
        in (result.stderr)
    )
    assert "Traceback" not in result.stderr
    full = _run_kedro(project, args, timeout=300, extra_env={errors.TRACEBACK_ENV_VAR: "1"})
    assert full.returncode == 1 and "Traceback (most recent call last)" in full.stderr
    # Kedro's rich logging config (also its fallback for a run from a sub-folder) installs rich's own
    # excepthook when logging is configured; the brief one is installed after it, from a hook.
    rich = Path(kedro.__file__).parent / "framework" / "project" / "rich_logging.yml"
    for extra, cwd in (({"KEDRO_LOGGING_CONFIG": str(rich)}, project), ({}, project / "conf")):
        result = _run_kedro(cwd, args, timeout=300, extra_env=extra)
        assert result.returncode == 1 and "Error: Invalid parameters:" in result.stdout + result.stderr
        assert "Traceback" not in result.stdout + result.stderr
