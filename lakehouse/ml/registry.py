"""MLflow glue: the tracking store, the experiment, model logging and registration, the champion
gate, and reading back what a run pinned (:func:`run_snapshot`, :func:`pinned_versions`).

Store: ``Settings.mlflow_tracking_uri`` (default ``sqlite:///<repo>/mlruns/mlflow.db``;
``MLFLOW_TRACKING_URI`` overrides). The model registry uses the same URI. For a sqlite store the
experiment's artifacts go beside the database (``<db folder>/artifacts``), so everything stays under
``mlruns/``; another store (an MLflow server) keeps its own artifact root.

Champion gate: a new model version is compared with the version holding the ``champion`` alias on
the *candidate's* test window (the champion is loaded and scores the same rows). It takes the alias
only if its average precision is strictly higher (or there is no champion, or the champion cannot
be loaded). The decision and its reason are logged on the run and the model version as tags.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from urllib.parse import urlparse

from lakehouse.config import Settings

MODEL_NAME = "lakehouse-fraud"
EXPERIMENT = "lakehouse-fraud"
CHAMPION = "champion"
#: Artifact of each training run with what scoring needs besides the model.
REFERENCE_ARTIFACT = "scoring/reference.json"

log = logging.getLogger(__name__)


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, else None."""
    if not uri.startswith("sqlite:"):
        return None
    path = urlparse(uri).path
    return Path(path) if path else None


def artifact_location(uri: str) -> str | None:
    db = sqlite_path(uri)
    return (db.parent / "artifacts").resolve().as_uri() if db else None


def connect(settings: Settings):
    """Point MLflow (tracking and registry) at the settings' store; returns an MlflowClient."""
    import mlflow
    from mlflow import MlflowClient

    uri = settings.mlflow_tracking_uri
    db = sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def ensure_experiment(client, settings: Settings, name: str = EXPERIMENT) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location(settings.mlflow_tracking_uri))


def champion_version(client, name: str = MODEL_NAME):
    """The ModelVersion holding the champion alias, or None (no model or no alias yet)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def decide(candidate_ap: float, champion_ap: float | None, champion_label: str = "champion") -> tuple[bool, str]:
    """Promote only if the candidate beats the champion on the same test window."""
    if champion_ap is None:
        return True, "no champion yet"
    if candidate_ap is None or math.isnan(candidate_ap):
        return False, "candidate average precision is undefined on this test window"
    if math.isnan(champion_ap) or candidate_ap > champion_ap:
        return True, (f"candidate AP {candidate_ap:.4f} > {champion_label} AP {champion_ap:.4f} "
                      "on the same test window")
    return False, (f"candidate AP {candidate_ap:.4f} <= {champion_label} AP {champion_ap:.4f} "
                   "on the same test window")


def load_model(name: str, version: str):
    import mlflow.sklearn

    return mlflow.sklearn.load_model(f"models:/{name}/{version}")


def load_reference(settings: Settings, run_id: str) -> dict:
    """The scoring reference (threshold, feature medians) logged by training run ``run_id``."""
    import mlflow.artifacts

    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=REFERENCE_ARTIFACT,
                                               tracking_uri=settings.mlflow_tracking_uri)
    return json.loads(Path(path).read_text())


def run_snapshot(client, run_id: str) -> dict:
    """What training run ``run_id`` read: Delta versions of the features and labels, the split and the
    dataset hashes (its params), so that the same training set can be rebuilt."""
    from mlflow.exceptions import MlflowException

    try:
        params = client.get_run(run_id).data.params
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise ValueError(f"--as-of-run {run_id!r}: no such run in the MLflow store; the run ids are in "
                         "`lakehouse ui` (experiment lakehouse-fraud) or in the output of `lakehouse train`") from None
    if "features_version" not in params:
        raise ValueError(f"--as-of-run {run_id!r} is not a `lakehouse train` run (it logged no snapshot)")
    labels = params.get("labels_version", "none")
    return {
        "features_version": int(params["features_version"]),
        "labels_version": None if labels == "none" else int(labels),
        "anchor_date": params.get("test_end"),
        "train_days": int(params["train_days"]), "gap_days": int(params["gap_days"]),
        "test_days": int(params["test_days"]),
        "train_hash": params.get("train_hash"), "test_hash": params.get("test_hash"),
    }


def pinned_versions(settings: Settings, name: str = MODEL_NAME) -> dict[str, int]:
    """Oldest Delta version per table that a registered model version still needs (its training
    snapshot), e.g. ``{"gold_transaction_features": 12, "silver_labels": 7}``, so that maintenance
    (VACUUM) keeps them readable. Empty when there is no store or no registered model yet; a sqlite
    store that does not exist is not created."""
    db = sqlite_path(settings.mlflow_tracking_uri)
    if db is not None and not db.exists():
        return {}
    from mlflow.exceptions import MlflowException

    client = connect(settings)
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return {}
    pins: dict[str, int] = {}
    for mv in versions:
        try:
            snap = run_snapshot(client, mv.run_id)
        except (MlflowException, KeyError, ValueError):
            continue
        for table, key in (("gold_transaction_features", "features_version"), ("silver_labels", "labels_version")):
            if snap[key] is not None:
                pins[table] = min(pins.get(table, snap[key]), snap[key])
    return pins
