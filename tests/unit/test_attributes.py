"""Object attributes as requests, and telling objects apart by content, without a server.

The ``crt`` transport builds its ``CopyObject`` headers itself and ``transport: boto3`` passes
arguments to botocore: botocore's own serializer turns those arguments into headers here, so
both transports are shown to ask S3 for the same object.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import botocore.serialize
import botocore.session
import pytest

from migrator.storage.attributes import DEFAULT_ATTRIBUTES, ObjectAttributes
from migrator.storage.common import Checksum, Head, same_content

EVERYTHING = ObjectAttributes(
    replace_metadata=True,
    content=(
        ("content_type", "image/webp"),
        ("cache_control", "public, max-age=31536000"),
        ("content_disposition", 'inline; filename="a b.webp"'),
        ("content_encoding", "identity"),
        ("content_language", "de-CH"),
        ("expires", datetime(2031, 1, 2, 3, 4, 5, tzinfo=UTC)),
    ),
    user=(("origin", "legacy"), ("migrated-by", "migrator")),
    replace_tags=True,
    tags=(("project", "avatars"), ("owner", "team a/b+c=d")),
    storage_class="STANDARD_IA",
    sse="aws:kms",
    kms_key_id="arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab",
    acl="bucket-owner-full-control",
)


def botocore_headers(args: dict[str, Any]) -> dict[str, str]:
    """The headers botocore sends for ``copy_object(**args)`` (nothing is sent)."""
    model = botocore.session.get_session().get_service_model("s3")
    operation = model.operation_model("CopyObject")
    params = {"Bucket": "production", "Key": "avatar/a", "CopySource": "legacy/image/a", **args}
    request = botocore.serialize.create_serializer("rest-xml").serialize_to_request(
        params, operation
    )
    skip = {"x-amz-copy-source"}
    return {k.lower(): v for k, v in request["headers"].items() if k.lower() not in skip}


@pytest.mark.parametrize("listed", [None, "GLACIER_IR"])
@pytest.mark.parametrize(
    "attrs",
    [
        DEFAULT_ATTRIBUTES,
        EVERYTHING,
        ObjectAttributes(storage_class="ONEZONE_IA", sse="AES256"),
        ObjectAttributes(replace_tags=True),  # replace with no tags: the copy has none
        ObjectAttributes(replace_metadata=True),  # replace with nothing: S3's defaults
    ],
    ids=["default", "everything", "class-and-sse-s3", "no-tags", "no-metadata"],
)
def test_both_transports_ask_for_the_same_object(
    attrs: ObjectAttributes, listed: str | None
) -> None:
    crt = dict(attrs.copy_headers)
    crt.setdefault("x-amz-metadata-directive", "COPY")  # the crt sends it unless replaced
    storage_class = attrs.class_for(listed)
    if storage_class is not None:
        crt["x-amz-storage-class"] = storage_class
    assert crt == botocore_headers(attrs.copy_args(listed))


def test_the_default_changes_nothing_and_keeps_the_listed_class() -> None:
    assert DEFAULT_ATTRIBUTES.copy_headers == ()
    assert DEFAULT_ATTRIBUTES.copy_args(None) == {"MetadataDirective": "COPY"}
    assert DEFAULT_ATTRIBUTES.copy_args("STANDARD_IA")["StorageClass"] == "STANDARD_IA"
    assert EVERYTHING.class_for("GLACIER_IR") == "STANDARD_IA"  # the configured class wins


def test_values_are_sent_as_http_spells_them() -> None:
    headers = dict(EVERYTHING.copy_headers)
    assert headers["expires"] == "Thu, 02 Jan 2031 03:04:05 GMT"
    assert headers["x-amz-tagging"] == "project=avatars&owner=team%20a%2Fb%2Bc%3Dd"
    assert headers["x-amz-meta-migrated-by"] == "migrator"
    assert headers["x-amz-tagging-directive"] == "REPLACE"


CARRIED = {
    "ContentType": "image/tiff",
    "CacheControl": "max-age=3600",
    "Metadata": {"user-id": "7"},
    "StorageClass": "GLACIER_IR",
    "Tagging": "a=1",
}


def test_a_copy_in_parts_keeps_what_the_source_had_unless_the_job_sets_it() -> None:
    """``CreateMultipartUpload`` has no directives: the source's headers and tags are read
    and passed on, or replaced by the job's values, as a single copy would do."""
    assert DEFAULT_ATTRIBUTES.upload_args(CARRIED) == CARRIED
    args = EVERYTHING.upload_args(CARRIED)
    assert args["ContentType"] == "image/webp" and "user-id" not in args["Metadata"]
    assert args["Metadata"] == {"origin": "legacy", "migrated-by": "migrator"}
    assert args["Tagging"] == "project=avatars&owner=team%20a%2Fb%2Bc%3Dd"
    assert args["StorageClass"] == "STANDARD_IA"
    assert (args["ServerSideEncryption"], args["ACL"]) == ("aws:kms", "bucket-owner-full-control")
    assert args["SSEKMSKeyId"] == EVERYTHING.kms_key_id
    no_tags = ObjectAttributes(replace_tags=True).upload_args(CARRIED)
    assert "Tagging" not in no_tags and no_tags["ContentType"] == "image/tiff"
    kept = ObjectAttributes(replace_metadata=True).upload_args(CARRIED)
    assert kept == {"Metadata": {}, "Tagging": "a=1", "StorageClass": "GLACIER_IR"}


def crc(value: str, kind: str = "FULL_OBJECT", algorithm: str = "CRC32") -> Checksum:
    return Checksum(algorithm, value, kind)


MD5 = "5d41402abc4b2a76b9719d911017c592"
PARTS = crc("x-2", "COMPOSITE")


def kms(checksum: Checksum) -> Head:
    return Head(5, "k" * 32, "aws:kms", checksum=checksum)


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        (Head(5, MD5), Head(5, MD5, "AES256"), True),  # MD5 ETags on both sides
        (Head(5, MD5), Head(5, "0" * 32, "AES256", checksum=crc("x")), False),
        (Head(5, MD5), Head(6, MD5), False),  # sizes differ
        # SSE-KMS: the ETag tells nothing, the checksums do
        (Head(5, MD5, checksum=crc("x")), Head(5, "k" * 32, "aws:kms", checksum=crc("x")), True),
        (Head(5, MD5, checksum=crc("x")), Head(5, "k" * 32, "aws:kms", checksum=crc("y")), False),
        (Head(5, "k" * 32, "aws:kms"), Head(5, MD5), None),  # no checksum: undecided
        # other algorithms, or parts checksummed differently, cannot be compared
        (Head(5, MD5, checksum=crc("x")), kms(crc("x", algorithm="SHA1")), None),
        (Head(5, "e-2", checksum=PARTS), kms(crc("y-3", "COMPOSITE")), None),
        (Head(5, "e-2", checksum=PARTS), kms(PARTS), True),
    ],
)  # fmt: skip
def test_same_content(a: Head, b: Head, same: bool | None) -> None:
    assert same_content(a, b) is same
    assert same_content(b, a) is same


def test_which_etags_are_md5s() -> None:
    assert Head(1, MD5).md5_etag and Head(1, MD5, "AES256").md5_etag
    assert not Head(1, MD5, "aws:kms").md5_etag
    assert not Head(1, MD5, "aws:kms:dsse").md5_etag
    assert not Head(1, MD5 + "-3").md5_etag
