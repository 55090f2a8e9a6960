"""Training on a Ray cluster through the Ray Jobs API: submit ``flywheel train`` as a job, follow it, read its result.

When ``FLYWHEEL_RAY_ADDRESS`` is a Jobs API URL (``http(s)://head:8265``), the train step does not
train in this process: it submits the same ``flywheel train … --json`` command as a Ray job,
which runs on the cluster against the shared home (datasets, MLflow, base model), follows the
job's logs, and reads the :class:`TrainResult` back from the JSON the command prints (or, when
the logs are gone, from the MLflow run tagged with the params hash and dataset sha). No model or
data travels through the job: only a command line, environment variables and a params file in
the shared home.

The submission id is derived from what determines the training (params hash + dataset sha) plus
an attempt number, so a retried task attaches to the job already running (or done) for the same
training instead of starting a second one; only after a failed or stopped attempt does it submit
the next attempt.
"""

from __future__ import annotations

import json
import logging
import re
import shlex
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from components.errors import FlywheelError, UsageError
from components.schemas import DatasetRef, TrainParams, TrainResult

if TYPE_CHECKING:  # heavy imports stay inside functions
    from ray.job_submission import JobDetails, JobSubmissionClient

    from components.settings import Settings

log = logging.getLogger(__name__)

ENTRYPOINT = "flywheel"
"""The CLI on the cluster's image (the same package as here)."""

# Settings the job never needs; the token and the store URLs of serving stay on this side.
_NOT_FORWARDED = frozenset({"ray_address", "ray_token", "ray_job_timeout_s", "redis_url", "feedback_db_url"})
# Job log lines kept for an error message.
_TAIL_LINES = 40
# How long to retry a Jobs API that refuses connections or has no agent up yet (a starting head).
_TRANSIENT_RETRY_S = 60.0


class JobError(FlywheelError):
    """A training job on the Ray cluster did not produce a result; ``report`` holds its last log lines."""

    def __init__(
        self, message: str, *, submission_id: str, log_tail: list[str], exit_code: int | None = None
    ) -> None:
        tail = "\n".join(log_tail)
        super().__init__(
            f"{message}\n--- last job log lines ---\n{tail}" if tail else message, report=log_tail
        )
        self.submission_id = submission_id
        self.log_tail = log_tail
        if exit_code in (1, 2, 3):  # the job's own verdict (rejected data, bad input, gate) stays its own
            self.exit_code = exit_code


class JobFailed(JobError):
    """The job ran and failed (or was stopped); the message carries Ray's reason and the job's log tail."""


class JobTimeout(JobError):
    """The job ran past its time limit and was stopped."""


class ClusterUnavailable(FlywheelError):
    """The Ray Jobs API did not answer, or refused the token."""


# Public API --------------------------------------------------------------------------------


def is_jobs_address(address: str | None) -> bool:
    """Whether a Ray address is a Jobs API URL (train by submitting a job) rather than ``ray://`` or local Ray.

    Args:
        address: ``settings.ray_address``.

    Returns:
        True for ``http://…`` and ``https://…``; False for ``ray://…``, ``auto``, empty or None.
    """
    return bool(address) and urlparse(address.strip()).scheme.lower() in ("http", "https")


def submission_prefix(ref: DatasetRef, params: TrainParams, settings: Settings) -> str:
    """The stable part of a training job's submission id: dataset sha and params hash.

    Args:
        ref: the dataset to train on.
        params: hyper-parameters and scaling.
        settings: resolves the base model that the params hash covers.

    Returns:
        ``flywheel-train-<sha[:12]>-<params hash[:12]>``; attempts append ``-a<n>``.
    """
    from components.train import params_hash

    p_hash = params_hash(params, params.base_model or settings.base_model_ref, ref.sha256)
    return f"flywheel-train-{ref.sha256[:12]}-{p_hash[:12]}"


def submit_train(
    ref: DatasetRef,
    params: TrainParams,
    settings: Settings,
    *,
    use_ray: bool = True,
    timeout_s: float | None = None,
    on_log: Callable[[str], None] | None = None,
    poll_s: float = 2.0,
) -> TrainResult:
    """Train (and register) on the Ray cluster at ``settings.ray_address`` as a Ray job, and wait for it.

    The job runs ``flywheel train --dataset … --params … --json`` with this side's settings in
    its environment (``FLYWHEEL_HOME`` and the MLflow URIs must name storage the cluster
    shares). A job for the same training that is pending, running or done is attached to, not
    submitted again.

    Args:
        ref: the dataset to train on; its folder must be reachable from the cluster.
        params: hyper-parameters and scaling.
        settings: Jobs API URL (``ray_address``), token, and what the job needs.
        use_ray: True trains on the cluster's Ray Train workers; False trains inside the job's
            own process (one worker, no Ray Train).
        timeout_s: longest wait for the job; default ``settings.ray_job_timeout_s``. On
            timeout the job is stopped.
        on_log: called with each new line of the job's output; default: logged at INFO.
        poll_s: seconds between polls of the job's status and logs.

    Returns:
        The training run's record, as the job printed it.

    Raises:
        JobFailed: the job failed or was stopped (exit code 1/2/3 when the job's own command
            ended with one).
        JobTimeout: the job ran past ``timeout_s`` (it is stopped).
        ClusterUnavailable: the Jobs API did not answer or refused the token.
    """
    if not is_jobs_address(settings.ray_address):
        raise UsageError(f"ray_address {settings.ray_address!r} is not a Ray Jobs API URL")
    deadline = time.monotonic() + (settings.ray_job_timeout_s if timeout_s is None else timeout_s)
    client = _client(settings)
    prefix = submission_prefix(ref, params, settings)
    submission_id = _attach_or_submit(client, prefix, ref, params, settings, use_ray)
    details, logs, tail = _follow(client, submission_id, deadline, on_log or _log_line, poll_s)
    if details.status != "SUCCEEDED":
        raise JobFailed(
            f"training job {submission_id} {str(details.status).lower()}: {details.message or 'no message'}",
            submission_id=submission_id,
            log_tail=list(tail),
            exit_code=details.driver_exit_code,
        )
    result = _result_from_logs(logs) or _result_from_mlflow(ref, params, settings)
    if result is None:
        raise JobFailed(
            f"training job {submission_id} succeeded but printed no result and MLflow has no finished run",
            submission_id=submission_id,
            log_tail=list(tail),
        )
    if result.dataset_sha256 != ref.sha256:
        raise JobFailed(
            f"training job {submission_id} trained on dataset {result.dataset_sha256[:12]}, "
            f"not {ref.sha256[:12]}: the cluster sees other content at {ref.uri}",
            submission_id=submission_id,
            log_tail=list(tail),
        )
    log.info("training job %s: run %s, %d steps", submission_id, result.run_id, result.steps)
    return result


# Talking to the Jobs API -------------------------------------------------------------------


def _client(settings: Settings) -> JobSubmissionClient:
    from ray.job_submission import JobSubmissionClient

    headers = {}
    if settings.ray_token is not None:
        # Ray token auth reads "Authorization: Bearer <token>" (X-Ray-Authorization behind proxies).
        headers["Authorization"] = f"Bearer {settings.ray_token.get_secret_value()}"
    address = str(settings.ray_address).rstrip("/")
    try:
        return _call(JobSubmissionClient, address, headers=headers)
    except ClusterUnavailable:
        raise
    except ConnectionError as exc:
        raise ClusterUnavailable(f"Ray Jobs API at {address} does not answer: {exc}") from None


def _is_transient(exc: BaseException) -> bool:
    """A Jobs API that is starting (no agent yet, connection refused) answers later."""
    import requests

    if isinstance(exc, requests.ConnectionError | ConnectionError):
        return True
    return isinstance(exc, RuntimeError) and "No available agent" in str(exc)


def _call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """One Jobs API call, retried while the API is starting; a refused token is ClusterUnavailable."""
    from ray.exceptions import AuthenticationError
    from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_exponential

    retrying = Retrying(
        retry=retry_if_exception(_is_transient),
        stop=stop_after_delay(_TRANSIENT_RETRY_S),
        wait=wait_exponential(multiplier=0.5, max=5),
        reraise=True,
    )
    try:
        return retrying(fn, *args, **kwargs)
    except AuthenticationError as exc:
        raise ClusterUnavailable(f"Ray Jobs API refused the request: {str(exc).splitlines()[0]}") from None


def _attempt(submission_id: str | None, prefix: str) -> int:
    """The attempt number of one of this training's jobs; 0 for any other job."""
    match = re.fullmatch(re.escape(prefix) + r"-a(\d+)", submission_id or "")
    return int(match.group(1)) if match else 0


def _attach_or_submit(
    client: JobSubmissionClient,
    prefix: str,
    ref: DatasetRef,
    params: TrainParams,
    settings: Settings,
    use_ray: bool,
) -> str:
    """The submission id to follow: the live or succeeded attempt for this training, else a new one."""
    attempts = {
        job.submission_id: job
        for job in _call(client.list_jobs)
        if job.submission_id and _attempt(job.submission_id, prefix)
    }
    latest = max(attempts, key=lambda sid: _attempt(sid, prefix), default=None)
    if latest is not None and attempts[latest].status in ("PENDING", "RUNNING", "SUCCEEDED"):
        log.info("attaching to training job %s (%s)", latest, attempts[latest].status)
        return latest
    next_attempt = _attempt(latest, prefix) + 1 if latest is not None else 1
    submission_id = f"{prefix}-a{next_attempt}"
    entrypoint, env = _job_command(ref, params, settings, use_ray, prefix)
    try:
        _call(
            client.submit_job,
            entrypoint=entrypoint,
            submission_id=submission_id,
            runtime_env={"env_vars": env},
            metadata={"flywheel.step": "train", "flywheel.dataset_sha256": ref.sha256},
            # In-process training needs the job's own cores (and GPU); Ray Train workers reserve theirs.
            entrypoint_num_cpus=None if use_ray else 1,
            entrypoint_num_gpus=1 if params.use_gpu and not use_ray else None,
        )
    except RuntimeError as exc:
        if "already exists" not in str(exc):
            raise
        log.info("training job %s was submitted concurrently; attaching to it", submission_id)
    else:
        log.info("submitted training job %s: %s", submission_id, entrypoint)
    return submission_id


def _job_command(
    ref: DatasetRef, params: TrainParams, settings: Settings, use_ray: bool, prefix: str
) -> tuple[str, dict[str, str]]:
    """The job's entrypoint and environment: settings travel as env vars, params inline as JSON."""
    from components.data import dataset_path

    folder = dataset_path(ref)
    # A standard snapshot is named by its sha in the home's datasets folder, which the cluster
    # shares: pass the sha (the job re-checks the content); any other dataset by its path.
    dataset = ref.sha256 if folder == settings.datasets_dir / ref.sha256 else str(folder)
    argv = [ENTRYPOINT, "train", "--dataset", dataset, "--params-json", params.model_dump_json(), "--json"]
    argv.append("--ray" if use_ray else "--no-ray")
    return shlex.join(argv), _job_env(settings)


def _job_env(settings: Settings) -> dict[str, str]:
    """``FLYWHEEL_*`` variables that make the job's Settings match this side's (no token, no serving stores)."""
    env: dict[str, str] = {}
    for name, value in settings.model_dump(mode="json").items():
        if name in _NOT_FORWARDED or value is None:
            continue
        env[f"FLYWHEEL_{name.upper()}"] = value if isinstance(value, str) else json.dumps(value)
    # Inside a job, Ray Train must join the job's own cluster ("auto"), never submit another job.
    env["FLYWHEEL_RAY_ADDRESS"] = "auto"
    return env


def _follow(
    client: JobSubmissionClient,
    submission_id: str,
    deadline: float,
    on_log: Callable[[str], None],
    poll_s: float,
) -> tuple[JobDetails, str, deque[str]]:
    """Poll the job until it ends, passing each new log line on; stop it at the deadline.

    Returns:
        The job's final details, its whole log and the last lines of it.
    """
    tail: deque[str] = deque(maxlen=_TAIL_LINES)
    seen = 0  # characters of the log already passed on (Ray's job log only grows)
    while True:
        details = _call(client.get_job_info, submission_id)
        done = details.status in ("SUCCEEDED", "FAILED", "STOPPED")
        logs = _call(client.get_job_logs, submission_id)  # after the status: complete once done
        # Pass on whole lines only, until the job is done and its last line is whole too.
        end = len(logs) if done else logs.rfind("\n", seen) + 1
        if end > seen:
            for line in logs[seen:end].splitlines():
                tail.append(line)
                on_log(line)
            seen = end
        if done:
            return details, logs, tail
        if time.monotonic() >= deadline:
            _call(client.stop_job, submission_id)
            raise JobTimeout(
                f"training job {submission_id} ran past its time limit and was stopped",
                submission_id=submission_id,
                log_tail=list(tail),
            )
        time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))


def _log_line(line: str) -> None:
    log.info("[job] %s", line)


# Reading the result back -------------------------------------------------------------------


def _result_from_logs(logs: str) -> TrainResult | None:
    """The last JSON object with a ``run_id`` that the job printed (``flywheel train --json``)."""
    decoder = json.JSONDecoder()
    found = None
    for match in re.finditer(r"^\{", logs, flags=re.MULTILINE):
        try:
            payload, _ = decoder.raw_decode(logs, match.start())
        except json.JSONDecodeError:
            continue
        if isinstance(payload, dict) and "run_id" in payload:
            found = payload
    if found is None:
        return None
    return TrainResult.model_validate({k: v for k, v in found.items() if k in TrainResult.model_fields})


def _result_from_mlflow(ref: DatasetRef, params: TrainParams, settings: Settings) -> TrainResult | None:
    """The newest FINISHED run tagged with this training's params hash and dataset sha, if any."""
    from components.tracking import client as tracking_client
    from components.train import MODEL_ARTIFACT, params_hash

    p_hash = params_hash(params, params.base_model or settings.base_model_ref, ref.sha256)
    client = tracking_client(settings)
    experiment = client.get_experiment_by_name(settings.experiment_name)
    if experiment is None:
        return None
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.params_hash = '{p_hash}' and tags.`dataset.sha256` = '{ref.sha256}' "
        "and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        return None
    run = runs[0]
    models = client.search_logged_models(
        experiment_ids=[experiment.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'"
    )
    model_uri = models[0].model_uri if models else f"runs:/{run.info.run_id}/{MODEL_ARTIFACT}"
    metrics = {k.removeprefix("final_"): v for k, v in run.data.metrics.items() if k.startswith("final_")}
    history = client.get_metric_history(run.info.run_id, "train_loss")
    return TrainResult(
        run_id=run.info.run_id,
        model_uri=model_uri,
        dataset_sha256=ref.sha256,
        dataset_uri=ref.uri,
        params_hash=p_hash,
        steps=max((m.step for m in history), default=params.max_steps),
        metrics=metrics,
    )
