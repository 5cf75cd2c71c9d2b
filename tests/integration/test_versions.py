"""Versioned sources (``versions: latest | all``, ``delete_versions``) against the moto server,
with the ledger on SQLite and Postgres.

Each key of the source bucket gets several versions. ``versions: latest`` copies the current
one; ``versions: all`` gives the destination key every version, oldest first, so its version
history reads as the source's. A source delete leaves a delete marker (the versions stay), or
with ``delete_versions`` removes exactly the migrated version ids. A ``kill -9`` anywhere is
resumed without a version copied twice or skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from rich.console import Console

from migrator.supervisor import run_job
from seed.__main__ import seed_app_db
from seed.data import SeedObject
from tests.conftest import REPO, AwsLikeMoto, s3_client
from tests.helpers import Job, app_paths, kms_key, make_job, run_cli, start_run


def quiet() -> Console:
    return Console(stderr=True, quiet=True)


def sqlite_urls(tmp_path: Path) -> dict[str, str]:
    """Ledger and app database in SQLite files (where the backend is not what is tested)."""
    return {"ledger": f"sqlite:///{tmp_path / 'l.db'}", "app": f"sqlite:///{tmp_path / 'a.db'}"}


def enable_versioning(s3: Any, bucket: str) -> None:
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})


def versioned_job(
    tmp_path: Path,
    s3: Any,
    endpoint: str,
    urls: dict[str, str],
    *,
    keys: int = 6,
    each: int = 3,
    dest_versioned: bool = True,
    **settings: Any,
) -> tuple[Job, dict[str, list[bytes]]]:
    """A job whose source keys have ``each`` versions each (the app rows point at the
    keys); returns it with each key's bodies, oldest first."""
    job = make_job(
        tmp_path, s3, endpoint, ledger=urls["ledger"], app=urls["app"], count=0, **settings
    )
    src, dst = job.cfg.source.bucket, job.cfg.destination.bucket
    enable_versioning(s3, src)
    if dest_versioned:
        enable_versioning(s3, dst)
    history: dict[str, list[bytes]] = {}
    for i in range(keys):
        key = f"image/{i:02d}/{i}.png"
        history[key] = [f"version {n} of {key} ".encode() * (n + 1) for n in range(each)]
        for body in history[key]:
            s3.put_object(Bucket=src, Key=key, Body=body, ContentType="image/png")
        job.objects.append(SeedObject(i, key, "image/png", history[key][-1], 100_000 + i))
    seed_app_db(job.cfg, job.objects, replace=True)
    return job, history


def version_bodies(s3: Any, bucket: str, key: str) -> list[bytes]:
    """The bodies of ``key``'s object versions, oldest first (delete markers left out)."""
    listed = s3.list_object_versions(Bucket=bucket, Prefix=key).get("Versions", [])
    ids = [v["VersionId"] for v in listed if v["Key"] == key]  # newest first
    return [
        s3.get_object(Bucket=bucket, Key=key, VersionId=vid)["Body"].read() for vid in reversed(ids)
    ]


def delete_markers(s3: Any, bucket: str, key: str) -> int:
    markers = s3.list_object_versions(Bucket=bucket, Prefix=key).get("DeleteMarkers", [])
    return sum(1 for m in markers if m["Key"] == key)


def current(s3: Any, bucket: str, key: str) -> bytes | None:
    try:
        return bytes(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    except s3.exceptions.NoSuchKey:
        return None


def assert_app_rewritten(job: Job) -> None:
    paths = app_paths(job)[: len(job.objects)]
    assert paths == [job.dest_key(o.key) for o in job.objects]


def test_latest_copies_the_current_version_and_a_delete_leaves_a_marker(
    tmp_path: Path, moto_s3: Any, moto_endpoint: str, db_urls: dict[str, str]
) -> None:
    job, history = versioned_job(tmp_path, moto_s3, moto_endpoint, db_urls)
    assert run_job(job.cfg, console=quiet()) == 0
    src, dst = job.cfg.source.bucket, job.cfg.destination.bucket
    for key, bodies in history.items():
        dkey = job.dest_key(key)
        assert version_bodies(moto_s3, dst, dkey) == [bodies[-1]]  # one version: the current
        assert current(moto_s3, src, key) is None  # deleted ...
        assert delete_markers(moto_s3, src, key) == 1  # ... by a delete marker
        assert version_bodies(moto_s3, src, key) == bodies  # every version kept
    assert_app_rewritten(job)


def test_latest_with_delete_versions_removes_only_the_migrated_version(
    tmp_path: Path, moto_s3: Any, moto_endpoint: str, db_urls: dict[str, str]
) -> None:
    job, history = versioned_job(tmp_path, moto_s3, moto_endpoint, db_urls, delete_versions=True)
    assert run_job(job.cfg, console=quiet()) == 0
    src, dst = job.cfg.source.bucket, job.cfg.destination.bucket
    for key, bodies in history.items():
        assert version_bodies(moto_s3, dst, job.dest_key(key)) == [bodies[-1]]
        assert delete_markers(moto_s3, src, key) == 0
        # The migrated (current) version is gone for good; the older ones were not migrated.
        assert version_bodies(moto_s3, src, key) == bodies[:-1]
    assert_app_rewritten(job)


def test_delete_versions_follows_a_source_changed_after_plan(
    tmp_path: Path, moto_s3: Any, moto_endpoint: str, aws_like_moto: AwsLikeMoto
) -> None:
    """``versions: latest``: a key written again between plan and copy is copied in its new
    version (``CopySourceIfMatch`` fails, the row is re-planned); the version deleted is that
    new one, the one copied — not the planned one, which was never migrated."""
    urls = sqlite_urls(tmp_path)
    job, history = versioned_job(
        tmp_path, moto_s3, moto_endpoint, urls, keys=2, each=2, delete_versions=True
    )
    planned = run_cli("plan", "--config", str(job.config_path))
    assert planned.returncode == 0, planned.stderr
    src, dst = job.cfg.source.bucket, job.cfg.destination.bucket
    key = next(iter(history))
    moto_s3.put_object(Bucket=src, Key=key, Body=b"written after the plan")
    assert run_job(job.cfg, console=quiet()) == 0
    assert version_bodies(moto_s3, dst, job.dest_key(key)) == [b"written after the plan"]
    assert version_bodies(moto_s3, src, key) == history[key]  # only the copied one went
    other = list(history)[1]
    assert version_bodies(moto_s3, src, other) == history[other][:-1]


def test_all_copies_every_version_in_order(
    tmp_path: Path, moto_s3: Any, moto_endpoint: str, db_urls: dict[str, str]
) -> None:
    job, history = versioned_job(tmp_path, moto_s3, moto_endpoint, db_urls, versions="all")
    # A key deleted at the source (its current version a delete marker) is left out.
    src, dst = job.cfg.source.bucket, job.cfg.destination.bucket
    moto_s3.put_object(Bucket=src, Key="image/gone.png", Body=b"old")
    moto_s3.delete_object(Bucket=src, Key="image/gone.png")
    assert run_job(job.cfg, console=quiet()) == 0
    for key, bodies in history.items():
        dkey = job.dest_key(key)
        assert version_bodies(moto_s3, dst, dkey) == bodies
        assert current(moto_s3, dst, dkey) == bodies[-1]
        assert delete_markers(moto_s3, src, key) == 1
        assert version_bodies(moto_s3, src, key) == bodies
    assert version_bodies(moto_s3, dst, "avatar/gone.png") == []
    assert_app_rewritten(job)
    status = run_cli("status", "--config", str(job.config_path), "--json")
    doc = json.loads(status.stdout)
    total = sum(len(b) for b in history.values())
    assert doc["total"] == len(history) and doc["counts"]["done"] == len(history)
    assert doc["versions"]["recorded"] == doc["versions"]["copied"] == total
    assert doc["versions"]["copied_bytes"] == sum(len(x) for b in history.values() for x in b)
    text = run_cli("status", "--config", str(job.config_path))
    assert f"{total} of {total} copied" in text.stdout


def test_all_with_delete_versions_leaves_no_version_behind(
    tmp_path: Path, moto_s3: Any, moto_endpoint: str, db_urls: dict[str, str]
) -> None:
    job, history = versioned_job(
        tmp_path, moto_s3, moto_endpoint, db_urls, versions="all", delete_versions=True
    )
    preview = run_cli("run", "--config", str(job.config_path), "--dry-run")
    assert preview.returncode == 0, preview.stderr
    assert "objects (" in preview.stdout and "each with every version (versions: all)" in (
        preview.stdout
    )
    assert "their migrated versions deleted for good (delete_versions)" in preview.stdout
    assert run_job(job.cfg, console=quiet()) == 0
    src, dst = job.cfg.source.bucket, job.cfg.destination.bucket
    for key, bodies in history.items():
        assert version_bodies(moto_s3, dst, job.dest_key(key)) == bodies
        assert version_bodies(moto_s3, src, key) == []
        assert delete_markers(moto_s3, src, key) == 0
    assert_app_rewritten(job)


def test_all_copies_large_versions_in_parts(
    tmp_path: Path, moto_s3: Any, moto_endpoint: str
) -> None:
    urls = sqlite_urls(tmp_path)
    mib = 1024 * 1024
    job = make_job(
        tmp_path / "big",
        moto_s3,
        moto_endpoint,
        ledger=urls["ledger"],
        app=None,
        count=0,
        versions="all",
        multipart_threshold=5 * mib,
        part_size=5 * mib,
    )
    src, dst = job.cfg.source.bucket, job.cfg.destination.bucket
    enable_versioning(moto_s3, src)
    enable_versioning(moto_s3, dst)
    bodies = [bytes([n]) * (6 * mib + n) for n in range(2)] + [b"small last"]
    for body in bodies:
        moto_s3.put_object(Bucket=src, Key="image/big.bin", Body=body)
    assert run_job(job.cfg, console=quiet()) == 0
    assert version_bodies(moto_s3, dst, "avatar/big.bin") == bodies


def test_a_version_copied_by_a_killed_run_is_not_copied_again(
    tmp_path: Path, moto_s3: Any, moto_endpoint: str
) -> None:
    """The state a ``kill -9`` between a version's copy and its record leaves: the destination
    already holds the copy, the ledger knows nothing of it. The re-run takes that copy as its
    own instead of making a second one."""
    urls = sqlite_urls(tmp_path)
    job, history = versioned_job(tmp_path, moto_s3, moto_endpoint, urls, keys=2, versions="all")
    src, dst = job.cfg.source.bucket, job.cfg.destination.bucket
    key = next(iter(history))
    oldest = moto_s3.list_object_versions(Bucket=src, Prefix=key)["Versions"][-1]["VersionId"]
    moto_s3.copy_object(
        Bucket=dst,
        Key=job.dest_key(key),
        CopySource={"Bucket": src, "Key": key, "VersionId": oldest},
    )
    assert run_job(job.cfg, console=quiet()) == 0
    for k, bodies in history.items():
        assert version_bodies(moto_s3, dst, job.dest_key(k)) == bodies


def test_a_killed_runs_copy_of_a_version_made_of_parts_is_known_by_its_checksum(
    tmp_path: Path, moto_s3: Any, moto_endpoint: str
) -> None:
    """A version uploaded in parts (multipart ETag, CRC32 checksum) below
    ``multipart_threshold`` is copied in one request: its copy's ETag is an MD5, not the
    version's. Left at the destination by a killed run, unrecorded, it is known by its
    checksum (S3 keeps it on the copy) and taken as the copy, not made again or refused."""
    urls = sqlite_urls(tmp_path)
    job, _ = versioned_job(tmp_path, moto_s3, moto_endpoint, urls, keys=0, versions="all")
    src, dst = job.cfg.source.bucket, job.cfg.destination.bucket
    key, part = "image/parts.bin", 5 * 1024 * 1024
    bodies = [b"a" * part + b"b" * 100, b"small second version"]
    upload = moto_s3.create_multipart_upload(Bucket=src, Key=key, ChecksumAlgorithm="CRC32")
    parts = []
    for n, chunk in enumerate((bodies[0][:part], bodies[0][part:]), start=1):
        sent = moto_s3.upload_part(
            Bucket=src,
            Key=key,
            UploadId=upload["UploadId"],
            PartNumber=n,
            Body=chunk,
            ChecksumAlgorithm="CRC32",
        )
        parts.append(
            {"ETag": sent["ETag"], "PartNumber": n, "ChecksumCRC32": sent["ChecksumCRC32"]}
        )
    first = moto_s3.complete_multipart_upload(
        Bucket=src, Key=key, UploadId=upload["UploadId"], MultipartUpload={"Parts": parts}
    )
    assert "-" in first["ETag"]
    moto_s3.put_object(Bucket=src, Key=key, Body=bodies[1])
    moto_s3.copy_object(  # what the killed run did, and did not record
        Bucket=dst,
        Key=job.dest_key(key),
        CopySource={"Bucket": src, "Key": key, "VersionId": first["VersionId"]},
    )
    assert run_job(job.cfg, console=quiet()) == 0
    # moto gives the copy the parts' CRC32 as if of the whole object: read without checking it
    reader = s3_client(moto_endpoint, response_checksum_validation="when_required")
    assert version_bodies(reader, dst, job.dest_key(key)) == bodies


def test_versions_copied_into_sse_kms_are_verified_without_their_etags(
    tmp_path: Path, moto_s3: Any, moto_endpoint: str, aws_like_moto: AwsLikeMoto
) -> None:
    """``sse: aws:kms``: each version's copy gets an ETag that is no MD5 (as on AWS), so it
    is verified by ``HeadObject`` of the new version (size, the ETag S3 answered, checksums
    where both carry one) rather than refused; every version arrives encrypted, in order."""
    job, history = versioned_job(
        tmp_path,
        moto_s3,
        moto_endpoint,
        sqlite_urls(tmp_path),
        keys=2,
        versions="all",
        sse="aws:kms",
        kms_key_id=kms_key(moto_endpoint),
    )
    assert run_job(job.cfg, console=quiet()) == 0
    dst = job.cfg.destination.bucket
    for key, bodies in history.items():
        dkey = job.dest_key(key)
        assert version_bodies(moto_s3, dst, dkey) == bodies
        listed = moto_s3.list_object_versions(Bucket=dst, Prefix=dkey)["Versions"]
        for v, body in zip(reversed(listed), bodies, strict=True):  # listed newest first
            head = moto_s3.head_object(Bucket=dst, Key=dkey, VersionId=v["VersionId"])
            assert head["ServerSideEncryption"] == "aws:kms"
            assert head["ETag"].strip('"') != hashlib.md5(body).hexdigest()


def test_all_refuses_a_foreign_object_at_the_destination(
    tmp_path: Path, moto_s3: Any, moto_endpoint: str
) -> None:
    urls = sqlite_urls(tmp_path)
    job, history = versioned_job(tmp_path, moto_s3, moto_endpoint, urls, keys=2, versions="all")
    src, dst = job.cfg.source.bucket, job.cfg.destination.bucket
    taken, free = list(history)
    moto_s3.put_object(Bucket=dst, Key=job.dest_key(taken), Body=b"someone else's")
    assert run_job(job.cfg, console=quiet()) == 1
    assert version_bodies(moto_s3, dst, job.dest_key(taken)) == [b"someone else's"]
    assert version_bodies(moto_s3, src, taken) == history[taken]  # untouched
    assert current(moto_s3, src, taken) == history[taken][-1]
    assert version_bodies(moto_s3, dst, job.dest_key(free)) == history[free]
    engine = sa.create_engine(urls["ledger"])
    with engine.connect() as conn:
        state, error = conn.execute(
            sa.text("SELECT state, last_error FROM migrator_objects WHERE source_key = :k"),
            {"k": taken},
        ).one()
    engine.dispose()
    assert state == "failed"
    assert error.startswith("conflict: destination key already holds an object")


def test_replan_appends_versions_written_since(
    tmp_path: Path, moto_s3: Any, moto_endpoint: str, db_urls: dict[str, str]
) -> None:
    """Cutover with versions: a key written again after the migration (behind its delete
    marker) is planned again; only its new version is copied, after the others."""
    job, history = versioned_job(tmp_path, moto_s3, moto_endpoint, db_urls, keys=3, versions="all")
    assert run_job(job.cfg, console=quiet()) == 0
    src, dst = job.cfg.source.bucket, job.cfg.destination.bucket
    key = next(iter(history))
    moto_s3.put_object(Bucket=src, Key=key, Body=b"written after the migration")
    seed_app_db(job.cfg, job.objects, replace=True)  # the app points at the source again
    planned = run_cli("plan", "--config", str(job.config_path))
    assert planned.returncode == 0, planned.stderr
    assert "1 changed" in planned.stderr and "1 versions recorded" in planned.stderr
    assert run_job(job.cfg, console=quiet()) == 0
    assert version_bodies(moto_s3, dst, job.dest_key(key)) == [
        *history[key],
        b"written after the migration",
    ]
    for other in list(history)[1:]:
        assert version_bodies(moto_s3, dst, job.dest_key(other)) == history[other]


def test_all_needs_a_versioned_destination(
    tmp_path: Path, moto_s3: Any, moto_endpoint: str
) -> None:
    urls = sqlite_urls(tmp_path)
    job, history = versioned_job(
        tmp_path, moto_s3, moto_endpoint, urls, keys=1, versions="all", dest_versioned=False
    )
    result = run_cli("run", "--config", str(job.config_path), "--quiet")
    assert result.returncode == 2, result.stderr
    assert "versions: all needs versioning enabled on" in result.stderr
    assert "Traceback" not in result.stderr
    check = run_cli("check", "--config", str(job.config_path), "--json")
    assert check.returncode == 2, check.stderr
    [item] = [
        i
        for i in json.loads(check.stdout)["items"]
        if i["check"] == "destination: versioning" and i["status"] == "fail"
    ]
    assert "put-bucket-versioning" in item["detail"]
    key = next(iter(history))
    assert version_bodies(moto_s3, job.cfg.source.bucket, key) == history[key]
    assert moto_s3.list_objects_v2(Bucket=job.cfg.destination.bucket).get("KeyCount") == 0


def test_kill_9_during_a_versions_copy_resumes_without_duplicates(
    tmp_path: Path, moto_s3: Any, moto_endpoint: str
) -> None:
    """``migrator run`` killed with SIGKILL (the whole process group) while versions are being
    copied, then run again: every destination key holds its source's versions exactly once, in
    order, and every source version that was deleted had been copied."""
    urls = sqlite_urls(tmp_path)
    job, history = versioned_job(
        tmp_path,
        moto_s3,
        moto_endpoint,
        urls,
        keys=40,
        each=4,
        versions="all",
        delete_versions=True,
        delete_source="per_chunk",
        chunk_size=4,
        concurrency=2,
    )
    proc = start_run(job.config_path)
    engine = sa.create_engine(urls["ledger"])
    copied = 0
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with engine.connect() as conn:
                    copied = conn.execute(
                        sa.text(
                            "SELECT count(*) FROM migrator_versions "
                            "WHERE dest_version_id IS NOT NULL"
                        )
                    ).scalar_one()
            except sa.exc.OperationalError:
                copied = 0  # the ledger is not created yet
            if copied >= 20:
                break
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        engine.dispose()
    assert 20 <= copied < 160, f"killed after {copied} of 160 versions"
    assert run_job(job.cfg, console=quiet()) == 0
    src, dst = job.cfg.source.bucket, job.cfg.destination.bucket
    for key, bodies in history.items():
        assert version_bodies(moto_s3, dst, job.dest_key(key)) == bodies, key
        assert version_bodies(moto_s3, src, key) == []
    assert_app_rewritten(job)


def test_a_versions_listing_never_splits_a_key_across_pages(
    moto_s3: Any, moto_endpoint: str
) -> None:
    """Pages of two entries: a key's versions and delete markers arrive together, newest
    first, whatever page boundary S3 put between them."""
    from migrator.storage.s3 import list_version_pages
    from tests.conftest import unique

    bucket = unique("versions")
    moto_s3.create_bucket(Bucket=bucket)
    enable_versioning(moto_s3, bucket)
    for key, n in (("a", 3), ("b", 1), ("c", 2)):
        for i in range(n):
            moto_s3.put_object(Bucket=bucket, Key=key, Body=f"{key}{i}".encode())
    moto_s3.delete_object(Bucket=bucket, Key="b")
    pages = list(list_version_pages(moto_s3, bucket, "", page_size=2))
    groups = [g for page in pages for g in page]
    assert [g[0].key for g in groups] == ["a", "b", "c"]
    assert [len(g) for g in groups] == [3, 2, 2]
    for g in groups:
        assert len({v.version_id for v in g}) == len(g)
        assert sum(v.is_latest for v in g) == 1
    a = [v for v in groups[0]]
    assert a[0].is_latest and [v.size for v in a] == [2, 2, 2]
    [marker] = [v for v in groups[1] if v.delete_marker]
    assert marker.is_latest  # b is deleted: its current version is the marker


def test_batch_operations_and_inventories_refuse_jobs_of_versions(
    tmp_path: Path, moto_s3: Any, moto_endpoint: str
) -> None:
    """Both see current objects only: one line, exit 2, no ledger written."""
    urls = sqlite_urls(tmp_path)
    job, _ = versioned_job(
        tmp_path, moto_s3, moto_endpoint, urls, keys=1, versions="all", delete_versions=True
    )
    cfg = str(job.config_path)
    inventory = run_cli("plan", "--config", cfg, "--from-inventory", "s3://inv/manifest.json")
    assert inventory.returncode == 2
    assert "--from-inventory plans current objects only" in inventory.stderr
    manifest = run_cli("export-manifest", "--config", cfg, "--out", str(tmp_path / "m.csv"))
    assert manifest.returncode == 2
    assert "S3 Batch Operations copies current versions only" in manifest.stderr
    for result in (inventory, manifest):
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "l.db").exists() and not (tmp_path / "m.csv").exists()


def test_the_seeder_makes_versions_and_run_moves_them_all(
    tmp_path: Path, moto_s3: Any, moto_endpoint: str
) -> None:
    """``python -m seed --versions 3`` on a ``versions: all`` config: versioning on both
    buckets, three versions per object, the last one the object the app rows name; ``migrator
    run`` then gives every destination key those three versions in order."""
    from migrator.config import load_config
    from seed.__main__ import older_version
    from seed.data import seed_object
    from tests.conftest import unique
    from tests.helpers import write_config

    config = write_config(
        tmp_path / "config.yaml",
        {
            "job": unique("job"),
            "ledger": f"sqlite:///{tmp_path / 'l.db'}",
            "source": {
                "bucket": unique("legacy"),
                "prefix": "image/",
                "endpoint_url": moto_endpoint,
            },
            "destination": {
                "bucket": unique("production"),
                "prefix": "avatar/",
                "endpoint_url": moto_endpoint,
            },
            "app_db": {
                "url": f"sqlite:///{tmp_path / 'a.db'}",
                "table": "avatars",
                "column": "path",
            },
            "workers": 2,
            "versions": "all",
        },
    )
    (tmp_path / "a.db").touch()
    seeded = subprocess.run(
        [
            sys.executable,
            "-m",
            "seed",
            "--config",
            str(config),
            "--objects",
            "12",
            "--size",
            "64",
            "--versions",
            "3",
            "--processes",
            "1",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert seeded.returncode == 0, seeded.stderr
    assert "(3 versions each)" in seeded.stdout
    cfg = load_config(config, env={})
    for bucket in (cfg.source.bucket, cfg.destination.bucket):
        assert moto_s3.get_bucket_versioning(Bucket=bucket)["Status"] == "Enabled"
    ran = run_cli("run", "--config", str(config), "--quiet")
    assert ran.returncode == 0, ran.stderr
    for i in range(12):
        obj = seed_object(i, "image/", 64)
        expected = [older_version(obj, 0).body, older_version(obj, 1).body, obj.body]
        assert len(set(expected)) == 3
        assert (
            version_bodies(moto_s3, cfg.destination.bucket, cfg.key_rule.map(obj.key)) == expected
        )
