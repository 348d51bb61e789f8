"""Parameters: soft-merged conf envs, plugin choice by name, and the schema checked before `kedro run` starts."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from kedro.config import OmegaConfigLoader

from mk_hspc.engine.plugins import build_plugins, chosen_plugins, plugin_problems
from mk_hspc.params_schema import ParameterError, validate_parameters
from mk_hspc.settings import CONFIG_LOADER_ARGS
from tests.conftest import kedro, make_project_copy

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
        "mk": {"mode": "mk", "min_area_um2": 100.0, "max_area_um2": 2000.0},
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


def test_plugin_values_of_the_wrong_type_are_refused_before_any_tile_runs() -> None:
    # Before, min_score "abc" passed every check and failed each tile of the run, one by one.
    segmentation = load_parameters()["segmentation"]
    classical = segmentation["segmenters"]["mk"]["params"]["classical"]
    classical["min_score"] = "abc"
    classical["threshold_od_range"] = [0.2]
    problems = plugin_problems(segmentation)
    key = "segmentation.segmenters.mk.params.classical"
    assert any(p.startswith(f"{key}.min_score: ") and "valid number" in p and "'abc'" in p for p in problems)
    assert any(p.startswith(f"{key}.threshold_od_range.1: ") for p in problems)
    assert len(problems) == 2


def test_the_default_parameters_have_no_plugin_problems() -> None:
    assert plugin_problems(load_parameters()["segmentation"]) == []


def test_build_plugins_builds_the_chosen_plugins_with_their_own_parameters() -> None:
    segmentation = load_parameters()["segmentation"]
    segmentation["segmenters"]["hspc"]["name"] = "noop"
    segmenters, extractors = build_plugins(segmentation)
    assert [s.name for s in segmenters.values()] == ["classical", "noop"]
    assert segmenters["mk"].mode == "mk" and segmenters["mk"].params.min_area_um2 == 100.0
    assert [e.name for e in extractors] == ["morphology"]


# ---------------------------------------------------------------------------------------------- schema
def with_value(params: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """``params`` with the dotted ``key`` set to ``value`` (in place)."""
    *parents, last = key.split(".")
    block = params
    for part in parents:
        block = block[part]
    block[last] = value
    return params


def problems_of(params: dict[str, Any]) -> list[str]:
    with pytest.raises(ParameterError) as raised:
        validate_parameters(params)
    assert str(raised.value).count("\n") == len(raised.value.problems)  # one line each
    return raised.value.problems


@pytest.mark.parametrize("env", ["local", "gpu"])
def test_the_projects_own_parameters_are_valid(env: str) -> None:
    validate_parameters(load_parameters(env=env))


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("ingestion.tiles.tile_px", 2999.5, "input should be a valid integer, got 2999.5"),
        ("ingestion.tiles.tile_px", 100, "input should be greater than or equal to 256, got 100"),
        ("ingestion.tissue.map_um_per_px", 0.01, "input should be greater than or equal to 1, got 0.01"),
        ("ingestion.tiles.min_tissue_fraction", -1, "input should be greater than or equal to 0, got -1"),
        ("ingestion.tiles.largest_cell_um", 0.0, "input should be greater than 0, got 0.0"),
        ("ingestion.sampling.fraction", 1.5, "input should be less than or equal to 1, got 1.5"),
        ("ingestion.skip_bad_slides", "yes", "input should be a valid boolean, got 'yes'"),
        ("ingestion.plausible_pixel_size_um", [2.0, 0.05], "should be [low, high] with low < high"),
        ("segmentation.device", "gpu", "should be auto, cpu, cuda or cuda:N, got 'gpu'"),
        ("segmentation.runtime.reader_threads", 0, "input should be greater than or equal to 1, got 0"),
        ("demo.spec", "tiny", "input should be 'default' or 'small', got 'tiny'"),
    ],
)
def test_an_implausible_value_is_named_by_its_key(key: str, value: Any, problem: str | None) -> None:
    (reported,) = problems_of(with_value(load_parameters(), key, value))
    if problem is None:  # a mapping: the problem is inside it
        assert reported.startswith(f"{key}.slide_01: input should be greater than 0")
    else:
        assert reported.startswith(f"{key}: {problem}")


def test_unknown_keys_are_named_with_the_allowed_ones() -> None:
    params = load_parameters()
    with_value(params, "ingestion.tiles.overlap_px", 0)  # the key largest_cell_um replaced
    with_value(params, "demo.overrides", {"n_slide": 2})
    params["exports"] = {}  # a misspelt block
    assert problems_of(params) == [
        "demo.overrides.n_slide: unknown key; allowed: " + ", ".join(_demo_spec_fields()),
        "ingestion.tiles.overlap_px: unknown key; allowed: tile_px, largest_cell_um, min_tissue_fraction",
        "exports: unknown key; allowed: demo, ingestion, segmentation, export, annotate, train, simulated_annotator",
    ]


def _demo_spec_fields() -> list[str]:
    import dataclasses

    from mk_hspc.demo.spec import DemoSpec

    return [f.name for f in dataclasses.fields(DemoSpec)]


def test_every_problem_is_reported_at_once_plugins_included() -> None:
    params = load_parameters()
    with_value(params, "ingestion.tiles.tile_px", 2999.5)
    with_value(params, "segmentation.runtime.progress", 1)
    del params["ingestion"]["tiles"]["largest_cell_um"]
    with_value(params, "segmentation.segmenters.mk.params.classical.min_aera_um2", 150.0)
    keys = [problem.partition(": ")[0] for problem in problems_of(params)]
    assert keys == [
        "ingestion.tiles.tile_px",
        "ingestion.tiles.largest_cell_um",
        "segmentation.runtime.progress",
        "segmentation.segmenters.mk.params.classical.min_aera_um2",
    ]


def test_pixel_sizes_are_refused_as_parameters_because_only_globals_are_read() -> None:
    # Accepted but ignored, they would look like a correction that never happens.
    for key in ("pixel_size_um_override", "pixel_size_um_by_slide"):
        params = load_parameters()
        params["ingestion"][key] = 0.25 if key == "pixel_size_um_override" else {"slide_01": 0.25}
        assert [p.partition(": ")[0] for p in problems_of(params)] == [f"ingestion.{key}"]


def test_kedro_run_with_a_bad_value_stops_before_any_node(tmp_path: Path) -> None:
    project = make_project_copy(tmp_path / "project")
    with pytest.raises(AssertionError) as failed:
        kedro(project, "run", "--params", "ingestion.tiles.tile_px=2999.5", timeout=300)
    assert "ingestion.tiles.tile_px: input should be a valid integer, got 2999.5" in str(failed.value)
    # The first node would have written the demo study.
    assert not list(project.glob("data/01_raw/**/*.czi"))


def test_only_the_chosen_plugins_conf_enters_the_tile_fingerprint() -> None:
    from mk_hspc.pipelines.segmentation.nodes import chosen_plugin_conf

    segmentation = load_parameters()["segmentation"]
    before = chosen_plugin_conf(segmentation)
    segmentation["segmenters"]["mk"]["params"]["sam2"]["points_per_side"] = 32  # sam2 is not chosen here
    assert chosen_plugin_conf(segmentation) == before
    segmentation["segmenters"]["mk"]["params"]["classical"]["max_area_um2"] = 1500.0
    assert chosen_plugin_conf(segmentation) != before


def test_a_cell_type_with_an_underscore_is_refused_before_any_node() -> None:
    params = load_parameters()
    params["segmentation"]["segmenters"]["mk_big"] = params["segmentation"]["segmenters"].pop("mk")
    assert any(p.startswith("segmentation.segmenters") and "mk_big" in p for p in problems_of(params)), (
        problems_of(params)
    )


def test_an_overlap_narrower_than_the_largest_mk_is_refused_before_ingestion_runs() -> None:
    from mk_hspc.hooks import ParameterValidationHooks
    from mk_hspc.pipelines import ingestion, segmentation

    params = load_parameters()
    params["ingestion"]["tiles"]["largest_cell_um"] = 30.0  # a 2000 µm² MK is ~50 µm across

    class Catalog:
        def load(self, name: str) -> dict:
            return params

    with pytest.raises(ValueError, match=r"max_area_um2.*ingestion\.tiles\.largest_cell_um"):
        ParameterValidationHooks().before_pipeline_run(
            ingestion.create_pipeline() + segmentation.create_pipeline(), Catalog()
        )
    # A run that does not segment is not held up by segmenter settings.
    ParameterValidationHooks().before_pipeline_run(ingestion.create_pipeline(), Catalog())


def test_learned_plugin_values_of_the_wrong_type_are_refused_by_their_type_hints() -> None:
    # Before, only the classical plugin's values were checked: cellpose's diameter "big" failed at the first
    # tile (after the weights were loaded), a resnet50 batch size of 6.5 deep inside the feature step.
    segmentation = load_parameters()["segmentation"]
    segmentation["segmenters"]["hspc"]["name"] = "cellpose"
    segmentation["segmenters"]["hspc"]["params"]["cellpose"]["diameter_um"] = "big"
    segmentation["features"]["resnet50"]["enabled"] = True
    segmentation["features"]["resnet50"]["params"]["batch_size"] = 6.5
    problems = plugin_problems(segmentation)
    assert any(
        p.startswith("segmentation.segmenters.hspc.params.cellpose.diameter_um: ") and "'big'" in p
        for p in problems
    ), problems
    assert any(
        p.startswith("segmentation.features.resnet50.params.batch_size: ") and "6.5" in p for p in problems
    ), problems
    assert len(problems) == 2


def test_an_infinite_size_is_refused_naming_its_key() -> None:
    """`.inf` passed the schema and failed later in make_tile_index with an OverflowError naming no key, after
    earlier ingestion nodes had rewritten their outputs."""
    import copy

    from kedro.config import OmegaConfigLoader

    from mk_hspc.params_schema import ParameterError, validate_parameters

    conf = Path(__file__).resolve().parents[1] / "conf"
    params = copy.deepcopy(
        OmegaConfigLoader(str(conf), base_env="base", default_run_env="base")["parameters"]
    )
    params["ingestion"]["tiles"]["largest_cell_um"] = float("inf")  # YAML .inf
    with pytest.raises(ParameterError, match=r"ingestion\.tiles\.largest_cell_um"):
        validate_parameters(params)
