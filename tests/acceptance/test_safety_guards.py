"""Safety guards: ``run --dry-run`` touches nothing; ``run --max-delete N`` deletes at most N."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.helpers import app_paths, assert_converged, list_keys, run_cli, sqlite_job


def test_dry_run_reports_and_touches_nothing(
    tmp_path: Path, moto_s3: Any, moto_endpoint: str
) -> None:
    job = sqlite_job(tmp_path, moto_s3, moto_endpoint, with_app=True, count=20)
    before = app_paths(job)
    proc = run_cli("run", "--dry-run", "--config", str(job.config_path))
    assert proc.returncode == 0, proc.stderr
    assert "would copy     20 objects" in proc.stdout
    assert "would rewrite  20 rows of avatars.path (for 20 objects)" in proc.stdout
    assert "would delete   20 source objects (delete_source: after_all)" in proc.stdout
    examples = [
        o for o in job.objects if f"e.g. copy {o.key} -> {job.dest_key(o.key)}" in proc.stdout
    ]
    assert len(examples) == 5
    # Nothing written anywhere: no ledger, no copy, no rewrite, no delete.
    assert not (tmp_path / "ledger.db").exists()
    assert list_keys(moto_s3, job.cfg.destination.bucket) == set()
    assert len(list_keys(moto_s3, job.cfg.source.bucket)) == 20
    assert app_paths(job) == before


def test_max_delete_caps_deletes_per_run_and_dry_run_sees_the_ledger(
    tmp_path: Path, moto_s3: Any, moto_endpoint: str
) -> None:
    job = sqlite_job(tmp_path, moto_s3, moto_endpoint, with_app=True, count=20, chunk_size=4)
    proc = run_cli("run", "--quiet", "--max-delete", "7", "--config", str(job.config_path))
    assert proc.returncode == 1, proc.stderr
    assert "--max-delete 7 reached: 13 sources not deleted yet" in proc.stderr
    assert len(list_keys(moto_s3, job.cfg.source.bucket)) == 20 - 7
    # Everything is copied and rewritten; only deletes wait.
    assert len(list_keys(moto_s3, job.cfg.destination.bucket)) == 20
    preview = run_cli("run", "--dry-run", "--config", str(job.config_path))
    assert "would copy     0 objects" in preview.stdout
    assert "would delete   13 source objects" in preview.stdout
    proc = run_cli("run", "--quiet", "--max-delete", "0", "--config", str(job.config_path))
    assert proc.returncode == 1
    assert len(list_keys(moto_s3, job.cfg.source.bucket)) == 13
    proc = run_cli("run", "--quiet", "--config", str(job.config_path))
    assert proc.returncode == 0, proc.stderr
    assert_converged(job)
