"""The prediction log, the feedback store, API keys and DAG watermarks (SQLAlchemy 2 + Alembic).

One store, two engines: SQLite under the home by default (WAL + busy timeout, so a serving
process and a DAG task can share the file) and PostgreSQL in production. The schema is owned by
the Alembic migrations in ``components/migrations`` and applied by :meth:`FeedbackStore.migrate`.

Readers page by a monotonically increasing integer ``id`` (the watermark). For that to be safe,
a row with a higher id must never become visible before a row with a lower one: SQLite has a
single writer, and on PostgreSQL every insert into a paged table first takes a transaction-level
advisory lock for that table, so ids are allocated and committed in the same order.

Prompts and responses are stored as received (this is the access-controlled system of record)
and are never passed to ``logging``; redaction happens in the feedback builder.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, Literal

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from components.errors import Conflict, InvalidInput, NotFound
from components.schemas import FeedbackEvent, GenerationParams, Prediction

log = logging.getLogger(__name__)

VERSION_TABLE = "flywheel_alembic_version"
KEY_PREFIX = "fw_"
_DISPLAY_PREFIX_LEN = 10  # "fw_" + 7 random characters: enough to tell keys apart, useless to guess.
_KEY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
# Advisory-lock keys (PostgreSQL) that serialise inserts into the id-paged tables; arbitrary constants.
_LOCKS = {"migrate": 0x666C7977_0001, "predictions": 0x666C7977_0002, "feedback": 0x666C7977_0003}
_SQLITE_BUSY_TIMEOUT_MS = 30_000


# Records ---------------------------------------------------------------------------------------
class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FeedbackReceipt(_Record):
    """What the store answers for one feedback event: the same for every retry of that event."""

    id: int = Field(description="Row id: the feedback DAG's watermark position.")
    event_id: str
    request_id: str
    rating: Literal[-1, 1]
    stored_at: datetime
    duplicate: bool = Field(description="True when this event_id was already stored.")


class ApiKeyInfo(_Record):
    """An API key as the store shows it: never the key itself."""

    id: str
    name: str
    prefix: str = Field(description="First characters of the key, for telling keys apart.")
    admin: bool
    created_at: datetime
    revoked_at: datetime | None = None

    @property
    def active(self) -> bool:
        """Whether the key still authenticates."""
        return self.revoked_at is None


class PredictionRow(Prediction):
    """A logged prediction with its position in the log."""

    id: int
    recorded_at: datetime


class FeedbackRow(_Record):
    """A stored feedback event joined with the prediction it rates, when that is logged."""

    id: int = Field(description="Monotonic row id: the watermark position.")
    event_id: str
    request_id: str
    rating: Literal[-1, 1]
    correction: str | None
    comment: str | None
    user_id: str = Field(description="Id of the API key that sent the feedback.")
    created_at: datetime
    stored_at: datetime
    # From the prediction; None while (or if) it is not in the log.
    prompt: str | None = None
    response: str | None = None
    model_name: str | None = None
    model_version: str | None = None
    predicted_at: datetime | None = None

    @property
    def has_prediction(self) -> bool:
        """Whether the rated prediction was found in the log."""
        return self.prompt is not None


class StoreStats(_Record):
    """Row counts of the store."""

    predictions: int
    feedback: int
    positive: int
    negative: int
    corrections: int
    active_keys: int
    last_prediction_id: int
    last_feedback_id: int


# Tables (the Python view; the migrations own the schema) ---------------------------------------
class _UTCDateTime(sa.types.TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every engine (SQLite stores them naive)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: pass a timezone-aware one")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # SQLite autoincrements INTEGER only
_JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
_meta = sa.MetaData()

predictions = sa.Table(
    "predictions",
    _meta,
    sa.Column("id", _ID, sa.Identity(), primary_key=True),
    sa.Column("request_id", sa.String(128), nullable=False),
    sa.Column("model_name", sa.String(256), nullable=False),
    sa.Column("model_version", sa.String(64), nullable=False),
    sa.Column("prompt", sa.Text, nullable=False),
    sa.Column("prompt_sha256", sa.String(64), nullable=False),
    sa.Column("response", sa.Text, nullable=False),
    sa.Column("params", _JSON, nullable=False),
    sa.Column("prompt_tokens", sa.Integer, nullable=False),
    sa.Column("completion_tokens", sa.Integer, nullable=False),
    sa.Column("finish_reason", sa.String(16), nullable=False),
    sa.Column("latency_ms", sa.Float, nullable=False),
    sa.Column("cached", sa.Boolean, nullable=False),
    sa.Column("api_key_id", sa.String(64)),
    sa.Column("created_at", _UTCDateTime, nullable=False),
    sa.Column("recorded_at", _UTCDateTime, nullable=False),
    sa.UniqueConstraint("request_id", name="uq_predictions_request_id"),
    sqlite_autoincrement=True,
)

feedback = sa.Table(
    "feedback_events",
    _meta,
    sa.Column("id", _ID, sa.Identity(), primary_key=True),
    sa.Column("event_id", sa.String(128), nullable=False),
    sa.Column("request_id", sa.String(128), nullable=False),
    sa.Column("rating", sa.SmallInteger, nullable=False),
    sa.Column("correction", sa.Text),
    sa.Column("comment", sa.Text),
    sa.Column("user_id", sa.String(128), nullable=False),
    sa.Column("created_at", _UTCDateTime, nullable=False),
    sa.Column("stored_at", _UTCDateTime, nullable=False),
    sa.UniqueConstraint("event_id", name="uq_feedback_events_event_id"),
    sa.CheckConstraint("rating IN (-1, 1)", name="ck_feedback_events_rating"),
    sa.Index("ix_feedback_events_request_id", "request_id"),
    sqlite_autoincrement=True,
)

api_keys = sa.Table(
    "api_keys",
    _meta,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("name", sa.String(64), nullable=False),
    sa.Column("prefix", sa.String(16), nullable=False),
    sa.Column("key_sha256", sa.String(64), nullable=False),
    sa.Column("admin", sa.Boolean, nullable=False),
    sa.Column("created_at", _UTCDateTime, nullable=False),
    sa.Column("revoked_at", _UTCDateTime),
    sa.UniqueConstraint("key_sha256", name="uq_api_keys_key_sha256"),
    sa.Index(
        "uq_api_keys_active_name",
        "name",
        unique=True,
        sqlite_where=sa.text("revoked_at IS NULL"),
        postgresql_where=sa.text("revoked_at IS NULL"),
    ),
)

watermarks = sa.Table(
    "watermarks",
    _meta,
    sa.Column("name", sa.String(128), primary_key=True),
    sa.Column("value", sa.BigInteger, nullable=False),
    sa.Column("updated_at", _UTCDateTime, nullable=False),
)


def _now() -> datetime:
    return datetime.now(UTC)


def normalize_url(url: str) -> str:
    """The SQLAlchemy URL the store uses: plain ``postgresql://`` goes through psycopg 3.

    Args:
        url: A SQLAlchemy database URL (``sqlite:///…``, ``postgresql://…``, ``postgresql+psycopg://…``).

    Returns:
        The URL with PostgreSQL mapped to the ``psycopg`` driver.
    """
    for plain in ("postgresql://", "postgres://"):
        if url.startswith(plain):
            return "postgresql+psycopg://" + url[len(plain) :]
    return url


def hash_key(plaintext: str) -> str:
    """The stored form of an API key.

    A bare SHA-256 is enough here: keys are 256-bit random tokens, so there is nothing for a
    slow, salted password hash to protect against, and lookup by hash stays an index hit.

    Args:
        plaintext: The key as the client sends it.

    Returns:
        Hex SHA-256 of the key.
    """
    return hashlib.sha256(plaintext.encode()).hexdigest()


class FeedbackStore:
    """Prediction log, feedback events, API keys and watermarks in one SQL database."""

    def __init__(self, url: str, *, echo: bool = False) -> None:
        """Connect lazily to the store at ``url`` (call :meth:`migrate` before first use).

        Args:
            url: SQLAlchemy URL; ``postgresql://`` is mapped to psycopg 3.
            echo: Log every SQL statement (debugging only: statements carry prompts).
        """
        self.url = normalize_url(url)
        self._engine = _make_engine(self.url, echo=echo)
        self._pg = self._engine.dialect.name == "postgresql"

    @classmethod
    def from_settings(cls, settings: Any) -> FeedbackStore:
        """The store named by ``settings.feedback_url`` (SQLite under the home by default).

        Args:
            settings: flywheel ``Settings``.

        Returns:
            An unmigrated store handle.
        """
        return cls(settings.feedback_url)

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine (for tests and admin tools)."""
        return self._engine

    def close(self) -> None:
        """Close every pooled connection."""
        self._engine.dispose()

    def __repr__(self) -> str:
        return f"FeedbackStore({self._engine.url.render_as_string(hide_password=True)!r})"

    # Schema ------------------------------------------------------------------------------------
    def migrate(self) -> str:
        """Upgrade the schema to the newest migration; harmless to repeat or to run concurrently.

        Returns:
            The revision the database is at afterwards.
        """
        from alembic import command
        from alembic.runtime.migration import MigrationContext

        with self._tx(write=True) as conn:
            # Two processes starting at once: the second waits here, then finds nothing to do.
            # SQLite: the write transaction (BEGIN IMMEDIATE) is already the lock.
            self._lock(conn, "migrate")
            cfg = _alembic_config()
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
            revision = MigrationContext.configure(
                conn, opts={"version_table": VERSION_TABLE}
            ).get_current_revision()
        log.info("feedback store at revision %s (%s)", revision, self._engine.dialect.name)
        return revision or ""

    def current_revision(self) -> str | None:
        """The schema revision of the database, None before the first migration."""
        from alembic.runtime.migration import MigrationContext

        with self._tx(write=False) as conn:
            return MigrationContext.configure(
                conn, opts={"version_table": VERSION_TABLE}
            ).get_current_revision()

    # Prediction log ----------------------------------------------------------------------------
    def record_predictions(self, rows: Sequence[Prediction]) -> int:
        """Append predictions in one transaction; a request_id already logged is skipped.

        Args:
            rows: Served predictions (any order; duplicates allowed).

        Returns:
            How many rows were new.
        """
        if not rows:
            return 0
        recorded_at = _now()
        values = [
            {
                **row.model_dump(mode="python", exclude={"params"}),
                "params": row.params.model_dump(mode="json"),
            }
            | {"recorded_at": recorded_at}
            for row in rows
        ]
        stmt = self._insert(predictions).on_conflict_do_nothing(index_elements=["request_id"])
        with self._tx(write=True) as conn:
            self._lock(conn, "predictions")
            inserted = len(conn.execute(stmt.returning(predictions.c.id), values).all())
        log.debug("prediction log: %d new of %d", inserted, len(rows))
        return inserted

    def has_prediction(self, request_id: str) -> bool:
        """Whether ``request_id`` is in the prediction log.

        Args:
            request_id: The id a completion response carried.

        Returns:
            True when it was logged.
        """
        stmt = sa.select(predictions.c.id).where(predictions.c.request_id == request_id).limit(1)
        with self._tx(write=False) as conn:
            return conn.execute(stmt).first() is not None

    def get_prediction(self, request_id: str) -> PredictionRow:
        """One logged prediction.

        Args:
            request_id: The id a completion response carried.

        Returns:
            The row; raises ``NotFound`` when it is not logged.
        """
        stmt = sa.select(predictions).where(predictions.c.request_id == request_id)
        with self._tx(write=False) as conn:
            row = conn.execute(stmt).mappings().first()
        if row is None:
            raise NotFound(f"no prediction with request id {request_id!r}")
        return _prediction_row(row)

    def predictions_since(self, watermark: int, limit: int = 1000) -> list[PredictionRow]:
        """Logged predictions after a watermark, oldest first.

        Args:
            watermark: The last id already processed (0: from the start).
            limit: Most rows to return.

        Returns:
            Up to ``limit`` rows with ``id > watermark``, by id.
        """
        stmt = (
            sa.select(predictions)
            .where(predictions.c.id > watermark)
            .order_by(predictions.c.id)
            .limit(_positive(limit))
        )
        with self._tx(write=False) as conn:
            return [_prediction_row(r) for r in conn.execute(stmt).mappings()]

    # Feedback ----------------------------------------------------------------------------------
    def add_feedback(self, event: FeedbackEvent) -> FeedbackReceipt:
        """Store one feedback event durably, once per ``event_id``.

        The same event again (concurrently too) gets the first one's receipt with
        ``duplicate=True``; a different payload under a stored ``event_id`` raises ``Conflict``.
        No foreign key to the prediction log: feedback may arrive before its prediction is flushed.

        Args:
            event: The event, with ``user_id`` set by the server from the caller's API key.

        Returns:
            The receipt, after the transaction has committed.
        """
        values = event.model_dump(mode="python") | {"stored_at": _now()}
        stmt = (
            self._insert(feedback)
            .on_conflict_do_nothing(index_elements=["event_id"])
            .returning(feedback.c.id, feedback.c.stored_at)
        )
        with self._tx(write=True) as conn:
            self._lock(conn, "feedback")
            inserted = conn.execute(stmt, values).first()
            if inserted is None:
                stored = conn.execute(sa.select(feedback).where(feedback.c.event_id == event.event_id))
                existing = stored.mappings().one()
        if inserted is not None:
            log.info("feedback %s stored (id %d, rating %+d)", event.event_id, inserted.id, event.rating)
            return FeedbackReceipt(
                id=inserted.id,
                event_id=event.event_id,
                request_id=event.request_id,
                rating=event.rating,
                stored_at=_as_utc(inserted.stored_at),
                duplicate=False,
            )
        differs = [
            f
            for f in ("request_id", "rating", "correction", "comment", "user_id")
            if existing[f] != values[f]
        ]
        if differs:
            raise Conflict(
                f"event_id {event.event_id!r} was already used with a different {', '.join(differs)}"
            )
        log.info("feedback %s is a duplicate of id %d", event.event_id, existing["id"])
        return FeedbackReceipt(
            id=existing["id"],
            event_id=existing["event_id"],
            request_id=existing["request_id"],
            rating=existing["rating"],
            stored_at=existing["stored_at"],
            duplicate=True,
        )

    def feedback_since(
        self, watermark: int, limit: int = 1000, *, hold_unmatched_after: datetime | None = None
    ) -> list[FeedbackRow]:
        """Feedback after a watermark, oldest first, joined with the prediction each one rates.

        Args:
            watermark: The last id already processed (0: from the start).
            limit: Most rows to return.
            hold_unmatched_after: When set, the page ends before the first row that has no
                prediction yet and was stored at or after this time (its prediction may still be
                in a serving replica's buffer), so a watermark at the last row returned skips
                nothing. Older unmatched rows are returned with ``prompt=None``.

        Returns:
            Up to ``limit`` rows with ``id > watermark``, by id.
        """
        stmt = (
            sa.select(
                feedback,
                predictions.c.prompt,
                predictions.c.response,
                predictions.c.model_name,
                predictions.c.model_version,
                predictions.c.created_at.label("predicted_at"),
            )
            .select_from(feedback.outerjoin(predictions, predictions.c.request_id == feedback.c.request_id))
            .where(feedback.c.id > watermark)
            .order_by(feedback.c.id)
            .limit(_positive(limit))
        )
        with self._tx(write=False) as conn:
            rows = [FeedbackRow.model_validate(dict(r)) for r in conn.execute(stmt).mappings()]
        if hold_unmatched_after is not None:
            for i, row in enumerate(rows):
                if not row.has_prediction and row.stored_at >= hold_unmatched_after:
                    return rows[:i]
        return rows

    # API keys ----------------------------------------------------------------------------------
    def create_key(self, name: str, admin: bool = False) -> tuple[ApiKeyInfo, str]:
        """Create an API key; the plaintext is returned here once and never stored.

        Args:
            name: A label, unique among active keys (letters, digits, ``._@-``; up to 64).
            admin: Whether the key may call ``/admin/*``.

        Returns:
            The key's record and the plaintext key to hand to its owner.
        """
        if not _KEY_NAME.match(name):
            raise InvalidInput(
                f"key name {name!r}: use 1-64 letters, digits or ._@- (starting with a letter or digit)"
            )
        plaintext = KEY_PREFIX + secrets.token_urlsafe(32)
        info = ApiKeyInfo(
            id="key_" + secrets.token_hex(6),
            name=name,
            prefix=plaintext[:_DISPLAY_PREFIX_LEN],
            admin=admin,
            created_at=_now(),
        )
        try:
            with self._tx(write=True) as conn:
                conn.execute(sa.insert(api_keys), info.model_dump() | {"key_sha256": hash_key(plaintext)})
        except IntegrityError as e:
            # The partial unique index on active names (a concurrent create, or an existing key).
            raise Conflict(f"an active key named {name!r} exists; revoke it first") from e
        log.info("created API key %s (%s, admin=%s)", info.id, name, admin)
        return info, plaintext

    def verify_key(self, plaintext: str) -> ApiKeyInfo | None:
        """The active key matching a presented key, or None.

        Lookup is by SHA-256 of the presented key, so timing reveals nothing about stored keys.

        Args:
            plaintext: The bearer token as received.

        Returns:
            The key's record when it exists and is not revoked.
        """
        if not plaintext.startswith(KEY_PREFIX) or len(plaintext) > 128:
            return None
        digest = hash_key(plaintext)
        stmt = sa.select(api_keys).where(api_keys.c.key_sha256 == digest, api_keys.c.revoked_at.is_(None))
        with self._tx(write=False) as conn:
            row = conn.execute(stmt).mappings().first()
        if row is None or not hmac.compare_digest(row["key_sha256"], digest):
            return None
        return _key_info(row)

    def list_keys(self, include_revoked: bool = True) -> list[ApiKeyInfo]:
        """Every API key, oldest first.

        Args:
            include_revoked: Also list revoked keys.

        Returns:
            Key records (never the keys).
        """
        stmt = sa.select(api_keys).order_by(api_keys.c.created_at, api_keys.c.id)
        if not include_revoked:
            stmt = stmt.where(api_keys.c.revoked_at.is_(None))
        with self._tx(write=False) as conn:
            return [_key_info(r) for r in conn.execute(stmt).mappings()]

    def revoke_key(self, name_or_id: str) -> ApiKeyInfo:
        """Revoke a key by id, or the active key of that name; revoking a revoked id is a no-op.

        Args:
            name_or_id: A key id (``key_…``) or the name of an active key.

        Returns:
            The key's record with ``revoked_at`` set; raises ``NotFound`` when nothing matches.
        """
        with self._tx(write=True) as conn:
            row = conn.execute(sa.select(api_keys).where(api_keys.c.id == name_or_id)).mappings().first()
            if row is None:
                by_name = sa.select(api_keys).where(
                    api_keys.c.name == name_or_id, api_keys.c.revoked_at.is_(None)
                )
                row = conn.execute(by_name).mappings().first()
            if row is None:
                raise NotFound(f"no API key with id or active name {name_or_id!r}")
            if row["revoked_at"] is not None:
                return _key_info(row)
            revoked_at = _now()
            conn.execute(sa.update(api_keys).where(api_keys.c.id == row["id"]).values(revoked_at=revoked_at))
        info = _key_info(row).model_copy(update={"revoked_at": revoked_at})
        log.info("revoked API key %s (%s)", info.id, info.name)
        return info

    # Watermarks --------------------------------------------------------------------------------
    def get_watermark(self, name: str) -> int:
        """The stored position of a reader (0 when it never ran).

        Args:
            name: The reader's name, e.g. ``feedback_loop``.

        Returns:
            The last id it processed.
        """
        with self._tx(write=False) as conn:
            value = conn.execute(sa.select(watermarks.c.value).where(watermarks.c.name == name)).scalar()
        return int(value or 0)

    def set_watermark(self, name: str, value: int, expected: int | None) -> None:
        """Move a reader's watermark, only from the position it read (compare-and-set).

        Call it after the work up to ``value`` has succeeded: a failed run leaves the mark
        where it was, and of two runs that read the same mark only one can advance it.

        Args:
            name: The reader's name.
            value: The new position (the last id processed).
            expected: The position the caller read (0 for a reader that never ran); None sets
                unconditionally (an operator's reset).
        """
        if value < 0:
            raise InvalidInput(f"watermark {name!r}: {value} is negative")
        now = _now()
        with self._tx(write=True) as conn:
            conn.execute(
                self._insert(watermarks).on_conflict_do_nothing(index_elements=["name"]),
                {"name": name, "value": 0, "updated_at": now},
            )
            stmt = sa.update(watermarks).where(watermarks.c.name == name).values(value=value, updated_at=now)
            if expected is not None:
                stmt = stmt.where(watermarks.c.value == expected)
            if conn.execute(stmt).rowcount != 1:
                current = conn.execute(
                    sa.select(watermarks.c.value).where(watermarks.c.name == name)
                ).scalar()
                raise Conflict(f"watermark {name!r} is at {current}, not {expected}: another run moved it")
        log.info("watermark %s: %s -> %d", name, expected, value)

    # Counts ------------------------------------------------------------------------------------
    def stats(self) -> StoreStats:
        """Row counts: predictions, feedback by kind, active keys, last ids."""
        fb = sa.select(
            sa.func.count(),
            sa.func.count().filter(feedback.c.rating > 0),
            sa.func.count().filter(feedback.c.rating < 0),
            sa.func.count(feedback.c.correction),
            sa.func.coalesce(sa.func.max(feedback.c.id), 0),
        )
        pred = sa.select(sa.func.count(), sa.func.coalesce(sa.func.max(predictions.c.id), 0))
        keys = sa.select(sa.func.count()).select_from(api_keys).where(api_keys.c.revoked_at.is_(None))
        with self._tx(write=False) as conn:
            n_fb, pos, neg, corr, last_fb = conn.execute(fb).one()
            n_pred, last_pred = conn.execute(pred).one()
            n_keys = conn.execute(keys).scalar_one()
        return StoreStats(
            predictions=n_pred,
            feedback=n_fb,
            positive=pos,
            negative=neg,
            corrections=corr,
            active_keys=n_keys,
            last_prediction_id=last_pred,
            last_feedback_id=last_fb,
        )

    # Internals ---------------------------------------------------------------------------------
    @contextmanager
    def _tx(self, *, write: bool) -> Iterator[Connection]:
        """One transaction; on SQLite a write transaction takes the write lock up front."""
        with self._engine.connect() as conn:
            if write:
                conn.execution_options(flywheel_write=True)
            with conn.begin():
                yield conn

    def _lock(self, conn: Connection, name: str) -> None:
        if self._pg:
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCKS[name]})

    def _insert(self, table: sa.Table) -> Any:
        return (postgresql.insert if self._pg else sqlite.insert)(table)


# Helpers ---------------------------------------------------------------------------------------
def _make_engine(url: str, *, echo: bool) -> Engine:
    parsed = sa.make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_engine(parsed, echo=echo)
    if parsed.get_backend_name() != "postgresql":
        raise InvalidInput(
            f"feedback store URL must be sqlite or postgresql, not {parsed.get_backend_name()!r}"
        )
    return sa.create_engine(parsed, echo=echo, pool_pre_ping=True)


def _sqlite_engine(url: sa.URL, *, echo: bool) -> Engine:
    from pathlib import Path

    if not url.database or url.database == ":memory:":
        raise InvalidInput("the feedback store needs a SQLite file (in-memory databases are per-connection)")
    Path(url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(url, echo=echo, connect_args={"timeout": _SQLITE_BUSY_TIMEOUT_MS / 1000})

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event emit BEGIN (pysqlite's own deferred BEGIN cannot take
        # the write lock up front, and a deferred read-then-write fails with SQLITE_BUSY at once).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")  # readers never block the serving process's writes
        cur.execute(f"PRAGMA busy_timeout={_SQLITE_BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA synchronous=FULL")  # a returned receipt survives a power cut too
        cur.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = "IMMEDIATE" if conn.get_execution_options().get("flywheel_write") else "DEFERRED"
        conn.exec_driver_sql(f"BEGIN {mode}")

    return engine


def _alembic_config() -> Any:
    from importlib.resources import files

    from alembic.config import Config

    cfg = Config()
    # A package directory on disk (regular or editable install); alembic reads scripts by path.
    cfg.set_main_option("script_location", str(files("components") / "migrations"))
    cfg.set_main_option("version_table", VERSION_TABLE)
    return cfg


def _positive(limit: int) -> int:
    if limit < 1:
        raise InvalidInput(f"limit must be at least 1, not {limit}")
    return limit


def _as_utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _prediction_row(row: Any) -> PredictionRow:
    data = dict(row)
    data["params"] = GenerationParams.model_validate(data["params"])
    return PredictionRow.model_validate(data)


def _key_info(row: Any) -> ApiKeyInfo:
    return ApiKeyInfo.model_validate({k: row[k] for k in ApiKeyInfo.model_fields})
