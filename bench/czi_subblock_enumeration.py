"""Subblock enumeration: the hand-written directory parser vs pylibCZIrw's ``enumerate_subblocks``.

Compares `mk_hspc.czi` as of BASELINE (the last commit whose ``container.py`` parsed the whole subblock
directory in Python) with the working tree (libCZI enumerates; ``container.check_file`` keeps only the
up-front checks libCZI lacks), each imported in its own subprocess from its own ``src``:

1. equality: every subblock (logical rect, stored size, zoom, layer-0 flag, pixel type, compression,
   dimension indices incl. scene and M), `SlideMeta`, pyramid layers, plane strings, channel pixel types
   and bit depths (the XML now comes from libCZI's ``raw_metadata``, a re-serialised copy);
2. time: enumerating the subblocks, and `open_slide` (which also opens libCZI and reads the XML), medians
   over interleaved rounds of both trees;
3. bad files: what pylibCZIrw alone does with damaged copies (each in a subprocess with a timeout, so a
   crash or hang would show as such) and what `open_slide` of both trees raises.

Files: the shared CZI test files, one default-spec demo slide (12000x9000 px, 2048 px Zstd1 tiles) and a
synthetic file of 10,000 small subblocks standing in for the directory of a large whole-slide scan.
Run: ``python bench/czi_subblock_enumeration.py`` (about 25 s on 2 cores).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import statistics
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
RESULTS = REPO / "bench" / "results" / "czi_subblock_enumeration.json"
BASELINE = "206b507"  # last commit with the full Python directory parser
ROUNDS = 3  # interleaved subprocess rounds per tree
REPEATS = 7  # timed calls per file and round
MANY_SUBBLOCKS = 10_000
PROBE_TIMEOUT_S = 30
PIXEL_SIZE_UM = 0.25  # for files without scaling metadata

# ------------------------------------------------------------------------------------------ worker side
WORKER = r"""
import json, statistics, sys, time
from mk_hspc.czi import CziSlideError, open_slide
files, repeats, mode, pixel_size_um = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
try:
    from mk_hspc.czi.reader import read_subblocks
    from mk_hspc.czi.container import check_file
    from mk_hspc.czi.native import NativeReader
    tree = "libczi"
    def xml_reader(path):
        return NativeReader(path, 0).metadata_xml
except ImportError:
    from mk_hspc.czi.container import read_container, read_metadata_xml
    read_subblocks = lambda path: read_container(path).subblocks
    tree = "parser"
    def xml_reader(path):
        container = read_container(path)
        return lambda: read_metadata_xml(container)

def median_ms(call):
    times = []
    for _ in range(repeats):
        start = time.perf_counter(); call(); times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)

def facts(path):
    with open_slide(path, pixel_size_um=pixel_size_um) as slide:
        return {
            "subblocks": [
                [e.index, e.x, e.y, e.w, e.h, e.stored_w, e.stored_h, round(e.zoom, 9), e.is_layer0,
                 e.pixel_type, e.compression, sorted(e.coords.items())]
                for e in read_subblocks(path)
            ],
            "meta": slide.meta.to_dict(), "layers": {str(c): v for c, v in slide._layers.items()},
            "planes": {str(c): v for c, v in slide._planes.items()},
            "pixel_types": {str(c): v for c, v in slide._pixel_types.items()}, "n_subblocks": slide.n_subblocks,
            "bit_depths": {str(c): v for c, v in slide._bit_depths.items()},
        }

def open_close(path):
    open_slide(path, pixel_size_um=pixel_size_um).close()

out = {"tree": tree}
for path in files:
    if mode == "facts":
        out[path] = facts(path)
    elif mode == "bad":
        try:
            open_close(path); out[path] = "opened"
        except CziSlideError as error:
            out[path] = error.reason
    else:
        row = {"enumerate_ms": median_ms(lambda: read_subblocks(path)), "open_slide_ms": median_ms(lambda: open_close(path)),
               "metadata_xml_ms": median_ms(xml_reader(path))}
        if tree == "libczi":
            row["check_file_ms"] = median_ms(lambda: check_file(path))
        out[path] = row
print(json.dumps(out))
"""

# A damaged file given to pylibCZIrw alone: open, enumerate, metadata, read everything.
PROBE = r"""
import json, sys
from pylibCZIrw import czi as pyczi
try:
    reader = pyczi.CziReader(sys.argv[1])
except Exception as error:
    print(json.dumps({"open": f"{type(error).__name__}: {error}"})); sys.exit()

def enumerate_all():
    seen = []
    reader.enumerate_subblocks(lambda index, info: seen.append(index) or True)
    return f"ok, {len(seen)} subblocks"

steps = {
    "enumerate": enumerate_all,
    "metadata": lambda: f"ok, {len(reader.raw_metadata)} chars",
    "read": lambda: "ok, " + str(reader.read(roi=tuple(reader.total_bounding_rectangle), plane={}).shape),
}
out = {"open": "ok"}
for name, step in steps.items():
    try:
        out[name] = step()
    except Exception as error:
        out[name] = f"{type(error).__name__}: {error}"
print(json.dumps(out))
"""


def run_worker(src: Path, files: list[str], mode: str, repeats: int = REPEATS) -> dict:
    env = dict(os.environ, PYTHONPATH=str(src), KEDRO_DISABLE_TELEMETRY="true")
    done = subprocess.run(
        [sys.executable, "-c", WORKER, json.dumps(files), str(repeats), mode, str(PIXEL_SIZE_UM)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout)


def probe_pylibczirw(path: Path) -> dict:
    try:
        done = subprocess.run(
            [sys.executable, "-c", PROBE, str(path)], capture_output=True, text=True, timeout=PROBE_TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        return {"outcome": f"hung (killed after {PROBE_TIMEOUT_S} s)"}
    if done.returncode != 0:
        return {"outcome": f"crashed (exit code {done.returncode})", "stderr": done.stderr[-300:]}
    return json.loads(done.stdout)


# ------------------------------------------------------------------------------------------ files
def export_baseline(target: Path) -> Path:
    archive = subprocess.run(["git", "archive", BASELINE, "src"], cwd=REPO, capture_output=True, check=True)
    with tarfile.open(fileobj=BytesIO(archive.stdout)) as tar:
        tar.extractall(target, filter="data")
    return target / "src"


def write_many_subblocks(path: Path) -> Path:
    from pylibCZIrw import czi as pyczi

    tile = np.zeros((32, 32), np.uint8)
    columns = 100
    with pyczi.create_czi(str(path), exist_ok=True) as writer:
        for index in range(MANY_SUBBLOCKS):
            writer.write(tile, location=((index % columns) * 32, (index // columns) * 32))
        writer.write_metadata(scale_x=PIXEL_SIZE_UM * 1e-6, scale_y=PIXEL_SIZE_UM * 1e-6)
    return path


def write_demo_slide(folder: Path) -> Path:
    from mk_hspc.demo import DemoSpec, make_demo_study

    study = make_demo_study(folder, DemoSpec(n_slides=1), progress=False, n_workers=1)
    return next(iter(study.slide_paths.values()))


def _header_positions(data: bytes) -> tuple[int, int]:
    directory, metadata = struct.unpack_from("<qq", data, 32 + 4 * 4 + 2 * 16 + 4)
    return directory, metadata


def _entry_offsets(data: bytes) -> list[int]:
    directory, _ = _header_positions(data)
    (n_entries,) = struct.unpack_from("<i", data, directory + 32)
    offsets, offset = [], directory + 32 + 128
    for _ in range(n_entries):
        offsets.append(offset)
        offset += 32 + 20 * struct.unpack_from("<i", data, offset + 28)[0]
    return offsets


def write_bad_files(folder: Path) -> dict[str, str]:
    """Damaged copies of a 4-tile file written by pylibCZIrw (directory at the end) and of the shared
    mosaic_test.czi (directory before the pixels); name -> what was done."""
    from pylibCZIrw import czi as pyczi

    good = folder / "good.czi"
    with pyczi.create_czi(str(good), exist_ok=True) as writer:
        for x in range(0, 1024, 256):
            writer.write(np.full((256, 256, 3), 100, np.uint8), location=(x, 0))
        writer.write_metadata(scale_x=PIXEL_SIZE_UM * 1e-6, scale_y=PIXEL_SIZE_UM * 1e-6)
    data = good.read_bytes()
    directory, _ = _header_positions(data)
    entries = _entry_offsets(data)

    def patched(offset: int, payload: bytes) -> bytes:
        copy = bytearray(data)
        copy[offset : offset + len(payload)] = payload
        return bytes(copy)

    cases: dict[str, tuple[bytes, str]] = {
        "zero_bytes.czi": (b"", "empty file"),
        "text.czi": (b"these are my notes, not an image\n" * 40, "a text file"),
        "random.czi": (np.random.default_rng(0).bytes(20_000), "20 kB of random bytes"),
        "half.czi": (data[: len(data) // 2], "first half of a file whose directory is at the end"),
        "header_only.czi": (data[:544], "only the 544-byte file header"),
        "directory_magic.czi": (patched(directory, b"GARBAGE_GARBAGE!"), "directory segment id overwritten"),
        "entry_count_huge.czi": (patched(directory + 32, struct.pack("<i", 10**8)), "EntryCount 10^8"),
        "entry2_schema.czi": (patched(entries[2], b"XX"), "schema of directory entry 2 of 4 not 'DV'"),
        "entry2_no_dimensions.czi": (
            patched(entries[2] + 28, struct.pack("<i", 0)),
            "DimensionCount of entry 2 of 4 set to 0",
        ),
        "entry1_width0.czi": (
            patched(entries[1] + 32 + 8, struct.pack("<i", 0)),
            "X size of entry 1 set to 0",
        ),
        "entry3_beyond_eof.czi": (
            patched(entries[3] + 6, struct.pack("<q", len(data) + 4096)),
            "FilePosition of the last subblock beyond the end (as if cut after the directory)",
        ),
    }
    mosaic = SHARED / "aicspylibczi" / "mosaic_test.czi"
    if mosaic.is_file():
        whole = mosaic.read_bytes()
        cases["mosaic_half.czi"] = (
            whole[: len(whole) // 2],
            "first half of mosaic_test.czi (directory up front)",
        )
    described = {}
    for name, (content, what) in cases.items():
        (folder / name).write_bytes(content)
        described[name] = what
    return described


# ------------------------------------------------------------------------------------------ main
def main() -> None:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="czi_enum_") as tmp:
        tmp_dir = Path(tmp)
        baseline_src = export_baseline(tmp_dir / "baseline")
        trees = {"parser": baseline_src, "libczi": REPO / "src"}
        files = {p.relative_to(SHARED).as_posix(): str(p) for p in sorted(SHARED.glob("*/*.czi"))}
        start = time.perf_counter()
        files["demo (default spec, 1 slide)"] = str(write_demo_slide(tmp_dir / "demo"))
        demo_write_s = time.perf_counter() - start
        files[f"synthetic {MANY_SUBBLOCKS} subblocks"] = str(write_many_subblocks(tmp_dir / "many.czi"))
        paths = list(files.values())

        facts = {tree: run_worker(src, paths, "facts", repeats=1) for tree, src in trees.items()}
        equality = {
            name: {
                key: facts["parser"][path][key] == facts["libczi"][path][key] for key in facts["parser"][path]
            }
            for name, path in files.items()
        }

        rounds: dict[str, list[dict]] = {tree: [] for tree in trees}
        for _ in range(ROUNDS):
            for tree, src in trees.items():
                rounds[tree].append(run_worker(src, paths, "time"))
        timings = {}
        for name, path in files.items():
            row = {"n_subblocks": facts["libczi"][path]["n_subblocks"], "size_bytes": os.path.getsize(path)}
            for tree in trees:
                for key in rounds[tree][0][path]:
                    value = statistics.median(r[path][key] for r in rounds[tree])
                    row[f"{tree}_{key}"] = round(value, 3)
            timings[name] = row

        bad_dir = tmp_dir / "bad"
        bad_dir.mkdir()
        described = write_bad_files(bad_dir)
        bad_paths = [str(bad_dir / name) for name in described]
        raised = {tree: run_worker(src, bad_paths, "bad", repeats=1) for tree, src in trees.items()}
        bad_files = {
            name: {
                "damage": what,
                "pylibczirw_alone": probe_pylibczirw(bad_dir / name),
                "open_slide_parser": raised["parser"][str(bad_dir / name)],
                "open_slide_libczi": raised["libczi"][str(bad_dir / name)],
            }
            for name, what in described.items()
        }

    result = {
        "what": __doc__.split("\n\n")[0],
        "baseline_commit": BASELINE,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_avg": os.getloadavg()},
        "pylibczirw": importlib.metadata.version("pylibCZIrw"),
        "method": f"median over {ROUNDS} interleaved subprocess rounds of the median of {REPEATS} calls",
        "keys": {
            "enumerate_ms": "parser: read_container (header + directory + last-subblock check); libczi: "
            "read_subblocks = check_file + libCZI open + enumerate_subblocks",
            "check_file_ms": "libczi tree only: the up-front checks kept in container.py",
            "open_slide_ms": "open_slide + close: checks, libCZI open, subblocks, XML metadata, SlideMeta",
            "metadata_xml_ms": "the XML document alone: parser: plain read of the segment; libczi: raw_metadata "
            "(libCZI parses and re-serialises it)",
        },
        "equal_results": equality,
        "all_equal": all(all(row.values()) for row in equality.values()),
        "timings": timings,
        "demo_write_s": round(demo_write_s, 1),
        "bad_files": bad_files,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"all_equal": result["all_equal"], "timings": timings}, indent=1))


if __name__ == "__main__":
    main()
