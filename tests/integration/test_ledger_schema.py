"""The ledger on SQLite and Postgres: Alembic migrations, and the lease/state rules (I2, I3)."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config as AlembicConfig
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Engine

from migrator.ledger.repo import (
    ALEMBIC_DIR,
    DoneRows,
    Ledger,
    ObjectRow,
    Planned,
    open_ledger,
    utcnow,
)
from migrator.ledger.tables import Stage, State, metadata, objects

VERSION_TABLE = "migrator_alembic_version"
LEDGER_TABLES = {"migrator_jobs", "migrator_objects"}
JOB = "avatars"


# -- helpers -------------------------------------------------------------------------------


def planned(n: int, *, start: int = 0, version: str = "v1") -> list[Planned]:
    return [
        Planned(
            source_key=f"image/{i:05d}.png",
            dest_key=f"avatar/{i:05d}.png",
            size=100 + i,
            etag=hashlib.md5(f"{version}-{i}".encode()).hexdigest(),
            last_modified=utcnow().replace(microsecond=0),
        )
        for i in range(start, start + n)
    ]


def alembic_config(conn: sa.Connection) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(ALEMBIC_DIR))
    cfg.attributes["connection"] = conn
    return cfg


def table_names(engine: Engine) -> set[str]:
    return set(sa.inspect(engine).get_table_names())


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
        return ctx.get_current_revision()


def raw_rows(engine: Engine, job: str = JOB) -> dict[str, dict[str, Any]]:
    """Every column of the job's rows, lease included, by source key (read behind the API);
    the columns the schema has at its current revision."""
    table = sa.Table(objects.name, sa.MetaData(), autoload_with=engine)
    with engine.connect() as conn:
        rows = conn.execute(sa.select(table).where(table.c.job == job)).mappings().all()
    return {r["source_key"]: dict(r) for r in rows}


def columns_of(rows: dict[str, dict[str, Any]], names: set[str]) -> dict[str, dict[str, Any]]:
    return {key: {c: v for c, v in row.items() if c in names} for key, row in rows.items()}


def set_state(
    engine: Engine, keys: list[str], state: State, failed_stage: str | None = None
) -> None:
    with engine.begin() as conn:
        conn.execute(
            objects.update()
            .where(objects.c.job == JOB, objects.c.source_key.in_(keys))
            .values(state=state.value, failed_stage=failed_stage)
        )


@pytest.fixture
def ledger_url(db_urls: dict[str, str]) -> str:
    return db_urls["ledger"]


@pytest.fixture
def engine(ledger_url: str) -> Iterator[Engine]:
    eng = open_ledger(ledger_url)
    yield eng
    eng.dispose()


@pytest.fixture
def ledger(engine: Engine) -> Ledger:
    led = Ledger(engine, JOB)
    led.ensure_job("s3://legacy/image/", "s3://production/avatar/")
    return led


# -- Alembic -------------------------------------------------------------------------------


def test_open_ledger_creates_the_schema_at_head(engine: Engine) -> None:
    head = ScriptDirectory(str(ALEMBIC_DIR)).get_current_head()
    assert head is not None
    assert LEDGER_TABLES | {VERSION_TABLE} <= table_names(engine)
    assert current_revision(engine) == head


def test_downgrade_to_base_and_upgrade_to_head_on_a_populated_ledger(
    ledger_url: str, engine: Engine, ledger: Ledger
) -> None:
    assert ledger.upsert_page(planned(25)).added == 25
    assert ledger.counts()["pending"] == 25
    head = current_revision(engine)

    with engine.begin() as conn:
        command.downgrade(alembic_config(conn), "base")
    assert table_names(engine).isdisjoint(LEDGER_TABLES)
    assert current_revision(engine) is None

    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), "head")
    assert table_names(engine) >= LEDGER_TABLES
    assert current_revision(engine) == head
    assert ledger.counts() == dict.fromkeys([s.value for s in State], 0)  # fresh, empty tables

    # The recreated schema works for the whole API again, and re-opening is a no-op.
    ledger.ensure_job("s3://legacy/image/", "s3://production/avatar/")
    assert ledger.upsert_page(planned(3)).added == 3
    again = open_ledger(ledger_url)
    try:
        assert Ledger(again, JOB).counts()["pending"] == 3
    finally:
        again.dispose()


def test_migrations_match_the_table_definitions(engine: Engine) -> None:
    """Autogenerate finds nothing to do: the revisions create exactly ``tables.metadata``."""
    with engine.connect() as conn:
        ctx = MigrationContext.configure(
            conn,
            opts={"version_table": VERSION_TABLE, "compare_type": True},
        )
        diff = compare_metadata(ctx, metadata)
    assert diff == []


def test_open_ledger_twice_keeps_the_data(ledger_url: str, ledger: Ledger) -> None:
    ledger.upsert_page(planned(4))
    second = open_ledger(ledger_url)
    try:
        assert Ledger(second, JOB).counts()["pending"] == 4
    finally:
        second.dispose()


# -- plan ----------------------------------------------------------------------------------


def test_upsert_page_is_idempotent(ledger: Ledger, engine: Engine) -> None:
    page = planned(30)
    first = ledger.upsert_page(page)
    assert (first.added, first.reset, first.unchanged) == (30, 0, 0)
    before = raw_rows(engine)
    second = ledger.upsert_page(page)
    assert (second.added, second.reset, second.unchanged) == (0, 0, 30)
    assert raw_rows(engine) == before  # not a single column changed
    assert ledger.upsert_page([]).added == 0


def test_upsert_page_resets_changed_rows_and_keeps_unchanged_done_ones(
    ledger: Ledger, engine: Engine
) -> None:
    """A listed key with another ETag goes back to pending in any state, ``done`` included
    (docs/cutover.md: the source holds an object that was not migrated); a done row listed
    with its own ETag is kept — unless the job deletes its sources (``LISTED``): then its
    source was deleted and the listed object is an upload made since. A snapshot (``KEEP``,
    an inventory report, the default) leaves done rows alone."""
    ledger.upsert_page(planned(5))
    keys = sorted(raw_rows(engine))
    set_state(engine, [keys[0]], State.COPIED)
    set_state(engine, [keys[1], keys[4]], State.DONE)
    set_state(engine, [keys[2]], State.FAILED, Stage.COPY.value)
    changed = planned(4, version="v2") + planned(1, start=4) + planned(1, start=5)
    res = ledger.upsert_page(changed, replan=True, done_rows=DoneRows.CHANGED)
    assert (res.added, res.reset, res.unchanged) == (1, 4, 1)
    rows = raw_rows(engine)
    new_etag = {p.source_key: p.etag for p in changed}
    for key in keys[:4]:
        assert rows[key]["state"] == State.PENDING.value
        assert rows[key]["etag"] == new_etag[key]
        assert rows[key]["failed_stage"] is None and rows[key]["dest_etag"] is None
    assert rows[keys[4]]["state"] == State.DONE.value  # same ETag, sources kept: left alone
    assert len(rows) == 6
    res = ledger.upsert_page(changed, replan=True, done_rows=DoneRows.LISTED)
    assert (res.added, res.reset, res.unchanged) == (0, 1, 5)
    assert raw_rows(engine)[keys[4]]["state"] == State.PENDING.value
    set_state(engine, [keys[1]], State.DONE)
    res = ledger.upsert_page(planned(2, version="v3"), replan=True)  # KEEP
    assert (res.reset, res.unchanged) == (1, 1)
    assert raw_rows(engine)[keys[1]]["state"] == State.DONE.value


# -- leases --------------------------------------------------------------------------------


def test_claim_leases_rows_so_a_second_owner_cannot_take_them(
    ledger: Ledger, engine: Engine
) -> None:
    ledger.upsert_page(planned(8))
    a = ledger.claim("host:1:a", [State.PENDING], limit=5, lease_seconds=60)
    assert [r.id for r in a] == sorted(r.id for r in a) and len(a) == 5
    b = ledger.claim("host:1:b", [State.PENDING], limit=5, lease_seconds=60)
    assert len(b) == 3
    assert {r.id for r in a}.isdisjoint({r.id for r in b})
    assert ledger.claim("host:1:c", [State.PENDING], limit=5, lease_seconds=60) == []
    rows = raw_rows(engine)
    owners = {r["id"]: r["lease_owner"] for r in rows.values()}
    assert all(owners[r.id] == "host:1:a" for r in a)
    assert all(owners[r.id] == "host:1:b" for r in b)
    assert all(r["lease_expires"] > utcnow() + timedelta(seconds=50) for r in rows.values())


def test_claim_takes_only_the_requested_states(ledger: Ledger, engine: Engine) -> None:
    ledger.upsert_page(planned(3))
    keys = sorted(raw_rows(engine))
    set_state(engine, [keys[0]], State.REWRITTEN)
    set_state(engine, [keys[1]], State.DONE)
    got = ledger.claim("o", [State.PENDING, State.COPIED], limit=10, lease_seconds=60)
    assert [r.source_key for r in got] == [keys[2]]
    got = ledger.claim("o", [State.REWRITTEN], limit=10, lease_seconds=60)
    assert [(r.source_key, r.state) for r in got] == [(keys[0], State.REWRITTEN)]


def test_expired_leases_are_reclaimed(ledger: Ledger, engine: Engine) -> None:
    ledger.upsert_page(planned(4))
    dead = ledger.claim("host:1:dead", [State.PENDING], limit=4, lease_seconds=1)
    assert len(dead) == 4
    assert ledger.claim("host:1:new", [State.PENDING], limit=4, lease_seconds=60) == []
    time.sleep(1.3)
    taken = ledger.claim("host:1:new", [State.PENDING], limit=4, lease_seconds=60)
    assert {r.id for r in taken} == {r.id for r in dead}
    # The old owner has lost the rows: what it records now changes nothing.
    ledger.record_copied("host:1:dead", [(r.id, "deadbeef") for r in dead])
    ledger.record_state("host:1:dead", [r.id for r in dead], State.DONE)
    rows = raw_rows(engine)
    assert {r["state"] for r in rows.values()} == {State.PENDING.value}
    assert {r["lease_owner"] for r in rows.values()} == {"host:1:new"}


def test_heartbeat_keeps_a_lease_alive(ledger: Ledger) -> None:
    ledger.upsert_page(planned(2))
    held = ledger.claim("host:1:a", [State.PENDING], limit=2, lease_seconds=1)
    assert ledger.heartbeat("host:1:a", 60) == 2
    time.sleep(1.3)
    assert ledger.claim("host:1:b", [State.PENDING], limit=2, lease_seconds=60) == []
    assert ledger.release("host:1:a", [held[0].id]) == 1
    got = ledger.claim("host:1:b", [State.PENDING], limit=2, lease_seconds=60)
    assert [r.id for r in got] == [held[0].id]


def test_record_functions_only_touch_rows_the_owner_holds(ledger: Ledger, engine: Engine) -> None:
    ledger.upsert_page(planned(6))
    mine = ledger.claim("host:1:a", [State.PENDING], limit=3, lease_seconds=60)
    theirs = ledger.claim("host:1:b", [State.PENDING], limit=3, lease_seconds=60)
    before = raw_rows(engine)
    every = mine + theirs
    # Owner "a" tries to record for all six rows; only its three may move.
    ledger.record_copied("host:1:a", [(r.id, "etag-a") for r in every])
    rows = {r["id"]: r for r in raw_rows(engine).values()}
    assert {rows[r.id]["state"] for r in mine} == {State.COPIED.value}
    assert {rows[r.id]["dest_etag"] for r in mine} == {"etag-a"}
    assert {rows[r.id]["state"] for r in theirs} == {State.PENDING.value}
    assert {rows[r.id]["dest_etag"] for r in theirs} == {None}

    ledger.record_state("host:1:a", [r.id for r in every], State.REWRITTEN)
    rows = {r["id"]: r for r in raw_rows(engine).values()}
    assert {rows[r.id]["state"] for r in mine} == {State.REWRITTEN.value}
    assert {rows[r.id]["state"] for r in theirs} == {State.PENDING.value}

    ledger.record_failures("host:1:a", [(r, "boom") for r in theirs], Stage.COPY, 1)
    after = raw_rows(engine)
    for r in theirs:
        assert after[r.source_key] == before[r.source_key]  # untouched, lease and all
    # A stranger holding nothing changes nothing at all.
    snapshot = raw_rows(engine)
    ledger.record_copied("host:1:z", [(r.id, "x") for r in every])
    ledger.record_state("host:1:z", [r.id for r in every], State.DONE)
    ledger.record_failures("host:1:z", [(r, "x") for r in every], Stage.DELETE, 1, permanent=True)
    ledger.replan_row("host:1:z", every[0], "ffff", 1, "x", 5)
    assert raw_rows(engine) == snapshot


def test_recording_a_last_state_gives_the_lease_back_in_the_same_statement(
    ledger: Ledger, engine: Engine
) -> None:
    ledger.upsert_page(planned(4))
    rows = ledger.claim("host:1:a", [State.PENDING], limit=4, lease_seconds=60)
    first, second = [r.id for r in rows[:2]], [r.id for r in rows[2:]]
    assert ledger.record_copied("host:1:a", [(i, "e1") for i in first]) == set(first)
    assert ledger.record_copied(
        "host:1:a", [(i, "e2") for i in second], State.REWRITTEN, release=True
    ) == set(second)
    assert ledger.record_state("host:1:a", first, State.DONE, release=True) == set(first)
    got = {r["id"]: r for r in raw_rows(engine).values()}
    assert [(got[i]["state"], got[i]["dest_etag"], got[i]["lease_owner"]) for i in first] == [
        (State.DONE.value, "e1", None)
    ] * 2
    assert [(got[i]["state"], got[i]["dest_etag"], got[i]["lease_owner"]) for i in second] == [
        (State.REWRITTEN.value, "e2", None)
    ] * 2
    assert {got[i]["lease_expires"] for i in first + second} == {None}
    # Given back: the same owner holds nothing more, and another may claim the rewritten rows.
    assert ledger.record_state("host:1:a", second, State.DONE) == set()
    taken = ledger.claim("host:1:b", [State.REWRITTEN], limit=4, lease_seconds=60)
    assert {r.id for r in taken} == set(second)


def _row_now(engine: Engine, row: ObjectRow) -> dict[str, Any]:
    return next(r for r in raw_rows(engine).values() if r["id"] == row.id)


def test_record_failures_fails_rows_after_max_attempts(ledger: Ledger, engine: Engine) -> None:
    ledger.upsert_page(planned(1))
    max_attempts = 3
    for attempt in range(1, max_attempts + 1):
        with engine.begin() as conn:  # skip the backoff: let the lease lapse now
            conn.execute(objects.update().values(lease_expires=utcnow() - timedelta(seconds=1)))
        (row,) = ledger.claim("host:1:a", [State.PENDING], limit=1, lease_seconds=60)
        assert row.attempts == attempt - 1
        ledger.record_failures("host:1:a", [(row, f"error {attempt}")], Stage.COPY, max_attempts)
        now = _row_now(engine, row)
        assert now["attempts"] == attempt and now["last_error"] == f"error {attempt}"
        assert now["lease_owner"] is None
        if attempt < max_attempts:
            assert now["state"] == State.PENDING.value and now["failed_stage"] is None
            # Backoff: the row is not handed out again at once.
            assert now["lease_expires"] > utcnow()
            assert ledger.claim("host:1:b", [State.PENDING], limit=1, lease_seconds=60) == []
        else:
            assert now["state"] == State.FAILED.value
            assert now["failed_stage"] == Stage.COPY.value
            assert now["lease_expires"] is None
    assert ledger.counts()["failed"] == 1
    assert ledger.recent_errors()[0]["error"] == f"error {max_attempts}"


def test_permanent_failure_fails_at_once_and_retry_failed_puts_it_back(
    ledger: Ledger, engine: Engine
) -> None:
    ledger.upsert_page(planned(3))
    rows = ledger.claim("host:1:a", [State.PENDING], limit=3, lease_seconds=60)
    ledger.record_failures(
        "host:1:a", [(rows[0], "source object no longer exists")], Stage.COPY, 5, permanent=True
    )
    ledger.record_failures("host:1:a", [(rows[1], "slow down")], Stage.REWRITE, 5)
    states = {r["id"]: r for r in raw_rows(engine).values()}
    assert states[rows[0].id]["state"] == State.FAILED.value
    assert states[rows[0].id]["failed_stage"] == Stage.COPY.value
    assert states[rows[0].id]["attempts"] == 1
    assert states[rows[1].id]["state"] == State.PENDING.value  # may still be retried
    assert ledger.counts()["failed"] == 1

    assert ledger.retry_failed() == 1
    back = _row_now(engine, rows[0])
    assert back["state"] == State.PENDING.value
    assert (back["attempts"], back["failed_stage"], back["lease_owner"]) == (0, None, None)
    assert back["last_error"] == "source object no longer exists"  # kept for the record
    assert ledger.retry_failed() == 0
    assert ledger.counts()["failed"] == 0


@pytest.mark.parametrize(
    ("states", "is_open"),
    [
        ([State.REWRITTEN, State.REWRITTEN, State.DONE], True),
        ([State.REWRITTEN, State.PENDING, State.DONE], False),
        ([State.REWRITTEN, State.COPIED, State.DONE], False),
        ([State.REWRITTEN, (State.FAILED, Stage.COPY), State.DONE], False),
        ([State.REWRITTEN, (State.FAILED, Stage.REWRITE), State.DONE], False),
        ([State.REWRITTEN, (State.FAILED, None), State.DONE], False),
        ([State.REWRITTEN, (State.FAILED, Stage.DELETE), State.DONE], True),
        ([State.DONE, State.DONE, State.DONE], True),
    ],
    ids=[
        "all-rewritten-or-done",
        "one-pending",
        "one-copied",
        "failed-in-copy",
        "failed-in-rewrite",
        "failed-no-stage",
        "failed-in-delete",
        "all-done",
    ],
)
def test_delete_gate(ledger: Ledger, engine: Engine, states: list[Any], is_open: bool) -> None:
    ledger.upsert_page(planned(len(states)))
    ledger.mark_planned()
    keys = sorted(raw_rows(engine))
    for key, st in zip(keys, states, strict=True):
        state, stage = st if isinstance(st, tuple) else (st, None)
        set_state(engine, [key], state, stage.value if stage else None)
    assert ledger.delete_gate_open() is is_open


def test_delete_gate_ignores_other_jobs(ledger: Ledger, engine: Engine) -> None:
    ledger.upsert_page(planned(2))
    set_state(engine, sorted(raw_rows(engine)), State.REWRITTEN)
    ledger.mark_planned()
    other = Ledger(engine, "other-job")
    other.ensure_job("s3://legacy/image/", "s3://production/avatar/")
    other.upsert_page(planned(2))  # pending rows of another job
    other.mark_planned()
    assert ledger.delete_gate_open() is True
    assert other.delete_gate_open() is False


def test_reclaim_dead_local_leases(ledger: Ledger, engine: Engine) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    host = socket.gethostname()
    dead = f"{host}:{proc.pid}:1"
    alive = f"{host}:{os.getpid()}:2"
    remote = f"some-other-host-{os.getpid()}:{proc.pid}:3"  # cannot judge another host's PIDs
    ledger.upsert_page(planned(9))
    for owner in (dead, alive, remote):
        assert len(ledger.claim(owner, [State.PENDING], limit=3, lease_seconds=600)) == 3
    assert ledger.reclaim_dead_local_leases() == 3
    owners = [r["lease_owner"] for r in raw_rows(engine).values()]
    assert owners.count(None) == 3 and dead not in owners
    assert owners.count(alive) == 3 and owners.count(remote) == 3
    freed = ledger.claim("host:1:new", [State.PENDING], limit=9, lease_seconds=60)
    assert len(freed) == 3
    assert ledger.reclaim_dead_local_leases() == 0


# -- concurrency ---------------------------------------------------------------------------


def test_concurrent_claims_never_hand_out_a_row_twice(ledger_url: str, ledger: Ledger) -> None:
    total = 600
    for start in range(0, total, 200):
        ledger.upsert_page(planned(200, start=start))
    workers = 6
    barrier = threading.Barrier(workers)
    got: dict[str, list[int]] = {}
    errors: list[BaseException] = []

    def claimer(name: str) -> None:
        eng = open_ledger(ledger_url, upgrade=False)  # one engine per worker, like processes
        mine: list[int] = []
        try:
            led = Ledger(eng, JOB)
            barrier.wait()
            while rows := led.claim(name, [State.PENDING], limit=7, lease_seconds=600):
                mine.extend(r.id for r in rows)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            got[name] = mine
            eng.dispose()

    threads = [threading.Thread(target=claimer, args=(f"host:1:{i}",)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    every = [i for ids in got.values() for i in ids]
    assert len(every) == len(set(every)), "a row was claimed by two owners"
    assert len(every) == total
    assert sum(1 for ids in got.values() if ids) >= 2, "only one worker ever got rows"


def test_replan_counts_an_attempt_and_a_flapping_source_fails(
    ledger: Ledger, engine: Engine
) -> None:
    ledger.upsert_page(planned(1))
    for attempt in (1, 2):
        (row,) = ledger.claim("host:1:a", [State.PENDING], limit=1, lease_seconds=60)
        ledger.replan_row("host:1:a", row, f"etag-{attempt}", 10 + attempt, "changed", 2)
        now = _row_now(engine, row)
        assert now["attempts"] == attempt
        assert now["etag"] == f"etag-{attempt}" and now["size"] == 10 + attempt
        assert now["lease_owner"] is None
    assert now["state"] == State.FAILED.value and now["failed_stage"] == Stage.COPY.value


def test_plan_reset_takes_the_row_from_a_worker_holding_the_old_version(
    ledger: Ledger, engine: Engine
) -> None:
    ledger.upsert_page(planned(1))
    (row,) = ledger.claim("host:1:a", [State.PENDING], limit=1, lease_seconds=60)
    ledger.upsert_page(planned(1, version="v2"))  # the source changed; plan runs meanwhile
    # The worker's copy of the old version is not recorded and goes no further.
    assert ledger.record_copied("host:1:a", [(row.id, "old")]) == set()
    now = _row_now(engine, row)
    assert now["state"] == State.PENDING.value and now["lease_owner"] is None


def test_each_revision_downgrades_and_upgrades_keeping_the_rows(
    engine: Engine, ledger: Ledger
) -> None:
    """Step down one revision at a time to the first and back up, on a populated ledger. A
    column a revision added goes with its downgrade and comes back empty (NULL)."""
    ledger.ensure_job("s3://legacy/image/", "s3://production/avatar/")
    ledger.upsert_page([dataclasses.replace(p, storage_class="STANDARD_IA") for p in planned(10)])
    ledger.add_s3_retries(7)
    before = raw_rows(engine)
    assert {r["storage_class"] for r in before.values()} == {"STANDARD_IA"}
    revisions = [
        r.revision for r in ScriptDirectory(str(ALEMBIC_DIR)).walk_revisions("base", "heads")
    ]
    assert revisions[-1] == "0001" and len(revisions) >= 2
    for target in revisions[1:]:  # newest first: step down to each older revision
        with engine.begin() as conn:
            command.downgrade(alembic_config(conn), target)
        assert current_revision(engine) == target
        now = raw_rows(engine)
        assert now == columns_of(before, set(next(iter(now.values()))))
        if target == "0004":
            assert "storage_class" not in next(iter(now.values()))
    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), "head")
    assert current_revision(engine) == revisions[0]
    assert raw_rows(engine) == {k: {**r, "storage_class": None} for k, r in before.items()}
    assert ledger.s3_retries() == 0  # the counter came back with its default


def test_storage_class_is_planned_reset_with_a_new_version_and_claimed(
    ledger: Ledger, engine: Engine
) -> None:
    """The listed class travels with the row to the worker (``storage_class: copy``); a new
    version brings its own class, and a re-plan with the same ETag keeps the planned one."""
    first = [
        dataclasses.replace(p, storage_class=c)
        for p, c in zip(planned(3), ["STANDARD_IA", None, "GLACIER_IR"], strict=True)
    ]
    ledger.upsert_page(first)
    rows = ledger.claim("host:1:a", [State.PENDING], limit=3, lease_seconds=60)
    assert [r.storage_class for r in rows] == ["STANDARD_IA", None, "GLACIER_IR"]
    ledger.release("host:1:a")

    [new_version] = planned(1, version="v2")
    changed = [
        dataclasses.replace(new_version, storage_class="INTELLIGENT_TIERING"),
        dataclasses.replace(first[1], storage_class="ONEZONE_IA"),
    ]
    assert ledger.upsert_page(changed, replan=True).reset == 1
    now = raw_rows(engine)
    assert now[first[0].source_key]["storage_class"] == "INTELLIGENT_TIERING"  # new version
    assert now[first[1].source_key]["storage_class"] is None  # same ETag: row left alone

    (row,) = ledger.claim("host:1:a", [State.PENDING], limit=1, lease_seconds=60)
    ledger.replan_row("host:1:a", row, "etag-3", 5, "changed", 5, storage_class="GLACIER")
    assert raw_rows(engine)[row.source_key]["storage_class"] == "GLACIER"
