"""The export and labels stages as a user drives them: `kedro run --pipelines export|labels`, `kedro annotate
export|import`, on a project whose upstream outputs (slides, slide_meta, tile store, cells) hold a tiny study."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mk_hspc.datasets.atomic import AtomicDataset, manifest_path, write_json_atomic
from mk_hspc.datasets.tile_store import TileStoreDataset
from mk_hspc.tile_store import FORMAT_VERSION
from tests.annotate_server import command_env
from tests.annotation_fixtures import EXPORT_PARAMS, make_study
from tests.conftest import make_project_copy


def kedro(project: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [str(Path(sys.executable).with_name("kedro")), *args]
    result = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (
        f"kedro {' '.join(args)}:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    )
    return result


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("export_project")
    project = make_project_copy(root / "project")
    study = make_study(root / "study")
    data = project / "data"
    (data / "01_raw").mkdir(parents=True)
    study.slides_dir.rename(data / "01_raw" / "slides")
    store_dir = data / "03_primary" / "tile_store"
    store_dir.parent.mkdir(parents=True)
    study.store.root.rename(store_dir)
    store = TileStoreDataset(str(store_dir))
    write_json_atomic(
        manifest_path(store_dir),
        {
            "format_version": FORMAT_VERSION,
            "params_hash": study.store.params_hash,
            "tiles": study.store.tiles,
            "digest": store._digest(study.store.params_hash, study.store.tiles),
            "lineage": {},
        },
    )
    AtomicDataset("pandas.ParquetDataset", str(data / "03_primary" / "cells.parquet")).save(study.cells)
    AtomicDataset("json.JSONDataset", str(data / "02_intermediate" / "slide_meta.json")).save(
        study.slide_meta
    )
    params = {"export": {**EXPORT_PARAMS, "label_studio": {"image_url_prefix": "http://lab.example/site/"}}}
    (project / "conf" / "local" / "parameters.yml").write_text(json.dumps(params))
    env = command_env(root)
    kedro(project, env, "run", "--pipelines", "export")
    return project, env


def test_export_run_writes_site_qupath_and_label_studio(project: tuple[Path, dict[str, str]]) -> None:
    path, _ = project
    reporting = path / "data" / "08_reporting"
    cells = json.loads((reporting / "annotation_site" / "cells.json").read_text())["cells"]
    assert len(cells) == 20 and len(list((reporting / "annotation_site").glob("crops/*/*.webp"))) == 20
    assert (reporting / "annotation_site.manifest.json").is_file()
    geojson = sorted(p.name for p in (reporting / "qupath").glob("*.geojson"))
    assert geojson == ["<img src=x onerror=alert(1)>.geojson", "S2.geojson"]
    tasks = json.loads((reporting / "label_studio_tasks.json").read_text())
    assert len(tasks) == 20 and all(
        t["data"]["image"].startswith("http://lab.example/site/crops/") for t in tasks
    )


def test_labels_flow_from_import_to_the_labels_dataset(
    project: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    path, env = project
    cells = sorted(
        json.loads((path / "data" / "08_reporting" / "annotation_site" / "cells.json").read_text())["cells"]
    )
    upload = tmp_path / "annotations.json"
    upload.write_text(
        json.dumps(
            {
                "version": 1,
                "labels": [
                    {
                        "cell_id": cells[0],
                        "label": "yes",
                        "annotator": "ann",
                        "updated_at": "2026-11-30T06:00:00Z",
                    },
                    {
                        "cell_id": cells[1],
                        "label": "no",
                        "annotator": "ann",
                        "updated_at": "2026-11-30T06:00:01Z",
                    },
                ],
            }
        )
    )
    assert "2 labels added" in kedro(path, env, "annotate", "import", str(upload)).stdout
    # A file naming a cell that is not in the site is refused whole: the export below has only the two.
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps(
            {
                "version": 1,
                "labels": [
                    {
                        "cell_id": "S9_s0_r000_c000_mk_00001",
                        "label": "yes",
                        "annotator": "a",
                        "updated_at": "2026-11-30T06:00:00Z",
                    }
                ],
            }
        )
    )
    cmd = [str(Path(sys.executable).with_name("kedro")), "annotate", "import", str(bad)]
    result = subprocess.run(cmd, cwd=path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "not in the site" in result.stderr + result.stdout
    kedro(path, env, "annotate", "export")
    labels_file = path / "data" / "05_model_input" / "labels.json"
    exported = json.loads(labels_file.read_text())
    assert exported == {
        "version": 1,
        "labels": [
            {
                "cell_id": cells[0],
                "label": "yes",
                "annotator": "ann",
                "updated_at": "2026-11-30T06:00:00.000000Z",
            },
            {
                "cell_id": cells[1],
                "label": "no",
                "annotator": "ann",
                "updated_at": "2026-11-30T06:00:01.000000Z",
            },
        ],
    }
    labels_file.unlink()
    kedro(path, env, "run", "--pipelines", "labels")
    assert json.loads(labels_file.read_text()) == exported
    assert (labels_file.parent / "labels.json.manifest.json").is_file()
