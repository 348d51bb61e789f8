"""A run SIGKILLed midway resumes to exactly the result of an uninterrupted run.

The segmentation entry point runs in subprocesses (this file is also the worker script): once as the
uninterrupted reference, once killed as soon as its first tile file appears, and once resumed in the killed
run's store after a truncated tile file and a leftover temporary file were planted there.
"""

from __future__ import annotations

import importlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from mk_hspc.czi import open_slide
from mk_hspc.engine.cells_table import build_cells_table
from mk_hspc.engine.tile_work import SegmentationSettings, segment_tiles
from mk_hspc.tile_store import TMP_SUFFIX, TileStatus, is_tile_done, tile_path, tile_status

SLIDE_PX = (1040, 780)  # width, height
TILE_PX, OVERLAP_PX = 260, 40
KILL_TIMEOUT_S = 120


sys.path.insert(0, str(Path(__file__).parent))  # the fakes of test_tile_work, in the test and the worker


# ----------------------------------------------------------------------------------------- worker side
class SlowSlide:
    """Delays another slide's reads so the run is still going when the test kills it (slides are unhashed)."""

    def __init__(self, inner, delay_s: float) -> None:
        self._inner, self._delay_s = inner, delay_s
        self.meta = inner.meta

    def read_region(self, x: int, y: int, w: int, h: int, scale: float = 1.0) -> np.ndarray:
        time.sleep(self._delay_s)
        return self._inner.read_region(x, y, w, h, scale)


def _load(import_path: str):
    module, _, attr = import_path.partition(":")
    return getattr(importlib.import_module(module), attr)


def worker_main(config_path: str) -> None:
    """Run ``segment_tiles`` as configured in a JSON file and print the run summary as JSON."""
    config = json.loads(Path(config_path).read_text())
    sample = pd.read_json(config["tile_sample"], orient="records")
    slides = {name: SlowSlide(open_slide(path), config["delay_s"]) for name, path in config["slides"].items()}
    segmenters = {
        cell_type: _load(spec["class"])(**spec["params"]) for cell_type, spec in config["segmenters"].items()
    }
    features = [_load(spec["class"])(**spec["params"]) for spec in config["features"]]
    settings = SegmentationSettings(progress=False, reader_threads=2, writer_threads=2)
    summary = segment_tiles(sample, slides, config["store_dir"], segmenters, features, settings)
    print(json.dumps(summary.to_dict()))


# ------------------------------------------------------------------------------------------- test side
def _plugins() -> tuple[dict, list]:
    """The classical segmenter and morphology features when they exist, else deterministic fakes."""
    try:
        importlib.import_module("mk_hspc.models.segmenters.classical")
        importlib.import_module("mk_hspc.models.features.morphology")
    except ImportError:
        fake = "test_tile_work:DarkBlobSegmenter"
        segmenters = {
            "mk": {"class": fake, "params": {}},
            "hspc": {"class": fake, "params": {"max_brightness": 100}},
        }
        return segmenters, [{"class": "test_tile_work:FakeMorphology", "params": {}}]
    classical = "mk_hspc.models.segmenters.classical:ClassicalSegmenter"
    segmenters = {
        "mk": {"class": classical, "params": {"mode": "mk"}},
        "hspc": {"class": classical, "params": {"mode": "hspc"}},
    }
    return segmenters, [{"class": "mk_hspc.models.features.morphology:MorphologyFeatures", "params": {}}]


def _make_slide(folder: Path) -> tuple[str, Path]:
    """A small real CZI: a demo slide when the demo writer exists, else dark blobs written with pylibCZIrw."""
    try:
        from mk_hspc.demo import DemoSpec, make_demo_study
    except ImportError:
        return "blobslide", _write_blob_czi(folder / "blobslide.czi")
    spec = DemoSpec(n_slides=1, width_px=SLIDE_PX[0], height_px=SLIDE_PX[1], mk_per_mm2=200.0)
    study = make_demo_study(folder, spec, progress=False, n_workers=1)
    [(name, path)] = study.slide_paths.items()
    return name, path


def _write_blob_czi(path: Path) -> Path:
    from pylibCZIrw import czi as pyczi
    from test_tile_work import make_blob_slide

    rgb, _ = make_blob_slide(SLIDE_PX[1], SLIDE_PX[0], n_blobs=120, seed=3)
    with pyczi.create_czi(str(path)) as writer:
        writer.write(
            data=np.ascontiguousarray(rgb[..., ::-1]), location=(-500, 300), plane={"C": 0, "Z": 0, "T": 0}
        )
        writer.write_metadata(document_name=path.stem, scale_x=0.5e-6, scale_y=0.5e-6)
    return path


def _tile_sample(slide: str, path: Path) -> pd.DataFrame:
    from test_tile_work import make_tile_sample

    box = open_slide(path).meta.bbox
    core_px = TILE_PX - OVERLAP_PX
    return make_tile_sample(
        slide, box.h, box.w, core_px=core_px, overlap_px=OVERLAP_PX // 2, origin=(box.x, box.y)
    )


def _config(
    tmp_path: Path, name: str, store_dir: Path, delay_s: float, slides: dict, sample_path: Path
) -> Path:
    segmenters, features = _plugins()
    config = {
        "tile_sample": str(sample_path),
        "slides": slides,
        "store_dir": str(store_dir),
        "segmenters": segmenters,
        "features": features,
        "delay_s": delay_s,
    }
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(config))
    return path


def _worker(config: Path) -> subprocess.Popen:
    command = [sys.executable, str(Path(__file__).resolve()), str(config)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(process: subprocess.Popen) -> dict:
    stdout, stderr = process.communicate(timeout=KILL_TIMEOUT_S)
    assert process.returncode == 0, stderr[-3000:]
    return json.loads(stdout.strip().splitlines()[-1])


def _datasets(path: Path) -> tuple[dict, dict]:
    """Every dataset (as array) and every attribute of an HDF5 file, keyed by path."""
    arrays, attrs = {}, {}
    with h5py.File(path, "r") as h5:
        attrs["/"] = {k: np.asarray(v).tolist() for k, v in h5.attrs.items()}

        def visit(name, obj):
            attrs[name] = {k: np.asarray(v).tolist() for k, v in obj.attrs.items()}
            if isinstance(obj, h5py.Dataset):
                arrays[name] = obj[()]

        h5.visititems(visit)
    return arrays, attrs


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
    slide, slide_path = _make_slide(tmp_path / "study")
    sample = _tile_sample(slide, slide_path)
    sample_path = tmp_path / "tile_sample.json"
    sample.to_json(sample_path, orient="records")
    slides = {slide: str(slide_path)}
    n_tiles = len(sample)

    reference_dir, resumed_dir = tmp_path / "reference", tmp_path / "resumed"
    reference = _worker(_config(tmp_path, "reference", reference_dir, 0.0, slides, sample_path))
    killed = _worker(_config(tmp_path, "killed", resumed_dir, 0.5, slides, sample_path))

    # SIGKILL the slow run as soon as its first tile file is in place
    deadline = time.monotonic() + KILL_TIMEOUT_S
    while not list(resumed_dir.glob("*/*.h5")):
        assert killed.poll() is None, killed.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no tile file appeared"
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    assert killed.returncode == -signal.SIGKILL
    reference_summary = _finish(reference)
    assert reference_summary["n_processed"] == n_tiles

    tile_ids = sorted(sample["tile_id"])
    params_hash = reference_summary["params_hash"]
    done_at_kill = [t for t in tile_ids if is_tile_done(resumed_dir, t, params_hash)]
    final_files = sorted(p.stem for p in resumed_dir.glob("*/*.h5"))
    assert 1 <= len(done_at_kill) < n_tiles, "the run must have been killed midway"
    assert final_files == done_at_kill  # every final-named file is complete: writes are atomic

    # plant a truncated final file and a leftover temporary file for tiles that are not done
    not_done = [t for t in tile_ids if t not in done_at_kill]
    truncated = tile_path(resumed_dir, not_done[0])
    good_bytes = tile_path(resumed_dir, done_at_kill[0]).read_bytes()
    truncated.write_bytes(good_bytes[: len(good_bytes) // 3])
    leftover = truncated.with_name(f"{not_done[-1]}.0badc0ffee00{TMP_SUFFIX}")
    leftover.write_bytes(good_bytes)
    assert tile_status(resumed_dir, not_done[0], params_hash) is TileStatus.INVALID
    assert not is_tile_done(resumed_dir, not_done[-1], params_hash)

    resumed = _finish(_worker(_config(tmp_path, "resumed", resumed_dir, 0.0, slides, sample_path)))
    assert resumed["params_hash"] == params_hash
    assert resumed["n_skipped"] == len(done_at_kill)
    assert resumed["n_processed"] == n_tiles - len(done_at_kill)
    assert resumed["n_recomputed"] >= 1 and resumed["removed_temporary_files"] >= 1
    assert not list(resumed_dir.glob(f"*/*{TMP_SUFFIX}"))

    # identical outputs: the cells table and every dataset and attribute of every tile file
    reference_table = build_cells_table(reference_dir, sample, params_hash=params_hash)
    assert len(reference_table) > 0
    pd.testing.assert_frame_equal(
        build_cells_table(resumed_dir, sample, params_hash=params_hash), reference_table
    )
    for tile_id in tile_ids:
        ref_arrays, ref_attrs = _datasets(tile_path(reference_dir, tile_id))
        new_arrays, new_attrs = _datasets(tile_path(resumed_dir, tile_id))
        assert new_attrs == ref_attrs, tile_id
        assert new_arrays.keys() == ref_arrays.keys(), tile_id
        for name, array in ref_arrays.items():
            assert new_arrays[name].dtype == array.dtype, (tile_id, name)
            assert np.array_equal(new_arrays[name], array), (tile_id, name)


def test_in_process_rerun_after_interrupt_is_complete(tmp_path):
    """Ctrl-C inside the model stage leaves only complete files; the rerun finishes the rest."""
    from test_tile_work import ORIGIN, ArraySlide, DarkBlobSegmenter, make_blob_slide, make_tile_sample

    rgb, centres = make_blob_slide(seed=5)
    sample = make_tile_sample(
        "slide_c", rgb.shape[0], rgb.shape[1], core_px=150, overlap_px=30, origin=ORIGIN
    )
    calls = []

    class InterruptingSegmenter(DarkBlobSegmenter):
        def segment(self, tile_rgb, pixel_size_um):
            calls.append(1)
            if len(calls) == 4:
                raise KeyboardInterrupt
            return super().segment(tile_rgb, pixel_size_um)

    settings = SegmentationSettings(progress=False)
    slides = {"slide_c": ArraySlide(rgb)}
    with pytest.raises(KeyboardInterrupt):
        segment_tiles(sample, slides, tmp_path, {"mk": InterruptingSegmenter()}, (), settings)
    assert not list(tmp_path.glob(f"*/*{TMP_SUFFIX}"))
    summary = segment_tiles(sample, slides, tmp_path, {"mk": InterruptingSegmenter()}, (), settings)
    assert summary.n_skipped == 3 and summary.n_processed == len(sample) - 3
    assert len(build_cells_table(tmp_path, sample)) == len(centres)


if __name__ == "__main__":
    worker_main(sys.argv[1])
