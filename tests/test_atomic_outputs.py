"""Catalog outputs are written atomically and refused when cut off, edited, or stale."""

from __future__ import annotations

import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from mk_hspc.datasets.atomic import AtomicDataset, StaleOutputError  # noqa: E402
from mk_hspc.datasets.slide_folder import SlideFolderDataset  # noqa: E402
from mk_hspc.engine.fingerprint import digest  # noqa: E402
from mk_hspc.hooks import ProvenanceHooks, StaleInputError, check_inputs_belong_together  # noqa: E402


def table(n_rows: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"cell_id": [f"c{i}" for i in range(n_rows)], "area_um2": rng.random(n_rows)})


def test_roundtrip_writes_a_manifest_and_no_temporary_file(tmp_path: Path) -> None:
    dataset = AtomicDataset("pandas.ParquetDataset", str(tmp_path / "cells.parquet"))
    dataset.lineage = {"tile_sample": "abc"}
    dataset.save(table(10))
    pd.testing.assert_frame_equal(dataset.load(), table(10))
    assert dataset.verified_manifest()["lineage"] == {"tile_sample": "abc"}
    # Beside the output: its manifest and the (empty) lock that keeps two saves of it from overlapping.
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".cells.parquet.save.lock",
        "cells.parquet",
        "cells.parquet.manifest.json",
    ]


def test_a_cut_off_csv_is_refused_not_read_as_a_shorter_table(tmp_path: Path) -> None:
    path = tmp_path / "counts.csv"
    dataset = AtomicDataset("pandas.CSVDataset", str(path))
    dataset.save(table(200))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    fresh = AtomicDataset("pandas.CSVDataset", str(path))
    with pytest.raises(StaleOutputError, match="counts.csv"):
        fresh.load()
    assert not fresh.exists()


def test_an_output_without_its_manifest_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "cells.parquet"
    table(5).to_parquet(path)  # e.g. written by an older version or by hand
    with pytest.raises(StaleOutputError, match="no manifest"):
        AtomicDataset("pandas.ParquetDataset", str(path)).load()


def test_a_failed_write_keeps_the_previous_output(tmp_path: Path) -> None:
    dataset = AtomicDataset("pandas.ParquetDataset", str(tmp_path / "cells.parquet"))
    dataset.save(table(10))
    unwritable = pd.DataFrame({"cell_id": [object()]})  # pyarrow cannot serialise this
    with pytest.raises(Exception, match="cells.parquet|object"):
        dataset.save(unwritable)
    pd.testing.assert_frame_equal(AtomicDataset("pandas.ParquetDataset", dataset._filepath).load(), table(10))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [".cells.parquet.save.lock"]


def test_a_folder_output_is_replaced_whole(tmp_path: Path) -> None:
    dataset = AtomicDataset({"type": "matplotlib.MatplotlibDataset"}, str(tmp_path / "overlays"))
    figures = {f"{name}.png": plt.figure(figsize=(1, 1)) for name in ("a", "b", "c")}
    dataset.save(figures)
    dataset.save({name: figures[name] for name in ("a.png", "b.png")})  # slide c left the study
    assert sorted(p.name for p in (tmp_path / "overlays").iterdir()) == ["a.png", "b.png"]
    dataset.verified_manifest()
    plt.close("all")


_WRITER = textwrap.dedent(
    """
    import sys, numpy as np, pandas as pd
    from mk_hspc.datasets.atomic import AtomicDataset
    dataset = AtomicDataset("pandas.ParquetDataset", sys.argv[1])
    rng = np.random.default_rng(1)
    big = pd.DataFrame(rng.random((2_000_000, 6)), columns=list("abcdef"))
    print("ready", flush=True)
    while True:
        dataset.save(big)
    """
)


def test_a_kill_while_writing_leaves_the_previous_table_readable(tmp_path: Path) -> None:
    path = tmp_path / "cells.parquet"
    AtomicDataset("pandas.ParquetDataset", str(path)).save(table(10))
    writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "ready"
    time.sleep(0.3)  # inside the first save of the big table
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    loaded = AtomicDataset("pandas.ParquetDataset", str(path)).load()
    assert len(loaded) in (10, 2_000_000)  # the old table or a complete new one, never a partial one


def _limit_file_size() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG, like a full disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))


def test_a_full_disk_during_a_write_keeps_the_previous_table(tmp_path: Path) -> None:
    path = tmp_path / "cells.parquet"
    AtomicDataset("pandas.ParquetDataset", str(path)).save(table(10))
    script = (
        "import sys, numpy as np, pandas as pd; from mk_hspc.datasets.atomic import AtomicDataset; "
        "AtomicDataset('pandas.ParquetDataset', sys.argv[1]).save("
        "pd.DataFrame(np.random.default_rng(0).random((200_000, 4)), columns=list('abcd')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(path)], preexec_fn=_limit_file_size, capture_output=True, text=True
    )
    assert result.returncode == 1, result.stderr  # a Python error, not a crash
    assert "File too large" in result.stderr or "Errno 27" in result.stderr
    pd.testing.assert_frame_equal(AtomicDataset("pandas.ParquetDataset", str(path)).load(), table(10))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [".cells.parquet.save.lock"]


def test_inputs_built_from_another_version_of_a_sibling_input_are_refused() -> None:
    records = {
        "cells": ("c1", {"tile_sample": "old", "params:segmentation": "p"}),
        "tile_sample": ("new", {"tile_index": "t"}),
    }
    with pytest.raises(StaleInputError, match="tile_sample"):
        check_inputs_belong_together("summarise_cell_counts", records)


def test_inputs_disagreeing_about_a_shared_ancestor_are_refused() -> None:
    records = {"cells": ("c1", {"tile_index": "t1"}), "tile_sample": ("s", {"tile_index": "t2"})}
    with pytest.raises(StaleInputError, match="tile_index"):
        check_inputs_belong_together("n", records)


def test_consistent_inputs_pass_and_give_the_outputs_their_lineage() -> None:
    records = {"cells": ("c1", {"tile_sample": "s"}), "tile_sample": ("s", {"tile_index": "t"})}
    assert check_inputs_belong_together("n", records) == {
        "cells": "c1",
        "tile_sample": "s",
        "tile_index": "t",
    }


class _Node:
    name = "summarise_cell_counts"


class _Catalog:
    """The two catalog calls the provenance hook makes: ``get(name)`` and that dataset's ``load``."""

    def __init__(self, datasets: dict) -> None:
        self.datasets = datasets

    def get(self, name: str):
        return self.datasets.get(name)


class _Memory:
    def __init__(self, data) -> None:
        self.data = data

    def load(self):
        return self.data


def test_inputs_built_with_other_parameters_than_this_runs_are_refused(tmp_path: Path) -> None:
    # A complete, self-consistent old state (e.g. ingestion killed before it wrote anything after the
    # sampling fraction changed): no two inputs disagree, but the cells were built with the old fraction.
    old, new = {"sampling": {"fraction": 0.5}}, {"sampling": {"fraction": 0.25}}
    cells = AtomicDataset("pandas.ParquetDataset", str(tmp_path / "cells.parquet"))
    cells.lineage = {"params:ingestion": digest(old)}
    cells.save(table(3))
    catalog = _Catalog({"cells": cells, "params:ingestion": _Memory(new)})
    with pytest.raises(StaleInputError, match=r"'cells' was built with another 'params:ingestion'"):
        ProvenanceHooks().before_node_run(_Node(), catalog, {"cells": table(3)})
    catalog.datasets["params:ingestion"] = _Memory(old)
    ProvenanceHooks().before_node_run(_Node(), catalog, {"cells": table(3)})  # current parameters: fine


def test_settings_that_cannot_change_a_result_do_not_make_outputs_stale() -> None:
    from mk_hspc.hooks import parameter_digest

    segmentation = {"segmenters": {"mk": {"name": "classical"}}, "runtime": {"reader_threads": 2}}
    faster = {**segmentation, "runtime": {"reader_threads": 1}, "executor": {"kind": "dask"}}
    assert parameter_digest(faster) == parameter_digest(segmentation)
    other = {**segmentation, "segmenters": {"mk": {"name": "sam2"}}}
    assert parameter_digest(other) != parameter_digest(segmentation)


# The slides themselves are in the provenance: an output built from another version of a slide (a file
# replaced under the same name, or a pixel size overridden since) is refused next to the current slides.


class _NamedNode:
    def __init__(self, name: str) -> None:
        self.name = name


def _build_tile_sample_then_segment(
    tmp_path: Path, raw_before: SlideFolderDataset, raw_after: SlideFolderDataset, between=lambda: None
) -> None:
    """Run the provenance hooks as Kedro does: a node builds ``tile_sample`` from ``raw_slides``; later
    (after ``between``) the segmentation node takes ``tile_sample`` and ``raw_slides`` together."""
    tile_sample = AtomicDataset("pandas.ParquetDataset", str(tmp_path / "tile_sample.parquet"))
    hooks = ProvenanceHooks()
    catalog = _Catalog({"raw_slides": raw_before, "tile_sample": tile_sample})
    builder = _NamedNode("make_tile_sample")
    hooks.before_node_run(builder, catalog, {"raw_slides": raw_before.load()})
    sample = pd.DataFrame({"tile_id": ["lab01_s0_r000_c000"], "slide": ["lab01"]})
    hooks.before_dataset_saved("tile_sample", sample, builder)
    tile_sample.save(sample)
    between()
    catalog = _Catalog({"raw_slides": raw_after, "tile_sample": tile_sample})
    hooks.before_node_run(
        _NamedNode("segment_sampled_tiles"),
        catalog,
        {"raw_slides": raw_after.load(), "tile_sample": tile_sample.load()},
    )


def test_a_tile_sample_built_from_a_replaced_slide_file_is_refused(tmp_path: Path, shared_data: Path) -> None:
    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copy(shared_data / "czitools" / "WellD6_S1.czi", slides / "lab01.czi")
    raw = SlideFolderDataset(path=str(slides))

    def replace_the_slide() -> None:  # the lab re-exports lab01 (another scan) under the same name
        shutil.copy(shared_data / "czitools" / "WellD6-7_S2.czi", slides / "lab01.czi")

    with pytest.raises(StaleInputError):
        _build_tile_sample_then_segment(tmp_path, raw, raw, between=replace_the_slide)


def test_a_tile_sample_built_before_a_pixel_size_override_changed_is_refused(
    tmp_path: Path, shared_data: Path
) -> None:
    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copy(shared_data / "czitools" / "WellD6_S1.czi", slides / "lab01.czi")
    before = SlideFolderDataset(path=str(slides))
    after = SlideFolderDataset(path=str(slides), pixel_size_um_by_slide={"lab01": 0.25})  # recalibrated
    with before.load()["lab01"]() as slide_before, after.load()["lab01"]() as slide_after:
        assert slide_before.meta.pixel_size_um != slide_after.meta.pixel_size_um
    with pytest.raises(StaleInputError):
        _build_tile_sample_then_segment(tmp_path, before, after)
