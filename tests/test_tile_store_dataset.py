"""The tile store as a catalog dataset: a plan is executed on save, failures isolated, staleness refused."""

from __future__ import annotations

import importlib
import json
import pickle
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from mk_hspc.czi.errors import CziSlideError
from mk_hspc.datasets.atomic import StaleOutputError, manifest_path
from mk_hspc.datasets.tile_store import (
    BadInputTilesError,
    TileFailuresError,
    TileStoreDataset,
    read_failures,
)
from mk_hspc.engine import fingerprint
from mk_hspc.engine.plan import SegmentationPlan
from mk_hspc.engine.tile_work import SegmentationSettings, compute_params_hash, segment_tiles
from mk_hspc.errors import UserError, brief_message
from mk_hspc.tile_store import tile_path
from tests.test_tile_work import (
    ArraySlide,
    DarkBlobSegmenter,
    FakeMorphology,
    make_blob_slide,
    make_tile_sample,
)

QUIET = SegmentationSettings(progress=False, fsync=False)


class FlakySlide(ArraySlide):
    """Fails to read one region (a corrupt subblock), reads the others."""

    def __init__(self, rgb: np.ndarray, bad_x: int) -> None:
        super().__init__(rgb)
        self.bad_x = bad_x
        self.closed = False

    def read_region(self, x: int, y: int, w: int, h: int, scale: float = 1.0) -> np.ndarray:
        if x == self.bad_x:
            raise OSError("corrupt subblock at this position")
        return super().read_region(x, y, w, h, scale)

    def close(self) -> None:
        self.closed = True


@pytest.fixture()
def study():
    rgb, _ = make_blob_slide()
    sample = make_tile_sample("slide_a", rgb.shape[0], rgb.shape[1], core_px=150, overlap_px=30)
    return rgb, sample


def plan_for(sample, openers) -> SegmentationPlan:
    return SegmentationPlan(sample, openers, {"mk": DarkBlobSegmenter()}, [FakeMorphology()], QUIET)


def test_saving_a_plan_fills_the_store_and_loading_gives_a_lazy_view(tmp_path: Path, study) -> None:
    rgb, sample = study
    dataset = TileStoreDataset(str(tmp_path / "store"))
    assert not dataset.exists()
    dataset.save(plan_for(sample, {"slide_a": lambda: ArraySlide(rgb)}))
    store = dataset.load()
    assert sorted(store.tiles) == sorted(sample["tile_id"])
    first = store.read(sample["tile_id"].iloc[0])
    assert first.params_hash == store.params_hash and "mk" in first.labels
    assert dataset.exists()


def test_a_failing_tile_is_recorded_and_every_other_tile_is_done(tmp_path: Path, study) -> None:
    rgb, sample = study
    bad_x = int(sample["x"].iloc[3])
    n_bad = int((sample["x"] == bad_x).sum())
    flaky = FlakySlide(rgb, bad_x)
    dataset = TileStoreDataset(str(tmp_path / "store"))
    with pytest.raises(TileFailuresError, match=f"{n_bad} tile\\(s\\) failed") as failed:
        dataset.save(plan_for(sample, {"slide_a": lambda: flaky}))
    assert flaky.closed  # closed on the failure path too
    bad_tiles = sorted(sample.loc[sample["x"] == bad_x, "tile_id"])
    assert [f["tile_id"] for f in failed.value.failed_tiles] == bad_tiles
    assert [f["tile_id"] for f in read_failures(tmp_path / "store")] == bad_tiles
    # Not bad input the code knows (a bare OSError): the record names its type, the error keeps a traceback.
    assert read_failures(tmp_path / "store")[0]["error"] == "OSError: corrupt subblock at this position"
    assert read_failures(tmp_path / "store")[0]["user_error"] is False
    assert not isinstance(failed.value, UserError) and brief_message(failed.value) is None
    done = sorted(set(sample["tile_id"]) - set(bad_tiles))
    assert all(tile_path(tmp_path / "store", t, "slide_a").exists() for t in done)
    assert not dataset.exists()  # incomplete: --only-missing-outputs reruns segmentation
    with pytest.raises(StaleOutputError, match="not complete"):
        dataset.load()
    # Once the region reads again, a rerun does only the failed tiles and completes the store.
    dataset.save(plan_for(sample, {"slide_a": lambda: ArraySlide(rgb)}))
    summary = dataset.load().summary
    assert summary["n_processed"] == len(bad_tiles) and summary["n_skipped"] == len(done)
    assert read_failures(tmp_path / "store") == []


class CorruptRegionSlide(FlakySlide):
    """Fails one region as the CZI reader does on a corrupt subblock (a user error naming the file)."""

    def read_region(self, x: int, y: int, w: int, h: int, scale: float = 1.0) -> np.ndarray:
        if x == self.bad_x:
            raise CziSlideError(
                Path("slide_a.czi"), "reading region (0, 0, 10, 10) at zoom 1 failed (corrupt)"
            )
        return ArraySlide.read_region(self, x, y, w, h, scale)


def test_tiles_failing_only_on_bad_input_are_shown_briefly(tmp_path: Path, study, monkeypatch) -> None:
    monkeypatch.delenv("MK_HSPC_TRACEBACK", raising=False)
    rgb, sample = study
    slide = CorruptRegionSlide(rgb, int(sample["x"].iloc[3]))
    dataset = TileStoreDataset(str(tmp_path / "store"))
    with pytest.raises(BadInputTilesError) as failed:
        dataset.save(plan_for(sample, {"slide_a": lambda: slide}))
    record = read_failures(tmp_path / "store")[0]
    assert record["user_error"] is True and record["error"].startswith("slide_a.czi: reading region")
    assert brief_message(failed.value).startswith("Error: ")
    assert pickle.loads(pickle.dumps(failed.value)).failed_tiles == failed.value.failed_tiles


def test_a_slide_that_cannot_be_opened_fails_its_tiles_only(tmp_path: Path, study) -> None:
    rgb, sample = study
    other = sample.assign(slide="slide_b", tile_id=sample["tile_id"].str.replace("slide_a", "slide_b"))

    def broken():
        raise OSError("truncated file")

    import pandas as pd

    both = pd.concat([sample, other], ignore_index=True)
    dataset = TileStoreDataset(str(tmp_path / "store"))
    with pytest.raises(TileFailuresError, match="truncated file"):
        dataset.save(plan_for(both, {"slide_a": lambda: ArraySlide(rgb), "slide_b": broken}))
    assert {f["slide"] for f in read_failures(tmp_path / "store")} == {"slide_b"}
    assert all(tile_path(tmp_path / "store", t, "slide_a").exists() for t in sample["tile_id"])


def test_a_tile_changed_after_the_run_makes_the_store_stale(tmp_path: Path, study) -> None:
    rgb, sample = study
    dataset = TileStoreDataset(str(tmp_path / "store"))
    dataset.save(plan_for(sample, {"slide_a": lambda: ArraySlide(rgb)}))
    tile_path(tmp_path / "store", sample["tile_id"].iloc[0], "slide_a").unlink()
    assert not dataset.exists()
    with pytest.raises(StaleOutputError, match="gone"):
        dataset.load()


def test_a_store_of_an_older_tile_format_is_refused_and_rerun(tmp_path: Path, study) -> None:
    """A store written before the tiles held outlines (format 2) must not load: the export would fail on it."""
    rgb, sample = study
    dataset = TileStoreDataset(str(tmp_path / "store"))
    dataset.save(plan_for(sample, {"slide_a": lambda: ArraySlide(rgb)}))
    manifest = json.loads(manifest_path(tmp_path / "store").read_text())
    del manifest["format_version"]  # as an older version of the project wrote it
    manifest_path(tmp_path / "store").write_text(json.dumps(manifest))
    assert not dataset.exists()  # so --only-missing-outputs reruns segmentation
    with pytest.raises(StaleOutputError, match="format 2 or older.*run the segmentation pipeline again"):
        dataset.load()


def test_a_pixel_size_change_recomputes_every_tile(tmp_path: Path, study) -> None:
    rgb, sample = study
    slide = ArraySlide(rgb)
    segment_tiles(sample, {"slide_a": slide}, tmp_path, {"mk": DarkBlobSegmenter()}, settings=QUIET)
    slide.meta = SimpleNamespace(pixel_size_um=0.25)  # e.g. pixel_size_um_override corrected
    again = segment_tiles(sample, {"slide_a": slide}, tmp_path, {"mk": DarkBlobSegmenter()}, settings=QUIET)
    assert again.n_recomputed == again.n_processed == len(sample)


def test_numbers_are_normalised_in_the_fingerprint() -> None:
    as_int = compute_params_hash({"mk": DarkBlobSegmenter(max_brightness=128)}, params={"a": {"b": 250}})
    as_float = compute_params_hash(
        {"mk": DarkBlobSegmenter(max_brightness=128.0)}, params={"a": {"b": 250.0}}
    )
    assert as_int == as_float
    assert as_int != compute_params_hash({"mk": DarkBlobSegmenter()}, params={"a": {"b": 251}})


class WeightedSegmenter(DarkBlobSegmenter):
    def __init__(self, weights: str) -> None:
        super().__init__()
        self.weights = weights


def test_weights_count_by_content_not_by_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MK_HSPC_DIGEST_CACHE", str(tmp_path / "digests.json"))
    first, moved = tmp_path / "a.pt", tmp_path / "b.pt"
    first.write_bytes(b"weights v1")
    moved.write_bytes(b"weights v1")
    v1 = compute_params_hash({"mk": WeightedSegmenter(str(first))})
    assert v1 == compute_params_hash({"mk": WeightedSegmenter(str(moved))})
    first.write_bytes(b"weights v2 (retrained)")
    assert compute_params_hash({"mk": WeightedSegmenter(str(first))}) != v1


def test_an_empty_weights_file_is_named_before_any_tile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MK_HSPC_DIGEST_CACHE", str(tmp_path / "digests.json"))
    empty = tmp_path / "cpsam"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="weights.*cpsam.*empty"):
        compute_params_hash({"hspc": WeightedSegmenter(str(empty))})


PLUGIN_SOURCE = """
from tests.test_tile_work import DarkBlobSegmenter

class EditedSegmenter(DarkBlobSegmenter):
    THRESHOLD = {threshold}
"""


def test_editing_a_plugin_changes_the_fingerprint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    module_file = tmp_path / "lab_plugin_under_test.py"
    hashes = []
    for threshold in (1, 2):
        module_file.write_text(PLUGIN_SOURCE.format(threshold=threshold))
        sys.modules.pop("lab_plugin_under_test", None)
        fingerprint._module_sources.cache_clear()
        fingerprint._package_versions.cache_clear()
        module = importlib.import_module("lab_plugin_under_test")
        hashes.append(compute_params_hash({"mk": module.EditedSegmenter()}))
    assert hashes[0] != hashes[1]


def test_the_fingerprint_covers_the_mk_hspc_modules_a_plugin_uses() -> None:
    from mk_hspc.models.segmenters.classical import ClassicalSegmenter

    described = fingerprint.plugin_fingerprint(ClassicalSegmenter(mode="mk"))
    assert "mk_hspc.models.stain" in described["code"]
    assert {"numpy", "scikit-image"} <= set(described["packages"])


def test_an_empty_weights_file_is_refused_when_the_plugin_checks_its_path(tmp_path: Path) -> None:
    from mk_hspc.models.torch_device import require_file

    empty = tmp_path / "resnet50.pth"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"ResNet-50 weights.*resnet50\.pth.*empty"):
        require_file(empty, "ResNet-50 weights")


def test_feature_columns_are_part_of_the_fingerprint(monkeypatch: pytest.MonkeyPatch) -> None:
    from mk_hspc.models.features import morphology

    described = fingerprint.plugin_fingerprint(morphology.MorphologyFeatures())
    assert described["columns"] == morphology.morphology_columns()
    before = compute_params_hash({"mk": DarkBlobSegmenter()}, [morphology.MorphologyFeatures()])
    monkeypatch.setattr(morphology, "FEATURE_NAMES", (*morphology.FEATURE_NAMES, "new_feature"))
    assert compute_params_hash({"mk": DarkBlobSegmenter()}, [morphology.MorphologyFeatures()]) != before


def test_a_replaced_slide_with_the_same_name_and_size_recomputes_its_tiles(tmp_path: Path, study) -> None:
    rgb, sample = study
    slide = ArraySlide(rgb)
    slide.meta = SimpleNamespace(pixel_size_um=0.5, file_id="guid-a:1000")
    segment_tiles(sample, {"slide_a": slide}, tmp_path, {"mk": DarkBlobSegmenter()}, settings=QUIET)
    same = segment_tiles(sample, {"slide_a": slide}, tmp_path, {"mk": DarkBlobSegmenter()}, settings=QUIET)
    assert same.n_processed == 0
    slide.meta = SimpleNamespace(pixel_size_um=0.5, file_id="guid-b:1000")  # re-exported under the same name
    again = segment_tiles(sample, {"slide_a": slide}, tmp_path, {"mk": DarkBlobSegmenter()}, settings=QUIET)
    assert again.n_recomputed == again.n_processed == len(sample)


def test_the_czi_file_identity_is_its_header_guid_and_size(shared_data: Path) -> None:
    from mk_hspc.czi import open_slide
    from mk_hspc.czi.container import check_file

    path = shared_data / "aicspylibczi" / "RGB-8bit.czi"
    layout = check_file(path)
    assert len(layout.file_guid) == 32 and layout.file_guid != "0" * 32
    with open_slide(path) as slide:
        assert slide.meta.file_id == f"{layout.file_guid}:{path.stat().st_size}"


def test_engine_and_reader_code_are_part_of_the_fingerprint() -> None:
    described = dict(fingerprint._module_sources("mk_hspc.engine.tile_work"))
    assert {"mk_hspc.engine.tile_work", "mk_hspc.tile_store"} <= set(described)
    assert "mk_hspc.czi.native" in dict(fingerprint._module_sources("mk_hspc.czi.reader"))


def test_with_skip_bad_slides_failed_tiles_are_left_out_and_the_store_completes(
    tmp_path: Path, study
) -> None:
    rgb, sample = study
    bad_x = int(sample["x"].iloc[3])
    bad_tiles = sorted(sample.loc[sample["x"] == bad_x, "tile_id"])
    plan = plan_for(sample, {"slide_a": lambda: FlakySlide(rgb, bad_x)})
    plan.skip_failed_tiles = True
    dataset = TileStoreDataset(str(tmp_path / "store"))
    dataset.save(plan)
    store = dataset.load()
    assert sorted(store.failed_tiles) == bad_tiles
    assert sorted(store.tiles) == sorted(set(sample["tile_id"]) - set(bad_tiles))
    assert [f["tile_id"] for f in read_failures(tmp_path / "store")] == bad_tiles


def test_a_store_being_written_by_another_run_is_refused(tmp_path: Path, study) -> None:
    from filelock import FileLock
    from kedro.io import DatasetError

    from mk_hspc.datasets.tile_store import STORE_LOCK_NAME

    rgb, sample = study
    (tmp_path / "store").mkdir()
    other_run = FileLock(tmp_path / "store" / STORE_LOCK_NAME)  # e.g. another project sharing the store
    other_run.acquire()
    try:
        with pytest.raises(DatasetError, match="being written by another run"):
            TileStoreDataset(str(tmp_path / "store")).save(
                plan_for(sample, {"slide_a": lambda: ArraySlide(rgb)})
            )
    finally:
        other_run.release()
    assert not list((tmp_path / "store").glob("*/*.h5"))
