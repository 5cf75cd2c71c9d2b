"""Failures that outlast retries: attempts counted, rows failed after max_attempts, sources kept,
and ``retry-failed`` + ``run`` finishing the job once the cause is gone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from rich.console import Console

from migrator.supervisor import run_job
from tests.helpers import assert_converged, list_keys, run_cli, sqlite_job


def test_rewrite_failures_exhaust_attempts_and_keep_sources(
    tmp_path: Path, moto_s3: Any, moto_endpoint: str
) -> None:
    job = sqlite_job(
        tmp_path,
        moto_s3,
        moto_endpoint,
        with_app=True,
        count=12,
        max_attempts=2,
        delete_source="per_chunk",
    )
    app = sa.create_engine(job.cfg.app_db.url)  # type: ignore[union-attr]
    with app.begin() as conn:  # the application refuses every update
        conn.execute(
            sa.text(
                "CREATE TRIGGER frozen BEFORE UPDATE ON avatars "
                "BEGIN SELECT RAISE(ABORT, 'avatars is read-only'); END"
            )
        )
    quiet = Console(stderr=True, quiet=True)
    assert run_job(job.cfg, console=quiet) == 1
    doc = json.loads(run_cli("status", "--json", "--config", str(job.config_path)).stdout)
    assert doc["counts"]["failed"] == 12
    assert all("avatars is read-only" in e["error"] for e in doc["recent_errors"])
    assert all(e["attempts"] == 2 for e in doc["recent_errors"])
    # Copies exist, but no source was deleted: their app rows were never committed.
    assert len(list_keys(moto_s3, job.cfg.source.bucket)) == 12
    assert len(list_keys(moto_s3, job.cfg.destination.bucket)) == 12

    with app.begin() as conn:
        conn.execute(sa.text("DROP TRIGGER frozen"))
    app.dispose()
    assert run_cli("retry-failed", "--config", str(job.config_path)).returncode == 0
    assert run_job(job.cfg, console=quiet) == 0
    assert_converged(job)
