"""MLflow for the classifiers: one run per trained model, the registry, and loading that never unpickles.

Tracking and registry share one SQLite store inside the project (``train.mlflow.tracking_uri``, a relative
``sqlite:///`` path is taken from the project folder) with artifacts beside it. A run records parameters,
class counts, gate metrics, pass/fail with each gate's margin, the validation plots and the model (MLflow's
``skops`` serialization, with its signature). Only a passing model is registered, and it gets the alias
``validated``.

Loading (:func:`load_validated_model`) goes through the registry's ``validated`` alias only, and keeps
``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false`` (which also makes ``mlflow.sklearn.load_model`` refuse skops,
because a model's skops trust list is read from the model itself). Instead the project checks that the
version's run passed its gates, that the file is the skops file whose sha256 was recorded at training time
(a swapped or edited file is refused) and that every type beyond skops' safe defaults is one of
``REVIEWED_TYPES``; then ``skops.io.load`` loads it with that project-side trust list.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from mk_hspc.errors import UserError

PICKLE_ENV = "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"
VALIDATED_ALIAS = "validated"
SHA_TAG = "model_sha256"
SKOPS_FILE = "model.skops"
# Types beyond skops' defaults that our estimators need (tree storage of the forests and boosting models).
# skops warns that a crafted Tree can index out of bounds; the sha256 check makes sure the file loaded is
# byte for byte the one this project trained.
REVIEWED_TYPES = (
    "sklearn.tree._tree.Tree",
    "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
)


def forbid_pickle() -> None:
    """The project-wide setting: MLflow never unpickles (set by ``settings.py`` and before every load)."""
    os.environ[PICKLE_ENV] = "false"


forbid_pickle()


# The run parameter holding the tile store's ``params_hash`` of the training features.
SEGMENTATION_PARAM = "segmentation_params_hash"
# The run tag naming the registered model a training run was for (passed or not).
REGISTERED_MODEL_TAG = "registered_model"


class ModelNotValidatedError(UserError, RuntimeError):
    """No model passed its validation gates (or the registered one cannot be trusted)."""


@dataclass(frozen=True)
class Store:
    tracking_uri: str
    artifact_location: str
    experiment: str


def resolve_store(mlflow_conf: Mapping[str, Any], project_path: str | Path | None = None) -> Store:
    """Absolute tracking URI and artifact folder from ``train.mlflow`` (relative to the project folder)."""
    root = Path(project_path or Path.cwd()).resolve()
    uri = str(mlflow_conf["tracking_uri"])
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        db = root / uri.removeprefix("sqlite:///")
        db.parent.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{db}"
    artifacts = Path(str(mlflow_conf["artifact_location"]))
    artifacts = artifacts if artifacts.is_absolute() else root / artifacts
    return Store(uri, artifacts.as_uri(), str(mlflow_conf["experiment"]))


def _client(store: Store) -> Any:
    import mlflow

    mlflow.set_tracking_uri(store.tracking_uri)
    mlflow.set_registry_uri(store.tracking_uri)
    return mlflow.MlflowClient(tracking_uri=store.tracking_uri, registry_uri=store.tracking_uri)


def _experiment_id(client: Any, store: Store) -> str:
    experiment = client.get_experiment_by_name(store.experiment)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(store.experiment, artifact_location=store.artifact_location)


def sha256_file(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def log_training_run(
    store: Store,
    *,
    run_name: str,
    registered_model: str,
    params: Mapping[str, Any],
    counts: Mapping[str, float],
    validation: Mapping[str, Any],
    figure: Any,
    artifacts: Mapping[str, Any],
    model: Any | None,
    example: pd.DataFrame | None,
) -> dict[str, Any]:
    """One MLflow run for one trained classifier; registers it (alias ``validated``) only when it passed.

    Returns:
        A report: run id, passed, failing gates, registered model and version (None when not registered).
    """
    import mlflow
    from mlflow.models import infer_signature

    client = _client(store)
    passed = bool(validation["passed"])
    report: dict[str, Any] = {
        "tracking_uri": store.tracking_uri,
        "registered_model": registered_model,
        "passed": passed,
        "failing": list(validation["failing"]),
        "gates": validation["gates"],
        "version": None,
    }
    with mlflow.start_run(experiment_id=_experiment_id(client, store), run_name=run_name) as run:
        report["run_id"] = run.info.run_id
        mlflow.log_params({k: _param(v) for k, v in params.items()})
        mlflow.log_metrics({k: float(v) for k, v in counts.items()})
        mlflow.log_metrics({k: float(v) for k, v in validation["metrics"].items()})
        for name, gate in validation["gates"].items():
            mlflow.log_metric(f"gate_{name}_margin", float(gate["margin"]))
        mlflow.set_tags(
            {
                REGISTERED_MODEL_TAG: registered_model,
                "passed": str(passed).lower(),
                "failing_gates": ",".join(
                    f"{g} ({validation['gates'][g]['value']:.3f} < {validation['gates'][g]['threshold']:.2f}, "
                    f"margin {validation['gates'][g]['margin']:+.3f})"
                    for g in validation["failing"]
                )
                or "none",
            }
        )
        mlflow.log_figure(figure, "validation.png")
        for name, payload in artifacts.items():
            mlflow.log_dict(payload, name)
        if model is None:
            return report
        signature = (
            infer_signature(example, model.predict_proba(example)[:, 1]) if example is not None else None
        )
        options = {
            "serialization_format": "skops",
            "skops_trusted_types": list(REVIEWED_TYPES),
            # Stated, not inferred: inference re-imports the model in a subprocess (slow, and it unpickles).
            "pip_requirements": [f"scikit-learn=={_version('scikit-learn')}", f"skops=={_version('skops')}"],
        }
        info = mlflow.sklearn.log_model(model, name="model", signature=signature, **options)
        # The digest of the stored file itself (skops archives are not byte-reproducible across dumps).
        stored = Path(mlflow.artifacts.download_artifacts(artifact_uri=info.model_uri))
        sha = sha256_file(stored / SKOPS_FILE)
        mlflow.set_tag(SHA_TAG, sha)
        report["model_uri"] = info.model_uri
        report["model_sha256"] = sha
    if passed:
        version = mlflow.register_model(info.model_uri, registered_model, tags={SHA_TAG: sha})
        client.set_registered_model_alias(registered_model, VALIDATED_ALIAS, version.version)
        report["version"] = int(version.version)
    return report


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def _param(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if isinstance(value, Mapping | list | tuple) else str(value)
    return text[:6000]


@dataclass
class LoadedModel:
    model: Any
    registered_model: str
    version: int
    run_id: str
    feature_names: list[str]
    sha256: str
    # out-of-fold rates of its training run at the decision threshold on held-out tiles of the labelled slides
    # (held-out slides for older runs): the adjusted counts' inputs
    recall: float = float("nan")
    false_positive_rate: float = float("nan")
    # what the gates judged: the decision threshold, and the segmentation (tile store ``params_hash``) that
    # made the training features; None for a run that did not record it
    decision_threshold: float | None = None
    segmentation_params_hash: str | None = None

    def check_applicable(self, decision_threshold: float, segmentation_params_hash: str) -> None:
        """Refuse to apply the model where its validation does not hold.

        Its gates, recall and false-positive rate were measured at its training run's decision threshold on
        features of one segmentation (plugins, parameters, code): another threshold is a working point no
        gate judged, and other segmentation parameters give other candidates and feature values under the
        same column names.

        Raises:
            ModelNotValidatedError: naming both values and what to do.
        """
        where = f"{self.registered_model} version {self.version} (MLflow run {self.run_id})"
        if self.decision_threshold is None or self.segmentation_params_hash is None:
            raise ModelNotValidatedError(
                f"{where} does not record the decision threshold and the segmentation it was validated with "
                "(trained by an older version); run `kedro run --pipelines train` again"
            )
        if abs(float(decision_threshold) - self.decision_threshold) > 1e-9:
            raise ModelNotValidatedError(
                f"{where} passed its gates at decision threshold {self.decision_threshold:g}, but "
                f"train.decision_threshold is {float(decision_threshold):g}: no gate judged that working "
                f"point (and the adjusted counts use the rates at {self.decision_threshold:g}); set it back "
                "or retrain at the new threshold"
            )
        if segmentation_params_hash != self.segmentation_params_hash:
            raise ModelNotValidatedError(
                f"{where} was trained on features of segmentation {self.segmentation_params_hash}, but the "
                f"tiles to classify were segmented with other parameters or code ({segmentation_params_hash}); "
                "label and train on candidates of the current segmentation (`kedro run`, then "
                "`--pipelines train`) or restore its parameters"
            )


def newer_failed_run(store: Store, registered_model: str, validated_run_id: str) -> dict[str, str] | None:
    """The latest training run for ``registered_model`` when it failed its gates after the validated one
    (so the full run would apply an older model than the labels now support), else None.

    Returns:
        ``{"run_id", "failing_gates", "started"}`` of that run.
    """
    client = _client(store)
    experiment = client.get_experiment_by_name(store.experiment)
    if experiment is None:
        return None
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.{REGISTERED_MODEL_TAG} = '{registered_model}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs or runs[0].info.run_id == validated_run_id or runs[0].data.tags.get("passed") == "true":
        return None
    latest = runs[0]
    started = time.strftime("%Y-%m-%d %H:%M", time.localtime(latest.info.start_time / 1000))
    return {
        "run_id": latest.info.run_id,
        "failing_gates": latest.data.tags.get("failing_gates", ""),
        "started": started,
    }


def load_validated_model(store: Store, registered_model: str) -> LoadedModel:
    """The registered version with alias ``validated``, loaded without unpickling.

    Raises:
        ModelNotValidatedError: no validated version (no passing training run), its run did not pass, the
            file is not the skops file recorded at training (a pickle, an edited or swapped file), or it
            would instantiate types outside scikit-learn/NumPy.
    """
    import mlflow
    import skops.io
    from mlflow.exceptions import MlflowException

    forbid_pickle()
    client = _client(store)
    try:
        version = client.get_model_version_by_alias(registered_model, VALIDATED_ALIAS)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise  # the store itself failed (locked, corrupt, another schema): not a missing model
        raise ModelNotValidatedError(
            f"no model {registered_model!r} has passed its validation gates (no '{VALIDATED_ALIAS}' version in "
            f"{store.tracking_uri}); run `kedro run --pipelines train` with more or better labels and check "
            "the failing gate in its MLflow run"
        ) from None
    where = f"{registered_model} version {version.version}"
    run = client.get_run(version.run_id)
    if run.data.tags.get("passed") != "true":
        raise ModelNotValidatedError(f"{where}: its training run {version.run_id} did not pass its gates")
    expected_sha = version.tags.get(SHA_TAG)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=version.source))
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    flavor = (mlmodel.get("flavors") or {}).get("sklearn") or {}
    if flavor.get("serialization_format") != "skops" or flavor.get("pickled_model") != SKOPS_FILE:
        raise ModelNotValidatedError(
            f"{where}: the model is stored as {flavor.get('serialization_format')!r}, not skops; "
            "refusing to load it (pickled models are never loaded)"
        )
    path = local / SKOPS_FILE
    sha = sha256_file(path)
    if not expected_sha or sha != expected_sha:
        raise ModelNotValidatedError(
            f"{where}: {path} is not the file recorded at training (sha256 {sha[:12]} != {str(expected_sha)[:12]}); "
            "it was replaced or edited, refusing to load it"
        )
    try:
        untrusted = skops.io.get_untrusted_types(file=path)
    except Exception as exc:
        raise ModelNotValidatedError(
            f"{where}: {path} is not a readable skops file ({type(exc).__name__}: {exc})"
        ) from exc
    foreign = [t for t in untrusted if t not in REVIEWED_TYPES]
    if foreign:
        raise ModelNotValidatedError(
            f"{where}: {path} would instantiate unreviewed types {foreign}; refusing"
        )
    model = skops.io.load(path, trusted=untrusted)
    signature = mlmodel.get("signature") or {}
    inputs = json.loads(signature.get("inputs") or "[]")
    return LoadedModel(
        model,
        registered_model,
        int(version.version),
        version.run_id,
        [c["name"] for c in inputs],
        sha,
        # The rates where the model is applied (other tiles of the labelled slides); a run from before they
        # were measured has the held-out-slide ones only.
        recall=float(
            run.data.metrics.get("recall_within_slides", run.data.metrics.get("recall", float("nan")))
        ),
        false_positive_rate=float(
            run.data.metrics.get(
                "false_positive_rate_within_slides", run.data.metrics.get("false_positive_rate", float("nan"))
            )
        ),
        decision_threshold=(
            float(run.data.params["decision_threshold"]) if "decision_threshold" in run.data.params else None
        ),
        segmentation_params_hash=run.data.params.get(SEGMENTATION_PARAM),
    )
