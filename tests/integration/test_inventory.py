"""``migrator plan --from-inventory`` against realistic S3 Inventory reports on the moto server:
a manifest.json and gzipped CSV (URL-encoded keys) or Parquet data files, written the way S3
writes them, from a real listing of the source bucket. The plan from the report must equal the
plan from ListObjectsV2, row for row, and a run afterwards must migrate it."""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa
import yaml

from migrator.ledger.tables import objects
from tests.conftest import unique
from tests.helpers import assert_converged, make_job, run_cli, write_config

KEYS = [
    "image/plain.png",
    "image/with space.png",
    "image/a+b.png",  # a '+' is %2B in the CSV, a space is '+'
    "image/100%/done.png",
    "image/ünïcødé/日本.png",
    "image/deep/er/x.png",
]
OUTSIDE = ["other/z.png", "imagex/y.png"]  # in the report, not under the job's prefix
CSV_SCHEMA = "Bucket, Key, Size, LastModifiedDate, ETag, IsMultipartUploaded"
VERSIONED_SCHEMA = (
    "Bucket, Key, VersionId, IsLatest, IsDeleteMarker, Size, LastModifiedDate, ETag, "
    "IsMultipartUploaded"
)
PARQUET_SCHEMA = (
    "message s3.inventory { required binary bucket (UTF8); required binary key (UTF8); "
    "optional binary version_id (UTF8); optional boolean is_latest; "
    "optional boolean is_delete_marker; optional int64 size; "
    "optional int64 last_modified_date (TIMESTAMP_MILLIS); optional binary e_tag (UTF8); "
    "optional boolean is_multipart_uploaded;}"
)


def listing(s3: Any, bucket: str) -> list[dict[str, Any]]:
    """The whole bucket, as an inventory would see it."""
    out: list[dict[str, Any]] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        out.extend(page.get("Contents", ()))
    return out


def csv_data(bucket: str, rows: list[dict[str, Any]], versioned: bool) -> bytes:
    """A gzipped inventory CSV: no header, every field quoted, keys form-URL-encoded, the
    date as S3 writes it (ISO 8601, milliseconds, 'Z')."""
    text = io.StringIO()
    writer = csv.writer(text, quoting=csv.QUOTE_ALL, lineterminator="\n")
    for r in rows:
        mtime = r["LastModified"].astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        size = "" if r.get("marker") else str(r["Size"])
        etag = "" if r.get("marker") else r["ETag"].strip('"')
        head = [bucket, quote_plus(r["Key"], safe="/")]
        if versioned:
            head += [r.get("version", "v1"), str(r.get("latest", True)).lower()]
            head += [str(bool(r.get("marker"))).lower()]
        writer.writerow([*head, size, mtime, etag, "false"])
    return gzip.compress(text.getvalue().encode())


def parquet_data(bucket: str, rows: list[dict[str, Any]]) -> bytes:
    table = pa.table(
        {
            "bucket": pa.array([bucket] * len(rows), pa.string()),
            "key": pa.array([r["Key"] for r in rows], pa.string()),
            "version_id": pa.array([r.get("version") for r in rows], pa.string()),
            "is_latest": pa.array([r.get("latest", True) for r in rows], pa.bool_()),
            "is_delete_marker": pa.array([bool(r.get("marker")) for r in rows], pa.bool_()),
            "size": pa.array([None if r.get("marker") else r["Size"] for r in rows], pa.int64()),
            "last_modified_date": pa.array(
                [r["LastModified"] for r in rows], pa.timestamp("ms", tz="UTC")
            ),
            "e_tag": pa.array(
                [None if r.get("marker") else r["ETag"].strip('"') for r in rows], pa.string()
            ),
            "is_multipart_uploaded": pa.array([False] * len(rows), pa.bool_()),
        }
    )
    out = io.BytesIO()
    pq.write_table(table, out, compression="snappy")
    return out.getvalue()


def write_inventory(
    s3: Any,
    source_bucket: str,
    rows: list[dict[str, Any]],
    fmt: str = "CSV",
    *,
    versioned: bool = False,
    files: int = 2,
    created: datetime | None = None,
    manifest_source: str | None = None,
) -> tuple[str, dict[str, Any]]:
    """Write a report the way S3 lays it out in the inventory's destination bucket; returns
    the manifest's URL and the manifest."""
    inv = unique("inventory")
    s3.create_bucket(Bucket=inv)
    created = created or datetime.now(UTC)
    base = f"inv/{source_bucket}/daily"
    entries = []
    for n in range(files):
        part = rows[n::files]
        if fmt == "Parquet":
            body, ext = parquet_data(source_bucket, part), "parquet"
        else:
            body, ext = csv_data(source_bucket, part, versioned), "csv.gz"
        key = f"{base}/data/{n:04d}-3f2a9c1e.{ext}"
        s3.put_object(Bucket=inv, Key=key, Body=body)
        entries.append(
            {"key": key, "size": len(body), "MD5checksum": hashlib.md5(body).hexdigest()}
        )
    manifest = {
        "sourceBucket": manifest_source or source_bucket,
        "destinationBucket": f"arn:aws:s3:::{inv}",
        "version": "2016-11-30",
        "creationTimestamp": str(int(created.timestamp() * 1000)),
        "fileFormat": fmt,
        "fileSchema": {"CSV": VERSIONED_SCHEMA if versioned else CSV_SCHEMA}.get(
            fmt, PARQUET_SCHEMA
        ),
        "files": entries,
    }
    stamp = created.strftime("%Y-%m-%dT%H-%MZ")
    key = f"{base}/{stamp}/manifest.json"
    s3.put_object(Bucket=inv, Key=key, Body=json.dumps(manifest).encode())
    return f"s3://{inv}/{key}", manifest


def ledger_rows(url: str) -> list[tuple[Any, ...]]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            cols = [objects.c[c] for c in ("source_key", "dest_key", "size", "etag", "state")]
            cols.append(objects.c.last_modified)
            return sorted(tuple(r) for r in conn.execute(sa.select(*cols)))  # not by collation
    finally:
        engine.dispose()


def second_ledger(job: Any, url: str) -> Path:
    """The job's config with another ledger: the same job planned a second way."""
    data = yaml.safe_load(job.config_path.read_text())
    data["ledger"] = url
    return write_config(job.dir / "listed.yaml", data)


@pytest.mark.parametrize("fmt", ["CSV", "Parquet"])
def test_inventory_plan_equals_listing_plan_and_runs(
    tmp_path: Path,
    moto_s3: Any,
    moto_endpoint: str,
    fmt: str,
    db_urls: dict[str, str],
    request: pytest.FixtureRequest,
) -> None:
    job = make_job(
        tmp_path, moto_s3, moto_endpoint, ledger=db_urls["ledger"], app=db_urls["app"], keys=KEYS
    )
    if job.cfg.ledger.startswith("sqlite"):
        listed_url = f"sqlite:///{tmp_path / 'listed.db'}"
    else:
        listed_url = request.getfixturevalue("pg_database")("listed")
    src = job.cfg.source.bucket
    for key in OUTSIDE:
        moto_s3.put_object(Bucket=src, Key=key, Body=b"not the job's")
    url, _ = write_inventory(moto_s3, src, listing(moto_s3, src), fmt, files=3)

    listed_config = second_ledger(job, listed_url)
    listed = run_cli("plan", "--config", str(listed_config))
    assert listed.returncode == 0, listed.stderr
    planned = run_cli("plan", "--config", str(job.config_path), "--from-inventory", url)
    assert planned.returncode == 0, planned.stderr
    assert f"({fmt}, 3 data files)" in planned.stderr
    assert f"planned {job.cfg.job}: {len(KEYS)} listed, {len(KEYS)} new" in planned.stderr

    rows = ledger_rows(job.cfg.ledger)
    assert [r[0] for r in rows] == sorted(KEYS)  # decoded; nothing outside the prefix
    assert rows == ledger_rows(listed_url)

    # Planning from the same report again changes nothing (the listing's re-plan semantics).
    again = run_cli("plan", "--config", str(job.config_path), "--from-inventory", url)
    assert f"0 new, 0 changed, {len(KEYS)} unchanged" in again.stderr, again.stderr

    result = run_cli("run", "--config", str(job.config_path), "--quiet")
    assert result.returncode == 0, result.stderr
    assert_converged(job)
    assert {o["Key"] for o in listing(moto_s3, src)} == set(OUTSIDE)


def test_versioned_inventory_plans_only_current_objects(
    tmp_path: Path, moto_s3: Any, moto_endpoint: str
) -> None:
    job = make_job(
        tmp_path,
        moto_s3,
        moto_endpoint,
        ledger=f"sqlite:///{tmp_path / 'ledger.db'}",
        app=None,
        keys=KEYS[:3],
    )
    src = job.cfg.source.bucket
    rows = listing(moto_s3, src)
    old = rows[0]["LastModified"] - timedelta(days=3)
    rows += [
        # an older version of a current object, with another size and ETag
        {**rows[0], "version": "v0", "latest": False, "Size": 1, "ETag": '"00"',
         "LastModified": old},
        # a deleted object: its delete marker is the latest version, its data an old one
        {"Key": "image/deleted.png", "version": "v2", "marker": True, "LastModified": old},
        {"Key": "image/deleted.png", "version": "v1", "latest": False, "Size": 5,
         "ETag": '"abc"', "LastModified": old},
    ]  # fmt: skip
    for fmt in ("CSV", "Parquet"):
        url, _ = write_inventory(moto_s3, src, rows, fmt, versioned=True)
        planned = run_cli("plan", "--config", str(job.config_path), "--from-inventory", url)
        assert planned.returncode == 0, planned.stderr
        got = ledger_rows(job.cfg.ledger)
        assert [r[0] for r in got] == sorted(KEYS[:3])
        current = {o["Key"]: (o["Size"], o["ETag"].strip('"')) for o in listing(moto_s3, src)}
        assert {r[0]: (r[2], r[3]) for r in got} == current


def _one_line_error(result: Any, *expected: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and result.stderr.strip().endswith(errors[0]), result.stderr
    assert "Traceback" not in result.stderr
    for text in expected:
        assert text in errors[0], errors[0]


def test_bad_reports_are_refused_with_one_line(
    tmp_path: Path, moto_s3: Any, moto_endpoint: str
) -> None:
    ledger_file = tmp_path / "ledger.db"
    job = make_job(
        tmp_path, moto_s3, moto_endpoint, ledger=f"sqlite:///{ledger_file}", app=None, keys=KEYS
    )
    src, cfg_path = job.cfg.source.bucket, str(job.config_path)
    rows = listing(moto_s3, src)

    def plan(url: str) -> Any:
        return run_cli("plan", "--config", cfg_path, "--from-inventory", url)

    url, _ = write_inventory(moto_s3, src, rows, manifest_source="someone-elses-bucket")
    _one_line_error(plan(url), "inventory of bucket 'someone-elses-bucket'", repr(src))

    url, manifest = write_inventory(moto_s3, src, rows)
    orc = {**manifest, "fileFormat": "ORC", "fileSchema": "struct<bucket:string,key:string>"}
    bucket, key = url[len("s3://") :].split("/", 1)
    moto_s3.put_object(Bucket=bucket, Key=key, Body=json.dumps(orc).encode())
    _one_line_error(plan(url), "ORC inventories are not supported", "CSV or Parquet")

    no_etag = {**manifest, "fileSchema": "Bucket, Key, Size"}
    moto_s3.put_object(Bucket=bucket, Key=key, Body=json.dumps(no_etag).encode())
    _one_line_error(plan(url), "no ETag field", "optional fields")

    moto_s3.put_object(Bucket=bucket, Key=key, Body=b"<html>not json</html>")
    _one_line_error(plan(url), "is not an S3 Inventory manifest")

    _one_line_error(plan(f"s3://{bucket}/nowhere/manifest.json"), "not found")
    _one_line_error(plan(f"s3://{unique('nobucket')}/m/manifest.json"), "not found")
    _one_line_error(plan("/local/manifest.json"), "s3://bucket/key")
    assert not ledger_file.exists()  # a bad manifest is refused before the ledger is created

    # A data file replaced after the report was written: refused before any row of it lands.
    url, manifest = write_inventory(moto_s3, src, rows, files=1)
    inv_bucket = url[len("s3://") :].split("/", 1)[0]
    replaced = csv_data(src, rows[:1], versioned=False)
    moto_s3.put_object(Bucket=inv_bucket, Key=manifest["files"][0]["key"], Body=replaced)
    _one_line_error(plan(url), "has MD5", "the manifest says")
    assert ledger_rows(job.cfg.ledger) == []

    # A data file that is not what the manifest says it is (its MD5 matching).
    garbage = b"PK\x03\x04 not gzip"
    files = [{**manifest["files"][0], "MD5checksum": hashlib.md5(garbage).hexdigest()}]
    moto_s3.put_object(Bucket=inv_bucket, Key=files[0]["key"], Body=garbage)
    manifest_key = url[len("s3://") :].split("/", 1)[1]
    damaged = json.dumps({**manifest, "files": files}).encode()
    moto_s3.put_object(Bucket=inv_bucket, Key=manifest_key, Body=damaged)
    _one_line_error(plan(url), "is not a valid CSV inventory file")
    assert ledger_rows(job.cfg.ledger) == []
    status = run_cli("status", "--config", cfg_path, "--json")
    assert json.loads(status.stdout)["total"] == 0
