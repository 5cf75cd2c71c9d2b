"""Ledger schema (SQLAlchemy Core). Alembic revisions in ``alembic/versions`` create it."""

from __future__ import annotations

import enum

import sqlalchemy as sa

metadata = sa.MetaData()

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


class State(enum.StrEnum):
    """Where an object is; the values are what the ledger stores."""

    PENDING = "pending"  # planned, not yet copied
    COPIED = "copied"  # destination written and verified (size + ETag)
    REWRITTEN = "rewritten"  # app-DB rows committed with the destination key
    DONE = "done"  # source deleted per policy (or kept under delete_source: never)
    FAILED = "failed"  # attempts exhausted or a permanent error; last_error says why
    SKIPPED = "skipped"  # on_conflict: skip — left alone on purpose; last_error says why


class Phase(enum.StrEnum):
    """Where a ``migrator relocate`` is: the step it does next (or is doing). The values are
    what the ledger stores; the order is the order of the steps."""

    CREATE_TEMP = "create_temp"  # create the temporary bucket in the target region
    COPY_OUT = "copy_out"  # copy the bucket into it (job <job>.to-temp) and verify
    CHECK_SOURCE = "check_source"  # save the bucket's configuration; nothing new since the copy
    EMPTY_SOURCE = "empty_source"  # delete every version, then the bucket
    RECREATE = "recreate"  # create the bucket again, in the target region
    CONFIGURE = "configure"  # re-apply its configuration (all but lifecycle and policy)
    COPY_BACK = "copy_back"  # copy the objects back (job <job>.from-temp) and verify
    FINISH_CONFIG = "finish_config"  # re-apply the lifecycle rules and the bucket policy
    DELETE_TEMP = "delete_temp"  # empty and delete the temporary bucket
    DONE = "done"


class Stage(enum.StrEnum):
    COPY = "copy"
    REWRITE = "rewrite"
    DELETE = "delete"


jobs = sa.Table(
    "migrator_jobs",
    metadata,
    sa.Column("name", sa.String(100), primary_key=True),
    sa.Column("source", sa.Text, nullable=False),
    sa.Column("destination", sa.Text, nullable=False),
    sa.Column("planned_at", sa.DateTime, nullable=True),
    sa.Column("created_at", sa.DateTime, nullable=False),
    sa.Column("s3_retries", sa.BigInteger, nullable=False, server_default="0"),
)

objects = sa.Table(
    "migrator_objects",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("job", sa.String(100), nullable=False),
    sa.Column("source_key", sa.String(1024), nullable=False),
    sa.Column("dest_key", sa.String(1024), nullable=False),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("etag", sa.String(80), nullable=False),
    sa.Column("last_modified", sa.DateTime, nullable=True),
    sa.Column("dest_etag", sa.String(80), nullable=True),
    # The listed storage class; NULL for STANDARD, which a copy gets without asking (0005).
    sa.Column("storage_class", sa.String(32), nullable=True),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("failed_stage", sa.String(16), nullable=True),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("last_error", sa.Text, nullable=True),
    sa.Column("lease_owner", sa.String(200), nullable=True),
    sa.Column("lease_expires", sa.DateTime, nullable=True),
    sa.Column("created_at", sa.DateTime, nullable=False),
    sa.Column("updated_at", sa.DateTime, nullable=False),
    sa.UniqueConstraint("job", "source_key", name="uq_migrator_objects_job_source"),
    # One destination per job: a keys rule mapping two sources to one key is refused at plan.
    sa.Index("uq_migrator_objects_job_dest", "job", "dest_key", unique=True),
    # Claims (one range per state, in id order), the delete gate, "any rows left?".
    sa.Index("ix_migrator_objects_job_state", "job", "state", "id"),
    # Heartbeats and releases by owner; only leased rows are in it (revision 0003).
    sa.Index(
        "ix_migrator_objects_lease_owner",
        "lease_owner",
        postgresql_where=sa.text("lease_owner IS NOT NULL"),
        sqlite_where=sa.text("lease_owner IS NOT NULL"),
    ),
    # ``status``'s recent errors; only rows that carry an error are in it (revision 0003).
    sa.Index(
        "ix_migrator_objects_errors",
        "job",
        "updated_at",
        postgresql_where=sa.text("last_error IS NOT NULL"),
        sqlite_where=sa.text("last_error IS NOT NULL"),
    ),
)

# Objects and bytes per job and state, kept by triggers on ``migrator_objects`` in the same
# transaction as the change (revision 0003), so ``status`` and the progress display read a
# few rows instead of counting millions. A row is a delta: ``second`` is when it was written
# (Unix seconds; 0 for history folded together by older versions), ``writer`` the Postgres
# transaction id that wrote it (0 on SQLite, which has one writer at a time), so concurrent
# Postgres transactions never update the same row and never wait for each other. The counts of
# a job are the sums of its rows; ``Ledger.fold_counts`` folds old rows into one per state and
# minute (``writer`` 0), which keeps the job's throughput over time.
state_counts = sa.Table(
    "migrator_state_counts",
    metadata,
    sa.Column("job", sa.String(100), primary_key=True),
    sa.Column("state", sa.String(16), primary_key=True),
    sa.Column("second", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("writer", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("objects", sa.BigInteger, nullable=False),
    sa.Column("bytes", sa.BigInteger, nullable=False),
)

# The versions of each listed key, when a job lists versions (``versions: all``, or
# ``delete_versions: true``; revision 0007). ``seq`` orders a key's versions, oldest first, and
# only grows: a re-plan appends the versions written since. ``dest_version_id`` is recorded
# after the version's copy is verified and before the next version of the key is copied;
# under ``versions: latest`` it stays NULL (the object row's copy is the current version's).
versions = sa.Table(
    "migrator_versions",
    metadata,
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

# One row per ``migrator relocate`` (named by the config's job): the bucket, the regions, the
# temporary bucket and the phase reached, each phase recorded after its side effect (revision
# 0006). ``bucket_config`` is the bucket's configuration as read before it was deleted (JSON),
# so a resumed run re-applies exactly that. The lease keeps two runs of one relocation apart.
relocations = sa.Table(
    "migrator_relocations",
    metadata,
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
