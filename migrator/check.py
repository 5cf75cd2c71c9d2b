"""``migrator check``: what a run needs, as a checklist, before anything is moved.

Each item is ``ok``, ``warn`` (the run works, but the operator should know), ``fail`` (the run
would fail or do harm) or ``skip`` (not applicable, or not safely testable). The probes are
chosen to change nothing that matters: the source's delete right is probed by deleting a key
that does not exist (skipped on a versioned bucket, where that would leave a delete marker),
the destination's write right by writing an empty probe object and removing it again (its
version too, on a versioned bucket) — written as the copies will be (the job's encryption,
KMS key and ACL), and read back when it is SSE-KMS. ``run`` repeats the checks that cost no
listing and no probe (``start_checks``) and prints the warnings.
"""

from __future__ import annotations

import functools
import os
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from migrator.appdb import AppDatabase
from migrator.config import Config, Location
from migrator.errors import MigratorError, db_reason
from migrator.ledger.repo import safe_url, schema_revision
from migrator.storage import s3


@dataclass(frozen=True)
class Item:
    check: str
    status: str  # ok | warn | fail | skip
    detail: str

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def _s3_reason(exc: Exception) -> str:
    if isinstance(exc, ClientError):
        return f"{s3.error_code(exc)}: {exc.response.get('Error', {}).get('Message', '')}".strip()
    return str(exc)


class _Side:
    """The checks of one bucket, with one client and what earlier checks found."""

    def __init__(self, cfg: Config, loc: Location, side: str) -> None:
        self.cfg, self.loc, self.side = cfg, loc, side
        self.versioning = ""  # "", "Enabled" or "Suspended"
        self.bucket_region: str | None = loc.region  # as HeadBucket says, once checked
        self.where = f"s3://{loc.bucket}/{loc.prefix}"
        self.problem: str | None = None  # why no client can be built (an unknown profile)
        try:
            self.factory = s3.ClientFactory(loc, max_pool=2, max_attempts=2, connect_timeout=5)
        except MigratorError as exc:
            self.problem = str(exc)

    @functools.cached_property
    def client(self) -> Any:
        """Built on first use: ``run``'s checks need none for the destination."""
        return self.factory.client()

    def close(self) -> None:
        if "client" in self.__dict__:
            self.client.close()

    def item(self, what: str, status: str, detail: str) -> Item:
        return Item(f"{self.side}: {what}", status, detail)

    def credentials(self, *, validate: bool = True) -> Item:
        if self.problem is not None:
            return self.item("credentials", "fail", self.problem)
        creds = self.factory.core.get_credentials()
        if creds is None:
            profile = f" (profile {self.loc.profile})" if self.loc.profile else ""
            return self.item(
                "credentials",
                "fail",
                f"no AWS credentials found{profile}: set AWS_ACCESS_KEY_ID/"
                "AWS_SECRET_ACCESS_KEY, a profile, or a role",
            )
        if self.loc.role_arn is not None:
            # Assumed now (one AssumeRole), so a role that cannot be assumed fails here with
            # STS's reason rather than as "access denied" on the first bucket.
            try:
                creds.get_frozen_credentials()
            except (ClientError, BotoCoreError) as exc:
                return self.item(
                    "credentials",
                    "fail",
                    f"{self.side}.role_arn {self.loc.role_arn} cannot be assumed "
                    f"({_s3_reason(exc)}); check the role ARN, external_id, the role's trust "
                    "policy and that the profile's credentials may call sts:AssumeRole",
                )
        if not validate:
            return self.item("credentials", "ok", f"found ({creds.method})")
        if self.loc.endpoint_url is not None:
            return self.item(
                "credentials", "ok", f"found ({creds.method}); a custom endpoint: no STS check"
            )
        # On AWS, STS says whether they are valid, and whose they are (account and ARN are
        # not secrets); the S3 checks below say what they may do. A network without a route
        # to STS (a VPC with only an S3 endpoint) is no reason to fail.
        try:
            sts = self.factory.session.client("sts", region_name=self.loc.region or "us-east-1")
            who = sts.get_caller_identity()
        except ClientError as exc:
            return self.item("credentials", "fail", f"rejected by AWS STS: {_s3_reason(exc)}")
        except BotoCoreError as exc:
            return self.item(
                "credentials", "warn", f"found ({creds.method}); STS not reachable: {exc}"
            )
        return self.item(
            "credentials", "ok", f"valid ({creds.method}): account {who['Account']}, {who['Arn']}"
        )

    def bucket(self) -> Item:
        try:
            region = s3.check_bucket(self.client, self.loc, self.side)
        except MigratorError as exc:
            return self.item("bucket", "fail", str(exc))
        self.bucket_region = region or self.bucket_region
        if region and self.loc.region and region != self.loc.region:
            return self.item(
                "bucket",
                "warn",
                f"{self.loc.bucket} is in {region}, the config says {self.loc.region}; set "
                f"{self.side}.region: {region}",
            )
        return self.item("bucket", "ok", f"{self.loc.bucket} exists, region {region or '?'}")

    def versioning_state(self) -> Item:
        try:
            status = self.client.get_bucket_versioning(Bucket=self.loc.bucket).get("Status", "")
        except (ClientError, BotoCoreError) as exc:
            return self.item(
                "versioning",
                "warn",
                f"unknown ({_s3_reason(exc)}); grant s3:GetBucketVersioning to check",
            )
        self.versioning = status
        if self.side == "destination" and self.cfg.versions == "all" and status != "Enabled":
            return self.item(
                "versioning",
                "fail",
                f"{status or 'not versioned'}: versions: all needs versioning enabled on "
                f"{self.loc.bucket}, or each version copied would replace the last (aws s3api "
                f"put-bucket-versioning --bucket {self.loc.bucket} --versioning-configuration "
                "Status=Enabled)",
            )
        if status and self.side == "source" and self.cfg.delete_source != "never":
            if self.cfg.delete_versions:
                return self.item(
                    "versioning",
                    "ok",
                    f"{status}: deleting a source removes its migrated versions for good "
                    "(delete_versions: true); versions not migrated stay",
                )
            return self.item(
                "versioning",
                "warn",
                f"{status}: deleting a source leaves a delete marker, and the migrated "
                "versions stay (and are billed) until a lifecycle rule expires them; "
                "delete_versions: true removes them instead",
            )
        return self.item("versioning", "ok", status or "not versioned")

    def list_right(self) -> tuple[Item, str | None]:
        try:
            resp = self.client.list_objects_v2(
                Bucket=self.loc.bucket, Prefix=self.loc.prefix, MaxKeys=1
            )
        except (ClientError, BotoCoreError) as exc:
            return self.item("list", "fail", f"cannot list {self.where}: {_s3_reason(exc)}"), None
        first = next((o["Key"] for o in resp.get("Contents", ())), None)
        if first is None and self.side == "source":
            return self.item("list", "warn", f"{self.where} holds no objects"), None
        return self.item("list", "ok", f"can list {self.where}"), first

    def read_right(self, key: str | None) -> Item:
        if key is None:
            return self.item("read", "skip", "no object to read")
        try:
            self.client.head_object(Bucket=self.loc.bucket, Key=key)
        except (ClientError, BotoCoreError) as exc:
            return self.item("read", "fail", f"cannot read {key}: {_s3_reason(exc)}")
        return self.item("read", "ok", f"can read objects (HeadObject {key})")

    def probe_key(self) -> str:
        return f"{self.loc.prefix}.migrator-check-{uuid.uuid4().hex}"

    def delete_right(self) -> Item:
        if self.versioning:
            return self.item(
                "delete", "skip", "not probed on a versioned bucket (it would leave a marker)"
            )
        key = self.probe_key()
        try:
            self.client.delete_object(Bucket=self.loc.bucket, Key=key)
        except (ClientError, BotoCoreError) as exc:
            return self.item("delete", "fail", f"cannot delete in {self.where}: {_s3_reason(exc)}")
        return self.item("delete", "ok", "can delete (probed with a key that does not exist)")

    def write_right(self) -> Item:
        """Write an empty probe object as the copies will be written (encryption, KMS key,
        ACL: what S3 checks rights and settings for), read it back if it is SSE-KMS (copies
        in parts and their verification need ``kms:Decrypt``), and remove it."""
        key = self.probe_key()
        attrs = self.cfg.attributes
        write = attrs.probe_args()
        how = "".join(f", {label}" for label in attrs.probe_labels())
        try:
            put = self.client.put_object(Bucket=self.loc.bucket, Key=key, Body=b"", **write)
        except (ClientError, BotoCoreError) as exc:
            return self.item(
                "write", "fail", f"cannot write to {self.where}{how}: {_s3_reason(exc)}"
            )
        extra = {"VersionId": put["VersionId"]} if put.get("VersionId") else {}
        read_back: Item | None = None
        if attrs.sse == "aws:kms":
            try:
                self.client.get_object(Bucket=self.loc.bucket, Key=key, **extra)["Body"].close()
            except (ClientError, BotoCoreError) as exc:
                read_back = self.item(
                    "write",
                    "fail",
                    f"can write{how}, but not read back ({_s3_reason(exc)}): copies in parts "
                    "and their verification need kms:Decrypt on the key",
                )
        try:
            self.client.delete_object(Bucket=self.loc.bucket, Key=key, **extra)
        except (ClientError, BotoCoreError) as exc:
            return self.item(
                "write",
                "warn" if read_back is None else "fail",
                f"can write{how}, but the probe object {key} could not be removed "
                f"({_s3_reason(exc)}); delete it by hand",
            )
        if read_back is not None:
            return read_back
        return self.item("write", "ok", f"can write{how} (an empty probe object, removed again)")

    def kms_key(self) -> Item:
        """``sse: aws:kms``: the key exists, is enabled, encrypts, and is in the bucket's
        region (S3 uses no key of another region), asked with this side's credentials. A key
        the credentials may not describe is left to the write probe, which uses it."""
        key = self.cfg.kms_key_id
        if key is None:
            return self.item(
                "kms key",
                "ok",
                "the AWS managed key aws/s3 (S3 creates it on first use; the write probe uses it)",
            )
        # The S3 endpoint serves KMS too where it is an emulator (moto); a network with a route
        # to S3 only (a VPC endpoint) answers late or never: a short timeout, few retries.
        kms = self.factory.session.client(
            "kms",
            endpoint_url=self.loc.endpoint_url,
            region_name=self.loc.region,
            config=BotoConfig(connect_timeout=5, read_timeout=10, retries={"max_attempts": 2}),
        )
        try:
            meta = kms.describe_key(KeyId=key)["KeyMetadata"]
        except ClientError as exc:
            code = s3.error_code(exc)
            if code in ("NotFoundException", "InvalidArnException"):
                return self.item(
                    "kms key",
                    "fail",
                    f"KMS key {key} not found ({_s3_reason(exc)}); fix kms_key_id (a key of "
                    "another account by its ARN)",
                )
            return self.item(
                "kms key",
                "warn",
                f"cannot describe KMS key {key} ({_s3_reason(exc)}); grant kms:DescribeKey to "
                "check it (the write probe of migrator check uses it)",
            )
        except BotoCoreError as exc:
            return self.item(
                "kms key", "warn", f"KMS not reachable ({exc}); the write probe uses the key"
            )
        finally:
            kms.close()
        state, arn = meta.get("KeyState"), meta.get("Arn", key)
        if state != "Enabled":
            return self.item(
                "kms key", "fail", f"KMS key {arn} is {state}; enable it or fix kms_key_id"
            )
        if (
            meta.get("KeyUsage", "ENCRYPT_DECRYPT") != "ENCRYPT_DECRYPT"
            or meta.get("KeySpec", "SYMMETRIC_DEFAULT") != "SYMMETRIC_DEFAULT"
        ):
            return self.item(
                "kms key",
                "fail",
                f"KMS key {arn} is not a symmetric encryption key; S3 encrypts only with one",
            )
        region = arn.split(":")[3] if arn.startswith("arn:") else None
        if region and self.bucket_region and region != self.bucket_region:
            return self.item(
                "kms key",
                "fail",
                f"KMS key {arn} is in {region}, bucket {self.loc.bucket} in "
                f"{self.bucket_region}; S3 needs a key in the bucket's region",
            )
        return self.item("kms key", "ok", f"{arn} is enabled for encryption")


def _side_items(cfg: Config, check: _Side) -> tuple[list[Item], str | None]:
    """One bucket's items, stopping at the first that makes the rest meaningless; and the
    first key listed there."""
    creds = check.credentials()
    if creds.status == "fail":
        return [creds], None
    bucket = check.bucket()
    if bucket.status == "fail":
        return [creds, bucket], None
    items = [creds, bucket, check.versioning_state()]
    listed, first = check.list_right()
    items.append(listed)
    if check.side == "source":
        items.append(check.read_right(first))
        if cfg.delete_source != "never":
            items.append(check.delete_right())
    else:
        if cfg.sse == "aws:kms":
            items.append(check.kms_key())
        items.append(check.write_right())
    return items, first


def _s3_items(cfg: Config) -> list[Item]:
    items: list[Item] = []
    first: str | None = None
    for loc, side in ((cfg.source, "source"), (cfg.destination, "destination")):
        check = _Side(cfg, loc, side)
        try:
            found, key = _side_items(cfg, check)
        finally:
            check.close()
        items += found
        first = key if side == "source" else first
    items.append(_copy_item(cfg, first))
    return items


def _copy_item(cfg: Config, source_key: str | None) -> Item:
    """How objects will be copied (``copy_mode``), and whether the credentials allow it."""
    if cfg.streams:
        if cfg.copy_mode == "stream":
            why = "copy_mode: stream"
        elif not cfg.same_endpoint:
            why = "the sides are on different endpoints"
        else:
            why = "the sides use different credentials"
        return Item("copy", "ok", f"streamed GET -> PUT through this host ({why})")
    if cfg.source.principal == cfg.destination.principal:
        return Item("copy", "ok", "server-side (CopyObject): no bytes pass through this host")
    # copy_mode: server with other credentials: the destination's send the copies, and must be
    # allowed to read the source (a bucket policy of the source's account).
    if source_key is None:
        return Item(
            "copy",
            "skip",
            "server-side with the destination's credentials; no source "
            "object to check that they can read it",
        )
    check = _Side(cfg, cfg.destination, "destination")
    try:
        if check.problem is not None:
            return Item("copy", "fail", check.problem)
        check.client.head_object(Bucket=cfg.source.bucket, Key=source_key)
    except (ClientError, BotoCoreError) as exc:
        return Item(
            "copy",
            "fail",
            f"copy_mode: server: the destination's credentials cannot read the source "
            f"({source_key}: {_s3_reason(exc)}); grant them s3:GetObject and "
            "s3:GetObjectTagging on the source (a bucket policy), or use copy_mode: stream",
        )
    finally:
        check.close()
    return Item(
        "copy",
        "ok",
        "server-side with the destination's credentials, which can read the source "
        f"(HeadObject {source_key})",
    )


def _index_of(engine: sa.Engine, table: sa.Table, column: str) -> str | None:
    """The name of an index (or key) that starts with ``column``, if any."""
    insp = sa.inspect(engine)
    found: list[tuple[str | None, list[Any]]] = []
    pk = insp.get_pk_constraint(table.name, schema=table.schema)
    found.append((pk.get("name") or "primary key", pk.get("constrained_columns") or []))
    for ix in insp.get_indexes(table.name, schema=table.schema):
        found.append((ix.get("name"), list(ix.get("column_names") or [])))
    for uq in insp.get_unique_constraints(table.name, schema=table.schema):
        found.append((uq.get("name"), list(uq.get("column_names") or [])))
    return next((name or "unnamed" for name, cols in found if cols[:1] == [column]), None)


def _app_items(cfg: Config) -> list[Item]:
    if cfg.app_db is None:
        return [Item("app database", "skip", "no app_db: nothing to rewrite")]
    names = ", ".join(dict.fromkeys(t.name for t in cfg.app_db.all_targets))
    try:
        app = AppDatabase(cfg.app_db)
    except MigratorError as exc:
        return [Item("app database", "fail", str(exc))]
    indexes: dict[str, str | None] = {}
    try:
        for t in app.targets:
            indexes[t.name] = _index_of(app.engine, t.table, t.column.name)
    except SQLAlchemyError as exc:
        return [Item("app database", "warn", f"{names} found; indexes unknown: {db_reason(exc)}")]
    finally:
        app.dispose()
    items = [Item("app database", "ok", f"{names} found in {safe_url(cfg.app_db.url)}")]
    mysql = make_url(cfg.app_db.url).get_backend_name() in ("mysql", "mariadb")
    for name, index in indexes.items():
        table, _, column = name.rpartition(".")
        # one target keeps the plain name; several get one item each, named by their column
        label = "app index" if len(indexes) == 1 else f"app index: {name}"
        if index is None:
            # InnoDB indexes at most 3,072 bytes of a value: a prefix of 768 utf8mb4 characters
            how = (
                f"CREATE INDEX ix_{column} ON {table} ({column}(768))"
                if mysql
                else f"CREATE INDEX ON {table} ({column})"
            )
            items.append(
                Item(
                    label,
                    "warn",
                    f"no index on {name}: every rewrite batch scans the table; {how}",
                )
            )
        else:
            items.append(Item(label, "ok", f"{name} is indexed ({index})"))
    return items


def _ledger_item(cfg: Config) -> Item:
    url = make_url(cfg.ledger)
    where = safe_url(cfg.ledger)
    if url.get_backend_name() == "sqlite":
        path = Path(url.database or "")
        if path.exists():
            ok = os.access(path, os.W_OK) and os.access(path.parent, os.W_OK)
            detail = f"{path} exists" + ("" if ok else " but is not writable (file or directory)")
            return Item("ledger", "ok" if ok else "fail", detail)
        parent = next((p for p in path.absolute().parents if p.exists()), Path("/"))
        ok = os.access(parent, os.W_OK)
        return Item(
            "ledger",
            "ok" if ok else "fail",
            f"{path} will be created" if ok else f"cannot create {path}: {parent} not writable",
        )
    engine = sa.create_engine(url, connect_args={"connect_timeout": 5})
    try:
        with engine.connect() as conn:
            revision = schema_revision(engine)
            if revision is None:
                allowed = conn.execute(
                    sa.text("SELECT has_database_privilege(current_database(), 'CREATE')")
                ).scalar()
                detail = "no ledger tables yet; they will be created"
            else:
                allowed = conn.execute(
                    sa.text(
                        "SELECT has_table_privilege('migrator_objects', "
                        "'SELECT, INSERT, UPDATE, DELETE')"
                    )
                ).scalar()
                detail = f"schema revision {revision}"
    except SQLAlchemyError as exc:
        return Item("ledger", "fail", f"ledger {where} is not usable: {db_reason(exc)}")
    finally:
        engine.dispose()
    if not allowed:
        return Item("ledger", "fail", f"{where}: {detail}, but this user may not write there")
    return Item("ledger", "ok", f"{where}: {detail}")


def run_checks(cfg: Config) -> list[Item]:
    """Every check, in the order an operator reads them (``migrator check``)."""
    return [*_s3_items(cfg), *_app_items(cfg), _ledger_item(cfg)]


def start_checks(cfg: Config) -> list[Item]:
    """What ``run`` checks before its pre-flight: the items that cost no listing and no
    probe — credentials, the source's versioning when sources are deleted (one request), the
    destination's KMS key under SSE-KMS (one request), the app column's index. Buckets, the
    app table and the ledger are pre-flight's own checks."""
    items: list[Item] = []
    for loc, side in ((cfg.source, "source"), (cfg.destination, "destination")):
        check = _Side(cfg, loc, side)
        items.append(check.credentials(validate=False))  # no STS request at every run
        if side == "source" and cfg.delete_source != "never" and items[-1].status == "ok":
            versioning = check.versioning_state()
            if check.versioning:  # known to be on; a refused read is pre-flight's to report
                items.append(versioning)
        if side == "destination" and cfg.versions == "all" and items[-1].status == "ok":
            items.append(check.versioning_state())  # one request: fails when not enabled
        if side == "destination" and cfg.sse == "aws:kms" and items[-1].status == "ok":
            items.append(check.kms_key())  # one request: a mistyped key stops the run here
        check.close()
    if cfg.app_db is not None:
        items += [i for i in _app_items(cfg) if i.check.startswith("app index")]
    return items
