"""Parameters as Kedro merges them: conf/local and conf/gpu override single keys of conf/base."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from kedro.config import OmegaConfigLoader

from mk_hspc.engine.plugins import build_plugins, chosen_plugins, plugin_problems
from mk_hspc.params_schema import ParameterError
from mk_hspc.settings import CONFIG_LOADER_ARGS

CONF = Path(__file__).resolve().parents[1] / "conf"


def load_parameters(conf: Path = CONF, env: str = "local") -> dict[str, Any]:
    """The parameters of ``env`` merged over ``base`` by the project's own config loader settings."""
    return OmegaConfigLoader(str(conf), **{**CONFIG_LOADER_ARGS, "default_run_env": env})["parameters"]


@pytest.fixture
def conf_copy(tmp_path: Path) -> Path:
    """A throwaway copy of ``conf/`` with an empty ``local`` env (a developer's own conf/local is ignored)."""
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf, ignore=shutil.ignore_patterns("local"))
    (conf / "local").mkdir()
    return conf


def test_local_override_of_one_key_keeps_the_rest_of_its_block(conf_copy: Path) -> None:
    base = load_parameters(conf_copy)
    (conf_copy / "local" / "parameters.yml").write_text("ingestion:\n  tiles:\n    tile_px: 2000\n")
    merged = load_parameters(conf_copy)
    assert merged["ingestion"]["tiles"]["tile_px"] == 2000
    assert base["ingestion"]["tiles"]["tile_px"] != 2000
    # Everything else of the block is conf/base's, globals still resolved.
    expected = {**base["ingestion"], "tiles": {**base["ingestion"]["tiles"], "tile_px": 2000}}
    assert merged["ingestion"] == expected
    assert merged["ingestion"]["slides_dir"] == "data/01_raw/slides"
    assert merged["segmentation"] == base["segmentation"]


def test_gpu_env_switches_plugins_by_name_without_mixing_their_parameters() -> None:
    segmenters, features = chosen_plugins(load_parameters(env="gpu")["segmentation"])
    assert {cell_type: choice.name for cell_type, choice in segmenters.items()} == {
        "mk": "sam2",
        "hspc": "cellpose",
    }
    assert [choice.name for choice in features] == ["morphology", "sam2_embedding", "resnet50"]
    # The classical plugin's `mode` stays with it; conf/base holds the learned models' parameters.
    assert "mode" not in segmenters["mk"].params and "mode" not in segmenters["hspc"].params
    assert segmenters["mk"].params["checkpoint"] == "data/06_models/sam2.1_hiera_large.pt"
    assert segmenters["mk"].key == "segmentation.segmenters.mk.params.sam2"


def test_base_env_chooses_the_classical_plugins() -> None:
    segmenters, features = chosen_plugins(load_parameters()["segmentation"])
    assert {cell_type: dict(choice.params) for cell_type, choice in segmenters.items()} == {
        "mk": {"mode": "mk", "min_area_um2": 200.0, "max_area_um2": 2000.0},
        "hspc": {"mode": "hspc"},
    }
    assert [choice.name for choice in features] == ["morphology"]


def test_plugin_parameter_typo_names_its_full_key_and_the_accepted_ones() -> None:
    segmentation = load_parameters()["segmentation"]
    segmentation["segmenters"]["mk"]["params"]["classical"]["min_aera_um2"] = 150.0
    with pytest.raises(ParameterError) as raised:
        build_plugins(segmentation)
    (problem,) = raised.value.problems
    key, _, message = problem.partition(": ")
    assert key == "segmentation.segmenters.mk.params.classical.min_aera_um2"
    assert "'classical'" in message and "min_area_um2" in message and "lobe_gap_um" in message


def test_unknown_plugin_names_and_missing_parameters_are_all_reported() -> None:
    segmentation = load_parameters()["segmentation"]
    segmentation["segmenters"]["hspc"]["name"] = "stardist"
    segmentation["segmenters"]["mk"]["params"]["sam_2"] = {}
    segmentation["features"]["morphologie"] = {"enabled": False, "params": {}}
    segmentation["features"]["resnet50"] = {"enabled": True, "params": {"crop_size_px": 224}}
    problems = plugin_problems(segmentation)
    assert problems[:3] == [
        "segmentation.segmenters.mk.params.sam_2: no plugin named 'sam_2' in mk_hspc.segmenters; "
        "available: cellpose, classical, noop, sam2",
        "segmentation.segmenters.hspc.name: no plugin named 'stardist' in mk_hspc.segmenters; "
        "available: cellpose, classical, noop, sam2",
        "segmentation.features.morphologie: no plugin named 'morphologie' in mk_hspc.features; "
        "available: morphology, resnet50, sam2_embedding",
    ]
    assert problems[3:] == [
        "segmentation.features.resnet50.params.weights: missing (the 'resnet50' plugin requires it)"
    ]


def test_build_plugins_builds_the_chosen_plugins_with_their_own_parameters() -> None:
    segmentation = load_parameters()["segmentation"]
    segmentation["segmenters"]["hspc"]["name"] = "noop"
    segmenters, extractors = build_plugins(segmentation)
    assert [s.name for s in segmenters.values()] == ["classical", "noop"]
    assert segmenters["mk"].mode == "mk" and segmenters["mk"].params.min_area_um2 == 200.0
    assert [e.name for e in extractors] == ["morphology"]
