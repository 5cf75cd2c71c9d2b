"""End-to-end runs against the moto server, with the ledger and app DB on SQLite and Postgres."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from migrator.config import load_config
from migrator.ledger.repo import open_ledger
from migrator.supervisor import run_job
from tests.helpers import assert_converged, list_keys, make_job, run_cli, sqlite_job


def quiet_console() -> Console:
    return Console(stderr=True, quiet=True)


def test_run_migrates_rewrites_and_deletes(
    tmp_path: Path, moto_s3: Any, moto_endpoint: str, db_urls: dict[str, str]
) -> None:
    job = make_job(
        tmp_path, moto_s3, moto_endpoint, ledger=db_urls["ledger"], app=db_urls["app"], count=45
    )
    assert run_job(job.cfg, console=quiet_console()) == 0
    assert_converged(job)
    # Contract: status --json has job, total and counts by state.
    proc = run_cli("status", "--json", "--config", str(job.config_path))
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["job"] == job.cfg.job
    assert doc["total"] == 45
    assert doc["counts"]["done"] == 45 and doc["counts"]["failed"] == 0
    # A second run finds nothing to do and changes nothing.
    assert run_job(job.cfg, console=quiet_console()) == 0
    assert_converged(job)


@pytest.mark.parametrize("policy", ["per_chunk", "never"])
def test_delete_policies(tmp_path: Path, moto_s3: Any, moto_endpoint: str, policy: str) -> None:
    job = sqlite_job(
        tmp_path, moto_s3, moto_endpoint, with_app=True, count=25, delete_source=policy
    )
    assert run_job(job.cfg, console=quiet_console()) == 0
    assert_converged(job, sources_deleted=policy != "never")


def test_without_app_db_copies_and_deletes(
    tmp_path: Path, moto_s3: Any, moto_endpoint: str
) -> None:
    job = make_job(
        tmp_path, moto_s3, moto_endpoint, ledger=f"sqlite:///{tmp_path / 'l.db'}", app=None
    )
    assert run_job(job.cfg, console=quiet_console()) == 0
    assert_converged(job)


def test_metadata_and_content_type_are_kept(
    tmp_path: Path, moto_s3: Any, moto_endpoint: str
) -> None:
    job = sqlite_job(
        tmp_path, moto_s3, moto_endpoint, with_app=False, count=3, delete_source="never"
    )
    assert run_job(job.cfg, console=quiet_console()) == 0
    for obj in job.objects:
        head = moto_s3.head_object(Bucket=job.cfg.destination.bucket, Key=job.dest_key(obj.key))
        assert head["ContentType"] == obj.content_type
        assert head["Metadata"] == {"user-id": str(obj.user_id)}


def test_replan_adds_new_resets_changed_keeps_done(
    tmp_path: Path, moto_s3: Any, moto_endpoint: str
) -> None:
    job = sqlite_job(
        tmp_path, moto_s3, moto_endpoint, with_app=False, count=4, delete_source="never"
    )
    src = job.cfg.source.bucket
    proc = run_cli("plan", "--config", str(job.config_path))
    assert proc.returncode == 0, proc.stderr
    assert "4 new" in proc.stderr
    # Finish one object; change another; add a new one.
    assert run_job(job.cfg, console=quiet_console()) == 0
    moto_s3.put_object(Bucket=src, Key=job.objects[1].key, Body=b"changed bytes")
    moto_s3.put_object(Bucket=src, Key="image/new/object.png", Body=b"new")
    proc = run_cli("plan", "--config", str(job.config_path))
    assert proc.returncode == 0, proc.stderr
    # The new object is added; done object 1, changed at its kept source, goes back to
    # pending (docs/cutover.md); the other done rows are kept.
    assert "1 new, 1 changed, 3 unchanged" in proc.stderr


def test_replan_resets_changed_pending_row(
    tmp_path: Path, moto_s3: Any, moto_endpoint: str
) -> None:
    job = sqlite_job(tmp_path, moto_s3, moto_endpoint, with_app=False, count=3)
    assert run_cli("plan", "--config", str(job.config_path)).returncode == 0
    moto_s3.put_object(Bucket=job.cfg.source.bucket, Key=job.objects[0].key, Body=b"v2")
    proc = run_cli("plan", "--config", str(job.config_path))
    assert "0 new, 1 changed, 2 unchanged" in proc.stderr
    assert run_job(job.cfg, console=quiet_console()) == 0
    got = moto_s3.get_object(
        Bucket=job.cfg.destination.bucket, Key=job.dest_key(job.objects[0].key)
    )
    assert got["Body"].read() == b"v2"


WEIRD_KEYS = [
    "image/with space/a b.png",
    "image/plus+sign/c+d.png",
    "image/percent%20literal/e%2Bf.png",
    "image/unicode/ünïcødé-日本語-😀.png",
    "image//double//slash.png",
    "image/" + "k" * 994,  # 1,000-byte key
    "image/zero-byte.png",
    "image/question?mark&amp=.png",
]


def test_awkward_keys_round_trip(
    tmp_path: Path, moto_s3: Any, moto_endpoint: str, db_urls: dict[str, str]
) -> None:
    assert len(WEIRD_KEYS[5].encode()) == 1000
    job = make_job(
        tmp_path,
        moto_s3,
        moto_endpoint,
        ledger=db_urls["ledger"],
        app=db_urls["app"],
        keys=WEIRD_KEYS,
    )
    assert job.bodies["image/with space/a b.png"] == b""  # index 0: a zero-byte object
    assert run_job(job.cfg, console=quiet_console()) == 0
    assert_converged(job)
    # The audit merges S3 listings (byte order) with the ledger sorted the same way.
    proc = run_cli("verify", "--json", "--config", str(job.config_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(proc.stdout)["checked"] == len(WEIRD_KEYS)


def test_failed_rows_block_after_all_deletes_and_retry_failed_recovers(
    tmp_path: Path, moto_s3: Any, moto_endpoint: str
) -> None:
    job = sqlite_job(tmp_path, moto_s3, moto_endpoint, with_app=True, count=6)
    assert run_cli("plan", "--config", str(job.config_path)).returncode == 0
    gone = job.objects[2]
    moto_s3.delete_object(Bucket=job.cfg.source.bucket, Key=gone.key)
    assert run_job(job.cfg, console=quiet_console()) == 1
    # The missing source fails with a clear reason; nothing else is deleted (after_all).
    doc = json.loads(run_cli("status", "--json", "--config", str(job.config_path)).stdout)
    assert doc["counts"]["failed"] == 1
    assert doc["counts"]["rewritten"] == 5
    assert "source object no longer exists" in doc["recent_errors"][0]["error"]
    remaining = list_keys(moto_s3, job.cfg.source.bucket)
    assert remaining == {o.key for o in job.objects} - {gone.key}
    # Put the object back, retry the failed row: the job converges.
    moto_s3.put_object(
        Bucket=job.cfg.source.bucket,
        Key=gone.key,
        Body=gone.body,
        ContentType=gone.content_type,
        Metadata={"user-id": str(gone.user_id)},
    )
    proc = run_cli("retry-failed", "--config", str(job.config_path))
    assert proc.returncode == 0 and "1 failed objects put back" in proc.stdout
    assert run_job(job.cfg, console=quiet_console()) == 0
    assert_converged(job)


def test_report_csv_and_parquet(tmp_path: Path, moto_s3: Any, moto_endpoint: str) -> None:
    import pandas as pd

    job = sqlite_job(tmp_path, moto_s3, moto_endpoint, with_app=False, count=7)
    assert run_job(job.cfg, console=quiet_console()) == 0
    for name in ("r.csv", "r.parquet"):
        out = tmp_path / name
        proc = run_cli("report", "--config", str(job.config_path), "--out", str(out))
        assert proc.returncode == 0, proc.stderr
        frame = pd.read_csv(out) if name.endswith(".csv") else pd.read_parquet(out)
        assert len(frame) == 7
        assert set(frame["state"]) == {"done"}
        assert sorted(frame["source_key"]) == sorted(o.key for o in job.objects)
        assert {"attempts", "last_error", "dest_key", "size", "storage_class"} <= set(frame.columns)


def test_verify_reports_discrepancies(
    tmp_path: Path, moto_s3: Any, moto_endpoint: str, db_urls: dict[str, str]
) -> None:
    job = make_job(
        tmp_path, moto_s3, moto_endpoint, ledger=db_urls["ledger"], app=db_urls["app"], count=5
    )
    assert run_job(job.cfg, console=quiet_console()) == 0
    ok = run_cli("verify", "--config", str(job.config_path))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "no discrepancy" in ok.stdout
    # Break things behind the ledger's back: a destination goes missing, an app row reverts.
    moto_s3.delete_object(Bucket=job.cfg.destination.bucket, Key=job.dest_key(job.objects[0].key))
    import sqlalchemy as sa

    engine = sa.create_engine(job.cfg.app_db.url)  # type: ignore[union-attr]
    with engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE avatars SET path = :old WHERE path = :new"),
            {"old": job.objects[1].key, "new": job.dest_key(job.objects[1].key)},
        )
    engine.dispose()
    bad = run_cli("verify", "--json", "--config", str(job.config_path))
    assert bad.returncode == 1
    doc = json.loads(bad.stdout)
    assert doc["discrepancies"] == {
        "missing at destination": 1,
        "app row points at a destination key that does not exist": 1,
        "app row still points at a migrated source key": 1,
        "app row points at a source key that does not exist": 1,
    }


def test_env_overrides_ledger_url(tmp_path: Path, moto_s3: Any, moto_endpoint: str) -> None:
    job = sqlite_job(tmp_path, moto_s3, moto_endpoint, with_app=False, count=2)
    other = tmp_path / "elsewhere.db"
    proc = run_cli(
        "plan", "--config", str(job.config_path), env={"MIGRATOR_LEDGER": f"sqlite:///{other}"}
    )
    assert proc.returncode == 0, proc.stderr
    assert other.exists() and not (tmp_path / "l.db").exists()
    cfg = load_config(job.config_path, env={"MIGRATOR_LEDGER": f"sqlite:///{other}"})
    assert cfg.ledger.endswith("elsewhere.db")


def test_one_ledger_holds_several_jobs(tmp_path: Path, moto_s3: Any, moto_endpoint: str) -> None:
    ledger = f"sqlite:///{tmp_path / 'shared-ledger.db'}"
    first = make_job(tmp_path / "a", moto_s3, moto_endpoint, ledger=ledger, app=None, count=3)
    second = make_job(tmp_path / "b", moto_s3, moto_endpoint, ledger=ledger, app=None, count=5)
    assert run_job(first.cfg, console=quiet_console()) == 0
    assert run_job(second.cfg, console=quiet_console()) == 0
    for job, n in ((first, 3), (second, 5)):
        doc = json.loads(run_cli("status", "--json", "--config", str(job.config_path)).stdout)
        assert (doc["job"], doc["total"], doc["counts"]["done"]) == (job.cfg.job, n, n)
        assert_converged(job)


@pytest.mark.parametrize(
    ("policy", "with_app", "writes"),
    [
        # claim, copied, rewritten + release; claim once the gate opens, done + release
        ("after_all", True, 5),
        # claim, copied, rewritten, done + release: the delete follows in the same chunk
        ("per_chunk", True, 4),
        # claim, copied, done + release
        ("never", True, 3),
        # no app DB, nothing to rewrite: claim, done + release
        ("never", False, 2),
        # claim, rewritten + release; claim, done + release
        ("after_all", False, 4),
    ],
)
def test_ledger_writes_per_object(
    tmp_path: Path, moto_s3: Any, moto_endpoint: str, policy: str, with_app: bool, writes: int
) -> None:
    """Each row is updated a fixed, small number of times: a lease is given back in the same
    statement as the row's last state change, and a job without an app DB skips ``copied``.
    (A trigger on the SQLite ledger logs every row update.)"""
    job = sqlite_job(
        tmp_path,
        moto_s3,
        moto_endpoint,
        with_app=with_app,
        count=30,
        delete_source=policy,
        lease_seconds=600,  # no heartbeat during the run
    )
    engine = open_ledger(job.cfg.ledger)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE row_writes (id INTEGER)")
        conn.exec_driver_sql(
            "CREATE TRIGGER log_row_writes AFTER UPDATE ON migrator_objects "
            "BEGIN INSERT INTO row_writes (id) VALUES (NEW.id); END"
        )
    assert run_job(job.cfg, console=quiet_console()) == 0
    assert_converged(job, sources_deleted=policy != "never")
    with engine.connect() as conn:
        per_row = conn.exec_driver_sql("SELECT id, count(*) FROM row_writes GROUP BY id").all()
        leased = conn.exec_driver_sql(
            "SELECT count(*) FROM migrator_objects WHERE lease_owner IS NOT NULL"
        ).scalar_one()
    engine.dispose()
    assert len(per_row) == 30
    assert {n for _, n in per_row} == {writes}
    assert leased == 0
