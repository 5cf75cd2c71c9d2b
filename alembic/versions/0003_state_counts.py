"""Counts by state kept by triggers; partial indexes for leases and recent errors.

``migrator status`` and the progress display counted every row of the job (seconds on a
ledger of ten million). Now triggers on ``migrator_objects`` keep objects and bytes per job and
state in ``migrator_state_counts``, in the same transaction as each change:

* Postgres: statement-level triggers with transition tables, one aggregated row per statement
  and state; the row is keyed by the writing transaction, so concurrent workers never update
  the same row (no lock waits, no deadlocks) — the counts are sums over a job's rows.
* SQLite: row-level triggers adding to one row per state and second (one writer at a time).

The index on ``lease_owner`` holds only leased rows now, and a new partial index finds the
rows that carry an error (``status``'s recent errors) without scanning the job. On Postgres,
autovacuum cleans ``migrator_objects`` after 1 % of its rows changed instead of 20 %.

Upgrading a populated ledger counts its rows once (the table is locked against writes
meanwhile). Note for later revisions: on SQLite a batch operation that recreates
``migrator_objects`` drops these triggers; such a revision must create them again.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_UPSERT = """
    ON CONFLICT (job, state, second, writer) DO UPDATE
    SET objects = c.objects + excluded.objects, bytes = c.bytes + excluded.bytes"""
# SQLite allows no table alias in a trigger: there the existing row's columns go unqualified.
_UPSERT_SQLITE = """
    ON CONFLICT (job, state, second, writer) DO UPDATE
    SET objects = objects + excluded.objects, bytes = bytes + excluded.bytes"""

_PG_FUNCTION = f"""
CREATE FUNCTION migrator_count_states() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    at bigint := floor(extract(epoch FROM statement_timestamp()));
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO migrator_state_counts AS c (job, state, second, writer, objects, bytes)
        SELECT job, state, at, txid_current(), count(*), coalesce(sum(size), 0)
        FROM new_rows GROUP BY job, state
        {_UPSERT};
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO migrator_state_counts AS c (job, state, second, writer, objects, bytes)
        SELECT job, state, at, txid_current(), sum(n), sum(b)
        FROM (SELECT job, state, 1 AS n, size AS b FROM new_rows
              UNION ALL
              SELECT job, state, -1, -size FROM old_rows) AS d
        GROUP BY job, state
        HAVING sum(n) <> 0 OR sum(b) <> 0
        {_UPSERT};
    ELSE
        INSERT INTO migrator_state_counts AS c (job, state, second, writer, objects, bytes)
        SELECT job, state, at, txid_current(), -count(*), -coalesce(sum(size), 0)
        FROM old_rows GROUP BY job, state
        {_UPSERT};
    END IF;
    RETURN NULL;
END
$$
"""

_PG_AUTOVACUUM = "autovacuum_vacuum_scale_factor = 0.01, autovacuum_vacuum_threshold = 20000"

_PG_TRIGGERS = {
    "migrator_objects_count_insert": "AFTER INSERT ON migrator_objects "
    "REFERENCING NEW TABLE AS new_rows",
    "migrator_objects_count_update": "AFTER UPDATE ON migrator_objects "
    "REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows",
    "migrator_objects_count_delete": "AFTER DELETE ON migrator_objects "
    "REFERENCING OLD TABLE AS old_rows",
}


def _sqlite_add(row: str, sign: str) -> str:
    return f"""
    INSERT INTO migrator_state_counts (job, state, second, writer, objects, bytes)
    VALUES ({row}.job, {row}.state, CAST(strftime('%s', 'now') AS INTEGER), 0,
            {sign}1, {sign}{row}.size)
    {_UPSERT_SQLITE};"""


_SQLITE_TRIGGERS = {
    "migrator_objects_count_insert": "AFTER INSERT ON migrator_objects BEGIN"
    + _sqlite_add("NEW", "")
    + "\nEND",
    "migrator_objects_count_update": "AFTER UPDATE OF job, state, size ON migrator_objects "
    "WHEN OLD.job IS NOT NEW.job OR OLD.state IS NOT NEW.state OR OLD.size IS NOT NEW.size "
    "BEGIN" + _sqlite_add("OLD", "-") + _sqlite_add("NEW", "") + "\nEND",
    "migrator_objects_count_delete": "AFTER DELETE ON migrator_objects BEGIN"
    + _sqlite_add("OLD", "-")
    + "\nEND",
}


def upgrade() -> None:
    op.create_table(
        "migrator_state_counts",
        sa.Column("job", sa.String(100), primary_key=True),
        sa.Column("state", sa.String(16), primary_key=True),
        sa.Column("second", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("writer", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("objects", sa.BigInteger, nullable=False),
        sa.Column("bytes", sa.BigInteger, nullable=False),
    )
    op.drop_index("ix_migrator_objects_lease_owner", table_name="migrator_objects")
    op.create_index(
        "ix_migrator_objects_lease_owner",
        "migrator_objects",
        ["lease_owner"],
        postgresql_where=sa.text("lease_owner IS NOT NULL"),
        sqlite_where=sa.text("lease_owner IS NOT NULL"),
    )
    op.create_index(
        "ix_migrator_objects_errors",
        "migrator_objects",
        ["job", "updated_at"],
        postgresql_where=sa.text("last_error IS NOT NULL"),
        sqlite_where=sa.text("last_error IS NOT NULL"),
    )
    if op.get_context().dialect.name == "postgresql":
        # Every state change leaves a dead entry at the front of the state's index range,
        # which each claim walks until vacuum removes it; the default (20 % of the table)
        # lets two million pile up on a ledger of ten million.
        op.execute(f"ALTER TABLE migrator_objects SET ({_PG_AUTOVACUUM})")
        op.execute(_PG_FUNCTION)
        for name, when in _PG_TRIGGERS.items():
            op.execute(
                f"CREATE TRIGGER {name} {when} FOR EACH STATEMENT "
                "EXECUTE FUNCTION migrator_count_states()"
            )
    else:
        for name, body in _SQLITE_TRIGGERS.items():
            op.execute(f"CREATE TRIGGER {name} {body}")
    # The triggers now hold off writers until this transaction ends: count what is there.
    op.execute(
        "INSERT INTO migrator_state_counts (job, state, second, writer, objects, bytes) "
        "SELECT job, state, 0, 0, count(*), coalesce(sum(size), 0) "
        "FROM migrator_objects GROUP BY job, state"
    )


def downgrade() -> None:
    for name in _PG_TRIGGERS:
        if op.get_context().dialect.name == "postgresql":
            op.execute(f"DROP TRIGGER {name} ON migrator_objects")
        else:
            op.execute(f"DROP TRIGGER {name}")
    if op.get_context().dialect.name == "postgresql":
        op.execute("DROP FUNCTION migrator_count_states()")
        names = ", ".join(setting.split(" = ")[0] for setting in _PG_AUTOVACUUM.split(", "))
        op.execute(f"ALTER TABLE migrator_objects RESET ({names})")
    op.drop_index("ix_migrator_objects_errors", table_name="migrator_objects")
    op.drop_index("ix_migrator_objects_lease_owner", table_name="migrator_objects")
    op.create_index("ix_migrator_objects_lease_owner", "migrator_objects", ["lease_owner"])
    op.drop_table("migrator_state_counts")
