"""The MLflow client and experiment every step logs to, built from Settings."""

from __future__ import annotations

from typing import TYPE_CHECKING

from components.settings import Settings

if TYPE_CHECKING:
    from mlflow import MlflowClient


def client(settings: Settings) -> MlflowClient:
    """An MLflow client whose tracking and registry URIs are the settings' (no global state)."""
    from mlflow import MlflowClient

    if settings.tracking_uri.startswith("sqlite:"):
        from components.locks import hold

        settings.ensure_home()
        # The client creates and migrates a fresh SQLite store on first use, which is not safe
        # when several processes (parallel trainings, DAG tasks) open a new home at once.
        with hold(settings.home, "mlflow-store", what="the MLflow store's set-up"):
            return MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.tracking_uri)
    return MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.tracking_uri)


def experiment_id(client: MlflowClient, settings: Settings) -> str:
    """Id of ``settings.experiment_name``, created on first use.

    Artifacts go under the settings' artifact root for a local store; against a tracking
    server with no artifact root set, the server picks the location (its artifact proxy).
    """
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(settings.experiment_name)
    if found is not None:
        return found.experiment_id
    local_store = not settings.tracking_uri.startswith(("http://", "https://", "databricks"))
    location = settings.mlflow_artifact_uri or (settings.artifact_uri if local_store else None)
    try:
        return client.create_experiment(settings.experiment_name, artifact_location=location)
    except MlflowException:  # created concurrently by another step: use theirs
        found = client.get_experiment_by_name(settings.experiment_name)
        if found is None:
            raise
        return found.experiment_id
