"""Kedro project settings: configuration layout and the environments this project uses.

Environments: `base` (embedded default: demo slides + classical segmenter), `local` (a lab's own paths,
git-ignored, the default run env) and `gpu` (learned models: ``kedro run --env gpu``).
"""

import os

from kedro.config import OmegaConfigLoader

from mk_hspc.hooks import BriefErrorHooks, ParameterValidationHooks, ProvenanceHooks, RunLockHooks

# Bad input stops a `kedro ...` command with its message alone, not ~50 lines of framework frames above it
# (mk_hspc.errors; MK_HSPC_TRACEBACK=1 brings the traceback back); other errors keep their traceback.
# Parameters are validated first (tryfirst), then the run lock is taken; provenance checks each node's inputs
# and hands its outputs their lineage.
HOOKS = (BriefErrorHooks(), ParameterValidationHooks(), RunLockHooks(), ProvenanceHooks())

# MLflow never unpickles in this project: models are stored with skops and loaded by
# mk_hspc.classify.tracking.load_validated_model after its own checks (see the README's Classification).
os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "false"

CONFIG_LOADER_CLASS = OmegaConfigLoader
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    # Kedro's default ("destructive") replaces a whole top-level block of conf/base with an env's block, so
    # conf/local or conf/gpu would have to repeat every key of it; "soft" overrides only the keys they set.
    "merge_strategy": {"parameters": "soft"},
}
