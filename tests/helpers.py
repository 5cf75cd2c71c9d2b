"""Building jobs for tests and checking them from outside (S3 listings and the app DB)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import yaml

from migrator.config import Config, load_config
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
