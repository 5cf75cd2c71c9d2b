"""Acceptance: Ctrl-C (SIGINT to the process group, as a terminal sends it) stops cleanly with
exit 130, loses nothing, and the same command continues the job."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

from tests.acceptance.test_kill import start_run, wait_for_progress
from tests.helpers import assert_converged, invariant_violations, list_keys, sqlite_job


def test_ctrl_c_exits_130_and_rerun_continues(
    tmp_path: Path, moto_s3: Any, moto_endpoint: str
) -> None:
    job = sqlite_job(
        tmp_path,
        moto_s3,
        moto_endpoint,
        with_app=True,
        count=400,
        size=256,
        delete_source="per_chunk",
        chunk_size=8,
        concurrency=2,
    )
    proc = start_run(job.config_path)
    wait_for_progress(proc, moto_s3, job.cfg.destination.bucket, 0)
    time.sleep(0.5)
    assert proc.poll() is None, "the job finished before Ctrl-C"
    os.killpg(proc.pid, signal.SIGINT)
    started = time.monotonic()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err.decode()[-2000:]
    assert time.monotonic() - started < 30
    text = err.decode()
    assert "interrupted" in text and "Traceback" not in text
    assert invariant_violations(job) == []
    left = len(list_keys(moto_s3, job.cfg.source.bucket))
    assert 0 < left < len(job.objects), "Ctrl-C should land mid-job"
    again = start_run(job.config_path)
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err.decode()[-2000:]
    assert_converged(job)
