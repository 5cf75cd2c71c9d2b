"""Objects above ``multipart_threshold`` are copied with parallel ``UploadPartCopy`` parts.

The threshold and part size are lowered to 5 MiB (S3's smallest part) so a few objects of
6–17 MiB stand for the big ones. s3fast counts requests per operation, honours
``CopySourceIfMatch`` on parts and ``If-None-Match`` on CompleteMultipartUpload, and injects
faults per operation; the first test also runs on moto.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import signal
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from migrator.config import Config
from migrator.storage.multipart import MIB
from migrator.supervisor import preflight, run_job, run_plan
from seed.__main__ import seed_app_db
from seed.data import SeedObject
from tests.conftest import S3Fast, s3_client
from tests.helpers import (
    Job,
    assert_converged,
    kill_at_completion,
    ledger_rows,
    make_job,
    read,
    run_cli,
    start_run,
)

PART = 5 * MIB
LARGE_SIZES = (6 * MIB, 11 * MIB + 3, 17 * MIB)  # 2, 3 and 4 parts
SMALL = 3
HEADERS = {
    "ContentType": "image/tiff",
    "CacheControl": "max-age=3600",
    "ContentDisposition": 'attachment; filename="big.tif"',
    "ContentEncoding": "identity",
    "ContentLanguage": "de-CH",
    "Expires": datetime(2031, 1, 2, 3, 4, 5, tzinfo=UTC),
}


def quiet() -> Console:
    return Console(stderr=True, quiet=True)


def parts(size: int) -> int:
    return math.ceil(size / PART)


def large_object(index: int, size: int) -> SeedObject:
    """Random bytes, so a part in the wrong place or a short copy changes the body."""
    body = random.Random(index).randbytes(size)
    return SeedObject(index, f"image/big/{index}.tif", "image/tiff", body, 200_000 + index)


def upload_large(s3: Any, bucket: str, obj: SeedObject) -> None:
    s3.put_object(
        Bucket=bucket,
        Key=obj.key,
        Body=obj.body,
        Metadata={"user-id": str(obj.user_id), "origin": "scanner"},
        **HEADERS,
    )


def multipart_job(tmp_path: Path, s3: Any, endpoint: str, **settings: Any) -> Job:
    """``SMALL`` small objects and one large object of each of ``LARGE_SIZES``, with app rows
    for all of them; threshold and part size 5 MiB."""
    job = make_job(
        tmp_path,
        s3,
        endpoint,
        ledger=f"sqlite:///{tmp_path / 'ledger.db'}",
        app=f"sqlite:///{tmp_path / 'app.db'}",
        count=SMALL,
        size=2048,
        multipart_threshold=PART,
        part_size=PART,
        **settings,
    )
    for i, size in enumerate(LARGE_SIZES):
        obj = large_object(SMALL + i, size)
        upload_large(s3, job.cfg.source.bucket, obj)
        job.objects.append(obj)
    seed_app_db(job.cfg, job.objects, replace=True)
    return job


def large(job: Job) -> list[SeedObject]:
    return [o for o in job.objects if len(o.body) > PART]


def plan(cfg: Config) -> None:
    res = preflight(cfg)
    try:
        run_plan(cfg, res, quiet())
    finally:
        res.close()


def incomplete_uploads(s3: Any, bucket: str) -> list[str]:
    return [u["Key"] for u in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", ())]


def assert_large_copied_in_parts(job: Job) -> None:
    """Every large destination is the source's bytes and headers in the expected number of
    parts, with the ETag its parts imply recorded in the ledger."""
    dst = job.cfg.destination.bucket
    rows = ledger_rows(job.cfg)
    for obj in large(job):
        key = job.dest_key(obj.key)
        head = job.s3.head_object(Bucket=dst, Key=key)
        assert head["ContentLength"] == len(obj.body)
        assert head["Metadata"] == {"user-id": str(obj.user_id), "origin": "scanner"}
        for name, value in HEADERS.items():
            assert head[name] == value, name
        assert head["ETag"].strip('"').endswith(f"-{parts(len(obj.body))}")
        assert rows[obj.key]["dest_etag"] == head["ETag"].strip('"')
        assert rows[obj.key]["state"] == "done"


@pytest.mark.s3fast
def test_large_objects_copied_in_parts_small_ones_in_one_request(
    tmp_path: Path, s3fast: Callable[..., S3Fast]
) -> None:
    server = s3fast()
    job = multipart_job(tmp_path, s3_client(server.endpoint), server.endpoint)
    server.reset_stats()

    assert run_job(job.cfg, console=quiet()) == 0

    stats = server.stats()
    ops = stats["ops"]
    assert ops.get("UploadPartCopy") == sum(parts(len(o.body)) for o in large(job)), ops
    assert ops.get("CopyObject") == SMALL, ops  # one request per small object
    assert ops.get("CreateMultipartUpload") == len(LARGE_SIZES), ops
    assert ops.get("CompleteMultipartUpload") == len(LARGE_SIZES), ops
    assert ops.get("AbortMultipartUpload", 0) == 0, ops
    # Per large object: HEAD of the destination (absent: 404) and of the source, one listing
    # of incomplete uploads, and the HEAD that verifies the completed copy.
    assert ops.get("HeadObject") == 3 * len(LARGE_SIZES), ops
    assert ops.get("ListMultipartUploads") == len(LARGE_SIZES), ops
    assert stats["multipart_uploads"] == 0
    assert stats["errors"] == {"NoSuchKey": len(LARGE_SIZES)}, stats["errors"]
    assert_converged(job)  # every body arrived, app rows rewritten, sources deleted
    assert_large_copied_in_parts(job)
    audit = run_cli("verify", "--config", str(job.config_path))  # the recorded ETags hold
    assert audit.returncode == 0, audit.stdout + audit.stderr


def test_large_objects_on_moto(tmp_path: Path, moto_s3: Any, moto_endpoint: str) -> None:
    """moto ignores ``CopySourceIfMatch`` on parts, but bytes, headers, part count and the
    ETag check are the same there."""
    job = multipart_job(tmp_path, moto_s3, moto_endpoint, transport="boto3")

    assert run_job(job.cfg, console=quiet()) == 0

    assert_converged(job)
    assert_large_copied_in_parts(job)
    assert incomplete_uploads(moto_s3, job.cfg.destination.bucket) == []


@pytest.mark.s3fast
def test_large_source_overwritten_after_plan_is_replanned(
    tmp_path: Path, s3fast: Callable[..., S3Fast]
) -> None:
    """I4 for parts: the source is replaced between plan and run, the copy is refused (412),
    the row re-planned, and the new bytes arrive; the refused upload is aborted."""
    server = s3fast()
    job = multipart_job(tmp_path, s3_client(server.endpoint), server.endpoint)
    plan(job.cfg)
    old = large(job)[1]
    new = dataclasses.replace(old, body=random.Random(99).randbytes(9 * MIB))
    upload_large(job.s3, job.cfg.source.bucket, new)
    job.objects[job.objects.index(old)] = new
    server.reset_stats()

    assert run_job(job.cfg, console=quiet()) == 0

    stats = server.stats()
    assert stats["errors"].get("PreconditionFailed", 0) >= 1, stats["errors"]
    assert stats["multipart_uploads"] == 0
    dest = read(job.s3, job.cfg.destination.bucket, job.dest_key(new.key))
    assert dest == new.body and dest != old.body
    assert_converged(job)
    assert_large_copied_in_parts(job)
    row = ledger_rows(job.cfg)[new.key]
    assert row["size"] == len(new.body)


@pytest.mark.s3fast
def test_faults_on_part_copies_converge_without_leftover_uploads(
    tmp_path: Path, s3fast: Callable[..., S3Fast]
) -> None:
    server = s3fast("-fault-ops", "UploadPartCopy", "-fail-rate", "0.3")
    job = multipart_job(tmp_path, s3_client(server.endpoint), server.endpoint)
    server.reset_stats()

    assert run_job(job.cfg, console=quiet()) == 0

    stats = server.stats()
    assert stats["injected"]["slowdown"] > 0, stats  # the faults really happened
    assert stats["multipart_uploads"] == 0
    assert_converged(job)
    assert_large_copied_in_parts(job)


@pytest.mark.s3fast
def test_incomplete_upload_left_by_a_killed_worker_is_aborted(
    tmp_path: Path, s3fast: Callable[..., S3Fast]
) -> None:
    server = s3fast()
    job = multipart_job(tmp_path, s3_client(server.endpoint), server.endpoint)
    dst = job.cfg.destination.bucket
    target = job.dest_key(large(job)[0].key)
    stale = job.s3.create_multipart_upload(Bucket=dst, Key=target)["UploadId"]
    job.s3.upload_part(Bucket=dst, Key=target, UploadId=stale, PartNumber=1, Body=b"stale")
    # An upload to a longer key that shares the prefix belongs to someone else: left alone.
    other = job.s3.create_multipart_upload(Bucket=dst, Key=target + ".other")["UploadId"]

    assert run_job(job.cfg, console=quiet()) == 0

    uploads = job.s3.list_multipart_uploads(Bucket=dst).get("Uploads", ())
    assert [(u["Key"], u["UploadId"]) for u in uploads] == [(target + ".other", other)]
    assert_converged(job)
    assert_large_copied_in_parts(job)


@pytest.mark.parametrize("server_kind", ["s3fast", "moto"])
def test_conflict_on_a_large_object_aborts_the_upload_and_keeps_the_other_object(
    tmp_path: Path, request: pytest.FixtureRequest, server_kind: str
) -> None:
    """``on_conflict: fail``: CompleteMultipartUpload carries ``If-None-Match: *``, so a
    destination key that holds another object is refused (412) after the parts were copied;
    the upload is aborted, the other object stays, the row fails, its source stays."""
    if server_kind == "s3fast":
        endpoint = request.getfixturevalue("s3fast")().endpoint
        s3 = s3_client(endpoint)
    else:
        endpoint, s3 = request.getfixturevalue("moto_endpoint"), request.getfixturevalue("moto_s3")
    job = multipart_job(tmp_path, s3, endpoint, transport="boto3", delete_source="per_chunk")
    dst = job.cfg.destination.bucket
    taken = large(job)[2]
    s3.put_object(Bucket=dst, Key=job.dest_key(taken.key), Body=b"someone else's")

    assert run_job(job.cfg, console=quiet()) == 1

    assert read(s3, dst, job.dest_key(taken.key)) == b"someone else's"
    assert incomplete_uploads(s3, dst) == []
    row = ledger_rows(job.cfg)[taken.key]
    assert row["state"] == "failed" and "conflict" in row["last_error"]
    assert read(s3, job.cfg.source.bucket, taken.key) == taken.body
    others = [o for o in job.objects if o is not taken]
    assert {ledger_rows(job.cfg)[o.key]["state"] for o in others} == {"done"}


@pytest.mark.s3fast
def test_kill_after_completion_before_the_ledger_record_converges(
    tmp_path: Path, s3fast: Callable[..., S3Fast]
) -> None:
    """I2 for parts under ``on_conflict: fail``: ``kill -9`` while CompleteMultipartUpload is
    in flight (slowed to 2 s) leaves a completed destination the ledger has not recorded. The
    ETag recorded before completion lets the re-run see the object as this job's: it is
    copied again, not failed as a conflict."""
    server = s3fast("-latency", "2s", "-fault-ops", "CompleteMultipartUpload")
    # One worker: one completion in flight at a time, so the one sent is the caught row's.
    job = multipart_job(tmp_path, s3_client(server.endpoint), server.endpoint, workers=1)
    proc = start_run(job.config_path)
    caught = kill_at_completion(proc, lambda: server.stats()["ops"], job.cfg.ledger)
    assert caught is not None, "no multipart copy reached its completion"
    time.sleep(2.5)  # the server finishes the completion it was sent
    row = ledger_rows(job.cfg)[caught]
    dest = job.s3.head_object(Bucket=job.cfg.destination.bucket, Key=job.dest_key(caught))
    assert row["state"] == "pending" and dest["ETag"].strip('"') == row["dest_etag"]

    assert run_job(job.cfg, console=quiet()) == 0

    assert_converged(job)
    assert_large_copied_in_parts(job)
    assert server.stats()["multipart_uploads"] == 0


@pytest.mark.s3fast
def test_ctrl_c_mid_upload_leaves_unsent_parts_unsent_and_no_upload(
    tmp_path: Path, s3fast: Callable[..., S3Fast]
) -> None:
    """A stop request during a multipart copy: the part in flight finishes, the rest are not
    sent, the upload is aborted and the row released; the next run copies it whole."""
    server = s3fast("-latency", "1s", "-fault-ops", "UploadPartCopy")
    job = multipart_job(
        tmp_path, s3_client(server.endpoint), server.endpoint, workers=1, concurrency=1
    )
    all_parts = sum(parts(len(o.body)) for o in large(job))
    proc = start_run(job.config_path)
    deadline = time.monotonic() + 60
    while server.stats()["ops"].get("UploadPartCopy", 0) == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)

    assert proc.returncode == 130, err.decode()[-2000:]
    stats = server.stats()
    assert 0 < stats["ops"]["UploadPartCopy"] < all_parts, stats["ops"]
    assert stats["multipart_uploads"] == 0
    assert ledger_rows(job.cfg)[large(job)[-1].key]["state"] == "pending"

    assert run_job(job.cfg, console=quiet()) == 0
    assert_converged(job)
    assert_large_copied_in_parts(job)
