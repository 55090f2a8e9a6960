"""The feedback store on SQLite: migrations, prediction log, feedback idempotency, keys, watermarks."""

from __future__ import annotations

import logging
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pydantic
import pytest
import sqlalchemy as sa

from components.errors import Conflict, InvalidInput, NotFound
from components.feedback_store import VERSION_TABLE, FeedbackStore, normalize_url
from components.schemas import FeedbackEvent, GenerationParams, Prediction

pytestmark = pytest.mark.unit

T0 = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
REPO_ROOT = Path(__file__).resolve().parents[2]


def make_prediction(
    request_id: str, prompt: str = "How long do I have to return an item?", **kw
) -> Prediction:
    """A served prediction as the serving layer logs it."""
    fields = {
        "request_id": request_id,
        "model_name": "flywheel-support",
        "model_version": "3",
        "prompt": prompt,
        "response": "You can return items within 30 days.",
        "params": GenerationParams(max_new_tokens=32),
        "prompt_tokens": 9,
        "completion_tokens": 8,
        "finish_reason": "stop",
        "latency_ms": 12.5,
        "cached": False,
        "api_key_id": "key_asker",
        "created_at": T0,
    }
    return Prediction(**(fields | kw))


def make_event(event_id: str, request_id: str = "req-1", **kw) -> FeedbackEvent:
    """A feedback event as the server builds it (user_id from the caller's key)."""
    fields = {
        "event_id": event_id,
        "request_id": request_id,
        "rating": -1,
        "correction": "You can return items within 45 days.",
        "user_id": "key_alice",
        "created_at": T0,
    }
    return FeedbackEvent(**(fields | kw))


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'store' / 'feedback.db'}"


@pytest.fixture
def store(db_url: str) -> Iterator[FeedbackStore]:
    s = FeedbackStore(db_url)
    s.migrate()
    yield s
    s.close()


def _parallel(n: int, fn: Callable[[int], object]) -> list[object]:
    """Run fn(0..n-1) in n threads released at the same moment; exceptions are returned, not raised."""
    barrier = threading.Barrier(n)

    def call(i: int) -> object:
        barrier.wait()
        try:
            return fn(i)
        except Exception as e:  # the test inspects which calls failed and how
            return e

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(call, range(n)))


# Migrations ------------------------------------------------------------------------------------
def test_migrate_is_idempotent_and_uses_its_own_version_table(db_url: str) -> None:
    s = FeedbackStore(db_url)
    assert s.current_revision() is None
    head = s.migrate()
    assert head and s.migrate() == head == s.current_revision()
    tables = set(sa.inspect(s.engine).get_table_names())
    assert {"predictions", "feedback_events", "api_keys", "watermarks", VERSION_TABLE} <= tables
    # MLflow and Airflow keep theirs in alembic_version: never touch it.
    assert "alembic_version" not in tables
    s.close()


def test_migrations_match_the_store_tables(store: FeedbackStore) -> None:
    """The tables the code queries are exactly what the migrations create (no drift)."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from components.feedback_store import _meta

    with store.engine.connect() as conn:
        diff = compare_metadata(
            MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE}), _meta
        )
    assert diff == []


_MIGRATE_AT_ONCE = """
import pathlib, sys, time
from components.feedback_store import FeedbackStore
ready = pathlib.Path(sys.argv[2])
(ready / sys.argv[3]).touch()
while len(list(ready.iterdir())) < 2:  # both imported: now race
    time.sleep(0.002)
print(FeedbackStore(sys.argv[1]).migrate())
"""


def test_two_processes_migrate_a_fresh_database_at_once(db_url: str, tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    ready.mkdir()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _MIGRATE_AT_ONCE, db_url, str(ready), str(i)],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outs]
    assert {out.strip() for out, _ in outs} == {"0001"}
    s = FeedbackStore(db_url)
    assert s.current_revision() == "0001"
    with s.engine.connect() as conn:
        assert conn.exec_driver_sql(f"SELECT count(*) FROM {VERSION_TABLE}").scalar() == 1
    s.close()


def test_sqlite_is_shared_safely(store: FeedbackStore, db_url: str) -> None:
    """WAL lets a DAG task read while serving writes; a busy timeout makes writers wait, not fail."""
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 1000
    # An outside writer holds the write lock briefly: the store's write waits for it.
    other = sqlite3.connect(db_url.removeprefix("sqlite:///"), isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    threading.Timer(0.3, other.execute, args=("COMMIT",)).start()
    assert store.record_predictions([make_prediction("req-waits")]) == 1
    other.close()


def test_from_settings_defaults_to_sqlite_under_home(settings) -> None:
    s = FeedbackStore.from_settings(settings)
    assert s.engine.dialect.name == "sqlite"
    assert Path(s.engine.url.database).is_relative_to(settings.home)
    s.migrate()
    assert Path(s.engine.url.database).exists()
    s.close()


def test_urls() -> None:
    assert normalize_url("postgresql://u@h:5432/db") == "postgresql+psycopg://u@h:5432/db"
    assert normalize_url("postgres://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalize_url("postgresql+psycopg://u@h/db") == "postgresql+psycopg://u@h/db"
    with pytest.raises(InvalidInput):
        FeedbackStore("sqlite:///:memory:")
    with pytest.raises(InvalidInput):
        FeedbackStore("mysql://u@h/db")


# Prediction log --------------------------------------------------------------------------------
def test_prediction_prompt_hash_is_filled_and_checked() -> None:
    p = make_prediction("req-1", prompt="hello")
    assert p.prompt_sha256 == "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    assert make_prediction("req-1", prompt="hello", prompt_sha256=p.prompt_sha256) == p
    with pytest.raises(pydantic.ValidationError, match="prompt_sha256"):
        make_prediction("req-1", prompt="hello", prompt_sha256="0" * 64)
    with pytest.raises(pydantic.ValidationError):
        make_prediction("req-1", created_at=datetime(2026, 1, 1))  # naive: ambiguous


def test_record_predictions_upserts_on_request_id(store: FeedbackStore) -> None:
    rows = [make_prediction(f"req-{i}") for i in range(3)]
    assert store.record_predictions(rows + [rows[0]]) == 3
    # A replayed batch (a retried flush) adds nothing; a new id in it is still added.
    assert store.record_predictions(rows + [make_prediction("req-3")]) == 1
    assert store.record_predictions([]) == 0
    assert store.has_prediction("req-2") and not store.has_prediction("req-9")
    got = store.get_prediction("req-1")
    assert got.model_dump(exclude={"id", "recorded_at"}) == rows[1].model_dump()
    assert got.created_at.tzinfo is not None and got.params == GenerationParams(max_new_tokens=32)
    with pytest.raises(NotFound):
        store.get_prediction("req-9")
    assert store.stats().predictions == 4


def test_predictions_since_pages_by_id(store: FeedbackStore) -> None:
    store.record_predictions([make_prediction(f"req-{i}") for i in range(5)])
    first = store.predictions_since(0, limit=2)
    rest = store.predictions_since(first[-1].id, limit=10)
    assert [r.request_id for r in first + rest] == [f"req-{i}" for i in range(5)]
    assert [r.id for r in first + rest] == sorted(r.id for r in first + rest)
    assert store.predictions_since(rest[-1].id) == []
    with pytest.raises(InvalidInput):
        store.predictions_since(0, limit=0)


def test_prompts_and_corrections_never_reach_logging(
    store: FeedbackStore, caplog: pytest.LogCaptureFixture
) -> None:
    secret_prompt = "my email is jane.doe@example.com"
    secret_correction = "call me at +44 20 7946 0958"
    caplog.set_level(logging.DEBUG)
    store.record_predictions([make_prediction("req-1", prompt=secret_prompt)])
    store.add_feedback(make_event("evt-00000001", "req-1", correction=secret_correction))
    store.add_feedback(make_event("evt-00000001", "req-1", correction=secret_correction))
    store.feedback_since(0)
    assert caplog.records, "the store logs what it did"
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert secret_prompt not in text and secret_correction not in text


# Feedback --------------------------------------------------------------------------------------
def test_add_feedback_is_idempotent_on_event_id(store: FeedbackStore) -> None:
    store.record_predictions([make_prediction("req-1")])
    first = store.add_feedback(make_event("evt-00000001", "req-1"))
    assert not first.duplicate and first.rating == -1 and first.request_id == "req-1"
    # A client retry: new server-side created_at, same payload.
    again = store.add_feedback(make_event("evt-00000001", "req-1", created_at=T0 + timedelta(seconds=5)))
    assert again.duplicate
    assert again.model_dump(exclude={"duplicate"}) == first.model_dump(exclude={"duplicate"})
    assert store.stats().feedback == 1


def test_a_different_payload_under_a_stored_event_id_conflicts(store: FeedbackStore) -> None:
    store.add_feedback(make_event("evt-00000001"))
    with pytest.raises(Conflict, match="rating"):
        store.add_feedback(make_event("evt-00000001", rating=1, correction=None))
    with pytest.raises(Conflict, match="user_id"):
        store.add_feedback(make_event("evt-00000001", user_id="key_mallory"))
    assert store.stats().feedback == 1


def test_concurrent_duplicate_feedback_stores_one_row(store: FeedbackStore) -> None:
    receipts = _parallel(8, lambda i: store.add_feedback(make_event("evt-concurrent", "req-1")))
    assert not [r for r in receipts if isinstance(r, Exception)], receipts
    assert sum(not r.duplicate for r in receipts) == 1
    assert len({(r.id, r.stored_at) for r in receipts}) == 1
    assert store.stats().feedback == 1


def test_feedback_may_precede_its_prediction(store: FeedbackStore) -> None:
    """No foreign key: the prediction may still be in a replica's buffer."""
    receipt = store.add_feedback(make_event("evt-00000001", "req-late"))
    assert not store.has_prediction("req-late")
    (row,) = store.feedback_since(0)
    assert row.id == receipt.id and not row.has_prediction and row.prompt is None
    store.record_predictions([make_prediction("req-late", prompt="late prompt")])
    (row,) = store.feedback_since(0)
    assert row.prompt == "late prompt" and row.model_version == "3" and row.predicted_at == T0


def test_feedback_since_joins_pages_and_holds_recent_unmatched(store: FeedbackStore) -> None:
    store.record_predictions([make_prediction("req-a", prompt="A"), make_prediction("req-c", prompt="C")])
    ids = [store.add_feedback(make_event(f"evt-0000000{i}", f"req-{c}")).id for i, c in enumerate("abc")]
    page = store.feedback_since(0, limit=2)
    assert [(r.id, r.prompt, r.user_id) for r in page] == [
        (ids[0], "A", "key_alice"),
        (ids[1], None, "key_alice"),
    ]
    assert [r.id for r in store.feedback_since(ids[0])] == ids[1:]
    # The unmatched row is recent: the page stops before it, so a watermark there skips nothing.
    stored_b = page[1].stored_at
    assert [r.id for r in store.feedback_since(0, hold_unmatched_after=stored_b)] == ids[:1]
    # Once it is old enough, it is returned without its prediction.
    later = stored_b + timedelta(microseconds=1)
    assert [r.id for r in store.feedback_since(0, hold_unmatched_after=later)] == ids
    stats = store.stats()
    assert (stats.feedback, stats.negative, stats.positive, stats.corrections) == (3, 3, 0, 3)
    assert stats.last_feedback_id == ids[-1]


# API keys --------------------------------------------------------------------------------------
def test_key_lifecycle(store: FeedbackStore, db_url: str) -> None:
    info, key = store.create_key("ci-bot", admin=True)
    assert key.startswith("fw_") and len(key) >= 40
    assert key.startswith(info.prefix) and len(info.prefix) < 16
    assert info.admin and info.active
    assert store.verify_key(key) == info
    for bad in ("", "fw_", key + "x", key[:-1], "Bearer " + key, "fw_" + "A" * 500):
        assert store.verify_key(bad) is None
    # Only the hash is at rest.
    raw = sqlite3.connect(db_url.removeprefix("sqlite:///"))
    assert key not in str(raw.execute("SELECT * FROM api_keys").fetchall())
    raw.close()

    with pytest.raises(Conflict):
        store.create_key("ci-bot")
    with pytest.raises(InvalidInput):
        store.create_key("no spaces please")
    revoked = store.revoke_key("ci-bot")
    assert revoked.id == info.id and revoked.revoked_at is not None
    assert store.verify_key(key) is None
    assert store.revoke_key(info.id) == revoked  # again by id: a no-op
    with pytest.raises(NotFound):
        store.revoke_key("ci-bot")  # no active key of that name left

    # The name is free again; the revoked key stays listed for the audit trail.
    info2, key2 = store.create_key("ci-bot")
    assert info2.id != info.id and not info2.admin and store.verify_key(key2) == info2
    assert [k.id for k in store.list_keys()] == [info.id, info2.id]
    assert [k.id for k in store.list_keys(include_revoked=False)] == [info2.id]
    assert store.stats().active_keys == 1
    with pytest.raises(NotFound):
        store.revoke_key("nobody")


def test_concurrent_creates_of_one_name_make_one_key(store: FeedbackStore) -> None:
    results = _parallel(4, lambda i: store.create_key("race"))
    assert sum(isinstance(r, tuple) for r in results) == 1
    assert all(isinstance(r, Conflict) for r in results if not isinstance(r, tuple))


# Watermarks ------------------------------------------------------------------------------------
def test_watermark_compare_and_set(store: FeedbackStore) -> None:
    assert store.get_watermark("feedback_loop") == 0
    store.set_watermark("feedback_loop", 7, expected=0)
    assert store.get_watermark("feedback_loop") == 7
    with pytest.raises(Conflict, match="at 7"):
        store.set_watermark("feedback_loop", 9, expected=0)  # a run that read a stale mark
    assert store.get_watermark("feedback_loop") == 7
    store.set_watermark("feedback_loop", 12, expected=7)
    store.set_watermark("feedback_loop", 3, expected=None)  # an operator's reset
    assert store.get_watermark("feedback_loop") == 3
    assert store.get_watermark("other") == 0
    with pytest.raises(InvalidInput):
        store.set_watermark("feedback_loop", -1, expected=3)


def test_two_runs_cannot_both_advance_a_watermark(store: FeedbackStore) -> None:
    results = _parallel(4, lambda i: store.set_watermark("loop", 10 + i, expected=0))
    assert sum(r is None for r in results) == 1
    assert all(isinstance(r, Conflict) for r in results if r is not None)
    assert store.get_watermark("loop") in {10, 11, 12, 13}
