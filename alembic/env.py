"""Alembic environment for the migrator ledger.

migrator passes an open connection in ``config.attributes["connection"]``; run by hand, the URL
comes from MIGRATOR_LEDGER or the ``ledger`` key of the config named by MIGRATOR_CONFIG.
"""

from __future__ import annotations

import os

import sqlalchemy as sa
from alembic import context

from migrator.ledger.tables import metadata

VERSION_TABLE = "migrator_alembic_version"


def _run(connection: sa.Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


def _url() -> str:
    if os.environ.get("MIGRATOR_LEDGER"):
        return os.environ["MIGRATOR_LEDGER"]
    from migrator.config import load_config

    return load_config(os.environ.get("MIGRATOR_CONFIG", "config.yaml")).ledger


connection = context.config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:
    engine = sa.create_engine(_url())
    with engine.begin() as conn:
        _run(conn)
    engine.dispose()
