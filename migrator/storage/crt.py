"""The hot S3 calls (CopyObject, DeleteObjects, ListObjectsV2) on AWS's C runtime.

A boto3 call costs about 1 ms of CPU, nearly all of it in Python (serialising, endpoint rules,
hooks, parsing), and the GIL makes that the ceiling of a worker process. Here each request is
signed (SigV4) and sent by awscrt, AWS's C library that boto3 itself can use: a batch of
requests is kept in flight over a pool of keep-alive connections by one Python thread, and the
C event loop hands back only the status and body. That is ~0.1 ms of CPU per request.

What stays the same as with boto3: the endpoint and addressing style (resolved once per bucket
by botocore's own rules), the credential chain (profiles, roles, refreshable credentials), and
the retry policy of botocore's ``standard`` mode: up to ``max_attempts`` tries with exponential
backoff and jitter on 500/502/503/504, throttling and transient error codes, connection errors
and S3's "200 with an error inside" copy responses. On top, the number of requests in flight
is halved on every throttling answer and grows back by one per success, so a prefix at its
request limit is not hammered.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import heapq
import html
import random
import re
import threading
import time
import xml.etree.ElementTree as ET
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from io import BytesIO
from queue import Empty, SimpleQueue
from typing import Any
from urllib.parse import quote, unquote_plus, urlsplit
from xml.sax.saxutils import escape

from awscrt import auth, http, io

from migrator.storage.attributes import DEFAULT_ATTRIBUTES, ObjectAttributes
from migrator.storage.common import (
    CopyItem,
    ErrorKind,
    ListedObject,
    S3OperationError,
    classify_code,
    listed_class,
    strip_etag,
)

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
_THROTTLE_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottled",
    "RequestThrottledException",
    "TooManyRequestsException",
    "RequestLimitExceeded",
    "BandwidthLimitExceeded",
    "ProvisionedThroughputExceededException",
    "EC2ThrottledException",
}
_TRANSIENT_CODES = {
    "RequestTimeout",
    "RequestTimeoutException",
    "PriorRequestNotComplete",
    "InternalError",
    "ServiceUnavailable",
}
_RETRY_STATUS = {500, 502, 503, 504}
MAX_BACKOFF = 20.0
_EVENT_WAIT = 0.5  # how often the driver looks at deadlines and the stop flag


_UNRESERVED = re.compile(r"[A-Za-z0-9/_.~-]*")


def uri_encode(path: str) -> str:
    """A key as a URI path: RFC 3986 unreserved characters and "/" as they are, the rest
    percent-encoded from UTF-8 (what botocore sends and SigV4 signs)."""
    return path if _UNRESERVED.fullmatch(path) else quote(path, safe="/~")


def _local(tag: str) -> str:
    return tag.rpartition("}")[2]


def _children(elem: ET.Element) -> dict[str, str]:
    return {_local(c.tag): c.text or "" for c in elem}


@dataclass(frozen=True)
class Endpoint:
    """Where a bucket's requests go: resolved once by botocore's endpoint rules."""

    scheme: str
    host: str
    port: int
    path_prefix: str  # "/bucket" for path-style addressing, "" for virtual-hosted

    @property
    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        return self.host if self.port == default else f"{self.host}:{self.port}"

    def path(self, key: str | None) -> str:
        if key is None:
            return self.path_prefix or "/"
        return f"{self.path_prefix}/{uri_encode(key)}"


def resolve_endpoint(boto_client: Any, bucket: str) -> Endpoint:
    """Ask botocore where a request for ``bucket`` goes (region, addressing style, FIPS,
    custom endpoint…) by presigning a request; nothing is sent."""
    url = boto_client.generate_presigned_url(
        "head_object", Params={"Bucket": bucket, "Key": "k"}, ExpiresIn=60
    )
    parts = urlsplit(url)
    scheme = parts.scheme
    port = parts.port or (443 if scheme == "https" else 80)
    prefix = parts.path[: -len("/k")] if parts.path.endswith("/k") else ""
    return Endpoint(scheme, parts.hostname or "", port, prefix)


@dataclass
class Request:
    method: str
    key: str | None
    query: str = ""
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    expect: bytes = b""  # the closing tag of a complete answer, e.g. b"</CopyObjectResult>"


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes

    @functools.cached_property
    def root(self) -> ET.Element:
        return ET.fromstring(self.body)


def parse(status: int, body: bytes, expect: bytes = b"") -> Response | tuple[str, str]:
    """A response, or the S3 error code and message it carries. A 200 that is not the
    complete expected answer is an error too: S3 reports a copy that fails midway as a 200
    with an ``<Error>`` document (after whitespace it sends while copying), and a body can be
    cut off by the network."""
    if expect:
        failed = status >= 300 or not body.rstrip().endswith(expect)
    else:
        failed = status >= 300 or b"<Error>" in body[:512]
    if not failed:
        return Response(status, body)
    try:
        fields = _children(ET.fromstring(body)) if body.strip() else {}
    except ET.ParseError:
        fields = {}
    if status >= 300:
        return fields.get("Code") or str(status), fields.get("Message") or f"HTTP {status}"
    return fields.get("Code") or "InternalError", fields.get("Message") or "incomplete answer"


class _Window:
    """Requests allowed in flight: halved on throttling, +1 per success, within [1, limit]."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.size = limit
        self._lock = threading.Lock()

    def throttled(self) -> None:
        with self._lock:
            self.size = max(1, self.size // 2)

    def succeeded(self) -> None:
        if self.size < self.limit:
            with self._lock:
                self.size = min(self.limit, self.size + 1)


class CrtS3:
    """One side's S3 service for one process: a connection pool per endpoint, SigV4 signing,
    retries. ``send`` runs a batch of requests to one bucket and returns when all are done."""

    def __init__(
        self,
        boto_client: Any,
        credentials: Any,
        region: str,
        *,
        max_connections: int,
        max_attempts: int = 10,
        connect_timeout: float = 10,
        read_timeout: float = 120,
        ca_bundle: str | None = None,
        retry_counter: Any = None,
    ) -> None:
        self.boto = boto_client
        self.max_attempts = max_attempts
        self.read_timeout = read_timeout
        self.retries = retry_counter
        self.window = _Window(max_connections)
        self._endpoints: dict[str, Endpoint] = {}
        self._idle: dict[Endpoint, list[http.HttpClientConnection]] = {}
        self._lock = threading.Lock()
        elg = io.EventLoopGroup(1)
        self._bootstrap = io.ClientBootstrap(elg, io.DefaultHostResolver(elg))
        self._socket = io.SocketOptions()
        self._socket.connect_timeout_ms = int(connect_timeout * 1000)
        self._socket.keep_alive = True
        self._ca_bundle = ca_bundle
        self._tls: io.ClientTlsContext | None = None  # built on the first HTTPS connection
        self._provider = _provider(credentials)
        self._region = region

    # -- signing and sending ---------------------------------------------------------------
    def _signing(self, body_sha256: str) -> auth.AwsSigningConfig:
        return auth.AwsSigningConfig(
            algorithm=auth.AwsSigningAlgorithm.V4,
            signature_type=auth.AwsSignatureType.HTTP_REQUEST_HEADERS,
            credentials_provider=self._provider,
            region=self._region,
            service="s3",
            use_double_uri_encode=False,  # S3 signs the path as sent
            should_normalize_uri_path=False,  # keys may hold "//" or "./"
            signed_body_value=body_sha256,
            signed_body_header_type=auth.AwsSignedBodyHeaderType.X_AMZ_CONTENT_SHA_256,
        )

    def endpoint(self, bucket: str) -> Endpoint:
        ep = self._endpoints.get(bucket)
        if ep is None:
            ep = self._endpoints[bucket] = resolve_endpoint(self.boto, bucket)
        return ep

    def _connect(self, ep: Endpoint) -> Any:
        tls = None
        if ep.scheme == "https":
            if self._tls is None:
                options = io.TlsContextOptions()
                if self._ca_bundle:
                    options.override_default_trust_store_from_path(None, self._ca_bundle)
                self._tls = io.ClientTlsContext(options)
            tls = self._tls.new_connection_options()
            tls.set_server_name(ep.host)
        return http.HttpClientConnection.new(
            host_name=ep.host,
            port=ep.port,
            bootstrap=self._bootstrap,
            socket_options=self._socket,
            tls_connection_options=tls,
        )

    def _take_idle(self, ep: Endpoint) -> Any:
        with self._lock:
            idle = self._idle.setdefault(ep, [])
            while idle:
                conn = idle.pop()
                if conn.is_open():
                    return conn
        return None

    def _give_back(self, ep: Endpoint, conn: Any) -> None:
        if conn.is_open():
            with self._lock:
                self._idle.setdefault(ep, []).append(conn)

    def close(self) -> None:
        with self._lock:
            for conns in self._idle.values():
                for conn in conns:
                    conn.close()
            self._idle.clear()

    def send(
        self, bucket: str, requests: Sequence[Request], stop: Any = None
    ) -> list[Response | S3OperationError | None]:
        """Send every request (all for ``bucket``) with retries; in request order, a
        :class:`Response` on success, an :class:`S3OperationError` once retries are spent, or
        None for a request never sent because ``stop`` was set."""
        return _Batch(self, self.endpoint(bucket), requests, stop).run()

    # -- operations ------------------------------------------------------------------------
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
        """Server-side copies of ``CopyItem``s; the result per item is the destination ETag, an
        error, or None (not sent). Same preconditions and object attributes as
        :func:`migrator.storage.s3.copy`."""
        requests = []
        extra = attrs.copy_headers  # the job's; a REPLACE directive among them replaces COPY
        if not attrs.replace_metadata:
            extra = (("x-amz-metadata-directive", "COPY"), *extra)
        for item in items:
            headers = [
                ("content-length", "0"),
                ("x-amz-copy-source", uri_encode(f"{src_bucket}/{item.source_key}")),
                ("x-amz-copy-source-if-match", f'"{item.etag}"'),
                *extra,
            ]
            storage_class = attrs.storage_class or item.storage_class
            if storage_class is not None:
                headers.append(("x-amz-storage-class", storage_class))
            if if_absent:
                headers.append(("if-none-match", "*"))
            requests.append(
                Request("PUT", item.dest_key, headers=headers, expect=b"</CopyObjectResult>")
            )
        results: list[str | S3OperationError | None] = []
        for resp in self.send(dst_bucket, requests, stop):
            if isinstance(resp, Response):
                found = _ETAG.search(resp.body)
                results.append(_unquote_etag(found.group(1)) if found else "")
            else:
                results.append(resp)
        return results

    def delete(self, bucket: str, keys: Sequence[str]) -> dict[str, str]:
        """``DeleteObjects`` (quiet) for ≤ 1,000 keys; ``{key: error}`` for keys not deleted."""
        if not keys:
            return {}
        objects = "".join(f"<Object><Key>{_xml_key(k)}</Key></Object>" for k in keys)
        body = (
            '<Delete xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Quiet>true</Quiet>'
            f"{objects}</Delete>"
        ).encode()
        headers = [
            ("content-type", "application/xml"),
            ("content-length", str(len(body))),
            ("content-md5", base64.b64encode(hashlib.md5(body).digest()).decode()),
        ]
        [resp] = self.send(
            bucket, [Request("POST", None, "delete=", headers, body, b"</DeleteResult>")]
        )
        if not isinstance(resp, Response):
            return dict.fromkeys(keys, str(resp))
        errors: dict[str, str] = {}
        for elem in resp.root:
            if _local(elem.tag) == "Error":
                f = _children(elem)
                errors[f.get("Key", "")] = f"{f.get('Code')}: {f.get('Message', '')}"
        return errors

    def list_pages(self, bucket: str, prefix: str) -> Iterator[list[ListedObject]]:
        """``ListObjectsV2`` one page (≤ 1,000 objects) at a time, keys URL-encoded on the wire
        (so any key survives XML) and decoded here."""
        token: str | None = None
        while True:
            params = {"encoding-type": "url", "list-type": "2", "prefix": prefix}
            if token is not None:
                params["continuation-token"] = token
            query = "&".join(f"{k}={quote(v, safe='-_.~')}" for k, v in sorted(params.items()))
            [resp] = self.send(bucket, [Request("GET", None, query, expect=b"</ListBucketResult>")])
            if not isinstance(resp, Response):
                raise resp or S3OperationError(ErrorKind.RETRYABLE, "Stopped", "not sent")
            page, token = parse_listing(resp.body)
            yield page
            if token is None:
                return


def _xml_key(key: str) -> str:
    """A key as XML text; CR, LF and TAB as character references so the XML parser on the
    other side does not normalise them away (a different key would be deleted)."""
    return escape(key, {"\r": "&#13;", "\n": "&#10;", "\t": "&#9;"})


_ETAG = re.compile(rb"<ETag>([^<]*)</ETag>")
_CONTENTS = re.compile(
    rb"<Contents><Key>([^<]*)</Key><LastModified>([^<]*)</LastModified>"
    rb"<ETag>([^<]*)</ETag>(?:<Checksum\w+>[^<]*</Checksum\w+>)*<Size>(\d+)</Size>"
    rb"(?:<Owner>.*?</Owner>)?(?:<StorageClass>([^<]*)</StorageClass>)?"
)


def parse_listing(body: bytes) -> tuple[list[ListedObject], str | None]:
    """One ``ListObjectsV2`` page: its objects and the continuation token (None on the last
    page). S3's compact XML is read with one regular expression (a twentieth of the CPU of a
    parse tree); any other layout (indented, other element order) falls back to ElementTree,
    decided by counting: every ``<Contents>`` must have been matched."""
    matches = _CONTENTS.findall(body)
    if len(matches) != body.count(b"<Contents>"):
        return _parse_listing(ET.fromstring(body))
    # Element text cannot hold "<", so these tags are found only where they are elements.
    encoded = b"<EncodingType>url</EncodingType>" in body
    truncated = b"<IsTruncated>true</IsTruncated>" in body
    token = _TOKEN.search(body)
    objects = []
    for key, modified, etag, size, storage_class in matches:
        text = key.decode()
        if "&" in text:
            text = html.unescape(text)
        objects.append(
            ListedObject(
                unquote_plus(text) if encoded else text,
                int(size),
                _unquote_etag(etag),
                datetime.fromisoformat(modified.decode()),
                None if storage_class in _STANDARD else storage_class.decode(),
            )
        )
    if not truncated:
        return objects, None
    return objects, html.unescape(token.group(1).decode()) if token else None


def _unquote_etag(raw: bytes) -> str:
    """An ETag element's text without its quotes (``"…"``, ``&quot;…&quot;`` or ``&#34;…``)."""
    return raw.decode().replace("&quot;", "").replace("&#34;", "").strip('"')


_STANDARD = (b"", b"STANDARD")  # listed as None (``listed_class``)
_TOKEN = re.compile(rb"<NextContinuationToken>([^<]*)</NextContinuationToken>")


def _parse_listing(root: ET.Element) -> tuple[list[ListedObject], str | None]:
    objects: list[ListedObject] = []
    token: str | None = None
    truncated = False
    encoded = False
    for elem in root:
        tag = _local(elem.tag)
        if tag == "Contents":
            f = _children(elem)
            modified = f.get("LastModified")
            objects.append(
                ListedObject(
                    key=f["Key"],
                    size=int(f["Size"]),
                    etag=strip_etag(f.get("ETag", "")),
                    last_modified=datetime.fromisoformat(modified) if modified else None,
                    storage_class=listed_class(f.get("StorageClass")),
                )
            )
        elif tag == "NextContinuationToken":
            token = elem.text
        elif tag == "IsTruncated":
            truncated = elem.text == "true"
        elif tag == "EncodingType":
            encoded = elem.text == "url"
    if encoded:
        objects = [o._replace(key=unquote_plus(o.key)) for o in objects]
    return objects, token if truncated else None


def _provider(credentials: Any) -> auth.AwsCredentialsProvider:
    """botocore's credentials as a CRT provider: static ones as they are, refreshable ones
    (roles, SSO, instance metadata) asked for afresh whenever the CRT signs."""
    if credentials is None:
        raise S3OperationError(ErrorKind.PERMANENT, "NoCredentials", "no AWS credentials found")
    if not hasattr(credentials, "refresh_needed"):
        f = credentials.get_frozen_credentials()
        return auth.AwsCredentialsProvider.new_static(f.access_key, f.secret_key, f.token)

    def current() -> auth.AwsCredentials:
        f = credentials.get_frozen_credentials()
        return auth.AwsCredentials(f.access_key, f.secret_key, f.token)

    return auth.AwsCredentialsProvider.new_delegate(current)


class _Batch:
    """Drives one batch: all events (connections opened, responses) arrive on a queue from
    the CRT's event loop and are handled here, on the caller's thread."""

    def __init__(self, s3: CrtS3, ep: Endpoint, requests: Sequence[Request], stop: Any) -> None:
        self.s3, self.ep, self.requests, self.stop = s3, ep, requests, stop
        self.results: list[Response | S3OperationError | None] = [None] * len(requests)
        self.attempts = [0] * len(requests)
        self.pending = deque(range(len(requests)))
        self.timers: list[tuple[float, int]] = []  # (due, index): retries waiting out backoff
        self.inflight: dict[int, tuple[float, Any]] = {}  # index → (deadline, connection)
        self.slots = 0  # connections this batch holds or is opening
        self.events: SimpleQueue[tuple[Any, ...]] = SimpleQueue()
        self.signing = {EMPTY_SHA256: s3._signing(EMPTY_SHA256)}

    def run(self) -> list[Response | S3OperationError | None]:
        checked = time.monotonic()
        while self.pending or self.timers or self.slots:
            now = time.monotonic()
            if now - checked >= _EVENT_WAIT:  # also while other answers keep arriving
                self._expire(now)
                checked = now
            while self.timers and self.timers[0][0] <= now:
                self.pending.append(heapq.heappop(self.timers)[1])
            if self.stop is not None and self.stop.is_set():
                self.pending.clear()
                self.timers.clear()
            while self.pending and self.slots < min(self.s3.window.size, len(self.pending)):
                self.slots += 1
                conn = self.s3._take_idle(self.ep)
                if conn is not None:
                    self._dispatch(conn)
                else:
                    self.s3._connect(self.ep).add_done_callback(
                        lambda f: self.events.put(("opened", f))
                    )
            if not self.slots:
                if self.timers:
                    time.sleep(max(0.0, min(self.timers[0][0] - time.monotonic(), _EVENT_WAIT)))
                continue
            wait = _EVENT_WAIT
            if self.timers:
                wait = max(0.0, min(wait, self.timers[0][0] - now))
            try:
                event = self.events.get(timeout=wait)
            except Empty:
                continue
            if event[0] == "opened":
                self._opened(event[1])
            else:
                self._finished(*event[1:])
        return self.results

    def _opened(self, future: Any) -> None:
        exc = future.exception()
        if exc is None:
            self._dispatch(future.result())
            return
        self.slots -= 1
        if self.pending:  # the request this slot would have sent counts one failed attempt
            i = self.pending.popleft()
            self.attempts[i] += 1
            self._failed(i, "ConnectError", str(exc), throttle=False)

    def _dispatch(self, conn: Any) -> None:
        """Send the next pending request on ``conn``, or give the connection back."""
        if not self.pending or (self.stop is not None and self.stop.is_set()):
            self.slots -= 1
            self.s3._give_back(self.ep, conn)
            return
        i = self.pending.popleft()
        req = self.requests[i]
        path = self.ep.path(req.key)
        if req.query:
            path = f"{path}?{req.query}"
        headers = http.HttpHeaders([("host", self.ep.host_header), *req.headers])
        body_sha = hashlib.sha256(req.body).hexdigest() if req.body else EMPTY_SHA256
        signing = self.signing.get(body_sha) or self.s3._signing(body_sha)
        message = http.HttpRequest(
            req.method,
            path,
            headers,
            body_stream=BytesIO(req.body) if req.body else None,
        )
        try:
            auth.aws_sign_request(message, signing).result()
        except Exception as exc:
            self.slots -= 1
            self.s3._give_back(self.ep, conn)
            self.attempts[i] += 1
            self._failed(i, "SigningError", str(exc), throttle=False)
            return
        self.attempts[i] += 1
        status = [0]
        chunks: list[bytes] = []
        events = self.events

        def on_response(http_stream: Any, status_code: int, headers: Any, **_: Any) -> None:
            status[0] = status_code

        def on_body(http_stream: Any, chunk: bytes, **_: Any) -> None:
            chunks.append(chunk)

        def on_done(future: Any) -> None:
            events.put(("done", i, conn, status[0], b"".join(chunks), future.exception()))

        try:
            stream = conn.request(message, on_response, on_body)
            stream.completion_future.add_done_callback(on_done)
            stream.activate()
        except Exception as exc:
            self.slots -= 1
            self._failed(i, "ConnectionError", str(exc), throttle=False)
            return
        self.inflight[i] = (time.monotonic() + self.s3.read_timeout, conn)

    def _finished(self, i: int, conn: Any, status: int, body: bytes, exc: Exception | None) -> None:
        self.inflight.pop(i, None)
        if exc is not None:
            self._failed(i, "ConnectionError", str(exc), throttle=False)
        else:
            resp = parse(status, body, self.requests[i].expect)
            if isinstance(resp, Response):
                self.results[i] = resp
                self.s3.window.succeeded()
            else:
                code, message = resp
                self._failed(
                    i,
                    code,
                    message,
                    throttle=code in _THROTTLE_CODES or status == 503,
                    retryable=status in _RETRY_STATUS
                    or code in _THROTTLE_CODES
                    or code in _TRANSIENT_CODES,
                    status=status,
                )
        if conn.is_open():
            self._dispatch(conn)
        else:
            self.slots -= 1

    def _failed(
        self,
        i: int,
        code: str,
        message: str,
        *,
        throttle: bool,
        retryable: bool = True,
        status: int = 0,
    ) -> None:
        if throttle:
            self.s3.window.throttled()
        if retryable and self.attempts[i] < self.s3.max_attempts:
            if self.s3.retries is not None:
                self.s3.retries.add(1)
            delay = min(random.random() * 2 ** (self.attempts[i] - 1), MAX_BACKOFF)
            heapq.heappush(self.timers, (time.monotonic() + delay, i))
            return
        self.results[i] = classify_code(code, status, message)

    def _expire(self, now: float) -> None:
        """Close connections whose request outlived the read timeout; the request fails with
        a connection error and is retried."""
        for _, (deadline, conn) in list(self.inflight.items()):
            if deadline < now:
                conn.close()
