"""``python -m seed --config config.yaml --objects N --size BYTES [--versions V]``

Creates both buckets, N avatar objects under the source prefix (parallel uploads, deterministic
content) and the application table with one row per object, plus rows a migration must leave
alone: other prefixes, a look-alike prefix, and NULL paths. With ``--versions V`` the source
bucket gets versioning and each object V versions (the last one the object above); the
destination bucket gets versioning too when the config says ``versions: all``.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import click
import sqlalchemy as sa
from botocore.exceptions import BotoCoreError, ClientError

from migrator.config import KEY_FIELD, Config, Location, Template, load_config
from migrator.errors import MigratorError, db_reason, redact
from migrator.storage.s3 import ClientFactory
from seed.data import SeedObject, seed_object

UPLOAD_THREADS = 32
BARE_KEY = Template(KEY_FIELD)


def create_bucket(client: Any, loc: Location) -> None:
    kwargs: dict[str, Any] = {"Bucket": loc.bucket}
    if loc.region and loc.region != "us-east-1":
        kwargs["CreateBucketConfiguration"] = {"LocationConstraint": loc.region}
    try:
        client.create_bucket(**kwargs)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in (
            "BucketAlreadyOwnedByYou",
            "BucketAlreadyExists",
        ):
            raise


def upload(client: Any, bucket: str, obj: SeedObject) -> None:
    client.put_object(
        Bucket=bucket,
        Key=obj.key,
        Body=obj.body,
        ContentType=obj.content_type,
        Metadata={"user-id": str(obj.user_id)},
    )


def older_version(obj: SeedObject, n: int) -> SeedObject:
    """Version ``n`` (from 0) of ``obj`` before its current one: as large, other bytes."""
    body = (f"version {n} of {obj.key} ".encode() + obj.body)[: max(len(obj.body), 1)]
    return SeedObject(obj.index, obj.key, obj.content_type, body, obj.user_id)


def upload_slice(location: Location, start: int, stop: int, size: int, versions: int = 1) -> int:
    """Upload objects ``start..stop-1`` from this process, ``UPLOAD_THREADS`` at a time, each
    after its ``versions - 1`` older versions (in order: a bucket with versioning keeps them).
    Plain PUTs without a CRC trailer: the checksum would cost more CPU than the request."""
    client = ClientFactory(
        location, max_pool=UPLOAD_THREADS + 4, request_checksums="when_required"
    ).client()

    def one(i: int) -> None:
        obj = seed_object(i, location.prefix, size)
        for n in range(versions - 1):
            upload(client, location.bucket, older_version(obj, n))
        upload(client, location.bucket, obj)

    with ThreadPoolExecutor(UPLOAD_THREADS) as pool:
        list(pool.map(one, range(start, stop)))
    return stop - start


def upload_all(
    location: Location, count: int, size: int, processes: int, versions: int = 1
) -> None:
    """Split the uploads over ``processes`` processes: one boto3 client is bound by the GIL
    at about one request per millisecond of CPU."""
    step = max(1, -(-count // max(processes, 1)))
    slices = [(i, min(i + step, count)) for i in range(0, count, step)]
    if len(slices) <= 1:
        for start, stop in slices:
            upload_slice(location, start, stop, size, versions)
        return
    ctx = multiprocessing.get_context("fork")  # nothing is running yet that forking could harm
    with ProcessPoolExecutor(len(slices), mp_context=ctx) as pool:
        futures = [pool.submit(upload_slice, location, a, b, size, versions) for a, b in slices]
        for f in futures:
            f.result()


def app_rows(
    objects: list[SeedObject], column: str, value: Template = BARE_KEY
) -> list[dict[str, Any]]:
    """One row per object (its key through the ``value`` template), then rows that must not
    be touched by the migration."""
    rows = [{"user_id": o.user_id, column: value.render(o.key)} for o in objects]
    extra = max(3, len(objects) // 10)
    for i in range(extra):
        rows.append({"user_id": 900_000 + i, column: f"banner/{i:06d}.png"})
        rows.append({"user_id": 910_000 + i, column: f"images/{i:06d}.png"})
        rows.append({"user_id": 920_000 + i, column: None})
    return rows


def seed_app_db(cfg: Config, objects: list[SeedObject], replace: bool) -> int:
    """Create the first app_db target's table with one row per object (see ``app_rows``)."""
    assert cfg.app_db is not None
    target = cfg.app_db.all_targets[0]
    engine = sa.create_engine(cfg.app_db.url)
    schema, _, name = target.table.rpartition(".")
    table = sa.Table(
        name,
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("user_id", sa.Integer, nullable=False),
        sa.Column(target.column, sa.String(1024), nullable=True),
        schema=schema or None,
        # InnoDB indexes at most 3,072 bytes: 768 utf8mb4 characters, enough to find a key.
        mysql_charset="utf8mb4",
    )
    sa.Index(f"ix_{name}_{target.column}", table.c[target.column], mysql_length=768)
    try:
        with engine.begin() as conn:
            if sa.inspect(conn).has_table(name, schema=schema or None):
                existing = conn.execute(sa.select(sa.func.count()).select_from(table)).scalar()
                if existing and not replace:
                    raise click.UsageError(
                        f"app table {target.table!r} already has {existing} rows; pass "
                        "--replace to drop and recreate it"
                    )
                table.drop(conn)
            table.create(conn)
            rows = app_rows(objects, target.column, target.old)
            conn.execute(table.insert(), rows)
    finally:
        engine.dispose()
    return len(rows)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_path",
    default="config.yaml",
    show_default=True,
    type=click.Path(path_type=Path),
    help="The job's config: buckets, prefixes and app_db to fill.",
)
@click.option(
    "--objects",
    "count",
    default=2000,
    show_default=True,
    type=click.IntRange(0),
    help="Objects to create under the source prefix.",
)
@click.option(
    "--size",
    default=2048,
    show_default=True,
    type=click.IntRange(0, 64 * 2**20),
    help="Bytes per object.",
)
@click.option(
    "--processes",
    default=max(2, os.cpu_count() or 1),
    show_default=True,
    type=click.IntRange(1, 64),
    help="Upload processes (each with 32 threads).",
)
@click.option(
    "--versions",
    default=1,
    show_default=True,
    type=click.IntRange(1, 100),
    help="Versions per object; above 1 the source bucket gets versioning (and the "
    "destination too under versions: all).",
)
@click.option("--replace", is_flag=True, help="Drop and recreate a non-empty app table.")
def main(
    config_path: Path, count: int, size: int, processes: int, versions: int, replace: bool
) -> None:
    """Create buckets, COUNT objects of SIZE bytes under the source prefix, and the app table.

    \b
    Examples:
      python -m seed --config config.yaml --objects 2000 --size 2048
      python -m seed --config config.yaml --objects 200 --versions 3
    """
    try:
        cfg = load_config(config_path)
    except MigratorError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    started = time.monotonic()
    objects = [seed_object(i, cfg.source.prefix, size) for i in range(count)]
    try:
        src = ClientFactory(cfg.source).client()
        dst = ClientFactory(cfg.destination).client()
        create_bucket(src, cfg.source)
        create_bucket(dst, cfg.destination)
        enabled = {"Status": "Enabled"}
        if versions > 1:
            src.put_bucket_versioning(Bucket=cfg.source.bucket, VersioningConfiguration=enabled)
        if versions > 1 and cfg.versions == "all":
            dst.put_bucket_versioning(
                Bucket=cfg.destination.bucket, VersioningConfiguration=enabled
            )
        upload_all(cfg.source, count, size, processes, versions)
    except (ClientError, BotoCoreError) as exc:
        click.echo(f"error: S3: {redact(str(exc))}", err=True)
        sys.exit(2)
    took = time.monotonic() - started
    click.echo(
        f"seeded {count:,} objects of {size:,} bytes"
        + (f" ({versions} versions each)" if versions > 1 else "")
        + " under "
        f"s3://{cfg.source.bucket}/{cfg.source.prefix} in {took:.1f} s "
        f"({count / took if took else 0:,.0f} objects/s)"
    )
    if cfg.app_db is not None:
        try:
            n = seed_app_db(cfg, objects, replace)
        except sa.exc.SQLAlchemyError as exc:
            reason = db_reason(exc)
            click.echo(f"error: app database: {redact(reason)}", err=True)
            sys.exit(2)
        click.echo(
            f"app table {cfg.app_db.all_targets[0].table}: {n:,} rows "
            f"({count:,} pointing at objects, "
            f"{n - count:,} that the migration must leave alone)"
        )


if __name__ == "__main__":
    main()
