"""Versioned sources: one row per object version a job lists (``versions: all``, or
``delete_versions: true``), beside the object's own row.

The object row still stands for the key (its app rows, its stages); the versions of the key
are copied in ``seq`` order (oldest first) and each copy's destination version id is recorded
before the next is made, so a killed run neither skips nor repeats a version. The source
deletes of ``delete_versions`` remove exactly these version ids.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "migrator_versions",
        sa.Column("job", sa.String(100), primary_key=True),
        sa.Column("source_key", sa.String(1024), primary_key=True),
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("version_id", sa.String(1024), nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("etag", sa.String(80), nullable=False),
        sa.Column("last_modified", sa.DateTime, nullable=True),
        sa.Column("storage_class", sa.String(32), nullable=True),
        sa.Column("dest_version_id", sa.String(1024), nullable=True),
        sa.Column("dest_etag", sa.String(80), nullable=True),
        sa.Column("copied_at", sa.DateTime, nullable=True),
        sa.UniqueConstraint(
            "job", "source_key", "version_id", name="uq_migrator_versions_job_key_version"
        ),
    )


def downgrade() -> None:
    op.drop_table("migrator_versions")
