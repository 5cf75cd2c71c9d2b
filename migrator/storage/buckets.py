"""Bucket-level S3 calls, for ``migrator relocate``: a bucket's region, creating and deleting
buckets, reading and re-applying a bucket's configuration, listing and deleting every version,
and the facts of one object that a relocated copy must keep.

The client is passed in (``ClientFactory``); S3's refusals come back as classified
:class:`S3OperationError`, so the caller decides what each one means for the relocation.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from botocore.exceptions import BotoCoreError, ClientError

from migrator.storage.common import S3OperationError, listed_class, strip_etag
from migrator.storage.s3 import DELETE_BATCH, classify, error_code

US_EAST_1 = "us-east-1"
# A server that does not implement a setting: nothing to carry (it cannot have been set).
_UNSUPPORTED = frozenset({"NotImplemented", "501"})


def _call(fn: Callable[..., Any], **kwargs: Any) -> Any:
    """A client call whose failure is a classified :class:`S3OperationError`."""
    try:
        return fn(**kwargs)
    except (ClientError, BotoCoreError) as exc:
        raise classify(exc) from None


def region_of(client: Any, bucket: str) -> str:
    """The bucket's region (``GetBucketLocation``; no constraint means us-east-1, ``EU`` is
    the old name of eu-west-1)."""
    location = _call(client.get_bucket_location, Bucket=bucket).get("LocationConstraint")
    if not location:
        return US_EAST_1
    return "eu-west-1" if location == "EU" else str(location)


def exists(client: Any, bucket: str) -> bool:
    """Whether the bucket exists (``HeadBucket``: 404 is no; 403, another account's, is yes)."""
    try:
        client.head_bucket(Bucket=bucket)
    except ClientError as exc:
        if error_code(exc) in ("404", "NoSuchBucket", "NotFound"):
            return False
        if error_code(exc) in ("403", "AccessDenied"):
            return True
        raise classify(exc) from None
    except BotoCoreError as exc:
        raise classify(exc) from None
    return True


def create(client: Any, bucket: str, region: str) -> None:
    """``CreateBucket`` in ``region``. A bucket this account already owns is no error
    (``BucketAlreadyOwnedByYou``, or in us-east-1 a plain success): the caller checks its
    region and contents. ``BucketAlreadyExists`` (another account's, or a name S3 has not
    freed yet) and ``OperationAborted`` are raised with their codes."""
    args: dict[str, Any] = {}
    if region != US_EAST_1:
        args["CreateBucketConfiguration"] = {"LocationConstraint": region}
    try:
        client.create_bucket(Bucket=bucket, **args)
    except ClientError as exc:
        if error_code(exc) == "BucketAlreadyOwnedByYou":
            return
        raise classify(exc) from None
    except BotoCoreError as exc:
        raise classify(exc) from None


def delete(client: Any, bucket: str) -> bool:
    """``DeleteBucket``: True when it is gone (now or before), False when it is not empty."""
    try:
        client.delete_bucket(Bucket=bucket)
    except ClientError as exc:
        code = error_code(exc)
        if code == "NoSuchBucket":
            return True
        if code == "BucketNotEmpty":
            return False
        raise classify(exc) from None
    except BotoCoreError as exc:
        raise classify(exc) from None
    return True


def versioning(client: Any, bucket: str) -> tuple[str | None, bool]:
    """The versioning status (None if never versioned, else ``Enabled`` or ``Suspended``) and
    whether MFA delete is on."""
    resp = _call(client.get_bucket_versioning, Bucket=bucket)
    return resp.get("Status") or None, resp.get("MFADelete") == "Enabled"


def object_lock_enabled(client: Any, bucket: str) -> bool:
    try:
        resp = client.get_object_lock_configuration(Bucket=bucket)
    except ClientError as exc:
        if error_code(exc) in ("ObjectLockConfigurationNotFoundError", *_UNSUPPORTED):
            return False
        raise classify(exc) from None
    except BotoCoreError as exc:
        raise classify(exc) from None
    return resp.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled") == "Enabled"


# -- configuration ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One part of a bucket's configuration: how to read it (None: not set) and to apply it.
    ``last`` settings are applied only after the objects are back: lifecycle rules would act
    on the fresh copies (their ages start again), and a policy may deny the copies' writes
    (e.g. uploads without a given encryption header). ``clear``: how to remove what a new
    bucket has by default when the old one had none."""

    name: str
    read: Callable[[Any, str], Any]
    write: Callable[[Any, str, Any], Any]
    absent: frozenset[str]
    last: bool = False
    clear: Callable[[Any, str], Any] | None = None


def _website(resp: dict[str, Any]) -> dict[str, Any]:
    parts = ("IndexDocument", "ErrorDocument", "RedirectAllRequestsTo", "RoutingRules")
    return {k: resp[k] for k in parts if k in resp}


def _lifecycle(resp: dict[str, Any]) -> dict[str, Any]:
    found = {"Rules": resp["Rules"]}
    if resp.get("TransitionDefaultMinimumObjectSize"):
        found["TransitionDefaultMinimumObjectSize"] = resp["TransitionDefaultMinimumObjectSize"]
    return found


def _put_lifecycle(client: Any, bucket: str, value: dict[str, Any]) -> Any:
    extra = {}
    if value.get("TransitionDefaultMinimumObjectSize"):
        extra["TransitionDefaultMinimumObjectSize"] = value["TransitionDefaultMinimumObjectSize"]
    return client.put_bucket_lifecycle_configuration(
        Bucket=bucket, LifecycleConfiguration={"Rules": value["Rules"]}, **extra
    )


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "ownership_controls",
        lambda c, b: c.get_bucket_ownership_controls(Bucket=b)["OwnershipControls"],
        lambda c, b, v: c.put_bucket_ownership_controls(Bucket=b, OwnershipControls=v),
        frozenset({"OwnershipControlsNotFoundError"}),
        clear=lambda c, b: c.delete_bucket_ownership_controls(Bucket=b),
    ),
    Setting(
        "public_access_block",
        lambda c, b: c.get_public_access_block(Bucket=b)["PublicAccessBlockConfiguration"],
        lambda c, b, v: c.put_public_access_block(Bucket=b, PublicAccessBlockConfiguration=v),
        frozenset({"NoSuchPublicAccessBlockConfiguration"}),
        clear=lambda c, b: c.delete_public_access_block(Bucket=b),
    ),
    Setting(
        "encryption",
        lambda c, b: c.get_bucket_encryption(Bucket=b)["ServerSideEncryptionConfiguration"],
        lambda c, b, v: c.put_bucket_encryption(Bucket=b, ServerSideEncryptionConfiguration=v),
        frozenset({"ServerSideEncryptionConfigurationNotFoundError"}),
    ),
    Setting(
        "versioning",
        lambda c, b: c.get_bucket_versioning(Bucket=b).get("Status") or None,
        lambda c, b, v: c.put_bucket_versioning(Bucket=b, VersioningConfiguration={"Status": v}),
        frozenset(),
    ),
    Setting(
        "tags",
        lambda c, b: c.get_bucket_tagging(Bucket=b)["TagSet"],
        lambda c, b, v: c.put_bucket_tagging(Bucket=b, Tagging={"TagSet": v}),
        frozenset({"NoSuchTagSet", "NoSuchTagSetError"}),
    ),
    Setting(
        "cors",
        lambda c, b: c.get_bucket_cors(Bucket=b)["CORSRules"],
        lambda c, b, v: c.put_bucket_cors(Bucket=b, CORSConfiguration={"CORSRules": v}),
        frozenset({"NoSuchCORSConfiguration"}),
    ),
    Setting(
        "website",
        lambda c, b: _website(c.get_bucket_website(Bucket=b)),
        lambda c, b, v: c.put_bucket_website(Bucket=b, WebsiteConfiguration=v),
        frozenset({"NoSuchWebsiteConfiguration"}),
    ),
    Setting(
        "lifecycle",
        lambda c, b: _lifecycle(c.get_bucket_lifecycle_configuration(Bucket=b)),
        _put_lifecycle,
        frozenset({"NoSuchLifecycleConfiguration"}),
        last=True,
    ),
    Setting(
        "policy",
        lambda c, b: c.get_bucket_policy(Bucket=b)["Policy"],
        lambda c, b, v: c.put_bucket_policy(Bucket=b, Policy=v),
        frozenset({"NoSuchBucketPolicy"}),
        last=True,
    ),
)


class SettingError(Exception):
    """A setting that could not be read or applied: which one, and S3's error."""

    def __init__(self, setting: str, error: S3OperationError) -> None:
        super().__init__(f"{setting}: {error}")
        self.setting = setting
        self.error = error


def read_settings(client: Any, bucket: str) -> dict[str, Any]:
    """The bucket's configuration as ``{setting: value}`` (None where it is not set), plus
    ``unsupported``: the settings this S3 server does not implement. JSON-safe (timestamps as
    ISO 8601 text, which boto3 takes back)."""
    found: dict[str, Any] = {}
    unsupported: list[str] = []
    for s in SETTINGS:
        try:
            found[s.name] = s.read(client, bucket)
        except ClientError as exc:
            code = error_code(exc)
            if code in s.absent:
                found[s.name] = None
            elif code in _UNSUPPORTED:
                unsupported.append(s.name)
            else:
                raise SettingError(s.name, classify(exc)) from None
        except BotoCoreError as exc:
            raise SettingError(s.name, classify(exc)) from None
    found["unsupported"] = unsupported
    return json.loads(json.dumps(found, default=lambda v: v.isoformat()))


def apply_settings(client: Any, bucket: str, recorded: dict[str, Any], *, last: bool) -> list[str]:
    """Apply the recorded settings (the ``last`` ones, or the others) to the bucket; a setting
    the old bucket did not have is removed where a new bucket has it by default. Each call
    replaces a whole setting, so applying twice is harmless. Returns the names applied."""
    applied = []
    for s in SETTINGS:
        if s.last != last or s.name in recorded.get("unsupported", ()):
            continue
        value = recorded.get(s.name)
        try:
            if value is not None:
                s.write(client, bucket, value)
                applied.append(s.name)
            elif s.clear is not None:
                s.clear(client, bucket)
        except ClientError as exc:
            if value is None and error_code(exc) in (*s.absent, *_UNSUPPORTED):
                continue  # nothing there to remove
            raise SettingError(s.name, classify(exc)) from None
        except BotoCoreError as exc:
            raise SettingError(s.name, classify(exc)) from None
    return applied


# Settings relocate does not carry over, and how to tell that a bucket has one.
_UNCARRIED: tuple[tuple[str, Callable[[Any, str], bool]], ...] = (
    ("server access logging", lambda c, b: "LoggingEnabled" in c.get_bucket_logging(Bucket=b)),
    (
        "event notifications",
        lambda c, b: any(
            c.get_bucket_notification_configuration(Bucket=b).get(k)
            for k in (
                "TopicConfigurations",
                "QueueConfigurations",
                "LambdaFunctionConfigurations",
                "EventBridgeConfiguration",
            )
        ),
    ),
    ("replication", lambda c, b: bool(c.get_bucket_replication(Bucket=b))),
    (
        "inventory",
        lambda c, b: bool(
            c.list_bucket_inventory_configurations(Bucket=b).get("InventoryConfigurationList")
        ),
    ),
    (
        "transfer acceleration",
        lambda c, b: c.get_bucket_accelerate_configuration(Bucket=b).get("Status") == "Enabled",
    ),
    (
        "requester pays",
        lambda c, b: c.get_bucket_request_payment(Bucket=b).get("Payer") == "Requester",
    ),
)


def uncarried_settings(client: Any, bucket: str) -> list[str]:
    """The bucket's settings that relocate does not carry over (to be re-created by hand). A
    setting that is absent, or that cannot be read, is left out: this is advice, not a check."""
    found = []
    for name, present in _UNCARRIED:
        try:
            if present(client, bucket):
                found.append(name)
        except (ClientError, BotoCoreError):
            continue
    return found


def kms_key_region(recorded_encryption: Any) -> tuple[str, str] | None:
    """The default encryption's KMS key and the region its ARN names, if it names one (a key
    id or alias without an ARN belongs to the bucket's region implicitly)."""
    for rule in (recorded_encryption or {}).get("Rules", ()):
        key = rule.get("ApplyServerSideEncryptionByDefault", {}).get("KMSMasterKeyID") or ""
        parts = key.split(":")
        if key.startswith("arn:") and len(parts) > 3 and parts[3]:
            return key, parts[3]
        if key and not key.startswith("arn:") and key != "aws/s3" and key != "alias/aws/s3":
            return key, ""
    return None


# -- objects and versions -----------------------------------------------------------------


class Version(NamedTuple):
    """One entry of a bucket's listing: an object version or a delete marker."""

    key: str
    version_id: str | None  # None: an unversioned bucket's object (deleted by key)
    etag: str | None  # None for a delete marker
    size: int
    latest: bool
    marker: bool


def list_versions(client: Any, bucket: str, versioned: bool) -> Iterator[list[Version]]:
    """Every entry of the bucket, a page at a time: ``ListObjectVersions`` (versions and
    delete markers) on a bucket that has been versioned, ``ListObjectsV2`` on one never
    versioned (where every object is its only, latest version)."""
    try:
        if not versioned:
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
                yield [
                    Version(o["Key"], None, strip_etag(o["ETag"]), int(o["Size"]), True, False)
                    for o in page.get("Contents", ())
                ]
            return
        for page in client.get_paginator("list_object_versions").paginate(Bucket=bucket):
            entries = [
                Version(
                    v["Key"],
                    v["VersionId"],
                    strip_etag(v["ETag"]),
                    int(v["Size"]),
                    bool(v["IsLatest"]),
                    False,
                )
                for v in page.get("Versions", ())
            ]
            entries += [
                Version(m["Key"], m["VersionId"], None, 0, bool(m["IsLatest"]), True)
                for m in page.get("DeleteMarkers", ())
            ]
            yield entries
    except (ClientError, BotoCoreError) as exc:
        raise classify(exc) from None


def delete_versions(client: Any, bucket: str, entries: Sequence[Version]) -> dict[str, str]:
    """``DeleteObjects`` of exactly these versions (or keys, when unversioned), ≤ 1,000 per
    request; returns ``{key: error}`` for what S3 did not delete. Deleting a version by its id
    removes it for good (no delete marker)."""
    errors: dict[str, str] = {}
    for start in range(0, len(entries), DELETE_BATCH):
        batch = entries[start : start + DELETE_BATCH]
        objects = [
            {"Key": e.key} if e.version_id is None else {"Key": e.key, "VersionId": e.version_id}
            for e in batch
        ]
        resp = _call(
            client.delete_objects, Bucket=bucket, Delete={"Objects": objects, "Quiet": True}
        )
        errors.update(
            (e["Key"], f"{e.get('Code')}: {e.get('Message', '')}") for e in resp.get("Errors", ())
        )
    return errors


def abort_uploads(client: Any, bucket: str) -> int:
    """Abort every incomplete multipart upload in the bucket (a bucket is not empty while it
    has one); returns how many."""
    n = 0
    try:
        for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket):
            for upload in page.get("Uploads", ()):
                try:
                    client.abort_multipart_upload(
                        Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                    )
                except ClientError as exc:
                    if error_code(exc) != "NoSuchUpload":
                        raise
                n += 1
    except (ClientError, BotoCoreError) as exc:
        raise classify(exc) from None
    return n


# Response headers a relocated copy must carry as they are (besides size and ETag).
KEPT_HEADERS = (
    "content-type",
    "cache-control",
    "content-disposition",
    "content-encoding",
    "content-language",
    "expires",
    "x-amz-website-redirect-location",
)


@dataclass(frozen=True)
class ObjectFacts:
    """What ``migrator relocate`` checks of a copy against its source."""

    size: int
    etag: str
    storage_class: str | None  # None for STANDARD
    headers: tuple[tuple[str, str], ...]  # KEPT_HEADERS that are set
    metadata: tuple[tuple[str, str], ...]  # x-amz-meta-* (names lowercase)
    tags: tuple[tuple[str, str], ...]

    def differences(self, other: ObjectFacts) -> list[str]:
        """What differs besides size and ETag (which the caller judges against the ledger)."""
        diff = []
        if self.storage_class != other.storage_class:
            diff.append("storage class")
        mine, theirs = dict(self.headers), dict(other.headers)
        diff += [h for h in KEPT_HEADERS if mine.get(h) != theirs.get(h)]
        if self.metadata != other.metadata:
            diff.append("user metadata")
        if self.tags != other.tags:
            diff.append("tags")
        return diff


def object_facts(client: Any, bucket: str, key: str) -> ObjectFacts | None:
    """``HeadObject`` (and ``GetObjectTagging`` when the object has tags) of the latest
    version; None when there is no such object."""
    try:
        resp = client.head_object(Bucket=bucket, Key=key)
        headers = resp["ResponseMetadata"]["HTTPHeaders"]
        tags: list[dict[str, str]] = []
        if int(resp.get("TagCount") or 0):
            tags = client.get_object_tagging(Bucket=bucket, Key=key)["TagSet"]
    except ClientError as exc:
        if error_code(exc) in ("404", "NoSuchKey", "NotFound"):
            return None
        raise classify(exc) from None
    except BotoCoreError as exc:
        raise classify(exc) from None
    return ObjectFacts(
        size=int(resp["ContentLength"]),
        etag=strip_etag(resp["ETag"]),
        storage_class=listed_class(resp.get("StorageClass")),
        headers=tuple((h, headers[h]) for h in KEPT_HEADERS if h in headers),
        metadata=tuple(sorted((k, v) for k, v in headers.items() if k.startswith("x-amz-meta-"))),
        tags=tuple(sorted((t["Key"], t["Value"]) for t in tags)),
    )
