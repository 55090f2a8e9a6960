"""Prediction log, feedback events, API keys and watermarks.

Revision ID: 0001
Revises:
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Monotonic ids are the readers' watermarks: SQLite needs INTEGER PRIMARY KEY AUTOINCREMENT so
# an id is never reused, PostgreSQL a bigint identity.
_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "predictions",
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
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("recorded_at", _TS, nullable=False),
        sa.UniqueConstraint("request_id", name="uq_predictions_request_id"),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "feedback_events",
        sa.Column("id", _ID, sa.Identity(), primary_key=True),
        sa.Column("event_id", sa.String(128), nullable=False),
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("rating", sa.SmallInteger, nullable=False),
        sa.Column("correction", sa.Text),
        sa.Column("comment", sa.Text),
        sa.Column("user_id", sa.String(128), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("stored_at", _TS, nullable=False),
        sa.UniqueConstraint("event_id", name="uq_feedback_events_event_id"),
        sa.CheckConstraint("rating IN (-1, 1)", name="ck_feedback_events_rating"),
        sqlite_autoincrement=True,
    )
    # No foreign key to predictions: feedback may arrive before its prediction is flushed.
    op.create_index("ix_feedback_events_request_id", "feedback_events", ["request_id"])
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("prefix", sa.String(16), nullable=False),
        sa.Column("key_sha256", sa.String(64), nullable=False),
        sa.Column("admin", sa.Boolean, nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("revoked_at", _TS),
        sa.UniqueConstraint("key_sha256", name="uq_api_keys_key_sha256"),
    )
    # A name names one active key; revoked keys keep their name for the audit trail.
    op.create_index(
        "uq_api_keys_active_name",
        "api_keys",
        ["name"],
        unique=True,
        sqlite_where=sa.text("revoked_at IS NULL"),
        postgresql_where=sa.text("revoked_at IS NULL"),
    )
    op.create_table(
        "watermarks",
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("value", sa.BigInteger, nullable=False),
        sa.Column("updated_at", _TS, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("watermarks")
    op.drop_index("uq_api_keys_active_name", table_name="api_keys")
    op.drop_table("api_keys")
    op.drop_index("ix_feedback_events_request_id", table_name="feedback_events")
    op.drop_table("feedback_events")
    op.drop_table("predictions")
