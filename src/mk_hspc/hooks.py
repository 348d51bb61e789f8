"""Project hooks: the parameters are validated before any node runs."""

from __future__ import annotations

from typing import Any

from kedro.framework.hooks import hook_impl
from kedro.io import CatalogProtocol
from kedro.pipeline import Pipeline

from mk_hspc.params_schema import validate_parameters


class ParameterValidationHooks:
    """Stops ``kedro run`` before its first node when the merged parameters (conf envs and ``--params``)
    break the schema, with a message naming every offending key (:class:`~mk_hspc.params_schema.ParameterError`)."""

    @hook_impl
    def before_pipeline_run(
        self, run_params: dict[str, Any], pipeline: Pipeline, catalog: CatalogProtocol
    ) -> None:
        validate_parameters(catalog.load("parameters"))
