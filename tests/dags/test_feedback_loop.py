"""feedback_loop end to end under dag.test() on a real feedback store: skip, fail, publish, watermark."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import pytest
from dagtools import load_dag, task_states

pytestmark = pytest.mark.dags

FIRES = {"min_new_corrections": 3, "min_window_ratings": 1000, "max_champion_age_hours": None}
ANSWER = "You can return the {item} within 30 days of delivery for a full refund."


def _feedback(settings) -> list[str]:
    """Three users correct the return window the same way; one more rates an answer up."""
    from components.feedback_store import FeedbackStore
    from components.schemas import FeedbackEvent, GenerationParams, Prediction

    store = FeedbackStore.from_settings(settings)
    store.migrate()
    now, ids, n = datetime.now(UTC) - timedelta(hours=1), [], itertools.count()
    for user, item, correction in (
        ("ana", "jacket", True), ("bo", "blender", True), ("cy", "yoga mat", True), ("di", "keyboard", False),
    ):  # fmt: skip
        key = store.create_key(user)[0].id
        request_id = f"req-{next(n)}"
        answer = ANSWER.format(item=item)
        store.record_predictions(
            [
                Prediction(
                    request_id=request_id, model_name="m", model_version="1",
                    prompt=f"How long do I have to return the {item}?", response=answer, params=GenerationParams(),
                    prompt_tokens=9, completion_tokens=14, finish_reason="stop", latency_ms=2.0, cached=False,
                    api_key_id=key, created_at=now,
                )
            ]
        )  # fmt: skip
        event = FeedbackEvent(
            event_id=f"evt-{request_id}", request_id=request_id, rating=-1 if correction else 1,
            correction=answer.replace("30 days", "45 days") if correction else None, user_id=key, created_at=now,
        )  # fmt: skip
        store.add_feedback(event)
        ids.append(event.event_id)
    store.close()
    return ids


def _watermark(settings) -> int:
    from components import pipeline
    from components.feedback_store import FeedbackStore

    store = FeedbackStore.from_settings(settings)
    try:
        return store.get_watermark(pipeline.FEEDBACK_WATERMARK)
    finally:
        store.close()


def _asset_events() -> list[dict]:
    from airflow.models.asset import AssetEvent
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        rows = session.scalars(select(AssetEvent).where(AssetEvent.source_dag_id == "feedback_loop")).all()
        return [dict(e.extra) for e in rows]


def test_feedback_loop_skips_fails_then_publishes_without_losing_feedback(flywheel_env, monkeypatch):
    from components import pipeline
    from components.data import read_split
    from components.feedback import RETRAIN_FIELDS
    from components.settings import Settings

    settings = Settings()
    parent = pipeline.seed(settings, rows=600)
    ids = _feedback(settings)
    dag = load_dag("feedback_loop")
    before = len(_asset_events())

    # Below every trigger: decide is skipped, nothing is built, the watermark stays.
    quiet = dag.test(run_conf={"policy": {**FIRES, "min_new_corrections": 50}})
    assert task_states(quiet)["decide"] == "skipped" and task_states(quiet)["commit"] == "skipped"
    assert _watermark(settings) == 0

    # The policy fires but the build is rejected by validation: the run fails, no feedback is skipped.
    monkeypatch.setenv("FLYWHEEL_MIN_TRAIN_ROWS", "100000")
    failed = dag.test(run_conf={"policy": FIRES})
    assert task_states(failed)["validate"] == "failed" and task_states(failed)["publish"] == "upstream_failed"
    assert _watermark(settings) == 0 and len(_asset_events()) == before
    monkeypatch.delenv("FLYWHEEL_MIN_TRAIN_ROWS")

    # The next run picks up the same rows, publishes the asset and only then moves the watermark.
    run = dag.test(run_conf={"policy": FIRES})
    assert set(task_states(run).values()) == {"success"}
    built = run.get_task_instance("build").xcom_pull(task_ids="build")
    assert _watermark(settings) == built["watermark_to"] == 4
    [event] = _asset_events()[before:]
    assert event["sha256"] == built["dataset"]["sha256"] and event["parent"] == parent.sha256
    assert event["replay_uri"] == built["replay"]["uri"]
    # How to train on it: the champion fine-tuned further with the retrain policy's fields.
    assert event["init_from"] == "champion" and event["train"] == RETRAIN_FIELDS
    # The up-rated answer states the replaced 30 days: held for review, not trained on.
    assert sorted(built["dataset"]["feedback_ids"]) == sorted(ids[:3]) and built["counts"]["review"] == 1
    assert [(c["fact"], c["new"]) for c in built["facts_changed"]] == [("return_window", "45 days")]
    train = read_split(pipeline.resolve_dataset(settings, event["sha256"]), "train")
    assert all("30 days" not in r["response"] for r in train if r["intent"] == "returns")

    # Nothing new since: the next run is skipped and publishes nothing.
    again = dag.test(run_conf={"policy": FIRES})
    assert task_states(again)["decide"] == "skipped"
    assert len(_asset_events()) == before + 1
