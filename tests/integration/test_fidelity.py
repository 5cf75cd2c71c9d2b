"""Object fidelity: content headers, user metadata, tags, storage class, server-side encryption
and ACL round-trip — kept by default, or set by config — for single copies on both transports
and for copies in parts (``multipart_threshold`` lowered to 5 MiB).

The moto server stands in for S3, made AWS-like where it matters here by ``aws_like_moto``:
SSE-KMS objects get ETags that are not MD5s, and ``CopyObject`` honours its preconditions. So
copies into or out of SSE-KMS are verified as on AWS — by size and checksum, not ETag — and a
``kill -9`` between such a copy and its ledger record is resumed as on AWS. s3fast counts the
requests: attributes set by config cost none.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import boto3
import pytest
from botocore.config import Config as BotoConfig
from rich.console import Console

from migrator.storage.multipart import MIB
from migrator.supervisor import run_job
from seed.data import SeedObject
from tests.conftest import AwsLikeMoto, S3Fast, s3_client
from tests.helpers import (
    Job,
    assert_converged,
    kms_key,
    ledger_rows,
    list_etags,
    make_job,
    read,
    run_cli,
    start_run,
)

PART = 5 * MIB
CONTENT = (
    "ContentType",
    "CacheControl",
    "ContentDisposition",
    "ContentEncoding",
    "ContentLanguage",
    "Expires",
)
HEADERS = {
    "ContentType": "image/tiff",
    "CacheControl": "max-age=3600",
    "ContentDisposition": 'attachment; filename="big.tif"',
    "ContentEncoding": "identity",
    "ContentLanguage": "de-CH",
    "Expires": datetime(2031, 1, 2, 3, 4, 5, tzinfo=UTC),
}
ALL_USERS = "http://acs.amazonaws.com/groups/global/AllUsers"


def quiet() -> Console:
    return Console(stderr=True, quiet=True)


@dataclass
class Source:
    """A source object and the attributes it was written with."""

    obj: SeedObject
    headers: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    storage_class: str | None = None
    sse: dict[str, str] = field(default_factory=dict)

    def upload(self, s3: Any, bucket: str) -> None:
        extra: dict[str, Any] = {**self.headers, **self.sse}
        if self.tags:
            extra["Tagging"] = urlencode(self.tags)
        if self.storage_class:
            extra["StorageClass"] = self.storage_class
        s3.put_object(
            Bucket=bucket, Key=self.obj.key, Body=self.obj.body, Metadata=self.metadata, **extra
        )


def body(index: int, size: int) -> bytes:
    """Random bytes: a part in the wrong place or a short copy changes the body."""
    return random.Random(index).randbytes(size)


def sources(source_key: str) -> list[Source]:
    """Small and large objects with every attribute, plain and SSE-KMS, in several classes."""
    kms = {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": source_key}

    def obj(i: int, key: str, size: int) -> SeedObject:
        return SeedObject(i, key, "image/tiff", body(i, size), 500 + i)

    return [
        Source(obj(0, "image/plain.tif", 3000), HEADERS, {"origin": "scanner"}, {"a": "1"}),
        Source(obj(1, "image/ia.png", 2000), {"ContentType": "image/png"}, {}, {}, "STANDARD_IA"),
        Source(obj(2, "image/kms.tif", 4000), HEADERS, {"k": "v"}, {"b": "x y"}, "GLACIER_IR", kms),
        Source(obj(3, "image/big.tif", 6 * MIB + 3), HEADERS, {"n": "3"}, {"c": "3"}, "ONEZONE_IA"),
        Source(obj(4, "image/big-kms.tif", 6 * MIB), HEADERS, {"n": "4"}, {"d": "4"}, None, kms),
    ]


def fidelity_job(
    tmp_path: Path, s3: Any, endpoint: str, objects: list[Source], **settings: Any
) -> Job:
    job = make_job(
        tmp_path,
        s3,
        endpoint,
        ledger=f"sqlite:///{tmp_path / 'ledger.db'}",
        app=None,
        keys=[],
        delete_source="never",
        multipart_threshold=PART,
        part_size=PART,
        **settings,
    )
    for source in objects:
        source.upload(s3, job.cfg.source.bucket)
        job.objects.append(source.obj)
    return job


def attributes(s3: Any, bucket: str, key: str, *, acl: bool = True) -> dict[str, Any]:
    """Everything a copy may keep or set, as S3 reports it (without ``acl``, not the ACL:
    moto fails to read the ACL of an object completed from parts without one)."""
    head = s3.head_object(Bucket=bucket, Key=key)
    tags = s3.get_object_tagging(Bucket=bucket, Key=key)["TagSet"]
    grants = s3.get_object_acl(Bucket=bucket, Key=key)["Grants"] if acl else []
    return {
        **{name: head.get(name) for name in CONTENT},
        "Metadata": head["Metadata"],
        "Tags": {t["Key"]: t["Value"] for t in tags},
        "StorageClass": head.get("StorageClass", "STANDARD"),
        "SSE": head.get("ServerSideEncryption"),
        "KMSKey": head.get("SSEKMSKeyId"),
        "public": any(g["Grantee"].get("URI") == ALL_USERS for g in grants),
        "ETag": head["ETag"].strip('"'),
    }


def assert_recorded_as_listed(job: Job) -> None:
    """Each copy was verified at its first attempt, and the ledger holds its real ETag, which
    ``migrator verify`` compares."""
    rows = ledger_rows(job.cfg)
    dests = list_etags(job.s3, job.cfg.destination.bucket)
    for obj in job.objects:
        assert rows[obj.key]["state"] == "done", rows[obj.key]
        assert rows[obj.key]["attempts"] == 0, rows[obj.key]
        assert rows[obj.key]["dest_etag"] == dests[job.dest_key(obj.key)]
    proc = run_cli("verify", "--config", str(job.config_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "verify: OK" in proc.stdout


@pytest.mark.parametrize("transport", ["crt", "boto3"])
def test_by_default_every_attribute_is_kept_and_encryption_is_the_bucket_default(
    tmp_path: Path, moto_s3: Any, moto_endpoint: str, aws_like_moto: AwsLikeMoto, transport: str
) -> None:
    """Content headers, user metadata and tags (CopyObject's own), and the listed storage
    class, on small objects and on copies in parts. No encryption header is sent: the
    destination bucket's default (here SSE-S3) applies, also to SSE-KMS sources, whose copies
    S3 gives ETags unlike the sources' — verified by size and checksum instead."""
    objects = sources(kms_key(moto_endpoint))
    job = fidelity_job(tmp_path, moto_s3, moto_endpoint, objects, transport=transport)
    dst = job.cfg.destination.bucket
    moto_s3.put_bucket_encryption(
        Bucket=dst,
        ServerSideEncryptionConfiguration={
            "Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]
        },
    )

    assert run_job(job.cfg, console=quiet()) == 0

    assert_converged(job, sources_deleted=False)
    for source in objects:
        small = len(source.obj.body) <= PART
        want = attributes(moto_s3, job.cfg.source.bucket, source.obj.key)
        got = attributes(moto_s3, dst, job.dest_key(source.obj.key), acl=small)
        for name in (*CONTENT, "Metadata", "Tags", "StorageClass"):
            assert got[name] == want[name], (source.obj.key, name)
        assert (got["SSE"], got["KMSKey"], got["public"]) == ("AES256", None, False)
    kms_source = attributes(moto_s3, job.cfg.source.bucket, "image/kms.tif")
    kms_copy = attributes(moto_s3, dst, job.dest_key("image/kms.tif"))
    assert kms_source["SSE"] == "aws:kms" and kms_copy["ETag"] != kms_source["ETag"]
    assert_recorded_as_listed(job)


@pytest.mark.parametrize("transport", ["crt", "boto3"])
def test_attributes_set_by_config_reach_every_copy(
    tmp_path: Path, moto_s3: Any, moto_endpoint: str, aws_like_moto: AwsLikeMoto, transport: str
) -> None:
    """``metadata: replace`` with values, ``tags: replace``, ``storage_class``, SSE-KMS with a
    destination key and a canned ACL, on single copies and copies in parts. The copies' ETags
    are not the sources' (SSE-KMS): each is verified by size and checksum, recorded as S3
    lists it, and ``migrator verify`` accepts it."""
    objects = sources(kms_key(moto_endpoint))
    dest_key = kms_key(moto_endpoint)
    job = fidelity_job(
        tmp_path,
        moto_s3,
        moto_endpoint,
        objects,
        transport=transport,
        metadata="replace",
        metadata_values={
            "content_type": "image/webp",
            "cache_control": "public, max-age=31536000",
            "content_disposition": "inline",
            "content_encoding": "identity",
            "content_language": "en",
            "expires": "2032-03-04T05:06:07Z",
            "user": {"migrated-by": "migrator"},
        },
        tags="replace",
        tag_values={"project": "avatars", "note": "moved 2026/12"},
        storage_class="STANDARD_IA",
        sse="aws:kms",
        kms_key_id=dest_key,
        acl="public-read",
    )

    assert run_job(job.cfg, console=quiet()) == 0

    assert_converged(job, sources_deleted=False)
    for source in objects:
        got = attributes(moto_s3, job.cfg.destination.bucket, job.dest_key(source.obj.key))
        assert got["ContentType"] == "image/webp"
        assert got["CacheControl"] == "public, max-age=31536000"
        assert got["ContentDisposition"] == "inline"
        assert got["ContentEncoding"] == "identity"
        assert got["ContentLanguage"] == "en"
        assert got["Expires"] == datetime(2032, 3, 4, 5, 6, 7, tzinfo=UTC)
        assert got["Metadata"] == {"migrated-by": "migrator"}
        assert got["Tags"] == {"project": "avatars", "note": "moved 2026/12"}
        assert got["StorageClass"] == "STANDARD_IA"
        assert got["SSE"] == "aws:kms" and got["KMSKey"].endswith(dest_key)
        assert got["public"]
    small = attributes(moto_s3, job.cfg.destination.bucket, job.dest_key("image/plain.tif"))
    assert small["ETag"] != ledger_rows(job.cfg)["image/plain.tif"]["etag"]
    assert_recorded_as_listed(job)


def test_sse_s3_an_explicit_class_and_no_tags(
    tmp_path: Path, moto_s3: Any, moto_endpoint: str
) -> None:
    """``sse: AES256``, ``storage_class: STANDARD`` (out of STANDARD_IA and ONEZONE_IA) and
    ``tags: replace`` with none: every copy is SSE-S3, STANDARD and untagged, and keeps its
    content headers and user metadata."""
    objects = [s for s in sources(kms_key(moto_endpoint)) if not s.sse]
    job = fidelity_job(
        tmp_path,
        moto_s3,
        moto_endpoint,
        objects,
        sse="AES256",
        storage_class="STANDARD",
        tags="replace",
        tag_values={},
    )

    assert run_job(job.cfg, console=quiet()) == 0

    assert_converged(job, sources_deleted=False)
    for source in objects:
        want = attributes(moto_s3, job.cfg.source.bucket, source.obj.key)
        dest = job.dest_key(source.obj.key)
        got = attributes(moto_s3, job.cfg.destination.bucket, dest, acl=False)
        assert (got["SSE"], got["StorageClass"], got["Tags"]) == ("AES256", "STANDARD", {})
        assert got["Metadata"] == want["Metadata"] and got["ContentType"] == want["ContentType"]


@pytest.mark.s3fast
def test_attributes_cost_no_request(tmp_path: Path, s3fast: Callable[..., S3Fast]) -> None:
    """A job that sets attributes still copies with one request per object, and a listed
    storage class other than STANDARD reaches the copy without one."""
    server = s3fast()
    s3 = s3_client(server.endpoint)
    objects = [
        Source(
            SeedObject(i, f"image/{i}.png", "image/png", body(i, 700), i),
            storage_class="STANDARD_IA" if i % 2 else None,
        )
        for i in range(40)
    ]
    job = fidelity_job(
        tmp_path,
        s3,
        server.endpoint,
        objects,
        metadata="replace",
        metadata_values={"content_type": "image/webp", "user": {"a": "b"}},
        tags="replace",
        tag_values={"t": "1"},
        sse="AES256",
        acl="bucket-owner-full-control",
    )
    server.reset_stats()

    assert run_job(job.cfg, console=quiet()) == 0

    ops = server.stats()["ops"]
    assert ops.get("CopyObject") == len(objects), ops
    assert ops.get("HeadObject", 0) == 0 and ops.get("GetObjectTagging", 0) == 0, ops
    for source in objects:
        head = s3.head_object(Bucket=job.cfg.destination.bucket, Key=job.dest_key(source.obj.key))
        assert head["ContentType"] == "image/webp" and head["Metadata"] == {"a": "b"}
        assert head.get("StorageClass") == source.storage_class
        assert read(s3, job.cfg.destination.bucket, job.dest_key(source.obj.key)) == source.obj.body


def test_kill_between_sse_kms_copies_and_their_record_converges(
    tmp_path: Path, moto_s3: Any, moto_endpoint: str, aws_like_moto: AwsLikeMoto
) -> None:
    """``kill -9`` while SSE-KMS copies are in flight: S3 carries them out, the ledger never
    hears of them. The re-run's guarded copies find the keys taken (412) by objects whose
    ETags tell nothing (SSE-KMS); size and checksum show them to be the planned objects, so
    the rows are recorded as copied — no conflict, no second copy. An object of the same size
    but other bytes, put there by someone else, stays a conflict."""
    objects = [
        Source(
            SeedObject(i, f"image/{i}.png", "image/png", body(i, 900), i), metadata={"i": str(i)}
        )
        for i in range(6)
    ]
    job = fidelity_job(
        tmp_path,
        moto_s3,
        moto_endpoint,
        objects,
        sse="aws:kms",
        kms_key_id=kms_key(moto_endpoint),
        workers=1,
        chunk_size=5,  # the sixth object waits for the second chunk
    )
    stranger = job.dest_key("image/5.png")
    moto_s3.put_object(
        Bucket=job.cfg.destination.bucket,
        Key=stranger,
        Body=body(99, 900),
        ServerSideEncryption="aws:kms",
    )
    aws_like_moto.copy_delay = 2.0
    proc = start_run(job.config_path)
    try:
        deadline = time.monotonic() + 60
        while aws_like_moto.copies_received < 5 and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert aws_like_moto.copies_received == 5, "the first chunk's copies were not all sent"
    time.sleep(aws_like_moto.copy_delay + 1)  # the server carries out what it received
    aws_like_moto.copy_delay = 0.0
    rows = ledger_rows(job.cfg)
    copied = [o.key for o in job.objects[:5]]
    assert {rows[k]["state"] for k in copied} == {"pending"}
    assert all(rows[k]["dest_etag"] is None for k in copied)
    dests = list_etags(moto_s3, job.cfg.destination.bucket)
    for key in copied:  # written, with an ETag that is not the source's
        assert dests[job.dest_key(key)] != rows[key]["etag"]
    received = aws_like_moto.copies_received

    assert run_job(job.cfg, console=quiet()) == 1  # the stranger's row fails

    rows = ledger_rows(job.cfg)
    assert {rows[k]["state"] for k in copied} == {"done"}
    assert aws_like_moto.copies_received - received == 6  # one 412 each, no second copy
    assert rows["image/5.png"]["state"] == "failed"
    assert "conflict" in rows["image/5.png"]["last_error"]
    assert read(moto_s3, job.cfg.destination.bucket, stranger) == body(99, 900)
    for obj in job.objects[:5]:
        dest = job.dest_key(obj.key)
        assert read(moto_s3, job.cfg.destination.bucket, dest) == obj.body
        assert rows[obj.key]["dest_etag"] == list_etags(moto_s3, job.cfg.destination.bucket)[dest]


def test_an_sse_kms_object_without_checksums_at_the_destination_stays_a_conflict(
    tmp_path: Path, moto_endpoint: str, aws_like_moto: AwsLikeMoto
) -> None:
    """Where neither ETags nor checksums can tell an object at the destination from the
    planned one, it is not taken for it: the row fails as a conflict that says why, and
    source and destination stay as they are."""
    plain = boto3.client(  # uploads without a checksum, as older clients did
        "s3",
        endpoint_url=moto_endpoint,
        region_name="us-east-1",
        config=BotoConfig(
            s3={"addressing_style": "path"}, request_checksum_calculation="when_required"
        ),
    )
    objects = [Source(SeedObject(0, "image/0.png", "image/png", body(0, 900), 0))]
    job = fidelity_job(tmp_path, plain, moto_endpoint, objects, sse="aws:kms")
    other = job.dest_key("image/0.png")
    plain.put_object(
        Bucket=job.cfg.destination.bucket,
        Key=other,
        Body=body(1, 900),
        ServerSideEncryption="aws:kms",
    )

    assert run_job(job.cfg, console=quiet()) == 1

    row = ledger_rows(job.cfg)["image/0.png"]
    assert row["state"] == "failed"
    assert "cannot be told from the planned one" in row["last_error"]
    assert read(plain, job.cfg.destination.bucket, other) == body(1, 900)
    assert read(plain, job.cfg.source.bucket, "image/0.png") == body(0, 900)
