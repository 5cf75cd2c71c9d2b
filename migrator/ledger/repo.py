"""Every ledger query lives here. Workers, the CLI and reports call these functions.

Claims take a lease (owner + expiry) in one statement: ``FOR UPDATE SKIP LOCKED`` on Postgres,
a ``BEGIN IMMEDIATE`` transaction on SQLite (WAL mode). Every state change is conditioned on the
caller still holding the lease, so a worker whose lease was taken over cannot move a row back.
"""

from __future__ import annotations

import contextlib
import enum
import os
import socket
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError

from migrator.errors import ConfigError, LedgerError, NoLedgerError, db_reason
from migrator.ledger.tables import (
    Phase,
    Stage,
    State,
    jobs,
    objects,
    relocations,
    state_counts,
    versions,
)

ALEMBIC_DIR = Path(__file__).resolve().parents[2] / "alembic"
SCHEMA_HEAD = "0007"  # the newest Alembic revision (a test pins it to alembic/versions)
VERSION_TABLE = "migrator_alembic_version"
_PG_MIGRATION_LOCK = 0x6D696772  # advisory lock id so concurrent hosts migrate one at a time
_PG_FOLD_LOCK = 0x6D696773  # advisory lock id (with the job's hash): one fold_counts at a time
FOLD_AFTER_SECONDS = 300  # count rows older than this are folded together ...
FOLD_WHEN_ROWS = 500  # ... once there are this many of them
MINUTE = 60  # ... into one row per state and minute

O = objects.c  # noqa: E741 - short alias for column access in queries
C = state_counts.c
V = versions.c


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


@dataclass(frozen=True)
class ObjectRow:
    id: int
    source_key: str
    dest_key: str
    size: int
    etag: str
    dest_etag: str | None
    state: State
    attempts: int
    storage_class: str | None = None  # as listed; None for STANDARD


@dataclass(frozen=True)
class VersionRow:
    """One source version of a key (``migrator_versions``), in ``seq`` order."""

    source_key: str
    seq: int
    version_id: str
    size: int
    etag: str
    storage_class: str | None
    dest_version_id: str | None  # set once its copy is verified
    dest_etag: str | None  # set then, or (a copy in parts) just before its completion


@dataclass(frozen=True)
class NewVersion:
    """A listed object version for :meth:`Ledger.add_versions`."""

    version_id: str
    size: int
    etag: str
    last_modified: datetime | None
    storage_class: str | None


@dataclass(frozen=True)
class Rates:
    """Throughput over the last ``window_seconds``: copies (rows that moved past ``pending``)
    and finished objects, each as objects and bytes per second."""

    window_seconds: float
    copied_objects: float
    copied_bytes: float
    done_objects: float
    done_bytes: float


@dataclass(frozen=True)
class Planned:
    source_key: str
    dest_key: str
    size: int
    etag: str
    last_modified: datetime | None
    storage_class: str | None = None  # None for STANDARD (``ListedObject``)


@dataclass(frozen=True)
class PlanResult:
    added: int
    reset: int
    unchanged: int
    remapped: int = 0  # never-copied rows given a new destination key by a changed rule
    dropped: int = 0  # never-copied rows removed: the rule no longer selects their key


class DoneRows(enum.Enum):
    """What a re-plan does with a ``done`` row whose key is in the page (docs/cutover.md)."""

    KEEP = "keep"  # a snapshot (an S3 Inventory report): it may predate the migration
    CHANGED = "changed"  # a live listing, sources kept: reset when the ETag differs
    LISTED = "listed"  # a live listing, sources deleted: being listed means uploaded again


_PLAN_TRIES = 3


def collision_message(first: str, second: str, dest_key: str) -> str:
    """The one line refusing a key rule that maps two sources to one destination."""
    return (
        f"keys rule maps two source keys to one destination: {first!r} and {second!r} both "
        f"map to {dest_key!r}; change keys.pattern/keys.replace (or keys.exclude one of "
        "them) and run `migrator plan` again"
    )


_ROW_COLS = (
    O.id,
    O.source_key,
    O.dest_key,
    O.size,
    O.etag,
    O.dest_etag,
    O.state,
    O.attempts,
    O.storage_class,
)


_STATE_OF = {s.value: s for s in State}


def _row(r: Any) -> ObjectRow:
    """A row of ``_ROW_COLS`` (a chunk is hundreds of them: no lookups by name)."""
    id_, source_key, dest_key, size, etag, dest_etag, state, attempts, storage_class = r
    return ObjectRow(
        id_, source_key, dest_key, size, etag, dest_etag, _STATE_OF[state], attempts, storage_class
    )


def safe_url(url: str | URL) -> str:
    return make_url(url).render_as_string(hide_password=True)


def make_engine(url: str) -> Engine:
    """An engine for the ledger; SQLite gets WAL, a busy timeout and BEGIN IMMEDIATE."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(parsed, connect_args={"timeout": 60})

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=60000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: sa.Connection) -> None:
            # Writers take the write lock up front (no upgrade deadlocks); readers don't.
            readonly = conn.get_execution_options().get("migrator_readonly", False)
            conn.exec_driver_sql("BEGIN" if readonly else "BEGIN IMMEDIATE")

        return engine
    return sa.create_engine(
        parsed,
        pool_pre_ping=True,
        pool_size=4,
        max_overflow=8,
        connect_args={"connect_timeout": 10},
    )


def schema_revision(engine: Engine) -> str | None:
    """The ledger's Alembic revision, or None when it has none (empty or a newer layout)."""
    with engine.connect().execution_options(migrator_readonly=True) as conn:
        if not sa.inspect(conn).has_table(VERSION_TABLE):
            return None
        versions = list(conn.execute(sa.text(f"SELECT version_num FROM {VERSION_TABLE}")).scalars())
    return versions[0] if len(versions) == 1 else None


def upgrade_schema(engine: Engine) -> None:
    """Create or upgrade the ledger tables to the newest Alembic revision. A ledger already
    there costs one query: loading Alembic and its scripts takes most of a second, which
    ``migrator status`` should not pay."""
    if schema_revision(engine) == SCHEMA_HEAD:
        return
    from alembic import command  # only the supervisor and CLI migrate; workers never do
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(ALEMBIC_DIR))
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


def open_ledger(url: str, *, upgrade: bool = True) -> Engine:
    """Connect (and by default create/upgrade the schema); a clear LedgerError otherwise."""
    engine = make_engine(url)
    try:
        if upgrade:
            upgrade_schema(engine)
        else:
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
    except (OperationalError, SQLAlchemyError, OSError) as exc:
        engine.dispose()
        reason = db_reason(exc)
        raise LedgerError(f"ledger {safe_url(url)} is not usable: {reason}") from None
    return engine


def open_existing_ledger(url: str) -> Engine:
    """Open a ledger that must already exist (read-only commands create nothing)."""
    parsed = make_url(url)
    missing = NoLedgerError(
        f"no ledger in {safe_url(url)}; run `migrator plan` or `migrator run` first"
    )
    if (
        parsed.get_backend_name() == "sqlite"
        and parsed.database
        and not Path(parsed.database).exists()
    ):
        raise missing
    engine = open_ledger(url, upgrade=False)
    if not sa.inspect(engine).has_table(jobs.name):
        engine.dispose()
        raise missing
    upgrade_schema(engine)
    return engine


def lease_owner_id(worker: int, pid: int | None = None) -> str:
    """``host:pid:worker`` of a worker process: lets a run on the same host see that the
    owner of a lease is dead and free its rows at once instead of waiting for expiry."""
    return f"{socket.gethostname()}:{os.getpid() if pid is None else pid}:{worker}"


def _dead_local(owner: str) -> bool:
    """Whether a lease owner (``host:pid:…``) is a process of this host that has ended."""
    parts = owner.split(":")
    return (
        len(parts) >= 3
        and ":".join(parts[:-2]) == socket.gethostname()
        and parts[-2].isdigit()
        and not _pid_alive(int(parts[-2]))
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Ledger:
    """The rows of one job."""

    def __init__(self, engine: Engine, job: str) -> None:
        self.engine = engine
        self.job = job

    def _read(self) -> sa.Connection:
        """A connection for queries that write nothing (no SQLite write lock)."""
        return self.engine.connect().execution_options(migrator_readonly=True)

    # -- jobs -----------------------------------------------------------------------------
    def ensure_job(self, source: str, destination: str) -> None:
        """Register the job (once; another host may do it at the same moment)."""
        with contextlib.suppress(IntegrityError), self.engine.begin() as conn:
            found = conn.execute(sa.select(jobs.c.name).where(jobs.c.name == self.job)).first()
            if found is None:
                conn.execute(
                    jobs.insert().values(
                        name=self.job,
                        source=source,
                        destination=destination,
                        created_at=utcnow(),
                    )
                )

    def is_planned(self) -> bool:
        with self._read() as conn:
            at = conn.execute(
                sa.select(jobs.c.planned_at).where(jobs.c.name == self.job)
            ).scalar_one_or_none()
        return at is not None

    def mark_planned(self) -> None:
        """The job is planned. On Postgres, refresh the planner's statistics of the ledger,
        which just grew by the whole listing: believing the job still small, the planner
        would scan it in full for every page of a re-plan, or sort it for every claim
        (autovacuum does this too, but late, or never where it is off)."""
        with self.engine.begin() as conn:
            conn.execute(jobs.update().where(jobs.c.name == self.job).values(planned_at=utcnow()))
        if self.engine.dialect.name == "postgresql":
            # Best effort: a ledger table owned by another role cannot be analysed by us.
            with contextlib.suppress(SQLAlchemyError), self.engine.begin() as conn:
                conn.exec_driver_sql(f"ANALYZE {objects.name}")

    def add_s3_retries(self, n: int) -> None:
        if n:
            with self.engine.begin() as conn:
                conn.execute(
                    jobs.update()
                    .where(jobs.c.name == self.job)
                    .values(s3_retries=jobs.c.s3_retries + n)
                )

    def s3_retries(self) -> int:
        with self._read() as conn:
            n = conn.execute(
                sa.select(jobs.c.s3_retries).where(jobs.c.name == self.job)
            ).scalar_one_or_none()
        return int(n or 0)

    def list_jobs(self) -> list[str]:
        with self._read() as conn:
            return list(conn.execute(sa.select(jobs.c.name).order_by(jobs.c.name)).scalars())

    # -- plan -----------------------------------------------------------------------------
    def upsert_page(
        self,
        page: Sequence[Planned],
        dropped: Sequence[str] = (),
        *,
        replan: bool = False,
        done_rows: DoneRows = DoneRows.KEEP,
    ) -> PlanResult:
        """Add new objects, reset changed ones (ETag differs) to pending, keep the rest.

        One transaction: an insert that skips keys already there, then — only when some
        were — an update of the rows whose ETag changed (the lease is cleared, ``dest_etag``
        kept). A fresh job costs one statement per page; a re-plan up to two more (below).

        ``done_rows`` (see ``DoneRows``) says whether a ``done`` row is reset too. From a live
        listing (``CHANGED``, ``LISTED``) it is when its key is listed with another ETag: the
        object at the source is not the one migrated (overwritten under ``delete_source:
        never``, or uploaded again after its delete), and in a live bucket it must move as
        well. When the job deletes its sources (``LISTED``), a listed ``done`` key is reset
        even with the same ETag: its source was deleted, so it was uploaded again, and app
        rows may point at it again. The copy then finds the destination written by this job
        (``dest_etag``) and overwrites it or accepts it as is; I1 holds as for any row. A
        snapshot (``KEEP``) may be older than the migration: it leaves ``done`` rows alone.

        On a re-plan (``replan``: the job had rows before this plan), rows never copied
        (``pending`` with no ``dest_etag``) and held by no worker (its copy may be in flight)
        follow the current key rule: one whose destination
        key changed is planned afresh with the new key (deleted, then inserted: its attempts
        and last error go), and the rows of ``dropped`` keys (listed, but no longer selected by
        the rule) leave the job. Any other row keeps its destination key: a verified copy is
        or was there, and app rows may already point at it.

        A destination key that another source of the job already has violates the unique
        index on ``(job, dest_key)``; the page is rolled back and a ``ConfigError`` names
        both source keys. A violation without such a pair (two hosts planning the same page
        at once) is retried.
        """
        if not page and not (replan and dropped):
            return PlanResult(0, 0, 0)
        for attempt in range(_PLAN_TRIES):
            now = utcnow()
            try:
                with self.engine.begin() as conn:
                    if conn.dialect.name == "postgresql":
                        added, reset, remapped, gone = _upsert_page_postgres(
                            conn,
                            self.job,
                            page,
                            dropped if replan else (),
                            now,
                            replan=replan,
                            done_rows=done_rows,
                        )
                    else:
                        added, reset, remapped, gone = _upsert_page_sqlite(
                            conn,
                            self.job,
                            page,
                            dropped if replan else (),
                            now,
                            replan=replan,
                            done_rows=done_rows,
                        )
            except IntegrityError:
                clash = self._dest_clash(page)
                if clash is not None:
                    raise ConfigError(clash) from None
                if attempt == _PLAN_TRIES - 1:
                    raise
                continue
            unchanged = len(page) - added - remapped - reset
            return PlanResult(added, reset, unchanged, remapped, gone)
        raise AssertionError("unreachable")

    def _dest_clash(self, page: Sequence[Planned]) -> str | None:
        """The message for a page's destination key that another source already holds."""
        wanted = {p.dest_key: p.source_key for p in page}
        with self._read() as conn:
            held = conn.execute(
                sa.select(O.source_key, O.dest_key).where(
                    O.job == self.job, O.dest_key.in_(list(wanted))
                )
            ).all()
        for source_key, dest_key in held:
            if wanted[dest_key] != source_key:
                return collision_message(source_key, wanted[dest_key], dest_key)
        return None

    def add_versions(self, listed: dict[str, Sequence[NewVersion]]) -> int:
        """Record each key's listed versions (oldest first) that the ledger does not have yet,
        after those it has (``seq`` only grows: a re-plan appends the versions written since).
        Called before the page's object rows are upserted, so a worker that claims a key's
        row finds its versions. Returns how many versions were added."""
        if not listed:
            return 0
        for attempt in range(_PLAN_TRIES):
            try:
                with self.engine.begin() as conn:
                    have: dict[str, tuple[set[str], int]] = {}
                    for key, vid, seq in conn.execute(
                        sa.select(V.source_key, V.version_id, V.seq).where(
                            V.job == self.job, V.source_key.in_(list(listed))
                        )
                    ):
                        ids, top = have.get(key, (set(), 0))
                        ids.add(vid)
                        have[key] = (ids, max(top, seq))
                    rows: list[dict[str, Any]] = []
                    for key, found in listed.items():
                        ids, top = have.get(key, (set(), 0))
                        for v in found:
                            if v.version_id in ids:
                                continue
                            top += 1
                            rows.append(
                                {
                                    "job": self.job,
                                    "source_key": key,
                                    "seq": top,
                                    "version_id": v.version_id,
                                    "size": v.size,
                                    "etag": v.etag,
                                    "last_modified": _naive(v.last_modified),
                                    "storage_class": v.storage_class,
                                }
                            )
                    if rows:
                        conn.execute(versions.insert(), rows)
                    return len(rows)
            except IntegrityError:  # another host planned the same keys at once
                if attempt == _PLAN_TRIES - 1:
                    raise
        raise AssertionError("unreachable")

    def versions_of(self, source_keys: Sequence[str]) -> dict[str, list[VersionRow]]:
        """The recorded versions of these keys, oldest first, by key."""
        out: dict[str, list[VersionRow]] = {}
        if not source_keys:
            return out
        with self._read() as conn:
            for r in conn.execute(
                sa.select(
                    V.source_key,
                    V.seq,
                    V.version_id,
                    V.size,
                    V.etag,
                    V.storage_class,
                    V.dest_version_id,
                    V.dest_etag,
                )
                .where(V.job == self.job, V.source_key.in_(list(source_keys)))
                .order_by(V.source_key, V.seq)
            ):
                out.setdefault(r[0], []).append(VersionRow(*r))
        return out

    def version_counts(self) -> dict[str, int]:
        """The job's recorded versions and those copied, as objects and bytes (one pass over
        the job's versions: ``status`` of a job of every version)."""
        copied = V.dest_version_id.is_not(None)
        with self._read() as conn:
            row = conn.execute(
                sa.select(
                    sa.func.count(),
                    sa.func.coalesce(sa.func.sum(V.size), 0),
                    sa.func.count(V.dest_version_id),
                    sa.func.coalesce(sa.func.sum(sa.case((copied, V.size), else_=0)), 0),
                ).where(V.job == self.job)
            ).one()
        names = ("recorded", "recorded_bytes", "copied", "copied_bytes")
        return dict(zip(names, map(int, row), strict=True))

    def record_version(
        self,
        owner: str,
        row_id: int,
        version: VersionRow,
        dest_etag: str,
        dest_version_id: str | None,
    ) -> bool:
        """A version's copy: with ``dest_version_id``, verified (the key's next version may be
        copied now); without, the ETag a copy in parts is about to get, recorded before its
        completion so a run killed right after it knows the object as its own. Only while
        ``owner`` holds the key's object row; False when it does not (lease lost)."""
        with self.engine.begin() as conn:
            held = conn.execute(
                sa.select(O.id)
                .where(O.id == row_id, O.lease_owner == owner)
                .with_for_update()  # the lease cannot change hands before this commits
            ).first()
            if held is None:
                return False
            conn.execute(
                versions.update()
                .where(
                    V.job == self.job,
                    V.source_key == version.source_key,
                    V.seq == version.seq,
                )
                .values(
                    dest_etag=dest_etag,
                    dest_version_id=dest_version_id,
                    copied_at=utcnow() if dest_version_id is not None else None,
                )
            )
        return True

    def has_rows(self) -> bool:
        """Whether the job has any row (a plan before this one got at least one page in)."""
        with self._read() as conn:
            return (
                conn.execute(sa.select(O.id).where(O.job == self.job).limit(1)).first() is not None
            )

    def states_of(self, source_keys: Sequence[str]) -> dict[str, str]:
        """The ledger state of each of these source keys that the job has a row for."""
        if not source_keys:
            return {}
        with self._read() as conn:
            return dict(
                conn.execute(
                    sa.select(O.source_key, O.state).where(
                        O.job == self.job, O.source_key.in_(list(source_keys))
                    )
                ).all()
            )

    def rows_for_keys(self, source_keys: Sequence[str]) -> dict[str, ObjectRow]:
        """The job's rows for these source keys (those it has), by source key."""
        if not source_keys:
            return {}
        with self._read() as conn:
            rows = conn.execute(
                sa.select(*_ROW_COLS).where(O.job == self.job, O.source_key.in_(list(source_keys)))
            ).all()
        return {r.source_key: r for r in map(_row, rows)}

    def replan_row(
        self,
        owner: str,
        row: ObjectRow,
        etag: str,
        size: int,
        note: str,
        max_attempts: int,
        *,
        storage_class: str | None = None,
    ) -> None:
        """The source changed under us: take its new ETag, size and storage class and copy
        it afresh. This counts as an attempt, so a source that never stops changing ends
        ``failed``."""
        with self.engine.begin() as conn:
            done = conn.execute(
                objects.update()
                .where(O.id == row.id, O.lease_owner == owner)
                .values(
                    etag=etag,
                    size=size,
                    storage_class=storage_class,
                    state=State.PENDING.value,
                    attempts=O.attempts + 1,
                    last_error=note,
                    lease_owner=None,
                    lease_expires=None,
                    updated_at=utcnow(),
                )
            ).rowcount
            if done:
                conn.execute(
                    objects.update()
                    .where(O.id == row.id, O.attempts >= max_attempts)
                    .values(state=State.FAILED.value, failed_stage=Stage.COPY.value)
                )

    # -- claims and leases ----------------------------------------------------------------
    def claim(
        self, owner: str, states: Iterable[State], limit: int, lease_seconds: int
    ) -> list[ObjectRow]:
        """Lease up to ``limit`` free rows in ``states``, lowest ids first."""
        stmt = self.claim_statement(owner, states, limit, lease_seconds)
        if stmt is None:
            return []
        with self.engine.begin() as conn:
            rows = [_row(r) for r in conn.execute(stmt)]
        return sorted(rows, key=lambda r: r.id)

    def claim_ids(
        self, owner: str, ids: Sequence[int], states: Iterable[State], lease_seconds: int
    ) -> list[ObjectRow]:
        """Lease these rows, those of them that are free and in ``states``."""
        if not ids:
            return []
        now = utcnow()
        with self.engine.begin() as conn:
            rows = conn.execute(
                objects.update()
                .where(
                    O.id.in_(list(ids)),
                    O.state.in_([s.value for s in states]),
                    sa.or_(O.lease_expires.is_(None), O.lease_expires < now),
                )
                .values(lease_owner=owner, lease_expires=now + timedelta(seconds=lease_seconds))
                .returning(*_ROW_COLS)
            ).all()
        return [_row(r) for r in rows]

    def claim_statement(
        self, owner: str, states: Iterable[State], limit: int, lease_seconds: int
    ) -> sa.Update | None:
        """The claim as one UPDATE. Its rows come from one range of the ``(job, state, id)``
        index per state, each read in id order up to ``limit`` free rows (``SKIP LOCKED`` on
        Postgres), then the lowest ``limit`` ids of them: the same rows as ``state IN (…)
        ORDER BY id``, which neither database can read from that index without sorting every
        row in those states."""
        now = utcnow()
        free = sa.or_(O.lease_expires.is_(None), O.lease_expires < now)
        picks = [
            sa.select(O.id)
            # ``state BETWEEN s AND s`` is ``state = s``, and ORDER BY state, id is then
            # ORDER BY id; but spelled so, only the (job, state, id) index yields that order.
            # With ``state = s`` Postgres drops the constant from the sort key and may read
            # the primary key from id 1 instead, through every done row (seconds on a job of
            # millions half done), as it assumes pending ids are spread evenly.
            .where(O.job == self.job, O.state.between(state.value, state.value), free)
            .order_by(O.state, O.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
            .subquery()
            for state in dict.fromkeys(State(s) for s in states)
        ]
        if not picks:
            return None
        if len(picks) == 1:
            pick = sa.select(picks[0].c.id)
        else:
            every = sa.union_all(*[sa.select(p.c.id) for p in picks]).subquery()
            pick = sa.select(every.c.id).order_by(every.c.id).limit(limit)
        return (
            objects.update()
            .where(O.id.in_(pick.scalar_subquery()))
            .values(lease_owner=owner, lease_expires=now + timedelta(seconds=lease_seconds))
            .returning(*_ROW_COLS)
        )

    def heartbeat(self, owner: str, lease_seconds: int) -> int:
        with self.engine.begin() as conn:
            return conn.execute(
                objects.update()
                .where(O.lease_owner == owner)
                .values(lease_expires=utcnow() + timedelta(seconds=lease_seconds))
            ).rowcount

    def release(self, owner: str, ids: Sequence[int] | None = None) -> int:
        """Give rows back (all of the owner's, or ``ids``) so others may claim them at once."""
        cond = [O.lease_owner == owner]
        if ids is not None:
            if not ids:
                return 0
            cond.append(O.id.in_(list(ids)))
        with self.engine.begin() as conn:
            return conn.execute(
                objects.update().where(*cond).values(lease_owner=None, lease_expires=None)
            ).rowcount

    def reclaim_dead_local_leases(self) -> int:
        """Release leases of processes on this host that no longer exist (killed workers)."""
        host = socket.gethostname()
        with self._read() as conn:
            owners = list(
                conn.execute(
                    sa.select(O.lease_owner)
                    .where(O.job == self.job, O.lease_owner.like(f"{host}:%"))
                    .distinct()
                ).scalars()
            )
        freed = 0
        for owner in owners:
            parts = owner.split(":")
            if len(parts) >= 3 and parts[-2].isdigit() and not _pid_alive(int(parts[-2])):
                freed += self.release(owner)
        return freed

    # -- stage results ----------------------------------------------------------------------
    def _held(self, conn: sa.Connection, owner: str, ids: Sequence[int]) -> list[int]:
        """Which of ``ids`` the owner still holds (inside the caller's transaction)."""
        return list(
            conn.execute(
                sa.select(O.id).where(O.id.in_(list(ids)), O.lease_owner == owner)
            ).scalars()
        )

    def held_in_state(self, owner: str, ids: Sequence[int], state: State) -> set[int]:
        """Rows of ``ids`` the owner still holds in ``state`` (checked right before a delete)."""
        if not ids:
            return set()
        with self._read() as conn:
            return set(
                conn.execute(
                    sa.select(O.id).where(
                        O.id.in_(list(ids)), O.lease_owner == owner, O.state == state.value
                    )
                ).scalars()
            )

    def record_copied(
        self,
        owner: str,
        results: Sequence[tuple[int, str]],
        state: State = State.COPIED,
        *,
        release: bool = False,
    ) -> set[int]:
        """Copies verified: ``(row id, destination ETag)``, recorded as ``state`` (``copied``;
        a job without an app database has nothing to rewrite and records the state after the
        rewrite at once). ``release`` gives the rows back in the same statement, for rows
        this worker takes no further. Returns the ids recorded: a row whose lease was lost
        (re-planned, taken over) is not, and must not go further."""
        if not results:
            return set()
        now = utcnow()
        with self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                # One statement for the chunk: an executemany would be a round trip, an
                # UPDATE and a run of the count trigger per row (a quarter second per 1,000).
                sql = _RECORD_COPIED_POSTGRES.format(release=_RELEASE_SQL if release else "")
                params = {
                    "ids": [i for i, _ in results],
                    "etags": [e for _, e in results],
                    "state": state.value,
                    "now": now,
                    "owner": owner,
                }
                return set(conn.execute(sa.text(sql), params).scalars())
            held = set(self._held(conn, owner, [i for i, _ in results]))
            mine = [(i, e) for i, e in results if i in held]
            if mine:  # SQLite runs the executemany in-process: no round trips
                conn.execute(
                    objects.update()
                    .where(O.id == sa.bindparam("b_id"))
                    .values(
                        state=state.value,
                        dest_etag=sa.bindparam("b_etag"),
                        last_error=None,
                        updated_at=now,
                        **_released(release),
                    ),
                    [{"b_id": i, "b_etag": e} for i, e in mine],
                )
        return held

    def record_dest_etag(self, owner: str, row_id: int, etag: str) -> bool:
        """The ETag a multipart copy is about to give the destination, recorded before the
        upload is completed (see ``stages._copy_large``); False when the lease is lost."""
        with self.engine.begin() as conn:
            return (
                conn.execute(
                    objects.update()
                    .where(O.id == row_id, O.lease_owner == owner)
                    .values(dest_etag=etag, updated_at=utcnow())
                ).rowcount
                == 1
            )

    def record_state(
        self, owner: str, ids: Sequence[int], state: State, *, release: bool = False
    ) -> set[int]:
        """Move rows the owner holds to ``state`` (rewritten or done), and with ``release``
        give them back in the same statement; returns the ids moved."""
        if not ids:
            return set()
        with self.engine.begin() as conn:
            return set(
                conn.execute(
                    objects.update()
                    .where(O.id.in_(list(ids)), O.lease_owner == owner)
                    .values(
                        state=state.value,
                        last_error=None,
                        updated_at=utcnow(),
                        **_released(release),
                    )
                    .returning(O.id)
                ).scalars()
            )

    def record_skipped(self, owner: str, skipped: Sequence[tuple[int, str]]) -> None:
        """Rows left alone on purpose (``on_conflict: skip``): source, destination and app rows
        untouched, never deleted; ``last_error`` says why."""
        if not skipped:
            return
        with self.engine.begin() as conn:
            conn.execute(
                objects.update()
                .where(O.id == sa.bindparam("b_id"), O.lease_owner == owner)
                .values(
                    state=State.SKIPPED.value,
                    last_error=sa.bindparam("b_err"),
                    lease_owner=None,
                    lease_expires=None,
                    updated_at=utcnow(),
                ),
                [{"b_id": i, "b_err": e} for i, e in skipped],
            )

    def record_failures(
        self,
        owner: str,
        failures: Sequence[tuple[ObjectRow, str]],
        stage: Stage,
        max_attempts: int,
        *,
        permanent: bool = False,
    ) -> None:
        """Count an attempt and keep the error; rows out of attempts (or permanent) fail.

        A row that may be retried is released with a backoff: its lease expiry is set in the
        future so no worker picks it up again at once.
        """
        if not failures:
            return
        now = utcnow()
        with self.engine.begin() as conn:
            held = set(self._held(conn, owner, [r.id for r, _ in failures]))
            mine = [(r, e) for r, e in failures if r.id in held]
            if not mine:
                return
            conn.execute(
                objects.update()
                .where(O.id == sa.bindparam("b_id"))
                .values(
                    attempts=O.attempts + 1,
                    last_error=sa.bindparam("b_err"),
                    lease_owner=None,
                    lease_expires=sa.bindparam("b_backoff"),
                    updated_at=now,
                ),
                [
                    {"b_id": r.id, "b_err": e[:2000], "b_backoff": now + _backoff(r.attempts)}
                    for r, e in mine
                ],
            )
            conn.execute(
                objects.update()
                .where(O.id.in_(list(held)), sa.true() if permanent else O.attempts >= max_attempts)
                .values(state=State.FAILED.value, failed_stage=stage.value, lease_expires=None)
            )

    def retry_failed(self) -> int:
        with self.engine.begin() as conn:
            return conn.execute(
                objects.update()
                .where(O.job == self.job, O.state == State.FAILED.value)
                .values(
                    state=State.PENDING.value,
                    attempts=0,
                    failed_stage=None,
                    lease_owner=None,
                    lease_expires=None,
                    updated_at=utcnow(),
                )
            ).rowcount

    # -- questions the workers ask --------------------------------------------------------
    def delete_gate_open(self) -> bool:
        """``after_all``: true when the job is planned (workers start while ``run`` still
        lists it), no row still needs copying or rewriting, and none failed before its
        rewrite was committed (rclone's rule: no deletes after I/O errors)."""
        # Two EXISTS, each an index range of its own: with one OR, SQLite walks the job's
        # rows in index order and, once no row is copied, reads every done row first.
        unfinished = sa.exists().where(
            O.job == self.job, O.state.in_([State.PENDING.value, State.COPIED.value])
        )
        failed_before_rewrite = sa.exists().where(
            O.job == self.job,
            O.state == State.FAILED.value,
            sa.func.coalesce(O.failed_stage, "") != Stage.DELETE.value,
        )
        unplanned = sa.exists().where(jobs.c.name == self.job, jobs.c.planned_at.is_(None))
        with self._read() as conn:
            blocked = conn.execute(
                sa.select(sa.or_(unplanned, unfinished, failed_before_rewrite))
            ).scalar()
        return not blocked

    def any_in_states(self, states: Iterable[State]) -> bool:
        with self._read() as conn:
            hit = conn.execute(
                sa.select(O.id)
                .where(O.job == self.job, O.state.in_([s.value for s in states]))
                .limit(1)
            ).first()
        return hit is not None

    # -- reading --------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        """Objects per state, from the counts the triggers keep (a few rows, not the job's)."""
        return self.totals()[0]

    def bytes_by_state(self) -> dict[str, int]:
        return self.totals()[1]

    def totals(self) -> tuple[dict[str, int], dict[str, int]]:
        """Objects and bytes per state, in one query."""
        got = self._state_totals()
        return {s: n for s, (n, _) in got.items()}, {s: b for s, (_, b) in got.items()}

    def _state_totals(self) -> dict[str, tuple[int, int]]:
        old = _unfolded(_now_seconds(self.engine))
        with self._read() as conn:
            rows = conn.execute(
                sa.select(
                    C.state,
                    sa.func.sum(C.objects),
                    sa.func.sum(C.bytes),
                    sa.func.sum(sa.case((old, 1), else_=0)),
                )
                .where(C.job == self.job)
                .group_by(C.state)
            ).all()
        if sum(int(r[3] or 0) for r in rows) >= FOLD_WHEN_ROWS:
            self.fold_counts()
        got = {r[0]: (int(r[1] or 0), int(r[2] or 0)) for r in rows}
        return {s.value: got.get(s.value, (0, 0)) for s in State}

    def fold_counts(self) -> None:
        """Fold the job's count rows older than ``FOLD_AFTER_SECONDS`` into one per state and
        minute (``second`` the minute's first second, ``writer`` 0), so reading the counts
        stays cheap however long the job runs — a few rows per minute of its life — while the
        minutes keep its throughput over time for ``report --summary``. Recent rows stay
        apart: the rates of the last minute read them."""
        old = sa.and_(C.job == self.job, _unfolded(_now_seconds(self.engine)))
        minute = C.second - C.second % MINUTE
        sums = [sa.func.sum(C.objects), sa.func.sum(C.bytes)]
        postgres = self.engine.dialect.name == "postgresql"
        # Postgres: one snapshot for the sums and the delete, so a row committed meanwhile is
        # neither summed nor deleted (it is folded next time). SQLite holds the write lock.
        options = {"isolation_level": "REPEATABLE READ"} if postgres else {}
        with self.engine.connect().execution_options(**options) as conn, conn.begin():
            if postgres:
                from sqlalchemy.dialects.postgresql import insert

                lock = sa.func.pg_try_advisory_xact_lock(_PG_FOLD_LOCK, sa.func.hashtext(self.job))
                if not conn.execute(sa.select(lock)).scalar_one():
                    return  # another process is folding this job right now
            else:
                from sqlalchemy.dialects.sqlite import insert
            folded = (
                sa.select(C.job, C.state, minute, sa.literal(0), *sums)
                .where(old)
                .group_by(C.job, C.state, minute)
            )
            ins = insert(state_counts).from_select(
                ["job", "state", "second", "writer", "objects", "bytes"], folded
            )
            conn.execute(
                ins.on_conflict_do_update(
                    index_elements=["job", "state", "second", "writer"],
                    set_={
                        "objects": C.objects + ins.excluded.objects,
                        "bytes": C.bytes + ins.excluded.bytes,
                    },
                )
            )
            conn.execute(state_counts.delete().where(old))

    def recent_errors(self, limit: int = 5) -> list[dict[str, Any]]:
        with self._read() as conn:
            rows = conn.execute(
                sa.select(O.source_key, O.state, O.attempts, O.last_error, O.updated_at)
                .where(O.job == self.job, O.last_error.is_not(None))
                .order_by(O.updated_at.desc())
                .limit(limit)
            ).all()
        return [
            {
                "key": r.source_key,
                "state": r.state,
                "attempts": r.attempts,
                "error": r.last_error,
                "at": r.updated_at.isoformat(timespec="seconds"),
            }
            for r in rows
        ]

    def done_rate(self, window: timedelta) -> float:
        """Objects finished per second over the last ``window`` (or since the first of them,
        when the run is younger than the window), from the per-second count rows."""
        now = _now_seconds(self.engine)
        with self._read() as conn:
            n, first, at = conn.execute(
                sa.select(sa.func.sum(C.objects), sa.func.min(C.second), now).where(
                    C.job == self.job,
                    C.state == State.DONE.value,
                    C.second >= now - window.total_seconds(),
                    C.objects > 0,
                )
            ).one()
        if not n or first is None:
            return 0.0
        return int(n) / max(float(at) - first, 1.0)

    def rates(self, window: timedelta) -> Rates:
        """Throughput over the last ``window`` from the per-second count rows: objects and
        bytes that moved past the copy (see ``_past_copy``) and that became ``done``, each per
        second since the first such row in the window."""
        now = _now_seconds(self.engine)
        past, done = _past_copy(), C.state == State.DONE.value
        with self._read() as conn:
            row = conn.execute(
                sa.select(
                    _sum_where(past, C.objects),
                    _sum_where(past, C.bytes),
                    _sum_where(done, C.objects),
                    _sum_where(done, C.bytes),
                    sa.func.min(C.second),
                    now,
                ).where(C.job == self.job, C.second >= now - window.total_seconds(), past)
            ).one()
        copied, copied_bytes, done_n, done_bytes, first, at = row
        if first is None:
            return Rates(window.total_seconds(), 0.0, 0.0, 0.0, 0.0)
        span = max(float(at) - float(first), 1.0)
        return Rates(
            window.total_seconds(),
            *(max(int(v or 0), 0) / span for v in (copied, copied_bytes, done_n, done_bytes)),
        )

    def activity_by_minute(self) -> list[tuple[int, int, int, int, int]]:
        """The job's throughput over time: per minute (Unix seconds of its start), the objects
        and bytes that moved past the copy (``_past_copy``) and that became ``done``, from the
        count rows (kept per minute once older than a few minutes; history folded by older
        versions of migrator into ``second`` 0 is left out)."""
        minute = C.second - C.second % MINUTE
        past, done = _past_copy(), C.state == State.DONE.value
        with self._read() as conn:
            rows = conn.execute(
                sa.select(
                    minute,
                    _sum_where(past, C.objects),
                    _sum_where(past, C.bytes),
                    _sum_where(done, C.objects),
                    _sum_where(done, C.bytes),
                )
                .where(C.job == self.job, C.second > 0, past)
                .group_by(minute)
                .order_by(minute)
            ).all()
        return [
            (int(m), int(n or 0), int(b or 0), int(dn or 0), int(db or 0))
            for m, n, b, dn, db in rows
        ]

    def error_rows(self, limit: int) -> list[tuple[str, str, str, int]]:
        """``(source_key, state, last_error, attempts)`` of up to ``limit`` rows that carry an
        error (failed, skipped, or waiting to retry), newest first; read through the partial
        index of rows with an error, so a job of millions with few errors costs little."""
        with self._read() as conn:
            return [
                (r[0], r[1], r[2], int(r[3]))
                for r in conn.execute(
                    sa.select(O.source_key, O.state, O.last_error, O.attempts)
                    .where(O.job == self.job, O.last_error.is_not(None))
                    .order_by(O.updated_at.desc())
                    .limit(limit)
                )
            ]

    def iter_sorted(self, column: str, states: Iterable[State]) -> Iterator[dict[str, Any]]:
        """Rows in ``states`` ordered by ``column`` (a key) in byte order, as S3 lists keys;
        streamed with a server-side cursor, so memory stays flat."""
        col = O[column]
        if self.engine.dialect.name == "postgresql":
            col = col.collate("C")
        q = (
            sa.select(*[c for c in objects.c if c.name not in ("lease_owner", "lease_expires")])
            .where(O.job == self.job, O.state.in_([s.value for s in states]))
            .order_by(col)
        )
        with self._read() as conn:
            for r in conn.execution_options(stream_results=True, yield_per=1000).execute(q):
                yield dict(r._mapping)

    def iter_rows(
        self, states: Iterable[State] | None = None, batch: int = 1000
    ) -> Iterator[list[dict[str, Any]]]:
        """All rows of the job in id order, ``batch`` at a time (keyset pagination)."""
        last = 0
        cols = [c for c in objects.c if c.name not in ("lease_owner", "lease_expires")]
        while True:
            q = sa.select(*cols).where(O.job == self.job, O.id > last)
            if states is not None:
                q = q.where(O.state.in_([s.value for s in states]))
            with self._read() as conn:
                rows = [dict(r._mapping) for r in conn.execute(q.order_by(O.id).limit(batch))]
            if not rows:
                return
            yield rows
            last = rows[-1]["id"]


@dataclass(frozen=True)
class Relocation:
    """One ``migrator relocate``: the bucket, where it goes, and the phase reached."""

    job: str
    bucket: str
    from_region: str
    to_region: str
    temp_bucket: str
    phase: Phase
    bucket_config: str | None  # JSON, as read before the bucket was deleted
    last_error: str | None
    updated_at: datetime


R = relocations.c


class Relocations:
    """The relocation rows. Every change of phase is conditioned on the caller holding the
    relocation's lease and on the phase it expects, so two runs cannot both move it on."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def get(self, job: str) -> Relocation | None:
        with self.engine.connect().execution_options(migrator_readonly=True) as conn:
            r = conn.execute(sa.select(relocations).where(R.job == job)).first()
        if r is None:
            return None
        return Relocation(
            r.job,
            r.bucket,
            r.from_region,
            r.to_region,
            r.temp_bucket,
            Phase(r.phase),
            r.bucket_config,
            r.last_error,
            r.updated_at,
        )

    def start(
        self, job: str, bucket: str, from_region: str, to_region: str, temp_bucket: str
    ) -> None:
        """Record a new relocation at its first phase (nothing done yet); a row already there
        (another run started it a moment ago) is kept."""
        now = utcnow()
        with contextlib.suppress(IntegrityError), self.engine.begin() as conn:
            conn.execute(
                relocations.insert().values(
                    job=job,
                    bucket=bucket,
                    from_region=from_region,
                    to_region=to_region,
                    temp_bucket=temp_bucket,
                    phase=Phase.CREATE_TEMP.value,
                    created_at=now,
                    updated_at=now,
                )
            )

    def take_lease(self, job: str, owner: str, lease_seconds: int) -> str | None:
        """Hold the relocation for ``owner``: None when it now does, else the owner of a
        live lease (another run, on this host or another). A lease of a process of this
        host that has ended is taken at once, others when they expire."""
        now = utcnow()
        with self.engine.begin() as conn:
            held = conn.execute(
                sa.select(R.lease_owner, R.lease_expires).where(R.job == job).with_for_update()
            ).first()
            if held is None:
                raise LedgerError(f"relocation {job!r} is not in the ledger")
            other, expires = held
            if (
                other is not None
                and other != owner
                and expires is not None
                and expires > now
                and not _dead_local(other)
            ):
                return str(other)
            conn.execute(
                relocations.update()
                .where(R.job == job)
                .values(lease_owner=owner, lease_expires=now + timedelta(seconds=lease_seconds))
            )
        return None

    def renew_lease(self, job: str, owner: str, lease_seconds: int) -> bool:
        with self.engine.begin() as conn:
            return (
                conn.execute(
                    relocations.update()
                    .where(R.job == job, R.lease_owner == owner)
                    .values(lease_expires=utcnow() + timedelta(seconds=lease_seconds))
                ).rowcount
                == 1
            )

    def release_lease(self, job: str, owner: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                relocations.update()
                .where(R.job == job, R.lease_owner == owner)
                .values(lease_owner=None, lease_expires=None)
            )

    def advance(self, job: str, owner: str, done: Phase, then: Phase, **values: Any) -> None:
        """Record that phase ``done`` is complete and ``then`` is next (with ``values``, e.g.
        the bucket's configuration), in one statement; clears the last error."""
        with self.engine.begin() as conn:
            n = conn.execute(
                relocations.update()
                .where(R.job == job, R.phase == done.value, R.lease_owner == owner)
                .values(phase=then.value, last_error=None, updated_at=utcnow(), **values)
            ).rowcount
        if n != 1:
            raise LedgerError(
                f"relocation {job!r} is no longer at phase {done.value} or no longer held by "
                "this run (another `migrator relocate` took it over?); run `migrator relocate "
                "--status` and the same command again"
            )

    def set_temp_bucket(self, job: str, owner: str, name: str) -> None:
        """Name another temporary bucket; only before one was created."""
        self.advance(job, owner, Phase.CREATE_TEMP, Phase.CREATE_TEMP, temp_bucket=name)

    def record_error(self, job: str, owner: str, message: str) -> None:
        """Why the last run stopped, for ``--status``."""
        with self.engine.begin() as conn:
            conn.execute(
                relocations.update()
                .where(R.job == job, R.lease_owner == owner)
                .values(last_error=message, updated_at=utcnow())
            )


def jobs_overview(engine: Engine) -> list[dict[str, Any]]:
    """Every job of the ledger: where it moves from and to, when it was created and
    planned, its counts by state, and whether a worker holds a live lease on it now."""
    now = utcnow()
    with engine.connect().execution_options(migrator_readonly=True) as conn:
        found = conn.execute(
            sa.select(
                jobs.c.name,
                jobs.c.source,
                jobs.c.destination,
                jobs.c.created_at,
                jobs.c.planned_at,
            ).order_by(jobs.c.name)
        ).all()
        counts = conn.execute(
            sa.select(C.job, C.state, sa.func.sum(C.objects)).group_by(C.job, C.state)
        ).all()
        live = set(
            conn.execute(
                sa.select(O.job).where(O.lease_owner.is_not(None), O.lease_expires > now).distinct()
            ).scalars()
        )
    by_job: dict[str, dict[str, int]] = {}
    for job, state, n in counts:
        by_job.setdefault(job, {})[state] = int(n or 0)
    return [
        {
            "job": name,
            "source": source,
            "destination": destination,
            "created_at": created.isoformat(timespec="seconds"),
            "planned_at": planned.isoformat(timespec="seconds") if planned else None,
            "counts": {s.value: by_job.get(name, {}).get(s.value, 0) for s in State},
            "workers_active": name in live,
        }
        for name, source, destination, created, planned in found
    ]


_PLAN_INSERT_POSTGRES = sa.text(
    """
INSERT INTO migrator_objects (job, source_key, dest_key, size, etag, last_modified,
                              storage_class, state, attempts, created_at, updated_at)
SELECT :job, v.source_key, v.dest_key, v.size, v.etag, v.last_modified, v.storage_class,
       :pending, 0, :now, :now
FROM unnest(CAST(:keys AS text[]), CAST(:dests AS text[]), CAST(:sizes AS bigint[]),
            CAST(:etags AS text[]), CAST(:mtimes AS timestamp[]), CAST(:classes AS text[]))
     AS v(source_key, dest_key, size, etag, last_modified, storage_class)
ON CONFLICT (job, source_key) DO NOTHING
"""
)

# The rows to reset are locked first, skipping any that a worker's statement holds at this
# instant: the re-plan then never waits for a worker, so it cannot close a deadlock cycle
# (workers lock a chunk's rows in their own order; since done rows are reset too, a re-plan
# meets rows a worker is finishing). A skipped row keeps its old ETag until the next re-plan;
# a copy of it fails its CopySourceIfMatch and re-plans it anyway (I4).
_PLAN_RESET_POSTGRES = sa.text(
    """
UPDATE migrator_objects AS o
SET etag = p.etag, size = p.size, last_modified = p.last_modified,
    storage_class = p.storage_class, state = :pending, attempts = 0, failed_stage = NULL,
    last_error = NULL, lease_owner = NULL, lease_expires = NULL, updated_at = :now
FROM (
    SELECT r.id, v.etag, v.size, v.last_modified, v.storage_class
    FROM migrator_objects AS r
    JOIN unnest(CAST(:keys AS text[]), CAST(:etags AS text[]), CAST(:sizes AS bigint[]),
                CAST(:mtimes AS timestamp[]), CAST(:classes AS text[]))
         AS v(source_key, etag, size, last_modified, storage_class)
      ON r.source_key = v.source_key
    WHERE r.job = :job
      AND ((r.etag <> v.etag AND (r.state <> :done OR CAST(:revisit AS boolean)))
           OR (r.state = :done AND CAST(:relisted AS boolean)))
    FOR UPDATE OF r SKIP LOCKED
) AS p
WHERE o.id = p.id
"""
)

# A never-copied row whose destination key changed is deleted here and inserted again by the
# page's insert: all keys given up are free before any is taken, whatever the row order (an
# UPDATE checks the unique index row by row, so a chain b→x, c→b would fail or not by order).
_PLAN_REMAP_POSTGRES = sa.text(
    """
DELETE FROM migrator_objects AS o
USING unnest(CAST(:keys AS text[]), CAST(:dests AS text[])) AS v(source_key, dest_key)
WHERE o.job = :job AND o.source_key = v.source_key AND o.dest_key <> v.dest_key
  AND o.state = :pending AND o.dest_etag IS NULL
  AND (o.lease_expires IS NULL OR o.lease_expires < :now)
"""
)

_PLAN_DROP_POSTGRES = sa.text(
    """
DELETE FROM migrator_objects
WHERE job = :job AND source_key = ANY(CAST(:keys AS text[])) AND state = :pending
  AND dest_etag IS NULL AND (lease_expires IS NULL OR lease_expires < :now)
"""
)


_RELEASE_SQL = ", lease_owner = NULL, lease_expires = NULL"
_RECORD_COPIED_POSTGRES = """
UPDATE migrator_objects AS o
SET state = :state, dest_etag = v.etag, last_error = NULL, updated_at = :now{release}
FROM unnest(CAST(:ids AS bigint[]), CAST(:etags AS text[])) AS v(id, etag)
WHERE o.id = v.id AND o.lease_owner = :owner
RETURNING o.id
"""


def _released(release: bool) -> dict[str, None]:
    """The column values that give a row's lease back, when ``release``."""
    return {"lease_owner": None, "lease_expires": None} if release else {}


def _upsert_page_postgres(
    conn: sa.Connection,
    job: str,
    page: Sequence[Planned],
    dropped: Sequence[str],
    now: datetime,
    *,
    replan: bool,
    done_rows: DoneRows,
) -> tuple[int, int, int, int]:
    """The page as six array parameters (``unnest``): one short statement per page, no
    per-row statement, placeholder or round trip. Returns (added, reset, remapped, dropped)."""
    gone = 0
    if dropped:
        gone = conn.execute(
            _PLAN_DROP_POSTGRES,
            {"job": job, "keys": list(dropped), "pending": State.PENDING.value, "now": now},
        ).rowcount
    if not page:
        return 0, 0, 0, gone
    params: dict[str, Any] = {
        "job": job,
        "now": now,
        "pending": State.PENDING.value,
        "keys": [p.source_key for p in page],
        "sizes": [p.size for p in page],
        "etags": [p.etag for p in page],
        "mtimes": [_naive(p.last_modified) for p in page],
        "classes": [p.storage_class for p in page],
    }
    dests = [p.dest_key for p in page]
    # Remap first: a pending row that gives up a destination key frees it for a new row.
    remapped = 0
    if replan:
        remapped = conn.execute(_PLAN_REMAP_POSTGRES, {**params, "dests": dests}).rowcount
    added = conn.execute(_PLAN_INSERT_POSTGRES, {**params, "dests": dests}).rowcount
    if added == len(page):
        return added - remapped, 0, remapped, gone
    reset = conn.execute(
        _PLAN_RESET_POSTGRES,
        {
            **params,
            "done": State.DONE.value,
            "revisit": done_rows is not DoneRows.KEEP,
            "relisted": done_rows is DoneRows.LISTED,
        },
    )
    return added - remapped, reset.rowcount, remapped, gone


_PLAN_INSERT_SQLITE = (
    "INSERT INTO migrator_objects (job, source_key, dest_key, size, etag, last_modified, "
    "storage_class, state, attempts, created_at, updated_at) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, 'pending', 0, ?, ?) "
    "ON CONFLICT (job, source_key) DO NOTHING"
)
_PLAN_RESET_SQLITE = (
    "UPDATE migrator_objects SET etag = ?, size = ?, last_modified = ?, storage_class = ?, "
    "state = 'pending', "
    "attempts = 0, failed_stage = NULL, last_error = NULL, lease_owner = NULL, "
    "lease_expires = NULL, updated_at = ? "
    "WHERE job = ? AND source_key = ? "
    "AND ((etag <> ? AND (state <> 'done' OR ?)) OR (state = 'done' AND ?))"
)

_PLAN_REMAP_SQLITE = (  # see _PLAN_REMAP_POSTGRES
    "DELETE FROM migrator_objects "
    "WHERE job = ? AND source_key = ? AND dest_key <> ? AND state = 'pending' "
    "AND dest_etag IS NULL AND (lease_expires IS NULL OR lease_expires < ?)"
)
_PLAN_DROP_SQLITE = (
    "DELETE FROM migrator_objects WHERE job = ? AND source_key = ? AND state = 'pending' "
    "AND dest_etag IS NULL AND (lease_expires IS NULL OR lease_expires < ?)"
)


def _upsert_page_sqlite(
    conn: sa.Connection,
    job: str,
    page: Sequence[Planned],
    dropped: Sequence[str],
    now: datetime,
    *,
    replan: bool,
    done_rows: DoneRows,
) -> tuple[int, int, int, int]:
    """SQLite: one prepared statement run over tuples (the driver's executemany); datetimes
    stored in SQLAlchemy's text format so that queries compare them correctly."""
    to_text = objects.c.updated_at.type.dialect_impl(conn.dialect).bind_processor(conn.dialect)
    assert to_text is not None
    at = to_text(now)
    gone = 0
    if dropped:
        gone = conn.exec_driver_sql(_PLAN_DROP_SQLITE, [(job, k, at) for k in dropped]).rowcount
    if not page:
        return 0, 0, 0, gone
    mtimes = [to_text(_naive(p.last_modified)) for p in page]
    remapped = 0
    if replan:
        remapped = conn.exec_driver_sql(
            _PLAN_REMAP_SQLITE, [(job, p.source_key, p.dest_key, at) for p in page]
        ).rowcount
    added = conn.exec_driver_sql(
        _PLAN_INSERT_SQLITE,
        [
            (job, p.source_key, p.dest_key, p.size, p.etag, m, p.storage_class, at, at)
            for p, m in zip(page, mtimes, strict=True)
        ],
    ).rowcount
    if added == len(page):
        return added - remapped, 0, remapped, gone
    revisit, relisted = done_rows is not DoneRows.KEEP, done_rows is DoneRows.LISTED
    reset = conn.exec_driver_sql(
        _PLAN_RESET_SQLITE,
        [
            (p.etag, p.size, m, p.storage_class, at, job, p.source_key, p.etag, revisit, relisted)
            for p, m in zip(page, mtimes, strict=True)
        ],
    ).rowcount
    return added - remapped, reset, remapped, gone


def _past_copy() -> sa.ColumnElement[bool]:
    """The count rows of every state but ``pending``. Their deltas summed are the objects
    that left ``pending`` (copied and verified, or failed for good) less those that came back
    (a re-plan, ``retry-failed``): moves between later states cancel out, and a plan, which
    adds to ``pending`` only, adds nothing — a count row holds net changes, so the deltas of
    ``pending`` itself cannot tell copies from a plan in the same second."""
    return C.state != State.PENDING.value


def _sum_where(cond: sa.ColumnElement[bool], col: sa.Column[Any]) -> sa.ColumnElement[Any]:
    return sa.func.sum(sa.case((cond, col), else_=0))


def _unfolded(now: sa.ColumnElement[Any]) -> sa.ColumnElement[bool]:
    """Count rows old enough to fold and not yet a minute's row. A minute's row has
    ``writer`` 0 and a ``second`` on the minute; a SQLite trigger row that happens to fall on
    the minute is already its minute's row, and the fold adds the rest of the minute to it.
    ``second`` 0 holds the history folded before minutes were kept."""
    return sa.and_(
        C.second > 0,
        C.second < now - FOLD_AFTER_SECONDS,
        sa.or_(C.writer != 0, C.second % MINUTE != 0),
    )


def _now_seconds(engine: Engine) -> sa.ColumnElement[Any]:
    """Now in Unix seconds by the database's clock, which the count triggers use."""
    if engine.dialect.name == "postgresql":
        return sa.extract("epoch", sa.func.statement_timestamp())
    return (sa.func.julianday("now") - 2440587.5) * 86400.0


def _backoff(attempts: int) -> timedelta:
    return timedelta(seconds=min(2**attempts, 30))


def _naive(dt: datetime | None) -> datetime | None:
    if dt is None or dt.tzinfo is None:
        return dt
    return dt.astimezone(UTC).replace(tzinfo=None)
