"""``migrator status`` (rates, ETA, attempts, errors grouped by code) and ``migrator jobs``,
through the CLI on real runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from migrator.status import error_code, eta_seconds, job_state
from tests.helpers import deny_deletes, run_cli, sqlite_job, write_config


def test_status_groups_errors_and_reports_rates(
    tmp_path: Path, moto_s3: Any, moto_endpoint: str
) -> None:
    job = sqlite_job(
        tmp_path,
        moto_s3,
        moto_endpoint,
        with_app=True,
        count=40,
        size=100,
        delete_source="per_chunk",
        max_attempts=1,
    )
    assert run_cli("plan", "--config", str(job.config_path)).returncode == 0
    src = job.cfg.source
    gone = {o.key for o in job.objects[:3]}
    for key in gone:  # deleted after plan: NoSuchKey, failed for good at the copy
        moto_s3.delete_object(Bucket=src.bucket, Key=key)
    denied = {o.key for o in job.objects[10:12]}  # their deletes are refused: AccessDenied
    deny_deletes(moto_s3, src.bucket, denied)
    result = run_cli("run", "--quiet", "--config", str(job.config_path))
    assert result.returncode == 1, result.stderr

    doc = json.loads(run_cli("status", "--json", "--config", str(job.config_path)).stdout)
    assert doc["job"] == job.cfg.job and doc["total"] == 40
    assert (doc["counts"]["failed"], doc["counts"]["done"]) == (5, 35)
    codes = {g["code"]: g for g in doc["top_errors"]}
    assert set(codes) == {"NoSuchKey", "AccessDenied"}
    assert (codes["NoSuchKey"]["objects"], codes["NoSuchKey"]["failed"]) == (3, 3)
    assert codes["NoSuchKey"]["example"]["key"] in gone
    assert (codes["AccessDenied"]["objects"], codes["AccessDenied"]["failed"]) == (2, 2)
    assert codes["AccessDenied"]["example"]["key"] in denied
    assert doc["top_errors"][0]["code"] == "NoSuchKey"  # the largest group first
    assert doc["attempts"] == {
        "rows_with_errors": 5,
        "attempts": 5,
        "max_attempts": 1,
        "sampled": False,
    }
    rates = doc["rates"]
    assert rates["window_seconds"] == 60
    # the run just copied and finished 35 objects: within the last minute
    assert rates["copied_objects_per_second"] > 0 and rates["copied_bytes_per_second"] > 0
    assert rates["done_objects_per_second"] > 0 and rates["done_bytes_per_second"] > 0
    assert doc["objects_per_second"] == rates["done_objects_per_second"]
    assert doc["eta_seconds"] is None  # nothing left that a run could finish
    assert doc["planned"] is True
    human = run_cli("status", "--config", str(job.config_path))
    assert human.returncode == 0
    assert "errors by code" in human.stdout and "AccessDenied" in human.stdout
    assert "objects with an error: 5" in human.stdout


def test_jobs_lists_every_job_of_a_ledger(tmp_path: Path, moto_s3: Any, moto_endpoint: str) -> None:
    first = sqlite_job(tmp_path / "a", moto_s3, moto_endpoint, with_app=False, count=5)
    ledger = first.cfg.ledger
    second = sqlite_job(tmp_path / "b", moto_s3, moto_endpoint, with_app=False, count=7)
    data = second.cfg.model_dump(mode="json", exclude_none=True)
    data["ledger"] = ledger  # both jobs in one ledger
    write_config(second.config_path, data)
    assert run_cli("run", "--quiet", "--config", str(first.config_path)).returncode == 0
    assert run_cli("plan", "--config", str(second.config_path)).returncode == 0

    out = run_cli("jobs", "--json", "--config", str(first.config_path))
    assert out.returncode == 0, out.stderr
    found = {j["job"]: j for j in json.loads(out.stdout)}
    assert set(found) == {first.cfg.job, second.cfg.job}
    assert found[first.cfg.job]["state"] == "done"
    assert found[first.cfg.job]["counts"]["done"] == 5
    assert found[second.cfg.job]["state"] == "planned"
    assert found[second.cfg.job]["counts"]["pending"] == 7
    assert found[second.cfg.job]["source"] == f"s3://{second.cfg.source.bucket}/image/"
    by_url = run_cli("jobs", "--ledger", ledger, cwd=tmp_path)
    assert by_url.returncode == 0, by_url.stderr
    assert first.cfg.job in by_url.stdout and "2 jobs" in by_url.stdout
    missing = run_cli("jobs", "--ledger", f"sqlite:///{tmp_path / 'none.db'}", cwd=tmp_path)
    assert missing.returncode == 2 and "no ledger" in missing.stderr


def test_error_codes() -> None:
    assert error_code("delete: AccessDenied: Access Denied") == "AccessDenied"
    assert error_code("SlowDown: Please reduce your request rate.") == "SlowDown"
    assert error_code("InternalError: We encountered an internal error") == "InternalError"
    assert error_code("503: Service Unavailable") == "503"
    assert error_code("source object no longer exists (NoSuchKey); app rows left") == "NoSuchKey"
    assert error_code("verify: destination ETag abc differs from source def") == "verify"
    assert error_code("rewrite: connection refused") == "rewrite"
    assert error_code("batch operations: HTTP 403 AccessDenied denied") == "batch operations"
    assert error_code("") == "error"


def test_eta_and_job_state() -> None:
    counts = {"pending": 100, "copied": 0, "rewritten": 50, "done": 0, "failed": 0, "skipped": 0}
    assert eta_seconds(counts, copy_rate=10, done_rate=0) == 10
    assert eta_seconds(counts, copy_rate=0, done_rate=0) is None
    counts.update(pending=0, rewritten=0, done=140, failed=10)
    assert eta_seconds(counts, copy_rate=0, done_rate=5) is None  # nothing left to do
    counts.update(done=100, rewritten=40)
    assert eta_seconds(counts, copy_rate=0, done_rate=4) == 10
    job = {"counts": counts, "workers_active": True, "planned_at": "2026-12-05T10:00:00"}
    assert job_state(job) == "running"
    assert job_state({**job, "workers_active": False}) == "failed rows"
    done = dict(counts, rewritten=0, failed=0, done=150)
    assert job_state({**job, "workers_active": False, "counts": done}) == "done"
    empty = dict.fromkeys(counts, 0)
    assert job_state({"counts": empty, "workers_active": False, "planned_at": None}) == (
        "not planned"
    )
