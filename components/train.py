"""Distributed fine-tuning as a transaction: Ray Train runs the loop of ``components.trainloop``; MLflow tracks it.

The driver (whoever calls :func:`train`) holds a lock on the params hash, returns an earlier
finished run of the same params and data when there is one, else opens (or reopens, after a
crash) one MLflow run, starts a Ray Train ``TorchTrainer`` whose workers run
:func:`components.trainloop.run_worker` and log into that run (rank 0 only, also after a
restart), then logs the loss curve, the dataset lineage and the fine-tuned model
(safetensors) into the same run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import signal
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from components.errors import InvalidInput
from components.schemas import DatasetRef, TrainParams, TrainResult
from components.tracking import client as tracking_client
from components.tracking import experiment_id

if TYPE_CHECKING:  # heavy imports stay inside functions
    import torch
    from mlflow import MlflowClient
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from components.settings import Settings
    from components.trainloop import StepHook

log = logging.getLogger(__name__)

MODEL_ARTIFACT = "model"
LOSS_CURVE_ARTIFACT = "plots/loss_curve.png"
# Next to a run's checkpoints: who trains it (PID, start time, host, local Ray session).
OWNER_FILE = "owner.json"
# Run tags: the whole TrainResult of a finished run (what a re-run returns), and the owner.
TAG_RESULT = "flywheel.train_result"
TAG_PID = "flywheel.pid"
TAG_PID_STARTED = "flywheel.pid_started"
TAG_HOST = "flywheel.host"
TAG_RAY_SESSION = "flywheel.ray_session"
# AF_UNIX socket paths are limited to 107 bytes; Ray puts
# "<temp_dir>/session_<date>_<time>_<usec>_<pid>/sockets/plasma_store" (~64 bytes after temp_dir) there.
_MAX_RAY_TEMP_DIR = 40
# Ray's start-up fails on non-ASCII temp dirs (an ``ascii`` codec error) and its command lines
# split on spaces: anything outside these characters gets a stand-in under /tmp.
_RAY_SAFE_PATH = re.compile(r"^[A-Za-z0-9._/-]+$")


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
    on_step: StepHook | None = None,
    lock_timeout: float | None = None,
) -> TrainResult:
    """Fine-tune the base model on a dataset snapshot, once per (params, data): one MLflow run.

    A transaction: training of one params hash is serialized by a lock under the home; a
    FINISHED run with the same params hash and dataset returns its result (``reused=True``)
    without training; a run of them left FAILED or KILLED (or RUNNING by a process that is gone,
    see :func:`reap_stale`) is reopened and resumes from its last checkpoint. So a retry, a
    re-run after a crash and a second command started at the same time all end in one run.

    With ``use_ray`` (default) the loop runs as a Ray Train ``TorchTrainer`` with
    ``params.workers`` DDP workers, checkpointing to ``settings.runs_dir`` and restarting from
    the last checkpoint after a worker failure (up to ``params.max_failures``; a failure loses
    the steps since the last checkpoint Ray registered, which it does within ~2 s). Local Ray is
    started (and stopped again, with a watchdog that stops it if this process dies) unless Ray
    is already initialized or ``settings.ray_address`` is set. Without Ray the same loop runs in
    this process. Ctrl-C or SIGTERM marks the run KILLED and re-raises ``KeyboardInterrupt``.

    Args:
        ref: dataset snapshot; its ``train`` split trains, its ``eval`` split scores.
        params: hyper-parameters and scaling (checked by :func:`check_fits` first).
        settings: tracking URI, experiment, storage folders, base model, Ray address.
        progress: called with ``{"step", "loss", "max_steps", ...}`` as training advances
            (polled from the MLflow run when training runs on Ray workers).
        use_ray: False runs the loop in this process (still logs to MLflow).
        on_step: called as ``on_step(step, session)`` in every worker before each step (tests
            inject faults with it; it must be picklable for Ray).
        lock_timeout: seconds to wait for another process training the same params hash;
            None waits until it is done.

    Returns:
        The run's record. ``model_uri`` is the MLflow 3 logged-model URI (``models:/m-…``),
        which ``mlflow.artifacts.download_artifacts``, ``mlflow.register_model`` and the
        flavor loaders accept; ``runs:/<run_id>/model`` resolves to the same model.

    Raises:
        InvalidInput: the params do not fit the data or this machine (nothing was started).
        Conflict: another process still trained the same params after ``lock_timeout``.
        KeyboardInterrupt: interrupted (Ctrl-C or SIGTERM); the run is marked KILLED.
    """
    import mlflow

    from components.locks import hold

    settings.ensure_home()
    base_model = params.base_model or settings.base_model_ref
    check_fits(params, ref, settings, use_ray=use_ray)
    p_hash = params_hash(params, base_model, ref.sha256)
    mlflow.set_tracking_uri(settings.tracking_uri)
    client = tracking_client(settings)
    exp_id = experiment_id(client, settings)
    with hold(settings.home, f"train-{p_hash}", timeout=lock_timeout, what=f"training {p_hash[:12]}"):
        reap_stale(settings)
        done = _finished_result(client, exp_id, p_hash, ref.sha256)
        if done is not None:
            log.info(
                "params %s already trained on %s: run %s reused", p_hash[:12], ref.sha256[:12], done.run_id
            )
            if progress is not None:
                progress(
                    {
                        "step": done.steps,
                        "loss": done.metrics.get("train_loss"),
                        "max_steps": params.max_steps,
                    }
                )
            return done
        run_id = _open_run(client, exp_id, ref, base_model, p_hash, use_ray, params)
        with _sigterm_raises_interrupt():
            return _train_run(
                client, run_id, ref, params, settings, base_model, p_hash, progress, use_ray, on_step
            )


def reap_stale(settings: Settings) -> list[str]:
    """Clean up after training commands that died: their runs marked FAILED, their local Ray killed.

    A run counts as stale when its owner (the PID and start time recorded in its tags and in
    ``<runs_dir>/<run>/owner.json``) was on this host and is gone. What its local Ray session
    left running (agents reparented to init, workers) is killed. Runs on other hosts, and runs
    whose process still runs, are left alone.

    Args:
        settings: home (runs folder), tracking URI and experiment.

    Returns:
        Run ids marked FAILED.
    """
    from components import procs

    reaped: list[str] = []
    client = tracking_client(settings)
    for owner_file in sorted(settings.runs_dir.glob(f"*/{OWNER_FILE}")):
        record = procs.read_record(owner_file)
        if record is None or procs.is_alive(record):
            continue
        if record.get("ray_session_dir"):
            procs.kill_session(record["ray_session_dir"], record.get("ray_pids", []))
        if record.get("run_id") and _mark_failed(client, record["run_id"], record):
            reaped.append(record["run_id"])
        owner_file.unlink(missing_ok=True)
    experiment = client.get_experiment_by_name(settings.experiment_name)
    if experiment is not None:
        # Runs whose owner file is gone (another home, a cleaned runs folder): their tags say who ran them.
        running = client.search_runs(
            [experiment.experiment_id],
            f"attributes.status = 'RUNNING' and tags.`{TAG_HOST}` = '{_quote(socket.gethostname())}'",
        )
        for run in running:
            tags = run.data.tags
            owner = {
                "pid": tags.get(TAG_PID),
                "started": tags.get(TAG_PID_STARTED),
                "host": tags.get(TAG_HOST),
            }
            if owner["pid"] and not procs.is_alive(owner) and _mark_failed(client, run.info.run_id, owner):
                reaped.append(run.info.run_id)
    return reaped


def check_fits(
    params: TrainParams,
    ref: DatasetRef,
    settings: Settings,
    *,
    use_ray: bool = True,
    available_bytes: int | None = None,
) -> None:
    """Refuse params that the data or this machine cannot hold, before anything starts.

    Checked: the train split exists and has a micro-batch of rows for every worker; workers
    fit the local cores (or GPUs); ``max_seq_len`` fits the base model's context; the
    estimated memory of a local run (weights, gradients, AdamW state, and per row the logits
    ``max_seq_len × vocab`` and layer activations) fits the available RAM. Machine limits are
    not checked when ``settings.ray_address`` names a cluster.

    Args:
        params: the hyper-parameters to check.
        ref: the dataset snapshot to train on.
        settings: base model and Ray address.
        use_ray: whether ``params.workers`` processes will train (False: one process).
        available_bytes: memory to fit in; default: available RAM (psutil) now.

    Raises:
        InvalidInput: with one clause per limit exceeded, each saying what fits.
    """
    problems = []
    workers = params.workers if use_ray else 1
    rows = _train_rows(ref)
    if rows < params.batch_size * workers:
        fits = rows // workers
        problems.append(
            f"batch_size {params.batch_size} x {workers} worker(s) needs {params.batch_size * workers} rows "
            f"per step but the train split has {rows}: "
            + (f"use batch_size <= {fits}" if fits else f"use at most {rows} worker(s)")
        )
    local = use_ray and not settings.ray_address
    if local:
        problems += _worker_problems(params)
    shape = _model_shape(params.base_model or settings.base_model_ref)
    if shape is not None:
        context = shape.get("context")
        if context and params.max_seq_len > context:
            problems.append(
                f"max_seq_len {params.max_seq_len} exceeds the base model's context: use <= {context}"
            )
        if not settings.ray_address and not params.use_gpu:
            problems += _memory_problems(params, shape, workers, available_bytes)
    if problems:
        raise InvalidInput("training parameters do not fit: " + "; ".join(problems))


# Limits ------------------------------------------------------------------------------------


def _train_rows(ref: DatasetRef) -> int:
    """Rows of the snapshot's train split, read on the driver (a missing split is an error, not 0)."""
    from components.uris import to_path

    try:
        file = to_path(ref.uri) / "train.jsonl"
    except ValueError:
        return ref.splits.get("train", 0)  # a remote snapshot: trust its record
    if not file.is_file():
        raise InvalidInput(
            f"{file} does not exist: the dataset snapshot {ref.sha256[:12]} has no train split"
        )
    with file.open("rb") as fh:
        rows = sum(1 for line in fh if line.strip())
    if rows == 0:
        raise InvalidInput(f"{file} is empty: nothing to train on")
    return rows


def _worker_problems(params: TrainParams) -> list[str]:
    """Workers beyond what this machine runs side by side (twice its cores, or one per GPU)."""
    if params.use_gpu:
        import torch

        gpus = torch.cuda.device_count()
        if params.workers > gpus:
            return [
                f"workers {params.workers} > {gpus} GPU(s) on this machine: use workers <= {max(gpus, 1)}"
            ]
        return []
    cores = os.cpu_count() or 1
    if params.workers > 2 * cores:
        return [
            f"workers {params.workers} > {2 * cores} (twice the {cores} CPU cores here): use workers <= {cores}, "
            "or set FLYWHEEL_RAY_ADDRESS to train on a cluster"
        ]
    return []


def _model_shape(base_model: str) -> dict[str, int] | None:
    """Parameter count, vocabulary, width, depth, heads and context of a local base model (None: unknown)."""
    folder = Path(base_model)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None

    def _first(*keys: str) -> int:
        return next((int(config[k]) for k in keys if isinstance(config.get(k), int)), 0)

    n_params = 0
    for file in folder.glob("*.safetensors"):
        # The header (8-byte length + JSON) lists every tensor's shape: exact, without loading it.
        with file.open("rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        n_params += sum(math.prod(t["shape"]) for k, t in header.items() if k != "__metadata__")
    return {
        "params": n_params,
        "vocab": _first("vocab_size"),
        "hidden": _first("n_embd", "hidden_size", "d_model"),
        "layers": _first("n_layer", "num_hidden_layers"),
        "heads": _first("n_head", "num_attention_heads"),
        "context": _first("n_positions", "max_position_embeddings"),
    }


def _memory_problems(
    params: TrainParams, shape: Mapping[str, int], workers: int, available: int | None
) -> list[str]:
    """Estimated training memory against the available RAM, and the batch size that fits."""
    import psutil

    available = psutil.virtual_memory().available if available is None else available
    t, v, h, layers, heads = (
        params.max_seq_len,
        shape["vocab"],
        shape["hidden"],
        shape["layers"],
        shape["heads"],
    )
    # fp32 weights + gradients + two AdamW moments; LoRA trains (and keeps state for) few weights.
    state = shape["params"] * 4 * (4 if params.lora is None else 1.2)
    # Per row padded to max_seq_len (the worst case): logits, their fp32 log-softmax and gradient;
    # per layer ~16 hidden-wide activations and the attention scores with their softmax. Measured
    # on the default tiny GPT-2 at 256 tokens: 14.5 MB per row; this estimate: 14 MB.
    per_row = 4 * (3 * t * v + layers * (16 * t * h + 2 * heads * t * t))
    overhead = 512 * 2**20  # interpreter, torch and tokenizer per process
    need = workers * (state + overhead + params.batch_size * per_row)
    if need <= available:
        return []
    fits = int((available / workers - state - overhead) // per_row)
    gib = 2**30
    return [
        f"batch_size {params.batch_size} x max_seq_len {t} x vocab {v} on {workers} worker(s) needs about "
        f"{need / gib:.1f} GiB but {available / gib:.1f} GiB is available: "
        + (
            f"use batch_size <= {fits} (or a shorter max_seq_len)"
            if fits >= 1
            else "use fewer workers or a shorter max_seq_len"
        )
    ]


# Driver: the run as a transaction ----------------------------------------------------------


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


def _finished_result(client: MlflowClient, exp_id: str, p_hash: str, dataset_sha: str) -> TrainResult | None:
    """The result of the earliest FINISHED run of these params on this dataset, if any."""
    runs = client.search_runs(
        [exp_id],
        f"tags.params_hash = '{p_hash}' and tags.`dataset.sha256` = '{dataset_sha}' "
        "and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time ASC"],
    )
    for run in runs:
        blob = run.data.tags.get(TAG_RESULT)
        if blob:
            return TrainResult.model_validate({**json.loads(blob), "reused": True})
    return None


def _open_run(
    client: MlflowClient,
    exp_id: str,
    ref: DatasetRef,
    base_model: str,
    p_hash: str,
    use_ray: bool,
    params: TrainParams,
) -> str:
    """Reopen the latest failed or killed run of these params and data, else create a run."""
    runs = client.search_runs(
        [exp_id],
        f"tags.params_hash = '{p_hash}' and tags.`dataset.sha256` = '{ref.sha256}'",
        order_by=["attributes.start_time DESC"],
    )
    unfinished = [r for r in runs if r.info.status in ("FAILED", "KILLED")]
    if unfinished:
        run = unfinished[0]
        client.update_run(run.info.run_id, status="RUNNING")
        client.set_tag(run.info.run_id, "flywheel.runner", _runner(use_ray, params))
        log.info(
            "reopening %s run %s of params %s to resume it", run.info.status, run.info.run_id, p_hash[:12]
        )
        return run.info.run_id
    run = client.create_run(
        exp_id,
        run_name=f"train-{ref.sha256[:8]}-{p_hash[:8]}",
        tags=_run_tags(ref, base_model, p_hash, use_ray, params),
    )
    _log_params(client, run.info.run_id, params, base_model)
    return run.info.run_id


def _train_run(
    client: MlflowClient,
    run_id: str,
    ref: DatasetRef,
    params: TrainParams,
    settings: Settings,
    base_model: str,
    p_hash: str,
    progress: Callable[[dict], None] | None,
    use_ray: bool,
    on_step: StepHook | None,
) -> TrainResult:
    """Train into the open run (resuming its checkpoints), log the outputs and finish it."""
    import mlflow

    # One folder per MLflow run: a reopened run finds its checkpoints (Ray restores the run
    # folder it finds under the same name; the plain loop resumes its latest checkpoint_*).
    run_name = f"train-{p_hash[:8]}-{run_id[:8]}"
    owner = _Owner(client, run_id, settings.runs_dir / run_name)
    log.info("training run %s (mlflow run %s), %d steps on %s", run_name, run_id, params.max_steps, ref.uri)
    try:
        with _progress_poller(client, run_id, params.max_steps, progress if use_ray else None):
            if use_ray:
                outcome = _fit_on_ray(ref, params, settings, base_model, run_id, run_name, owner, on_step)
            else:
                outcome = _fit_here(ref, params, settings, base_model, run_id, run_name, progress, on_step)
        # log_model links the model to the active run; nested: a caller's own active run is fine.
        with mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None):
            model_info = _log_outputs(client, run_id, ref, outcome)
            result = TrainResult(
                run_id=run_id,
                model_uri=model_info.model_uri,
                checkpoint_uri=outcome["checkpoint_uri"],
                dataset_sha256=ref.sha256,
                dataset_uri=ref.uri,
                params_hash=p_hash,
                steps=outcome["steps"],
                metrics=outcome["metrics"],
            )
            # Written before the run is FINISHED: a finished run always says what it produced.
            client.set_tag(run_id, TAG_RESULT, json.dumps(result.model_dump(mode="python")))
    except BaseException as exc:
        status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
        try:
            client.set_terminated(run_id, status=status)
        except Exception:  # the original error matters more than this one
            log.warning("could not mark run %s %s", run_id, status, exc_info=True)
        raise
    finally:
        owner.release()
    log.info("run %s done: %s", run_id, {k: round(v, 4) for k, v in result.metrics.items()})
    return result


class _Owner:
    """This process as the owner of a run: MLflow tags and ``owner.json`` in the run folder."""

    def __init__(self, client: MlflowClient, run_id: str, run_dir: Path) -> None:
        from components import procs

        self.path = run_dir / OWNER_FILE
        self.client = client
        self.run_id = run_id
        self.record: dict[str, Any] = {"run_id": run_id, **procs.current_owner()}
        client.log_batch(run_id, tags=self._tags())
        procs.write_record(self.path, self.record)

    def _tags(self) -> list:
        from mlflow.entities import RunTag

        values = {
            TAG_PID: self.record["pid"],
            TAG_PID_STARTED: self.record["started"],
            TAG_HOST: self.record["host"],
        }
        if self.record.get("ray_session_dir"):
            values[TAG_RAY_SESSION] = self.record["ray_session_dir"]
        return [RunTag(k, str(v)) for k, v in values.items()]

    def started_ray(self, temp_dir: Path, session_dir: str, pids: list[tuple[int, float]]) -> None:
        """Record the local Ray session this process started (what a reaper kills if it dies)."""
        from components import procs

        self.record.update(ray_temp_dir=str(temp_dir), ray_session_dir=session_dir, ray_pids=pids)
        procs.write_record(self.path, self.record)
        self.client.log_batch(self.run_id, tags=self._tags())

    def release(self) -> None:
        """The run is finished, failed or killed on purpose: nothing for a reaper to do."""
        self.path.unlink(missing_ok=True)


def _mark_failed(client: MlflowClient, run_id: str, owner: Mapping[str, Any]) -> bool:
    """Mark a RUNNING run whose owner is gone FAILED; False if it is not RUNNING (any more)."""
    from mlflow.exceptions import MlflowException

    try:
        if client.get_run(run_id).info.status != "RUNNING":
            return False
        client.set_tag(
            run_id, "flywheel.reaped", f"owner pid {owner.get('pid')} on {owner.get('host')} is gone"
        )
        client.set_terminated(run_id, status="FAILED")
    except MlflowException:
        log.warning("could not mark stale run %s failed", run_id, exc_info=True)
        return False
    log.warning("run %s: its training process %s is gone; marked FAILED", run_id, owner.get("pid"))
    return True


def _sigterm_to_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def _sigterm_raises_interrupt() -> Iterator[None]:
    """SIGTERM ends training like Ctrl-C does (run KILLED, Ray shut down) instead of killing us on the spot."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) not in (
        signal.SIG_DFL,
        None,
    ):
        yield  # someone else handles SIGTERM here (a server, Ray's own driver handler)
        return
    previous = signal.signal(signal.SIGTERM, _sigterm_to_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# Driver: MLflow run setup ------------------------------------------------------------------


def _runner(use_ray: bool, params: TrainParams) -> str:
    return f"ray-train x{params.workers}" if use_ray else "in-process"


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
        "flywheel.runner": _runner(use_ray, params),
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
    on_step: StepHook | None,
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
            on_step=on_step,
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
    ref: DatasetRef,
    params: TrainParams,
    settings: Settings,
    base_model: str,
    run_id: str,
    run_name: str,
    owner: _Owner,
    on_step: StepHook | None,
) -> dict[str, Any]:
    """The loop on Ray Train workers; the model comes back through the final checkpoint.

    The run folder is named after the MLflow run, so a reopened run's Ray Train restores the
    checkpoints its earlier attempt registered there.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from components.base_model import load_model
    from components.trainloop import EXPORT_DIR, worker_config
    from components.uris import to_path

    # A path, never a (percent-encoded) file:// URI: workers open it as a folder.
    config = worker_config(to_path(ref.uri), params, base_model, export=True, on_step=on_step)
    config.update({"tracking_uri": settings.tracking_uri, "run_id": run_id})
    with _ray_session(settings, params.workers, owner):
        trainer = TorchTrainer(
            _train_loop_per_worker,
            train_loop_config=config,
            scaling_config=ScalingConfig(num_workers=params.workers, use_gpu=params.use_gpu),
            run_config=RunConfig(
                name=run_name,
                storage_path=str(settings.runs_dir),
                failure_config=FailureConfig(max_failures=params.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=2),
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
def _ray_session(settings: Settings, workers: int, owner: _Owner | None = None) -> Iterator[None]:
    """Use the caller's Ray if initialized; else connect to ``ray_address`` or start local Ray.

    Ray started here is shut down on exit; Ray the caller started is left running. Local Ray
    is recorded on ``owner`` and watched: if this process dies, its watchdog kills the Ray
    processes that would outlive it (Ray's agents are not fate-shared with the driver).
    """
    import ray

    if ray.is_initialized():
        yield
        return
    sigterm = signal.getsignal(signal.SIGTERM)
    watchdog = None
    if settings.ray_address:
        ray.init(address=settings.ray_address)
    else:
        watchdog = _start_local_ray(settings, workers, owner)
    if sigterm is not None and threading.current_thread() is threading.main_thread():
        # ray.init replaces the SIGTERM handler with a bare sys.exit: keep the one that cleans up.
        signal.signal(signal.SIGTERM, sigterm)
    try:
        yield
    finally:
        ray.shutdown()
        if watchdog is not None:
            from components.procs import stop_watchdog

            stop_watchdog(watchdog)


def _start_local_ray(settings: Settings, workers: int, owner: _Owner | None) -> Any:
    """Start local Ray under the home and its watchdog; returns the watchdog process."""
    import ray

    from components import procs

    # Local Ray: no token auth (it would write ~/.ray/auth_token), no dashboard.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    cores = os.cpu_count() or 1
    temp_dir = ray_temp_dir(settings)
    ray.init(
        num_cpus=max(cores, workers),  # oversubscribe rather than hang when workers > cores
        include_dashboard=False,
        _temp_dir=str(temp_dir),
        # Worker chatter would break the CLI's progress bar; it stays in the session logs,
        # and a failing worker's traceback still reaches us through trainer.fit().
        log_to_driver=False,
    )
    session_dir = ray._private.worker._global_node.get_session_dir_path()
    watchdog = procs.start_watchdog(session_dir)
    if owner is not None:
        owner.started_ray(temp_dir, session_dir, [p for p in procs.descendants() if p[0] != watchdog.pid])
    log.info("local Ray started; worker logs under %s/logs", session_dir)
    return watchdog


def ray_temp_dir(settings: Settings) -> Path:
    """``settings.ray_dir``, or a short stand-in under /tmp when Ray cannot use that path.

    Ray's Unix socket paths live under the temp dir and must stay under 107 bytes, so a deep
    home (e.g. a pytest tmp folder) would overflow them; a non-ASCII letter makes its start-up
    fail and a space splits its command lines. Those homes get a short folder named after them.
    """
    wanted = settings.ray_dir
    if len(str(wanted)) <= _MAX_RAY_TEMP_DIR and _RAY_SAFE_PATH.match(str(wanted)):
        wanted.mkdir(parents=True, exist_ok=True)
        return wanted
    short = Path("/tmp") / f"flywheel-ray-{hashlib.sha256(str(wanted).encode()).hexdigest()[:10]}"
    short.mkdir(parents=True, exist_ok=True)
    log.info("ray temp dir %s is too long or not plain ASCII for Ray; using %s", wanted, short)
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
