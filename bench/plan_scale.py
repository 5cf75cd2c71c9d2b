"""Plan at scale: how fast and in how much memory ``migrator plan`` fills a ledger.

    python -m bench.plan_scale --objects 100000,1000000 --backends sqlite,postgres

Two measurements per backend and object count, each in a fresh child process whose peak RSS
and CPU time come from ``wait4`` (the figures are the child's own, not this script's):

* ``ledger``: ``Ledger.upsert_page`` fed with synthetic pages of 1,000 objects (what
  ``list_pages`` yields), without S3: the ledger side alone. Then the same pages again (a
  re-plan where nothing changed) and once more with every 100th ETag changed.
* ``plan``: ``migrator plan`` end to end against s3fast filled by its load generator
  (``loadgen -op put -size 16``): listing plus ledger.

Postgres databases are ``scale_plan_*`` on 127.0.0.1:5432 (user postgres), created and dropped
here; SQLite files live under ``/tmp/scale_plan`` and are deleted afterwards. Figures go to
``bench/results/scale-<date>.json`` (merged with what ``bench.ledger_scale`` wrote there).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
PG_ADMIN = os.environ.get(
    "SCALE_PG_ADMIN", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
)
TMP = Path("/tmp/scale_plan")
PAGE = 1000


# -- helpers shared with bench.ledger_scale -------------------------------------------------


def spawn_measured(cmd: list[str], *, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``cmd``: wall time, and the child's own CPU and peak RSS (reaped with ``wait4``)."""
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out_file, tempfile.TemporaryFile("w+") as err_file:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env={**os.environ, **(env or {})}, stdout=out_file, stderr=err_file
        )
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        out_file.seek(0)
        err_file.seek(0)
        out, err = out_file.read(), err_file.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:5])} exited {proc.returncode}: {err[-2000:]}")
    return {
        "wall_s": round(wall, 3),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "stdout": out,
        "stderr": err,
    }


def pg_url(database: str) -> str:
    return sa.engine.make_url(PG_ADMIN).set(database=database).render_as_string(False)


def recreate_pg_database(name: str) -> str:
    assert name.startswith("scale_"), name
    admin = sa.create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return pg_url(name)


def drop_pg_database(name: str) -> None:
    assert name.startswith("scale_"), name
    admin = sa.create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def pg_backend_cpu(conn: sa.Connection) -> float:
    """CPU seconds used so far by the Postgres backend serving ``conn`` (same host only)."""
    pid = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
    return proc_cpu(int(pid))


def proc_cpu(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def merge_results(section: str, data: Any, path: Path | None = None) -> Path:
    """Write ``data`` under ``section`` of today's results file, keeping the other sections."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = path or RESULTS / f"scale-{datetime.now(UTC):%Y-%m-%d}.json"
    doc = json.loads(path.read_text()) if path.exists() else {}
    doc.setdefault("machine", machine())
    if isinstance(data, dict) and isinstance(doc.get(section), dict):
        doc[section].update(data)  # e.g. the ledger figures, then plan's, under one label
    else:
        doc[section] = data
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def machine() -> dict[str, Any]:
    admin = sa.create_engine(PG_ADMIN)
    with admin.connect() as conn:
        pg = conn.execute(sa.text("SHOW server_version")).scalar_one()
    admin.dispose()
    import sqlite3

    return {
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "sqlalchemy": sa.__version__,
        "sqlite": sqlite3.sqlite_version,
        "postgres": pg,
        "note": "shared 2-core machine; other benchmarks ran at the same time",
    }


def s3fast_binary() -> str:
    build = REPO.parent / "shared" / "s3fast" / "build.sh"
    out = subprocess.run(["bash", str(build)], capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


# -- the ledger side alone ------------------------------------------------------------------


def synthetic_pages(n: int, version: str = "v1", change_every: int = 0) -> Iterator[list[Any]]:
    """Pages of ``Planned`` as ``plan_job`` builds them from a listing of n objects."""
    from migrator.ledger.repo import Planned

    lm = datetime(2026, 11, 1, 12, 0, 0)
    for start in range(0, n, PAGE):
        page = []
        for i in range(start, min(start + PAGE, n)):
            changed = change_every and i % change_every == 0
            page.append(
                Planned(
                    source_key=f"image/{i:010d}",
                    dest_key=f"avatar/{i:010d}",
                    size=16,
                    etag=f"{'v2' if changed else version}{i:030x}",
                    last_modified=lm,
                )
            )
        yield page


def child_ledger(url: str, n: int) -> dict[str, Any]:
    """In a child process: fresh plan of n objects, re-plan unchanged, re-plan 1 % changed;
    each a plan of its own (``mark_planned`` after the last page, as ``plan_job`` does)."""
    from migrator.ledger.repo import Ledger, open_ledger

    engine = open_ledger(url)
    ledger = Ledger(engine, "scale")
    ledger.ensure_job("s3://legacy/image/", "s3://production/avatar/")
    out: dict[str, Any] = {}
    for name, pages in (
        ("fresh", synthetic_pages(n)),
        ("replan_unchanged", synthetic_pages(n)),
        ("replan_1pct_changed", synthetic_pages(n, change_every=100)),
    ):
        server_cpu0 = _server_cpu(engine)
        wall = cpu = 0.0
        totals = [0, 0, 0]
        for page in pages:
            t0, c0 = time.perf_counter(), time.process_time()
            res = ledger.upsert_page(page)
            wall += time.perf_counter() - t0
            cpu += time.process_time() - c0
            totals[0] += res.added
            totals[1] += res.reset
            totals[2] += res.unchanged
        t0 = time.perf_counter()
        ledger.mark_planned()  # as plan_job does after the last page
        marked = time.perf_counter() - t0
        out[name] = {
            "objects": n,
            "mark_planned_s": round(marked, 3),
            "upsert_wall_s": round(wall, 3),
            "upsert_cpu_s": round(cpu, 3),
            "rows_per_s": round(n / wall),
            "server_cpu_s": _round(_server_cpu(engine) - server_cpu0),
            "added": totals[0],
            "reset": totals[1],
            "unchanged": totals[2],
        }
    engine.dispose()
    return out


def _server_cpu(engine: sa.Engine) -> float:
    if engine.dialect.name != "postgresql":
        return float("nan")
    with engine.connect() as conn:
        return pg_backend_cpu(conn)


def _round(x: float) -> float | None:
    return None if x != x else round(x, 3)


def measure_ledger(backend: str, n: int) -> dict[str, Any]:
    if backend == "sqlite":
        TMP.mkdir(parents=True, exist_ok=True)
        db = TMP / f"ledger-{n}.db"
        for p in TMP.glob(f"ledger-{n}.db*"):
            p.unlink()
        url = f"sqlite:///{db}"
    else:
        url = recreate_pg_database(f"scale_plan_ledger_{n}")
    try:
        got = spawn_measured(
            [sys.executable, "-m", "bench.plan_scale", "child-ledger", "--url", url, "-n", str(n)]
        )
    finally:
        if backend == "sqlite":
            for p in TMP.glob(f"ledger-{n}.db*"):
                p.unlink()
        else:
            drop_pg_database(f"scale_plan_ledger_{n}")
    result = json.loads(got["stdout"])
    result["process"] = {k: got[k] for k in ("wall_s", "cpu_s", "peak_rss_mb")}
    return result


# -- migrator plan end to end ---------------------------------------------------------------


class Server:
    def __init__(self, binary: str, port: int) -> None:
        self.endpoint = f"http://127.0.0.1:{port}"
        self.addr = f"127.0.0.1:{port}"
        self.binary = binary
        self.proc = subprocess.Popen([binary, "-addr", self.addr, "-quiet"])
        for _ in range(200):
            try:
                self.stats()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("s3fast did not start")

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.endpoint}/_s3fast/stats", timeout=5) as r:
            return json.loads(r.read())

    def fill(self, n: int) -> float:
        started = time.perf_counter()
        for bucket, prefix, count in (("legacy", "image/", n), ("production", "avatar/", 1)):
            subprocess.run(
                [
                    self.binary,
                    "loadgen",
                    "-endpoint",
                    self.addr,
                    "-op",
                    "put",
                    "-bucket",
                    bucket,
                    "-prefix",
                    prefix,
                    "-n",
                    str(count),
                    "-c",
                    "32",
                    "-size",
                    "16",
                ],
                check=True,
                capture_output=True,
            )
        return time.perf_counter() - started

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def measure_plan(backend: str, n: int, server: Server) -> dict[str, Any]:
    TMP.mkdir(parents=True, exist_ok=True)
    if backend == "sqlite":
        for p in TMP.glob(f"e2e-{n}.db*"):
            p.unlink()
        url = f"sqlite:///{TMP / f'e2e-{n}.db'}"
    else:
        url = recreate_pg_database(f"scale_plan_e2e_{n}")
    cfg = TMP / f"plan-{backend}-{n}.yaml"
    cfg.write_text(
        json.dumps(
            {
                "job": "scale",
                "ledger": url,
                "source": {"bucket": "legacy", "prefix": "image/", "endpoint_url": server.endpoint},
                "destination": {
                    "bucket": "production",
                    "prefix": "avatar/",
                    "endpoint_url": server.endpoint,
                },
            }
        )
    )
    env = {
        "AWS_ACCESS_KEY_ID": "x",
        "AWS_SECRET_ACCESS_KEY": "x",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    try:
        got = spawn_measured(
            [sys.executable, "-m", "migrator", "plan", "--config", str(cfg)], env=env
        )
        eng = sa.create_engine(url)
        with eng.connect() as conn:
            rows = conn.execute(sa.text("SELECT count(*) FROM migrator_objects")).scalar_one()
        eng.dispose()
    finally:
        cfg.unlink(missing_ok=True)
        if backend == "sqlite":
            for p in TMP.glob(f"e2e-{n}.db*"):
                p.unlink()
        else:
            drop_pg_database(f"scale_plan_e2e_{n}")
    if rows != n:
        raise RuntimeError(f"plan wrote {rows} rows for {n} objects")
    summary = got["stderr"].strip().splitlines()[-1] if got["stderr"].strip() else ""
    return {
        "objects": n,
        "wall_s": got["wall_s"],
        "rows_per_s": round(n / got["wall_s"]),
        "cpu_s": got["cpu_s"],
        "peak_rss_mb": got["peak_rss_mb"],
        "summary": summary,
    }


# -- main -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", nargs="?", default="all", choices=["all", "ledger", "plan"])
    parser.add_argument("--objects", default="100000,1000000")
    parser.add_argument("--backends", default="sqlite,postgres")
    parser.add_argument("--label", default="after", help="key under which figures are saved")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    counts = [int(x) for x in args.objects.split(",")]
    backends = args.backends.split(",")
    results: dict[str, Any] = {}
    if args.what in ("all", "ledger"):
        for backend in backends:
            for n in counts:
                r = measure_ledger(backend, n)
                results.setdefault("ledger", {}).setdefault(backend, {})[str(n)] = r
                print(f"ledger {backend} {n:>9,}: {json.dumps(r)}", flush=True)
    if args.what in ("all", "plan"):
        binary = s3fast_binary()
        for n in counts:
            server = Server(binary, 9300 + counts.index(n))
            try:
                fill = server.fill(n)
                print(f"s3fast filled with {n:,} objects in {fill:.1f} s", flush=True)
                for backend in backends:
                    r = measure_plan(backend, n, server)
                    results.setdefault("plan", {}).setdefault(backend, {})[str(n)] = r
                    print(f"plan {backend} {n:>9,}: {json.dumps(r)}", flush=True)
            finally:
                server.stop()
    shutil.rmtree(TMP, ignore_errors=True)
    if not args.no_save:
        print(f"saved to {merge_results(f'plan_{args.label}', results)}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "child-ledger":
        p = argparse.ArgumentParser()
        p.add_argument("cmd")
        p.add_argument("--url", required=True)
        p.add_argument("-n", type=int, required=True)
        a = p.parse_args()
        print(json.dumps(child_ledger(a.url, a.n)))
    else:
        main()
