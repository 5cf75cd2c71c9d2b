"""A destination key that already holds an object: identical → counted as copied; written by
this job for an older version → overwritten; anything else → ``on_conflict`` (fail by default,
overwrite, skip). Runs on s3fast, which honours ``If-None-Match: *`` on CopyObject."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from migrator.supervisor import run_job
from tests.conftest import S3Fast, s3_client
from tests.helpers import Job, app_paths, list_keys, make_job, read, run_cli

pytestmark = pytest.mark.s3fast
FOREIGN = b"an object this job did not write"


def conflict_job(tmp_path: Path, s3fast: Callable[..., S3Fast], **settings: Any) -> Job:
    server = s3fast()
    job = make_job(
        tmp_path,
        s3_client(server.endpoint),
        server.endpoint,
        ledger=f"sqlite:///{tmp_path / 'ledger.db'}",
        app=f"sqlite:///{tmp_path / 'app.db'}",
        count=6,
        delete_source="per_chunk",
        **settings,
    )
    taken = job.objects[2]
    job.s3.put_object(Bucket=job.cfg.destination.bucket, Key=job.dest_key(taken.key), Body=FOREIGN)
    return job


def status(job: Job) -> dict[str, Any]:
    return json.loads(run_cli("status", "--json", "--config", str(job.config_path)).stdout)


def test_conflict_fails_the_row_by_default_and_keeps_its_source(
    tmp_path: Path, s3fast: Callable[..., S3Fast]
) -> None:
    job = conflict_job(tmp_path, s3fast)
    taken = job.objects[2]
    assert run_job(job.cfg, console=Console(stderr=True, quiet=True)) == 1
    doc = status(job)
    assert doc["counts"]["failed"] == 1 and doc["counts"]["done"] == 5
    assert "destination key already holds a different object" in doc["recent_errors"][0]["error"]
    # The foreign object is intact, the source is kept, its app row untouched.
    assert read(job.s3, job.cfg.destination.bucket, job.dest_key(taken.key)) == FOREIGN
    assert list_keys(job.s3, job.cfg.source.bucket) == {taken.key}
    assert taken.key in app_paths(job)


def test_conflict_overwrite_replaces_the_object(
    tmp_path: Path, s3fast: Callable[..., S3Fast]
) -> None:
    job = conflict_job(tmp_path, s3fast, on_conflict="overwrite")
    taken = job.objects[2]
    assert run_job(job.cfg, console=Console(stderr=True, quiet=True)) == 0
    assert read(job.s3, job.cfg.destination.bucket, job.dest_key(taken.key)) == taken.body
    assert list_keys(job.s3, job.cfg.source.bucket) == set()


def test_conflict_skip_leaves_the_row_alone(tmp_path: Path, s3fast: Callable[..., S3Fast]) -> None:
    job = conflict_job(tmp_path, s3fast, on_conflict="skip")
    taken = job.objects[2]
    assert run_job(job.cfg, console=Console(stderr=True, quiet=True)) == 0
    doc = status(job)
    assert doc["counts"]["skipped"] == 1 and doc["counts"]["done"] == 5
    assert read(job.s3, job.cfg.destination.bucket, job.dest_key(taken.key)) == FOREIGN
    assert list_keys(job.s3, job.cfg.source.bucket) == {taken.key}
    assert taken.key in app_paths(job)
    verify = run_cli("verify", "--config", str(job.config_path))
    assert verify.returncode == 0, verify.stdout  # skipped on purpose is not a discrepancy


def test_identical_object_at_destination_counts_as_copied(
    tmp_path: Path, s3fast: Callable[..., S3Fast]
) -> None:
    server = s3fast()
    job = make_job(
        tmp_path,
        s3_client(server.endpoint),
        server.endpoint,
        ledger=f"sqlite:///{tmp_path / 'ledger.db'}",
        app=None,
        count=4,
    )
    for obj in job.objects:  # someone already copied everything (e.g. an earlier tool)
        job.s3.put_object(
            Bucket=job.cfg.destination.bucket, Key=job.dest_key(obj.key), Body=obj.body
        )
    server.reset_stats()
    assert run_job(job.cfg, console=Console(stderr=True, quiet=True)) == 0
    ops = server.stats()["ops"]
    assert ops["CopyObject"] == 4  # each refused (412), then one HEAD shows the same object
    assert ops["HeadObject"] == 4
    assert list_keys(job.s3, job.cfg.source.bucket) == set()


def test_object_this_job_wrote_for_an_older_version_is_overwritten(
    tmp_path: Path, s3fast: Callable[..., S3Fast]
) -> None:
    server = s3fast()
    job = make_job(
        tmp_path,
        s3_client(server.endpoint),
        server.endpoint,
        ledger=f"sqlite:///{tmp_path / 'ledger.db'}",
        app=f"sqlite:///{tmp_path / 'app.db'}",
        count=4,
    )
    gone = job.objects[0]  # a missing source fails its row and holds every delete (after_all)
    assert run_cli("plan", "--config", str(job.config_path)).returncode == 0
    job.s3.delete_object(Bucket=job.cfg.source.bucket, Key=gone.key)
    quiet = Console(stderr=True, quiet=True)
    assert run_job(job.cfg, console=quiet) == 1
    changed = job.objects[1]  # copied and rewritten, source still there; now it changes
    job.s3.put_object(Bucket=job.cfg.source.bucket, Key=changed.key, Body=b"version 2")
    proc = run_cli("plan", "--config", str(job.config_path))
    assert "1 changed" in proc.stderr
    job.s3.put_object(Bucket=job.cfg.source.bucket, Key=gone.key, Body=gone.body)
    assert run_cli("retry-failed", "--config", str(job.config_path)).returncode == 0
    assert run_job(job.cfg, console=quiet) == 0
    assert read(job.s3, job.cfg.destination.bucket, job.dest_key(changed.key)) == b"version 2"
    assert list_keys(job.s3, job.cfg.source.bucket) == set()
