"""The ledger at scale, on SQLite and Postgres: counts kept by triggers (revision 0003), the
plan upsert, claims across states, and the schema check that spares ``status`` Alembic.

Timings are measured by ``bench/plan_scale.py`` and ``bench/ledger_scale.py``, not here; these
tests pin the behaviour those fast paths must keep.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from datetime import timedelta

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Engine

from migrator.ledger import repo
from migrator.ledger.repo import (
    ALEMBIC_DIR,
    SCHEMA_HEAD,
    Ledger,
    Planned,
    open_ledger,
    schema_revision,
    utcnow,
)
from migrator.ledger.tables import Stage, State, objects, state_counts
from tests.integration.test_ledger_schema import alembic_config, planned, raw_rows, set_state

JOB = "avatars"


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


def counted(engine: Engine, job: str = JOB) -> tuple[dict[str, int], dict[str, int]]:
    """Objects and bytes per state the slow way: every row of the job, grouped."""
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(objects.c.state, sa.func.count(), sa.func.sum(objects.c.size))
            .where(objects.c.job == job)
            .group_by(objects.c.state)
        ).all()
    n = {s.value: 0 for s in State}
    b = {s.value: 0 for s in State}
    for state, count, size in rows:
        n[state], b[state] = count, int(size)
    return n, b


def assert_counts_exact(ledger: Ledger) -> None:
    assert (ledger.counts(), ledger.bytes_by_state()) == counted(ledger.engine, ledger.job)


# -- schema ----------------------------------------------------------------------------------


def test_schema_head_constant_is_the_newest_revision(engine: Engine) -> None:
    assert ScriptDirectory(str(ALEMBIC_DIR)).get_current_head() == SCHEMA_HEAD
    assert schema_revision(engine) == SCHEMA_HEAD


def test_a_ledger_at_head_is_opened_without_alembic(
    ledger_url: str, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_alembic(*args: object, **kwargs: object) -> None:
        raise AssertionError("Alembic ran on a ledger already at head")

    monkeypatch.setattr(command, "upgrade", no_alembic)
    again = open_ledger(ledger_url)
    again.dispose()


def test_upgrade_from_0002_counts_the_rows_already_there(engine: Engine, ledger: Ledger) -> None:
    ledger.upsert_page(planned(40))
    keys = sorted(raw_rows(engine))
    set_state(engine, keys[:10], State.DONE)
    set_state(engine, keys[10:13], State.FAILED, Stage.COPY.value)
    with engine.begin() as conn:
        command.downgrade(alembic_config(conn), "0002")
    assert not sa.inspect(engine).has_table(state_counts.name)
    assert autovacuum_options(engine) == []
    set_state(engine, keys[13:20], State.COPIED)  # written by an older migrator
    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), "head")
    assert ledger.counts()["done"] == 10 and ledger.counts()["copied"] == 7
    assert_counts_exact(ledger)
    if engine.dialect.name == "postgresql":
        assert "autovacuum_vacuum_scale_factor=0.01" in autovacuum_options(engine)


def autovacuum_options(engine: Engine) -> list[str]:
    if engine.dialect.name != "postgresql":
        return []
    with engine.connect() as conn:
        options = conn.execute(
            sa.text("SELECT reloptions FROM pg_class WHERE relname = 'migrator_objects'")
        ).scalar_one()
    return list(options or [])


# -- counts kept by triggers -----------------------------------------------------------------


def test_counts_follow_every_kind_of_change(engine: Engine, ledger: Ledger) -> None:
    """The API, a re-plan with changed sizes, raw SQL (an operator's fix) and deletes: the
    counts always equal a full GROUP BY."""
    assert ledger.counts() == dict.fromkeys([s.value for s in State], 0)
    ledger.upsert_page(planned(30))
    assert_counts_exact(ledger)
    rows = ledger.claim("host:1:a", [State.PENDING], limit=12, lease_seconds=60)
    assert_counts_exact(ledger)  # a lease changes no count
    ledger.record_copied("host:1:a", [(r.id, "e") for r in rows[:8]])
    ledger.record_state("host:1:a", [r.id for r in rows[:5]], State.REWRITTEN)
    ledger.record_state("host:1:a", [r.id for r in rows[:2]], State.DONE)
    ledger.record_failures("host:1:a", [(rows[9], "boom")], Stage.COPY, 1)
    ledger.record_skipped("host:1:a", [(rows[10].id, "taken")])
    ledger.replan_row("host:1:a", rows[11], "ffff", 12345, "changed", 1)
    assert_counts_exact(ledger)
    replanned = [  # new ETags and sizes for rows 20.., five new rows
        Planned(p.source_key, p.dest_key, p.size + 7, p.etag, p.last_modified)
        for p in planned(15, start=20, version="v2")
    ]
    assert ledger.upsert_page(replanned).added == 5
    assert_counts_exact(ledger)
    assert ledger.retry_failed() >= 1
    assert_counts_exact(ledger)
    keys = sorted(raw_rows(engine))
    set_state(engine, keys[:4], State.DONE)
    with engine.begin() as conn:
        conn.execute(objects.update().where(objects.c.source_key == keys[5]).values(size=1))
        conn.execute(objects.delete().where(objects.c.source_key.in_(keys[-3:])))
    assert_counts_exact(ledger)
    other = Ledger(engine, "other-job")
    other.upsert_page(planned(3))
    assert other.counts()["pending"] == 3
    assert_counts_exact(ledger)


def test_fold_keeps_the_counts_and_recent_rows(engine: Engine, ledger: Ledger) -> None:
    ledger.upsert_page(planned(20))
    rows = ledger.claim("host:1:a", [State.PENDING], limit=20, lease_seconds=60)
    ledger.record_state("host:1:a", [r.id for r in rows[:6]], State.DONE)
    # Make everything so far look older than the fold horizon, one row per second.
    with engine.begin() as conn:
        conn.execute(
            state_counts.update()
            .where(state_counts.c.second > 0)
            .values(second=state_counts.c.second - repo.FOLD_AFTER_SECONDS - 60)
        )
    ledger.record_state("host:1:a", [r.id for r in rows[6:9]], State.DONE)  # recent
    before = counted(engine)
    ledger.fold_counts()
    assert (ledger.counts(), ledger.bytes_by_state()) == before
    with engine.connect() as conn:
        seconds = list(
            conn.execute(
                sa.select(state_counts.c.second).where(state_counts.c.job == JOB)
            ).scalars()
        )
    horizon = time.time() - repo.FOLD_AFTER_SECONDS - 5
    old = [s for s in seconds if 0 < s < horizon]
    assert old and all(s % 60 == 0 for s in old)  # old rows folded into one per minute
    assert len(old) <= 2 * 3 * 2  # states done and pending (and the plan's), at most 2 minutes
    assert ledger.done_rate(timedelta(seconds=60)) > 0  # the recent rows were kept apart
    ledger.fold_counts()  # nothing to fold: a no-op
    assert (ledger.counts(), ledger.bytes_by_state()) == before


def old_count_rows(engine: Engine) -> list[tuple[str, int, int]]:
    """(state, second, objects) of the job's count rows written in 1970."""
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(state_counts.c.state, state_counts.c.second, state_counts.c.objects)
            .where(state_counts.c.job == JOB, state_counts.c.second.between(1, 10**6))
            .order_by(state_counts.c.state)
        ).all()
    return [(r[0], int(r[1]), int(r[2])) for r in rows]


def test_counts_fold_themselves_when_old_rows_pile_up(
    engine: Engine, ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(repo, "FOLD_WHEN_ROWS", 3)
    ledger.upsert_page(planned(10))
    with engine.begin() as conn:
        for i in range(5):  # five old rows of separate seconds
            conn.execute(
                state_counts.insert().values(
                    job=JOB, state="done", second=1000 + i, writer=0, objects=1, bytes=10
                )
            )
            conn.execute(
                state_counts.insert().values(
                    job=JOB, state="pending", second=1000 + i, writer=0, objects=-1, bytes=-10
                )
            )
    expected = ledger.counts()  # sees 10 old rows and folds them
    assert expected["done"] == 5 and expected["pending"] == 5
    left = old_count_rows(engine)
    assert left == [("done", 960, 5), ("pending", 960, -5)]  # one row per state and minute
    assert ledger.counts() == expected
    monkeypatch.setattr(repo, "FOLD_WHEN_ROWS", 1)  # minute rows are not counted as foldable:
    assert ledger.counts() == expected  # a read does not fold them again (into themselves)
    assert old_count_rows(engine) == left


def test_done_rate_counts_the_last_window_only(engine: Engine, ledger: Ledger) -> None:
    assert ledger.done_rate(timedelta(seconds=60)) == 0.0
    ledger.upsert_page(planned(30))
    rows = ledger.claim("host:1:a", [State.PENDING], limit=30, lease_seconds=60)
    ledger.record_state("host:1:a", [r.id for r in rows[:20]], State.DONE)
    with engine.begin() as conn:  # those 20 finished ten minutes ago
        conn.execute(
            state_counts.update()
            .where(state_counts.c.second > 0)
            .values(second=state_counts.c.second - 600)
        )
    ledger.record_state("host:1:a", [r.id for r in rows[20:]], State.DONE)
    # Ten objects in the last second or two (a young window: counted since the first of them).
    assert 10 / 3 <= ledger.done_rate(timedelta(seconds=60)) <= 10


def test_concurrent_writers_keep_exact_counts(ledger_url: str, ledger: Ledger) -> None:
    """Workers claiming and recording while another process re-plans with changed ETags:
    no deadlock, no lost count."""
    for start in range(0, 600, 200):
        ledger.upsert_page(planned(200, start=start))
    errors: list[BaseException] = []
    barrier = threading.Barrier(5)

    def worker(name: str) -> None:
        eng = open_ledger(ledger_url, upgrade=False)
        led = Ledger(eng, JOB)
        rng = random.Random(name)
        try:
            barrier.wait()
            for _ in range(15):
                rows = led.claim(name, [State.PENDING, State.COPIED], 20, 60)
                if not rows:
                    break
                copied = led.record_copied(name, [(r.id, "e") for r in rows])
                done = [i for i in copied if rng.random() < 0.7]
                led.record_state(name, done, State.DONE)
                fails = [(r, "x") for r in rows if r.id in copied and r.id not in done][:3]
                led.record_failures(name, fails, Stage.REWRITE, 2)
                led.release(name)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            eng.dispose()

    def replanner() -> None:
        eng = open_ledger(ledger_url, upgrade=False)
        led = Ledger(eng, JOB)
        try:
            barrier.wait()
            for start in range(0, 600, 100):
                led.upsert_page(planned(100, start=start, version="v2"))
            led.retry_failed()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            eng.dispose()

    threads = [threading.Thread(target=worker, args=(f"host:1:{i}",)) for i in range(4)]
    threads.append(threading.Thread(target=replanner))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert_counts_exact(ledger)


# -- plan ------------------------------------------------------------------------------------


def test_upsert_page_reset_keeps_dest_etag_and_clears_the_lease(
    ledger: Ledger, engine: Engine
) -> None:
    ledger.upsert_page(planned(3))
    (row, *_) = ledger.claim("host:1:a", [State.PENDING], limit=3, lease_seconds=60)
    ledger.record_copied("host:1:a", [(row.id, "dest-v1")])
    ledger.record_failures("host:1:a", [(row, "slow down")], Stage.REWRITE, 5)
    ledger.claim("host:1:b", [State.COPIED], limit=1, lease_seconds=60)
    changed = [
        Planned(p.source_key, p.dest_key, p.size + 1, p.etag, p.last_modified)
        for p in planned(3, version="v2")
    ]
    res = ledger.upsert_page(changed)
    assert (res.added, res.reset, res.unchanged) == (0, 3, 0)
    now = next(r for r in raw_rows(engine).values() if r["id"] == row.id)
    assert now["state"] == State.PENDING.value and now["etag"] == changed[0].etag
    assert now["size"] == changed[0].size and now["dest_etag"] == "dest-v1"
    assert (now["lease_owner"], now["lease_expires"], now["last_error"]) == (None, None, None)
    assert now["attempts"] == 0
    assert now["last_modified"] == changed[0].last_modified


def test_upsert_page_mixed_page_and_missing_last_modified(ledger: Ledger, engine: Engine) -> None:
    ledger.upsert_page(planned(5))
    page = planned(5) + [
        Planned(f"image/new-{i}", f"avatar/new-{i}", i, f"e{i}", None) for i in range(3)
    ]
    res = ledger.upsert_page(page)
    assert (res.added, res.reset, res.unchanged) == (3, 0, 5)
    rows = raw_rows(engine)
    assert rows["image/new-1"]["last_modified"] is None
    assert rows["image/new-1"]["state"] == State.PENDING.value
    stamp = rows["image/00001.png"]["last_modified"]
    assert stamp == planned(5)[1].last_modified
    assert rows["image/00001.png"]["created_at"] <= utcnow()


# -- claims ----------------------------------------------------------------------------------


def test_claim_across_states_takes_the_lowest_ids(ledger: Ledger, engine: Engine) -> None:
    """Per-state index ranges merged: the same rows as ``state IN (…) ORDER BY id``."""
    ledger.upsert_page(planned(40))
    keys = sorted(raw_rows(engine))
    rng = random.Random(7)
    for key in keys:
        set_state(engine, [key], rng.choice([State.PENDING, State.COPIED, State.DONE]))
    ledger.claim("host:1:x", [State.PENDING], limit=3, lease_seconds=60)  # leased: skipped
    with engine.connect() as conn:
        expected = list(
            conn.execute(
                sa.select(objects.c.id)
                .where(
                    objects.c.job == JOB,
                    objects.c.state.in_([State.COPIED.value, State.PENDING.value]),
                    objects.c.lease_owner.is_(None),
                )
                .order_by(objects.c.id)
                .limit(7)
            ).scalars()
        )
    got = ledger.claim("host:1:a", [State.COPIED, State.PENDING, State.COPIED], 7, 60)
    assert [r.id for r in got] == expected
    assert ledger.claim("host:1:a", [], 7, 60) == []
