"""One destination key per job: a unique index on ``(job, dest_key)``.

A ``keys.pattern`` rule can map two source keys to one destination key; copying both would
leave only the last one at the destination and delete the other's source. ``migrator plan``
refuses such a rule page by page in memory, and across pages by this index: the insert of a
colliding row fails, and the plan names both source keys. Without the index that check would
need every planned key in memory or a query per page.

Creating an index is no batch operation, so SQLite keeps the count triggers of revision 0003.
Upgrading a ledger whose job already holds two rows with one destination key fails (a ledger
planned under a destination prefix that was later changed could, in theory, hold such rows);
the error names the index, and such a job must be finished or dropped before upgrading.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "uq_migrator_objects_job_dest", "migrator_objects", ["job", "dest_key"], unique=True
    )


def downgrade() -> None:
    op.drop_index("uq_migrator_objects_job_dest", table_name="migrator_objects")
