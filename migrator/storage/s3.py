"""boto3 client factory and the S3 operations migrator needs, with errors classified.

Clients are built once per process by a :class:`ClientFactory` and passed in; nothing here
creates a client on its own. botocore does the retrying (``adaptive`` mode: backoff plus client
side rate limiting on 503 SlowDown); what reaches us has exhausted those retries.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import boto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError

from migrator.config import Location
from migrator.errors import PreflightError

DELETE_BATCH = 1000  # DeleteObjects accepts at most 1,000 keys


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


@dataclass(frozen=True)
class ListedObject:
    key: str
    size: int
    etag: str
    last_modified: datetime | None


@dataclass(frozen=True)
class Head:
    size: int
    etag: str


class S3OperationError(Exception):
    """One object's operation failed; ``kind`` tells the caller what to do with the row."""

    def __init__(self, kind: ErrorKind, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.kind = kind
        self.code = code


def strip_etag(etag: str) -> str:
    return etag.strip('"')


def error_code(exc: ClientError) -> str:
    err = exc.response.get("Error", {})
    return str(err.get("Code") or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode"))


def classify(exc: Exception) -> S3OperationError:
    """Map a boto3/botocore exception to an :class:`S3OperationError` with its kind."""
    if isinstance(exc, ClientError):
        code = error_code(exc)
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        message = exc.response.get("Error", {}).get("Message") or str(exc)
        if code in ("NoSuchKey", "404") or (status == 404 and code != "NoSuchBucket"):
            return S3OperationError(ErrorKind.SOURCE_MISSING, code, message)
        if code in ("PreconditionFailed", "412") or status == 412:
            return S3OperationError(ErrorKind.SOURCE_CHANGED, code, message)
        if code in _PERMANENT_CODES:
            return S3OperationError(ErrorKind.PERMANENT, code, message)
        return S3OperationError(ErrorKind.RETRYABLE, code, message)
    if isinstance(exc, BotoCoreError):
        return S3OperationError(ErrorKind.RETRYABLE, type(exc).__name__, str(exc))
    return S3OperationError(ErrorKind.RETRYABLE, type(exc).__name__, str(exc))


class RetryCounter:
    """Counts the retries botocore made (``ResponseMetadata.RetryAttempts``) for a client's
    calls, so throttling shows in ``migrator status`` instead of only as slowness."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = 0

    def _add(self, metadata: Any) -> None:
        n = int((metadata or {}).get("RetryAttempts", 0) or 0)
        if n:
            with self._lock:
                self._count += n

    def after_call(self, parsed: Any = None, **_: Any) -> None:
        self._add((parsed or {}).get("ResponseMetadata"))

    def after_error(self, exception: Any = None, **_: Any) -> None:
        self._add((getattr(exception, "response", None) or {}).get("ResponseMetadata"))

    def take(self) -> int:
        """The retries counted since the last call."""
        with self._lock:
            n, self._count = self._count, 0
        return n


class ClientFactory:
    """Builds boto3 S3 clients for one side of the move (one client per process)."""

    def __init__(
        self,
        location: Location,
        *,
        max_pool: int = 32,
        max_attempts: int = 10,
        connect_timeout: float = 10,
        request_checksums: str = "when_supported",
    ) -> None:
        self.location = location
        self.request_checksums = request_checksums
        self.max_pool = max_pool
        self.max_attempts = max_attempts
        self.connect_timeout = connect_timeout

    def client(self, retries: RetryCounter | None = None) -> Any:
        loc = self.location
        session = boto3.session.Session(profile_name=loc.profile) if loc.profile else boto3
        config = BotoConfig(
            retries={"mode": "adaptive", "max_attempts": self.max_attempts},
            max_pool_connections=self.max_pool,
            connect_timeout=self.connect_timeout,
            read_timeout=120,
            tcp_keepalive=True,
            s3={"addressing_style": "path"} if loc.endpoint_url else None,
            request_checksum_calculation=self.request_checksums,
        )
        client = session.client(
            "s3", endpoint_url=loc.endpoint_url, region_name=loc.region, config=config
        )
        if retries is not None:
            client.meta.events.register("after-call.s3", retries.after_call)
            client.meta.events.register("after-call-error.s3", retries.after_error)
        return client


def check_bucket(client: Any, location: Location, side: str) -> None:
    """Pre-flight: the bucket exists and is reachable, else a one-line PreflightError."""
    where = location.endpoint_url or "AWS"
    try:
        client.head_bucket(Bucket=location.bucket)
    except EndpointConnectionError:
        raise PreflightError(
            f"{side}: cannot reach S3 endpoint {where}; check {side}.endpoint_url and that the "
            "server is running"
        ) from None
    except ClientError as exc:
        code = error_code(exc)
        if code in ("404", "NoSuchBucket"):
            raise PreflightError(
                f"{side}: bucket {location.bucket!r} does not exist at {where}; create it or "
                f"fix {side}.bucket"
            ) from None
        if code in ("403", "AccessDenied"):
            raise PreflightError(
                f"{side}: access to bucket {location.bucket!r} denied; check the AWS "
                "credentials or profile"
            ) from None
        raise PreflightError(f"{side}: bucket {location.bucket!r}: {code}") from None
    except BotoCoreError as exc:
        raise PreflightError(f"{side}: S3 at {where} failed: {exc}") from None


def list_pages(client: Any, bucket: str, prefix: str) -> Iterator[list[ListedObject]]:
    """Stream ``ListObjectsV2`` one page (≤ 1,000 objects) at a time: constant memory."""
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        yield [
            ListedObject(
                key=o["Key"],
                size=int(o["Size"]),
                etag=strip_etag(o["ETag"]),
                last_modified=o.get("LastModified"),
            )
            for o in page.get("Contents", ())
        ]


def head(client: Any, bucket: str, key: str) -> Head | None:
    """Size and ETag of an object, or None when it does not exist."""
    try:
        resp = client.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if error_code(exc) in ("404", "NoSuchKey", "NotFound"):
            return None
        raise classify(exc) from None
    except BotoCoreError as exc:
        raise classify(exc) from None
    return Head(size=int(resp["ContentLength"]), etag=strip_etag(resp["ETag"]))


def copy(
    client: Any,
    src_bucket: str,
    src_key: str,
    dst_bucket: str,
    dst_key: str,
    if_match: str,
    *,
    if_absent: bool = False,
) -> str:
    """Server-side copy of exactly the planned version; returns the destination ETag.

    ``CopySourceIfMatch`` makes S3 refuse (412) when the source changed after planning;
    with ``if_absent``, ``If-None-Match: *`` also makes it refuse (412) when the destination key
    already holds an object, so nothing is overwritten unseen. Metadata (content type, user
    metadata) is copied by S3 (``MetadataDirective=COPY``).
    """
    extra = {"IfNoneMatch": "*"} if if_absent else {}
    try:
        resp = client.copy_object(
            Bucket=dst_bucket,
            Key=dst_key,
            CopySource={"Bucket": src_bucket, "Key": src_key},
            CopySourceIfMatch=f'"{if_match}"',
            MetadataDirective="COPY",
            **extra,
        )
    except (ClientError, BotoCoreError) as exc:
        raise classify(exc) from None
    return strip_etag(resp["CopyObjectResult"]["ETag"])


def delete(client: Any, bucket: str, keys: list[str]) -> dict[str, str]:
    """``DeleteObjects`` for ≤ 1,000 keys; returns ``{key: error}`` for keys S3 did not delete.

    A missing key counts as deleted (S3 semantics), which makes a replay harmless.
    """
    if not keys:
        return {}
    if len(keys) > DELETE_BATCH:
        raise ValueError(f"at most {DELETE_BATCH} keys per DeleteObjects request")
    try:
        resp = client.delete_objects(
            Bucket=bucket,
            Delete={"Objects": [{"Key": k} for k in keys], "Quiet": True},
        )
    except (ClientError, BotoCoreError) as exc:
        err = classify(exc)
        return dict.fromkeys(keys, str(err))
    return {e["Key"]: f"{e.get('Code')}: {e.get('Message', '')}" for e in resp.get("Errors", ())}
