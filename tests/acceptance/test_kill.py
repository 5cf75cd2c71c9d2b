"""Acceptance: the CLI killed with SIGKILL (whole process group) at random moments, re-run,
converges; after every kill, S3 and the app DB show nothing lost and no early delete (I1)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import AwsLikeMoto
from tests.helpers import (
    assert_converged,
    invariant_violations,
    list_keys,
    make_job,
    start_run,
)

MIN_KILLS = 3
MAX_ROUNDS = 10


def wait_for_progress(proc: subprocess.Popen[bytes], s3: Any, bucket: str, before: int) -> None:
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        if len(list_keys(s3, bucket)) > before:
            return
        time.sleep(0.1)


@pytest.mark.parametrize(
    ("db", "policy", "seed"),
    [("sqlite", "per_chunk", 1), ("sqlite", "after_all", 2), ("postgres", "per_chunk", 3)],
)
def test_sigkill_at_random_moments_loses_nothing(
    tmp_path: Path,
    moto_s3: Any,
    moto_endpoint: str,
    aws_like_moto: AwsLikeMoto,
    request: pytest.FixtureRequest,
    db: str,
    policy: str,
    seed: int,
) -> None:
    if db == "sqlite":
        ledger, app = f"sqlite:///{tmp_path / 'ledger.db'}", f"sqlite:///{tmp_path / 'app.db'}"
    else:
        make = request.getfixturevalue("pg_database")
        ledger, app = make("kledger"), make("kapp")
    job = make_job(
        tmp_path,
        moto_s3,
        moto_endpoint,
        ledger=ledger,
        app=app,
        count=600,
        size=512,
        delete_source=policy,
        chunk_size=8,
        workers=2,
        concurrency=1,
    )
    # Every copy takes at least 10 ms (S3 carries it out even when the client is gone): a run
    # copies for several seconds whatever the machine's load, so several kills land before
    # the job is done.
    aws_like_moto.copy_delay = 0.01
    rng = random.Random(seed)
    kills = 0
    remaining_after_kill: list[int] = []
    for round_ in range(MAX_ROUNDS):
        before = len(list_keys(moto_s3, job.cfg.destination.bucket))
        proc = start_run(job.config_path)
        if round_ % 2 == 0:
            time.sleep(rng.uniform(0.2, 3.0))  # anywhere: start-up, plan, first chunks
        else:  # once work is under way: mid-copy, mid-rewrite, mid-delete
            wait_for_progress(proc, moto_s3, job.cfg.destination.bucket, before)
            time.sleep(rng.uniform(0.0, 1.5))
        if proc.poll() is not None:
            break  # finished before we could kill it
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        kills += 1
        problems = invariant_violations(job)
        assert problems == [], f"after kill {kills}: {problems[:5]}"
        remaining_after_kill.append(len(list_keys(moto_s3, job.cfg.source.bucket)))
        print(f"kill {kills}: {remaining_after_kill[-1]} sources left")
        if kills >= MIN_KILLS and rng.random() < 0.3:
            break
    assert kills >= MIN_KILLS, f"only {kills} kills landed; the job finished too fast"
    if policy == "per_chunk":
        # At least one kill hit the job midway: some sources deleted, others not yet.
        assert any(0 < n < len(job.objects) for n in remaining_after_kill), remaining_after_kill
    final = start_run(job.config_path)
    _, err = final.communicate(timeout=300)
    assert final.returncode == 0, err.decode()[-2000:]
    assert invariant_violations(job) == []
    assert_converged(job)


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def test_one_worker_killed_while_the_supervisor_lives(
    tmp_path: Path, moto_s3: Any, moto_endpoint: str
) -> None:
    job = make_job(
        tmp_path,
        moto_s3,
        moto_endpoint,
        ledger=f"sqlite:///{tmp_path / 'ledger.db'}",
        app=f"sqlite:///{tmp_path / 'app.db'}",
        count=400,
        size=256,
        delete_source="per_chunk",
        chunk_size=8,
        concurrency=2,
        lease_seconds=300,  # recovery must not wait for expiry: the supervisor frees the rows
    )
    proc = start_run(job.config_path)
    wait_for_progress(proc, moto_s3, job.cfg.destination.bucket, 0)
    # Workers are forked by the fork server, the supervisor's child.
    workers = [w for c in children(proc.pid) for w in children(c)]
    assert workers, "no worker processes found"
    os.kill(workers[0], signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert "starting another" in err.decode()
    assert invariant_violations(job) == []
    assert_converged(job)
