"""Each object's storage class as listed, so a copy can keep it (``storage_class: copy``).

``CopyObject`` writes ``STANDARD`` unless it is told a class, and the class is in the listing
(``ListObjectsV2`` and S3 Inventory report it per object): keeping it in the row costs no
request. ``NULL`` stands for ``STANDARD`` (or a listing that says nothing), the class a copy
gets without asking, so most rows stay as small as before.

A plain ``ADD COLUMN`` on both databases (no batch operation: on SQLite that would recreate
the table and drop the count triggers of revision 0003). Rows planned before this revision
have ``NULL``: their copies are ``STANDARD``, as before it (a re-plan fills in the class of the
rows it resets, those whose ETag changed).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("migrator_objects", sa.Column("storage_class", sa.String(32), nullable=True))


def downgrade() -> None:
    # SQLite drops a column natively since 3.35; no batch copy of the table (see upgrade).
    op.execute("ALTER TABLE migrator_objects DROP COLUMN storage_class")
