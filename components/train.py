"""Distributed fine-tuning: Ray Train orchestrates the loop of ``components.trainloop``; MLflow tracks it.

The driver (whoever calls :func:`train`) creates one MLflow run, starts a Ray Train
``TorchTrainer`` whose workers run :func:`components.trainloop.run_worker` and log into that
run (rank 0 only, also after a restart), then logs the loss curve, the dataset lineage and
the fine-tuned model (safetensors) into the same run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from components.schemas import DatasetRef, TrainParams, TrainResult
from components.tracking import client as tracking_client
from components.tracking import experiment_id

if TYPE_CHECKING:  # heavy imports stay inside functions
    import torch
    from mlflow import MlflowClient
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from components.settings import Settings

log = logging.getLogger(__name__)

MODEL_ARTIFACT = "model"
LOSS_CURVE_ARTIFACT = "plots/loss_curve.png"
# Env vars forwarded from the driver to Ray Train workers (the test-only fault hook).
_FORWARDED_ENV_PREFIX = "FLYWHEEL_TEST_"
# AF_UNIX socket paths are limited to 107 bytes; Ray puts
# "<temp_dir>/session_<date>_<time>_<usec>_<pid>/sockets/plasma_store" (~64 bytes after temp_dir) there.
_MAX_RAY_TEMP_DIR = 40


# Public API --------------------------------------------------------------------------------


def params_hash(params: TrainParams, base_model: str, dataset_sha256: str) -> str:
    """sha256 of the canonical JSON of what determines a run: params, base model, dataset content."""
    blob = json.dumps(
        {
            "params": params.model_dump(mode="json"),
            "base_model": base_model,
            "dataset_sha256": dataset_sha256,
        },
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def train(
    ref: DatasetRef,
    params: TrainParams,
    settings: Settings,
    progress: Callable[[dict], None] | None = None,
    *,
    use_ray: bool = True,
) -> TrainResult:
    """Fine-tune the base model on a dataset snapshot and log one MLflow run.

    With ``use_ray`` (default) the loop runs as a Ray Train ``TorchTrainer`` with
    ``params.workers`` DDP workers, checkpointing to ``settings.runs_dir`` and restarting from
    the last checkpoint after a worker failure (up to ``params.max_failures``; a failure loses
    the steps since the last checkpoint Ray registered, which it does within ~2 s). Local Ray is
    started (and stopped again) unless Ray is already initialized or ``settings.ray_address``
    is set. Without Ray the same loop runs in this process.

    Args:
        ref: dataset snapshot; its ``train`` split trains, its ``eval`` split scores.
        params: hyper-parameters and scaling.
        settings: tracking URI, experiment, storage folders, base model, Ray address.
        progress: called with ``{"step", "loss", "max_steps", ...}`` as training advances
            (polled from the MLflow run when training runs on Ray workers).
        use_ray: False runs the loop in this process (still logs to MLflow).

    Returns:
        The run's record. ``model_uri`` is the MLflow 3 logged-model URI (``models:/m-…``),
        which ``mlflow.artifacts.download_artifacts``, ``mlflow.register_model`` and the
        flavor loaders accept; ``runs:/<run_id>/model`` resolves to the same model.
    """
    import mlflow

    settings.ensure_home()
    base_model = params.base_model or settings.base_model_ref
    p_hash = params_hash(params, base_model, ref.sha256)
    mlflow.set_tracking_uri(settings.tracking_uri)
    client = tracking_client(settings)
    run = client.create_run(
        experiment_id(client, settings),
        run_name=f"train-{ref.sha256[:8]}-{p_hash[:8]}",
        tags=_run_tags(ref, base_model, p_hash, use_ray, params),
    )
    run_id = run.info.run_id
    run_name = f"train-{p_hash[:8]}-{run_id[:8]}"  # unique: Ray resumes a run folder it finds
    log.info("training run %s (mlflow run %s), %d steps on %s", run_name, run_id, params.max_steps, ref.uri)
    try:
        _log_params(client, run_id, params, base_model)
        with _progress_poller(client, run_id, params.max_steps, progress if use_ray else None):
            if use_ray:
                outcome = _fit_on_ray(ref, params, settings, base_model, run_id, run_name)
            else:
                outcome = _fit_here(ref, params, settings, base_model, run_id, run_name, progress)
        # log_model links the model to the active run; nested: a caller's own active run is fine.
        with mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None):
            model_info = _log_outputs(client, run_id, ref, outcome)
    except BaseException as exc:
        client.set_terminated(run_id, status="KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    metrics = outcome["metrics"]
    log.info("run %s done: %s", run_id, {k: round(v, 4) for k, v in metrics.items()})
    return TrainResult(
        run_id=run_id,
        model_uri=model_info.model_uri,
        checkpoint_uri=outcome["checkpoint_uri"],
        dataset_sha256=ref.sha256,
        dataset_uri=ref.uri,
        params_hash=p_hash,
        steps=outcome["steps"],
        metrics=metrics,
    )


# Driver: MLflow run setup ------------------------------------------------------------------


def _run_tags(
    ref: DatasetRef, base_model: str, p_hash: str, use_ray: bool, params: TrainParams
) -> dict[str, str]:
    return {
        "params_hash": p_hash,
        "dataset.sha256": ref.sha256,
        "dataset.uri": ref.uri,
        "dataset.rows": str(ref.rows),
        "dataset.policy_version": ref.policy_version or "",
        "base_model": base_model,
        "flywheel.step": "train",
        "flywheel.runner": f"ray-train x{params.workers}" if use_ray else "in-process",
    }


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _log_params(client: MlflowClient, run_id: str, params: TrainParams, base_model: str) -> None:
    from mlflow.entities import Param

    flat = _flatten(params.model_dump(mode="json"))
    flat["base_model"] = base_model  # the resolved model, not None
    client.log_batch(
        run_id, params=[Param(k, json.dumps(v) if isinstance(v, list) else str(v)) for k, v in flat.items()]
    )


class _MlflowLogger:
    """Buffers per-step metrics and writes them in batches (one SQLite write per flush, not per value)."""

    def __init__(self, tracking_uri: str, run_id: str, flush_seconds: float = 2.0) -> None:
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri)
        self.run_id = run_id
        self.flush_seconds = flush_seconds
        self._buffer: list = []
        self._flushed_at = time.monotonic()

    def __call__(self, record: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now_ms = int(time.time() * 1000)
        step = int(record["step"])
        for key, value in record.items():
            if key != "step" and value is not None and math.isfinite(value):
                self._buffer.append(Metric(key, float(value), now_ms, step))
        if "resumed_from_step" in record:
            self.client.set_tag(self.run_id, "resumed_from_step", str(step))
        if time.monotonic() - self._flushed_at >= self.flush_seconds or "eval_loss" in record:
            self.flush()

    def flush(self) -> None:
        """Write what is buffered (MLflow takes at most 1000 metrics per batch)."""
        while self._buffer:
            chunk, self._buffer = self._buffer[:1000], self._buffer[1000:]
            self.client.log_batch(self.run_id, metrics=chunk)
        self._flushed_at = time.monotonic()


@contextlib.contextmanager
def _progress_poller(
    client: MlflowClient, run_id: str, max_steps: int, progress: Callable[[dict], None] | None
) -> Iterator[None]:
    """Feed ``progress`` from the run's logged train loss while Ray workers train elsewhere."""
    if progress is None:
        yield
        return
    stop = threading.Event()

    def _poll() -> None:
        seen = 0
        while True:
            done = stop.wait(1.0)
            try:
                history = client.get_metric_history(run_id, "train_loss")
            except Exception:  # progress is best-effort; training must not fail on it
                log.debug("progress poll failed", exc_info=True)
                history = []
            for metric in sorted(history, key=lambda m: (m.step, m.timestamp)):
                if metric.step > seen:
                    seen = metric.step
                    progress({"step": metric.step, "loss": metric.value, "max_steps": max_steps})
            if done:
                return

    thread = threading.Thread(target=_poll, name="flywheel-train-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=30)


# Running the loop --------------------------------------------------------------------------


def _fit_here(
    ref: DatasetRef,
    params: TrainParams,
    settings: Settings,
    base_model: str,
    run_id: str,
    run_name: str,
    progress: Callable[[dict], None] | None,
) -> dict[str, Any]:
    """The loop in this process (no Ray), logging into the run."""
    from components.trainloop import fit

    logger = _MlflowLogger(settings.tracking_uri, run_id)
    try:
        result = fit(
            ref,
            params.model_copy(update={"base_model": base_model}),
            settings,
            progress,
            checkpoint_dir=settings.runs_dir / run_name,
            on_log=logger,
        )
    finally:
        logger.flush()
    return {
        "steps": result.steps,
        "metrics": result.metrics,
        "model": result.model,
        "tokenizer": result.tokenizer,
        "checkpoint_uri": str(result.checkpoint_dir) if result.checkpoint_dir else None,
    }


def _fit_on_ray(
    ref: DatasetRef, params: TrainParams, settings: Settings, base_model: str, run_id: str, run_name: str
) -> dict[str, Any]:
    """The loop on Ray Train workers; the model comes back through the final checkpoint."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from components.base_model import load_model
    from components.data import dataset_path
    from components.trainloop import EXPORT_DIR, worker_config

    config = worker_config(
        dataset_path(ref), params, base_model, export=True, fail_marker_dir=settings.runs_dir / run_name
    )
    config.update({"tracking_uri": settings.tracking_uri, "run_id": run_id})
    forwarded = {k: v for k, v in os.environ.items() if k.startswith(_FORWARDED_ENV_PREFIX)}
    with _ray_session(settings, params.workers):
        trainer = TorchTrainer(
            _train_loop_per_worker,
            train_loop_config=config,
            scaling_config=ScalingConfig(num_workers=params.workers, use_gpu=params.use_gpu),
            run_config=RunConfig(
                name=run_name,
                storage_path=str(settings.runs_dir),
                failure_config=FailureConfig(max_failures=params.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=2),
                worker_runtime_env={"env_vars": forwarded} if forwarded else None,
            ),
        )
        result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"Ray Train run {run_name} finished without a checkpoint")
    with result.checkpoint.as_directory() as folder:
        model, tokenizer = load_model(Path(folder) / EXPORT_DIR)
    metrics = {k: float(result.metrics[k]) for k in _RESULT_METRICS if k in result.metrics}
    return {
        "steps": int(result.metrics.get("step", params.max_steps)),
        "metrics": metrics,
        "model": model,
        "tokenizer": tokenizer,
        "checkpoint_uri": _checkpoint_uri(str(settings.runs_dir), result.checkpoint.path),
    }


_RESULT_METRICS = ("train_loss", "eval_loss", "base_eval_loss", "tokens_per_second", "train_seconds")


def _checkpoint_uri(storage_path: str, path: str) -> str:
    """Ray's checkpoint path, with the storage scheme put back (``s3://…``) when it has one."""
    if "://" in storage_path and "://" not in path:
        return f"{storage_path.split('://', 1)[0]}://{path}"
    return path


def _train_loop_per_worker(config: dict) -> None:
    """Ray Train worker entry point: the shared loop behind the Ray adapter, MLflow on rank 0."""
    from components.trainloop import run_worker

    session = _RaySession()
    logger = _MlflowLogger(config["tracking_uri"], config["run_id"]) if session.world_rank == 0 else None
    session.before_report = logger.flush if logger else None
    try:
        run_worker(config, session, logger)
    finally:
        if logger is not None:
            logger.flush()


class _RaySession:
    """The loop's adapter to Ray Train: ranks, device, DDP, checkpoint report/restore."""

    checkpointing = True

    def __init__(self) -> None:
        import ray.train

        context = ray.train.get_context()
        self.world_rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.local_world_size = context.get_local_world_size()
        self.before_report: Callable[[], None] | None = None

    def device(self, use_gpu: bool) -> torch.device:
        import ray.train.torch

        return ray.train.torch.get_device()

    def wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model, move_to_device=False)

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as folder:
            yield Path(folder)

    def report(self, metrics: Mapping[str, float], checkpoint_dir: Path | None) -> None:
        import ray.train

        if self.before_report is not None:
            # Every step up to this checkpoint is in MLflow before the checkpoint exists.
            self.before_report()
        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(dict(metrics), checkpoint=checkpoint)

    def wait_for_checkpoints(self) -> None:
        import ray.train

        ray.train.get_all_reported_checkpoints(
            consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED, timeout_s=120
        )


@contextlib.contextmanager
def _ray_session(settings: Settings, workers: int) -> Iterator[None]:
    """Use the caller's Ray if initialized; else connect to ``ray_address`` or start local Ray.

    Ray started here is shut down on exit; Ray the caller started is left running.
    """
    import ray

    if ray.is_initialized():
        yield
        return
    if settings.ray_address:
        ray.init(address=settings.ray_address)
    else:
        # Local Ray: no token auth (it would write ~/.ray/auth_token), no dashboard.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        cores = os.cpu_count() or 1
        temp_dir = _ray_temp_dir(settings)
        ray.init(
            num_cpus=max(cores, workers),  # oversubscribe rather than hang when workers > cores
            include_dashboard=False,
            _temp_dir=str(temp_dir),
            # Worker chatter would break the CLI's progress bar; it stays in the session logs,
            # and a failing worker's traceback still reaches us through trainer.fit().
            log_to_driver=False,
        )
        log.info("local Ray started; worker logs under %s/session_latest/logs", temp_dir)
    try:
        yield
    finally:
        ray.shutdown()


def _ray_temp_dir(settings: Settings) -> Path:
    """``settings.ray_dir``, or a short stand-in under /tmp when that path is too long for Ray's sockets."""
    wanted = settings.ray_dir
    if len(str(wanted)) <= _MAX_RAY_TEMP_DIR:
        wanted.mkdir(parents=True, exist_ok=True)
        return wanted
    # Ray's Unix socket paths live under the temp dir and must stay under 107 bytes: a deep
    # home (e.g. a pytest tmp folder) would overflow them, so use a short folder named after it.
    short = Path("/tmp") / f"flywheel-ray-{hashlib.sha256(str(wanted).encode()).hexdigest()[:10]}"
    short.mkdir(parents=True, exist_ok=True)
    log.info("ray temp dir %s is too long for Unix sockets; using %s", wanted, short)
    return short


# Driver: outputs ---------------------------------------------------------------------------


def _log_outputs(client: MlflowClient, run_id: str, ref: DatasetRef, outcome: Mapping[str, Any]) -> Any:
    """Summary metrics, loss curve, dataset lineage and the model, into the active run."""
    import mlflow

    summary = {k: v for k, v in outcome["metrics"].items() if math.isfinite(v)}
    mlflow.log_metrics({f"final_{k}": v for k, v in summary.items()})
    client.log_figure(run_id, _loss_curve(client, run_id), LOSS_CURVE_ARTIFACT)
    mlflow.log_input(_lineage_dataset(ref), context="training")
    return _log_model(outcome["model"], outcome["tokenizer"])


def _lineage_dataset(ref: DatasetRef) -> Any:
    """An ``mlflow.data`` dataset that points at the snapshot (metadata only, not its rows)."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    with warnings.catch_warnings():
        # MLflow registers the local-artifact source twice and warns that file:// is ambiguous.
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(ref.uri)
    # MLflow keeps dataset digests to 36 characters; the full sha256 is in the run's tags.
    return MetaDataset(source, name=f"support-{ref.sha256[:12]}", digest=ref.sha256[:32])


def _loss_curve(client: MlflowClient, run_id: str) -> Any:
    """Train loss per step, eval loss points and the base model's eval loss, as a figure."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    def _series(key: str) -> tuple[list[int], list[float]]:
        # After a restart some steps are logged twice: keep the latest value of each step.
        latest: dict[int, tuple[int, float]] = {}
        for m in client.get_metric_history(run_id, key):
            if m.step not in latest or m.timestamp >= latest[m.step][0]:
                latest[m.step] = (m.timestamp, m.value)
        steps = sorted(latest)
        return steps, [latest[s][1] for s in steps]

    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot()
    ax.plot(*_series("train_loss"), label="train loss", linewidth=1)
    eval_steps, eval_values = _series("eval_loss")
    if eval_steps:
        ax.plot(eval_steps, eval_values, "o-", label="eval loss")
    _, base = _series("base_eval_loss")
    if base:
        ax.axhline(base[-1], color="grey", linestyle="--", label="base model eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / target token)")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def _pip_requirements() -> list[str]:
    """Pinned versions of what loading the model needs (local suffixes such as +cpu dropped)."""
    from importlib.metadata import version

    def _pin(package: str) -> str:
        return f"{package}=={version(package).split('+')[0]}"

    return [_pin(p) for p in ("mlflow", "torch", "transformers", "tokenizers", "safetensors")]


def _log_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> Any:
    """Log the fine-tuned model (safetensors, with its tokenizer) into the active run."""
    import mlflow

    # Offline, MLflow's look-ups of a hub model card and license for a local folder only warn.
    hub_logger = logging.getLogger("mlflow.transformers")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)
    try:
        return mlflow.transformers.log_model(
            transformers_model={"model": model, "tokenizer": tokenizer},
            name=MODEL_ARTIFACT,
            task="text-generation",
            pip_requirements=_pip_requirements(),
            save_pretrained=True,
        )
    finally:
        hub_logger.setLevel(level)
