"""What both S3 request paths share: listed objects, heads, and errors classified by kind."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple


class ErrorKind(enum.Enum):
    SOURCE_MISSING = "source_missing"  # NoSuchKey on the copy source
    SOURCE_CHANGED = "source_changed"  # CopySourceIfMatch failed: the source is a new version
    PERMANENT = "permanent"  # retrying cannot help (access denied, invalid request, ...)
    RETRYABLE = "retryable"  # throttling or network trouble that outlived botocore's retries


_PERMANENT_CODES = {
    "403",  # HEAD responses carry no error body, only the status
    "AccessDenied",
    "AllAccessDisabled",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "NoSuchBucket",
    "InvalidRequest",
    "InvalidArgument",
    "KeyTooLongError",
    "InvalidObjectState",
    "MethodNotAllowed",
}


class ListedObject(NamedTuple):  # a tuple: a million of them are built per million planned
    key: str
    size: int
    etag: str
    last_modified: datetime | None
    # None for STANDARD, the class a copy gets without asking (or a listing that says none)
    storage_class: str | None = None


class ListedVersion(NamedTuple):
    """One entry of ``ListObjectVersions``: an object version, or a delete marker (no size,
    no ETag)."""

    key: str
    version_id: str  # "null" for an object written while versioning was never enabled
    size: int
    etag: str
    last_modified: datetime | None
    storage_class: str | None
    is_latest: bool
    delete_marker: bool = False


class Checksum(NamedTuple):
    """An object's additional checksum as ``HeadObject`` with ``ChecksumMode`` shows it."""

    algorithm: str  # CRC64NVME, CRC32, CRC32C, SHA1, SHA256, ...
    value: str  # base64, as S3 sends it
    type: str  # FULL_OBJECT (of the whole object) or COMPOSITE (of its parts' checksums)


@dataclass(frozen=True)
class Head:
    size: int
    etag: str
    sse: str | None = None  # x-amz-server-side-encryption: AES256, aws:kms, ...
    storage_class: str | None = None  # None for STANDARD
    checksum: Checksum | None = None  # only when asked for (``ChecksumMode``)
    version_id: str | None = None  # in a bucket with versioning (``null``: written before it)

    @property
    def md5_etag(self) -> bool:
        """Whether the ETag is the MD5 of the bytes: S3 gives one to objects written in one
        request, unencrypted or with SSE-S3 (not SSE-KMS, DSSE-KMS or SSE-C, not in parts)."""
        return "-" not in self.etag and self.sse in (None, "AES256")


def same_content(a: Head, b: Head) -> bool | None:
    """Whether two objects hold the same bytes, as far as S3's fingerprints tell: True or
    False when they can (sizes, MD5 ETags, or full-object checksums of one algorithm), None
    when neither ETags nor checksums can be compared."""
    if a.size != b.size:
        return False
    if a.md5_etag and b.md5_etag:
        return a.etag == b.etag
    x, y = a.checksum, b.checksum
    if x is not None and y is not None and x.algorithm == y.algorithm:
        if x.type == y.type == "FULL_OBJECT":
            return x.value == y.value
        if x.value == y.value:  # equal composite checksums: same parts, same bytes
            return True
    return None


class CopyItem(NamedTuple):
    """One server-side copy: the planned source version and where it goes."""

    source_key: str
    dest_key: str
    etag: str  # the planned source ETag (``CopySourceIfMatch``)
    storage_class: str | None = None  # the listed class (None for STANDARD)


class S3OperationError(Exception):
    """One object's operation failed; ``kind`` tells the caller what to do with the row."""

    def __init__(self, kind: ErrorKind, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.kind = kind
        self.code = code


def strip_etag(etag: str) -> str:
    return etag.strip('"')


def listed_class(text: str | None) -> str | None:
    """A listed storage class as :class:`ListedObject` keeps it: None for ``STANDARD``."""
    return None if not text or text == "STANDARD" else text


def classify_code(code: str, status: int | None, message: str) -> S3OperationError:
    """An S3 error code and HTTP status as an :class:`S3OperationError` of the right kind."""
    if code in ("NoSuchKey", "404") or (status == 404 and code != "NoSuchBucket"):
        return S3OperationError(ErrorKind.SOURCE_MISSING, code, message)
    if code in ("PreconditionFailed", "412") or status == 412:
        return S3OperationError(ErrorKind.SOURCE_CHANGED, code, message)
    if code in _PERMANENT_CODES:
        return S3OperationError(ErrorKind.PERMANENT, code, message)
    return S3OperationError(ErrorKind.RETRYABLE, code, message)
