"""Training through the Ray Jobs API of a real local Ray head: submit, follow, read the result back, fail clearly."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from components import jobs
from components.errors import FlywheelError
from components.schemas import DatasetRef, TrainParams
from tests.conftest import free_port

# A job that trains 2 steps of the tiny base model in its own process (no Ray Train inside).
TINY = TrainParams(
    max_steps=2,
    batch_size=2,
    workers=1,
    warmup_steps=0,
    max_seq_len=64,
    eval_every=0,
    eval_examples=4,
    checkpoint_every=2,
    max_failures=0,
)
# Every wait on the head is bounded: a hung job fails the test instead of the CI job.
JOB_TIMEOUT_S = 180


@pytest.mark.unit
@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("http://127.0.0.1:8265", True),
        ("https://ray-head.flywheel.svc:8265/", True),
        ("HTTP://head:8265", True),
        ("ray://head:10001", False),
        ("auto", False),
        ("127.0.0.1:6390", False),
        ("", False),
        (None, False),
    ],
)
def test_is_jobs_address(address: str | None, expected: bool) -> None:
    assert jobs.is_jobs_address(address) is expected


@pytest.fixture(scope="module")
def cluster_settings(tmp_path_factory: pytest.TempPathFactory, base_model_dir: Path, ray_jobs_url: str):
    """Settings whose Ray address is the local head's Jobs API; home shared with the head (same machine)."""
    from components.settings import Settings

    home = tmp_path_factory.mktemp("jobs") / "home"
    return Settings(home=home, base_model=str(base_model_dir), ray_address=ray_jobs_url, _env_file=None)


@pytest.fixture(scope="module")
def tiny_ref(cluster_settings) -> DatasetRef:
    from components.data import generate_corpus, snapshot

    return snapshot(generate_corpus(rows=600), cluster_settings.datasets_dir)


def _jobs_of(settings, ref: DatasetRef, params: TrainParams) -> dict[str, str]:
    from ray.job_submission import JobSubmissionClient

    prefix = jobs.submission_prefix(ref, params, settings)
    listed = JobSubmissionClient(settings.ray_address).list_jobs()
    return {j.submission_id: str(j.status) for j in listed if (j.submission_id or "").startswith(prefix)}


@pytest.mark.integration
def test_submit_train_runs_the_cli_as_a_job_and_reads_its_result(cluster_settings, tiny_ref) -> None:
    from mlflow import MlflowClient

    lines: list[str] = []
    result = jobs.submit_train(
        tiny_ref,
        TINY,
        cluster_settings,
        use_ray=False,
        timeout_s=JOB_TIMEOUT_S,
        on_log=lines.append,
        poll_s=0.5,
    )

    assert result.dataset_sha256 == tiny_ref.sha256
    assert result.steps == TINY.max_steps
    assert result.model_uri
    run = MlflowClient(cluster_settings.tracking_uri).get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["dataset.sha256"] == tiny_ref.sha256
    assert run.data.tags["params_hash"] == result.params_hash
    assert any(result.run_id in line for line in lines), "the job's output reached on_log"
    assert list(_jobs_of(cluster_settings, tiny_ref, TINY).values()) == ["SUCCEEDED"]

    # A retried task attaches to the finished job for the same training: same run, no second job.
    again = jobs.submit_train(tiny_ref, TINY, cluster_settings, use_ray=False, timeout_s=JOB_TIMEOUT_S)
    assert again == result
    assert len(_jobs_of(cluster_settings, tiny_ref, TINY)) == 1
    # With the job's logs gone, the same record comes from the MLflow run tagged for this training.
    from_mlflow = jobs._result_from_mlflow(tiny_ref, TINY, cluster_settings)
    assert from_mlflow is not None
    assert (from_mlflow.run_id, from_mlflow.model_uri, from_mlflow.steps) == (
        result.run_id,
        result.model_uri,
        result.steps,
    )


@pytest.mark.integration
def test_a_failing_job_raises_with_its_own_message(cluster_settings, tiny_ref) -> None:
    missing_sha = "0" * 64
    missing = tiny_ref.model_copy(
        update={"sha256": missing_sha, "uri": (cluster_settings.datasets_dir / missing_sha).as_uri()}
    )

    with pytest.raises(jobs.JobFailed) as failure:
        jobs.submit_train(missing, TINY, cluster_settings, use_ray=False, timeout_s=JOB_TIMEOUT_S, poll_s=0.5)

    assert isinstance(failure.value, FlywheelError)
    assert failure.value.exit_code == 2, "the job's usage error stays a usage error here"
    assert f"no dataset matches '{missing_sha}'" in str(failure.value)
    assert failure.value.submission_id.endswith("-a1")
    # The next try is a new attempt: a failed job is not attached to.
    with pytest.raises(jobs.JobFailed) as second:
        jobs.submit_train(missing, TINY, cluster_settings, use_ray=False, timeout_s=JOB_TIMEOUT_S, poll_s=0.5)
    assert second.value.submission_id.endswith("-a2")


@pytest.mark.integration
def test_a_job_past_its_timeout_is_stopped(cluster_settings, tiny_ref) -> None:
    from ray.job_submission import JobSubmissionClient

    params = TINY.model_copy(update={"max_steps": 50})

    with pytest.raises(jobs.JobTimeout) as timeout:
        jobs.submit_train(tiny_ref, params, cluster_settings, use_ray=False, timeout_s=1, poll_s=0.5)

    client = JobSubmissionClient(cluster_settings.ray_address)
    deadline = time.monotonic() + 30  # Ray ends a stopped job asynchronously
    while (
        not client.get_job_status(timeout.value.submission_id).is_terminal() and time.monotonic() < deadline
    ):
        time.sleep(0.5)
    assert str(client.get_job_status(timeout.value.submission_id)) == "STOPPED"


@pytest.mark.integration
def test_an_unreachable_jobs_api_is_a_named_error(settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        jobs, "_TRANSIENT_RETRY_S", 1.0
    )  # a starting head gets a minute; this one never starts
    unreachable = settings.model_copy(update={"ray_address": f"http://127.0.0.1:{free_port()}"})
    ref = DatasetRef(
        uri=(settings.datasets_dir / ("0" * 64)).as_uri(), sha256="0" * 64, rows=0, splits={}, created_at=0
    )

    with pytest.raises(jobs.ClusterUnavailable, match="does not answer"):
        jobs.submit_train(ref, TINY, unreachable, timeout_s=5)
