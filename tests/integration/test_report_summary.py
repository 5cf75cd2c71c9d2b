"""``migrator report --summary`` / ``--html``: counts, errors by code, bytes, and the objects
copied and finished per minute, kept by the count rows as they are folded per minute."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from migrator.ledger import repo
from migrator.ledger.repo import Ledger, open_ledger
from migrator.ledger.tables import state_counts
from tests.helpers import run_cli, sqlite_job


def test_summary_and_html_of_a_finished_job(
    tmp_path: Path, moto_s3: Any, moto_endpoint: str
) -> None:
    job = sqlite_job(
        tmp_path,
        moto_s3,
        moto_endpoint,
        with_app=True,
        count=30,
        size=100,
        max_attempts=1,
        delete_source="per_chunk",
    )
    assert run_cli("plan", "--config", str(job.config_path)).returncode == 0
    moto_s3.delete_object(Bucket=job.cfg.source.bucket, Key=job.objects[0].key)
    assert run_cli("run", "--quiet", "--config", str(job.config_path)).returncode == 1
    assert run_cli("retry-failed", "--config", str(job.config_path)).returncode == 0
    assert run_cli("run", "--quiet", "--config", str(job.config_path)).returncode == 1  # again

    # Age the count rows by ten minutes, so that reading the counts folds them per minute.
    engine = open_ledger(job.cfg.ledger)
    with engine.begin() as conn:
        conn.execute(
            state_counts.update()
            .where(state_counts.c.second > 0)
            .values(second=state_counts.c.second - 600)
        )
    Ledger(engine, job.cfg.job).fold_counts()
    with engine.connect() as conn:
        seconds = set(conn.execute(sa.select(state_counts.c.second)).scalars())
    engine.dispose()
    assert seconds and all(s % repo.MINUTE == 0 for s in seconds)  # minute rows only

    out = run_cli("report", "--summary", "--json", "--config", str(job.config_path))
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["total"] == 30 and doc["counts"]["done"] == 29 and doc["counts"]["failed"] == 1
    assert doc["moved_bytes"] == 29 * 100
    assert [g["code"] for g in doc["top_errors"]] == ["NoSuchKey"]
    per_minute = doc["per_minute"]
    assert per_minute and all(m["minute"].endswith(":00+00:00") for m in per_minute)
    # 29 copied and 1 failed (retried, failed again: out, back, out), and 29 became done
    assert sum(m["copied"] for m in per_minute) == 30
    assert sum(m["done"] for m in per_minute) == 29
    assert sum(m["done_bytes"] for m in per_minute) == 29 * 100
    assert doc["first_activity"] == per_minute[0]["minute"]

    text = run_cli("report", "--summary", "--config", str(job.config_path))
    assert text.returncode == 0, text.stderr
    assert f"job {job.cfg.job}: 30 objects" in text.stdout
    assert "errors by code: NoSuchKey 1 (1 failed)" in text.stdout
    assert "objects per 1 min (copied / done):" in text.stdout

    html = tmp_path / "out" / "summary.html"
    page_run = run_cli("report", "--html", str(html), "--config", str(job.config_path))
    assert page_run.returncode == 0, page_run.stderr
    page = html.read_text()
    assert page.startswith("<!doctype html>") and "<polyline" in page
    assert "NoSuchKey" in page and job.cfg.job in page
    assert "<script" not in page  # self-contained, nothing runs
