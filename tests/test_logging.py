"""The project's logging (conf/logging.yml, what `kedro run` uses by default) prints user text verbatim."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import REPO_ROOT

USER_TEXT = "not a CZI file: it starts with b'[/bold] [red]x', Scaling/Items/Distance[@Id='X']"

# Importing kedro.framework.project configures logging the way `kedro run` does, from the working directory.
SCRIPT = f"""
import logging
import kedro.framework.project

logging.getLogger("mk_hspc.pipelines.ingestion.nodes").warning("Skipping bad slide %s: %s", "bad", {USER_TEXT!r})
logging.getLogger("kedro.io.data_catalog").info(
    "Loading data from %s (%s)...", "raw_slides", "SlideFolderDataset", extra={{"rich_format": ["dark_orange"]}}
)
"""


def test_logged_user_text_comes_out_verbatim_through_the_project_handler() -> None:
    env = {key: value for key, value in os.environ.items() if key != "KEDRO_LOGGING_CONFIG"}
    env |= {"KEDRO_DISABLE_TELEMETRY": "true", "COLUMNS": "60"}
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "Logging error" not in result.stderr
    lines = result.stdout.splitlines()
    assert any(line.endswith(f"WARNING - Skipping bad slide bad: {USER_TEXT}") for line in lines), (
        result.stdout
    )
    assert any(line.endswith("INFO - Loading data from raw_slides (SlideFolderDataset)...") for line in lines)
