"""Database faults during a run: connections to the Postgres ledger and app database killed
again and again (``pg_terminate_backend``), and a SQLite ledger locked by another process. The
run reports, retries and converges; nothing is lost and no source goes early (I1)."""

from __future__ import annotations

import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from tests.acceptance.test_kill import start_run, wait_for_progress
from tests.helpers import (
    Job,
    assert_converged,
    invariant_violations,
    make_job,
    run_cli,
    sqlite_job,
)


def _terminator(admin_url: str, databases: list[str], stop: threading.Event) -> list[int]:
    killed: list[int] = []
    engine = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")

    def loop() -> None:
        with engine.connect() as conn:
            while not stop.is_set():
                n = conn.execute(
                    sa.text(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                        "WHERE datname = ANY(:dbs) AND pid <> pg_backend_pid()"
                    ),
                    {"dbs": databases},
                ).scalar_one()
                killed.append(int(n))
                time.sleep(0.4)
        engine.dispose()

    threading.Thread(target=loop, daemon=True).start()
    return killed


def postgres_job(
    tmp_path: Path, moto_s3: Any, moto_endpoint: str, pg_database: Callable[[str], str]
) -> tuple[Job, list[str]]:
    """300 objects, ledger and app table in their own Postgres databases (and their names)."""
    ledger, app = pg_database("fledger"), pg_database("fapp")
    job = make_job(
        tmp_path,
        moto_s3,
        moto_endpoint,
        ledger=ledger,
        app=app,
        count=300,
        size=128,
        chunk_size=10,
        concurrency=4,
        delete_source="per_chunk",
        max_attempts=50,
    )
    return job, [sa.engine.make_url(u).database or "" for u in (ledger, app)]


def test_postgres_connections_killed_mid_run(
    tmp_path: Path,
    moto_s3: Any,
    moto_endpoint: str,
    pg_admin_url: str,
    pg_database: Callable[[str], str],
) -> None:
    job, names = postgres_job(tmp_path, moto_s3, moto_endpoint, pg_database)
    proc = start_run(job.config_path)
    wait_for_progress(proc, moto_s3, job.cfg.destination.bucket, 0)
    stop = threading.Event()
    killed = _terminator(pg_admin_url, names, stop)
    time.sleep(4)
    stop.set()
    assert sum(killed) > 0, "no connection was killed: the fault did not happen"
    assert invariant_violations(job) == []
    try:
        _, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    if proc.returncode != 0:  # rows that ran out of attempts: the next run finishes them
        again = start_run(job.config_path)
        _, err = again.communicate(timeout=240)
        assert again.returncode == 0, err.decode()[-2000:]
    assert "Traceback" not in err.decode()
    assert invariant_violations(job) == []
    assert_converged(job)


def test_sqlite_ledger_locked_by_another_process(
    tmp_path: Path, moto_s3: Any, moto_endpoint: str
) -> None:
    job = sqlite_job(
        tmp_path,
        moto_s3,
        moto_endpoint,
        with_app=True,
        count=200,
        size=128,
        chunk_size=10,
        concurrency=4,
        delete_source="per_chunk",
    )
    proc = start_run(job.config_path)
    wait_for_progress(proc, moto_s3, job.cfg.destination.bucket, 0)
    holder = sqlite3.connect(tmp_path / "ledger.db", isolation_level=None, timeout=30)
    holder.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    time.sleep(3)
    assert proc.poll() is None, "the run should be waiting for the lock, not finished"
    holder.execute("ROLLBACK")
    holder.close()
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert invariant_violations(job) == []
    assert_converged(job)


def test_postgres_outage_mid_run(
    tmp_path: Path,
    moto_s3: Any,
    moto_endpoint: str,
    pg_admin_url: str,
    pg_database: Callable[[str], str],
) -> None:
    """Both databases refuse connections for 5 s (as during a restart); the run waits it out."""
    job, names = postgres_job(tmp_path, moto_s3, moto_endpoint, pg_database)
    admin = sa.create_engine(pg_admin_url, isolation_level="AUTOCOMMIT")
    proc = start_run(job.config_path)
    wait_for_progress(proc, moto_s3, job.cfg.destination.bucket, 0)
    try:
        with admin.connect() as conn:
            for name in names:
                conn.execute(sa.text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false'))
            conn.execute(
                sa.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = ANY(:dbs)"
                ),
                {"dbs": names},
            )
            time.sleep(5)
            assert proc.poll() is None, "the run gave up during the outage"
    finally:
        with admin.connect() as conn:
            for name in names:
                conn.execute(sa.text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
        admin.dispose()
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert "not currently accepting connections" in err.decode()  # reported, then retried
    assert invariant_violations(job) == []
    assert_converged(job)


def test_a_ledger_error_mid_chunk_gives_the_rows_back(
    tmp_path: Path, moto_s3: Any, moto_endpoint: str, pg_database: Callable[[str], str]
) -> None:
    """A worker whose chunk ends in a ledger error holds the leases of rows it no longer works
    on, and its heartbeat keeps them alive: it must give them back before it claims again.
    Here the record of the last chunk's deletes fails once (a trigger raises; a sequence counts
    across rolled-back transactions): its sources are gone, its rows stay rewritten under the
    worker's lease, and no later chunk's release frees them. The run used to wait on them for
    ever; now the worker gives them back, claims them again, deletes again (a no-op) and
    records them."""
    ledger = pg_database("eledger")
    job = make_job(
        tmp_path,
        moto_s3,
        moto_endpoint,
        ledger=ledger,
        app=f"sqlite:///{tmp_path / 'app.db'}",
        count=30,
        size=64,
        chunk_size=10,
        workers=1,
        concurrency=4,
        delete_source="per_chunk",
    )
    assert run_cli("plan", "--config", str(job.config_path)).returncode == 0
    engine = sa.create_engine(ledger)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE SEQUENCE fault_once"))
        conn.execute(
            sa.text(
                "CREATE FUNCTION fail_first_done() RETURNS trigger AS $$ BEGIN "
                "IF NEW.state = 'done' AND NEW.id = (SELECT max(id) FROM migrator_objects) "
                "AND nextval('fault_once') = 1 THEN "
                "RAISE EXCEPTION 'injected ledger fault'; END IF; RETURN NEW; END $$ "
                "LANGUAGE plpgsql"
            )
        )
        conn.execute(
            sa.text(
                "CREATE TRIGGER fail_first_done BEFORE UPDATE ON migrator_objects "
                "FOR EACH ROW EXECUTE FUNCTION fail_first_done()"
            )
        )
    engine.dispose()
    proc = start_run(job.config_path)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("the run waited on rows its own worker still held") from None
    assert "injected ledger fault" in err.decode()  # the fault happened and was reported
    assert proc.returncode == 0, err.decode()[-2000:]
    assert invariant_violations(job) == []
    assert_converged(job)
