"""Initial ledger: jobs and one row per object per job.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "migrator_jobs",
        sa.Column("name", sa.String(100), primary_key=True),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("destination", sa.Text, nullable=False),
        sa.Column("planned_at", sa.DateTime, nullable=True),
        sa.Column("created_at", sa.DateTime, nullable=False),
    )
    op.create_table(
        "migrator_objects",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("job", sa.String(100), nullable=False),
        sa.Column("source_key", sa.String(1024), nullable=False),
        sa.Column("dest_key", sa.String(1024), nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("etag", sa.String(80), nullable=False),
        sa.Column("last_modified", sa.DateTime, nullable=True),
        sa.Column("dest_etag", sa.String(80), nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("failed_stage", sa.String(16), nullable=True),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("lease_owner", sa.String(200), nullable=True),
        sa.Column("lease_expires", sa.DateTime, nullable=True),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("updated_at", sa.DateTime, nullable=False),
        sa.UniqueConstraint("job", "source_key", name="uq_migrator_objects_job_source"),
    )
    op.create_index("ix_migrator_objects_job_state", "migrator_objects", ["job", "state", "id"])
    op.create_index("ix_migrator_objects_lease_owner", "migrator_objects", ["lease_owner"])


def downgrade() -> None:
    op.drop_index("ix_migrator_objects_lease_owner", table_name="migrator_objects")
    op.drop_index("ix_migrator_objects_job_state", table_name="migrator_objects")
    op.drop_table("migrator_objects")
    op.drop_table("migrator_jobs")
