"""feedback_loop: feedback since the watermark → retrain policy → feedback build → validate → asset update.

On a schedule (``FLYWHEEL_FEEDBACK_INTERVAL_MINUTES``, default 15). When the retrain policy
(``components.feedback.RetrainPolicy``; override fields with the ``policy`` param) does not fire,
``decide`` is skipped with its reasons and the watermark stays, so the rows wait for the next
run. When it fires, the builder merges the rows into a new snapshot, the data suite validates
it, ``publish`` updates the SFT dataset asset (which starts ``training_pipeline``; the event's
``extra`` names the snapshot, the replay set and how to train: the retrain policy's
``continue_from`` and ``retrain`` fields), and only then ``commit`` advances the durable
watermark (compare-and-set): a run that fails anywhere before skips no feedback.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from typing import Any

from airflow.sdk import Asset, Param, dag, get_current_context, task

# The same asset training_pipeline is scheduled on (tests/dags check they are equal).
SFT_DATASET = Asset(name="flywheel_sft_dataset", uri="flywheel://datasets/sft", group="flywheel")
# Read from the environment at parse time (cheap); Settings is built in the tasks only.
INTERVAL = timedelta(minutes=int(os.environ.get("FLYWHEEL_FEEDBACK_INTERVAL_MINUTES", "15")))


def _settings():
    from components.settings import Settings

    return Settings()


def _policy():
    from components.feedback import RetrainPolicy

    return RetrainPolicy(**get_current_context()["params"]["policy"])


def _run_time() -> datetime:
    # The run's own time, so a re-run of a task judges and stamps the same as the first try.
    return get_current_context()["dag_run"].run_after or datetime.now(UTC)


@dag(
    dag_id="feedback_loop",
    schedule=INTERVAL,
    start_date=datetime(2026, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,
    tags=["flywheel", "feedback"],
    default_args={"owner": "flywheel", "retries": 1, "retry_delay": timedelta(seconds=30)},
    params={"policy": Param({}, type="object", description="RetrainPolicy fields; {}: the defaults.")},
    doc_md=__doc__,
)
def feedback_loop() -> None:
    @task
    def decide() -> dict[str, Any]:
        """Read the feedback since the watermark; skipped (with the reasons) when the policy does not fire."""
        from airflow.sdk.exceptions import AirflowSkipException

        from components import pipeline

        decision = pipeline.retrain_due(_settings(), _policy(), now=_run_time())
        if not decision.fire:
            raise AirflowSkipException(f"no retrain: {'; '.join(decision.reasons)}")
        return decision.model_dump(mode="json")

    @task
    def build(decision: dict[str, Any]) -> dict[str, Any]:
        """Merge the rows (watermark_from, watermark_to] into a new snapshot (idempotent)."""
        from components import pipeline

        built = pipeline.build_feedback_dataset(
            _settings(), _policy(), decision["watermark_from"], decision["watermark_to"]
        )
        return built.model_dump(mode="json")

    @task(retries=0)
    def validate(built: dict[str, Any]) -> dict[str, Any]:
        """The same data suite as training: a rejected build fails here and the watermark stays."""
        import logging

        from airflow.sdk.exceptions import AirflowFailException

        from components import pipeline
        from components.validate import DataValidationError

        try:
            return pipeline.validate(_settings(), built["dataset"]["sha256"]).model_dump(mode="json")
        except DataValidationError as exc:
            message = f"REJECTED feedback build {built['dataset']['sha256'][:12]}: {exc}"
            logging.getLogger("flywheel.dags").error(message)
            raise AirflowFailException(message) from None

    @task(outlets=[SFT_DATASET])
    def publish(built: dict[str, Any], report: dict[str, Any]) -> dict[str, Any]:
        """Update the SFT dataset asset: training_pipeline starts on this snapshot."""
        replay = built.get("replay") or {}
        extra = {
            "sha256": built["dataset"]["sha256"],
            "uri": built["dataset"]["uri"],
            "parent": built["parent"],
            "replay_sha256": replay.get("sha256"),
            "replay_uri": replay.get("uri"),
            "feedback_rows": built["counts"]["used"],
            "validated": report["success"],
            # How training_pipeline trains on it: the champion fine-tuned further, by default.
            "init_from": _policy().continue_from,
            "train": _policy().retrain,
        }
        get_current_context()["outlet_events"][SFT_DATASET].extra = extra
        return extra

    @task
    def commit(built: dict[str, Any], published: dict[str, Any]) -> int:
        """Advance the watermark past the published rows (compare-and-set) and start the cooldown."""
        from components import pipeline
        from components.feedback import FeedbackBuild

        return pipeline.commit_feedback(_settings(), FeedbackBuild.model_validate(built), _run_time())

    built = build(decide())
    commit(built, publish(built, validate(built)))


feedback_loop()
