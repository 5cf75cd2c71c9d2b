"""``migrator relocate``: one row per relocation of a bucket to another region.

The phase reached (each recorded after its side effect, so a killed run resumes at the phase
it was in), the temporary bucket, and the bucket's configuration as read before the bucket
was deleted (JSON), which a resumed run re-applies as it was. A table of its own: the object
rows of the two copies are ordinary jobs (``<job>.to-temp``, ``<job>.from-temp``).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "migrator_relocations",
        sa.Column("job", sa.String(100), primary_key=True),
        sa.Column("bucket", sa.String(63), nullable=False),
        sa.Column("from_region", sa.String(32), nullable=False),
        sa.Column("to_region", sa.String(32), nullable=False),
        sa.Column("temp_bucket", sa.String(63), nullable=False),
        sa.Column("phase", sa.String(32), nullable=False),
        sa.Column("bucket_config", sa.Text, nullable=True),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("lease_owner", sa.String(200), nullable=True),
        sa.Column("lease_expires", sa.DateTime, nullable=True),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("updated_at", sa.DateTime, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("migrator_relocations")
