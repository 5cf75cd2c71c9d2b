"""Plan from an S3 Inventory report instead of listing the source.

A bucket of hundreds of millions of objects takes hours of ``ListObjectsV2`` (1,000 keys a
request, one request after the other). S3 Inventory writes the same facts daily or weekly to a
destination bucket: a ``manifest.json`` naming the data files, and the data files themselves.
Reading those is a few large GETs. The formats, as the Amazon S3 User Guide ("Amazon S3
Inventory", "Inventory list location", "Inventory manifest") describes them:

- ``manifest.json``: ``sourceBucket``, ``destinationBucket`` (an ARN), ``version``,
  ``creationTimestamp`` (milliseconds since the epoch, as a string: when the report began
  scanning the bucket), ``fileFormat`` (``CSV`` | ``ORC`` | ``Parquet``), ``fileSchema`` and
  ``files`` (``key``, ``size``, ``MD5checksum``), the data files' keys in the bucket that
  holds the manifest.
- CSV: gzipped, no header row; ``fileSchema`` names the columns ("Bucket, Key, Size, …").
  The key is URL-encoded ("must be decoded before you can use it"), form-style: a space is
  ``+`` and a ``+`` is ``%2B``, so it is decoded with ``unquote_plus``.
- Parquet (Snappy): columns ``bucket``, ``key`` (not encoded), ``version_id``, ``is_latest``,
  ``is_delete_marker``, ``size``, ``last_modified_date`` (TIMESTAMP_MILLIS), ``e_tag``, …
- An inventory of all versions adds VersionId, IsLatest and IsDeleteMarker; only latest
  versions that are not delete markers are planned (what ``ListObjectsV2`` would return).
- ORC is not read (no ORC reader is a dependency here).

Each data file is downloaded to a temporary file (its MD5 checked against the manifest before
any of its rows reach the ledger), then read in batches: memory stays constant, the disk holds
one data file at a time.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, BinaryIO
from urllib.parse import unquote_plus

from migrator.errors import ConfigError, StorageError
from migrator.storage.common import (
    ErrorKind,
    ListedObject,
    S3OperationError,
    listed_class,
    strip_etag,
)

if TYPE_CHECKING:
    from migrator.config import Config

PAGE_SIZE = 1000  # the same page size a listing has: upsert_page's batch
MANIFEST_MAX_BYTES = 64 << 20  # a manifest names files; a larger one is not a manifest
SUPPORTED = ("CSV", "Parquet")
# What plan needs from each row: the key, and the size and ETag that copy and verify check.
CSV_REQUIRED = ("Key", "Size", "ETag")
PARQUET_REQUIRED = ("key", "size", "e_tag")
_PARQUET_FIELD = re.compile(r"\b(?:required|optional|repeated)\s+\w+\s+(\w+)")


@dataclass(frozen=True)
class DataFile:
    key: str
    size: int
    md5: str | None


@dataclass(frozen=True)
class Manifest:
    """A parsed ``manifest.json``; ``bucket`` is where it and its data files are."""

    bucket: str
    key: str
    source_bucket: str
    created: datetime
    file_format: str
    fields: tuple[str, ...]  # CSV column names, or the Parquet schema's field names
    files: tuple[DataFile, ...]

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/path/manifest.json`` as (bucket, key)."""
    if not url.startswith("s3://"):
        raise ConfigError(f"--from-inventory {url}: give the manifest as s3://bucket/key")
    bucket, _, key = url[len("s3://") :].partition("/")
    if not bucket or not key:
        raise ConfigError(f"--from-inventory {url}: give the manifest as s3://bucket/key")
    return bucket, key


def parse_manifest(raw: bytes, bucket: str, key: str) -> Manifest:
    """Validate a manifest's JSON; anything missing or malformed is a one-line ConfigError."""
    where = f"s3://{bucket}/{key}"
    try:
        doc = json.loads(raw)
        fmt = str(doc["fileFormat"])
        created = datetime.fromtimestamp(int(doc["creationTimestamp"]) / 1000, UTC)
        schema = str(doc["fileSchema"])
        files = tuple(
            DataFile(str(f["key"]), int(f["size"]), f.get("MD5checksum")) for f in doc["files"]
        )
        source_bucket = str(doc["sourceBucket"])
    except (ValueError, KeyError, TypeError) as exc:
        reason = f"no {exc}" if isinstance(exc, KeyError) else str(exc).splitlines()[0]
        raise ConfigError(f"{where} is not an S3 Inventory manifest: {reason}") from None
    if fmt == "ORC":
        raise ConfigError(
            f"{where}: ORC inventories are not supported; choose CSV or Parquet as the output "
            "format in the inventory configuration"
        )
    if fmt not in SUPPORTED:
        raise ConfigError(f"{where}: unknown inventory fileFormat {fmt!r}; use CSV or Parquet")
    if fmt == "CSV":
        fields = tuple(f.strip() for f in schema.split(","))
        required = CSV_REQUIRED
    else:
        fields = tuple(_PARQUET_FIELD.findall(schema))
        required = PARQUET_REQUIRED
    missing = [f for f in required if f not in fields]
    if missing:
        raise ConfigError(
            f"{where}: the inventory has no {', '.join(missing)} field; add Size, "
            "LastModifiedDate and ETag to the inventory configuration's optional fields"
        )
    return Manifest(bucket, key, source_bucket, created, fmt, fields, files)


def check_source(manifest: Manifest, cfg: Config) -> None:
    """The report must be of the job's source bucket: another bucket's keys would plan
    copies of objects that are not there."""
    if manifest.source_bucket != cfg.source.bucket:
        raise ConfigError(
            f"{manifest.url} is an inventory of bucket {manifest.source_bucket!r}, but the "
            f"job's source is {cfg.source.bucket!r}"
        )


def load_manifest(client: Any, url: str, cfg: Config) -> Manifest:
    """Read and check the manifest before anything is written (a missing or wrong one is a
    usage error: exit 2)."""
    from migrator.storage import s3

    bucket, key = parse_s3_url(url)
    try:
        raw = s3.read_object(client, bucket, key, MANIFEST_MAX_BYTES)
    except S3OperationError as exc:
        if exc.kind is ErrorKind.SOURCE_MISSING or exc.code == "NoSuchBucket":
            raise ConfigError(f"inventory manifest {url} not found ({exc.code})") from None
        raise StorageError(f"reading inventory manifest {url} failed: {exc}") from None
    manifest = parse_manifest(raw, bucket, key)
    check_source(manifest, cfg)
    return manifest


def _is_true(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.strip().lower() == "true")


def _timestamp(text: str) -> datetime | None:
    return datetime.fromisoformat(text) if text else None


def csv_objects(stream: BinaryIO, fields: tuple[str, ...]) -> Iterator[ListedObject]:
    """The current objects of a gzipped inventory CSV, keys decoded; row by row."""
    col = {name: i for i, name in enumerate(fields)}
    k, s, e = col["Key"], col["Size"], col["ETag"]
    m = col.get("LastModifiedDate")
    c = col.get("StorageClass")
    latest, marker = col.get("IsLatest"), col.get("IsDeleteMarker")
    text = io.TextIOWrapper(gzip.GzipFile(fileobj=stream), encoding="utf-8", newline="")
    for row in csv.reader(text):
        if not row:
            continue
        if marker is not None and _is_true(row[marker]):
            continue
        if latest is not None and not _is_true(row[latest]):
            continue
        yield ListedObject(
            key=unquote_plus(row[k]),
            size=int(row[s]),
            etag=strip_etag(row[e]),
            last_modified=_timestamp(row[m]) if m is not None else None,
            storage_class=listed_class(row[c]) if c is not None else None,
        )


def parquet_objects(source: BinaryIO) -> Iterator[ListedObject]:
    """The current objects of an inventory Parquet file, read in batches of PAGE_SIZE rows."""
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(source)
    names = set(parquet.schema_arrow.names)
    wanted = [
        "key",
        "size",
        "e_tag",
        "last_modified_date",
        "storage_class",
        "is_latest",
        "is_delete_marker",
    ]
    columns = [c for c in wanted if c in names]
    for batch in parquet.iter_batches(batch_size=PAGE_SIZE, columns=columns):
        data = batch.to_pydict()
        mtimes = data.get("last_modified_date") or [None] * batch.num_rows
        classes = data.get("storage_class") or [None] * batch.num_rows
        latest = data.get("is_latest")
        marker = data.get("is_delete_marker")
        for i, key in enumerate(data["key"]):
            if marker is not None and marker[i]:
                continue
            if latest is not None and latest[i] is False:
                continue
            mtime = mtimes[i]
            if mtime is not None and mtime.tzinfo is None:
                mtime = mtime.replace(tzinfo=UTC)
            yield ListedObject(
                key,
                int(data["size"][i]),
                strip_etag(data["e_tag"][i]),
                mtime,
                listed_class(classes[i]),
            )


def under_prefix(objects: Iterable[ListedObject], prefix: str) -> Iterator[ListedObject]:
    """What ``ListObjectsV2`` of the prefix would list; the job's key rule comes after."""
    return (o for o in objects if o.key.startswith(prefix))


def paged(objects: Iterable[ListedObject], size: int = PAGE_SIZE) -> Iterator[list[ListedObject]]:
    page: list[ListedObject] = []
    for o in objects:
        page.append(o)
        if len(page) == size:
            yield page
            page = []
    if page:
        yield page


def file_objects(manifest: Manifest, fh: BinaryIO) -> Iterator[ListedObject]:
    if manifest.file_format == "CSV":
        return csv_objects(fh, manifest.fields)
    return parquet_objects(fh)


def inventory_objects(client: Any, manifest: Manifest) -> Iterator[ListedObject]:
    """Every current object the report lists, data file after data file. A data file that
    cannot be fetched, or whose MD5 differs from the manifest's, ends the plan (not complete)
    before any of its rows is written; one that cannot be parsed ends it where it fails. The
    rows of the files before stay in the ledger: planning again is idempotent."""
    from migrator.storage import s3

    for f in manifest.files:
        where = f"s3://{manifest.bucket}/{f.key}"
        with tempfile.TemporaryFile(prefix="migrator-inventory-") as fh:
            try:
                md5 = s3.download(client, manifest.bucket, f.key, fh)
            except S3OperationError as exc:
                raise StorageError(
                    f"reading inventory data file {where} failed: {exc}; the plan is not "
                    "complete: fix the cause and run the command again"
                ) from None
            if f.md5 is not None and md5 != f.md5:
                raise ConfigError(
                    f"inventory data file {where} has MD5 {md5}, the manifest says {f.md5}: "
                    "the report is damaged or was replaced; use another report"
                )
            fh.seek(0)
            try:
                yield from file_objects(manifest, fh)
            except (ValueError, TypeError, IndexError, KeyError, OSError, csv.Error) as exc:
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise ConfigError(
                    f"inventory data file {where} is not a valid {manifest.file_format} "
                    f"inventory file: {reason}"
                ) from None


def inventory_pages(client: Any, manifest: Manifest, prefix: str) -> Iterator[list[ListedObject]]:
    """Pages of ≤ PAGE_SIZE objects under ``prefix``, for :func:`migrator.plan.plan_pages`."""
    return paged(under_prefix(inventory_objects(client, manifest), prefix))
