"""Alembic environment of the feedback store.

Run by ``FeedbackStore.migrate()``, which passes an open connection (inside its transaction and
lock) as ``config.attributes["connection"]``. For a new revision, with a scratch database URL:
``FeedbackStore(url).migrate()``, then ``alembic revision --autogenerate`` with a Config whose
``script_location`` is this folder and ``sqlalchemy.url`` that URL.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context

from components.feedback_store import VERSION_TABLE, _meta, normalize_url

config = context.config


def _run(connection: sa.Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=_meta,
        # Our own version table: the store may share a database with MLflow or Airflow, which
        # keep theirs in alembic_version.
        version_table=VERSION_TABLE,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters tables by copy
    )
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:
    engine = sa.create_engine(normalize_url(config.get_main_option("sqlalchemy.url") or ""))
    with engine.begin() as conn:
        _run(conn)
    engine.dispose()
