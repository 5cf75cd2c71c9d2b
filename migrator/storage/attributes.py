"""What a copy sets on the destination object beyond what ``CopyObject`` carries by itself.

``CopyObject`` with ``MetadataDirective`` and ``TaggingDirective`` ``COPY`` (S3's defaults)
gives the copy the source's content headers (type, cache-control, disposition, encoding,
language, expires), its user metadata and its tags. It does **not** carry the storage class
(without ``x-amz-storage-class`` the copy is ``STANDARD``), the server-side encryption
(without ``x-amz-server-side-encryption`` the destination bucket's default encryption
applies), the ACL (without ``x-amz-acl`` the copy is private to the bucket owner) or object
lock settings. :class:`ObjectAttributes` is the job's choice for each of them, turned into
request headers (the ``crt`` transport), boto3 arguments (``transport: boto3``) and
``CreateMultipartUpload`` arguments (copies in parts), so every path writes the same object.

Pure: nothing here sends a request.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any
from urllib.parse import quote, urlencode

# The content headers ``metadata: replace`` may set: (config name, HTTP header, boto3 name).
CONTENT_HEADERS = (
    ("content_type", "content-type", "ContentType"),
    ("cache_control", "cache-control", "CacheControl"),
    ("content_disposition", "content-disposition", "ContentDisposition"),
    ("content_encoding", "content-encoding", "ContentEncoding"),
    ("content_language", "content-language", "ContentLanguage"),
    ("expires", "expires", "Expires"),
)

# Storage classes a general purpose bucket accepts in ``x-amz-storage-class``.
STORAGE_CLASSES = (
    "STANDARD",
    "REDUCED_REDUNDANCY",
    "STANDARD_IA",
    "ONEZONE_IA",
    "INTELLIGENT_TIERING",
    "GLACIER",
    "DEEP_ARCHIVE",
    "GLACIER_IR",
)

CANNED_ACLS = (
    "private",
    "public-read",
    "public-read-write",
    "authenticated-read",
    "aws-exec-read",
    "bucket-owner-read",
    "bucket-owner-full-control",
)

# Encryptions whose objects' ETags are not the MD5 of their bytes (S3's rule: only plain and
# SSE-S3 objects written in one request have one). SSE-C objects cannot be copied without
# their key, which migrator does not take, so they fail before any ETag is compared.
OPAQUE_ETAG_SSE = frozenset({"aws:kms", "aws:kms:dsse"})


def http_date(value: datetime) -> str:
    """``Expires`` as HTTP sends it: ``Wed, 01 Jan 2031 00:00:00 GMT``."""
    aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    return format_datetime(aware.astimezone(UTC), usegmt=True)


def tagging(tags: Mapping[str, str]) -> str:
    """A tag set as the ``x-amz-tagging`` header (and boto3's ``Tagging``) spells it."""
    return urlencode(list(tags.items()), quote_via=quote)


@dataclass(frozen=True)
class ObjectAttributes:
    """The job's ``metadata``, ``tags``, ``storage_class``, ``sse``, ``kms_key_id`` and ``acl``.

    ``content`` (with ``replace_metadata``) maps the names of :data:`CONTENT_HEADERS` to
    their values and ``user`` is the user metadata; ``tags`` (with ``replace_tags``) the tag
    set. ``storage_class`` None keeps each object's own (the class the plan listed), ``sse``
    None leaves the encryption to the destination bucket's default, ``acl`` None sends none.
    The default instance changes nothing: the copy request is exactly S3's default one.
    """

    replace_metadata: bool = False
    content: tuple[tuple[str, str | datetime], ...] = ()
    user: tuple[tuple[str, str], ...] = ()
    replace_tags: bool = False
    tags: tuple[tuple[str, str], ...] = ()
    storage_class: str | None = None
    sse: str | None = None
    kms_key_id: str | None = None
    acl: str | None = None

    def class_for(self, listed: str | None) -> str | None:
        """The storage class to ask for: the configured one, else the source's (None for
        ``STANDARD``, which a copy gets without asking)."""
        return self.storage_class or listed

    # -- the crt transport: header lists -------------------------------------------------
    @functools.cached_property
    def copy_headers(self) -> tuple[tuple[str, str], ...]:
        """``CopyObject`` headers for what the job sets, the storage class aside; a
        ``x-amz-metadata-directive`` here replaces the ``COPY`` one."""
        headers: list[tuple[str, str]] = []
        if self.replace_metadata:
            headers.append(("x-amz-metadata-directive", "REPLACE"))
            names = {name: header for name, header, _ in CONTENT_HEADERS}
            for name, value in self.content:
                text = http_date(value) if isinstance(value, datetime) else value
                headers.append((names[name], text))
            headers += [(f"x-amz-meta-{k}", v) for k, v in self.user]
        if self.replace_tags:
            headers.append(("x-amz-tagging-directive", "REPLACE"))
            if self.tags:
                headers.append(("x-amz-tagging", tagging(dict(self.tags))))
        headers += self._write_headers()
        return tuple(headers)

    def _write_headers(self) -> list[tuple[str, str]]:
        headers = []
        if self.sse is not None:
            headers.append(("x-amz-server-side-encryption", self.sse))
        if self.kms_key_id is not None:
            headers.append(("x-amz-server-side-encryption-aws-kms-key-id", self.kms_key_id))
        if self.acl is not None:
            headers.append(("x-amz-acl", self.acl))
        return headers

    # -- migrator check: the write probe ---------------------------------------------------
    def probe_args(self) -> dict[str, Any]:
        """``PutObject`` arguments for ``migrator check``'s probe object: the encryption, KMS
        key and ACL the copies get, which S3 checks rights and settings for (not the storage
        class: an archive class would bill a minimum duration for the probe)."""
        return self._write_args()

    def probe_labels(self) -> list[str]:
        labels = []
        if self.sse is not None:
            key = f" key {self.kms_key_id}" if self.kms_key_id else ""
            labels.append(f"{'SSE-KMS' if self.sse == 'aws:kms' else 'SSE-S3'}{key}")
        if self.acl is not None:
            labels.append(f"ACL {self.acl}")
        return labels

    # -- boto3: keyword arguments --------------------------------------------------------
    def _write_args(self) -> dict[str, Any]:
        args: dict[str, Any] = {}
        if self.sse is not None:
            args["ServerSideEncryption"] = self.sse
        if self.kms_key_id is not None:
            args["SSEKMSKeyId"] = self.kms_key_id
        if self.acl is not None:
            args["ACL"] = self.acl
        return args

    def _content_args(self) -> dict[str, Any]:
        names = {name: arg for name, _, arg in CONTENT_HEADERS}
        args: dict[str, Any] = {names[name]: value for name, value in self.content}
        args["Metadata"] = dict(self.user)
        return args

    def copy_args(self, listed_class: str | None) -> dict[str, Any]:
        """``copy_object`` arguments besides bucket, key, source and preconditions."""
        args: dict[str, Any] = {"MetadataDirective": "COPY"}
        if self.replace_metadata:
            args["MetadataDirective"] = "REPLACE"
            args.update(self._content_args())
        if self.replace_tags:
            args["TaggingDirective"] = "REPLACE"
            if self.tags:
                args["Tagging"] = tagging(dict(self.tags))
        storage_class = self.class_for(listed_class)
        if storage_class is not None:
            args["StorageClass"] = storage_class
        args.update(self._write_args())
        return args

    def upload_args(self, carried: Mapping[str, Any]) -> dict[str, Any]:
        """``CreateMultipartUpload`` arguments: the source's headers and tags (``carried``,
        read from the source as a copy would keep them) where the job keeps them, the job's
        values where it sets them."""
        if self.replace_metadata:
            args = self._content_args()
        else:
            args = {k: v for k, v in carried.items() if k not in ("Tagging", "StorageClass")}
        if not self.replace_tags:
            if "Tagging" in carried:
                args["Tagging"] = carried["Tagging"]
        elif self.tags:
            args["Tagging"] = tagging(dict(self.tags))
        storage_class = self.class_for(carried.get("StorageClass"))
        if storage_class is not None:
            args["StorageClass"] = storage_class
        args.update(self._write_args())
        return args


DEFAULT_ATTRIBUTES = ObjectAttributes()  # S3's own copy: nothing set, nothing replaced
