"""A ledger of 10 million rows, half done: status, claims; and the app-DB rewrite at scale.

    python -m bench.ledger_scale build  --backends sqlite,postgres --rows 10000000
    python -m bench.ledger_scale upgrade --backends sqlite,postgres   # built by an older one
    python -m bench.ledger_scale status --backends sqlite,postgres
    python -m bench.ledger_scale claim  --backends sqlite,postgres --claimers 4 --claims 150
    python -m bench.ledger_scale rewrite --rows 1000000 --batches 500,5000 --writers 1,4
    python -m bench.ledger_scale drop

``build`` writes the rows with one ``INSERT … SELECT`` per million rows (``generate_series``
on Postgres, a recursive CTE on SQLite) into a ledger created by ``open_ledger`` (so the
schema, indexes and triggers are those of the newest Alembic revision), in the mix of a job
half done: 50 % done (the oldest ids, finished at 1,000 per second until now), 2 % rewritten
(waiting for the ``after_all`` gate), 1 % copied, 0.1 % failed, 0.02 % skipped, the rest
pending, some of them with expired leases; plus a second job of 100,000 done rows.
Postgres: database ``scale_ledger``; SQLite: ``/tmp/scale_ledger/ledger.db`` (a few GB;
``drop`` removes both).

``status`` times ``migrator status --json`` and ``migrator status`` as a user runs them (a new
process: interpreter start and imports included) and each ledger query behind them in-process.
``claim`` starts N processes that claim 500 rows at a time (``Ledger.claim``, states pending
and copied, as a worker does before the delete gate opens), hold them 20 ms, record them done
and release them; it reports the latency of each claim. ``rewrite`` fills an app table of N
rows on Postgres (``scale_app``; an index on the path column, as ``seed`` creates) and times
``AppDatabase.rewrite`` over all of them per batch size, by one process and by several at
once (each its own slice of the rows, as workers do).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from bench.plan_scale import (
    drop_pg_database,
    merge_results,
    pg_backend_cpu,
    pg_url,
    recreate_pg_database,
    spawn_measured,
)

TMP = Path("/tmp/scale_ledger")
SQLITE_DB = TMP / "ledger.db"
PG_DB = "scale_ledger"
APP_DB = "scale_app"
JOB = "scale"
CHUNK = 500


def ledger_url(backend: str) -> str:
    return f"sqlite:///{SQLITE_DB}" if backend == "sqlite" else pg_url(PG_DB)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def ms(x: float) -> float:
    return round(x * 1000, 2)


# -- build ------------------------------------------------------------------------------------


def state_case(i: str, n: int) -> str:
    """SQL CASE giving the state of row number ``i`` (same on both backends)."""
    return (
        f"CASE WHEN {i} % 5000 = 11 THEN 'skipped' "
        f"WHEN {i} % 1000 = 7 AND {i} <= {n * 53 // 100} THEN 'failed' "
        f"WHEN {i} <= {n // 2} THEN 'done' "
        f"WHEN {i} <= {n * 52 // 100} THEN 'rewritten' "
        f"WHEN {i} <= {n * 53 // 100} THEN 'copied' ELSE 'pending' END"
    )


def build_postgres(n: int) -> dict[str, Any]:
    from migrator.ledger.repo import Ledger, open_ledger

    url = recreate_pg_database(PG_DB)
    engine = open_ledger(url)
    for job in (JOB, "other"):
        Ledger(engine, job).ensure_job("s3://legacy/image/", "s3://production/avatar/")
    started = time.perf_counter()
    half = n // 2
    step = 1_000_000
    with engine.begin() as conn:
        now = conn.execute(sa.text("SELECT localtimestamp")).scalar_one()
    for job, total, everything_done in ((JOB, n, False), ("other", 100_000, True)):
        for lo in range(1, total + 1, step):
            hi = min(lo + step - 1, total)
            state = "'done'" if everything_done else state_case("i", total)
            with engine.begin() as conn:
                conn.execute(
                    sa.text(
                        f"""
INSERT INTO migrator_objects (job, source_key, dest_key, size, etag, last_modified, dest_etag,
    state, failed_stage, attempts, last_error, lease_owner, lease_expires, created_at, updated_at)
SELECT :job, 'image/' || lpad(i::text, 10, '0'), 'avatar/' || lpad(i::text, 10, '0'),
    1000 + i % 5000, md5(i::text), :lm, CASE WHEN s.state <> 'pending' THEN md5(i::text) END,
    s.state, CASE WHEN s.state = 'failed' THEN 'copy' END,
    CASE WHEN s.state = 'failed' THEN 5 ELSE 0 END,
    CASE WHEN s.state IN ('failed', 'skipped') THEN 'error of row ' || i END,
    CASE WHEN s.state = 'pending' AND i % 977 = 0 THEN 'deadhost:1:0' END,
    CASE WHEN s.state = 'pending' AND i % 977 = 0 THEN :expired END,
    :created,
    CASE WHEN i <= :half THEN :now - make_interval(secs => (:half - i) / 1000.0)
         ELSE :created END
FROM generate_series(CAST(:lo AS bigint), CAST(:hi AS bigint)) AS i,
     LATERAL (SELECT {state} AS state) AS s
"""
                    ),
                    {
                        "job": job,
                        "lo": lo,
                        "hi": hi,
                        "half": half if not everything_done else total,
                        "lm": datetime(2026, 1, 1),
                        "created": now - timedelta(days=1),
                        "expired": now - timedelta(minutes=5),
                        "now": now,
                    },
                )
    insert_s = time.perf_counter() - started
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("VACUUM ANALYZE migrator_objects"))
        size = conn.execute(
            sa.text("SELECT pg_size_pretty(pg_database_size(current_database()))")
        ).scalar_one()
    engine.dispose()
    return {
        "rows": n,
        "insert_s": round(insert_s, 1),
        "total_s": round(time.perf_counter() - started, 1),
        "size": size,
    }


def build_sqlite(n: int) -> dict[str, Any]:
    from migrator.ledger.repo import Ledger, open_ledger

    TMP.mkdir(parents=True, exist_ok=True)
    for p in TMP.glob("ledger.db*"):
        p.unlink()
    engine = open_ledger(ledger_url("sqlite"))
    for job in (JOB, "other"):
        Ledger(engine, job).ensure_job("s3://legacy/image/", "s3://production/avatar/")
    engine.dispose()
    import sqlite3

    started = time.perf_counter()
    db = sqlite3.connect(SQLITE_DB, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=OFF")
    db.execute("PRAGMA cache_size=-1000000")
    now = datetime.now(UTC).replace(tzinfo=None)
    fmt = "%Y-%m-%d %H:%M:%S.%f"
    created = (now - timedelta(days=1)).strftime(fmt)
    expired = (now - timedelta(minutes=5)).strftime(fmt)
    step = 1_000_000
    for job, total, everything_done in ((JOB, n, False), ("other", 100_000, True)):
        half = total if everything_done else n // 2
        state = "'done'" if everything_done else state_case("i", total)
        for lo in range(1, total + 1, step):
            hi = min(lo + step - 1, total)
            db.execute("BEGIN")
            db.execute(
                f"""
WITH RECURSIVE c(i) AS (SELECT :lo UNION ALL SELECT i + 1 FROM c WHERE i < :hi),
s(i, state) AS (SELECT i, {state} FROM c)
INSERT INTO migrator_objects (job, source_key, dest_key, size, etag, last_modified, dest_etag,
    state, failed_stage, attempts, last_error, lease_owner, lease_expires, created_at, updated_at)
SELECT :job, printf('image/%010d', i), printf('avatar/%010d', i), 1000 + i % 5000,
    printf('%032x', i * 2654435761), '2026-01-01 00:00:00.000000',
    CASE WHEN state <> 'pending' THEN printf('%032x', i * 2654435761) END,
    state, CASE WHEN state = 'failed' THEN 'copy' END,
    CASE WHEN state = 'failed' THEN 5 ELSE 0 END,
    CASE WHEN state IN ('failed', 'skipped') THEN 'error of row ' || i END,
    CASE WHEN state = 'pending' AND i % 977 = 0 THEN 'deadhost:1:0' END,
    CASE WHEN state = 'pending' AND i % 977 = 0 THEN :expired END,
    :created,
    CASE WHEN i <= :half
         THEN strftime('%Y-%m-%d %H:%M:%S', :now_epoch - (:half - i) / 1000, 'unixepoch')
              || '.000000'
         ELSE :created END
FROM s WHERE true
""",
                {
                    "job": job,
                    "lo": lo,
                    "hi": hi,
                    "half": half,
                    "created": created,
                    "expired": expired,
                    "now_epoch": int(now.replace(tzinfo=UTC).timestamp()),
                },
            )
            db.execute("COMMIT")
    insert_s = time.perf_counter() - started
    db.execute("ANALYZE")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    size = sum(p.stat().st_size for p in TMP.glob("ledger.db*"))
    return {
        "rows": n,
        "insert_s": round(insert_s, 1),
        "total_s": round(time.perf_counter() - started, 1),
        "size": f"{size / 2**30:.1f} GB",
    }


def upgrade(backend: str) -> dict[str, Any]:
    """Bring a ledger built by an older migrator to the newest revision, timed."""
    from migrator.ledger.repo import open_ledger, schema_revision

    t0 = time.perf_counter()
    engine = open_ledger(ledger_url(backend))
    took = time.perf_counter() - t0
    revision = schema_revision(engine)
    engine.dispose()
    return {"upgrade_s": round(took, 1), "revision": revision}


# -- status -----------------------------------------------------------------------------------


def write_config(backend: str) -> Path:
    TMP.mkdir(parents=True, exist_ok=True)
    path = TMP / f"status-{backend}.yaml"
    path.write_text(
        json.dumps(
            {
                "job": JOB,
                "ledger": ledger_url(backend),
                "source": {"bucket": "legacy", "prefix": "image/"},
                "destination": {"bucket": "production", "prefix": "avatar/"},
            }
        )
    )
    return path


def measure_status(backend: str, runs: int) -> dict[str, Any]:
    cfg = write_config(backend)
    out: dict[str, Any] = {}
    startup = [
        spawn_measured([sys.executable, "-c", "import migrator.cli"])["wall_s"] for _ in range(3)
    ]
    out["python_import_cli_s"] = statistics.median(startup)
    for name, extra in (("status_json", ["--json"]), ("status_table", [])):
        walls, cpus = [], []
        for _ in range(runs):
            got = spawn_measured(
                [sys.executable, "-m", "migrator", "status", "--config", str(cfg), *extra]
            )
            walls.append(got["wall_s"])
            cpus.append(got["cpu_s"])
            if extra:
                doc = json.loads(got["stdout"])
        out[name] = {
            "wall_s_median": statistics.median(walls),
            "wall_s": walls,
            "cpu_s_median": statistics.median(cpus),
        }
    out["document"] = {k: doc[k] for k in ("total", "counts", "objects_per_second")}
    out["queries_ms"] = spawn_json("child-queries", backend)
    return out


def child_queries(backend: str) -> dict[str, Any]:
    """Each ledger query behind status and the worker loop, timed in-process (median of 5)."""
    from migrator.ledger.repo import Ledger, open_existing_ledger
    from migrator.ledger.tables import State

    t0 = time.perf_counter()
    engine = open_existing_ledger(ledger_url(backend))
    opened = time.perf_counter() - t0
    ledger = Ledger(engine, JOB)
    calls = {
        "counts": ledger.counts,
        "bytes_by_state": ledger.bytes_by_state,
        "done_rate": lambda: ledger.done_rate(timedelta(seconds=60)),
        "recent_errors": ledger.recent_errors,
        "s3_retries": ledger.s3_retries,
        "delete_gate_open": ledger.delete_gate_open,
        "any_in_states": lambda: ledger.any_in_states([State.PENDING, State.COPIED]),
        "heartbeat_500": lambda: ledger.heartbeat("nobody:0:0", 60),
    }
    if hasattr(ledger, "status_counts"):
        calls["status_counts"] = ledger.status_counts
    out: dict[str, Any] = {"open_existing_ledger": ms(opened)}
    for name, fn in calls.items():
        times = []
        for _ in range(5):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        out[name] = ms(statistics.median(times))
    engine.dispose()
    return out


def spawn_json(cmd: str, backend: str, *args: str) -> Any:
    got = spawn_measured(
        [sys.executable, "-m", "bench.ledger_scale", cmd, "--backends", backend, *args]
    )
    return json.loads(got["stdout"])


# -- claims -----------------------------------------------------------------------------------


def child_claimer(backend: str, name: str, claims: int, hold: float, start_at: float) -> None:
    from migrator.ledger.repo import Ledger, open_ledger
    from migrator.ledger.tables import State

    engine = open_ledger(ledger_url(backend), upgrade=False)
    ledger = Ledger(engine, JOB)
    owner = f"bench:{name}:0"
    ledger.claim(owner, [State.PENDING], 1, 60)  # connect and warm up the pool
    ledger.release(owner)
    time.sleep(max(0.0, start_at - time.time()))
    lat: list[float] = []
    got = 0
    c0 = time.process_time()
    for _ in range(claims):
        t = time.perf_counter()
        rows = ledger.claim(owner, [State.PENDING, State.COPIED], CHUNK, 60)
        lat.append(time.perf_counter() - t)
        got += len(rows)
        time.sleep(hold)
        ledger.record_state(owner, [r.id for r in rows], State.DONE)
        ledger.release(owner)
    cpu = time.process_time() - c0
    engine.dispose()
    print(json.dumps({"latencies": lat, "rows": got, "cpu_s": cpu}))


def measure_claims(backend: str, claimers: int, claims: int, hold: float) -> dict[str, Any]:
    import subprocess

    start_at = time.time() + 3
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.ledger_scale",
                "child-claimer",
                "--backends",
                backend,
                "--name",
                str(i),
                "--claims",
                str(claims),
                "--hold",
                str(hold),
                "--start-at",
                str(start_at),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(claimers)
    ]
    outs = [json.loads(p.communicate()[0]) for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError("a claimer failed")
    lat = [x for o in outs for x in o["latencies"]]
    return {
        "claimers": claimers,
        "claims": len(lat),
        "chunk": CHUNK,
        "hold_s": hold,
        "rows_claimed": sum(o["rows"] for o in outs),
        "p50_ms": ms(pct(lat, 50)),
        "p90_ms": ms(pct(lat, 90)),
        "p99_ms": ms(pct(lat, 99)),
        "max_ms": ms(max(lat)),
        "mean_ms": ms(statistics.fmean(lat)),
        "client_cpu_s": round(sum(o["cpu_s"] for o in outs), 2),
    }


def explain_claim(backend: str) -> list[str]:
    """The plan of the claim's row selection (to show which index it uses)."""
    from migrator.ledger.repo import Ledger, open_ledger
    from migrator.ledger.tables import State

    engine = open_ledger(ledger_url(backend), upgrade=False)
    ledger = Ledger(engine, JOB)
    stmt = ledger.claim_statement("explain:0:0", [State.PENDING, State.COPIED], CHUNK, 60)
    with engine.connect() as conn:
        compiled = stmt.compile(dialect=engine.dialect, compile_kwargs={"literal_binds": True})
        if backend == "postgres":
            rows = conn.execute(sa.text(f"EXPLAIN {compiled}")).scalars().all()
        else:
            rows = [r[-1] for r in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled}")]
        conn.rollback()
    engine.dispose()
    return [str(r) for r in rows]


# -- app-DB rewrite ---------------------------------------------------------------------------


def fill_app(url: str, n: int) -> None:
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE IF EXISTS avatars"))
        conn.execute(
            sa.text(
                "CREATE TABLE avatars (id serial PRIMARY KEY, user_id integer NOT NULL, "
                "path varchar(1024))"
            )
        )
        conn.execute(
            sa.text(
                "INSERT INTO avatars (user_id, path) SELECT i, 'image/' || lpad(i::text, 10, '0') "
                "FROM generate_series(1, :n) AS i"
            ),
            {"n": n},
        )
        conn.execute(
            sa.text(
                "INSERT INTO avatars (user_id, path) SELECT 900000 + i, "
                "'banner/' || lpad(i::text, 6, '0') FROM generate_series(1, :m) AS i"
            ),
            {"m": n // 10},
        )
        conn.execute(sa.text("CREATE INDEX ix_avatars_path ON avatars (path)"))
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("VACUUM ANALYZE avatars"))
    engine.dispose()


def child_rewrite(lo: int, hi: int, batch: int, start_at: float) -> dict[str, Any]:
    """In a child process: rewrite app rows ``lo..hi-1`` in batches, as one worker would."""
    from migrator.appdb import AppDatabase
    from migrator.config import AppDB

    url = pg_url(APP_DB)
    app = AppDatabase(AppDB(url=url, table="avatars", column="path"))
    with app.engine.connect() as conn:
        server0 = pg_backend_cpu(conn)
    time.sleep(max(0.0, start_at - time.time()))
    changed = 0
    t0, c0 = time.time(), time.process_time()
    for first in range(lo, hi, batch):
        pairs = [
            (f"image/{i:010d}", f"avatar/{i:010d}") for i in range(first, min(first + batch, hi))
        ]
        changed += app.rewrite(pairs)
    end, cpu = time.time(), time.process_time() - c0
    with app.engine.connect() as conn:
        server = pg_backend_cpu(conn) - server0
    app.dispose()
    return {"changed": changed, "start": t0, "end": end, "cpu": cpu, "server_cpu": server}


def measure_rewrite(n: int, batches: list[int], writers: list[int]) -> dict[str, Any]:
    import subprocess

    url = recreate_pg_database(APP_DB)
    out = {}
    try:
        for w in writers:
            for batch in batches:
                fill_app(url, n)
                start_at = time.time() + 2
                step = -(-n // w)
                procs = [
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "bench.ledger_scale",
                            "child-rewrite",
                            "--lo",
                            str(lo),
                            "--hi",
                            str(min(lo + step, n + 1)),
                            "--batch",
                            str(batch),
                            "--start-at",
                            str(start_at),
                        ],
                        stdout=subprocess.PIPE,
                        text=True,
                    )
                    for lo in range(1, n + 1, step)
                ]
                got = [json.loads(p.communicate()[0]) for p in procs]
                if any(p.returncode for p in procs) or sum(g["changed"] for g in got) != n:
                    raise RuntimeError(f"rewrite failed: {got}")
                wall = max(g["end"] for g in got) - min(g["start"] for g in got)
                key = f"writers={w},batch={batch}"
                out[key] = {
                    "rows": n,
                    "writers": w,
                    "batch": batch,
                    "wall_s": round(wall, 2),
                    "rows_per_s": round(n / wall),
                    "client_cpu_s": round(sum(g["cpu"] for g in got), 2),
                    "server_cpu_s": round(sum(g["server_cpu"] for g in got), 2),
                }
                print(f"rewrite {key}: {json.dumps(out[key])}", flush=True)
    finally:
        drop_pg_database(APP_DB)
    return out


# -- main -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "what",
        choices=[
            "build",
            "upgrade",
            "status",
            "claim",
            "rewrite",
            "drop",
            "child-queries",
            "child-claimer",
            "child-rewrite",
        ],
    )
    parser.add_argument("--backends", default="sqlite,postgres")
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--claimers", type=int, default=4)
    parser.add_argument("--claims", type=int, default=150)
    parser.add_argument("--hold", type=float, default=0.02)
    parser.add_argument("--batches", default="500,5000")
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--writers", default="1,4", help="rewrite: processes at once")
    parser.add_argument("--lo", type=int, default=1)
    parser.add_argument("--hi", type=int, default=1)
    parser.add_argument("--name", default="0")
    parser.add_argument("--start-at", type=float, default=0.0)
    parser.add_argument("--label", default="after", help="key under which figures are saved")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    backends = args.backends.split(",")

    def save(section: str, data: Any) -> None:
        if not args.no_save:
            merge_results(f"{section}_{args.label}", data)

    if args.what == "child-queries":
        print(json.dumps(child_queries(backends[0])))
    elif args.what == "child-claimer":
        child_claimer(backends[0], args.name, args.claims, args.hold, args.start_at)
    elif args.what == "child-rewrite":
        print(json.dumps(child_rewrite(args.lo, args.hi, args.batch, args.start_at)))
    elif args.what == "build":
        out = {}
        for b in backends:
            out[b] = build_postgres(args.rows) if b == "postgres" else build_sqlite(args.rows)
            print(f"built {b}: {out[b]}", flush=True)
        save("build", out)
    elif args.what == "upgrade":
        out = {}
        for b in backends:
            out[b] = upgrade(b)
            print(f"upgraded {b}: {out[b]}", flush=True)
        save("upgrade", out)
    elif args.what == "status":
        out = {}
        for b in backends:
            out[b] = measure_status(b, args.runs)
            print(f"status {b}: {json.dumps(out[b])}", flush=True)
        save("status", out)
    elif args.what == "claim":
        out = {}
        for b in backends:
            out[b] = measure_claims(b, args.claimers, args.claims, args.hold)
            with contextlib.suppress(AttributeError):  # no claim_statement before this change
                out[b]["plan"] = explain_claim(b)
            print(f"claim {b}: {json.dumps(out[b])}", flush=True)
        save("claim", out)
    elif args.what == "rewrite":
        out = measure_rewrite(
            args.rows,
            [int(x) for x in args.batches.split(",")],
            [int(x) for x in args.writers.split(",")],
        )
        save("rewrite", out)
    elif args.what == "drop":
        drop_pg_database(PG_DB)
        for p in TMP.glob("*"):
            p.unlink()
        print("dropped", PG_DB, "and", TMP)


if __name__ == "__main__":
    main()
