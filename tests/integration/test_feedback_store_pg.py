"""The feedback store on a real PostgreSQL: a fresh database of the test's own, dropped after."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from components.errors import Conflict, NotFound
from components.feedback_store import VERSION_TABLE, FeedbackStore
from tests.unit.test_feedback_store import _parallel, make_event, make_prediction

pytestmark = pytest.mark.integration


@pytest.fixture
def store(pg_url: str) -> Iterator[FeedbackStore]:
    s = FeedbackStore(pg_url)
    s.migrate()
    yield s
    s.close()


def test_concurrent_migrations_on_a_fresh_database(pg_url: str) -> None:
    stores = [FeedbackStore(pg_url) for _ in range(3)]
    assert stores[0].engine.dialect.driver == "psycopg"
    results = _parallel(3, lambda i: stores[i].migrate())
    assert results == ["0001"] * 3, results
    assert stores[0].migrate() == "0001"
    with stores[0].engine.connect() as conn:
        assert conn.exec_driver_sql(f"SELECT count(*) FROM {VERSION_TABLE}").scalar() == 1
        from alembic.autogenerate import compare_metadata
        from alembic.runtime.migration import MigrationContext

        from components.feedback_store import _meta

        ctx = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
        assert compare_metadata(ctx, _meta) == []
    for s in stores:
        s.close()


def test_prediction_log_round_trip_and_upsert(store: FeedbackStore) -> None:
    rows = [make_prediction(f"req-{i}") for i in range(3)]
    assert store.record_predictions(rows + [rows[0]]) == 3
    assert store.record_predictions(rows) == 0
    assert store.has_prediction("req-0") and not store.has_prediction("req-9")
    got = store.get_prediction("req-2")
    assert got.model_dump(exclude={"id", "recorded_at"}) == rows[2].model_dump()
    assert [r.request_id for r in store.predictions_since(got.id - 1)] == ["req-2"]


def test_feedback_idempotency_and_conflict(store: FeedbackStore) -> None:
    store.record_predictions([make_prediction("req-1", prompt="P")])
    receipts = _parallel(8, lambda i: store.add_feedback(make_event("evt-concurrent", "req-1")))
    assert not [r for r in receipts if isinstance(r, Exception)], receipts
    assert sum(not r.duplicate for r in receipts) == 1
    assert len({(r.id, r.stored_at) for r in receipts}) == 1
    with pytest.raises(Conflict):
        store.add_feedback(make_event("evt-concurrent", "req-1", rating=1, correction=None))
    store.add_feedback(make_event("evt-early-01", "req-unflushed"))
    rows = store.feedback_since(0)
    assert [(r.event_id, r.prompt) for r in rows] == [("evt-concurrent", "P"), ("evt-early-01", None)]
    assert store.stats().feedback == 2


def test_a_reader_paging_by_watermark_misses_no_concurrent_insert(store: FeedbackStore) -> None:
    """Ids become visible in id order, so a watermark never jumps over a row still committing."""
    writers, per_writer = 4, 25
    done = threading.Event()
    seen: list[int] = []

    def read() -> None:
        watermark = 0
        while True:
            finished = done.is_set()
            rows = store.feedback_since(watermark, limit=7)
            seen.extend(r.id for r in rows)
            watermark = rows[-1].id if rows else watermark
            if finished and not rows:
                return
            time.sleep(0.001)

    reader = threading.Thread(target=read)
    reader.start()
    _parallel(
        writers, lambda w: [store.add_feedback(make_event(f"evt-{w}-{i:04d}")) for i in range(per_writer)]
    )
    done.set()
    reader.join(60)
    with store.engine.connect() as conn:
        stored = conn.execute(sa.text("SELECT id FROM feedback_events ORDER BY id")).scalars().all()
    assert len(stored) == writers * per_writer
    assert seen == stored


def test_keys_and_watermarks(store: FeedbackStore) -> None:
    created = _parallel(3, lambda i: store.create_key("shared-name", admin=True))
    ((info, key),) = [r for r in created if isinstance(r, tuple)]
    assert store.verify_key(key) == info and store.verify_key(key + "x") is None
    assert store.revoke_key("shared-name").revoked_at is not None
    assert store.verify_key(key) is None
    with pytest.raises(NotFound):
        store.revoke_key("shared-name")

    results = _parallel(4, lambda i: store.set_watermark("feedback_loop", 5 + i, expected=0))
    assert sum(r is None for r in results) == 1
    assert all(isinstance(r, Conflict) for r in results if r is not None)
    mark = store.get_watermark("feedback_loop")
    store.set_watermark("feedback_loop", mark + 1, expected=mark)
    with pytest.raises(Conflict):
        store.set_watermark("feedback_loop", 99, expected=mark)
    assert store.get_watermark("feedback_loop") == mark + 1
