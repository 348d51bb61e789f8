"""Helpers to run `kedro annotate` as a real server process in a throwaway project (browser and load tests)."""

from __future__ import annotations

import importlib.metadata
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from mk_hspc.datasets.atomic import AtomicDataset
from mk_hspc.export.build import plan_site
from tests.annotation_fixtures import EXPORT_PARAMS, Study, make_study
from tests.conftest import make_project_copy

ENTRY_POINT = "mk_hspc.annotate.cli:commands"
SITE_PATH = "data/08_reporting/annotation_site"


def project_with_site(root: Path) -> tuple[Path, Study]:
    """A project copy whose catalog's `annotation_site` holds the export of a tiny study."""
    project = make_project_copy(root / "project")
    study = make_study(root / "study")
    site = AtomicDataset("mk_hspc.datasets.annotation.AnnotationSiteDataset", str(project / SITE_PATH))
    site.save(plan_site(study.cells, study.store, study.loaders(), EXPORT_PARAMS))
    return project, study


def command_env(root: Path) -> dict[str, str]:
    """Environment for `kedro` subprocesses: this worktree's code first, and the `annotate` entry point.

    An installed mk_hspc declares the entry point (pyproject); an environment whose mk_hspc was installed
    before it existed gets the same declaration from a minimal dist-info here.
    """
    paths = [str(Path(__file__).resolve().parents[1] / "src")]
    declared = {ep.value for ep in importlib.metadata.entry_points(group="kedro.project_commands")}
    if ENTRY_POINT not in declared:
        shim = root / "entry_point_shim"
        info = shim / "mk_hspc_annotate_entry_point-0.0.dist-info"
        info.mkdir(parents=True, exist_ok=True)
        (info / "METADATA").write_text(
            "Metadata-Version: 2.1\nName: mk-hspc-annotate-entry-point\nVersion: 0.0\n"
        )
        (info / "entry_points.txt").write_text(f"[kedro.project_commands]\nmk_hspc = {ENTRY_POINT}\n")
        paths.append(str(shim))
    existing = os.environ.get("PYTHONPATH")
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(paths + ([existing] if existing else [])),
        "KEDRO_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "1",
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`kedro annotate --port PORT` in ``project``; ``start`` waits until it answers, ``kill`` is SIGKILL."""

    def __init__(self, project: Path, env: dict[str, str], port: int, *args: str) -> None:
        self.project, self.env, self.port, self.args = project, env, port, args
        self.process: subprocess.Popen | None = None
        self.url = f"http://127.0.0.1:{port}/"

    def start(self, timeout_s: float = 60) -> Server:
        kedro = str(Path(sys.executable).with_name("kedro"))
        self.process = subprocess.Popen(
            [kedro, "annotate", "--port", str(self.port), *self.args],
            cwd=self.project,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"kedro annotate exited {self.process.returncode}:\n{self.process.stdout.read()}"
                )
            try:
                with urllib.request.urlopen(self.url + "api/health", timeout=1) as reply:
                    if reply.status == 200:
                        return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise AssertionError("kedro annotate did not answer in time")

    def kill(self) -> None:
        """SIGKILL: no shutdown handler runs (what a crash or an OOM kill does)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
