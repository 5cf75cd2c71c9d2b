"""The S3 Inventory readers without S3: manifests, key decoding, and memory that does not grow
with the report (the point of planning from an inventory is buckets too big to hold)."""

from __future__ import annotations

import gzip
import io
import json
import tempfile
import tracemalloc
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from migrator.errors import ConfigError
from migrator.inventory import (
    csv_objects,
    paged,
    parquet_objects,
    parse_manifest,
    parse_s3_url,
    under_prefix,
)

FIELDS = ("Bucket", "Key", "Size", "LastModifiedDate", "ETag", "IsMultipartUploaded")


def manifest_json(**over: object) -> bytes:
    doc = {
        "sourceBucket": "legacy",
        "destinationBucket": "arn:aws:s3:::inv",
        "version": "2016-11-30",
        "creationTimestamp": "1514944800000",
        "fileFormat": "CSV",
        "fileSchema": ", ".join(FIELDS),
        "files": [{"key": "inv/legacy/cfg/data/a.csv.gz", "size": 10, "MD5checksum": "ab"}],
    }
    doc.update(over)
    return json.dumps(doc).encode()


def test_manifest_fields() -> None:
    m = parse_manifest(manifest_json(), "inv", "inv/legacy/cfg/2018-01-03T02-00Z/manifest.json")
    assert m.source_bucket == "legacy"
    assert m.created == datetime(2018, 1, 3, 2, 0, tzinfo=UTC)
    assert m.fields == FIELDS
    assert m.files[0].key == "inv/legacy/cfg/data/a.csv.gz" and m.files[0].md5 == "ab"


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"fileFormat": "ORC"}, "ORC inventories are not supported"),
        ({"fileFormat": "XLSX"}, "unknown inventory fileFormat"),
        ({"fileSchema": "Bucket, Key, Size, LastModifiedDate"}, "no ETag field"),
        ({"fileFormat": "Parquet", "fileSchema": "message s3.inventory { required binary key; }"},
         "no size, e_tag field"),
        ({"creationTimestamp": "yesterday"}, "is not an S3 Inventory manifest"),
        ({"files": None}, "is not an S3 Inventory manifest"),
    ],
)  # fmt: skip
def test_bad_manifests(over: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_manifest(manifest_json(**over), "inv", "m.json")


def test_s3_urls() -> None:
    assert parse_s3_url("s3://inv/a/b/manifest.json") == ("inv", "a/b/manifest.json")
    for bad in ("inv/manifest.json", "s3://inv", "s3:///m.json", "https://inv/m.json"):
        with pytest.raises(ConfigError):
            parse_s3_url(bad)


def gz_csv(lines: list[str]) -> io.BytesIO:
    return io.BytesIO(gzip.compress("".join(lines).encode()))


def test_csv_keys_are_form_url_decoded() -> None:
    """A space is '+', a '+' is %2B, a '%' is %25 and UTF-8 is percent-encoded."""
    encoded = {
        "image/with+space.png": "image/with space.png",
        "image/a%2Bb.png": "image/a+b.png",
        "image/100%25/x.png": "image/100%/x.png",
        "image/%C3%BC%E6%97%A5.png": "image/ü日.png",
    }
    lines = [f'"legacy","{k}","12","2024-05-01T10:20:30.000Z","e1","false"\n' for k in encoded]
    got = list(csv_objects(gz_csv(lines), FIELDS))
    assert [o.key for o in got] == list(encoded.values())
    assert (got[0].size, got[0].etag) == (12, "e1")
    assert got[0].last_modified == datetime(2024, 5, 1, 10, 20, 30, tzinfo=UTC)


def test_csv_versioned_rows_keep_only_current_objects() -> None:
    fields = ("Bucket", "Key", "VersionId", "IsLatest", "IsDeleteMarker", "Size", "ETag")
    lines = [
        '"b","k1","v2","true","false","3","e2"\n',
        '"b","k1","v1","false","false","2","e1"\n',  # an older version
        '"b","k2","v9","true","true","",""\n',  # a delete marker
        '"b","k2","v8","false","false","5","e8"\n',
    ]
    got = list(csv_objects(gz_csv(lines), fields))
    assert [(o.key, o.size, o.etag) for o in got] == [("k1", 3, "e2")]


def test_prefix_and_pages() -> None:
    row = '"b","{}","1","2024-01-01T00:00:00.000Z","e","false"\n'
    lines = [row.format(f"{p}{i}") for p in "ax" for i in range(5)]
    objs = under_prefix(csv_objects(gz_csv(lines), FIELDS), "a")
    assert [len(p) for p in paged(objs, 2)] == [2, 2, 1]


def test_pages_are_lazy_and_memory_is_bounded() -> None:
    """60,000 rows: the first page comes before the file is read through, and the peak of
    Python allocations while reading all of it stays far below what the rows would take."""
    rows = 60_000
    raw = io.BytesIO()
    with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1) as gz:
        for i in range(rows):
            key = f"image/user-{i:07d}/avatar+{i}.png"
            gz.write(
                f'"legacy","{key}","{i}","2024-01-01T00:00:00.000Z","{i:032x}","false"\n'.encode()
            )
    raw.seek(0)
    tracemalloc.start()
    try:
        pages = paged(under_prefix(csv_objects(raw, FIELDS), "image/"))
        first = next(pages)
        assert len(first) == 1000 and raw.tell() < len(raw.getvalue())
        seen = len(first) + sum(len(p) for p in pages)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seen == rows
    assert peak < 4 << 20, f"peak {peak:,} bytes"  # the rows as objects: ~18 MB


def test_parquet_batches() -> None:
    when = datetime(2024, 5, 1, tzinfo=UTC)
    table = pa.table(
        {
            "bucket": ["b"] * 2500,
            "key": [f"image/{i} +%ü" for i in range(2500)],  # Parquet keys are not encoded
            "is_latest": [True] * 2500,
            "is_delete_marker": [i == 7 for i in range(2500)],
            "size": list(range(2500)),
            "last_modified_date": pa.array([when] * 2500, pa.timestamp("ms", tz="UTC")),
            "e_tag": ["e"] * 2500,
        }
    )
    with tempfile.TemporaryFile() as fh:
        pq.write_table(table, fh, compression="snappy")
        fh.seek(0)
        got = list(parquet_objects(fh))
    assert len(got) == 2499 and got[0].key == "image/0 +%ü"
    assert got[0].last_modified == when and got[-1].size == 2499


def test_storage_class_is_read_from_csv_and_parquet() -> None:
    """Kept for ``storage_class: copy``; ``STANDARD`` (a copy's class without asking) as None."""
    fields = ("Bucket", "Key", "Size", "ETag", "StorageClass")
    lines = ['"b","k1","3","e1","STANDARD_IA"\n', '"b","k2","3","e2","STANDARD"\n']
    got = list(csv_objects(gz_csv(lines), fields))
    assert [o.storage_class for o in got] == ["STANDARD_IA", None]
    table = pa.table(
        {
            "key": ["k1", "k2", "k3"],
            "size": [1, 2, 3],
            "e_tag": ["e", "e", "e"],
            "storage_class": ["GLACIER_IR", "STANDARD", None],
        }
    )
    with tempfile.TemporaryFile() as fh:
        pq.write_table(table, fh)
        fh.seek(0)
        assert [o.storage_class for o in parquet_objects(fh)] == ["GLACIER_IR", None, None]
