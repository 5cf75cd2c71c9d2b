"""Acceptance: ``migrator relocate`` killed with SIGKILL (its whole process group) in each
phase, while S3 is still carrying out the request the phase sent, then run again: nothing is
lost after the kill, and the same command converges to the bucket in the new region with its
objects and configuration, and no temporary bucket."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO
from tests.helpers import (
    RelocateJob,
    bucket_names,
    bucket_settings,
    lost_objects,
    object_state,
    region,
    relocate_job,
    relocation_row,
)

TARGET = "eu-central-1"
DELAY = 1.5  # seconds each slowed request waits before S3 carries it out

# For each phase, a request it sends that the test slows down, so that the kill lands while
# S3 is carrying it out (the side effect happens, the run never hears of it).
SLOWED = {
    "create_temp": "create_bucket",
    "copy_out": "copy_object",
    "check_source": "list_objects_v2",
    "empty_source": "delete_objects",
    "recreate": "create_bucket",
    "configure": "put_bucket_tagging",
    "copy_back": "copy_object",
    "finish_config": "put_bucket_policy",
    "delete_temp": "delete_objects",
}


class SlowS3:
    """Slows one S3 operation of the moto server (it runs in this process) while the
    relocation's ledger says it is in a given phase; the operation still completes after the
    delay, even when the client was killed meanwhile, as S3 finishes a request it received."""

    def __init__(self, ledger: Path) -> None:
        self.ledger = ledger
        self.phase: str | None = None
        self.started = 0
        self.in_flight = 0
        self.lock = threading.Lock()
        self.first = threading.Event()

    def wrap(self, original: Any) -> Any:
        def slowed(backend: Any, *args: Any, **kwargs: Any) -> Any:
            row = relocation_row(self.ledger) if self.phase is not None else None
            if row is None or row["phase"] != self.phase:
                return original(backend, *args, **kwargs)
            with self.lock:
                self.started += 1
                self.in_flight += 1
            self.first.set()
            try:
                time.sleep(DELAY)
                return original(backend, *args, **kwargs)
            finally:
                with self.lock:
                    self.in_flight -= 1

        return slowed

    def settle(self) -> None:
        """Wait until every slowed request has been carried out."""
        deadline = time.monotonic() + 30
        while self.in_flight and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not self.in_flight


@pytest.fixture
def slow_s3(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Any]:
    from moto.s3.models import S3Backend

    def make(phase: str) -> SlowS3:
        slow = SlowS3(tmp_path / "ledger.db")
        slow.phase = phase
        name = SLOWED[phase]
        monkeypatch.setattr(S3Backend, name, slow.wrap(getattr(S3Backend, name)))
        return slow

    yield make


def start(job: RelocateJob, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "migrator",
            "relocate",
            "--config",
            str(job.config_path),
            "--to-region",
            TARGET,
            "--confirm-delete-source-bucket",
            "--quiet",
            *extra,
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group: relocate and its workers die at once
    )


@pytest.mark.parametrize(
    ("phase", "versioned", "nth"),
    [
        ("create_temp", False, 1),
        ("copy_out", False, 1),
        ("check_source", False, 1),
        ("empty_source", False, 1),
        ("empty_source", True, 1),  # a versioned bucket: while noncurrent versions go
        ("empty_source", True, 2),  # ... and while the latest ones go
        ("recreate", False, 1),
        ("configure", False, 1),
        ("copy_back", False, 1),
        ("finish_config", False, 1),
        ("delete_temp", False, 1),
    ],
)
def test_sigkill_in_each_phase_then_the_same_command_converges(
    tmp_path: Path,
    moto_s3: Any,
    moto_endpoint: str,
    slow_s3: Any,
    phase: str,
    versioned: bool,
    nth: int,
) -> None:
    job = relocate_job(tmp_path, moto_s3, moto_endpoint, count=10, versioned=versioned)
    extra = ("--discard-noncurrent-versions",) if versioned else ()
    if versioned:  # a noncurrent version and a delete marker to discard
        key = next(iter(job.objects))
        moto_s3.put_object(Bucket=job.bucket, Key=key, Body=job.objects[key])
        moto_s3.put_object(Bucket=job.bucket, Key="gone.txt", Body=b"x")
        moto_s3.delete_object(Bucket=job.bucket, Key="gone.txt")
    before = {k: object_state(moto_s3, job.bucket, k) for k in job.objects}
    settings = bucket_settings(moto_s3, job.bucket)
    buckets_before = bucket_names(moto_s3)
    slow = slow_s3(phase)

    proc = start(job, *extra)
    deadline = time.monotonic() + 120
    while slow.started < nth and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert slow.started >= nth, f"never reached {phase}: {proc.stderr.read().decode()[-2000:]}"
    time.sleep(random.uniform(0.0, DELAY / 2))
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    slow.settle()  # S3 finished what the killed run had sent

    row = relocation_row(job.ledger_path)
    assert row is not None and row["phase"] == phase  # the kill landed in the phase
    assert lost_objects(job, before, row["temp_bucket"]) == []

    slow.phase = None  # S3 at full speed again
    again = start(job, *extra)
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err.decode()[-3000:]
    assert relocation_row(job.ledger_path)["phase"] == "done"  # type: ignore[index]
    assert region(moto_s3, job.bucket) == TARGET
    assert {k: object_state(moto_s3, job.bucket, k) for k in job.objects} == before
    assert bucket_settings(moto_s3, job.bucket) == settings
    assert bucket_names(moto_s3) == buckets_before  # the temporary bucket is gone
    if versioned:
        versions = moto_s3.list_object_versions(Bucket=job.bucket)
        assert sorted(v["Key"] for v in versions["Versions"]) == sorted(job.objects)
        assert not versions.get("DeleteMarkers")
