"""Streamed copies (GET → PUT through the worker) between two s3fast servers.

Two servers are two endpoints: no server-side copy can reach from one to the other, so
``copy_mode: auto`` streams. s3fast counts requests per operation on each side, honours
``If-Match`` on GetObject/HeadObject and ``If-None-Match: *`` on PutObject and
CompleteMultipartUpload, and injects faults per operation. Threshold and part size are lowered
to 5 MiB so objects of 6–17 MiB go in streamed parts. (Per-side credentials are tested on two
moto servers that enforce IAM: tests/acceptance/test_two_accounts.py.)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from migrator.config import Config, Location
from migrator.storage import s3
from migrator.storage.common import ErrorKind, S3OperationError
from migrator.storage.multipart import MIB
from migrator.storage.stream import STREAM_CHUNK, SourceBody
from migrator.supervisor import preflight, run_job, run_plan
from seed.__main__ import seed_app_db
from seed.data import SeedObject, seed_object
from tests.conftest import REPO, S3Fast, s3_client, unique
from tests.helpers import (
    Job,
    assert_converged,
    kill_at_completion,
    ledger_rows,
    make_job,
    read,
    run_cli,
    start_run,
    write_config,
)

pytestmark = pytest.mark.s3fast

PART = 5 * MIB
LARGE_SIZES = (6 * MIB, 11 * MIB + 3, 17 * MIB)  # 2, 3 and 4 parts
SMALL = 7  # sizes 0, 1,000, ... (object 0 is empty)
HEADERS = {
    "CacheControl": "max-age=3600",
    "ContentDisposition": 'attachment; filename="x"',
    "ContentEncoding": "identity",
    "ContentLanguage": "de-CH",
    "Expires": datetime(2031, 1, 2, 3, 4, 5, tzinfo=UTC),
}
TAGS = [{"Key": "origin", "Value": "scanner"}]


def quiet() -> Console:
    return Console(stderr=True, quiet=True)


def parts(size: int) -> int:
    return math.ceil(size / PART)


def put(client: Any, bucket: str, obj: SeedObject, *, tagged: bool = True) -> None:
    client.put_object(
        Bucket=bucket,
        Key=obj.key,
        Body=obj.body,
        ContentType=obj.content_type,
        Metadata={"user-id": str(obj.user_id)},
        **({"Tagging": "origin=scanner"} if tagged else {}),
        **HEADERS,
    )


def large_object(index: int, size: int) -> SeedObject:
    body = random.Random(index).randbytes(size)
    return SeedObject(index, f"image/big/{index}.tif", "image/tiff", body, 200_000 + index)


@dataclasses.dataclass
class Pair:
    """The source's server and the destination's."""

    src: S3Fast
    dst: S3Fast

    def reset_stats(self) -> None:
        self.src.reset_stats()
        self.dst.reset_stats()


def stream_job(
    tmp_path: Path,
    s3fast: Callable[..., S3Fast],
    *,
    src_flags: tuple[str, ...] = (),
    dst_flags: tuple[str, ...] = (),
    large: tuple[int, ...] = LARGE_SIZES,
    **settings: Any,
) -> tuple[Pair, Job]:
    """``SMALL`` small objects and the ``large`` ones on one server, an empty bucket on the
    other, app rows for all; threshold and part size 5 MiB."""
    pair = Pair(s3fast(*src_flags), s3fast(*dst_flags))
    src_s3, dst_s3 = s3_client(pair.src.endpoint), s3_client(pair.dst.endpoint)
    job = make_job(
        tmp_path,
        src_s3,
        pair.src.endpoint,
        ledger=f"sqlite:///{tmp_path / 'ledger.db'}",
        app=f"sqlite:///{tmp_path / 'app.db'}",
        count=0,
        multipart_threshold=PART,
        part_size=PART,
        **settings,
    )
    data = job.cfg.model_dump(exclude_none=True)
    data["destination"]["endpoint_url"] = pair.dst.endpoint
    write_config(job.config_path, data)
    job.cfg = Config.model_validate(data)
    job.dest_s3 = dst_s3
    dst_s3.create_bucket(Bucket=job.cfg.destination.bucket)
    job.objects = [seed_object(i, "image/", 1000 * i) for i in range(SMALL)]
    job.objects += [large_object(SMALL + i, size) for i, size in enumerate(large)]
    for obj in job.objects:
        put(src_s3, job.cfg.source.bucket, obj)
    seed_app_db(job.cfg, job.objects, replace=True)
    return pair, job


def big(job: Job) -> list[SeedObject]:
    return [o for o in job.objects if len(o.body) > PART]


def small(job: Job) -> list[SeedObject]:
    return [o for o in job.objects if len(o.body) <= PART]


def plan(cfg: Config) -> None:
    res = preflight(cfg)
    try:
        run_plan(cfg, res, quiet())
    finally:
        res.close()


def assert_carried(job: Job) -> None:
    """Every destination has its source's headers, metadata and tags; a large one the ETag
    of its parts, recorded in the ledger."""
    dst = job.cfg.destination.bucket
    rows = ledger_rows(job.cfg)
    for obj in job.objects:
        key = job.dest_key(obj.key)
        head = job.dst_s3.head_object(Bucket=dst, Key=key)
        assert head["ContentLength"] == len(obj.body)
        assert head["ContentType"] == obj.content_type
        assert head["Metadata"] == {"user-id": str(obj.user_id)}
        for name, value in HEADERS.items():
            assert head[name] == value, (key, name)
        assert job.dst_s3.get_object_tagging(Bucket=dst, Key=key)["TagSet"] == TAGS
        etag = head["ETag"].strip('"')
        if len(obj.body) > PART:
            assert etag.endswith(f"-{parts(len(obj.body))}"), etag
        else:
            assert etag == hashlib.md5(obj.body).hexdigest()
        assert rows[obj.key]["dest_etag"] == etag and rows[obj.key]["state"] == "done"


def test_stream_between_two_servers(tmp_path: Path, s3fast: Callable[..., S3Fast]) -> None:
    """One GET and one PUT per small object; a HEAD, one ranged GET per part, and the
    multipart calls per large one; nothing server-side. Bodies, headers, metadata and tags
    arrive, app rows point at them, sources are deleted, ``migrator verify`` agrees."""
    pair, job = stream_job(tmp_path, s3fast)
    assert job.cfg.streams
    pair.reset_stats()

    assert run_job(job.cfg, console=quiet()) == 0

    src, dst = pair.src.stats(), pair.dst.stats()
    all_parts = sum(parts(len(o.body)) for o in big(job))
    tagged = len(job.objects)
    assert src["ops"] == {
        "HeadBucket": 1,
        "ListObjectsV2": 1,
        "GetObject": len(small(job)) + all_parts,
        "HeadObject": len(big(job)),  # the large source's headers, with If-Match
        "GetObjectTagging": tagged,
        "DeleteObjects": src["ops"]["DeleteObjects"],
        "GetBucketVersioning": 1,
    }, src["ops"]
    assert dst["ops"] == {
        "HeadBucket": 1,
        "PutObject": len(small(job)),
        "UploadPart": all_parts,
        "CreateMultipartUpload": len(big(job)),
        "CompleteMultipartUpload": len(big(job)),
        "ListMultipartUploads": len(big(job)),
        "HeadObject": 2 * len(big(job)),  # free key before the parts, verify after
    }, dst["ops"]
    assert dst["errors"] == {"NoSuchKey": len(big(job))} and src["errors"] == {}
    assert dst["multipart_uploads"] == 0
    assert_converged(job)
    assert_carried(job)
    audit = run_cli("verify", "--config", str(job.config_path))
    assert audit.returncode == 0, audit.stdout + audit.stderr


def test_the_jobs_object_attributes_reach_streamed_copies(
    tmp_path: Path, s3fast: Callable[..., S3Fast]
) -> None:
    """``metadata``/``tags: replace``, ``storage_class``, ``sse: AES256`` and ``acl`` apply to
    a streamed ``PutObject`` and to ``CreateMultipartUpload`` as to server-side copies; under
    ``tags: replace`` the source's tags are not read (no ``GetObjectTagging``)."""
    pair, job = stream_job(
        tmp_path,
        s3fast,
        metadata="replace",
        metadata_values={"content_type": "image/webp", "user": {"moved-by": "migrator"}},
        tags="replace",
        tag_values={"project": "avatars"},
        storage_class="STANDARD_IA",
        sse="AES256",
        acl="bucket-owner-full-control",
    )
    pair.reset_stats()
    assert run_job(job.cfg, console=quiet()) == 0
    assert "GetObjectTagging" not in pair.src.stats()["ops"]
    dst = job.cfg.destination.bucket
    for obj in job.objects:
        key = job.dest_key(obj.key)
        head = job.dest_s3.head_object(Bucket=dst, Key=key)
        assert head["ContentType"] == "image/webp", key
        assert head["Metadata"] == {"moved-by": "migrator"}, key  # the source's are gone
        assert head.get("CacheControl") is None, key  # replace: not given, not set
        assert head["StorageClass"] == "STANDARD_IA", key
        assert head["ServerSideEncryption"] == "AES256", key
        tags = job.dest_s3.get_object_tagging(Bucket=dst, Key=key)["TagSet"]
        assert tags == [{"Key": "project", "Value": "avatars"}], key
    assert_converged(job)


def test_default_on_one_server_copies_server_side_and_stream_mode_streams(
    tmp_path: Path, s3fast: Callable[..., S3Fast]
) -> None:
    """``auto`` with both sides on one server and one set of credentials is today's
    CopyObject job; ``copy_mode: stream`` forces GET → PUT on the same server."""
    server = s3fast()
    client = s3_client(server.endpoint)
    for mode, copies, gets in (("auto", 6, 0), ("stream", 0, 6)):
        job = make_job(
            tmp_path / mode,
            client,
            server.endpoint,
            ledger=f"sqlite:///{tmp_path / mode / 'ledger.db'}",
            app=None,
            count=6,
            copy_mode=mode,
        )
        server.reset_stats()
        assert run_job(job.cfg, console=quiet()) == 0
        ops = server.stats()["ops"]
        assert ops.get("CopyObject", 0) == copies, (mode, ops)
        assert ops.get("GetObject", 0) == gets and ops.get("PutObject", 0) == gets, (mode, ops)
        assert_converged(job)


def test_profiles_decide_between_stream_and_server_side(
    tmp_path: Path, s3fast: Callable[..., S3Fast]
) -> None:
    """One endpoint, a profile per side: ``auto`` streams (the destination's credentials may
    not read the source), ``copy_mode: server`` copies server-side with the destination's
    (cross-account with a bucket policy). s3fast takes any keys; the profiles exist in
    temporary AWS files. Through the CLI, so the workers read those files."""
    server = s3fast()
    client = s3_client(server.endpoint)
    (tmp_path / "credentials").write_text(
        "[src]\naws_access_key_id = AKIASRC\naws_secret_access_key = src-secret\n"
        "[dst]\naws_access_key_id = AKIADST\naws_secret_access_key = dst-secret\n"
    )
    (tmp_path / "config").write_text("[profile src]\nregion = us-east-1\n[profile dst]\n")
    env = {
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "credentials"),
        "AWS_CONFIG_FILE": str(tmp_path / "config"),
    }
    for mode, copies, gets in (("auto", 0, 5), ("server", 5, 0)):
        job = make_job(
            tmp_path / mode,
            client,
            server.endpoint,
            ledger=f"sqlite:///{tmp_path / mode / 'ledger.db'}",
            app=None,
            count=5,
            copy_mode=mode,
        )
        data = job.cfg.model_dump(exclude_none=True)
        data["source"]["profile"], data["destination"]["profile"] = "src", "dst"
        write_config(job.config_path, data)
        server.reset_stats()
        proc = run_cli("run", "--quiet", "--config", str(job.config_path), env=env)
        assert proc.returncode == 0, proc.stderr
        ops = server.stats()["ops"]
        assert ops.get("CopyObject", 0) == copies, (mode, ops)
        assert ops.get("GetObject", 0) == gets and ops.get("PutObject", 0) == gets, (mode, ops)
        assert_converged(job)
        assert "src-secret" not in proc.stderr + proc.stdout


def test_sources_changed_after_plan_are_replanned(
    tmp_path: Path, s3fast: Callable[..., S3Fast]
) -> None:
    """I4 when streaming: a small and a large source are overwritten between plan and run;
    their GET (or HEAD) with ``If-Match`` fails with 412, the rows are re-planned, and the new
    bytes arrive. The refused large upload leaves nothing behind."""
    pair, job = stream_job(tmp_path, s3fast)
    plan(job.cfg)
    for old in (small(job)[3], big(job)[1]):
        new = dataclasses.replace(old, body=random.Random(99).randbytes(len(old.body) + 7))
        put(job.s3, job.cfg.source.bucket, new)
        job.objects[job.objects.index(old)] = new
    pair.reset_stats()

    assert run_job(job.cfg, console=quiet()) == 0

    assert pair.src.stats()["errors"].get("PreconditionFailed", 0) >= 2
    assert pair.dst.stats()["multipart_uploads"] == 0
    assert_converged(job)  # the new bodies everywhere
    assert_carried(job)
    rows = ledger_rows(job.cfg)
    assert rows[small(job)[3].key]["size"] == len(small(job)[3].body)


def test_faults_on_gets_puts_and_parts_converge(
    tmp_path: Path, s3fast: Callable[..., S3Fast]
) -> None:
    """30 % of the source's GetObject and of the destination's PutObject and UploadPart are
    answered 503 (and some destination connections reset): botocore retries them, a
    retried PUT reads its body again from a new GET, and every object arrives whole."""
    pair, job = stream_job(
        tmp_path,
        s3fast,
        src_flags=("-fault-ops", "GetObject", "-fail-rate", "0.3"),
        dst_flags=("-fault-ops", "PutObject,UploadPart", "-fail-rate", "0.3", "-reset-rate", "0.1"),
    )
    pair.reset_stats()

    assert run_job(job.cfg, console=quiet()) == 0

    assert pair.src.stats()["injected"]["slowdown"] > 0
    assert pair.dst.stats()["injected"]["slowdown"] > 0
    assert pair.dst.stats()["multipart_uploads"] == 0
    assert_converged(job)
    assert_carried(job)


def test_a_rewound_body_is_read_again_from_a_new_get(
    tmp_path: Path, s3fast: Callable[..., S3Fast]
) -> None:
    """What botocore does before it retries a PUT: rewind the body. The bytes come again from
    a fresh GET of the same version and hash to the same MD5; a source changed meanwhile
    fails the rewind with 412, kept for the caller."""
    server = s3fast()
    client = s3_client(server.endpoint)
    bucket = unique("rewind")
    client.create_bucket(Bucket=bucket)
    body = random.Random(1).randbytes(3 * MIB + 1)
    etag = client.put_object(Bucket=bucket, Key="k", Body=body)["ETag"].strip('"')
    service = s3.service(Location(bucket=bucket, endpoint_url=server.endpoint), "boto3", 2)
    try:
        server.reset_stats()
        stream = SourceBody(service.boto, bucket, "k", etag)
        assert stream.size == len(body)
        assert stream.read(16 * 1024) == body[:STREAM_CHUNK]  # more than the 16 KiB asked
        assert stream.seek(0) == 0 and stream.tell() == 0
        again = b"".join(iter(lambda: stream.read(16 * 1024), b""))
        assert again == body and stream.md5 == etag
        assert server.stats()["ops"]["GetObject"] == 2
        stream.close()

        changed = SourceBody(service.boto, bucket, "k", etag)
        changed.read(100)
        client.put_object(Bucket=bucket, Key="k", Body=b"version two")
        with pytest.raises(Exception):  # noqa: B017 - botocore turns it into its own error
            changed.seek(0)
        assert isinstance(changed.error, S3OperationError)
        assert changed.error.kind is ErrorKind.SOURCE_CHANGED
        changed.close()
    finally:
        service.close()


def test_conflicts_keep_the_other_objects(tmp_path: Path, s3fast: Callable[..., S3Fast]) -> None:
    """``on_conflict: fail``: a PutObject carries ``If-None-Match: *`` and a multipart stream
    first looks at the destination key, so objects someone else put there stay; those rows
    fail, the rest move."""
    pair, job = stream_job(tmp_path, s3fast, delete_source="per_chunk")
    dst = job.cfg.destination.bucket
    taken = [small(job)[2], big(job)[0]]
    for obj in taken:
        job.dst_s3.put_object(Bucket=dst, Key=job.dest_key(obj.key), Body=b"someone else's")

    assert run_job(job.cfg, console=quiet()) == 1

    rows = ledger_rows(job.cfg)
    for obj in taken:
        assert read(job.dst_s3, dst, job.dest_key(obj.key)) == b"someone else's"
        assert rows[obj.key]["state"] == "failed" and "conflict" in rows[obj.key]["last_error"]
        assert read(job.s3, job.cfg.source.bucket, obj.key) == obj.body
    assert {rows[o.key]["state"] for o in job.objects if o not in taken} == {"done"}
    assert pair.dst.stats()["errors"].get("PreconditionFailed", 0) >= 1
    assert pair.dst.stats()["multipart_uploads"] == 0


def test_kill_during_a_streamed_upload_then_run_again_converges(
    tmp_path: Path, s3fast: Callable[..., S3Fast]
) -> None:
    """``kill -9`` while parts are being sent (each slowed to 1 s) leaves an incomplete
    upload and unrecorded rows; the next run aborts the upload and converges."""
    pair, job = stream_job(
        tmp_path,
        s3fast,
        dst_flags=("-latency", "1s", "-fault-ops", "UploadPart"),
        workers=1,
        concurrency=1,
    )
    proc = start_run(job.config_path)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if pair.dst.stats()["ops"].get("UploadPart", 0) >= 2:
                break
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert pair.dst.stats()["multipart_uploads"] == 1, "no upload was in flight"
    rows = ledger_rows(job.cfg)
    assert any(r["state"] == "pending" for r in rows.values())

    assert run_job(job.cfg, console=quiet()) == 0

    assert pair.dst.stats()["multipart_uploads"] == 0
    assert pair.dst.stats()["ops"].get("AbortMultipartUpload", 0) >= 1
    assert_converged(job)
    assert_carried(job)


def test_kill_after_completion_before_the_record_converges(
    tmp_path: Path, s3fast: Callable[..., S3Fast]
) -> None:
    """The ETag a streamed upload will have is recorded before CompleteMultipartUpload (slowed
    to 2 s); ``kill -9`` after it was sent leaves a destination the ledger has not recorded
    as copied, which the next run knows as this job's (copied again, not a conflict)."""
    pair, job = stream_job(
        tmp_path,
        s3fast,
        dst_flags=("-latency", "2s", "-fault-ops", "CompleteMultipartUpload"),
        workers=1,
    )
    proc = start_run(job.config_path)
    caught = kill_at_completion(proc, lambda: pair.dst.stats()["ops"], job.cfg.ledger)
    assert caught is not None, "no streamed upload reached its completion"
    time.sleep(2.5)  # the server finishes the completion it was sent
    row = ledger_rows(job.cfg)[caught]
    dest = job.dst_s3.head_object(Bucket=job.cfg.destination.bucket, Key=job.dest_key(caught))
    assert row["state"] == "pending" and dest["ETag"].strip('"') == row["dest_etag"]

    assert run_job(job.cfg, console=quiet()) == 0

    assert_converged(job)
    assert_carried(job)
    assert pair.dst.stats()["multipart_uploads"] == 0


MEASURE = textwrap.dedent(
    """
    import json, sys, threading
    from migrator.config import load_config
    from migrator.storage.sides import open_sides
    from migrator.worker import run_worker

    def kib(field):
        status = dict(line.split(":", 1) for line in open("/proc/self/status"))
        return int(status[field].split()[0])

    cfg = load_config(sys.argv[1])
    open_sides(cfg).close()  # clients and models loaded: what any worker holds anyway
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak (VmHWM) starts again from here
    before = kib("VmRSS")
    code = run_worker(cfg, "memory-test:1", threading.Event())
    print(json.dumps({"code": code, "grew_kib": kib("VmHWM") - before}))
    """
)


def test_a_worker_holds_about_concurrency_times_part_size(
    tmp_path: Path, s3fast: Callable[..., S3Fast]
) -> None:
    """One worker process (concurrency 2, 5 MiB parts) streams two 22 MiB objects in single
    PUTs (threshold 24 MiB) and two 26 MiB objects in parts. Its peak RSS (Linux's VmHWM,
    reset before the run) grows by less than concurrency × part size plus a little: no object
    is ever held whole (two at once would be 44 MiB), no part twice."""
    pair = Pair(s3fast(), s3fast())
    src_s3, dst_s3 = s3_client(pair.src.endpoint), s3_client(pair.dst.endpoint)
    job = make_job(
        tmp_path,
        src_s3,
        pair.src.endpoint,
        ledger=f"sqlite:///{tmp_path / 'ledger.db'}",
        app=None,
        count=0,
        workers=1,
        concurrency=2,
        multipart_threshold=24 * MIB,
        part_size=PART,
    )
    data = job.cfg.model_dump(exclude_none=True)
    data["destination"]["endpoint_url"] = pair.dst.endpoint
    write_config(job.config_path, data)
    job.cfg = Config.model_validate(data)
    job.dest_s3 = dst_s3
    dst_s3.create_bucket(Bucket=job.cfg.destination.bucket)
    job.objects = [large_object(i, 22 * MIB - i) for i in range(2)]  # one PUT each
    job.objects += [large_object(2 + i, 26 * MIB + i) for i in range(2)]  # in parts
    for obj in job.objects:
        put(src_s3, job.cfg.source.bucket, obj, tagged=False)
    plan(job.cfg)

    proc = subprocess.run(
        [sys.executable, "-c", MEASURE, str(job.config_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["code"] == 0
    grew_mib = result["grew_kib"] / 1024
    bound = job.cfg.concurrency * job.cfg.part_size / MIB  # 10 MiB
    # Measured 14-19 MiB: the parts' buffers, plus what the threads' malloc arenas and the
    # HTTP layers keep. One object held whole would be 22 MiB, each part held twice 20 MiB.
    assert grew_mib < bound + 12, f"peak RSS grew by {grew_mib:.1f} MiB"
    assert_converged(job, sources_deleted=True)
    ops = pair.dst.stats()["ops"]
    assert ops["PutObject"] == 2 and ops["UploadPart"] == 2 * parts(26 * MIB + 1)
