"""A whole job against app rows that hold full URLs in two tables (one also with bare keys), on
SQLite, Postgres and MySQL/MariaDB: ``migrator run`` rewrites exactly the configured values,
``migrator verify`` agrees and then finds a row put back to an old URL; a target that fails
rolls the whole chunk back and no source is deleted."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from rich.console import Console

from migrator.supervisor import run_job
from tests.helpers import Job, list_keys, make_job, run_cli

LEGACY = "https://legacy.s3.amazonaws.com/"
CDN = "https://cdn.example.com/"
# Two objects whose keys differ in case only: MySQL's default collation calls them equal.
KEYS = [f"image/{i:03d}.png" for i in range(8)] + ["image/case.png", "image/CASE.png"]
OTHER_HOST = "https://other.example.com/image/000.png"


def targets(url: str) -> dict[str, Any]:
    return {
        "url": url,
        "targets": [
            {"table": "avatars", "column": "path"},
            {
                "table": "avatars",
                "column": "path",
                "value": LEGACY + "{key}",
                "new_value": CDN + "{key}",
            },
            {
                "table": "profiles",
                "column": "photo_url",
                "value": LEGACY + "{key}",
                "new_value": CDN + "{key}",
            },
        ],
    }


def job_with_urls(
    tmp_path: Path, s3: Any, endpoint: str, app_url: str, poison: str | None = None, **kw: Any
) -> Job:
    """The seeder's ``avatars`` (a bare key per object and rows to leave alone), plus a legacy
    URL per object in ``avatars`` and in a new ``profiles`` table, plus a URL of another host.
    ``poison``: a CHECK constraint on ``profiles`` refuses that value."""
    job = make_job(
        tmp_path,
        s3,
        endpoint,
        ledger=f"sqlite:///{tmp_path / 'ledger.db'}",
        app=None,
        keys=KEYS,
        app_db=targets(app_url),
        **kw,
    )
    engine = sa.create_engine(app_url)
    meta = sa.MetaData()
    avatars = sa.Table("avatars", meta, autoload_with=engine)
    checks = [sa.CheckConstraint(f"photo_url <> '{poison}'")] if poison else []
    profiles = sa.Table(
        "profiles",
        meta,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("photo_url", sa.String(1024)),
        *checks,
    )
    with engine.begin() as conn:
        profiles.create(conn)
        conn.execute(
            avatars.insert(), [{"user_id": 500 + i, "path": LEGACY + k} for i, k in enumerate(KEYS)]
        )
        conn.execute(
            profiles.insert(),
            [{"photo_url": LEGACY + k} for k in KEYS] + [{"photo_url": OTHER_HOST}],
        )
    engine.dispose()
    return job


def column(url: str, table: str, name: str) -> list[str | None]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            q = sa.text(f"SELECT {name} FROM {table} ORDER BY id")
            return list(conn.execute(q).scalars())
    finally:
        engine.dispose()


def test_urls_in_two_tables_are_rewritten_and_verified(
    tmp_path: Path, moto_s3: Any, moto_endpoint: str, app_url: str
) -> None:
    job = job_with_urls(tmp_path, moto_s3, moto_endpoint, app_url)
    before = column(app_url, "avatars", "path")
    dry = run_cli("run", "--dry-run", "--config", str(job.config_path))
    assert dry.returncode == 0, dry.stdout + dry.stderr
    # a bare key and a URL per object in avatars, a URL per object in profiles
    rows = 3 * len(KEYS)
    assert f"would rewrite  {rows} rows of avatars.path, profiles.photo_url" in dry.stdout
    assert run_job(job.cfg, console=Console(stderr=True, quiet=True)) == 0

    dest = {k: job.dest_key(k) for k in KEYS}
    want = []
    for value in before:
        if value in dest:
            want.append(dest[value])
        elif value is not None and value.removeprefix(LEGACY) in dest:
            want.append(CDN + dest[value.removeprefix(LEGACY)])
        else:
            want.append(value)  # banner/, images/, NULL: left alone
    assert column(app_url, "avatars", "path") == want
    assert column(app_url, "profiles", "photo_url") == [CDN + dest[k] for k in KEYS] + [OTHER_HOST]
    assert "avatar/CASE.png" in want and "avatar/case.png" in want  # each to its own object
    assert list_keys(moto_s3, job.cfg.source.bucket) == set()

    ok = run_cli("verify", "--config", str(job.config_path))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "no discrepancy" in ok.stdout

    # An app puts an old URL back behind migrator's back: verify names the table and value.
    engine = sa.create_engine(app_url)
    with engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE profiles SET photo_url = :old WHERE photo_url = :new"),
            {"old": LEGACY + "image/CASE.png", "new": CDN + dest["image/CASE.png"]},
        )
    engine.dispose()
    bad = run_cli("verify", "--json", "--config", str(job.config_path))
    assert bad.returncode == 1, bad.stdout + bad.stderr
    doc = json.loads(bad.stdout)
    assert doc["discrepancies"] == {
        "app row still points at a migrated source key": 1,
        "app row points at a source key that does not exist": 1,
    }
    assert doc["examples"]["app row still points at a migrated source key"] == [
        f"profiles.photo_url: {LEGACY}image/CASE.png"
    ]


def test_a_failing_target_rolls_back_the_chunk_and_deletes_nothing(
    tmp_path: Path, moto_s3: Any, moto_endpoint: str, app_url: str
) -> None:
    poison = CDN + "avatar/003.png"
    job = job_with_urls(
        tmp_path,
        moto_s3,
        moto_endpoint,
        app_url,
        poison=poison,
        workers=1,
        chunk_size=100,
        max_attempts=1,
        delete_source="per_chunk",
    )
    avatars = column(app_url, "avatars", "path")
    profiles = column(app_url, "profiles", "photo_url")
    assert run_job(job.cfg, console=Console(stderr=True, quiet=True)) != 0
    # profiles' CHECK refused one value; avatars, rewritten earlier in the same transaction,
    # was rolled back with it, and no source went.
    assert column(app_url, "avatars", "path") == avatars
    assert column(app_url, "profiles", "photo_url") == profiles
    assert list_keys(moto_s3, job.cfg.source.bucket) == set(KEYS)
    status = run_cli("status", "--json", "--config", str(job.config_path))
    assert json.loads(status.stdout)["counts"]["failed"] == len(KEYS), status.stdout


def test_a_source_still_pointed_at_after_the_guards_rewrite_is_kept(
    tmp_path: Path, moto_s3: Any, moto_endpoint: str
) -> None:
    """An app that writes the old URL back after every update (a trigger here): the rewrite
    stage commits, the delete guard finds the row again, rewrites it, finds it once more and
    keeps the source instead of deleting it (I1); the other sources go."""
    app_url = f"sqlite:///{tmp_path / 'app.db'}"
    sa.create_engine(app_url).connect().close()
    job = job_with_urls(
        tmp_path, moto_s3, moto_endpoint, app_url, max_attempts=1, delete_source="per_chunk"
    )
    stubborn = "image/003.png"
    engine = sa.create_engine(app_url)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TRIGGER keep_old AFTER UPDATE OF photo_url ON profiles "
            f"WHEN NEW.photo_url = '{CDN}avatar/003.png' BEGIN "
            "UPDATE profiles SET photo_url = OLD.photo_url WHERE id = NEW.id; END"
        )
    engine.dispose()
    assert run_job(job.cfg, console=Console(stderr=True, quiet=True)) != 0
    assert list_keys(moto_s3, job.cfg.source.bucket) == {stubborn}
    assert LEGACY + stubborn in column(app_url, "profiles", "photo_url")
    status = json.loads(run_cli("status", "--json", "--config", str(job.config_path)).stdout)
    assert status["counts"]["failed"] == 1 and status["counts"]["done"] == len(KEYS) - 1
