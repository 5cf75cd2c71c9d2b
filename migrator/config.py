"""config.yaml: pydantic models, loading, environment overrides, one-line error messages."""

from __future__ import annotations

import difflib
import os
import re
from datetime import UTC, date, datetime, time
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from migrator.errors import ConfigError, redact
from migrator.keys import KeyRule, glob_to_regex, prefixes_overlap
from migrator.storage.attributes import (
    CANNED_ACLS,
    CONTENT_HEADERS,
    STORAGE_CLASSES,
    ObjectAttributes,
)
from migrator.storage.multipart import MAX_PART_SIZE, MAX_SINGLE_COPY, MIB, MIN_PART_SIZE

ENV_LEDGER = "MIGRATOR_LEDGER"
ENV_APP_DB_URL = "MIGRATOR_APP_DB_URL"
ENV_WEBHOOK_URL = "MIGRATOR_WEBHOOK_URL"
NOTIFY_EVENTS = ("started", "stage_completed", "failed", "finished")
MAX_CONFIG_BYTES = 1_000_000
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
KEY_FIELD = "{key}"
MAX_TEMPLATE_CHARS = 1000
STREAM_PART_SIZE = 16 * MIB  # streamed copies' part size when part_size is not set

_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
# IAM's own patterns: a role ARN (any partition, paths allowed), AssumeRole's ExternalId and
# RoleSessionName.
_ROLE_ARN_RE = re.compile(r"^arn:aws[a-z\-]*:iam::\d{12}:role/[\w+=,.@/\-]{1,512}$", re.ASCII)
_EXTERNAL_ID_RE = re.compile(r"^[\w+=,.@:/\-]{2,1224}$", re.ASCII)
_SESSION_NAME_RE = re.compile(r"^[\w+=,.@\-]{2,64}$", re.ASCII)
_JOB_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$")
_CREDENTIAL_KEYS = {
    "aws_access_key_id",
    "aws_secret_access_key",
    "aws_session_token",
    "access_key",
    "secret_key",
    "access_key_id",
    "secret_access_key",
    "password",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Location(_Strict):
    """One side of the move: a bucket, a key prefix and how to reach it."""

    bucket: str
    prefix: str = ""
    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None
    # A role this side's requests are made as: assumed with the credentials of ``profile`` (or
    # of the standard chain), refreshed before they expire.
    role_arn: str | None = None
    external_id: str | None = None
    role_session_name: str | None = None

    @field_validator("bucket")
    @classmethod
    def _bucket_name(cls, v: str) -> str:
        if not _BUCKET_RE.match(v):
            raise ValueError(
                f"{_short(v)} is not a valid S3 bucket name "
                "(3-63 lowercase letters, digits, '.', '-')"
            )
        return v

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^https?://[^/\s]+", v):
            raise ValueError(f"{_short(v)} is not an http(s) URL, e.g. http://127.0.0.1:9000")
        return v

    @field_validator("role_arn")
    @classmethod
    def _role_arn(cls, v: str | None) -> str | None:
        if v is not None and not _ROLE_ARN_RE.fullmatch(v):
            raise ValueError(
                f"{_short(v)} is not an IAM role ARN, e.g. arn:aws:iam::123456789012:role/migrator"
            )
        return v

    @field_validator("external_id")
    @classmethod
    def _external_id(cls, v: str | None) -> str | None:
        if v is not None and not _EXTERNAL_ID_RE.fullmatch(v):
            raise ValueError(
                "must be 2-1224 letters, digits or characters of '_+=,.@:/-' (what AssumeRole "
                "accepts)"
            )
        return v

    @field_validator("role_session_name")
    @classmethod
    def _session_name(cls, v: str | None) -> str | None:
        if v is not None and not _SESSION_NAME_RE.fullmatch(v):
            raise ValueError(f"{_short(v)} must be 2-64 letters, digits or characters of '_+=,.@-'")
        return v

    @model_validator(mode="after")
    def _role_options(self) -> Location:
        for name in ("external_id", "role_session_name"):
            if getattr(self, name) is not None and self.role_arn is None:
                raise ValueError(f"{name} is used only with role_arn; add role_arn or remove it")
        return self

    @property
    def connection(self) -> tuple[str | None, ...]:
        """Everything but the bucket and prefix: two sides with the same connection are
        reached through one S3 client."""
        return (self.endpoint_url, self.region, *self.principal, self.role_session_name)

    @property
    def principal(self) -> tuple[str | None, ...]:
        """Who this side's requests are made as: two sides with the same principal have the
        same credentials (the same profile, assuming the same role)."""
        return (self.profile, self.role_arn, self.external_id)


class Template(str):
    """An app value template: how a key appears in an app column, e.g.
    ``https://legacy.s3.amazonaws.com/{key}``. Rendered by splitting around its one ``{key}``,
    never with ``str.format``, so the rest of the template is plain text."""

    @property
    def head(self) -> str:
        return self.split(KEY_FIELD, 1)[0]

    @property
    def tail(self) -> str:
        return self.split(KEY_FIELD, 1)[1]

    def render(self, key: str) -> str:
        return self.head + key + self.tail

    def key_of(self, value: str) -> str | None:
        """The key a value holds under this template, or None if the value does not fit."""
        head, tail = self.head, self.tail
        if len(value) < len(head) + len(tail) or not value.startswith(head):
            return None
        if not value.endswith(tail):
            return None
        return value[len(head) : len(value) - len(tail)]


def _template(v: str) -> Template:
    """Exactly one ``{key}`` and no other braces: a typo such as ``{kye}`` or ``{key}{key}``
    is refused at load rather than found as rows that never match."""
    if v.count(KEY_FIELD) != 1:
        raise ValueError(
            f"{_short(v)} must contain {KEY_FIELD} exactly once, e.g. "
            "'https://legacy.s3.amazonaws.com/{key}'"
        )
    rest = v.replace(KEY_FIELD, "")
    if "{" in rest or "}" in rest:
        raise ValueError(f"{_short(v)} may contain no braces other than {KEY_FIELD}")
    if "\n" in v or "\r" in v:
        raise ValueError(f"{_short(v)} must be one line")
    if len(v) > MAX_TEMPLATE_CHARS:
        raise ValueError(f"{_short(v)} is longer than {MAX_TEMPLATE_CHARS} characters")
    return Template(v)


class AppTarget(_Strict):
    """One table and column whose values point at objects, and how a key appears there."""

    table: str = Field(min_length=1)
    column: str = Field(min_length=1)
    value: str = KEY_FIELD
    new_value: str | None = None

    @field_validator("value", "new_value")
    @classmethod
    def _templates(cls, v: str | None) -> str | None:
        return None if v is None else _template(v)

    @property
    def old(self) -> Template:
        """The template of values pointing at a source key."""
        return Template(self.value)

    @property
    def new(self) -> Template:
        """The template of values pointing at a destination key (``new_value``, else ``value``)."""
        return Template(self.new_value if self.new_value is not None else self.value)

    @property
    def name(self) -> str:
        return f"{self.table}.{self.column}"


class AppDB(_Strict):
    """The application database and the columns in it that hold object keys: one ``table`` and
    ``column`` (the fixed contract's form) or a list of ``targets``."""

    url: str
    table: str | None = Field(default=None, min_length=1)
    column: str | None = Field(default=None, min_length=1)
    value: str | None = None
    new_value: str | None = None
    targets: tuple[AppTarget, ...] = ()

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        url = _parse_db_url(v, ("sqlite", "postgresql", "mysql", "mariadb"))
        if url.get_backend_name() in ("mysql", "mariadb") and url.get_driver_name() != "pymysql":
            raise ValueError(
                f"driver {url.get_driver_name()!r} is not supported for MySQL/MariaDB; use "
                "mysql+pymysql://user@host/db"
            )
        return v

    @field_validator("value", "new_value")
    @classmethod
    def _templates(cls, v: str | None) -> str | None:
        return None if v is None else _template(v)

    @model_validator(mode="after")
    def _one_form(self) -> AppDB:
        single = (self.table, self.column, self.value, self.new_value)
        if self.targets:
            if any(x is not None for x in single):
                raise ValueError(
                    "give table and column (one target) or targets (a list), not both; "
                    "value and new_value then go in each target"
                )
        elif self.table is None or self.column is None:
            missing = "table" if self.table is None else "column"
            raise ValueError(f"{missing} is required (or give targets: a list of table/column)")
        seen: set[tuple[str, str, str]] = set()
        for t in self.all_targets:
            if (t.table, t.column, t.value) in seen:
                raise ValueError(
                    f"{t.name} with value {_short(t.value)} is listed twice; list each once"
                )
            seen.add((t.table, t.column, t.value))
        return self

    @property
    def all_targets(self) -> tuple[AppTarget, ...]:
        """Every column to rewrite; the single ``table``/``column`` form is one target."""
        if self.targets:
            return self.targets
        assert self.table is not None and self.column is not None
        one = {"table": self.table, "column": self.column}
        if self.value is not None:
            one["value"] = self.value
        if self.new_value is not None:
            one["new_value"] = self.new_value
        return (AppTarget(**one),)


class Keys(_Strict):
    """Which source keys the job moves and where each one goes (``docs/configuration.md``).

    Checked here, at load: the pattern compiles, the replacement names only groups the
    pattern has, the globs are valid. What can only be judged key by key (a collision,
    a key outside the destination prefix or too long) is refused by ``migrator plan``.
    """

    pattern: str | None = Field(default=None, min_length=1)
    replace: str | None = None
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"{_short(v)} is not a Python regular expression: {exc}") from None
        return v

    @field_validator("include", "exclude")
    @classmethod
    def _globs(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for glob in v:
            if not glob:
                raise ValueError("an empty glob matches no key; remove it")
            try:
                re.compile(glob_to_regex(glob))
            except re.error as exc:  # e.g. a reversed range: [z-a]
                raise ValueError(f"{_short(glob)} is not a valid glob: {exc.msg}") from None
        return v

    @model_validator(mode="after")
    def _replace(self) -> Keys:
        if (self.pattern is None) != (self.replace is None):
            raise ValueError(
                "pattern and replace go together: give both (a regex rewrite) or neither "
                "(the prefix rewrite)"
            )
        if self.pattern is not None and self.replace is not None:
            try:
                # ``sub`` parses the template (and refuses unknown groups) even on no match.
                re.compile(self.pattern).sub(self.replace, "")
            except (re.error, IndexError) as exc:
                raise ValueError(
                    f"replace {_short(self.replace)} does not fit pattern: {exc}; refer to "
                    r"the pattern's groups as \1 or \g<name>"
                ) from None
        return self


class NotifyConfig(_Strict):
    """``notify``: stage notifications POSTed to a webhook (``migrator/notify.py``)."""

    webhook_url: str
    events: tuple[Literal["started", "stage_completed", "failed", "finished"], ...] = NOTIFY_EVENTS
    timeout_seconds: float = Field(default=5.0, gt=0, le=60)

    @field_validator("webhook_url")
    @classmethod
    def _url(cls, v: str) -> str:
        # The value is not quoted back: a webhook URL is a secret (whoever has it may post).
        parts = urlsplit(v)
        if (
            parts.scheme not in ("http", "https")
            or not parts.hostname
            or any(c.isspace() for c in v)
        ):
            raise ValueError(
                "must be an http(s) URL, e.g. https://hooks.slack.com/services/…; set it "
                f"with {ENV_WEBHOOK_URL} to keep it out of the config file"
            )
        return v

    @field_validator("events")
    @classmethod
    def _some(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError(f"list at least one of {', '.join(NOTIFY_EVENTS)}")
        return v


_PRINTABLE = re.compile(r"^[\x20-\x7e]*$")
_MEDIA_TYPE = re.compile(r"^[A-Za-z0-9!#$&^_.+-]+/[A-Za-z0-9!#$&^_.+-]+(\s*;.*)?$")
_META_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")
_TAG_TEXT = re.compile(r"^[\w .:/=+\-@]*$")
MAX_HEADER_CHARS = 1024
MAX_USER_METADATA = 2048  # bytes of names and values, S3's limit
MAX_TAGS = 10
_KMS_KEY = re.compile(
    r"^(arn:aws[a-z-]*:kms:[a-z0-9-]+:\d{12}:(key|alias)/.+"
    r"|[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
    r"|mrk-[0-9a-f]{32}"
    r"|alias/[A-Za-z0-9/_-]+)$"
)


def _header_value(v: str) -> str:
    """A value sent as an HTTP header: printable ASCII on one line, no padding."""
    if not _PRINTABLE.match(v) or v != v.strip():
        raise ValueError(
            f"{_short(v)} must be printable ASCII on one line without surrounding spaces "
            "(it is sent as an HTTP header)"
        )
    if len(v) > MAX_HEADER_CHARS:
        raise ValueError(f"{_short(v)} is longer than {MAX_HEADER_CHARS} characters")
    return v


class MetadataValues(_Strict):
    """What every copy gets with ``metadata: replace``: S3 then keeps none of the source's
    content headers or user metadata, so whatever is not given here is not set."""

    content_type: str | None = None
    cache_control: str | None = None
    content_disposition: str | None = None
    content_encoding: str | None = None
    content_language: str | None = None
    expires: datetime | None = None
    user: dict[str, str] = Field(default_factory=dict)

    @field_validator(
        "content_type",
        "cache_control",
        "content_disposition",
        "content_encoding",
        "content_language",
    )
    @classmethod
    def _headers(cls, v: str | None) -> str | None:
        return None if v is None else _header_value(v)

    @field_validator("content_type")
    @classmethod
    def _media_type(cls, v: str | None) -> str | None:
        if v is not None and not _MEDIA_TYPE.match(v):
            raise ValueError(f"{_short(v)} is not a media type such as image/png")
        return v

    @field_validator("expires", mode="before")
    @classmethod
    def _expires(cls, v: Any) -> Any:
        if isinstance(v, bool | int | float):
            raise ValueError(f"{v!r} is not a date and time; write e.g. 2031-01-01T00:00:00Z")
        if isinstance(v, date) and not isinstance(v, datetime):
            return datetime.combine(v, time(), tzinfo=UTC)
        return v

    @field_validator("expires")
    @classmethod
    def _utc(cls, v: datetime | None) -> datetime | None:
        return v.replace(tzinfo=UTC) if v is not None and v.tzinfo is None else v

    @field_validator("user")
    @classmethod
    def _user(cls, v: dict[str, str]) -> dict[str, str]:
        for name, value in v.items():
            if not _META_NAME.match(name):
                raise ValueError(
                    f"name {_short(name)} must be lowercase letters, digits, '-', '_' or '.' "
                    "(without x-amz-meta-; S3 stores names in lowercase)"
                )
            if not _PRINTABLE.match(value):
                raise ValueError(f"{name}: {_short(value)} must be printable ASCII on one line")
        size = sum(len(k) + len(x) for k, x in v.items())
        if size > MAX_USER_METADATA:
            raise ValueError(
                f"{size} bytes of names and values; S3 keeps at most {MAX_USER_METADATA}"
            )
        return v


class Config(_Strict):
    job: str
    ledger: str = "sqlite:///migrator.db"
    source: Location
    destination: Location
    app_db: AppDB | None = None
    workers: int = Field(strict=True, default=4, ge=1, le=64)
    concurrency: int = Field(strict=True, default=32, ge=1, le=256)
    chunk_size: int = Field(strict=True, default=1000, ge=1, le=10_000)
    delete_source: Literal["after_all", "per_chunk", "never"] = "after_all"
    on_conflict: Literal["fail", "overwrite", "skip"] = "fail"
    max_attempts: int = Field(strict=True, default=5, ge=1, le=100)
    lease_seconds: int = Field(strict=True, default=60, ge=5, le=3600)
    # The request path for copies, deletes and listings: AWS's C runtime (about a tenth of the
    # CPU per request) or plain boto3. Both sign, retry and classify errors the same way.
    transport: Literal["crt", "boto3"] = "crt"
    # Objects larger than this (bytes) are copied in parts with UploadPartCopy; the rest with
    # one CopyObject each (one request per object). See docs/configuration.md for the default.
    multipart_threshold: int = Field(strict=True, default=128 * MIB)
    part_size: int = Field(strict=True, default=64 * MIB)
    notify: NotifyConfig | None = None
    # How objects get to the destination: server-side copies (CopyObject, UploadPartCopy),
    # streamed GET → PUT through this host, or (auto) the first where both sides share an
    # endpoint and credentials, else the second.
    copy_mode: Literal["auto", "server", "stream"] = "auto"
    # Versioned sources (docs/configuration.md#versioned-sources): copy each key's current
    # version (latest) or every version, oldest first (all); a source delete leaves a delete
    # marker, or with delete_versions removes the migrated version ids for good.
    versions: Literal["latest", "all"] = "latest"
    delete_versions: bool = Field(strict=True, default=False)

    @field_validator("multipart_threshold")
    @classmethod
    def _threshold(cls, v: int) -> int:
        if not MIN_PART_SIZE <= v <= MAX_SINGLE_COPY:
            raise ValueError(
                f"{v} must be between {MIN_PART_SIZE} (5 MiB) and {MAX_SINGLE_COPY} (5 GiB) "
                "bytes: one CopyObject copies at most 5 GiB"
            )
        return v

    @field_validator("part_size")
    @classmethod
    def _part_size(cls, v: int) -> int:
        if not MIN_PART_SIZE <= v <= MAX_PART_SIZE:
            raise ValueError(
                f"{v} must be between {MIN_PART_SIZE} (5 MiB) and {MAX_PART_SIZE} (5 GiB) "
                "bytes, S3's limits for one part"
            )
        return v

    keys: Keys = Keys()
    # Object attributes of the copies (docs/configuration.md#object-attributes): by default
    # CopyObject's own (content headers, user metadata, tags) and the listed storage class.
    metadata: Literal["copy", "replace"] = "copy"
    metadata_values: MetadataValues | None = Field(default=None, validate_default=True)
    tags: Literal["copy", "replace"] = "copy"
    tag_values: dict[str, str] | None = Field(default=None, validate_default=True)
    storage_class: str = "copy"
    sse: Literal["AES256", "aws:kms"] | None = None
    kms_key_id: str | None = Field(default=None, validate_default=True)
    acl: str | None = None

    @field_validator("metadata_values")
    @classmethod
    def _metadata_values(cls, v: MetadataValues | None, info: ValidationInfo) -> Any:
        mode = info.data.get("metadata")
        if mode == "replace" and v is None:
            raise ValueError(
                "is required with metadata: replace: the content headers (content_type, …) "
                "and user metadata every copy gets, as S3 then keeps none of the source's"
            )
        if mode == "copy" and v is not None:
            raise ValueError("is used only with metadata: replace; remove it or set that")
        return v

    @field_validator("tag_values")
    @classmethod
    def _tag_values(cls, v: dict[str, str] | None, info: ValidationInfo) -> Any:
        mode = info.data.get("tags")
        if mode == "replace" and v is None:
            raise ValueError(
                "is required with tags: replace: the tags every copy gets ({} for none)"
            )
        if mode == "copy" and v is not None:
            raise ValueError("is used only with tags: replace; remove it or set that")
        if v is None:
            return v
        if len(v) > MAX_TAGS:
            raise ValueError(f"{len(v)} tags; S3 allows at most {MAX_TAGS} per object")
        for key, value in v.items():
            if not 1 <= len(key) <= 128 or key.lower().startswith("aws:"):
                raise ValueError(
                    f"tag key {_short(key)} must be 1-128 characters and not start with aws:"
                )
            if len(value) > 256:
                raise ValueError(f"tag {key}: value longer than 256 characters")
            for text in (key, value):
                if not _TAG_TEXT.match(text):
                    raise ValueError(
                        f"tag {_short(text)} may hold only letters, digits, spaces and "
                        "_ . : / = + - @"
                    )
        return v

    @field_validator("storage_class")
    @classmethod
    def _storage_class(cls, v: str) -> str:
        if v != "copy" and v not in STORAGE_CLASSES:
            raise ValueError(
                f"{_short(v)} is not a storage class: use copy (each object keeps its own) "
                "or one of " + ", ".join(STORAGE_CLASSES)
            )
        return v

    @field_validator("kms_key_id")
    @classmethod
    def _kms_key_id(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None:
            return v
        if info.data.get("sse") != "aws:kms":
            raise ValueError("is used only with sse: aws:kms; set that or remove kms_key_id")
        if not _KMS_KEY.match(v):
            raise ValueError(
                f"{_short(v)} is not a KMS key: give its key id, key ARN, alias/NAME or alias "
                "ARN (a key of another account by its ARN)"
            )
        return v

    @field_validator("acl")
    @classmethod
    def _acl(cls, v: str | None) -> str | None:
        if v is not None and v not in CANNED_ACLS:
            raise ValueError(
                f"{_short(v)} is not a canned ACL: use one of " + ", ".join(CANNED_ACLS)
            )
        return v

    @field_validator("job")
    @classmethod
    def _job(cls, v: str) -> str:
        if not _JOB_RE.match(v):
            raise ValueError(f"{_short(v)} must be 1-100 letters, digits, '_', '.' or '-'")
        return v

    @field_validator("ledger")
    @classmethod
    def _ledger(cls, v: str) -> str:
        _parse_db_url(v, ("sqlite", "postgresql"))
        return v

    @model_validator(mode="after")
    def _streamed_kms(self) -> Config:
        """A streamed copy is verified by the MD5 of the bytes it read, which an SSE-KMS
        object's ETag is not; until streamed copies check a checksum instead, the two are
        refused together rather than failing every copy's verification."""
        if self.sse == "aws:kms" and self.streams:
            raise ValueError(
                "sse: aws:kms cannot be verified on streamed copies (copy_mode "
                f"{self.copy_mode} streams here): copy server-side (copy_mode: server, the "
                "destination's credentials reading the source) or use sse: AES256"
            )
        return self

    @model_validator(mode="after")
    def _versions_copied_by_s3(self) -> Config:
        """Every version of a key is copied by S3 from its version id (``CopySource``
        ``VersionId``); streamed copies read the current object only."""
        if self.versions == "all" and self.streams:
            raise ValueError(
                f"versions: all needs server-side copies, and copy_mode {self.copy_mode} "
                "streams here: use copy_mode: server (the destination's credentials reading "
                "the source, one endpoint) or versions: latest"
            )
        return self

    @property
    def lists_versions(self) -> bool:
        """Whether the plan lists object versions (``ListObjectVersions``) and keeps their
        ids in the ledger: to copy them all, or to delete the migrated ones by id."""
        return self.versions == "all" or self.delete_versions

    @model_validator(mode="after")
    def _no_overlap(self, info: ValidationInfo) -> Config:
        if info.context and info.context.get("relocate"):
            return self  # one bucket on both sides, by design (``migrator relocate``)
        same_place = (
            self.source.bucket == self.destination.bucket
            and self.source.endpoint_url == self.destination.endpoint_url
        )
        if same_place and not self.source.prefix and not self.destination.prefix:
            raise ValueError(
                f"source and destination are both the whole bucket {self.source.bucket!r}: "
                "nothing to move (a config of `migrator relocate`, which keeps a bucket's name "
                "while moving it to another region, is read only by that command)"
            )
        if same_place and prefixes_overlap(self.source.prefix, self.destination.prefix):
            raise ValueError(
                f"destination prefix {self.destination.prefix!r} overlaps source prefix "
                f"{self.source.prefix!r} in bucket {self.source.bucket!r}; choose prefixes "
                "where neither contains the other"
            )
        return self

    @field_validator("copy_mode")
    @classmethod
    def _server_side_possible(cls, v: str, info: ValidationInfo) -> str:
        src, dst = info.data.get("source"), info.data.get("destination")
        if v == "server" and src and dst and src.endpoint_url != dst.endpoint_url:
            raise ValueError(
                "server needs source and destination on the same endpoint_url (a server-side "
                "copy is one request to one S3 service); use stream or auto to copy between "
                "endpoints"
            )
        return v

    @property
    def same_endpoint(self) -> bool:
        """Both buckets on one S3 service (AWS, or the same ``endpoint_url``): a server-side
        copy can reach the source from the destination."""
        return self.source.endpoint_url == self.destination.endpoint_url

    @property
    def transfer_part_size(self) -> int:
        """The part size of copies in parts: ``part_size``, or — for streamed copies when
        ``part_size`` is not set — ``STREAM_PART_SIZE``: a worker holds every part it streams
        in memory, about ``concurrency × part size`` (32 × 64 MiB would be 2 GiB each)."""
        if self.streams and "part_size" not in self.model_fields_set:
            return STREAM_PART_SIZE
        return self.part_size

    @property
    def streams(self) -> bool:
        """Whether copies are streamed (GET → PUT through this host) rather than made by S3:
        ``copy_mode: stream``, or ``auto`` with the sides on different endpoints or with
        different credentials (which may not read the other side)."""
        if self.copy_mode == "auto":
            return not (self.same_endpoint and self.source.principal == self.destination.principal)
        return self.copy_mode == "stream"

    @model_validator(mode="after")
    def _replace_under_destination(self) -> Config:
        """The literal start of ``keys.replace`` (before its first group or escape) must
        agree with the destination prefix; a mismatch is caught here rather than at plan."""
        if self.keys.replace is None:
            return self
        head = self.keys.replace.split("\\", 1)[0]
        dest = self.destination.prefix
        if not (head.startswith(dest) or dest.startswith(head)):
            raise ValueError(
                f"keys.replace {_short(self.keys.replace)} does not start with "
                f"destination.prefix {dest!r}; every destination key must be under it"
            )
        return self

    @model_validator(mode="after")
    def _app_values_apart(self) -> Config:
        """No app value may be both an old value (a source key through ``value``) and a new one
        (a destination key through ``new_value``) of the same column: a later chunk would take
        a rewritten row for one still pointing at its source and rewrite it again. Judged on
        the literal start of the values, so a refusal may be cautious, never a miss."""
        if self.app_db is None:
            return self
        targets = self.app_db.all_targets
        for a in targets:
            for b in targets:
                if (a.table, a.column) != (b.table, b.column) or (a is b and a.old == a.new):
                    continue  # the same template both ways: today's bare-key rule applies
                old = a.old.head + self.source.prefix
                new = b.new.head + self.destination.prefix
                if prefixes_overlap(old, new):
                    raise ValueError(
                        f"app_db: {a.name}: old values starting {_short(old)} and new values "
                        f"starting {_short(new)} could be the same text; choose value and "
                        "new_value templates that tell them apart"
                    )
        return self

    @property
    def key_rule(self) -> KeyRule:
        """The job's key selection and mapping (``migrator.keys.KeyRule``)."""
        return KeyRule(
            self.source.prefix,
            self.destination.prefix,
            self.keys.pattern,
            self.keys.replace,
            self.keys.include,
            self.keys.exclude,
        )

    @property
    def attributes(self) -> ObjectAttributes:
        """What the copies set on the destination objects (``storage/attributes.py``)."""
        content: tuple[tuple[str, str | datetime], ...] = ()
        user: tuple[tuple[str, str], ...] = ()
        if self.metadata_values is not None:
            values = self.metadata_values
            content = tuple(
                (name, getattr(values, name))
                for name, _, _ in CONTENT_HEADERS
                if getattr(values, name) is not None
            )
            user = tuple(values.user.items())
        return ObjectAttributes(
            replace_metadata=self.metadata == "replace",
            content=content,
            user=user,
            replace_tags=self.tags == "replace",
            tags=tuple((self.tag_values or {}).items()),
            storage_class=None if self.storage_class == "copy" else self.storage_class,
            sse=self.sse,
            kms_key_id=self.kms_key_id,
            acl=self.acl,
        )

    @property
    def ledger_url(self) -> URL:
        return make_url(self.ledger)

    def safe_summary(self) -> dict[str, Any]:
        """What may be shown or stored: no URLs with passwords, no credentials."""
        return {
            "job": self.job,
            "source": f"s3://{self.source.bucket}/{self.source.prefix}",
            "destination": f"s3://{self.destination.bucket}/{self.destination.prefix}",
            "delete_source": self.delete_source,
        }


def _short(value: str, limit: int = 60) -> str:
    """A value quoted in an error line, cut so a huge value cannot flood the terminal."""
    return repr(value if len(value) <= limit else value[:limit] + "…")


def _parse_db_url(value: str, backends: tuple[str, ...]) -> URL:
    try:
        url = make_url(value)
    except (ArgumentError, ValueError):
        raise ValueError(
            "is not a database URL; use e.g. sqlite:///migrator.db or "
            "postgresql+psycopg2://user@host/db"
        ) from None
    if url.get_backend_name() not in backends:
        raise ValueError(
            f"database {url.get_backend_name()!r} is not supported here; use one of "
            + ", ".join(backends)
        )
    return url


def _did_you_mean(word: str, choices: list[str]) -> str:
    if word.lower() in _CREDENTIAL_KEYS:
        return " (credentials never go in config.yaml: use the AWS credential chain or a profile)"
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = Config
    for part in loc:
        if isinstance(part, int):  # an item of a list, e.g. app_db.targets.0
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return []
        ann = field.annotation
        inner = [a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type)]
        nested = [a for a in inner if issubclass(a, BaseModel)]
        if not nested:
            return []
        model = nested[0]
    return list(model.model_fields)


def format_errors(err: ValidationError, source: str) -> str:
    """One line per problem: ``config.yaml: workers: Input should be ...``."""
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        where = ".".join(str(p) for p in loc) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            hint = _did_you_mean(str(loc[-1]), _fields_at(loc[:-1]))
            msg = f"unknown key{hint}"
        elif e["type"] == "missing":
            msg = "is required"
        lines.append(redact(f"{source}: {where}: {msg}"))
    return "\n".join(lines)


def load_config(
    path: str | os.PathLike[str], env: dict[str, str] | None = None, *, relocate: bool = False
) -> Config:
    """Read, override from the environment and validate; raise ConfigError with clear lines.
    ``relocate``: the config of ``migrator relocate``, whose source and destination name the
    same bucket (before and after the move), which any other command refuses."""
    env = dict(os.environ) if env is None else env
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{p}: is a directory; pass --config with the path of a YAML file")
    if not p.is_file():
        raise ConfigError(
            f"{p}: config file not found; pass --config PATH or create config.yaml (see README)"
        )
    try:
        if p.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(
                f"{p}: {p.stat().st_size:,} bytes is too large for a config file "
                f"(at most {MAX_CONFIG_BYTES:,})"
            )
        raw = yaml.load(p.read_text(encoding="utf-8"), Loader=_LOADER)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{p}: YAML syntax error{where}: {problem}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not UTF-8 text") from None
    except RecursionError:
        raise ConfigError(f"{p}: YAML nested too deeply") from None
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read: {exc.strerror or exc}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: expected a mapping of keys (job, source, destination, ...)")
    if env.get(ENV_LEDGER):
        raw["ledger"] = env[ENV_LEDGER]
    if env.get(ENV_APP_DB_URL):
        if not isinstance(raw.get("app_db"), dict):
            raise ConfigError(
                f"{ENV_APP_DB_URL} is set but {p} has no app_db section "
                "(table and column, or targets)"
            )
        raw["app_db"] = {**raw["app_db"], "url": env[ENV_APP_DB_URL]}
    if env.get(ENV_WEBHOOK_URL):
        notify = raw.get("notify")
        raw["notify"] = {
            **(notify if isinstance(notify, dict) else {}),
            "webhook_url": env[ENV_WEBHOOK_URL],
        }
    raw["ledger"] = _anchor_sqlite(raw.get("ledger", "sqlite:///migrator.db"), p.parent)
    if isinstance(raw.get("app_db"), dict) and isinstance(raw["app_db"].get("url"), str):
        raw["app_db"]["url"] = _anchor_sqlite(raw["app_db"]["url"], p.parent)
    try:
        return Config.model_validate(raw, context={"relocate": relocate})
    except ValidationError as exc:
        raise ConfigError(format_errors(exc, str(p))) from None


def _anchor_sqlite(value: Any, base: Path) -> Any:
    """Relative SQLite paths are relative to the config file, not the current directory."""
    if not isinstance(value, str):
        return value
    try:
        url = make_url(value)
    except (ArgumentError, ValueError):
        return value
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return value
    if Path(url.database).is_absolute():
        return value
    return url.set(database=str((base / url.database).resolve())).render_as_string(
        hide_password=False
    )
