"""Count the S3 retries botocore made for a job (shown by ``migrator status``).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("migrator_jobs") as batch:
        batch.add_column(sa.Column("s3_retries", sa.BigInteger, nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("migrator_jobs") as batch:
        batch.drop_column("s3_retries")
