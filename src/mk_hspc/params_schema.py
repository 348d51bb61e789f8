"""The parameters' schema: types, ranges and allowed keys of every block of ``conf/*/parameters_*.yml``.

:func:`validate_parameters` runs before any node of a ``kedro run`` (``mk_hspc.hooks``), so a misspelt key
or an implausible value stops the run at its start with the dotted key of every problem. The models only
check: nodes still receive the plain parameters. A key the code reads with a default is optional here, with
the code's default shown for reference (never applied); a new parameters block needs a model here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import ErrorDetails, PydanticCustomError

from mk_hspc.errors import UserError
from mk_hspc.tissue.detect import MAX_OD

PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegativeFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Fraction = Annotated[float, Field(ge=0, le=1)]
Count = Annotated[int, Field(ge=1)]
# Error type of a mapping checked against names known only at run time (one problem per unknown name).
UNKNOWN_KEYS = "unknown_keys"
MAX_SHOWN_CHARS = 80  # of a wrong value quoted in a message


class ParameterError(UserError, ValueError):
    """Parameters that break the schema; the message lists every problem, each with its dotted key."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("Invalid parameters:\n" + "\n".join(f"  {problem}" for problem in self.problems))


class _Block(BaseModel):
    # strict: 2999.5 for a pixel count or "yes" for a flag is an error, never silently converted.
    model_config = ConfigDict(extra="forbid", strict=True)


# ------------------------------------------------------------------------------------------------ demo
class Demo(_Block):
    generate_if_empty: bool
    out_dir: str
    spec: Literal["default", "small"] = "default"  # the DemoSpec presets (classmethods of that name)
    overrides: dict[str, Any] = {}
    slide_sheet: str | None = None  # where the demo's sheet lies (names it in messages)

    @field_validator("overrides")
    @classmethod
    def _demo_spec_fields(cls, overrides: dict[str, Any]) -> dict[str, Any]:
        if overrides:
            from mk_hspc.demo.spec import DemoSpec  # only when used: the demo package imports the writer

            allowed = [f.name for f in dataclasses.fields(DemoSpec)]
            unknown = [name for name in overrides if name not in allowed]
            if unknown:
                raise PydanticCustomError(
                    UNKNOWN_KEYS, "unknown keys {unknown}", {"unknown": unknown, "allowed": allowed}
                )
        return overrides


# ------------------------------------------------------------------------------------------- ingestion
class Tissue(_Block):
    """``tissue.study.build_tissue_maps`` keywords."""

    # The low-resolution read's pixel size: finer than 1 µm/px is a full-resolution read of the slide
    # (gigabytes per map), coarser than 64 µm/px cannot resolve a 3000 px tile (~500 µm).
    map_um_per_px: float = Field(8.0, ge=1.0, le=64.0)
    smooth_sigma_um: NonNegativeFloat = 0.0
    fill_holes_max_um2: NonNegativeFloat = 250_000.0
    min_object_um2: NonNegativeFloat = 20_000.0
    unscanned_rgb_max: int = Field(0, ge=0, le=255)
    histogram_bins: int = Field(1024, ge=16)
    threshold_method: Literal["triangle", "otsu"] = "triangle"
    min_threshold_od: NonNegativeFloat = 0.0
    max_threshold_od: PositiveFloat = MAX_OD
    threads: Count = 2
    block_px: int = Field(8192, ge=256)


class Tiles(_Block):
    tile_px: int = Field(ge=256, le=20_000)
    # The tile overlap in px is derived per slide from this and the slide's pixel size.
    largest_cell_um: PositiveFloat
    min_tissue_fraction: Fraction


class Sampling(_Block):
    """``tiling.sample_tiles`` keywords."""

    fraction: float = Field(0.10, gt=0, le=1)
    seed: int = 0


class Ingestion(_Block):
    slides_dir: str
    skip_bad_slides: bool
    # True: a missing sheet, unknown slides in it or slides without a group stop the run; False: named warning.
    slide_sheet_strict: bool = True
    # Pixel sizes themselves (pixel_size_um_override, pixel_size_um_by_slide) live in globals.yml: the slide
    # folder dataset reads them there, so they are not parameters.
    plausible_pixel_size_um: list[PositiveFloat] = Field([0.05, 6.0], min_length=2, max_length=2)
    tissue: Tissue
    tiles: Tiles
    sampling: Sampling

    @field_validator("plausible_pixel_size_um")
    @classmethod
    def _low_then_high(cls, bounds: list[float]) -> list[float]:
        if not bounds[0] < bounds[1]:
            raise ValueError("should be [low, high] with low < high")
        return bounds


# ---------------------------------------------------------------------------------------- segmentation
class SegmenterChoice(_Block):
    """The plugin that segments one cell type, and every plugin's parameters under its own name (the
    names and parameter keys are checked against the plugins themselves: ``engine.plugins``)."""

    name: str
    params: dict[str, dict[str, Any]] = {}


class FeatureChoice(_Block):
    enabled: bool
    params: dict[str, Any] = {}


class Runtime(_Block):
    """``engine.tile_work.SegmentationSettings`` fields."""

    reader_threads: Count = 2
    prefetch_tiles: Count = 2
    writer_threads: Count = 1
    pending_writes: Count = 2
    progress: bool = True
    fsync: bool = True
    label_chunk_px: int = Field(512, ge=16)
    release_memory_every_tiles: Count | None = 8


class Slurm(_Block):
    """``dask_jobqueue.SLURMCluster`` keyword arguments (``cluster``) and how many jobs to submit."""

    jobs: Count = 1
    cluster: dict[str, Any] = {}

    @field_validator("cluster")
    @classmethod
    def _slurm_cluster_arguments(cls, cluster: dict[str, Any]) -> dict[str, Any]:
        if cluster:
            from mk_hspc.engine.dask_executor import slurm_cluster_arguments  # imports dask_jobqueue

            allowed = sorted(slurm_cluster_arguments())
            unknown = [name for name in cluster if name not in allowed]
            if unknown:
                raise PydanticCustomError(
                    UNKNOWN_KEYS, "unknown keys {unknown}", {"unknown": unknown, "allowed": allowed}
                )
        return cluster


class DaskExecutor(_Block):
    """``engine.dask_executor.DaskSettings`` fields (``slurm`` gives ``slurm_jobs`` and ``slurm_cluster``)."""

    cluster: Literal["local", "address", "slurm"] = "local"
    address: str | None = None
    n_workers: Any = "auto"  # auto | a whole number >= 1 (checked below, one message for both)
    threads_per_worker: Count = 1
    memory_limit: str = "auto"
    max_tiles_in_flight_per_worker: Count = 2
    retries: int = Field(2, ge=0)
    allowed_failures: int = Field(3, ge=0)
    startup_timeout_s: PositiveFloat = 120.0
    stall_timeout_s: PositiveFloat = 1800.0
    dashboard_address: str | None = None
    slurm: Slurm = Slurm()

    @field_validator("n_workers")
    @classmethod
    def _n_workers(cls, n_workers: Any) -> Any:
        if n_workers != "auto" and not (
            isinstance(n_workers, int) and not isinstance(n_workers, bool) and n_workers >= 1
        ):
            raise ValueError("should be auto or a whole number of workers >= 1")
        return n_workers

    @field_validator("memory_limit")
    @classmethod
    def _memory_limit(cls, memory_limit: str) -> str:
        if memory_limit != "auto":
            from dask.utils import parse_bytes

            try:
                parse_bytes(memory_limit)
            except ValueError:
                raise ValueError("should be auto or a size such as 6GiB") from None
        return memory_limit

    @model_validator(mode="after")
    def _address_for_an_existing_scheduler(self) -> DaskExecutor:
        if self.cluster == "address" and not self.address:
            raise ValueError("cluster: address needs address (the scheduler's, e.g. tcp://10.0.0.5:8786)")
        if self.max_tiles_in_flight_per_worker < self.threads_per_worker:
            raise ValueError(
                "max_tiles_in_flight_per_worker should be at least threads_per_worker "
                "(fewer tiles in flight leave worker threads idle)"
            )
        return self


class Executor(_Block):
    """Where the tiles run: this process's threads (``local``) or a Dask cluster (``dask``)."""

    kind: Literal["local", "dask"] = "local"
    dask: DaskExecutor = DaskExecutor()


class Segmentation(_Block):
    device: str = "auto"
    segmenters: dict[str, SegmenterChoice] = Field(min_length=1)
    features: dict[str, FeatureChoice] = {}
    runtime: Runtime = Runtime()
    executor: Executor = Executor()

    @field_validator("segmenters")
    @classmethod
    def _cell_type_names(cls, segmenters: dict[str, Any]) -> dict[str, Any]:
        bad = [name for name in segmenters if not name.isidentifier() or "_" in name]
        if bad:
            raise ValueError(f"cell types {bad} must be letters and digits only (cell ids are split on '_')")
        return segmenters

    @field_validator("device")
    @classmethod
    def _device(cls, device: str) -> str:
        kind, _, index = device.partition(":")
        if not (device in ("auto", "cpu", "cuda") or (kind == "cuda" and index.isdigit())):
            raise ValueError("should be auto, cpu, cuda or cuda:N")
        return device


# ---------------------------------------------------------------------------------- export / annotate
class CropConf(_Block):
    crop_um: float = Field(gt=0, le=1000)  # a crop wider than a tile's overlap-free core makes no sense
    output_px: int = Field(ge=16, le=512)


class QuPathConf(_Block):
    simplify_px: NonNegativeFloat = 1.0


class LabelStudioConf(_Block):
    image_url_prefix: str


class Export(_Block):
    """``export.build.plan_site`` and ``export.interop`` settings."""

    cell_types: dict[Literal["mk", "hspc"], CropConf] = Field(min_length=1)
    page_size: int = Field(300, ge=1, le=5000)
    order: Literal["score", "slide", "random"] = "score"
    seed: int = 0
    image_format: Literal["webp", "jpeg"] = "webp"
    quality: int = Field(70, ge=1, le=100)
    normalise_percentiles: list[Annotated[float, Field(ge=0, le=100)]] = Field(
        [1.0, 99.5], min_length=2, max_length=2
    )
    threads: Count = 2  # tile workers (conf/base/parameters_export.yml)
    qupath: QuPathConf = QuPathConf()
    label_studio: LabelStudioConf

    @field_validator("normalise_percentiles")
    @classmethod
    def _low_below_high(cls, bounds: list[float]) -> list[float]:
        if not bounds[0] < bounds[1]:
            raise ValueError("should be [low, high] with low < high")
        return bounds


class Annotate(_Block):
    """``kedro annotate`` defaults (command-line options override them)."""

    host: str = "127.0.0.1"
    port: int = Field(8765, ge=0, le=65535)
    max_body_bytes: int = Field(65536, ge=1024)
    max_import_bytes: int = Field(50_000_000, ge=1024)


# -------------------------------------------------------------------------------------- classification
class EstimatorConf(_Block):
    """A scikit-learn classifier: its import path (``sklearn.*`` only) and keyword arguments."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)
    class_: str = Field(alias="class", pattern=r"^sklearn\.[A-Za-z0-9_.]+$")
    params: dict[str, Any] = {}


class ClassifierConf(_Block):
    cell_type: str
    registered_model: str = Field(min_length=1)


class Gates(_Block):
    """Judged on held-out slides: each metric must reach its value; ``min_labels_per_class`` counts labels.

    ``min_labels_per_class``: the fewest ``yes`` and the fewest ``no`` labels a model may be validated on,
    so that a handful of lucky labels (5 cells, 100% accuracy by chance) can never pass the other gates.
    """

    accuracy: Fraction = 0.75
    precision: Fraction = 0.70
    recall: Fraction = 0.70
    min_labels_per_class: Count = 20


class MlflowConf(_Block):
    tracking_uri: str
    artifact_location: str
    experiment: str = Field(min_length=1)


class ActiveLearning(_Block):
    batch_size: Count = 50
    min_distance_um: NonNegativeFloat = 15.0


class Train(_Block):
    feature_set: Literal["morphology", "all"] = "morphology"
    estimator: str
    estimators: dict[str, EstimatorConf] = Field(min_length=1)
    cv_splits: int = Field(5, ge=2)
    decision_threshold: Fraction = 0.5
    gates: Gates = Gates()
    classifiers: dict[str, ClassifierConf] = Field(min_length=1)
    mlflow: MlflowConf
    active_learning: ActiveLearning = ActiveLearning()

    @field_validator("classifiers")
    @classmethod
    def _namespace_is_cell_type(cls, classifiers: dict[str, ClassifierConf]) -> dict[str, ClassifierConf]:
        wrong = [name for name, conf in classifiers.items() if conf.cell_type != name]
        if wrong:
            raise ValueError(f"each classifier's cell_type must equal its key (namespace): {wrong}")
        return classifiers

    @model_validator(mode="after")
    def _estimator_is_configured(self) -> Train:
        if self.estimator not in self.estimators:
            raise ValueError(f"estimator {self.estimator!r} is not a key of train.estimators")
        return self


class SimulatedAnnotator(_Block):
    radius_um: dict[str, PositiveFloat] = Field(min_length=1)
    n_per_type: Count | None = None
    seed: int = 0


class Parameters(_Block):
    """Every parameters block (``params:<block>`` in the pipelines)."""

    demo: Demo
    ingestion: Ingestion
    segmentation: Segmentation
    export: Export
    annotate: Annotate
    train: Train | None = None
    simulated_annotator: SimulatedAnnotator | None = None


# ------------------------------------------------------------------------------------------ validation
def validate_parameters(params: Mapping[str, Any]) -> None:
    """Check the merged parameters against the schema and the chosen plugins' constructors.

    Raises:
        ParameterError: listing every problem as ``dotted.key: what is wrong``, e.g.
            ``ingestion.tiles.tile_px: input should be a valid integer, got 2999.5``.
    """
    errors: list[ErrorDetails] = []
    try:
        Parameters.model_validate(dict(params))
    except ValidationError as exc:
        errors = exc.errors()
    problems = [problem for error in errors for problem in _describe(error)]
    # The plugins are checked once the blocks that choose them are well formed.
    plugin_blocks = {("segmentation", "segmenters"), ("segmentation", "features")}
    if not any(error["loc"] == ("segmentation",) or error["loc"][:2] in plugin_blocks for error in errors):
        # Imported here: engine.plugins raises this module's ParameterError.
        from mk_hspc.engine.plugins import plugin_problems

        problems += plugin_problems(params["segmentation"])
    if problems:
        raise ParameterError(problems)


def _describe(error: ErrorDetails) -> list[str]:
    key = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        model = _model_at(error["loc"][:-1])
        return [f"{key}: unknown key" + (f"; allowed: {', '.join(model.model_fields)}" if model else "")]
    if error["type"] == UNKNOWN_KEYS:
        allowed = ", ".join(error["ctx"]["allowed"])
        return [f"{key}.{name}: unknown key; allowed: {allowed}" for name in error["ctx"]["unknown"]]
    if error["type"] == "missing":
        return [f"{key}: missing"]
    if error["type"] == "model_type":
        return [f"{key}: input should be a mapping of keys, got {_shown(error['input'])}"]
    message = error["msg"].removeprefix("Value error, ")
    return [f"{key}: {message[:1].lower()}{message[1:]}, got {_shown(error['input'])}"]


def _shown(value: Any) -> str:
    shown = repr(value)
    return shown if len(shown) <= MAX_SHOWN_CHARS else shown[: MAX_SHOWN_CHARS - 3] + "..."


def _model_at(loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The model that validates the mapping at ``loc`` (for the allowed keys of an unknown one)."""
    annotation: Any = Parameters
    for part in loc:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if part not in annotation.model_fields:
                return None
            annotation = annotation.model_fields[part].annotation
        elif get_origin(annotation) is dict:
            annotation = get_args(annotation)[1]
        else:
            return None
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
