"""Kedro project settings: configuration layout and the environments this project uses.

Environments: `base` (embedded default: demo slides + classical segmenter), `local` (a lab's own paths,
git-ignored, the default run env) and `gpu` (learned models: ``kedro run --env gpu``).
"""

from kedro.config import OmegaConfigLoader

from mk_hspc.hooks import ProvenanceHooks, RunLockHooks

# Run lock first: a refused second run must not touch anything.
HOOKS = (RunLockHooks(), ProvenanceHooks())

CONFIG_LOADER_CLASS = OmegaConfigLoader
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
}
