"""Copies that S3 cannot make by itself: the source's bytes streamed GET → PUT through this
process (``copy_mode: stream``, or ``auto`` across endpoints or credentials).

Memory stays bounded. An object up to ``multipart_threshold`` goes in one ``PutObject`` whose
body *is* the source's ``GetObject`` body, passed on 256 KiB at a time and never held whole.
A larger one goes in parts: each part is one ranged ``GetObject`` read into one buffer
(``part_size`` bytes) and sent from it with ``UploadPart``, at most ``threads`` parts at a
time. So a worker holds about ``concurrency × part_size`` bytes of objects at most.

The guarantees are those of the server-side path: every ``GetObject`` (and the ``HeadObject``
of a large source) carries ``If-Match`` with the planned ETag, so a source changed since plan
fails with 412 (I4); the ``PutObject`` / ``CompleteMultipartUpload`` carries
``If-None-Match: *`` unless overwriting. On top, the bytes are hashed as they pass: a single
``PutObject``'s ETag must be the MD5 of the bytes read, and every part is sent with its
``Content-MD5``, so what S3 stored is what was read from the planned version.
"""

from __future__ import annotations

import base64
import hashlib
import io
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlencode

from botocore.exceptions import BotoCoreError, ClientError

from migrator.storage.attributes import DEFAULT_ATTRIBUTES, ObjectAttributes
from migrator.storage.common import CopyItem, ErrorKind, S3OperationError, strip_etag
from migrator.storage.multipart import Part, plan_parts
from migrator.storage.s3 import _CARRIED_HEADERS, MultipartCopy, S3Service, classify

STREAM_CHUNK = 1 << 18  # bytes handed from the GET to the PUT at a time
_READ_CHUNK = 1 << 18  # bytes read from a part's GET at a time into its buffer


def put_arguments(source: Mapping[str, Any], tags: Sequence[Mapping[str, str]]) -> dict[str, Any]:
    """The source's headers (from its ``GetObject`` or ``HeadObject`` answer) and tags as
    ``PutObject`` / ``CreateMultipartUpload`` arguments: what ``CopyObject`` with
    ``MetadataDirective=COPY`` carries over by itself. The job's object attributes are
    applied to them by :meth:`ObjectAttributes.upload_args`, as for a server-side copy in
    parts."""
    args = {name: source[name] for name in _CARRIED_HEADERS if source.get(name)}
    if tags:
        args["Tagging"] = urlencode([(t["Key"], t["Value"]) for t in tags])
    return args


def _tags(
    client: Any, bucket: str, key: str, source: Mapping[str, Any], attrs: ObjectAttributes
) -> list[Any]:
    """The source's tags: one ``GetObjectTagging``, only when the object says it has some and
    the job keeps them (``tags: copy``)."""
    if attrs.replace_tags or not source.get("TagCount"):
        return []
    return list(client.get_object_tagging(Bucket=bucket, Key=key)["TagSet"])


class SourceBody(io.RawIOBase):
    """The planned version of a source object as the file a ``PutObject`` reads: its
    ``GetObject`` body, hashed (MD5) as it passes. Rewinding it (botocore does before it
    retries the PUT) sends a fresh ``GetObject``, with ``If-Match`` again; a failure there is
    kept in ``error`` (botocore reports only that the stream could not be rewound)."""

    def __init__(self, client: Any, bucket: str, key: str, if_match: str) -> None:
        super().__init__()
        self.client, self.bucket, self.key, self.if_match = client, bucket, key, if_match
        self.size = -1  # the planned version's, from its first GET
        self.error: S3OperationError | None = None
        self.response: dict[str, Any] = {}
        self._body: Any = None
        self._md5 = hashlib.md5(usedforsecurity=False)
        self._pos = 0
        self._get()  # errors raised as they come: 412 (changed), 404 (gone), ...

    def _get(self) -> None:
        self.response = self.client.get_object(
            Bucket=self.bucket, Key=self.key, IfMatch=f'"{self.if_match}"'
        )
        self._body = self.response["Body"]
        self._md5 = hashlib.md5(usedforsecurity=False)
        self._pos = 0
        length = int(self.response["ContentLength"])
        if self.size < 0:
            self.size = length
        elif length != self.size:  # the same version (If-Match) cannot change its size
            raise S3OperationError(
                ErrorKind.RETRYABLE,
                "SizeMismatch",
                f"GetObject answered {length} bytes, {self.size} the first time",
            )

    @property
    def md5(self) -> str:
        return self._md5.hexdigest()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if offset != 0 or whence != io.SEEK_SET:
            raise io.UnsupportedOperation("a streamed source can only be rewound to its start")
        if self._pos == 0:
            return 0
        self._body.close()
        try:
            self._get()
        except (ClientError, BotoCoreError) as exc:
            self.error = classify(exc)
            raise
        except S3OperationError as exc:
            self.error = exc
            raise
        return 0

    def read(self, size: int | None = -1) -> bytes:
        """At least ``STREAM_CHUNK`` bytes (or what is left) whatever was asked for: the HTTP
        client asks for 16 KiB, and larger pieces cost less Python per byte; everything left
        when ``size`` < 0."""
        left = self.size - self._pos
        want = left if size is None or size < 0 else min(left, max(size, STREAM_CHUNK))
        if want <= 0:
            return b""
        data: bytes = self._body.read(want)
        self._md5.update(data)
        self._pos += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if self._body is not None:
            self._body.close()
        super().close()


class PartBody(io.RawIOBase):
    """A part's buffer as the file ``UploadPart`` sends: read in place, rewound for a retry.
    (Given the buffer itself, botocore's signer would copy it into a ``BytesIO``.)"""

    def __init__(self, data: bytearray) -> None:
        super().__init__()
        self._view = memoryview(data)
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = min(max(base + offset, 0), len(self._view))
        return self._pos

    def readinto(self, buffer: Any) -> int:
        n = min(len(buffer), len(self._view) - self._pos)
        buffer[:n] = self._view[self._pos : self._pos + n]
        self._pos += n
        return n

    def read(self, size: int | None = -1) -> bytes:
        end = len(self._view) if size is None or size < 0 else self._pos + size
        data = bytes(self._view[self._pos : end])
        self._pos += len(data)
        return data


class StreamS3Service(S3Service):
    """The destination's S3 for a job whose copies stream: copies read the planned version
    from ``source`` (the source side's service, with its own credentials and endpoint) and
    write it here. Everything else (HEADs, multipart clean-up) is the destination's, as
    for a server-side copy."""

    def __init__(self, boto: Any, source: S3Service, threads: int) -> None:
        super().__init__(boto, None, threads)
        self.source = source

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
        """Streamed copies of the ``CopyItem``s, ``threads`` at a time, written with
        ``attrs``: per item the destination ETag, the error, or None when ``stop`` was set
        before it was sent. The sizes come from the GETs; each must be the planned one."""

        def one(item: CopyItem) -> str | S3OperationError | None:
            if stop is not None and stop.is_set():
                return None
            try:
                return self.stream_object(
                    src_bucket,
                    item.source_key,
                    dst_bucket,
                    item.dest_key,
                    item.etag,
                    if_absent=if_absent,
                    attrs=attrs,
                )
            except S3OperationError as err:
                return err

        # The threads that send parts: the chunk's large objects follow its small ones, and
        # memory one thread freed is reused by that thread (malloc keeps arenas per thread).
        if self._part_pool is None:
            self._part_pool = ThreadPoolExecutor(self.threads, thread_name_prefix="s3-stream")
        return list(self._part_pool.map(one, items))

    def stream_object(
        self,
        src_bucket: str,
        src_key: str,
        dst_bucket: str,
        dst_key: str,
        if_match: str,
        *,
        if_absent: bool,
        attrs: ObjectAttributes = DEFAULT_ATTRIBUTES,
    ) -> str:
        """One ``GetObject`` (``If-Match``) streamed into one ``PutObject`` (``If-None-Match:
        *`` with ``if_absent``) written with ``attrs``; returns the destination ETag, which
        must be the MD5 of the bytes read. Raises :class:`S3OperationError`."""
        source = self.source.boto
        body: SourceBody | None = None
        try:
            body = SourceBody(source, src_bucket, src_key, if_match)
            tags = _tags(source, src_bucket, src_key, body.response, attrs)
            args = attrs.upload_args(put_arguments(body.response, tags))
            if if_absent:
                args["IfNoneMatch"] = "*"
            resp = self.boto.put_object(
                Bucket=dst_bucket, Key=dst_key, Body=body, ContentLength=body.size, **args
            )
            read, md5 = body.tell(), body.md5
        except (ClientError, BotoCoreError) as exc:
            raise (body.error if body is not None and body.error else classify(exc)) from None
        finally:
            if body is not None:
                body.close()
        etag = strip_etag(resp["ETag"])
        if read != body.size or etag != md5:
            raise S3OperationError(
                ErrorKind.RETRYABLE,
                "BadDigest",
                f"the destination's ETag {etag} is not the MD5 {md5} of the {read:,} of "
                f"{body.size:,} bytes read from the source",
            )
        return etag

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
    ) -> MultipartCopy | S3OperationError | None:
        """A streamed copy in parts: the source's headers and tags from a ``HeadObject``
        (``If-Match``), then per part one ranged ``GetObject`` (``If-Match``) read into a
        buffer and sent with ``UploadPart`` and its ``Content-MD5``; the rest is
        :meth:`upload_in_parts`, as for a server-side copy in parts (incomplete uploads
        aborted first, ``If-None-Match: *`` on completion, abort on any failure)."""
        source = self.source.boto

        def headers() -> dict[str, Any]:
            head = source.head_object(Bucket=src_bucket, Key=src_key, IfMatch=f'"{if_match}"')
            return put_arguments(head, _tags(source, src_bucket, src_key, head, attrs))

        def stream_part(upload_id: str, part: Part) -> str:
            data = read_range(source, src_bucket, src_key, if_match, part)
            digest = hashlib.md5(data, usedforsecurity=False)
            resp = self.boto.upload_part(
                Bucket=dst_bucket,
                Key=dst_key,
                UploadId=upload_id,
                PartNumber=part.number,
                Body=PartBody(data),
                ContentLength=len(data),
                ContentMD5=base64.b64encode(digest.digest()).decode(),
            )
            etag = strip_etag(resp["ETag"])
            if etag != digest.hexdigest():  # S3 checked Content-MD5: not an MD5 ETag (SSE-KMS)
                raise S3OperationError(
                    ErrorKind.PERMANENT,
                    "BadDigest",
                    f"part {part.number}'s ETag {etag} is not the MD5 of its bytes",
                )
            return etag

        return self.upload_in_parts(
            dst_bucket,
            dst_key,
            plan_parts(size, part_size),
            size,
            headers=headers,
            send_part=stream_part,
            if_absent=if_absent,
            stop=stop,
            before_complete=before_complete,
            attrs=attrs,
        )


def read_range(client: Any, bucket: str, key: str, if_match: str, part: Part) -> bytearray:
    """One part of the planned version (ranged ``GetObject`` with ``If-Match``) in a buffer of
    exactly its size, filled 256 KiB at a time (``read()`` of the whole body would hold it
    twice while joining)."""
    size = part.last - part.first + 1
    buffer = bytearray(size)
    view = memoryview(buffer)
    got = 0
    body = client.get_object(Bucket=bucket, Key=key, IfMatch=f'"{if_match}"', Range=part.range)[
        "Body"
    ]
    try:
        while got < size:
            chunk = body.read(min(_READ_CHUNK, size - got))
            if not chunk:
                break
            view[got : got + len(chunk)] = chunk
            got += len(chunk)
    finally:
        body.close()
    if got != size:
        raise S3OperationError(
            ErrorKind.RETRYABLE, "IncompleteBody", f"part {part.number}: {got} of {size} bytes"
        )
    return buffer
