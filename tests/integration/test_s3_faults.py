"""S3 faults on a real server: the job converges, copies once, deletes only rewritten sources.

The fault matrix runs a job of a few hundred small objects on s3fast started with injected
faults (503 SlowDown, TCP resets, latency, faults on one operation only); s3fast applies a
faulted request never, so a retried request cannot have taken effect twice. Every case must end
with exit 0 and a converged job, and s3fast's counters must show (a) exactly one successful
CopyObject per object, (b) no DeleteObjects of a source whose app row was not yet rewritten
(watched *during* the run, not only at the end) and (c) retries that stay bounded.

Two supervisors on one Postgres ledger must copy each object exactly once between them.

A DeleteObjects answer of 200 with per-key errors comes from moto: a bucket policy that denies
``s3:DeleteObject`` on some keys makes moto's DeleteObjects list those keys under ``Errors``
with ``AccessDenied`` (as S3 does), while the rest of the batch is deleted.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from botocore.exceptions import BotoCoreError
from rich.console import Console
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from migrator.config import Config
from migrator.ledger.repo import Ledger, make_engine
from migrator.ledger.tables import objects
from migrator.supervisor import run_job
from tests.conftest import REPO, S3Fast, s3_client
from tests.helpers import (
    Job,
    app_paths,
    assert_converged,
    deny_deletes,
    invariant_violations,
    ledger_rows,
    list_keys,
    make_job,
    run_cli,
    sqlite_job,
)


def quiet() -> Console:
    return Console(stderr=True, quiet=True)


def db_url(kind: str, tmp_path: Path, name: str, request: pytest.FixtureRequest) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / f'{name}.db'}"
    return str(request.getfixturevalue("pg_database")(name))


def checking_client(endpoint: str) -> Any:
    """A client for the test's own requests (seeding, monitoring, final checks) that retries
    an injected 503 or reset after 10 ms instead of botocore's 0-1-2-4 s backoff, so checking
    hundreds of objects on a faulty server stays quick. migrator's clients are untouched."""
    client = s3_client(endpoint)

    def quick_retry(
        attempts: int, response: Any = None, caught_exception: Any = None, **_: Any
    ) -> float | None:
        if attempts >= 10:
            return None
        if caught_exception is not None and isinstance(caught_exception, BotoCoreError):
            return 0.01
        if response is not None and response[0].status_code == 503:
            return 0.01
        return None  # botocore's own handler decides

    client.meta.events.register_first("needs-retry.s3", quick_retry)
    return client


class DeleteOrderMonitor(threading.Thread):
    """Watches a running job from outside for I1: sources are deleted only after their app rows
    point at the destination.

    Each poll lists the source prefix first and reads the app rows afterwards. A source absent
    from the listing was deleted before the read began, and a rewrite is never undone, so if the
    rewrite was committed before the delete (I1) the read must see the destination key. A row
    still holding the old key of a deleted source is an early delete. Its own S3 requests (every
    attempt, retries included) are counted, so that they can be left out of the job's totals.
    """

    def __init__(self, job: Job, endpoint: str, interval: float = 0.25) -> None:
        super().__init__(daemon=True, name="delete-order-monitor")
        assert job.cfg.app_db is not None
        self.job = job
        self.interval = interval
        self.client = checking_client(endpoint)
        self.requests = 0
        self.client.meta.events.register("before-send.s3", self._count)
        self.engine = sa.create_engine(job.cfg.app_db.url)
        self.stopped = threading.Event()
        self.armed = False
        self.polls = 0
        self.deleted_seen = 0
        self.violations: list[str] = []
        self.poll_errors: list[str] = []

    def _count(self, **_: Any) -> None:
        self.requests += 1

    def _app_paths(self) -> list[str | None]:
        with self.engine.connect() as conn:
            return list(
                conn.execute(sa.text("SELECT path FROM avatars ORDER BY user_id")).scalars()
            )

    def poll(self) -> None:
        try:
            self._poll()
        except SQLAlchemyError as exc:  # e.g. SQLite busy: this poll proves nothing
            self.poll_errors.append(f"app db: {exc}")

    def _poll(self) -> None:
        if not self.armed:
            # No source may go before the first rewrite; until then the monitor sends nothing,
            # so its requests cannot take the fault draws of the run's pre-flight checks.
            paths = self._app_paths()
            dest = {self.job.dest_key(o.key) for o in self.job.objects}
            if not dest.intersection(paths):
                return
            self.armed = True
        src = self.job.cfg.source
        try:
            present = list_keys(self.client, src.bucket, src.prefix)
        except Exception as exc:  # a failed listing proves nothing either way
            self.poll_errors.append(f"list: {exc}")
            return
        paths = self._app_paths()  # read after the listing: see the class docstring
        self.polls += 1
        deleted = 0
        for obj, path in zip(self.job.objects, paths, strict=False):
            if obj.key in present:
                continue
            deleted += 1
            if path != self.job.dest_key(obj.key):
                self.violations.append(f"EARLY DELETE: {obj.key!r} gone while app row is {path!r}")
        self.deleted_seen = max(self.deleted_seen, deleted)

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            self.poll()

    def finish(self) -> None:
        self.stopped.set()
        self.join(timeout=30)
        self.armed = True
        self.poll()  # one last look at the end state
        self.engine.dispose()


@dataclass(frozen=True)
class FaultCase:
    id: str
    flags: tuple[str, ...]
    count: int
    delete_source: str
    ledger: str  # sqlite | postgres
    app: str  # sqlite | postgres
    faulted: frozenset[str] | None  # operations the faults hit; None: all of them
    workers: int = 2
    concurrency: int = 8
    max_requests_per_object: float = 1.5
    max_attempts: int = 5
    transport: str = "crt"


CHUNK = 25

CASES = [
    FaultCase(
        "slowdown-5pct",
        ("-fail-rate", "0.05", "-seed", "11"),
        200,
        "per_chunk",
        ledger="sqlite",
        app="postgres",
        faulted=None,
    ),
    FaultCase(
        "slowdown-5pct-boto3",
        ("-fail-rate", "0.05", "-seed", "21"),
        150,
        "per_chunk",
        ledger="sqlite",
        app="sqlite",
        faulted=None,
        transport="boto3",
    ),
    FaultCase(
        "reset-1pct-boto3",
        ("-reset-rate", "0.01", "-seed", "22"),
        150,
        "after_all",
        ledger="sqlite",
        app="sqlite",
        faulted=None,
        transport="boto3",
    ),
    FaultCase(
        "reset-1pct",
        ("-reset-rate", "0.01", "-seed", "12"),
        300,
        "per_chunk",
        ledger="postgres",
        app="postgres",
        faulted=None,
    ),
    FaultCase(
        "latency-2ms-jitter-8ms",
        ("-latency", "2ms", "-jitter", "8ms", "-seed", "13"),
        400,
        "after_all",
        ledger="sqlite",
        app="sqlite",
        faulted=frozenset(),  # slow, but nothing fails
    ),
    FaultCase(
        "deleteobjects-slowdown-50pct",
        ("-fault-ops", "DeleteObjects", "-fail-rate", "0.5", "-seed", "14"),
        300,
        "per_chunk",
        ledger="sqlite",
        app="sqlite",
        faulted=frozenset({"DeleteObjects"}),
    ),
    FaultCase(
        "copyobject-slowdown-20pct",
        ("-fault-ops", "CopyObject", "-fail-rate", "0.2", "-seed", "15"),
        200,
        "after_all",
        ledger="postgres",
        app="sqlite",
        faulted=frozenset({"CopyObject"}),
        workers=4,
        concurrency=4,
    ),
]


@dataclass(frozen=True)
class Measured:
    case: str
    objects: int
    copy_requests: int
    delete_requests: int
    other_requests: int
    injected: dict[str, int]
    wall_seconds: float
    ledger_attempts: int | None = None  # errors that outlived botocore's retries


MEASURED: list[Measured] = []


@pytest.fixture(scope="module", autouse=True)
def _print_matrix() -> Iterator[None]:
    """Print the measured figures (``pytest -s``), the source of docs/reliability.md."""
    yield
    for m in MEASURED:
        print(
            f"\n| {m.case} | {m.objects} | {m.copy_requests} | {m.delete_requests} | "
            f"{m.other_requests} | {m.injected.get('slowdown', 0)} SlowDown, "
            f"{m.injected.get('reset', 0)} resets | {m.ledger_attempts} | {m.wall_seconds:.1f} s |",
            end="",
        )
    print()


def injected_on(case: FaultCase, operation: str, injected_total: int) -> int | None:
    """Faults injected on ``operation``: exact when the case faults one operation or none;
    None when every operation was faulted (s3fast counts injections only in total)."""
    if case.faulted is None:
        return None
    if operation not in case.faulted:
        return 0
    assert case.faulted == {operation}
    return injected_total


@pytest.mark.s3fast
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_fault_matrix(
    tmp_path: Path,
    s3fast: Callable[..., S3Fast],
    request: pytest.FixtureRequest,
    case: FaultCase,
) -> None:
    server = s3fast(*case.flags)
    job = make_job(
        tmp_path,
        checking_client(server.endpoint),
        server.endpoint,
        ledger=db_url(case.ledger, tmp_path, "ledger", request),
        app=db_url(case.app, tmp_path, "app", request),
        count=case.count,
        size=200,
        workers=case.workers,
        concurrency=case.concurrency,
        chunk_size=CHUNK,
        delete_source=case.delete_source,
        max_attempts=case.max_attempts,
        transport=case.transport,
    )
    server.reset_stats()  # count the run only, not the seeding
    monitor = DeleteOrderMonitor(job, server.endpoint)
    monitor.start()
    started = time.monotonic()
    try:
        code = run_job(job.cfg, console=quiet())
    finally:
        wall = time.monotonic() - started
        monitor.finish()
    stats = server.stats()  # before the checks below add requests of their own

    assert code == 0
    n = case.count
    ops: dict[str, int] = stats["ops"]
    injected: dict[str, int] = stats["injected"]
    injected_total = injected["slowdown"] + injected["reset"]
    copies, deletes = ops.get("CopyObject", 0), ops.get("DeleteObjects", 0)
    # The job's own requests: the monitor's listings (every attempt) are not the job's.
    job_requests = stats["requests"] - monitor.requests
    other = job_requests - copies - deletes
    rows = ledger_rows(job.cfg, upgrade=False)
    attempts = sum(r["attempts"] for r in rows.values())
    MEASURED.append(Measured(case.id, n, copies, deletes, other, injected, wall, attempts))

    # (a) one successful CopyObject per object. A faulted request is never executed by s3fast,
    # so successful copies = CopyObject requests - faults injected on CopyObject.
    on_copy = injected_on(case, "CopyObject", injected_total)
    if on_copy is not None:
        assert copies - on_copy == n, (ops, injected)
    else:  # faults on every operation: at least ``copies - injected_total`` succeeded
        assert copies >= n, ops
        assert copies - injected_total <= n, (ops, injected)
    assert len(rows) == n
    assert {r["state"] for r in rows.values()} == {"done"}
    assert all(r["dest_etag"] == r["etag"] for r in rows.values())
    # Faults were really injected where the case says, and were the only errors S3 answered.
    if case.faulted != frozenset():
        assert injected_total > 0, stats
    else:
        assert injected_total == 0, stats
    assert set(stats["errors"]) <= {"SlowDown"}, stats["errors"]
    assert stats["errors"].get("SlowDown", 0) == injected["slowdown"], stats
    # Server-side copies only, sources deleted in batches, never one request per key.
    for op in ("GetObject", "PutObject", "DeleteObject", "HeadObject"):
        assert ops.get(op, 0) == 0, ops
    on_delete = injected_on(case, "DeleteObjects", injected_total)
    batches = math.ceil(n / CHUNK) + 2 * case.workers  # partial chunks at the end, per worker
    assert deletes >= 1, ops
    assert deletes - (injected_total if on_delete is None else on_delete) <= batches, ops

    # (b) no source was deleted while its app row still held the old key: watched during the
    # run, and judged from S3 and the app DB at the end.
    assert monitor.polls >= 2, monitor.poll_errors
    assert monitor.violations == []
    assert monitor.deleted_seen == n  # the last poll saw every source gone
    assert invariant_violations(job) == []
    assert_converged(job)

    # (c) retries are bounded.
    assert job_requests <= case.max_requests_per_object * n + 50, (job_requests, ops, injected)


class LeaseOwners(threading.Thread):
    """Which supervisors' workers hold leases during a run. A lease owner id is
    ``host:pid:n`` with the worker's PID; its parent chain (worker → fork server → supervisor)
    names the supervisor it belongs to."""

    def __init__(self, cfg: Config, supervisors: set[int], interval: float = 0.1) -> None:
        super().__init__(daemon=True, name="lease-owners")
        self.cfg, self.supervisors, self.interval = cfg, supervisors, interval
        self.owners: dict[str, int | None] = {}
        self.stopped = threading.Event()

    @staticmethod
    def _parent(pid: int) -> int | None:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return None
        return next(int(x.split()[1]) for x in status.splitlines() if x.startswith("PPid:"))

    def _supervisor_of(self, pid: int | None) -> int | None:
        for _ in range(4):
            if pid is None or pid in self.supervisors:
                return pid
            pid = self._parent(pid)
        return None

    def run(self) -> None:
        engine = sa.create_engine(self.cfg.ledger)
        query = (
            sa.select(objects.c.lease_owner)
            .distinct()
            .where(objects.c.job == self.cfg.job, objects.c.lease_owner.is_not(None))
        )
        try:
            while not self.stopped.wait(self.interval):
                try:
                    with engine.connect() as conn:
                        found = list(conn.execute(query).scalars())
                except SQLAlchemyError:  # tables not created yet
                    continue
                for owner in found:
                    if owner not in self.owners:
                        self.owners[owner] = self._supervisor_of(int(owner.split(":")[-2]))
        finally:
            engine.dispose()

    def finish(self) -> set[int | None]:
        self.stopped.set()
        self.join(timeout=30)
        return set(self.owners.values())


@pytest.mark.s3fast
def test_two_supervisors_on_one_postgres_ledger_copy_each_object_once(
    tmp_path: Path, s3fast: Callable[..., S3Fast], pg_database: Callable[[str], str]
) -> None:
    server = s3fast()
    count, chunk, workers = 300, 20, 2
    job = make_job(
        tmp_path,
        s3_client(server.endpoint),
        server.endpoint,
        ledger=pg_database("ledger2"),
        app=pg_database("app2"),
        count=count,
        size=200,
        workers=workers,
        concurrency=4,
        chunk_size=chunk,
        delete_source="per_chunk",
    )
    server.reset_stats()
    monitor = DeleteOrderMonitor(job, server.endpoint)
    monitor.start()
    started = time.monotonic()
    cmd = [sys.executable, "-m", "migrator", "run", "--quiet", "--config", str(job.config_path)]
    procs = [
        subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    owners = LeaseOwners(job.cfg, {p.pid for p in procs})
    owners.start()
    outputs: list[tuple[int, str]] = []
    try:
        for p in procs:
            _out, err = p.communicate(timeout=120)
            outputs.append((p.returncode, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        wall = time.monotonic() - started
        monitor.finish()
        supervisors = owners.finish()
    stats = server.stats()

    assert [code for code, _ in outputs] == [0, 0], outputs
    # Both supervisors really worked the job at the same time: each one's workers held leases.
    assert supervisors == {p.pid for p in procs}, owners.owners
    ops: dict[str, int] = stats["ops"]
    copies, deletes = ops.get("CopyObject", 0), ops.get("DeleteObjects", 0)
    job_requests = stats["requests"] - monitor.requests
    MEASURED.append(
        Measured(
            "two supervisors, one Postgres ledger",
            count,
            copies,
            deletes,
            job_requests - copies - deletes,
            stats["injected"],
            wall,
        )
    )
    assert copies == count, ops  # the lease gives every row to one worker of one supervisor
    assert stats["errors"] == {}, stats["errors"]
    # Each chunk is deleted once by its one owner: one request per chunk, the last partial
    # chunks of each of the four workers at most extra; a key deleted by both supervisors
    # would double the chunks' requests.
    assert 1 <= deletes <= math.ceil(count / chunk) + 2 * workers, ops
    assert ops.get("DeleteObject", 0) == 0, ops
    assert monitor.polls >= 2 and monitor.violations == []
    assert invariant_violations(job) == []
    assert_converged(job)
    assert {r["state"] for r in ledger_rows(job.cfg, upgrade=False).values()} == {"done"}


class LedgerWatch(threading.Thread):
    """Records every (state, attempts, last_error) the ledger shows for some keys during a run."""

    def __init__(self, cfg: Config, keys: set[str], interval: float = 0.1) -> None:
        super().__init__(daemon=True, name="ledger-watch")
        self.cfg, self.keys, self.interval = cfg, keys, interval
        self.seen: set[tuple[str, str, int, str | None]] = set()
        self.polls = 0
        self.stopped = threading.Event()

    def run(self) -> None:
        file = make_url(self.cfg.ledger).database
        while not (file and Path(file).exists()) and not self.stopped.wait(self.interval):
            pass  # let the run create its ledger; connecting first would create the file
        engine = make_engine(self.cfg.ledger)
        try:
            while not self.stopped.wait(self.interval):
                try:
                    rows = [r for b in Ledger(engine, self.cfg.job).iter_rows() for r in b]
                except SQLAlchemyError:  # the run has not created the ledger tables yet
                    continue
                self.polls += 1
                self.seen.update(
                    (r["source_key"], r["state"], r["attempts"], r["last_error"])
                    for r in rows
                    if r["source_key"] in self.keys
                )
        finally:
            engine.dispose()

    def finish(self) -> None:
        self.stopped.set()
        self.join(timeout=30)


@pytest.mark.parametrize("policy", ["after_all", "per_chunk"])
def test_delete_objects_per_key_errors_are_not_done_and_a_rerun_finishes_them(
    tmp_path: Path, moto_s3: Any, moto_endpoint: str, policy: str
) -> None:
    max_attempts = 3
    job = sqlite_job(
        tmp_path,
        moto_s3,
        moto_endpoint,
        with_app=True,
        count=24,
        chunk_size=8,
        max_attempts=max_attempts,
        delete_source=policy,
    )
    src = job.cfg.source
    denied = {job.objects[i].key for i in (2, 9, 17)}
    deny_deletes(moto_s3, src.bucket, denied)
    # The server really answers a batch with per-key errors in a 200 response.
    probe = sorted(denied)[0]
    answer = moto_s3.delete_objects(
        Bucket=src.bucket, Delete={"Objects": [{"Key": probe}], "Quiet": True}
    )
    assert answer["ResponseMetadata"]["HTTPStatusCode"] == 200
    assert [(e["Key"], e["Code"]) for e in answer["Errors"]] == [(probe, "AccessDenied")]

    watch = LedgerWatch(job.cfg, denied)
    watch.start()
    try:
        code = run_job(job.cfg, console=quiet())
    finally:
        watch.finish()

    assert code == 1  # finished with failed rows
    rows = ledger_rows(job.cfg, upgrade=False)
    for key in denied:
        assert rows[key]["state"] == "failed"
        assert rows[key]["failed_stage"] == "delete"
        assert rows[key]["attempts"] == max_attempts
        assert "AccessDenied" in rows[key]["last_error"]
    assert {rows[o.key]["state"] for o in job.objects if o.key not in denied} == {"done"}
    # Between attempts the denied rows waited as rewritten with the per-key error; never done.
    states = {(k, s) for k, s, _, _ in watch.seen}
    assert all(s != "done" for _, s in states), states
    for key in denied:
        waiting = [
            a
            for k, s, a, e in watch.seen
            if k == key and s == "rewritten" and e is not None and "AccessDenied" in e
        ]
        assert waiting and min(waiting) >= 1 and max(waiting) < max_attempts, watch.seen
    # Only the denied sources remain; every object is at the destination and every app row
    # (the denied ones too) points at it.
    assert list_keys(moto_s3, src.bucket, src.prefix) == denied
    assert list_keys(moto_s3, job.cfg.destination.bucket) == {
        job.dest_key(o.key) for o in job.objects
    }
    assert app_paths(job)[: len(job.objects)] == [job.dest_key(o.key) for o in job.objects]
    assert invariant_violations(job) == []

    status = run_cli("status", "--json", "--config", str(job.config_path))
    assert status.returncode == 0, status.stderr
    doc = json.loads(status.stdout)
    assert doc["counts"]["failed"] == len(denied)
    assert doc["counts"]["done"] == len(job.objects) - len(denied)
    assert {e["key"] for e in doc["recent_errors"]} == denied
    for e in doc["recent_errors"]:
        assert e["state"] == "failed" and e["attempts"] == max_attempts
        assert "delete: AccessDenied: Access Denied" in e["error"], e

    moto_s3.delete_bucket_policy(Bucket=src.bucket)
    retried = run_cli("retry-failed", "--config", str(job.config_path))
    assert retried.returncode == 0, retried.stderr
    rerun = run_cli("run", "--quiet", "--config", str(job.config_path))
    assert rerun.returncode == 0, rerun.stderr
    assert_converged(job)
    assert {r["state"] for r in ledger_rows(job.cfg, upgrade=False).values()} == {"done"}


def test_botocore_retries_are_counted_in_status(
    tmp_path: Path, s3fast: Callable[..., S3Fast]
) -> None:
    server = s3fast("-fault-ops", "CopyObject", "-fail-rate", "0.1", "-seed", "21")
    job = make_job(
        tmp_path,
        s3_client(server.endpoint),
        server.endpoint,
        ledger=f"sqlite:///{tmp_path / 'ledger.db'}",
        app=None,
        count=60,
        size=64,
        chunk_size=20,
    )
    assert run_job(job.cfg, console=Console(stderr=True, quiet=True)) == 0
    injected = server.stats()["injected"]["slowdown"]
    assert injected > 0, "no fault was injected"
    doc = json.loads(run_cli("status", "--json", "--config", str(job.config_path)).stdout)
    # Every injected 503 was retried by botocore once, and each retry is counted.
    assert doc["s3_retries"] == injected
