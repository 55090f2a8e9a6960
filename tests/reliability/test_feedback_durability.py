"""10,000 feedback events survive a kill -9 of the serving process: none acknowledged and lost, none twice.

``python -m serving`` runs as a process of its own on a fresh PostgreSQL database (the
production store). Clients send 10,000 feedback events, each with its own idempotency key
(``event_id``), on a few answers served first. Once a share of them is acknowledged, the whole
serving process tree is killed with SIGKILL (no shutdown handler runs, transactions in flight
are cut) and started again; the clients retry every event that got no acknowledgement, as an
at-least-once client must. Afterwards the database holds every event exactly once, and every
receipt a client got names the row that holds its event.
"""

from __future__ import annotations

import shutil
import time
import uuid

import httpx
import pytest
import sqlalchemy as sa

from serving.__main__ import ray_temp_dir
from tests.conftest import free_port
from tests.reliability.conftest import ServingProcess, create_key
from tests.reliability.loadgen import Load

pytestmark = [pytest.mark.reliability]

EVENTS = 10_000
WORKERS = 16
KILL_AFTER = 3_000  # acknowledged events before the kill
ANSWERS = 4  # completions the events rate
SEND_TIMEOUT_S = 240


def _retry_if(status: int) -> bool:
    # Not acknowledged: no answer, a server error, or the proxy's 404 before the app is routed.
    return status in (0, 404) or status >= 500


def _answer(http: httpx.Client, prompt: str) -> str:
    response = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 4})
    assert response.status_code == 200, response.text
    return response.json()["id"]


@pytest.fixture
def serving(tmp_path, tiny_model, pg_url, shared_redis_prefix):
    """The serving process on PostgreSQL and the machine's Redis (stopped afterwards, whatever happened)."""
    env = tiny_model.env() | {
        "FLYWHEEL_HOME": str(tmp_path / "home"),
        "FLYWHEEL_FEEDBACK_DB_URL": pg_url,
        "FLYWHEEL_REDIS_URL": "redis://127.0.0.1:6379/0",
        "FLYWHEEL_CACHE_PREFIX": shared_redis_prefix,
        "FLYWHEEL_RATE_LIMIT": "1000000/minute",
        "FLYWHEEL_RELOAD_POLL_S": "3600",
        "FLYWHEEL_PREDICTION_FLUSH_S": "0.2",
    }
    process = ServingProcess(env, free_port(), tmp_path / "serving.log")
    try:
        yield process
    finally:
        process.stop(graceful=False)  # what a clean stop would do is not what this test is about
        # A deep home gets a short Ray folder under /tmp (Unix socket paths): remove it too.
        shutil.rmtree(ray_temp_dir(tmp_path / "home"), ignore_errors=True)


def test_feedback_survives_a_kill_9_of_the_serving_process(serving, pg_url, figures):
    from components.feedback_store import FeedbackStore, feedback

    serving.start()
    key = create_key(pg_url)
    store = FeedbackStore(pg_url)
    auth = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=serving.url, headers=auth, timeout=60) as http:
        answers = [_answer(http, f"Where is order {i}?") for i in range(ANSWERS)]
    deadline = time.monotonic() + 30
    while not all(store.has_prediction(a) for a in answers):  # the events' answers are logged durably
        assert time.monotonic() < deadline, "predictions were not logged"
        time.sleep(0.2)

    run = uuid.uuid4().hex[:8]

    def event(i: int) -> dict:
        body = {
            "event_id": f"ev-{run}-{i:05d}",
            "request_id": answers[i % ANSWERS],
            "rating": 1 if i % 3 else -1,
        }
        if i % 7 == 0:
            body["correction"] = f"Orders ship within {i % 5 + 1} business days."
        return body

    load = Load(
        serving.url,
        lambda client, i: client.post("/v1/feedback", json=event(i)),
        total=EVENTS,
        workers=WORKERS,
        retries=1_000,  # bounded by SEND_TIMEOUT_S below: an unacknowledged event is sent again
        retry_delay_s=0.1,
        retry_max_delay_s=1.0,  # backing off, so the retries do not slow the restart down
        retry_if=_retry_if,
        keep_headers=["x-flywheel-duplicate"],
        keep_body=True,
        timeout_s=15,
        headers=auth,
    )
    load.start()
    try:
        while len(load.results) < KILL_AFTER and not load.done:
            time.sleep(0.01)
        killed_at = load.now()
        serving.kill()
        survivors = serving.survivors()
        restart_s = serving.start()
        results = load.join(timeout_s=SEND_TIMEOUT_S)
    finally:
        load.stop()
    sent_s = max(r.started + r.latency_s for r in results)

    with store.engine.connect() as conn:
        rows = conn.execute(
            sa.select(feedback.c.event_id, feedback.c.id).where(feedback.c.event_id.like(f"ev-{run}-%"))
        )
        stored = [(event_id, row_id) for event_id, row_id in rows]
    store.close()
    stored_ids = {event_id: row_id for event_id, row_id in stored}
    sent_ids = {event(i)["event_id"] for i in range(EVENTS)}
    acked = {r.body["event_id"]: r.body["id"] for r in results if r.ok}
    lost = sorted(set(acked) - set(stored_ids))
    duplicates = len(stored) - len(stored_ids)
    wrong_receipts = [e for e, row_id in acked.items() if e in stored_ids and stored_ids[e] != row_id]
    retried = sum(r.attempts > 1 for r in results)
    retried_duplicates = sum(r.headers.get("x-flywheel-duplicate") == "true" for r in results)
    rate = len(acked) / sent_s
    rate_up = len(acked) / (sent_s - restart_s)

    figures.record("events sent", len(results), goal=str(EVENTS), ok=len(results) == EVENTS)
    figures.record("events acknowledged", len(acked), goal=str(EVENTS), ok=len(acked) == EVENTS)
    figures.record("acknowledged but lost", len(lost), goal="0", ok=not lost)
    figures.record("duplicates", duplicates, goal="0", ok=duplicates == 0)
    figures.record("events retried after the kill", retried)
    figures.record("retries answered as already stored", retried_duplicates)
    figures.record("restart after kill -9", restart_s, unit="s")
    figures.record("events/s sustained (kill and restart included)", rate, unit="ev/s")
    figures.record("events/s while serving", rate_up, unit="ev/s")

    assert not survivors, survivors  # kill -9 of the tree left nothing running
    assert retried > 0 and killed_at < sent_s  # the kill cut events in flight
    assert len(results) == EVENTS
    assert len(acked) == EVENTS, [(r.index, r.status, r.error) for r in results if not r.ok][:10]
    assert not lost, lost[:10]
    assert duplicates == 0
    assert set(stored_ids) == sent_ids  # nothing stored that was not sent
    assert not wrong_receipts, wrong_receipts[:10]
