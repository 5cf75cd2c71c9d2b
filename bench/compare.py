"""Side by side on s3fast: migrator against ``aws s3 sync`` and ``rclone copy`` (``make bench``).

    python -m bench.compare                         # everything: 2k, 20k, mixed, multi-host
    python -m bench.compare --quick                 # small sets, to try it out (a few minutes)
    python -m bench.compare --sets 20k --tools migrator-copy,rclone-tuned --repeat 3
    python -m bench.compare --sets '' --docs none     # the multi-host scenario only

One s3fast server (built by ``../shared/s3fast/build.sh``, on a free port) holds the source
``s3://src/image/`` and the destination ``s3://dst/avatar/``. For every data set and tool the
destination is emptied (and the sources seeded again if a full migrator job deleted them),
the server's counters are zeroed, the tool runs, and then:

* wall time, objects/s and MB/s (10^6 bytes);
* client CPU of the whole process tree and its peak memory (``bench.measure``);
* S3 requests per object and per operation, and the server's own CPU, from s3fast;
* a check that the destination holds every object with the right byte count (and, for the
  full job, that the sources are gone and the app rows point at the new keys); a run that
  fails the check or exits non-zero is marked failed.

The multi-host scenario runs one full job (Postgres ledger and app DB) on the 20k set with two
supervisors of ``workers: 2`` started together (stand-ins for two hosts), against one: on the
usual server, where the job is CPU-bound on this machine, and again on a second s3fast that
answers each CopyObject ``--multihost-latency`` later (100 ms unless told), where each
supervisor is bound by its requests in flight, as a host is on real S3.

Raw figures go to ``bench/results/bench-<date>-<time>.json``; the part of
``docs/benchmarks.md`` between ``<!-- bench:begin -->`` and ``<!-- bench:end -->`` is
regenerated, the rest of that file is left as written.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import io
import json
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import boto3
import sqlalchemy as sa
import yaml
from boto3.s3.transfer import TransferConfig
from botocore.config import Config as BotoConfig

from bench import report
from bench.common import (
    CLOCK_TICKS,
    PG_ADMIN_URL,
    REPO,
    RESULTS,
    S3Server,
    create_database,
    drop_database,
    s3fast_binary,
)
from bench.measure import Usage, run_measured
from migrator.config import load_config
from seed.__main__ import seed_app_db
from seed.data import SeedObject, seed_object

SRC, DST = "src", "dst"
SRC_PREFIX, DST_PREFIX = "image/", "avatar/"
SMALL = 2048
MiB = 2**20
PART = 5 * MiB  # multipart part size for the large objects (s3fast's minimum)

TOOLS = ("migrator-copy", "migrator-full", "aws", "aws-tuned", "rclone", "rclone-tuned")
# the non-destructive tools first: the full job deletes the sources, which are seeded again
RUN_ORDER = ("migrator-copy", "rclone-tuned", "rclone", "aws", "aws-tuned", "migrator-full")
NEEDS_POSTGRES = {"migrator-full"}


@dataclass(frozen=True)
class DataSet:
    name: str
    description: str
    small: int  # objects of 2 KiB
    seeder: str  # "seed": python -m seed (avatar keys); "loadgen": s3fast's load generator
    large: tuple[int, ...] = ()  # sizes of the objects uploaded as multipart

    @property
    def count(self) -> int:
        return self.small + len(self.large)

    @property
    def bytes(self) -> int:
        return self.small * SMALL + sum(self.large)

    def keys(self) -> list[str]:
        if self.seeder == "seed":
            small = [seed_object(i, SRC_PREFIX, SMALL).key for i in range(self.small)]
        else:
            small = [f"{SRC_PREFIX}{i:010d}" for i in range(self.small)]
        return small + [large_key(i) for i in range(len(self.large))]


def large_key(i: int) -> str:
    return f"{SRC_PREFIX}big/{i:03d}.bin"


def spread(n: int, low: int, high: int) -> tuple[int, ...]:
    """``n`` sizes from ``low`` to ``high`` bytes, evenly spaced, rounded to KiB."""
    step = (high - low) / max(n - 1, 1)
    return tuple(int(low + i * step) // 1024 * 1024 for i in range(n))


def data_sets(quick: bool) -> dict[str, DataSet]:
    if quick:
        return {
            "2k": DataSet("2k", "200 × 2 KiB avatars, `python -m seed` (quick)", 200, "seed"),
            "20k": DataSet("20k", "1,000 × 2 KiB, `s3fast loadgen` (quick)", 1000, "loadgen"),
            "mixed": DataSet(
                "mixed",
                "200 × 2 KiB + 2 multipart objects of 6–8 MiB (quick)",
                200,
                "loadgen",
                spread(2, 6 * MiB, 8 * MiB),
            ),
        }
    return {
        "2k": DataSet("2k", "2,000 × 2 KiB avatars, `python -m seed`", 2000, "seed"),
        "20k": DataSet("20k", "20,000 × 2 KiB, `s3fast loadgen -op put`", 20000, "loadgen"),
        "mixed": DataSet(
            "mixed",
            "2,000 × 2 KiB + 20 multipart objects of 8–20 MiB (ETags `-2` … `-4`)",
            2000,
            "loadgen",
            spread(20, 8 * MiB, 20 * MiB),
        ),
    }


@dataclass
class Run:
    """One tool on one data set, once."""

    tool: str
    dataset: str
    objects: int
    bytes: int
    ok: bool
    problems: list[str]
    wall_s: float
    plan_s: float | None
    run_s: float | None
    cpu_user_s: float
    cpu_system_s: float
    cpu_method: str
    rusage_children_cpu_s: float
    peak_pss_mib: float
    peak_rss_mib: float
    peak_processes: int
    requests: int
    ops: dict[str, int]
    s3_errors: dict[str, int]
    server_cpu_s: float
    commands: list[list[list[str]]]
    output_tail: list[str] = field(default_factory=list)
    postgres_cpu_s: float | None = None  # full jobs: the server backends of our databases
    pg_connections_peak: dict[str, int] = field(default_factory=dict)

    @property
    def cpu_s(self) -> float:
        return self.cpu_user_s + self.cpu_system_s

    def derived(self) -> dict[str, float]:
        return {
            "objects_per_s": self.objects / self.wall_s,
            "mb_per_s": self.bytes / 1e6 / self.wall_s,
            "cpu_s_per_1000": self.cpu_s / self.objects * 1000,
            "requests_per_object": self.requests / self.objects,
        }

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), **self.derived(), "cpu_s": self.cpu_s}


class Bench:
    """The server, the scratch directory, the tools' environment and the seeding state."""

    def __init__(self, args: argparse.Namespace, binary: str, work: Path) -> None:
        self.args = args
        self.binary = binary
        self.work = work
        self.server = S3Server(binary)
        self.s3 = s3_client(self.server.endpoint)
        self.seeded: str | None = None  # the data set whose sources are all in place
        self.serial = 0
        self.admin: sa.Engine | None = None
        self.app_created = False
        self.configs: dict[str, str] = {}  # the last migrator config of each kind, as YAML
        self.seed_commands: dict[str, list[str]] = {}
        self.db_names = {
            "ledger": f"bench_ledger_{os.getpid()}",
            "app": f"bench_app_{os.getpid()}",
        }
        self.env = tool_env(work)
        self.aws = shutil.which("aws")
        self.rclone = shutil.which("rclone")
        self.migrator = migrator_command()
        self._write_tool_configs()

    # -- set-up ------------------------------------------------------------------------------

    def _write_tool_configs(self) -> None:
        (self.work / "aws").mkdir()
        (self.work / "aws" / "credentials").write_text("")
        (self.work / "aws" / "config-default").write_text("")
        (self.work / "aws" / "config-tuned").write_text("")
        if self.aws and "aws-tuned" in self.args.tools:
            env = {**self.env, "AWS_CONFIG_FILE": str(self.work / "aws" / "config-tuned")}
            subprocess.run(
                [self.aws, "configure", "set", "default.s3.max_concurrent_requests", "64"],
                env=env,
                check=True,
            )
        (self.work / "rclone.conf").write_text(
            "[s3fast]\ntype = s3\nprovider = Other\n"
            f"endpoint = {self.server.endpoint}\naccess_key_id = x\nsecret_access_key = x\n"
        )

    def postgres(self) -> sa.Engine:
        if self.admin is None:
            admin = sa.create_engine(
                self.args.pg, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5}
            )
            with admin.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
            self.admin = admin
        return self.admin

    def fresh_database(self, kind: str) -> str:
        return create_database(self.postgres(), self.db_names[kind])

    def app_database(self) -> None:
        """Created once; the seeder drops and recreates the app table in it."""
        if not self.app_created:
            self.fresh_database("app")
            self.app_created = True

    @contextlib.contextmanager
    def other_server(self, *flags: str) -> Iterator[S3Server]:
        """Inside the block, a second s3fast started with ``flags`` (e.g. injected latency)
        stands in for the usual one: seeding, configs, checks and counters all follow
        ``self.server``. A separate process, so the other scenarios keep a server without
        faults; it is stopped, and the usual one restored, afterwards."""
        saved = self.server, self.s3, self.seeded
        server = S3Server(self.binary, *flags)
        try:
            self.server, self.s3, self.seeded = server, s3_client(server.endpoint), None
            yield server
        finally:
            self.server, self.s3, self.seeded = saved
            server.stop()

    def close(self) -> None:
        self.server.stop()
        if self.admin is not None:
            for name in self.db_names.values():
                drop_database(self.admin, name)
            self.admin.dispose()

    # -- configs -----------------------------------------------------------------------------

    def migrator_config(
        self, *, full: bool, workers: int | None = None, kind: str | None = None
    ) -> Path:
        """A fresh run directory with a config for the current server. ``kind`` names the
        config in the results (the last one of each kind is kept); the seeder's configs get
        none, so they never stand in for a measured run's."""
        self.serial += 1
        run_dir = self.work / f"run-{self.serial}"
        run_dir.mkdir()
        data: dict[str, Any] = {
            "job": "bench",
            "ledger": f"sqlite:///{run_dir / 'ledger.db'}",
            "source": {
                "bucket": SRC,
                "prefix": SRC_PREFIX,
                "endpoint_url": self.server.endpoint,
                "region": "us-east-1",
            },
            "destination": {
                "bucket": DST,
                "prefix": DST_PREFIX,
                "endpoint_url": self.server.endpoint,
                "region": "us-east-1",
            },
            "workers": workers or self.args.workers,
            "concurrency": self.args.concurrency,
            "chunk_size": self.args.chunk_size,
            "delete_source": "never",
        }
        if full:
            self.app_database()
            data["ledger"] = pg_url(self.args.pg, self.db_names["ledger"])
            data["app_db"] = {
                "url": pg_url(self.args.pg, self.db_names["app"]),
                "table": "avatars",
                "column": "path",
            }
            data["delete_source"] = "after_all"
        path = run_dir / "config.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        if kind:
            self.configs[kind] = path.read_text()
        return path

    # -- data --------------------------------------------------------------------------------

    def seed(self, ds: DataSet, app: bool) -> None:
        """Everything dropped, then the sources (and the app table) of ``ds`` created."""
        self.server.reset_all()
        self.seeded = None
        config = self.migrator_config(full=app)
        if ds.seeder == "seed":
            cmd = [sys.executable, "-m", "seed", "--config", str(config), "--objects"]
            cmd += [str(ds.small), "--size", str(SMALL), "--replace"]
            subprocess.run(cmd, cwd=self.work, env=self.env, check=True, capture_output=True)
            self.seed_commands[f"{ds.name}, app table included" if app else ds.name] = cmd
        else:
            self.s3.create_bucket(Bucket=DST)
            cmd = [self.binary, "loadgen", "-endpoint", self.server.address, "-op", "put"]
            cmd += ["-bucket", SRC, "-prefix", SRC_PREFIX, "-n", str(ds.small), "-c", "8"]
            cmd += ["-size", str(SMALL)]
            subprocess.run(cmd, check=True, capture_output=True)
            self.seed_commands[ds.name] = cmd
            if app:
                self.seed_app(ds, config)
        self.upload_large(ds)
        self.seeded = ds.name

    def upload_large(self, ds: DataSet) -> None:
        transfer = TransferConfig(multipart_threshold=PART, multipart_chunksize=PART)
        for i, size in enumerate(ds.large):
            body = random.Random(i).randbytes(size)
            self.s3.upload_fileobj(io.BytesIO(body), SRC, large_key(i), Config=transfer)

    def seed_app(self, ds: DataSet, config: Path) -> None:
        """The app table, by the seeder's own code: one row per object plus rows to leave."""
        cfg = load_config(config, env={})
        objects = [SeedObject(i, k, "", b"", 100_000 + i) for i, k in enumerate(ds.keys())]
        seed_app_db(cfg, objects, replace=True)

    def prepare(self, ds: DataSet, app: bool) -> None:
        """Sources of ``ds`` in place, destination empty, app table fresh, counters zero."""
        if self.seeded != ds.name or self.count(SRC, SRC_PREFIX)[0] != ds.count:
            self.seed(ds, app)
        else:
            self.empty(DST)
            if app:
                self.seed_app(ds, self.migrator_config(full=True))
        if app:
            self.fresh_database("ledger")
        self.server.reset_stats()

    def empty(self, bucket: str) -> None:
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            objects = [{"Key": o["Key"]} for o in page.get("Contents", ())]
            if objects:
                self.s3.delete_objects(Bucket=bucket, Delete={"Objects": objects, "Quiet": True})

    def count(self, bucket: str, prefix: str) -> tuple[int, int]:
        n = size = 0
        paginator = self.s3.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            for o in page.get("Contents", ()):
                n, size = n + 1, size + int(o["Size"])
        return n, size

    def app_counts(self) -> tuple[int, int]:
        """App rows pointing at (destination, source) keys."""
        engine = sa.create_engine(pg_url(self.args.pg, self.db_names["app"]))
        try:
            with engine.connect() as conn:
                row = conn.execute(
                    sa.text(
                        "SELECT count(*) FILTER (WHERE path LIKE :d), "
                        "count(*) FILTER (WHERE path LIKE :s) FROM avatars"
                    ),
                    {"d": f"{DST_PREFIX}%", "s": f"{SRC_PREFIX}%"},
                ).one()
        finally:
            engine.dispose()
        return int(row[0]), int(row[1])

    def check(self, ds: DataSet, full: bool) -> list[str]:
        """What is wrong with the destination (and sources and app rows, for a full job)."""
        problems = []
        n, size = self.count(DST, DST_PREFIX)
        if (n, size) != (ds.count, ds.bytes):
            problems.append(f"destination holds {n} objects / {size} bytes, want {ds.count}")
            problems[-1] += f" / {ds.bytes}"
        if full:
            self.seeded = None
            left = self.count(SRC, SRC_PREFIX)[0]
            if left:
                problems.append(f"{left} sources not deleted")
            moved, old = self.app_counts()
            if (moved, old) != (ds.count, 0):
                problems.append(f"app rows: {moved} point at the destination, {old} at sources")
        return problems

    # -- tools -------------------------------------------------------------------------------

    def steps(self, tool: str) -> tuple[list[list[list[str]]], dict[str, str]]:
        """The commands of one tool (steps run one after the other) and their environment."""
        env = dict(self.env)
        if tool.startswith("migrator"):
            # One command, as an operator runs it: `run` plans a job that was never planned.
            full = tool == "migrator-full"
            config = str(self.migrator_config(full=full, kind="full job" if full else "copy-only"))
            return [[[*self.migrator, "run", "--quiet", "--config", config]]], env
        if tool.startswith("aws"):
            if not self.aws:
                raise ToolMissing("aws not found on PATH")
            which = "config-tuned" if tool == "aws-tuned" else "config-default"
            env["AWS_CONFIG_FILE"] = str(self.work / "aws" / which)
            cmd = [self.aws, "--endpoint-url", self.server.endpoint, "s3", "sync"]
            cmd += [f"s3://{SRC}/{SRC_PREFIX}", f"s3://{DST}/{DST_PREFIX}", "--only-show-errors"]
            return [[cmd]], env
        if not self.rclone:
            raise ToolMissing("rclone not found on PATH")
        cmd = [self.rclone, "--config", str(self.work / "rclone.conf"), "copy"]
        cmd += [f"s3fast:{SRC}/{SRC_PREFIX.rstrip('/')}", f"s3fast:{DST}/{DST_PREFIX.rstrip('/')}"]
        if tool == "rclone-tuned":
            cmd += ["--transfers", "32", "--checkers", "32"]
        return [[cmd]], env

    def measure(self, ds: DataSet, tool: str) -> Run:
        full = tool in NEEDS_POSTGRES
        self.prepare(ds, app=full)
        steps, env = self.steps(tool)
        cpu0 = self.server.cpu_seconds()
        with contextlib.ExitStack() as stack:
            watch = None
            if full:
                databases = list(self.db_names.values())
                watch = stack.enter_context(PgWatch(self.postgres(), databases))
            usage = run_measured(steps, env=env, cwd=self.work)
        server_cpu = self.server.cpu_seconds() - cpu0
        stats = self.server.stats()
        problems = [] if usage.ok else [failed_step(usage)]
        problems += self.check(ds, full)
        run = make_run(tool, ds, usage, stats, server_cpu, problems)
        if watch is not None:
            run.postgres_cpu_s = watch.cpu_seconds()
            run.pg_connections_peak = self.connection_peaks(watch)
        return run

    def connection_peaks(self, watch: PgWatch) -> dict[str, int]:
        return {kind: watch.peak.get(name, 0) for kind, name in self.db_names.items()}


class ToolMissing(Exception):
    pass


def make_run(
    tool: str,
    ds: DataSet,
    usage: Usage,
    stats: dict[str, Any],
    server_cpu: float,
    problems: list[str],
) -> Run:
    migrator = tool.startswith("migrator") or tool.startswith("multihost")
    steps = [s.wall_s for s in usage.steps]
    return Run(
        tool=tool,
        dataset=ds.name,
        objects=ds.count,
        bytes=ds.bytes,
        ok=not problems,
        problems=problems,
        wall_s=usage.wall_s,
        plan_s=steps[0] if migrator and len(steps) > 1 else None,
        run_s=steps[-1] if migrator and len(steps) > 1 else None,
        cpu_user_s=usage.cpu_user_s,
        cpu_system_s=usage.cpu_system_s,
        cpu_method=usage.cpu_method,
        rusage_children_cpu_s=usage.rusage_children_cpu_s,
        peak_pss_mib=usage.peak_pss_mib,
        peak_rss_mib=usage.peak_rss_mib,
        peak_processes=usage.peak_processes,
        requests=int(stats.get("requests", 0)),
        ops=dict(stats.get("ops", {})),
        s3_errors=dict(stats.get("errors", {})),
        server_cpu_s=server_cpu,
        commands=[s.commands for s in usage.steps],
        output_tail=[] if usage.ok else [t for s in usage.steps for t in s.output_tail],
    )


def failed_step(usage: Usage) -> str:
    for s in usage.steps:
        if any(s.exit_codes):
            name = Path(s.commands[0][0]).name
            tail = " | ".join(line for t in s.output_tail for line in t.splitlines()[-2:])
            return f"{name} exited {s.exit_codes}: {tail[-300:]}"
    return "failed"


def s3_client(endpoint: str) -> Any:
    """The harness's own boto3 client (seeding, emptying, listing), not any tool's."""
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="x",
        aws_secret_access_key="x",
        config=BotoConfig(
            s3={"addressing_style": "path"},
            max_pool_connections=16,
            request_checksum_calculation="when_required",
        ),
    )


def tool_env(work: Path) -> dict[str, str]:
    """The environment of every tool: no AWS_CA_BUNDLE (a path that may not exist), no
    profile or config from ~/.aws, dummy credentials; a private AWS config file per tool."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AWS_", "MIGRATOR_", "RCLONE_", "BOTO_"))
    }
    env.update(
        AWS_ACCESS_KEY_ID="x",
        AWS_SECRET_ACCESS_KEY="x",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_CONFIG_FILE=str(work / "aws" / "config-default"),
        AWS_SHARED_CREDENTIALS_FILE=str(work / "aws" / "credentials"),
    )
    return env


def migrator_command() -> list[str]:
    script = Path(sys.executable).parent / "migrator"
    return [str(script)] if script.exists() else [sys.executable, "-m", "migrator"]


def pg_url(admin_url: str, database: str) -> str:
    return sa.engine.make_url(admin_url).set(database=database).render_as_string(False)


def median_run(runs: list[Run]) -> dict[str, Any]:
    """The median of every figure over the repeats (each figure on its own)."""
    rows = [r.as_dict() for r in runs]
    out = dict(rows[0])
    for key, value in rows[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            values = [row[key] for row in rows if row[key] is not None]
            out[key] = statistics.median(values) if values else None
    out["ok"] = all(r.ok for r in runs)
    out["problems"] = [p for r in runs for p in r.problems]
    out["repeats"] = len(runs)
    out["wall_s_all"] = [r.wall_s for r in runs]
    return out


# -- multi-host ------------------------------------------------------------------------------


MULTIHOST_WORKERS = 2  # per supervisor: one worker per core of the 2-core bench machine


def multihost(bench: Bench, objects: int, copy_latency_ms: float | None = None) -> dict[str, Any]:
    """One full job on one Postgres ledger: two supervisors of ``workers: 2`` started at once
    (two hosts) against one. Plan once, then the ``migrator run``s together. Besides the
    usual figures: the peak number of Postgres connections per database, the ledger's size
    after plan and after the run, and the WAL the server wrote meanwhile (server-wide).

    With ``copy_latency_ms`` the job runs on a second s3fast that answers every CopyObject
    that much later (``-latency … -fault-ops CopyObject``; other requests at once), as real
    S3 does in tens of ms. A supervisor is then bound by its copies in flight
    (``workers × concurrency``), not by this machine's cores, which is the case in which a
    second host is meant to pay off; without latency the job is CPU-bound on the 2 cores
    that client, s3fast and Postgres share, and the scenario shows a second supervisor's
    overhead instead."""
    out: dict[str, Any] = {
        "objects": objects,
        "workers_per_supervisor": MULTIHOST_WORKERS,
        "concurrency": bench.args.concurrency,
        "chunk_size": bench.args.chunk_size,
        "copy_latency_ms": copy_latency_ms,
        "runs": [],
    }
    flags, suffix = [], ""
    if copy_latency_ms:
        flags = ["-latency", f"{copy_latency_ms:g}ms", "-fault-ops", "CopyObject"]
        suffix = f", {copy_latency_ms:g} ms per CopyObject"
    server: contextlib.AbstractContextManager[S3Server] = (
        bench.other_server(*flags) if flags else contextlib.nullcontext(bench.server)
    )
    ds = DataSet(f"multihost{suffix}", f"{objects:,} × 2 KiB", objects, "loadgen")
    with server as used:
        out["runs"] = [multihost_run(bench, ds, n, f"multi-host{suffix}") for n in (1, 2)]
    if flags:
        out.update(s3fast_flags=flags, endpoint=used.endpoint)
    return out


def multihost_run(bench: Bench, ds: DataSet, supervisors: int, kind: str) -> dict[str, Any]:
    """Seed, plan once, then ``supervisors`` ``migrator run``s at the same moment; the row
    with the usual figures and the evidence of one copy and one delete per object."""
    bench.seed(ds, app=True)
    bench.fresh_database("ledger")
    config = str(bench.migrator_config(full=True, workers=MULTIHOST_WORKERS, kind=kind))
    wal0 = wal_lsn(bench)
    plan = run_measured(
        [[[*bench.migrator, "plan", "--config", config]]], env=bench.env, cwd=bench.work
    )
    wal1 = wal_lsn(bench)
    planned = ledger_size(bench) if plan.ok else {}
    bench.server.reset_stats()
    cpu0 = bench.server.cpu_seconds()
    run = [*bench.migrator, "run", "--quiet", "--config", config]
    with PgWatch(bench.postgres(), list(bench.db_names.values())) as watch:
        usage = run_measured([[run] * supervisors], env=bench.env, cwd=bench.work)
    server_cpu = bench.server.cpu_seconds() - cpu0
    stats = bench.server.stats()
    wal2 = wal_lsn(bench)
    problems = [] if usage.ok and plan.ok else [failed_step(usage if not usage.ok else plan)]
    problems += bench.check(ds, full=True)
    result = make_run(f"multihost-{supervisors}", ds, usage, stats, server_cpu, problems)
    row = result.as_dict()
    row["supervisors"] = supervisors
    row["plan_s"] = plan.wall_s
    row["run_s"] = usage.wall_s
    row["exit_codes"] = [code for step in usage.steps for code in step.exit_codes]
    row.update(delete_audit(bench, stats, ds.count, problems))
    if row["copy_objects"] != ds.count:
        problems.append(f"{row['copy_objects']} CopyObject requests for {ds.count} objects")
    row["pg_connections_peak"] = bench.connection_peaks(watch)
    row["postgres_cpu_s"] = watch.cpu_seconds()
    row["ledger_after_plan"] = planned
    row["ledger_after_run"] = ledger_size(bench)
    row["wal_bytes_plan"] = wal1 - wal0
    row["wal_bytes_run"] = wal2 - wal1
    row["problems"] = problems
    row["ok"] = not problems
    print(progress_line(row), file=sys.stderr, flush=True)
    return row


def multihost_variant(bench: Bench, objects: int, copy_latency_ms: float | None) -> dict[str, Any]:
    """``multihost``, or why it was skipped (no PostgreSQL server)."""
    try:
        return multihost(bench, objects, copy_latency_ms)
    except sa.exc.OperationalError as exc:
        return {"skipped": str(exc).splitlines()[0], "copy_latency_ms": copy_latency_ms}


class PgWatch(threading.Thread):
    """While a full job runs: the peak number of connections to each of our databases, and
    the CPU their server backends used (``/proc/<pid>/stat`` of the backend pids that
    ``pg_stat_activity`` lists, polled every 0.2 s; only when Postgres runs on this machine).
    Postgres' own background processes (WAL writer, checkpointer, autovacuum) are not in it."""

    def __init__(self, admin: sa.Engine, databases: list[str]) -> None:
        super().__init__(daemon=True, name="bench-pg-watch")
        self.admin, self.databases = admin, databases
        self.peak: dict[str, int] = {}
        self.backend_cpu: dict[int, float] = {}
        self.local = True
        self.done = threading.Event()

    def __enter__(self) -> PgWatch:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.done.set()
        self.join()

    def run(self) -> None:
        query = sa.text(
            "SELECT datname, pid FROM pg_stat_activity "
            "WHERE datname = ANY(:names) AND pid <> pg_backend_pid()"
        )
        with self.admin.connect() as conn:
            while True:
                counts: dict[str, int] = {}
                for name, pid in conn.execute(query, {"names": self.databases}).all():
                    counts[name] = counts.get(name, 0) + 1
                    cpu = process_cpu(int(pid))
                    if cpu is None:
                        self.local = False
                    else:
                        self.backend_cpu[pid] = max(cpu, self.backend_cpu.get(pid, 0.0))
                for name, n in counts.items():
                    self.peak[name] = max(self.peak.get(name, 0), n)
                if self.done.wait(0.2):
                    break

    def cpu_seconds(self) -> float | None:
        return sum(self.backend_cpu.values()) if self.local else None


def process_cpu(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def wal_lsn(bench: Bench) -> int:
    """The server's current WAL position in bytes (all databases: other users count too)."""
    with bench.postgres().connect() as conn:
        return int(conn.execute(sa.text("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn")).scalar())


def ledger_size(bench: Bench) -> dict[str, Any]:
    """Heap and index bytes of ``migrator_objects``, live and dead rows."""
    engine = sa.create_engine(pg_url(bench.args.pg, bench.db_names["ledger"]))
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("ANALYZE migrator_objects"))
            heap, toast = conn.execute(
                sa.text(
                    "SELECT pg_relation_size('migrator_objects'), "
                    "pg_table_size('migrator_objects') - pg_relation_size('migrator_objects')"
                )
            ).one()
            indexes = dict(
                conn.execute(
                    sa.text(
                        "SELECT indexrelname, pg_relation_size(indexrelid) "
                        "FROM pg_stat_user_indexes WHERE relname = 'migrator_objects'"
                    )
                ).all()
            )
            live, dead = conn.execute(
                sa.text(
                    "SELECT n_live_tup, n_dead_tup FROM pg_stat_user_tables "
                    "WHERE relname = 'migrator_objects'"
                )
            ).one()
            avg_row = conn.execute(
                sa.text("SELECT avg(pg_column_size(o.*)) FROM migrator_objects o")
            ).scalar()
    finally:
        engine.dispose()
    return {
        "heap_bytes": int(heap),
        "toast_and_maps_bytes": int(toast),
        "index_bytes": {k: int(v) for k, v in indexes.items()},
        "live_rows": int(live),
        "dead_rows": int(dead),
        "avg_row_bytes": float(avg_row or 0),
    }


def delete_audit(
    bench: Bench, stats: dict[str, Any], objects: int, problems: list[str]
) -> dict[str, Any]:
    """Evidence that no key was deleted twice, without per-key server counters.

    s3fast counts DeleteObjects requests, not keys. A worker deletes only the rows of the
    chunk it holds (``stages.delete_stage``), so one request carries at most
    ``min(chunk_size, 1000)`` keys: the keys sent are at most ``requests × that``. The sources
    all went (checked by listing), so at least ``objects`` distinct keys were sent; the keys
    sent twice are therefore at most ``requests × per_request − objects``. At 0 no key can have
    been deleted twice. The ledger's own view is added: every row ``done``, and how many rows
    needed more than one attempt (a retried delete can resend keys).
    """
    ops = stats.get("ops", {})
    requests = int(ops.get("DeleteObjects", 0)) + int(ops.get("DeleteObject", 0))
    per_request = min(bench.args.chunk_size, 1000)
    engine = sa.create_engine(pg_url(bench.args.pg, bench.db_names["ledger"]))
    try:
        with engine.connect() as conn:
            states = dict(
                conn.execute(
                    sa.text("SELECT state, count(*) FROM migrator_objects GROUP BY state")
                ).all()
            )
            retried, attempts = conn.execute(
                sa.text(
                    "SELECT count(*) FILTER (WHERE attempts > 0), coalesce(sum(attempts), 0) "
                    "FROM migrator_objects"
                )
            ).one()
    finally:
        engine.dispose()
    if states != {"done": objects}:
        problems.append(f"ledger states {states}, want all {objects} done")
    bound = max(0, requests * per_request - objects)
    return {
        "copy_objects": int(ops.get("CopyObject", 0)),
        "delete_requests": requests,
        "keys_per_delete_request_max": per_request,
        "double_deletes_at_most": bound,
        "ledger_states": {k: int(v) for k, v in states.items()},
        "ledger_rows_retried": int(retried),
        "ledger_attempts": int(attempts),
    }


# -- machine and versions --------------------------------------------------------------------


def command_output(
    cmd: list[str], env: dict[str, str] | None = None, cwd: Path | None = None
) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env, cwd=cwd)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc})"
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0] if text else ""


def machine() -> dict[str, Any]:
    meminfo = Path("/proc/meminfo").read_text().split()
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "cores": os.cpu_count(),
        "cpu": model,
        "ram_gib": round(int(meminfo[meminfo.index("MemTotal:") + 1]) / 2**20, 1),
        "kernel": platform.release(),
        "os": platform.platform(),
        "load_average_at_start": os.getloadavg(),
    }


def versions(bench: Bench, tools: list[str], postgres: bool) -> dict[str, str]:
    """Versions of what ran (a tool that did not run is not asked: each costs a start-up)."""
    import botocore

    env = bench.env
    found = {
        "python": platform.python_version(),
        "migrator": importlib.metadata.version("migrator"),
        "boto3": boto3.__version__,
        "botocore": botocore.__version__,
        "s3fast": bench.binary,
        "git": command_output(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]),
    }
    if any(t.startswith("aws") for t in tools):
        found["aws"] = (
            command_output([bench.aws, "--version"], env) if bench.aws else "not installed"
        )
    if any(t.startswith("rclone") for t in tools):
        found["rclone"] = command_output([bench.rclone, "version"]) if bench.rclone else "–"
    package = command_output(
        [sys.executable, "-c", "import migrator; print(migrator.__file__)"], env, bench.work
    )
    found["migrator_package"] = str(Path(package).parent)
    if Path(package).is_relative_to(REPO):
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "migrator"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        found["git"] += ", migrator/ with uncommitted changes" if dirty else ""
    else:
        found["git"] += f", but migrator imported from {found['migrator_package']}"
    if postgres:
        try:
            with bench.postgres().connect() as conn:
                found["postgres"] = str(conn.execute(sa.text("SHOW server_version")).scalar())
        except sa.exc.SQLAlchemyError:
            found["postgres"] = "unreachable"
    return found


# -- main ------------------------------------------------------------------------------------


def progress_line(row: dict[str, Any]) -> str:
    state = "ok" if row["ok"] else "FAILED " + "; ".join(row["problems"])[:300]
    return (
        f"{row['dataset']:>9} {row['tool']:<14} {row['wall_s']:7.2f} s "
        f"{row['objects_per_s']:8.0f} obj/s  cpu {row['cpu_s_per_1000']:5.2f} s/1000  "
        f"{row['requests_per_object']:.3f} req/obj  {state}"
    )


def latency_ms(text: str) -> float | None:
    """``--multihost-latency`` in milliseconds; ``None`` (skip the variant) for 0 or none."""
    if text.strip().lower() in ("", "none", "off"):
        return None
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s)?\s*", text.lower())
    if match is None:
        raise ValueError(f"--multihost-latency: want e.g. 100ms, 0.2s or none, not {text!r}")
    value = float(match[1]) * (1000 if match[2] == "s" else 1)
    return value or None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--sets", default="2k,20k,mixed", help="data sets (2k,20k,mixed)")
    parser.add_argument("--tools", default=",".join(TOOLS), help=f"tools ({','.join(TOOLS)})")
    parser.add_argument("--repeat", type=int, default=1, help="runs per tool; the median counts")
    parser.add_argument("--quick", action="store_true", help="small sets, to try it out")
    parser.add_argument(
        "--multihost",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the two-supervisor scenario (on the 20k set; both variants)",
    )
    parser.add_argument(
        "--multihost-latency",
        default="100ms",
        metavar="D",
        help="also run the two-supervisor scenario on an s3fast that answers each CopyObject\n"
        "this much later (e.g. 100ms, 0.2s; a bare number is ms); 0 or none: skip it",
    )
    # migrator's own defaults
    parser.add_argument("--workers", type=int, default=4, help="migrator workers (processes)")
    parser.add_argument("--concurrency", type=int, default=32, help="migrator requests/process")
    parser.add_argument("--chunk-size", type=int, default=1000, help="migrator chunk_size")
    parser.add_argument("--pg", default=PG_ADMIN_URL, help="PostgreSQL admin URL")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument(
        "--docs",
        default=str(REPO / "docs" / "benchmarks.md"),
        help="markdown file to regenerate between the bench markers; 'none' to skip",
    )
    parser.add_argument("--s3fast-bin", help="s3fast binary (default: build.sh's)")
    args = parser.parse_args(argv)
    args.sets = [s for s in args.sets.split(",") if s]
    args.tools = [t for t in args.tools.split(",") if t]
    try:
        args.multihost_latency_ms = latency_ms(args.multihost_latency)
    except ValueError as exc:
        parser.error(str(exc))
    for name in args.sets:
        if name not in ("2k", "20k", "mixed"):
            parser.error(f"unknown data set {name!r}")
    for name in args.tools:
        if name not in TOOLS:
            parser.error(f"unknown tool {name!r}; choose from {', '.join(TOOLS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = datetime.now().astimezone()
    binary = args.s3fast_bin or s3fast_binary()
    sets = data_sets(args.quick)
    results: dict[str, Any] = {
        "started": started.isoformat(timespec="seconds"),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": machine(),
        "settings": {
            "migrator": {
                "workers": args.workers,
                "concurrency": args.concurrency,
                "chunk_size": args.chunk_size,
            },
            "object_size": SMALL,
            "multipart_part_size": PART,
        },
        "sets": {},
    }
    failed = False
    with tempfile.TemporaryDirectory(prefix="migrator-bench-") as tmp:
        bench = Bench(args, binary, Path(tmp))
        try:
            postgres = args.multihost or any(t in NEEDS_POSTGRES for t in args.tools)
            results["versions"] = versions(bench, args.tools, postgres)
            results["endpoint"] = bench.server.endpoint
            results["workdir"] = tmp
            for name in args.sets:
                ds = sets[name]
                entry: dict[str, Any] = {
                    "description": ds.description,
                    "objects": ds.count,
                    "bytes": ds.bytes,
                    "tools": {},
                }
                results["sets"][name] = entry
                for tool in [t for t in RUN_ORDER if t in args.tools]:
                    try:
                        runs = [bench.measure(ds, tool) for _ in range(args.repeat)]
                    except (ToolMissing, sa.exc.OperationalError) as exc:
                        entry["tools"][tool] = {"skipped": str(exc).splitlines()[0]}
                        print(f"{name:>9} {tool:<14} skipped: {exc}", file=sys.stderr)
                        continue
                    except subprocess.CalledProcessError as exc:  # seeding failed
                        tail = (exc.stderr or b"").decode(errors="replace").strip()[-300:]
                        entry["tools"][tool] = {"skipped": f"seeding failed: {tail}"}
                        failed = True
                        print(f"{name:>9} {tool:<14} seeding failed: {tail}", file=sys.stderr)
                        continue
                    row = median_run(runs)
                    row["runs"] = [r.as_dict() for r in runs]
                    entry["tools"][tool] = row
                    failed |= not row["ok"]
                    print(progress_line(row), file=sys.stderr, flush=True)
            if args.multihost:
                latencies = (
                    [None, args.multihost_latency_ms] if args.multihost_latency_ms else [None]
                )
                for latency in latencies:
                    key = "multihost" if latency is None else "multihost_latency"
                    results[key] = multihost_variant(bench, sets["20k"].count, latency)
                    failed |= not all(r["ok"] for r in results[key].get("runs", []))
        finally:
            results["migrator_configs"] = bench.configs
            results["seed_commands"] = bench.seed_commands
            bench.close()
    results["finished"] = datetime.now().astimezone().isoformat(timespec="seconds")
    results["targets"] = report.targets(results)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    out = args.results_dir / f"bench-{started.strftime('%Y-%m-%d-%H%M%S')}.json"
    out.write_text(json.dumps(results, indent=1, default=str) + "\n")
    print(f"raw figures: {out}", file=sys.stderr)
    if args.docs != "none":
        report.update_doc(Path(args.docs), report.render(results, out))
        print(f"regenerated: {args.docs}", file=sys.stderr)
    print(report.render_tables(results))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
