"""Reading S3's XML answers on the CRT path: the fast listing reader agrees with ElementTree on
every layout seen from S3, s3fast and moto, and falls back to it on any other."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from migrator.storage.crt import _parse_listing, parse, parse_listing

NS = 'xmlns="http://s3.amazonaws.com/doc/2006-03-01/"'


def contents(
    key: str,
    *,
    checksum: bool = False,
    size: int = 7,
    storage_class: str | None = "STANDARD",
    owner: bool = False,
) -> str:
    extra = "<ChecksumAlgorithm>CRC32</ChecksumAlgorithm>" if checksum else ""
    after = "<Owner><ID>75aa</ID><DisplayName>webfile</DisplayName></Owner>" if owner else ""
    if storage_class is not None:
        after += f"<StorageClass>{storage_class}</StorageClass>"
    return (
        f"<Contents><Key>{key}</Key><LastModified>2026-11-25T04:03:17.405Z</LastModified>"
        f"<ETag>&quot;cfb767f225d58469c5de3632a8803958&quot;</ETag>{extra}<Size>{size}</Size>"
        f"{after}</Contents>"
    )


LAYOUTS = {
    # S3 and s3fast: metadata first, compact
    "s3": (
        f'<?xml version="1.0" encoding="UTF-8"?><ListBucketResult {NS}><Name>b</Name>'
        "<Prefix>in/</Prefix><KeyCount>2</KeyCount><MaxKeys>1000</MaxKeys>"
        "<EncodingType>url</EncodingType><IsTruncated>true</IsTruncated>"
        "<NextContinuationToken>tok%2Ben&amp;x</NextContinuationToken>"
        + contents("in/a+b%C3%A9.png")
        + contents("in/%0D%0A", size=0)
        + "</ListBucketResult>"
    ),
    # moto: IsTruncated first, the rest after the objects, checksums between ETag and Size
    "moto": (
        f'<?xml version="1.0" encoding="utf-8"?><ListBucketResult {NS}>'
        "<IsTruncated>false</IsTruncated>"
        + contents("in/0%20%C3%A9%2B.png", checksum=True)
        + "<Name>b</Name><EncodingType>url</EncodingType><KeyCount>1</KeyCount>"
        "</ListBucketResult>"
    ),
    # no encoding-type: keys XML-escaped
    "escaped": (
        f"<ListBucketResult {NS}><IsTruncated>false</IsTruncated>"
        + contents("in/a&amp;b &lt;c&gt;.png")
        + "</ListBucketResult>"
    ),
    # indented: the fast reader does not match, ElementTree reads it
    "indented": (
        f"<ListBucketResult {NS}>\n  <IsTruncated>false</IsTruncated>\n  <Contents>\n"
        '    <Key>in/x.png</Key>\n    <Size>3</Size>\n    <ETag>"abc"</ETag>\n'
        "  </Contents>\n</ListBucketResult>"
    ),
    # storage classes other than STANDARD, none at all, and fetch-owner's Owner before them
    "classes": (
        f"<ListBucketResult {NS}><IsTruncated>false</IsTruncated>"
        + contents("in/ia.png", storage_class="STANDARD_IA")
        + contents("in/glacier.png", storage_class="GLACIER", owner=True)
        + contents("in/none.png", storage_class=None)
        + contents("in/standard.png", owner=True)
        + "</ListBucketResult>"
    ),
    "empty": f"<ListBucketResult {NS}><IsTruncated>false</IsTruncated></ListBucketResult>",
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fast_listing_reader_agrees_with_elementtree(layout: str) -> None:
    body = LAYOUTS[layout].encode()
    assert parse_listing(body) == _parse_listing(ET.fromstring(body))


def test_listing_values() -> None:
    objects, token = parse_listing(LAYOUTS["s3"].encode())
    assert [o.key for o in objects] == ["in/a b\N{LATIN SMALL LETTER E WITH ACUTE}.png", "in/\r\n"]
    assert [o.size for o in objects] == [7, 0]
    assert {o.etag for o in objects} == {"cfb767f225d58469c5de3632a8803958"}
    assert token == "tok%2Ben&x"  # sent back as it came, after XML unescaping
    assert parse_listing(LAYOUTS["moto"].encode())[1] is None
    [escaped], _ = parse_listing(LAYOUTS["escaped"].encode())
    assert escaped.key == "in/a&b <c>.png"


def test_listing_keeps_storage_classes_other_than_standard() -> None:
    """A copy keeps the listed class (``storage_class: copy``); ``STANDARD``, which a copy gets
    without asking, and a listing without the element are both None."""
    objects, _ = parse_listing(LAYOUTS["classes"].encode())
    assert [(o.key, o.storage_class) for o in objects] == [
        ("in/ia.png", "STANDARD_IA"),
        ("in/glacier.png", "GLACIER"),
        ("in/none.png", None),
        ("in/standard.png", None),
    ]
    assert {o.storage_class for o in parse_listing(LAYOUTS["s3"].encode())[0]} == {None}


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (503, b"<Error><Code>SlowDown</Code><Message>Reduce</Message></Error>", "SlowDown"),
        (200, b'<?xml version="1.0"?>\n<Error><Code>InternalError</Code></Error>', "InternalError"),
        (200, b"<CopyObjectResult><ETag>&quot;ab", "InternalError"),  # cut off
        # a copy failing midway: whitespace while copying, then an error document
        (200, b" " * 4096 + b"<Error><Code>SlowDown</Code></Error>", "SlowDown"),
        (404, b"", "404"),  # HEAD-like: no body
        (500, b"<html>proxy error</html>", "500"),
    ],
)
def test_errors_are_read_from_status_and_body(status: int, body: bytes, expected: str) -> None:
    result = parse(status, body, b"</CopyObjectResult>")
    assert isinstance(result, tuple)
    assert result[0] == expected


def test_a_complete_answer_is_a_response() -> None:
    body = b"<CopyObjectResult><ETag>&quot;ab&quot;</ETag></CopyObjectResult>"
    result = parse(200, body, b"</CopyObjectResult>")
    assert not isinstance(result, tuple)
    assert result.body == body
