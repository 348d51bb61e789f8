"""Shared fixtures: the repository root, the real data beside it, and throwaway Kedro project copies."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


CHROMIUM = Path("/usr/bin/chromium")  # Debian's; Playwright's own browser download fails here


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium driven by Playwright, one per test module; skips, saying why, where either is absent."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip package playwright is not installed")
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent (Debian: apt-get install -y chromium)")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield launched
        launched.close()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (real CZI and H&E files); tests using it skip cleanly where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent")
    return SHARED_DATA


def load_bench_script(name: str) -> ModuleType:
    """A script of ``bench/`` imported as a module (``bench/`` is not a package), registered in
    ``sys.modules`` under ``<name>_bench`` because its dataclasses look their module up."""
    spec = importlib.util.spec_from_file_location(f"{name}_bench", REPO_ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def loaded_bench_script(name: str) -> Iterator[ModuleType]:
    """:func:`load_bench_script` for the length of a ``with`` block (a module fixture), then unregistered."""
    module = load_bench_script(name)
    try:
        yield module
    finally:
        sys.modules.pop(module.__name__, None)


def make_project_copy(dest: Path) -> Path:
    """A runnable copy of the Kedro project (config only; the package is installed) with empty data layers."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("pyproject.toml", ".telemetry"):
        shutil.copy2(REPO_ROOT / name, dest / name)
    shutil.copytree(REPO_ROOT / "conf", dest / "conf", ignore=shutil.ignore_patterns("local"))
    (dest / "conf" / "local").mkdir()
    # Kedro wants the source folder inside the project; the code is the same as the installed package.
    shutil.copytree(
        REPO_ROOT / "src", dest / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
    )
    return dest


def _run_kedro(
    project: Path, args: tuple[str, ...], timeout: float, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1", "MPLBACKEND": "Agg"}
    cmd = [str(Path(sys.executable).with_name("kedro")), *args]
    env |= extra_env or {}
    return subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=timeout)


def kedro(project: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """Run the ``kedro`` CLI of this environment inside ``project``; fail with its output on error."""
    result = _run_kedro(project, args, timeout)
    if result.returncode != 0:
        raise AssertionError(
            f"kedro {' '.join(args)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
        )
    return result


def kedro_killed_at(
    project: Path, failpoint: str, *args: str, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """Run the ``kedro`` CLI with the fail point ``failpoint`` armed (``mk_hspc.failpoints``); never raises."""
    return _run_kedro(project, args, timeout, {"MK_HSPC_FAILPOINT": failpoint})


def write_czi(
    path: Path, value: int, pixel_size_um: float | None, *, size_px: int = 32, compression: str | None = None
) -> Path:
    """A 2-tile ``2 * size_px`` x ``size_px`` Bgr24 slide filled with ``value``; ``pixel_size_um=None`` writes
    no scaling; ``compression`` e.g. ``"zstd1:ExplicitLevel=1"``."""
    from pylibCZIrw import czi as pyczi

    path.parent.mkdir(parents=True, exist_ok=True)
    options = {"compression_options": compression} if compression else {}
    with pyczi.create_czi(str(path), exist_ok=True, **options) as writer:
        for x in (0, size_px):
            writer.write(np.full((size_px, size_px, 3), value, np.uint8), location=(x, 0))
        scale_m = pixel_size_um * 1e-6 if pixel_size_um else 0.0  # the CZI stores metres per pixel
        writer.write_metadata(scale_x=scale_m, scale_y=scale_m)
    return path


def catalog_entry(name: str, **changes: Any) -> dict[str, Any]:
    """The entry ``name`` of conf/base/catalog.yml, its ``${globals:key}`` values taken from conf/base/globals.yml,
    then ``changes`` applied."""
    base = REPO_ROOT / "conf" / "base"
    globals_ = yaml.safe_load((base / "globals.yml").read_text())
    entry = yaml.safe_load((base / "catalog.yml").read_text())[name]
    for key, value in entry.items():
        if isinstance(value, str) and value.startswith("${globals:"):
            entry[key] = globals_[value.removeprefix("${globals:").removesuffix("}")]
    return entry | changes


def corrupt_first_subblock(path: Path) -> Path:
    """Wipe the start of the first subblock's (compressed) pixel data in place: the file still opens, but
    reading that subblock fails in the decoder."""
    from mk_hspc.czi.container import subblock_data_range

    payload, _ = subblock_data_range(path, 0)
    data = bytearray(path.read_bytes())
    data[payload : payload + 16] = bytes(16)  # the Zstd frame header
    path.write_bytes(bytes(data))
    return path
