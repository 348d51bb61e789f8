"""Fault benchmark for "Trustworthy core": SIGKILL at named moments and on a timer, then rerun; bad inputs.

Everything runs the real ``kedro run`` CLI on throwaway copies of the project (``tests.conftest``'s
``make_project_copy``, so the copies carry this worktree's ``src/``, which ``kedro run`` imports), on the tiny
demo study of ``tests/test_kedro_project.py`` (``TINY_RUN``).

Projects:

- ``reference``: a finished run with ``TINY_RUN``; every comparison is against its outputs.
- ``previous``: the reference's slides, run from empty data with other ingestion parameters (another sampling
  seed and tissue map resolution), so every ingestion output, the sample, cells and counts differ from the
  reference and about half of the reference's tiles are not in its tile store. Each kill scenario starts
  from a copy of it and runs ``TINY_RUN``: the state a lab has when it reruns after changing parameters,
  so a kill leaves a real mixture of old and new outputs.

Kill scenarios (``kills``): ``MK_HSPC_FAILPOINT`` (``mk_hspc.failpoints``) SIGKILLs the run at a named moment,
or a timer SIGKILLs the kedro process group at a seeded random time inside segmentation. Then, before any
rerun:

1. every catalog output is loaded through the project's catalog (``KedroSession``); each one must be refused
   (a ``DatasetError``), or equal the reference, or equal the previous run's output (an intact output of
   the previous complete run: its lineage in the manifest keeps it from being used with the new ones,
   which step 2 checks). Anything else loaded is ``stale_or_partial_accepted``. The figures have no loader
   (``MatplotlibDataset``): the catalog's trust check (``verified_manifest``) stands for the load and the
   PNG bytes are compared.
2. downstream nodes are run alone (``--nodes summarise_cell_counts``; ``make_cells_table`` too after kills
   while the tile store was incomplete); one that exits 0 with an output different from the reference is
   stale-accepted.
3. ``kedro run`` again with the same parameters: every output must equal the reference (cells table, counts,
   each tile file's cells and labels, slide_meta, tile_index, tile_sample, tissue maps, figures, ...):
   ``resumed_identical``; and no temporary file (``.*.tmp-*``, ``.*.old-*``, ``*.h5.tmp``) may remain.

Staleness scenarios (the issue's): after a finished run, ``ingestion.sampling.fraction`` changes, ingestion
runs alone (killed at several moments, or not), then the counts node runs alone with the new parameters:
it must be refused, naming what does not belong together; accepted counts are stale-accepted.

Bad inputs (``bad_inputs``): files, parameters, sheets, weights and a second concurrent run, each on a copy
of the finished reference. ``clear_error_naming_the_culprit`` counts runs that exit non-zero with every
culprit string (file name, dotted parameter key or slide name) in the final error message;
``finished_work_lost`` counts runs after which a finished output of the reference no longer loads or
differs (the tile store is judged by its tile files: a run that fails inside segmentation withdraws the
store's manifest by design, "incomplete until this run has finished", and that is reported per record).

Usage: ``python bench/faults.py [--work-dir bench/work/faults] [--only kills,staleness,bad] [--keep]``
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.conftest: the project copy helpers

from kedro.framework.session import KedroSession  # noqa: E402
from kedro.framework.startup import bootstrap_project  # noqa: E402

from mk_hspc.czi.container import subblock_data_range  # noqa: E402
from mk_hspc.czi.reader import read_subblocks  # noqa: E402
from mk_hspc.datasets.atomic import content_digest  # noqa: E402
from mk_hspc.datasets.tile_store import FAILURES_NAME, TileStore  # noqa: E402
from mk_hspc.tile_store import read_tile_result  # noqa: E402
from mk_hspc.tissue import TissueMap  # noqa: E402
from tests.conftest import make_project_copy, write_czi  # noqa: E402
from tests.test_kedro_project import HOLD_LOCK, TINY_RUN  # noqa: E402

KEDRO = Path(sys.executable).with_name("kedro")
PREVIOUS_RUN = (
    TINY_RUN.replace("ingestion.tissue.map_um_per_px=4.0", "ingestion.tissue.map_um_per_px=5.0")
    + ",ingestion.sampling.seed=7"
)
assert PREVIOUS_RUN.count("map_um_per_px=5.0") == 1
STALE_FRACTION_RUN = TINY_RUN.replace("ingestion.sampling.fraction=0.5", "ingestion.sampling.fraction=0.25")
RUN_TIMEOUT_S = 300
LOADS_BUT_DIFFERS = "loads_but_differs"  # from the reference (and, after a kill, from the previous run)
TEMPORARY_PATTERNS = (".*.tmp-*", ".*.old-*", "*.h5.tmp", ".*.tmp")
SLIDES = Path("data/01_raw/slides")
SHEET = Path("data/01_raw/slide_sheet.csv")
STORE = Path("data/03_primary/tile_store")
# Catalog entries that are inputs, not outputs.
NOT_OUTPUTS = {"raw_slides", "slide_sheet", "parameters"}
SEGMENTATION_STARTED = re.compile(r"Segmentation: \d+ tiles, \d+ already done, \d+ to run")
# The last line of a traceback ("SomeError: ..."), or the brief display of a user error ("Error: ...", then
# the message and a hint; mk_hspc.errors).
ERROR_START = re.compile(r"^(Error: |[A-Za-z_][\w.]*(Error|Exception|Timeout)\b)")
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def say(message: str, *args: Any) -> None:
    """Progress on stdout (kedro's logging config, applied by every KedroSession, would swallow a logger)."""
    print(time.strftime("%H:%M:%S ") + (message % args if args else message), flush=True)


# ------------------------------------------------------------------------------------------- running kedro
@dataclasses.dataclass
class Run:
    args: list[str]
    returncode: int
    output: str
    elapsed_s: float
    failpoint: str | None = None
    timer_delay_s: float | None = None

    @property
    def killed(self) -> bool:
        return self.returncode == -signal.SIGKILL

    @property
    def error(self) -> str:
        """The final exception block (its first line and the message lines after it), empty when none."""
        lines = self.output.rstrip().splitlines()
        for index in range(len(lines) - 1, -1, -1):
            if ERROR_START.match(lines[index]):
                return "\n".join(lines[index:])
        return ""

    @property
    def last_error_line(self) -> str:
        error = self.error
        return error.splitlines()[0][:600] if error else ""

    def command(self) -> str:
        prefix = f"MK_HSPC_FAILPOINT={self.failpoint} " if self.failpoint else ""
        return prefix + "kedro " + " ".join(self.args)

    def record(self) -> dict[str, Any]:
        return {
            "command": self.command(),
            "exit_code": self.returncode,
            "elapsed_s": round(self.elapsed_s, 2),
            "last_error_line": self.last_error_line,
        }


def run_env(failpoint: str | None = None) -> dict[str, str]:
    env = {
        **os.environ,
        "KEDRO_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "1",
        "MPLBACKEND": "Agg",
        "PYTHONUNBUFFERED": "1",
        # The copy's src/ comes first anyway (kedro puts it on sys.path); both are this worktree's code.
        "PYTHONPATH": str(REPO / "src"),
    }
    env.pop("MK_HSPC_FAILPOINT", None)
    if failpoint:
        env["MK_HSPC_FAILPOINT"] = failpoint
    return env


def kedro(
    project: Path, *args: str, failpoint: str | None = None, extra_env: dict[str, str] | None = None
) -> Run:
    started = time.perf_counter()
    result = subprocess.run(
        [str(KEDRO), *args],
        cwd=project,
        env=run_env(failpoint) | (extra_env or {}),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=RUN_TIMEOUT_S,
        start_new_session=True,
    )
    return Run(list(args), result.returncode, result.stdout, time.perf_counter() - started, failpoint)


def kedro_killed_during_segmentation(project: Path, delay_s: float, *args: str) -> Run:
    """``kedro run``, SIGKILLed (the whole process group) ``delay_s`` after segmentation has started."""
    started = time.perf_counter()
    process = subprocess.Popen(
        [str(KEDRO), *args],
        cwd=project,
        env=run_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    timer: threading.Timer | None = None
    lines = []
    assert process.stdout is not None
    for line in process.stdout:
        lines.append(line)
        if timer is None and SEGMENTATION_STARTED.search(line):
            timer = threading.Timer(delay_s, _kill_group, (process.pid,))
            timer.start()
    process.wait(timeout=RUN_TIMEOUT_S)
    if timer is not None:
        timer.cancel()
    run = Run(list(args), process.returncode, "".join(lines), time.perf_counter() - started)
    run.timer_delay_s = delay_s
    return run


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def segmentation_seconds(run: Run) -> float | None:
    """Seconds between 'Segmentation: ... to run' and the segmentation node's completion, from the log."""
    start = end = None
    for line in run.output.splitlines():
        stamp = LOG_TIME.match(line)
        if stamp is None:
            continue
        if start is None and SEGMENTATION_STARTED.search(line):
            start = stamp[1]
        elif start is not None and "Completed node: segment_sampled_tiles" in line:
            end = stamp[1]
            break
    if start is None or end is None:
        return None
    fmt = "%Y-%m-%d %H:%M:%S,%f"
    return (datetime.strptime(end, fmt) - datetime.strptime(start, fmt)).total_seconds()


def copy_project(source: Path, dest: Path) -> Path:
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns("*.lock", "build"))
    return dest


# ------------------------------------------------------------------------------- outputs through the catalog
@contextlib.contextmanager
def project_catalog(project: Path) -> Iterator[Any]:
    bootstrap_project(project)
    for name in ("kedro", "mk_hspc"):
        logging.getLogger(name).setLevel(logging.WARNING)
    with KedroSession.create(project_path=project) as session:
        catalog = session.load_context().catalog
        for name in ("kedro", "mk_hspc"):
            logging.getLogger(name).setLevel(logging.WARNING)
        yield catalog


@dataclasses.dataclass
class Loaded:
    """One output as the catalog gives it: refused (with why) or its canonical content."""

    refused: str | None
    content: Any = None


def load_outputs(project: Path) -> dict[str, Loaded]:
    with project_catalog(project) as catalog:
        from kedro.framework.project import pipelines  # configured by project_catalog

        # The outputs of the main job (`kedro run`); export, training and the full run have their own.
        main_outputs = pipelines["__default__"].all_outputs()
        names = sorted(
            name
            for name in catalog.keys()  # noqa: SIM118 (the catalog is no dict)
            if name in main_outputs and name not in NOT_OUTPUTS and not name.startswith("params:")
        )
        # Every project of the bench lies directly in the work folder; a copied output names its source's.
        root = re.compile(re.escape(str(project.resolve().parent)) + r"/[^/]+")
        return {name: load_output(catalog, name, root) for name in names}


def load_output(catalog: Any, name: str, root: re.Pattern[str]) -> Loaded:
    try:
        value = catalog.load(name)
    except Exception as exc:  # a refusal; figures have no loader once the manifest check has passed
        if "Loading not supported" in str(exc):
            return Loaded(None, figure_bytes(Path(catalog.get(name)._describe()["filepath"])))
        return Loaded(f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
    try:
        return Loaded(None, canonical(value, root))
    except Exception as exc:  # a loader that returned something unreadable (a lazy partition, a tile)
        return Loaded(f"{type(exc).__name__} while reading the loaded value: {str(exc)[:300]}")


def figure_bytes(path: Path) -> dict[str, bytes]:
    if path.is_dir():
        return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if not p.name.startswith(".")}
    return {path.name: path.read_bytes()}


def canonical(value: Any, root: re.Pattern[str]) -> Any:
    """A comparable form: tables stay frames, label images become digests, lazy partitions are loaded, and
    a bench project's folder (slide_meta records each slide's absolute path) reads as ``<project>``."""
    if isinstance(value, TileStore):
        return {"params_hash": value.params_hash, "tiles": {t: tile_content(value, t) for t in value.tiles}}
    if isinstance(value, TissueMap):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {key: canonical(item() if callable(item) else item, root) for key, item in value.items()}
    if isinstance(value, list):
        return [canonical(item, root) for item in value]
    if isinstance(value, str):
        return root.sub("<project>", value)
    if isinstance(value, pd.DataFrame):
        value = value.copy()
        for column in value.columns:
            if value[column].dtype == object or isinstance(value[column].dtype, pd.StringDtype):
                value[column] = value[column].map(
                    lambda v: root.sub("<project>", v) if isinstance(v, str) else v
                )
        return value
    return value


def tile_content(store: TileStore, tile_id: str) -> dict[str, Any]:
    result = store.read(tile_id)
    return tile_record(result)


def tile_record(result: Any) -> dict[str, Any]:
    return {
        "cells": result.cells,
        "labels": {
            cell_type: hashlib.sha256(np.ascontiguousarray(labels).tobytes()).hexdigest() + str(labels.shape)
            for cell_type, labels in result.labels.items()
        },
        "window": result.window,
        "core": result.core,
    }


def same(a: Any, b: Any) -> bool:
    if isinstance(a, pd.DataFrame) or isinstance(b, pd.DataFrame):
        if not (isinstance(a, pd.DataFrame) and isinstance(b, pd.DataFrame)):
            return False
        try:
            pd.testing.assert_frame_equal(a, b)
        except AssertionError:
            return False
        return True
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and np.array_equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[key], b[key]) for key in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def judge(
    loaded: dict[str, Loaded], reference: dict[str, Loaded], previous: dict[str, Loaded] | None = None
) -> dict[str, str]:
    """Per output: refused (with why), equal_reference, equal_previous or loads_but_differs."""
    verdicts = {}
    for name in sorted(set(reference) | set(loaded)):
        got = loaded.get(name)
        if got is None:
            verdicts[name] = "not in catalog"
        elif got.refused is not None:
            verdicts[name] = f"refused ({got.refused})"
        elif name in reference and same(got.content, reference[name].content):
            verdicts[name] = "equal_reference"
        elif previous is not None and name in previous and same(got.content, previous[name].content):
            verdicts[name] = "equal_previous"
        else:
            verdicts[name] = LOADS_BUT_DIFFERS
    return verdicts


def leftover_temporaries(project: Path) -> list[str]:
    found = set()
    for pattern in TEMPORARY_PATTERNS:
        found |= {str(p.relative_to(project)) for p in (project / "data").rglob(pattern)}
    return sorted(found)


def store_summary(project: Path) -> dict[str, Any] | None:
    try:
        summary = json.loads((project / "data/03_primary/tile_store.manifest.json").read_text())["summary"]
    except (OSError, ValueError, KeyError):
        return None
    return {key: summary.get(key) for key in ("n_tiles", "n_skipped", "n_processed", "n_recomputed")}


# ------------------------------------------------------------------------------------------ kill scenarios
@dataclasses.dataclass
class Kill:
    name: str
    phase: str  # ingestion | segmentation
    failpoint: str | None = None  # None: timer
    timer_fraction: float | None = None  # of the measured segmentation time

    @property
    def in_tile_store(self) -> bool:
        """Killed while the tile store was incomplete: the cells node alone is worth trying too."""
        return self.failpoint is None or self.failpoint.startswith("tile")


def kill_plan(tile_to_kill: int, seed: int) -> list[Kill]:
    rng = random.Random(seed)
    atomic = [
        ("slide_meta.json", ("written", "manifest")),
        ("tissue_maps", ("written", "manifest")),
        ("tile_index.parquet", ("manifest",)),
        ("tile_sample.parquet", ("written",)),
        ("tissue_overlays", ("manifest",)),
    ]
    kills = [
        Kill(f"{file} {moment}", "ingestion", f"atomic:{file}:{moment}")
        for file, moments in atomic
        for moment in moments
    ]
    kills += [
        Kill("first tile file written, not renamed", "segmentation", "tile:written@1"),
        Kill(
            f"tile file {tile_to_kill} written, not renamed", "segmentation", f"tile:written@{tile_to_kill}"
        ),
        Kill("every tile done, store manifest not written", "segmentation", "tile_store:before_manifest"),
        Kill("cells.parquet written", "segmentation", "atomic:cells.parquet:written"),
        Kill("cells.parquet manifest", "segmentation", "atomic:cells.parquet:manifest"),
        Kill("cell counts written", "segmentation", "atomic:cell_counts_sampled.csv:written"),
        Kill("cell counts manifest", "segmentation", "atomic:cell_counts_sampled.csv:manifest"),
    ]
    kills += [
        Kill(f"timer {index + 1} during segmentation", "segmentation", None, round(rng.uniform(0.1, 0.9), 3))
        for index in range(2)
    ]
    return kills


def run_kill(
    kill: Kill,
    previous_project: Path,
    work: Path,
    reference: dict[str, Loaded],
    previous: dict[str, Loaded],
    segmentation_s: float,
) -> dict[str, Any]:
    project = copy_project(previous_project, work / "kill")
    if kill.failpoint is not None:
        killed = kedro(project, "run", "--params", TINY_RUN, failpoint=kill.failpoint)
    else:
        delay = round(kill.timer_fraction * segmentation_s, 3)
        killed = kedro_killed_during_segmentation(project, delay, "run", "--params", TINY_RUN)
    after_kill = judge(load_outputs(project), reference, previous)
    accepted = sorted(name for name, verdict in after_kill.items() if verdict == LOADS_BUT_DIFFERS)

    downstream = []
    nodes = ["summarise_cell_counts"] + (["make_cells_table"] if kill.in_tile_store else [])
    for node in nodes:
        alone = kedro(project, "run", "--nodes", node, "--params", TINY_RUN)
        output = "cell_counts" if node == "summarise_cell_counts" else "cells"
        verdict = None
        if alone.returncode == 0:
            verdict = judge(load_outputs(project), reference)[output]
        downstream.append(
            {
                **alone.record(),
                "node": node,
                "output": output,
                "output_after": verdict,
                "stale_accepted": alone.returncode == 0 and verdict != "equal_reference",
            }
        )

    rerun = kedro(project, "run", "--params", TINY_RUN)
    after_rerun = judge(load_outputs(project), reference)
    not_identical = sorted(name for name, verdict in after_rerun.items() if verdict != "equal_reference")
    temporaries = leftover_temporaries(project)
    record = {
        "name": kill.name,
        "phase": kill.phase,
        "failpoint": kill.failpoint,
        "timer_delay_s_after_segmentation_start": killed.timer_delay_s,
        "kill_run": killed.record(),
        "killed": killed.killed,
        "outputs_after_kill": after_kill,
        "stale_or_partial_accepted_outputs": accepted,
        "downstream_alone": downstream,
        "rerun": {**rerun.record(), "tile_store_summary": store_summary(project)},
        "rerun_outputs_not_identical": {name: after_rerun[name] for name in not_identical},
        "temporary_files_after_rerun": temporaries,
        "resumed_identical": rerun.returncode == 0 and not not_identical and not temporaries,
        "rerun_segmentation_s": segmentation_seconds(rerun),
    }
    if not record["killed"]:
        record["note"] = "the run was not killed (fail point not reached or timer too late)"
        record["kill_output_tail"] = killed.output[-1500:]
    if rerun.returncode != 0:
        record["rerun_output_tail"] = rerun.output[-3000:]
    return record


# ------------------------------------------------------------------------------------ staleness (the issue)
STALENESS_KILLS = [
    None,
    "atomic:slide_meta.json:written",  # nothing of the new ingestion written yet
    "atomic:tile_sample.parquet:written",
    "atomic:tile_sample.parquet:manifest",
]


def run_staleness(failpoint: str | None, reference_project: Path, work: Path) -> dict[str, Any]:
    project = copy_project(reference_project, work / "staleness")
    ingestion = kedro(
        project, "run", "--pipeline", "ingestion", "--params", STALE_FRACTION_RUN, failpoint=failpoint
    )
    counts = kedro(project, "run", "--nodes", "summarise_cell_counts", "--params", STALE_FRACTION_RUN)
    error = counts.error
    names_it = any(
        words in error
        for words in ("do not belong together", "was built with another", "does not match its manifest")
    )
    return {
        "name": "fraction 0.5 -> 0.25, ingestion "
        + (f"killed at {failpoint}" if failpoint else "finished")
        + ", then the counts node alone",
        "ingestion_run": ingestion.record(),
        "counts_run": counts.record(),
        "counts_error": error[:1200],
        "refused": counts.returncode != 0,
        "message_names_what_does_not_belong": counts.returncode != 0 and names_it,
        "stale_accepted": counts.returncode == 0,
    }


# ------------------------------------------------------------------------------------------- bad inputs
@dataclasses.dataclass
class BadInput:
    name: str
    kind: str  # file | parameter | sheet | weights | concurrency
    culprits: list[str]  # every one must be in the final error message
    params: str = ""  # added to TINY_RUN
    prepare: Callable[[Path], None] | None = None
    pipeline: str | None = None  # run only this pipeline (default: the whole run)
    # Reference tiles this scenario removes on purpose (their loss is not the run's doing).
    removed_tiles: Callable[[Path], list[str]] | None = None
    extra_checks: Callable[[Path, Run], dict[str, Any]] | None = None


def _write(relative: str, content: bytes) -> Callable[[Path], None]:
    def prepare(project: Path) -> None:
        path = project / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)

    return prepare


def _truncate(project: Path) -> None:
    path = project / SLIDES / "demo_02.czi"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _same_stem_twice(project: Path) -> None:
    slide = project / SLIDES / "demo_01.czi"
    for folder in ("batch_a", "batch_b"):
        (project / SLIDES / folder).mkdir()
        shutil.copy2(slide, project / SLIDES / folder / "demo_01.czi")
    slide.unlink()


def _local_globals(text: str) -> Callable[[Path], None]:
    def prepare(project: Path) -> None:
        (project / "conf" / "local" / "globals.yml").write_text(text)

    return prepare


def _czi_with_pixel_size(name: str, pixel_size_um: float | None) -> Callable[[Path], None]:
    def prepare(project: Path) -> None:
        write_czi(project / SLIDES / f"{name}.czi", 200, pixel_size_um)

    return prepare


def _corrupt_subblock(project: Path, slide: str = "demo_03", index: int = 1) -> None:
    path = project / SLIDES / f"{slide}.czi"
    payload, _ = subblock_data_range(path, index)
    data = bytearray(path.read_bytes())
    data[payload : payload + 16] = bytes(16)  # the Zstd frame header: the decoder fails on this subblock
    path.write_bytes(bytes(data))


def _tiles_over_subblock(project: Path, slide: str = "demo_03", index: int = 1) -> list[str]:
    block = read_subblocks(project / SLIDES / f"{slide}.czi")[index]
    sample = pd.read_parquet(project / "data/02_intermediate/tile_sample.parquet")
    sample = sample[sample["slide"] == slide]
    hit = (
        (sample["x"] < block.x + block.w)
        & (sample["x"] + sample["w"] > block.x)
        & (sample["y"] < block.y + block.h)
        & (sample["y"] + sample["h"] > block.y)
    )
    return sorted(sample.loc[hit, "tile_id"])


def _corrupt_during_segmentation(project: Path) -> None:
    # The tissue maps of this slide are built (from the intact file); its tiles are not segmented yet,
    # as after an interrupted run. Then one subblock goes bad: only tiles reading it can fail.
    shutil.rmtree(project / STORE / "demo_03")
    _corrupt_subblock(project)


def _removed_demo_03_tiles(project: Path) -> list[str]:
    sample = pd.read_parquet(project / "data/02_intermediate/tile_sample.parquet")
    return sorted(sample.loc[sample["slide"] == "demo_03", "tile_id"])


def _failures_check(project: Path, run: Run) -> dict[str, Any]:
    expected = _tiles_over_subblock(project)
    failures = json.loads((project / STORE / FAILURES_NAME).read_text())
    failed = sorted(f["tile_id"] for f in failures)
    sample = pd.read_parquet(project / "data/02_intermediate/tile_sample.parquet")
    others = [
        (tile_id, slide)
        for tile_id, slide in zip(sample["tile_id"], sample["slide"], strict=True)
        if tile_id not in expected
    ]
    missing = [t for t, s in others if not (project / STORE / s / f"{t}.h5").is_file()]
    return {
        "failures_json_tiles": failed,
        "tiles_over_the_corrupt_subblock": expected,
        "failures_are_exactly_those_tiles": failed == expected,
        "other_sampled_tiles_missing": missing,
        "every_other_tile_done": not missing,
        "error_names_every_failed_tile": all(t in run.error for t in expected),
    }


def _sheet(edit: Callable[[pd.DataFrame], pd.DataFrame | None]) -> Callable[[Path], None]:
    def prepare(project: Path) -> None:
        path = project / SHEET
        sheet = pd.read_csv(path, dtype=str, keep_default_na=False)
        edited = edit(sheet)
        if edited is None:
            path.unlink()
        else:
            edited.to_csv(path, index=False)

    return prepare


def _conflicting_row(sheet: pd.DataFrame) -> pd.DataFrame:
    row = sheet[sheet["slide"] == "demo_02"].assign(group="M_vehicle")
    return pd.concat([sheet, row], ignore_index=True)


def _weights(content: bytes | None) -> Callable[[Path], None]:
    def prepare(project: Path) -> None:
        if content is not None:
            path = project / "data/06_models/cpsam_bench"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)

    return prepare


CELLPOSE = "segmentation.segmenters.hspc.name=cellpose,segmentation.segmenters.hspc.params.cellpose.weights="


def bad_input_plan() -> list[BadInput]:
    return [
        BadInput("truncated CZI", "file", ["demo_02.czi"], prepare=_truncate),
        BadInput(
            "text file named .czi",
            "file",
            ["notes.czi"],
            prepare=_write(f"{SLIDES}/notes.czi", b"slide,group\n"),
        ),
        BadInput(
            "file starting with [/bold] named .czi (named verbatim)",
            "file",
            ["markup.czi", "[/bold]"],
            prepare=_write(f"{SLIDES}/markup.czi", b"[/bold] this is a spreadsheet, not a CZI file\n"),
        ),
        BadInput("zero-byte .czi", "file", ["empty.czi"], prepare=_write(f"{SLIDES}/empty.czi", b"")),
        BadInput(
            "same slide stem in two sub-folders",
            "file",
            ["batch_a/demo_01.czi", "batch_b/demo_01.czi"],
            prepare=_same_stem_twice,
        ),
        BadInput(
            "implausible pixel size from pixel_size_um_by_slide (84.7 um)",
            "file",
            ["demo_01", "84.7"],
            prepare=_local_globals("pixel_size_um_by_slide: {demo_01: 84.7}\n"),
        ),
        BadInput(
            "implausible pixel size in the CZI metadata (84.7 um)",
            "file",
            ["lab_84um.czi"],
            prepare=_czi_with_pixel_size("lab_84um", 84.7),
        ),
        BadInput(
            "CZI without scaling metadata",
            "file",
            ["no_scale.czi"],
            prepare=_czi_with_pixel_size("no_scale", None),
        ),
        BadInput(
            "pixel_size_um_by_slide names an unknown slide",
            "file",
            ["demo_99"],
            prepare=_local_globals("pixel_size_um_by_slide: {demo_99: 0.25}\n"),
        ),
        BadInput(
            "corrupt subblock (whole run: the tissue map reads it)",
            "file",
            ["demo_03.czi"],
            prepare=_corrupt_subblock,
        ),
        BadInput(
            "corrupt subblock while segmenting (its tiles not done yet)",
            "file",
            ["demo_03"],
            prepare=_corrupt_during_segmentation,
            pipeline="segmentation",
            removed_tiles=_removed_demo_03_tiles,
            extra_checks=_failures_check,
        ),
        BadInput(
            "sheet: a slide listed twice with different groups",
            "sheet",
            ["slide_sheet.csv", "demo_02"],
            prepare=_sheet(_conflicting_row),
        ),
        BadInput(
            "sheet: a row naming a slide not in the study",
            "sheet",
            ["slide_sheet.csv", "demo_09"],
            prepare=_sheet(lambda s: pd.concat([s, s.tail(1).assign(slide="demo_09")], ignore_index=True)),
        ),
        BadInput(
            "sheet: a slide without a row",
            "sheet",
            ["slide_sheet.csv", "demo_04"],
            prepare=_sheet(lambda s: s[s["slide"] != "demo_04"]),
        ),
        BadInput(
            "sheet: column 'group' missing",
            "sheet",
            ["slide_sheet.csv", "group"],
            prepare=_sheet(lambda s: s.rename(columns={"group": "grp"})),
        ),
        BadInput("sheet: file missing", "sheet", ["slide_sheet.csv"], prepare=_sheet(lambda s: None)),
        BadInput(
            "tile_px not an integer",
            "parameter",
            ["ingestion.tiles.tile_px"],
            "ingestion.tiles.tile_px=2999.5",
        ),
        BadInput(
            "tissue map finer than 1 um/px",
            "parameter",
            ["ingestion.tissue.map_um_per_px"],
            "ingestion.tissue.map_um_per_px=0.01",
        ),
        BadInput(
            "negative min_tissue_fraction",
            "parameter",
            ["ingestion.tiles.min_tissue_fraction"],
            "ingestion.tiles.min_tissue_fraction=-1",
        ),
        BadInput(
            "zero sampling fraction",
            "parameter",
            ["ingestion.sampling.fraction"],
            "ingestion.sampling.fraction=0",
        ),
        BadInput(
            "unknown key (typo)",
            "parameter",
            ["ingestion.sampling.fractoin"],
            "ingestion.sampling.fractoin=0.3",
        ),
        BadInput(
            "plugin parameter typo",
            "parameter",
            ["segmentation.segmenters.mk.params.classical.min_aera_um2"],
            "segmentation.segmenters.mk.params.classical.min_aera_um2=150",
        ),
        BadInput(
            "unknown segmenter name",
            "parameter",
            ["segmentation.segmenters.mk.name", "stardist"],
            "segmentation.segmenters.mk.name=stardist",
        ),
        BadInput(
            "largest_cell_um smaller than the MK segmenter's max_area_um2 allows",
            "parameter",
            ["ingestion.tiles.largest_cell_um", "segmentation.segmenters.mk"],
            "ingestion.tiles.largest_cell_um=30.0",
        ),
        BadInput("unknown device", "parameter", ["segmentation.device"], "segmentation.device=gpu0"),
        BadInput(
            "zero reader threads",
            "parameter",
            ["segmentation.runtime.reader_threads"],
            "segmentation.runtime.reader_threads=0",
        ),
        BadInput(
            "cellpose weights file missing",
            "weights",
            ["data/06_models/cpsam_missing"],
            CELLPOSE + "data/06_models/cpsam_missing",
        ),
        BadInput(
            "cellpose weights file empty",
            "weights",
            ["data/06_models/cpsam_bench"],
            CELLPOSE + "data/06_models/cpsam_bench",
            prepare=_weights(b""),
        ),
        BadInput(
            "cellpose weights file not a model (text)",
            "weights",
            ["cpsam_bench"],
            CELLPOSE + "data/06_models/cpsam_bench",
            prepare=_weights(b"this is not a Cellpose model\n" * 10),
        ),
    ]


def run_bad_input(
    bad: BadInput, reference_project: Path, work: Path, reference: dict[str, Loaded]
) -> tuple[dict[str, Any], Run]:
    project = copy_project(reference_project, work / "bad")
    removed_tiles = bad.removed_tiles(project) if bad.removed_tiles else []
    if bad.prepare is not None:
        bad.prepare(project)
    args = ["run", "--params", TINY_RUN + ("," + bad.params if bad.params else "")]
    if bad.pipeline:
        args += ["--pipeline", bad.pipeline]
    run = kedro(project, *args)
    return judge_bad_input(bad, project, run, reference, removed_tiles), run


def judge_bad_input(
    bad: BadInput, project: Path, run: Run, reference: dict[str, Loaded], removed_tiles: list[str]
) -> dict[str, Any]:
    error = run.error
    found = {culprit: culprit in error for culprit in bad.culprits}
    verdicts = judge(load_outputs(project), reference)
    lost = {name: v for name, v in verdicts.items() if v != "equal_reference" and name != "tile_store"}
    store_loads = verdicts["tile_store"] == "equal_reference"
    tiles_changed = [] if store_loads else changed_reference_tiles(project, reference, set(removed_tiles))
    if tiles_changed:
        lost["tile_store"] = (
            f"{len(tiles_changed)} reference tile file(s) missing or changed: {tiles_changed[:5]}"
        )
    record = {
        "name": bad.name,
        "kind": bad.kind,
        **run.record(),
        "culprit": bad.culprits,
        "culprit_found": found,
        "clear_error_naming_the_culprit": run.returncode != 0 and all(found.values()),
        "error_message": error[:1500],
        "finished_work_intact": not lost,
        "finished_work_lost": lost,
        "tile_store_loads": store_loads,
        "tile_store_verdict": verdicts["tile_store"],
    }
    if removed_tiles:
        record["tiles_removed_by_the_scenario"] = removed_tiles
    if bad.extra_checks is not None:
        record["checks"] = bad.extra_checks(project, run)
    return record


def changed_reference_tiles(project: Path, reference: dict[str, Loaded], excluded: set[str]) -> list[str]:
    """Reference tiles whose file is missing or no longer holds the reference's cells and labels."""
    changed = []
    for tile_id, content in reference["tile_store"].content["tiles"].items():
        if tile_id in excluded:
            continue
        slide = tile_id.split("_s")[0]
        try:
            now = tile_record(read_tile_result(project / STORE, tile_id, slide=slide))
        except (OSError, KeyError, ValueError):
            changed.append(tile_id)
            continue
        if not same(now, content):
            changed.append(tile_id)
    return changed


def run_lock_held(reference_project: Path, work: Path, reference: dict[str, Loaded]) -> dict[str, Any]:
    project = copy_project(reference_project, work / "bad")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(project)], stdout=subprocess.PIPE, text=True, env=run_env()
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
        run = kedro(project, "run", "--params", TINY_RUN)
    finally:
        holder.kill()
        holder.wait()
    bad = BadInput("second run while the run lock is held", "concurrency", [f"pid {holder.pid}"])
    return judge_bad_input(bad, project, run, reference, [])


# ------------------------------------------------------------------------------------------------- main
def code_under_test(project: Path, run: Run) -> dict[str, Any]:
    """Which mk_hspc the kedro runs import: the copy's src/ (from the traceback of ``run`` repeated with
    ``MK_HSPC_TRACEBACK=1``: users see bad input without one), equal to this worktree's."""
    traced = kedro(project, *run.args, extra_env={"MK_HSPC_TRACEBACK": "1"})
    roots = sorted(set(re.findall(r'File "([^"]+)/mk_hspc/[\w/]+\.py"', traced.output)))
    return {
        "kedro_run_imports_mk_hspc_from": roots,
        "kedro_run_imports_the_copy": roots == [str(project / "src")],
        "copy_src_equals_worktree_src": content_digest(project / "src" / "mk_hspc")
        == content_digest(REPO / "src" / "mk_hspc"),
        "worktree_commit": subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip(),
        "worktree_dirty_src": bool(
            subprocess.run(
                ["git", "status", "--porcelain", "src"], cwd=REPO, capture_output=True, text=True
            ).stdout.strip()
        ),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work-dir", type=Path, default=REPO / "bench" / "work" / "faults")
    parser.add_argument("--output", type=Path, default=REPO / "bench" / "results" / "faults.json")
    parser.add_argument("--only", default="kills,staleness,bad", help="comma-separated parts to run")
    parser.add_argument("--seed", type=int, default=20240601, help="timer kill delays")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument(
        "--reuse", action="store_true", help="reuse the reference and previous projects of a kept work folder"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    parts = set(args.only.split(","))
    started = time.perf_counter()
    load_start = os.getloadavg()[0]
    work = args.work_dir
    reference_project, previous_project = work / "reference", work / "previous"
    finished = [
        p / "data/08_reporting/cell_counts_sampled.csv.manifest.json"
        for p in (reference_project, previous_project)
    ]
    reuse = args.reuse and all(path.is_file() for path in finished)
    if not reuse:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        make_project_copy(reference_project)
        reference_run = kedro(reference_project, "run", "--params", TINY_RUN)
        if reference_run.returncode != 0:
            raise SystemExit(f"reference run failed:\n{reference_run.output[-4000:]}")
        say("reference run: %.1f s", reference_run.elapsed_s)
        # The previous project: the reference's slides, no outputs, run with other ingestion parameters.
        copy_project(reference_project, previous_project)
        for layer in ("02_intermediate", "03_primary", "08_reporting"):
            shutil.rmtree(previous_project / "data" / layer)
            (previous_project / "data" / layer).mkdir()
        previous_run = kedro(previous_project, "run", "--params", PREVIOUS_RUN)
        if previous_run.returncode != 0:
            raise SystemExit(f"previous run failed:\n{previous_run.output[-4000:]}")
        say("previous run: %.1f s", previous_run.elapsed_s)
    reference = load_outputs(reference_project)
    refused = {name: loaded.refused for name, loaded in reference.items() if loaded.refused}
    if refused:
        raise SystemExit(f"reference outputs do not load: {refused}")
    previous = load_outputs(previous_project)
    reference_sample = set(
        pd.read_parquet(reference_project / "data/02_intermediate/tile_sample.parquet")["tile_id"]
    )
    previous_sample = set(
        pd.read_parquet(previous_project / "data/02_intermediate/tile_sample.parquet")["tile_id"]
    )
    tiles_to_segment = len(reference_sample - previous_sample)
    say("%d reference tiles are not in the previous project's store", tiles_to_segment)

    results: dict[str, Any] = {
        "what": "SIGKILL at named moments and on a timer then rerun; issue staleness scenario; bad inputs",
        "reference_params": TINY_RUN,
        "reused_reference_projects": reuse,
        "previous_params": PREVIOUS_RUN,
        "outputs_compared": sorted(reference),
        "reference_tiles": len(reference_sample),
        "reference_tiles_not_in_previous_store": tiles_to_segment,
        "outputs_differing_between_previous_and_reference": sorted(
            name for name, v in judge(previous, reference).items() if v != "equal_reference"
        ),
    }

    kill_records: list[dict[str, Any]] = []
    if "kills" in parts:
        segmentation_times: list[float] = []
        for kill in kill_plan(max(2, tiles_to_segment // 2 + 1), args.seed):
            segmentation_s = statistics.median(segmentation_times) if segmentation_times else 3.0
            record = run_kill(kill, previous_project, work, reference, previous, segmentation_s)
            if kill.phase == "ingestion" and record["rerun_segmentation_s"]:
                segmentation_times.append(record["rerun_segmentation_s"])  # a rerun that segments every tile
            kill_records.append(record)
            say(
                "kill %-45s killed=%s accepted=%s downstream_stale=%s identical=%s",
                kill.name,
                record["killed"],
                record["stale_or_partial_accepted_outputs"],
                [d["stale_accepted"] for d in record["downstream_alone"]],
                record["resumed_identical"],
            )
        results["segmentation_s_for_timer_kills"] = (
            statistics.median(segmentation_times) if segmentation_times else None
        )

    staleness_records: list[dict[str, Any]] = []
    if "staleness" in parts:
        for failpoint in STALENESS_KILLS:
            record = run_staleness(failpoint, reference_project, work)
            staleness_records.append(record)
            say("staleness %-40s refused=%s", failpoint, record["refused"])

    bad_records: list[dict[str, Any]] = []
    under_test = None
    if "bad" in parts:
        for bad in bad_input_plan():
            record, run = run_bad_input(bad, reference_project, work, reference)
            bad_records.append(record)
            if under_test is None and bad.kind == "parameter":
                under_test = code_under_test(work / "bad", run)
            say(
                "bad %-60s rc=%s named=%s intact=%s",
                bad.name,
                record["exit_code"],
                record["clear_error_naming_the_culprit"],
                record["finished_work_intact"],
            )
        record = run_lock_held(reference_project, work, reference)
        bad_records.append(record)
        say(
            "bad %-60s rc=%s named=%s",
            record["name"],
            record["exit_code"],
            record["clear_error_naming_the_culprit"],
        )

    stale = sum(len(r["stale_or_partial_accepted_outputs"]) for r in kill_records)
    stale += sum(d["stale_accepted"] for r in kill_records for d in r["downstream_alone"])
    stale += sum(r["stale_accepted"] for r in staleness_records)
    summary = {
        "kills": sum(r["killed"] for r in kill_records),
        "kill_moments": len(kill_records),
        "resumed_identical": sum(r["resumed_identical"] for r in kill_records),
        "stale_or_partial_accepted": stale,
        "staleness_scenarios_refused": sum(r["refused"] for r in staleness_records),
        "staleness_scenarios": len(staleness_records),
        "bad_inputs": len(bad_records),
        "clear_error_naming_the_culprit": sum(r["clear_error_naming_the_culprit"] for r in bad_records),
        "finished_work_lost": sum(not r["finished_work_intact"] for r in bad_records),
        "finished_work_lost_by_output": dict(
            sorted(Counter(name for r in bad_records for name in r["finished_work_lost"]).items())
        ),
    }
    results = {
        **summary,
        "definitions": {
            "kills": "kedro runs that died by SIGKILL at a distinct moment (fail point or timer)",
            "resumed_identical": "kills whose rerun exited 0 with every output equal to the reference's and "
            "no temporary file left",
            "stale_or_partial_accepted": "after a kill: outputs that load but equal neither the reference "
            "nor the previous run, plus downstream nodes run alone that exit 0 with an output other than "
            "the reference's; plus staleness scenarios whose counts node exits 0",
            "clear_error_naming_the_culprit": "bad inputs whose run exits non-zero with every culprit "
            "string in its final error message",
            "finished_work_lost": "bad inputs after which a reference output (any catalog output; the tile "
            "store by its tile files) no longer loads or differs from the reference",
        },
        "goals": {
            "kills": ">= 10 distinct moments",
            "resumed_identical": "every kill",
            "stale_or_partial_accepted": 0,
            "clear_error_naming_the_culprit": "every bad input",
            "finished_work_lost": 0,
        },
        **results,
        "kill_scenarios": kill_records,
        "staleness_scenarios": staleness_records,
        "bad_input_scenarios": bad_records,
        "code_under_test": under_test,
        "elapsed_s": round(time.perf_counter() - started, 1),
        "machine": {
            "cpus": os.cpu_count(),
            "load_avg_1min_start_end": [load_start, os.getloadavg()[0]],
            "python": platform.python_version(),
            "platform": platform.platform(),
            "kedro": _version("kedro"),
        },
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=1, default=str) + "\n")
    if not (args.keep or args.reuse):
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({**summary, "elapsed_s": results["elapsed_s"]}, indent=1))
    return results


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":
    main()
