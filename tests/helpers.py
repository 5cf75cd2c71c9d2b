"""Building jobs for tests and checking them from outside (S3 listings and the app DB)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import sqlalchemy as sa
import yaml

from migrator.config import Config, load_config
from migrator.ledger.repo import Ledger, open_ledger
from seed.__main__ import app_rows, create_bucket, seed_app_db, upload
from seed.data import SeedObject, seed_object
from tests.conftest import REPO, unique


@dataclass
class Job:
    dir: Path
    config_path: Path
    cfg: Config
    s3: Any
    objects: list[SeedObject] = field(default_factory=list)
    dest_s3: Any = None  # the destination's client when it is another server or account

    @property
    def dst_s3(self) -> Any:
        return self.s3 if self.dest_s3 is None else self.dest_s3

    @property
    def bodies(self) -> dict[str, bytes]:
        return {o.key: o.body for o in self.objects}

    def dest_key(self, key: str) -> str:
        dest = self.cfg.key_rule.map(key)
        assert isinstance(dest, str), f"{key!r} is not selected by the job's key rule"
        return dest


def ledger_rows(cfg: Config, *, upgrade: bool = True) -> dict[str, dict[str, Any]]:
    """The job's ledger rows by source key, read through the ledger's own query."""
    engine = open_ledger(cfg.ledger, upgrade=upgrade)
    try:
        return {r["source_key"]: r for batch in Ledger(engine, cfg.job).iter_rows() for r in batch}
    finally:
        engine.dispose()


def start_run(config: Path) -> subprocess.Popen[bytes]:
    """``migrator run --quiet`` in a process group of its own, so a ``killpg`` reaches the
    supervisor and its workers at once."""
    return subprocess.Popen(
        [sys.executable, "-m", "migrator", "run", "--quiet", "--config", str(config)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def kill_at_completion(
    proc: subprocess.Popen[bytes], ops: Callable[[], dict[str, int]], ledger: str
) -> str | None:
    """Wait until a row's expected ETag is recorded before its multipart completion *and* a
    ``CompleteMultipartUpload`` was sent (``ops``: the server's request counts), then
    ``kill -9`` the run's process group; returns that row's source key (None if the run
    ended first or a minute passed). Waiting for both keeps a busy machine from letting the
    kill land in between, when nothing completes."""
    engine = sa.create_engine(ledger)
    caught: str | None = None
    try:
        deadline = time.monotonic() + 60
        sent = 0
        while (caught is None or not sent) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
            sent = ops().get("CompleteMultipartUpload", 0)
            # The ledger may not exist yet, or be busy.
            with contextlib.suppress(sa.exc.OperationalError), engine.connect() as conn:
                caught = conn.execute(
                    sa.text(
                        "SELECT source_key FROM migrator_objects "
                        "WHERE state = 'pending' AND dest_etag IS NOT NULL"
                    )
                ).scalar()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        engine.dispose()
    return caught


def kms_key(endpoint: str) -> str:
    """A new KMS key on the moto server (which serves KMS on the S3 endpoint)."""
    kms = boto3.client("kms", endpoint_url=endpoint, region_name="us-east-1")
    return str(kms.create_key()["KeyMetadata"]["KeyId"])


def write_config(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def make_job(
    tmp_path: Path,
    s3: Any,
    endpoint: str,
    *,
    ledger: str,
    app: str | None,
    count: int = 20,
    size: int = 256,
    keys: Sequence[str] | None = None,
    key_rule: dict[str, Any] | None = None,
    **settings: Any,
) -> Job:
    """Buckets with ``count`` seeded objects (or the given keys) and the app table;
    ``key_rule`` is the config's ``keys:`` section."""
    data: dict[str, Any] = {
        "job": unique("job"),
        "ledger": ledger,
        "source": {"bucket": unique("legacy"), "prefix": "image/", "endpoint_url": endpoint},
        "destination": {
            "bucket": unique("production"),
            "prefix": "avatar/",
            "endpoint_url": endpoint,
        },
        "workers": 2,
        "concurrency": 8,
        "chunk_size": 10,
        "lease_seconds": 10,
    }
    if app is not None:
        data["app_db"] = {"url": app, "table": "avatars", "column": "path"}
    if key_rule is not None:
        data["keys"] = key_rule
    data.update(settings)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = write_config(tmp_path / "config.yaml", data)
    cfg = load_config(path, env={})
    if keys is None:
        objects = [seed_object(i, cfg.source.prefix, size) for i in range(count)]
    else:
        objects = [
            SeedObject(i, k, "image/png", f"body {i} of {k}".encode() * (i % 3), 100_000 + i)
            for i, k in enumerate(keys)
        ]
    create_bucket(s3, cfg.source)
    create_bucket(s3, cfg.destination)
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda o: upload(s3, cfg.source.bucket, o), objects))
    if cfg.app_db is not None:
        seed_app_db(cfg, objects, replace=True)
    return Job(tmp_path, path, cfg, s3, objects)


def run_cli(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "migrator", *args],
        cwd=cwd or REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def list_etags(s3: Any, bucket: str, prefix: str = "") -> dict[str, str]:
    etags: dict[str, str] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        etags.update((o["Key"], o["ETag"].strip('"')) for o in page.get("Contents", ()))
    return etags


def list_keys(s3: Any, bucket: str, prefix: str = "") -> set[str]:
    return set(list_etags(s3, bucket, prefix))


def read(s3: Any, bucket: str, key: str) -> bytes:
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read()


def app_paths(job: Job) -> list[str | None]:
    assert job.cfg.app_db is not None
    engine = sa.create_engine(job.cfg.app_db.url)
    try:
        with engine.connect() as conn:
            return list(
                conn.execute(sa.text("SELECT path FROM avatars ORDER BY user_id")).scalars()
            )
    finally:
        engine.dispose()


def expected_untouched(job: Job) -> list[str | None]:
    """The app rows the migration must leave alone, in user_id order."""
    rows = app_rows(job.objects, "path")[len(job.objects) :]
    return [r["path"] for r in sorted(rows, key=lambda r: r["user_id"])]


def invariant_violations(job: Job) -> list[str]:
    """I1 and 'nothing lost', judged from S3 and the app DB only (never the ledger)."""
    src, dst = job.cfg.source, job.cfg.destination
    sources = list_keys(job.s3, src.bucket, src.prefix)
    dests = list_etags(job.dst_s3, dst.bucket, dst.prefix)
    paths = app_paths(job) if job.cfg.app_db is not None else []
    holding = set(p for p in paths if p is not None)
    problems = []
    for obj in job.objects:
        dkey = job.dest_key(obj.key)
        if obj.key in sources:
            continue
        if dkey not in dests:
            problems.append(f"LOST: {obj.key!r} gone from source and absent at destination")
        elif dests[dkey] != hashlib.md5(obj.body).hexdigest():  # single-part: ETag = MD5
            problems.append(f"LOST: {obj.key!r} gone from source, destination bytes differ")
        if obj.key in holding:
            problems.append(f"EARLY DELETE: {obj.key!r} deleted while an app row still holds it")
    return problems


def assert_converged(job: Job, *, sources_deleted: bool = True) -> None:
    src, dst = job.cfg.source, job.cfg.destination
    sources = list_keys(job.s3, src.bucket, src.prefix)
    dests = list_keys(job.dst_s3, dst.bucket, dst.prefix)
    for obj in job.objects:
        dkey = job.dest_key(obj.key)
        assert dkey in dests, f"{dkey!r} missing at destination"
        assert read(job.dst_s3, dst.bucket, dkey) == obj.body, f"{dkey!r} has other bytes"
    if sources_deleted:
        assert sources == set(), f"{len(sources)} sources left behind"
    else:
        assert sources == {o.key for o in job.objects}
    if job.cfg.app_db is not None:
        paths = app_paths(job)
        migrated = paths[: len(job.objects)]
        assert migrated == [job.dest_key(o.key) for o in job.objects]
        assert paths[len(job.objects) :] == expected_untouched(job)


def sqlite_job(tmp_path: Path, s3: Any, endpoint: str, *, with_app: bool, **kw: Any) -> Job:
    """``make_job`` with the ledger and (if wanted) the app database in SQLite files."""
    app = f"sqlite:///{tmp_path / 'app.db'}" if with_app else None
    return make_job(
        tmp_path, s3, endpoint, ledger=f"sqlite:///{tmp_path / 'ledger.db'}", app=app, **kw
    )


def deny_deletes(s3: Any, bucket: str, keys: set[str]) -> None:
    """A bucket policy under which DeleteObjects refuses these keys (AccessDenied per key)."""
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Deny",
                "Principal": "*",
                "Action": "s3:DeleteObject",
                "Resource": [f"arn:aws:s3:::{bucket}/{k}" for k in sorted(keys)],
            }
        ],
    }
    s3.put_bucket_policy(Bucket=bucket, Policy=json.dumps(policy))


# -- migrator relocate ------------------------------------------------------------------------

RELOCATE_POLICY = {
    "Version": "2012-10-17",
    "Statement": [
        {
            "Sid": "ReadAvatars",
            "Effect": "Allow",
            "Principal": "*",
            "Action": "s3:GetObject",
            "Resource": "arn:aws:s3:::{bucket}/public/*",
        }
    ],
}
# The bucket configuration a relocation must carry over, as boto3's put_* calls take it.
RELOCATE_SETTINGS: dict[str, Any] = {
    "tags": [{"Key": "team", "Value": "avatars"}, {"Key": "cost-center", "Value": "42"}],
    "cors": [{"AllowedMethods": ["GET"], "AllowedOrigins": ["https://example.com"]}],
    "lifecycle": [
        {"ID": "tmp", "Status": "Enabled", "Filter": {"Prefix": "tmp/"}, "Expiration": {"Days": 7}}
    ],
    "encryption": {"Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]},
    "public_access_block": {
        "BlockPublicAcls": True,
        "IgnorePublicAcls": True,
        "BlockPublicPolicy": False,
        "RestrictPublicBuckets": False,
    },
    "ownership_controls": {"Rules": [{"ObjectOwnership": "BucketOwnerPreferred"}]},
    "website": {"IndexDocument": {"Suffix": "index.html"}},
}


@dataclass
class RelocateJob:
    """A bucket in us-east-1 with objects of every attribute and a full configuration, and
    the config of its relocation."""

    dir: Path
    config_path: Path
    s3: Any
    bucket: str
    objects: dict[str, bytes]
    ledger_path: Path

    def cfg(self) -> Config:
        return load_config(self.config_path, env={}, relocate=True)


def relocate_job(
    tmp_path: Path,
    s3: Any,
    endpoint: str,
    *,
    count: int = 12,
    versioned: bool = False,
    configure: bool = True,
    **settings: Any,
) -> RelocateJob:
    bucket = unique("legacy")
    s3.create_bucket(Bucket=bucket)
    if versioned:
        s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    if configure:
        configure_bucket(s3, bucket)
    objects = {}
    for i in range(count):
        key = f"public/{i:03d}.png" if i % 2 else f"private/{i:03d} ä+.bin"
        body = f"object {i} of {bucket}".encode() * (i + 1)
        extra: dict[str, Any] = {
            "ContentType": "image/png" if i % 2 else "application/octet-stream",
            "Metadata": {"owner": f"user-{i}", "i": str(i)},
        }
        if i % 3 == 0:
            extra.update(CacheControl="max-age=86400", ContentDisposition=f"inline; n={i}")
        if i % 4 == 0:
            extra["Tagging"] = f"kind=avatar&n={i}"
        if i % 5 == 0:
            extra["StorageClass"] = "STANDARD_IA"
        s3.put_object(Bucket=bucket, Key=key, Body=body, **extra)
        objects[key] = body
    ledger = tmp_path / "ledger.db"
    data: dict[str, Any] = {
        "job": unique("move"),
        "ledger": f"sqlite:///{ledger}",
        "source": {"bucket": bucket, "endpoint_url": endpoint},
        "destination": {"bucket": bucket, "endpoint_url": endpoint},
        "workers": 2,
        "concurrency": 4,
        "chunk_size": 5,
        "lease_seconds": 10,
    }
    data.update(settings)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = write_config(tmp_path / "relocate.yaml", data)
    return RelocateJob(tmp_path, path, s3, bucket, objects, ledger)


def configure_bucket(s3: Any, bucket: str) -> None:
    """Give the bucket every setting of RELOCATE_SETTINGS and a policy."""
    s = RELOCATE_SETTINGS
    policy = json.dumps(RELOCATE_POLICY).replace("{bucket}", bucket)
    s3.put_bucket_tagging(Bucket=bucket, Tagging={"TagSet": s["tags"]})
    s3.put_bucket_cors(Bucket=bucket, CORSConfiguration={"CORSRules": s["cors"]})
    s3.put_bucket_lifecycle_configuration(
        Bucket=bucket, LifecycleConfiguration={"Rules": s["lifecycle"]}
    )
    s3.put_bucket_encryption(Bucket=bucket, ServerSideEncryptionConfiguration=s["encryption"])
    s3.put_public_access_block(
        Bucket=bucket, PublicAccessBlockConfiguration=s["public_access_block"]
    )
    s3.put_bucket_ownership_controls(Bucket=bucket, OwnershipControls=s["ownership_controls"])
    s3.put_bucket_website(Bucket=bucket, WebsiteConfiguration=s["website"])
    s3.put_bucket_policy(Bucket=bucket, Policy=policy)


def bucket_settings(s3: Any, bucket: str) -> dict[str, Any]:
    """What the bucket's configuration reads back as (None where a setting is not set)."""
    reads = {
        "versioning": lambda: s3.get_bucket_versioning(Bucket=bucket).get("Status"),
        "tags": lambda: sorted(
            s3.get_bucket_tagging(Bucket=bucket)["TagSet"], key=lambda t: t["Key"]
        ),
        "cors": lambda: s3.get_bucket_cors(Bucket=bucket)["CORSRules"],
        "lifecycle": lambda: s3.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"],
        "encryption": lambda: s3.get_bucket_encryption(Bucket=bucket)[
            "ServerSideEncryptionConfiguration"
        ],
        "public_access_block": lambda: s3.get_public_access_block(Bucket=bucket)[
            "PublicAccessBlockConfiguration"
        ],
        "ownership_controls": lambda: s3.get_bucket_ownership_controls(Bucket=bucket)[
            "OwnershipControls"
        ],
        "website": lambda: s3.get_bucket_website(Bucket=bucket).get("IndexDocument"),
        "policy": lambda: json.loads(s3.get_bucket_policy(Bucket=bucket)["Policy"]),
    }
    found: dict[str, Any] = {}
    for name, read_setting in reads.items():
        try:
            found[name] = read_setting()
        except s3.exceptions.ClientError:
            found[name] = None
    return found


def object_state(s3: Any, bucket: str, key: str) -> dict[str, Any]:
    """An object's bytes and every attribute a relocation keeps."""
    got = s3.get_object(Bucket=bucket, Key=key)
    tags = s3.get_object_tagging(Bucket=bucket, Key=key)["TagSet"]
    return {
        "body": got["Body"].read(),
        "content_type": got.get("ContentType"),
        "cache_control": got.get("CacheControl"),
        "content_disposition": got.get("ContentDisposition"),
        "metadata": got.get("Metadata"),
        "storage_class": got.get("StorageClass", "STANDARD"),
        "tags": sorted((t["Key"], t["Value"]) for t in tags),
    }


def bucket_names(s3: Any) -> set[str]:
    return {b["Name"] for b in s3.list_buckets()["Buckets"]}


def region(s3: Any, bucket: str) -> str:
    return s3.get_bucket_location(Bucket=bucket)["LocationConstraint"] or "us-east-1"


def relocation_row(ledger_path: Path) -> dict[str, Any] | None:
    """The relocation's row, read behind the API (the test watches the phases)."""
    import sqlite3

    if not ledger_path.exists():
        return None
    conn = sqlite3.connect(f"file:{ledger_path}?mode=ro", uri=True, timeout=5)
    try:
        conn.row_factory = sqlite3.Row
        row = conn.execute("SELECT * FROM migrator_relocations").fetchone()
    except sqlite3.OperationalError:
        return None
    finally:
        conn.close()
    return dict(row) if row is not None else None


def lost_objects(job: RelocateJob, before: dict[str, dict[str, Any]], temp: str) -> list[str]:
    """'Nothing lost' for a relocation: every object of the bucket, with its bytes and
    attributes, is in the bucket (wherever it is now) or in the temporary bucket."""
    problems = []
    buckets = bucket_names(job.s3)
    for key, state in before.items():
        found = []
        for bucket in (job.bucket, temp):
            if bucket not in buckets:
                continue
            try:
                found.append(object_state(job.s3, bucket, key))
            except job.s3.exceptions.ClientError:
                continue
        if state not in found:
            problems.append(f"LOST: {key!r} is in neither s3://{job.bucket} nor s3://{temp}")
    return problems
