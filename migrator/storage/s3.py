"""boto3 client factory and the S3 operations migrator needs, with errors classified.

Clients are built once per process by a :class:`ClientFactory` and passed in; nothing here
creates a client on its own. botocore does the retrying (``adaptive`` mode: backoff plus client
side rate limiting on 503 SlowDown); what reaches us has exhausted those retries.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, BinaryIO
from urllib.parse import urlencode

import boto3
import botocore.loaders
import botocore.session
from botocore.config import Config as BotoConfig
from botocore.credentials import (
    AssumeRoleCredentialFetcher,
    CredentialProvider,
    CredentialResolver,
    DeferredRefreshableCredentials,
)
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError

from migrator.config import Location
from migrator.errors import PreflightError, StorageError
from migrator.storage.attributes import DEFAULT_ATTRIBUTES, ObjectAttributes
from migrator.storage.common import (
    Checksum,
    CopyItem,
    ErrorKind,
    Head,
    ListedObject,
    ListedVersion,
    S3OperationError,
    classify_code,
    listed_class,
    strip_etag,
)
from migrator.storage.crt import CrtS3
from migrator.storage.multipart import Part, multipart_etag, plan_parts

DELETE_BATCH = 1000  # DeleteObjects accepts at most 1,000 keys
_STS_REGION = "us-east-1"  # for AssumeRole when neither the side nor its profile names a region
# Assumed-role credentials by base profile, then by AssumeRole's arguments (botocore's cache
# key): the clients a process builds for one side share one AssumeRole until it expires.
_ROLE_CACHE: dict[str, dict[str, Any]] = {}

# One botocore data loader per process, shared by every client: it caches the S3 service model
# and endpoint rules (a few MB of JSON). Warmed in the fork server, a worker's clients cost
# ~30 ms instead of ~300 ms of CPU.
_LOADER = botocore.loaders.create_loader()


def warm_up() -> None:
    """Load what every S3 client needs into the shared loader (nothing is sent)."""
    core = botocore.session.Session()
    core.register_component("data_loader", _LOADER)
    core.create_client(
        "s3", region_name="us-east-1", aws_access_key_id="-", aws_secret_access_key="-"
    )


def error_code(exc: ClientError) -> str:
    err = exc.response.get("Error", {})
    return str(err.get("Code") or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode"))


def classify(exc: Exception) -> S3OperationError:
    """Map a boto3/botocore exception to an :class:`S3OperationError` with its kind."""
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        message = exc.response.get("Error", {}).get("Message") or str(exc)
        return classify_code(error_code(exc), status, message)
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

    def add(self, n: int) -> None:
        with self._lock:
            self._count += n

    def take(self) -> int:
        """The retries counted since the last call."""
        with self._lock:
            n, self._count = self._count, 0
        return n


class _RoleProvider(CredentialProvider):
    """A credential chain of one link: the credentials of an assumed role."""

    METHOD = "assume-role"

    def __init__(self, credentials: Any) -> None:
        super().__init__()
        self.credentials = credentials

    def load(self) -> Any:
        return self.credentials


def _session(location: Location) -> botocore.session.Session:
    """The botocore session of one side: its profile's credentials (or the standard chain's),
    or with ``role_arn`` the role's, assumed with those. The role's credentials are botocore's
    own ``AssumeRoleCredentialFetcher`` in ``DeferredRefreshableCredentials``: assumed at the
    first request and again before they expire (what botocore does for a profile's
    ``role_arn``); the STS client takes its endpoint from the profile and the environment
    (``AWS_ENDPOINT_URL_STS``, a ``services`` section) like any other."""
    base = botocore.session.Session(profile=location.profile or None)
    base.register_component("data_loader", _LOADER)
    if location.profile and location.profile not in base.available_profiles:
        raise PreflightError(
            f"AWS profile {location.profile!r} is not in the AWS config or credentials files; "
            "fix the profile name, or point AWS_CONFIG_FILE / AWS_SHARED_CREDENTIALS_FILE at "
            "the files that define it"
        )
    if location.role_arn is None:
        return base
    source = base.get_credentials()
    credentials = None
    if source is not None:  # else the role's session has none either: "no credentials found"
        extra = {"RoleSessionName": location.role_session_name or "migrator"}
        if location.external_id is not None:
            extra["ExternalId"] = location.external_id
        region = location.region or base.get_config_variable("region") or _STS_REGION
        fetcher = AssumeRoleCredentialFetcher(
            functools.partial(base.create_client, region_name=region),
            source,
            location.role_arn,
            extra_args=extra,
            cache=_ROLE_CACHE.setdefault(location.profile or "", {}),
        )
        credentials = DeferredRefreshableCredentials(fetcher.fetch_credentials, "assume-role")
    role = botocore.session.Session(profile=location.profile or None)
    role.register_component("data_loader", _LOADER)
    role.register_component("credential_provider", CredentialResolver([_RoleProvider(credentials)]))
    return role


class ClientFactory:
    """Builds boto3 S3 clients for one side of the move (one client per process), with that
    side's credentials (``profile``, ``role_arn``). ``streamed_writes``: for a destination
    whose PUTs stream a source's GET (``copy_mode: stream``)."""

    def __init__(
        self,
        location: Location,
        *,
        max_pool: int = 32,
        max_attempts: int = 10,
        connect_timeout: float = 10,
        request_checksums: str = "when_supported",
        streamed_writes: bool = False,
    ) -> None:
        self.location = location
        self.request_checksums = request_checksums
        self.max_pool = max_pool
        self.max_attempts = max_attempts
        self.connect_timeout = connect_timeout
        self.streamed_writes = streamed_writes
        self.core = _session(location)
        self.session = boto3.session.Session(botocore_session=self.core)

    def client(self, retries: RetryCounter | None = None) -> Any:
        loc = self.location
        session = self.session
        s3_config: dict[str, Any] = {"addressing_style": "path"} if loc.endpoint_url else {}
        checksums = self.request_checksums
        if self.streamed_writes:
            # A PUT's body is the source's GET, read once as it goes out: botocore must not
            # read it beforehand to sign its SHA-256 or to put a checksum in a header (over
            # HTTP it would do both). migrator checks the ETag against its own MD5 instead.
            s3_config["payload_signing_enabled"] = False
            checksums = "when_required"
        config = BotoConfig(
            retries={"mode": "adaptive", "max_attempts": self.max_attempts},
            max_pool_connections=self.max_pool,
            connect_timeout=self.connect_timeout,
            read_timeout=120,
            tcp_keepalive=True,
            s3=s3_config or None,
            request_checksum_calculation=checksums,
        )
        client = session.client(
            "s3", endpoint_url=loc.endpoint_url, region_name=loc.region, config=config
        )
        if retries is not None:
            client.meta.events.register("after-call.s3", retries.after_call)
            client.meta.events.register("after-call-error.s3", retries.after_error)
        return client


def check_bucket(client: Any, location: Location, side: str) -> str | None:
    """Pre-flight: the bucket exists and is reachable, else a one-line PreflightError.
    Returns the bucket's region when S3 says it (``x-amz-bucket-region``)."""
    where = location.endpoint_url or "AWS"
    try:
        resp = client.head_bucket(Bucket=location.bucket)
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
    headers = resp.get("ResponseMetadata", {}).get("HTTPHeaders", {})
    region: str | None = resp.get("BucketRegion") or headers.get("x-amz-bucket-region")
    return region


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
                storage_class=listed_class(o.get("StorageClass")),
            )
            for o in page.get("Contents", ())
        ]


def list_version_pages(
    client: Any, bucket: str, prefix: str, *, page_size: int | None = None
) -> Iterator[list[list[ListedVersion]]]:
    """Stream ``ListObjectVersions`` as pages of keys, each key with all its versions
    (newest first, S3's order) and its delete markers. A key whose versions continue on the next
    page of the listing is held back until they are all read, so a key is never split."""
    paginator = client.get_paginator("list_object_versions")
    held: list[ListedVersion] = []
    paging = {"PageSize": page_size} if page_size else {}
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix, PaginationConfig=paging):
        entries = [
            ListedVersion(
                key=o["Key"],
                version_id=o.get("VersionId") or "null",
                size=int(o["Size"]),
                etag=strip_etag(o["ETag"]),
                last_modified=o.get("LastModified"),
                storage_class=listed_class(o.get("StorageClass")),
                is_latest=bool(o.get("IsLatest")),
            )
            for o in page.get("Versions", ())
        ] + [
            ListedVersion(
                key=m["Key"],
                version_id=m.get("VersionId") or "null",
                size=0,
                etag="",
                last_modified=m.get("LastModified"),
                storage_class=None,
                is_latest=bool(m.get("IsLatest")),
                delete_marker=True,
            )
            for m in page.get("DeleteMarkers", ())
        ]
        # S3 lists a page's versions and its delete markers apart, each by key and newest
        # first; a stable sort by key keeps that order (versions, then markers, per key).
        entries.sort(key=lambda v: v.key)
        by_key: list[list[ListedVersion]] = []
        for entry in held + entries:
            if by_key and by_key[-1][0].key == entry.key:
                by_key[-1].append(entry)
            else:
                by_key.append([entry])
        held = by_key.pop() if by_key and page.get("IsTruncated") else []
        if by_key:
            yield by_key
    if held:
        yield [held]


def read_object(client: Any, bucket: str, key: str, max_bytes: int) -> bytes:
    """A small object's bytes (at most ``max_bytes``: a manifest, not a data file); S3's
    refusal as a classified :class:`S3OperationError`."""
    try:
        body = client.get_object(Bucket=bucket, Key=key)["Body"]
        try:
            return bytes(body.read(max_bytes))
        finally:
            body.close()
    except (ClientError, BotoCoreError) as exc:
        raise classify(exc) from None


def download(client: Any, bucket: str, key: str, out: BinaryIO) -> str:
    """Stream an object into ``out`` 1 MiB at a time (constant memory, whatever its size);
    returns the hex MD5 of what was written, to check against a checksum from elsewhere."""
    md5 = hashlib.md5(usedforsecurity=False)
    try:
        body = client.get_object(Bucket=bucket, Key=key)["Body"]
        try:
            for chunk in iter(lambda: body.read(1 << 20), b""):
                md5.update(chunk)
                out.write(chunk)
        finally:
            body.close()
    except (ClientError, BotoCoreError) as exc:
        raise classify(exc) from None
    return md5.hexdigest()


_CHECKSUMS = ("CRC64NVME", "CRC32", "CRC32C", "SHA1", "SHA256", "SHA512", "MD5")


def _checksum(resp: dict[str, Any]) -> Checksum | None:
    for algorithm in _CHECKSUMS:
        value = resp.get(f"Checksum{algorithm}")
        if value:
            kind = resp.get("ChecksumType") or ("COMPOSITE" if "-" in value else "FULL_OBJECT")
            return Checksum(algorithm, value, kind)
    return None


def head(
    client: Any,
    bucket: str,
    key: str,
    *,
    checksum: bool = False,
    if_match: str | None = None,
    version_id: str | None = None,
) -> Head | None:
    """Size, ETag, encryption and storage class of an object, or None when it does not
    exist. ``checksum`` asks for its additional checksum too (``ChecksumMode``; on an SSE-KMS
    object that needs ``kms:Decrypt``); ``if_match`` makes a changed object a 412
    (``SOURCE_CHANGED``)."""
    extra: dict[str, str] = {}
    if checksum:
        extra["ChecksumMode"] = "ENABLED"
    if if_match is not None:
        extra["IfMatch"] = f'"{if_match}"'
    if version_id is not None:
        extra["VersionId"] = version_id
    try:
        resp = client.head_object(Bucket=bucket, Key=key, **extra)
    except ClientError as exc:
        if error_code(exc) in ("404", "NoSuchKey", "NotFound"):
            return None
        raise classify(exc) from None
    except BotoCoreError as exc:
        raise classify(exc) from None
    return Head(
        size=int(resp["ContentLength"]),
        etag=strip_etag(resp["ETag"]),
        sse=resp.get("ServerSideEncryption"),
        storage_class=listed_class(resp.get("StorageClass")),
        checksum=_checksum(resp) if checksum else None,
        version_id=resp.get("VersionId"),
    )


def copy(
    client: Any,
    src_bucket: str,
    src_key: str,
    dst_bucket: str,
    dst_key: str,
    if_match: str,
    *,
    if_absent: bool = False,
    attrs: ObjectAttributes = DEFAULT_ATTRIBUTES,
    storage_class: str | None = None,
) -> str:
    """Server-side copy of exactly the planned version; returns the destination ETag.

    ``CopySourceIfMatch`` makes S3 refuse (412) when the source changed after planning;
    with ``if_absent``, ``If-None-Match: *`` also makes it refuse (412) when the destination key
    already holds an object, so nothing is overwritten unseen. Content headers, user metadata
    and tags are copied by S3 (``MetadataDirective=COPY``) unless ``attrs`` replaces them;
    ``attrs`` also sets the storage class (else ``storage_class``, the listed one),
    encryption and ACL (``storage/attributes.py``).
    """
    extra = attrs.copy_args(storage_class)
    if if_absent:
        extra["IfNoneMatch"] = "*"
    try:
        resp = client.copy_object(
            Bucket=dst_bucket,
            Key=dst_key,
            CopySource={"Bucket": src_bucket, "Key": src_key},
            CopySourceIfMatch=f'"{if_match}"',
            **extra,
        )
    except (ClientError, BotoCoreError) as exc:
        raise classify(exc) from None
    return strip_etag(resp["CopyObjectResult"]["ETag"])


def copy_version(
    client: Any,
    src_bucket: str,
    src_key: str,
    version_id: str,
    dst_bucket: str,
    dst_key: str,
    *,
    attrs: ObjectAttributes = DEFAULT_ATTRIBUTES,
    storage_class: str | None = None,
) -> tuple[str, str | None]:
    """Server-side copy of one version of the source (``CopySource`` with ``VersionId``: that
    version and no other, whatever was written since); returns the destination's ETag and
    the version id S3 gave the copy (None in a bucket without versioning). Headers, metadata
    and tags are the version's own, or what ``attrs`` sets, as :func:`copy` does."""
    try:
        resp = client.copy_object(
            Bucket=dst_bucket,
            Key=dst_key,
            CopySource={"Bucket": src_bucket, "Key": src_key, "VersionId": version_id},
            **attrs.copy_args(storage_class),
        )
    except (ClientError, BotoCoreError) as exc:
        raise classify(exc) from None
    return strip_etag(resp["CopyObjectResult"]["ETag"]), resp.get("VersionId")


def delete_versions(
    client: Any, bucket: str, versions: Sequence[tuple[str, str]]
) -> dict[tuple[str, str], str]:
    """``DeleteObjects`` of ≤ 1,000 ``(key, version id)``: those versions are removed for
    good (no delete marker). Returns ``{(key, version id): error}`` for those S3 did not
    delete; a version already gone counts as deleted, which makes a replay harmless."""
    if not versions:
        return {}
    if len(versions) > DELETE_BATCH:
        raise ValueError(f"at most {DELETE_BATCH} versions per DeleteObjects request")
    try:
        resp = client.delete_objects(
            Bucket=bucket,
            Delete={
                "Objects": [{"Key": k, "VersionId": v} for k, v in versions],
                "Quiet": True,
            },
        )
    except (ClientError, BotoCoreError) as exc:
        err = classify(exc)
        return dict.fromkeys(versions, str(err))
    errors: dict[tuple[str, str], str] = {}
    for e in resp.get("Errors", ()):
        if e.get("Code") in ("NoSuchVersion", "NoSuchKey"):
            continue  # gone already: deleted by an earlier attempt
        errors[(e["Key"], e.get("VersionId", ""))] = f"{e.get('Code')}: {e.get('Message', '')}"
    return errors


# What CreateMultipartUpload must be told to give the destination the source's headers, which
# CopyObject's MetadataDirective=COPY carries over by itself.
_CARRIED_HEADERS = (
    "ContentType",
    "CacheControl",
    "ContentDisposition",
    "ContentEncoding",
    "ContentLanguage",
    "Expires",
    "Metadata",
    "StorageClass",
    "WebsiteRedirectLocation",
)


@dataclass(frozen=True)
class MultipartCopy:
    """A completed multipart copy: the ETag S3 gave the object, and the one its parts imply
    (MD5 of the parts' MD5s, ``-N``); equal means the object is exactly those parts."""

    etag: str
    expected_etag: str
    parts: int
    sse: str | None = None  # the completed object's encryption, as S3 answered
    version_id: str | None = None  # the version S3 gave the object (a versioned bucket)


def abort_incomplete(client: Any, bucket: str, key: str) -> int:
    """Abort every incomplete multipart upload to exactly ``key`` (a worker killed mid-copy
    leaves one, whose parts are billed until aborted); returns how many were aborted."""
    aborted = 0
    try:
        for page in client.get_paginator("list_multipart_uploads").paginate(
            Bucket=bucket, Prefix=key
        ):
            for upload in page.get("Uploads", ()):
                if upload["Key"] == key:
                    _abort(client, bucket, key, upload["UploadId"])
                    aborted += 1
    except (ClientError, BotoCoreError) as exc:
        raise classify(exc) from None
    return aborted


def _abort(client: Any, bucket: str, key: str, upload_id: str) -> None:
    try:
        client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
    except ClientError as exc:
        if error_code(exc) != "NoSuchUpload":  # already aborted or completed: nothing left
            raise


def _carried_headers(
    client: Any,
    bucket: str,
    key: str,
    if_match: str,
    *,
    tags: bool = True,
    version_id: str | None = None,
) -> dict[str, Any]:
    """The planned source version's headers (and with ``tags`` its tags) as
    CreateMultipartUpload arguments. ``IfMatch`` makes a source that changed since plan fail
    here (412) before any part; ``version_id`` reads that version of the key."""
    which = {"VersionId": version_id} if version_id is not None else {}
    resp = client.head_object(Bucket=bucket, Key=key, IfMatch=f'"{if_match}"', **which)
    args = {name: resp[name] for name in _CARRIED_HEADERS if resp.get(name)}
    if tags and resp.get("TagCount"):
        tags = client.get_object_tagging(Bucket=bucket, Key=key, **which)["TagSet"]
        args["Tagging"] = urlencode([(t["Key"], t["Value"]) for t in tags])
    return args


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


class S3Service:
    """One side's S3 for one process. The hot calls (copy, delete, list) go through the CRT
    path when it is configured, else through boto3 on a thread pool; the rare ones (HEAD, the
    pre-flight checks) always through boto3."""

    def __init__(self, boto: Any, fast: CrtS3 | None, threads: int) -> None:
        self.boto = boto
        self.fast = fast
        self.threads = threads
        self._pool: ThreadPoolExecutor | None = None
        self._part_pool: ThreadPoolExecutor | None = None

    def list_pages(self, bucket: str, prefix: str) -> Iterator[list[ListedObject]]:
        """Pages of the listing; a request that still fails after its retries ends it with a
        one-line ``StorageError``."""
        pages = (
            self.fast.list_pages(bucket, prefix)
            if self.fast is not None
            else list_pages(self.boto, bucket, prefix)
        )
        try:
            yield from pages
        except (S3OperationError, ClientError, BotoCoreError) as exc:
            err = exc if isinstance(exc, S3OperationError) else classify(exc)
            raise StorageError(
                f"listing s3://{bucket}/{prefix} failed: {err}; the plan is not complete: "
                "fix the cause and run the command again"
            ) from None

    def list_version_pages(self, bucket: str, prefix: str) -> Iterator[list[list[ListedVersion]]]:
        """Pages of ``ListObjectVersions`` (:func:`list_version_pages`, through boto3); a
        request that still fails after its retries ends it with a one-line ``StorageError``."""
        try:
            yield from list_version_pages(self.boto, bucket, prefix)
        except (ClientError, BotoCoreError) as exc:
            raise StorageError(
                f"listing the versions of s3://{bucket}/{prefix} failed: {classify(exc)}; the "
                "plan is not complete: fix the cause (s3:ListBucketVersions) and run the "
                "command again"
            ) from None

    def head(
        self,
        bucket: str,
        key: str,
        *,
        checksum: bool = False,
        if_match: str | None = None,
        version_id: str | None = None,
    ) -> Head | None:
        """See :func:`head`. Raises :class:`S3OperationError`."""
        return head(
            self.boto, bucket, key, checksum=checksum, if_match=if_match, version_id=version_id
        )

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        """``fn`` over ``items`` on this side's thread pool (``concurrency`` at a time)."""
        return list(self._threads().map(fn, items))

    def head_many(
        self, requests: Sequence[tuple[str, str, str | None]]
    ) -> list[Head | S3OperationError | None]:
        """``HeadObject`` with checksums of ``(bucket, key, if_match)`` in parallel (on the
        boto3 pool, whatever the transport): per request the head, None when there is no such
        object, or the error (a 412 when ``if_match`` no longer matches)."""

        def one(request: tuple[str, str, str | None]) -> Head | S3OperationError | None:
            bucket, key, if_match = request
            try:
                return head(self.boto, bucket, key, checksum=True, if_match=if_match)
            except S3OperationError as err:
                return err

        return list(self._threads().map(one, requests))

    def _threads(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="s3")
        return self._pool

    def copy(
        self,
        src_bucket: str,
        item: CopyItem,
        dst_bucket: str,
        *,
        if_absent: bool = False,
        attrs: ObjectAttributes = DEFAULT_ATTRIBUTES,
    ) -> str:
        """One copy; see :func:`copy`. Raises :class:`S3OperationError`."""
        [result] = self.copy_many(src_bucket, dst_bucket, [item], if_absent=if_absent, attrs=attrs)
        if isinstance(result, S3OperationError):
            raise result
        assert result is not None
        return result

    def copy_many(
        self,
        src_bucket: str,
        dst_bucket: str,
        items: Sequence[CopyItem],
        *,
        if_absent: bool,
        stop: Any = None,
        attrs: ObjectAttributes = DEFAULT_ATTRIBUTES,
    ) -> list[str | S3OperationError | None]:
        """The ``CopyItem``s' copies in parallel, writing the destination objects with
        ``attrs``: per item the destination ETag, the error, or None when ``stop`` was set
        before it was sent."""
        if self.fast is not None:
            return self.fast.copy_many(
                src_bucket, dst_bucket, items, if_absent=if_absent, stop=stop, attrs=attrs
            )

        def one(item: CopyItem) -> str | S3OperationError | None:
            if stop is not None and stop.is_set():
                return None
            try:
                return copy(
                    self.boto,
                    src_bucket,
                    item.source_key,
                    dst_bucket,
                    item.dest_key,
                    item.etag,
                    if_absent=if_absent,
                    attrs=attrs,
                    storage_class=item.storage_class,
                )
            except S3OperationError as err:
                return err

        return list(self._threads().map(one, items))

    def copy_multipart(
        self,
        src_bucket: str,
        src_key: str,
        dst_bucket: str,
        dst_key: str,
        if_match: str,
        size: int,
        part_size: int,
        *,
        if_absent: bool,
        stop: Any = None,
        before_complete: Callable[[str], bool] | None = None,
        attrs: ObjectAttributes = DEFAULT_ATTRIBUTES,
        version_id: str | None = None,
    ) -> MultipartCopy | S3OperationError | None:
        """Server-side copy in parts of exactly the planned version (``version_id``: of that
        version of the key): the completed copy, the
        error, or None when ``stop`` was set before every part was sent (or
        ``before_complete``, told the ETag the object will have, answered False).

        Every ``UploadPartCopy`` carries ``CopySourceIfMatch`` (a changed source fails with
        412, as a single copy does); the rest is :meth:`upload_in_parts`. Parts go out through
        boto3 (these calls are few and big; botocore retries each one). The object gets the
        source's headers, tags and storage class, or what ``attrs`` sets instead, as a single
        copy does.
        """
        source = {"Bucket": src_bucket, "Key": src_key}
        if version_id is not None:
            source["VersionId"] = version_id

        def copy_part(upload_id: str, part: Part) -> str:
            resp = self.boto.upload_part_copy(
                Bucket=dst_bucket,
                Key=dst_key,
                UploadId=upload_id,
                PartNumber=part.number,
                CopySource=source,
                CopySourceIfMatch=f'"{if_match}"',
                CopySourceRange=part.range,
            )
            return strip_etag(resp["CopyPartResult"]["ETag"])

        return self.upload_in_parts(
            dst_bucket,
            dst_key,
            plan_parts(size, part_size),
            size,
            headers=lambda: _carried_headers(
                self.boto,
                src_bucket,
                src_key,
                if_match,
                tags=not attrs.replace_tags,
                version_id=version_id,
            ),
            send_part=copy_part,
            if_absent=if_absent,
            stop=stop,
            before_complete=before_complete,
            attrs=attrs,
        )

    def upload_in_parts(
        self,
        dst_bucket: str,
        dst_key: str,
        parts: list[Part],
        size: int,
        *,
        headers: Callable[[], dict[str, Any]],
        send_part: Callable[[str, Part], str],
        if_absent: bool,
        stop: Any = None,
        before_complete: Callable[[str], bool] | None = None,
        attrs: ObjectAttributes = DEFAULT_ATTRIBUTES,
    ) -> MultipartCopy | S3OperationError | None:
        """A multipart upload to ``dst_key`` in this service, whose parts ``send_part`` makes
        (``UploadPartCopy``, or a streamed ``UploadPart``): the completed upload, the error, or
        None when ``stop`` was set before every part was sent (or ``before_complete``, told
        the ETag the object will have, answered False).

        Incomplete uploads to ``dst_key`` (left by a killed worker) are aborted first; then
        ``headers()`` gives the source's headers and tags (it reads the planned source version,
        so a changed source fails there, before any part), to which ``attrs`` applies the
        job's attributes for ``CreateMultipartUpload``. With ``if_absent`` a
        destination that exists is refused (412) before any part is sent, and
        ``CompleteMultipartUpload`` carries ``If-None-Match: *`` for one created meanwhile.
        Any failure aborts this upload, so no parts are left behind. Parts go out in
        parallel, at most ``threads`` at a time.
        """
        if stop is not None and stop.is_set():
            return None
        upload_id: str | None = None
        try:
            if if_absent and head(self.boto, dst_bucket, dst_key) is not None:
                return S3OperationError(
                    ErrorKind.SOURCE_CHANGED,  # what a 412 is classified as; the caller looks
                    "PreconditionFailed",
                    "the destination key already holds an object",
                )
            abort_incomplete(self.boto, dst_bucket, dst_key)
            carried = headers()
            upload_id = self.boto.create_multipart_upload(
                Bucket=dst_bucket, Key=dst_key, **attrs.upload_args(carried)
            )["UploadId"]
            etags = self._send_parts(upload_id, parts, send_part, stop)
            expected = multipart_etag(etags) if etags is not None else ""
            if etags is None or (before_complete is not None and not before_complete(expected)):
                _abort(self.boto, dst_bucket, dst_key, upload_id)
                return None
            extra = {"IfNoneMatch": "*"} if if_absent else {}
            resp = self.boto.complete_multipart_upload(
                Bucket=dst_bucket,
                Key=dst_key,
                UploadId=upload_id,
                MultipartUpload={
                    "Parts": [
                        {"ETag": e, "PartNumber": p.number}
                        for p, e in zip(parts, etags, strict=True)
                    ]
                },
                MpuObjectSize=size,  # S3 refuses to complete an object of any other size
                **extra,
            )
        except (ClientError, BotoCoreError, S3OperationError) as exc:
            err = exc if isinstance(exc, S3OperationError) else classify(exc)
            if upload_id is not None:
                self._abort_quietly(dst_bucket, dst_key, upload_id)
            return err
        except BaseException:  # e.g. the ledger failed in before_complete: no parts left behind
            if upload_id is not None:
                self._abort_quietly(dst_bucket, dst_key, upload_id)
            raise
        return MultipartCopy(
            strip_etag(resp["ETag"]),
            expected,
            len(parts),
            resp.get("ServerSideEncryption"),
            resp.get("VersionId"),
        )

    def _send_parts(
        self,
        upload_id: str,
        parts: list[Part],
        send_part: Callable[[str, Part], str],
        stop: Any,
    ) -> list[str] | None:
        """``send_part`` for every part, in parallel; the part ETags in order, or None when a
        stop request left parts unsent. The first failure stops further sends and is raised (a
        changed source first: that decides what happens to the row)."""
        failed = threading.Event()

        def one(part: Part) -> str | S3OperationError | None:
            if failed.is_set() or (stop is not None and stop.is_set()):
                return None
            try:
                return send_part(upload_id, part)
            except (ClientError, BotoCoreError, S3OperationError) as exc:
                failed.set()
                return exc if isinstance(exc, S3OperationError) else classify(exc)

        if self._part_pool is None:
            self._part_pool = ThreadPoolExecutor(self.threads, thread_name_prefix="s3-part")
        results = list(self._part_pool.map(one, parts))
        errors = [r for r in results if isinstance(r, S3OperationError)]
        if errors:
            changed = [e for e in errors if e.kind is ErrorKind.SOURCE_CHANGED]
            raise (changed or errors)[0]
        if any(r is None for r in results):
            return None
        return [r for r in results if isinstance(r, str)]

    def _abort_quietly(self, bucket: str, key: str, upload_id: str) -> None:
        """Abort after a failure; if the abort fails too, the next attempt's
        :func:`abort_incomplete` (or the bucket's lifecycle rule) removes the upload."""
        with contextlib.suppress(ClientError, BotoCoreError):
            _abort(self.boto, bucket, key, upload_id)

    def delete(self, bucket: str, keys: list[str]) -> dict[str, str]:
        if len(keys) > DELETE_BATCH:
            raise ValueError(f"at most {DELETE_BATCH} keys per DeleteObjects request")
        if self.fast is not None:
            return self.fast.delete(bucket, keys)
        return delete(self.boto, bucket, keys)

    def close(self) -> None:
        for pool in (self._pool, self._part_pool):
            if pool is not None:
                pool.shutdown()
        if self.fast is not None:
            self.fast.close()


def service(
    location: Location, transport: str, concurrency: int, retries: RetryCounter | None = None
) -> S3Service:
    """The :class:`S3Service` for one side, ``concurrency`` requests in flight."""
    factory = ClientFactory(location, max_pool=concurrency + 4)
    boto = factory.client(retries)
    fast = None
    if transport == "crt":
        fast = CrtS3(
            boto,
            factory.session.get_credentials(),
            boto.meta.region_name,
            max_connections=concurrency,
            max_attempts=factory.max_attempts,
            connect_timeout=factory.connect_timeout,
            ca_bundle=factory.core.get_config_variable("ca_bundle"),
            retry_counter=retries,
        )
    return S3Service(boto, fast, concurrency)
