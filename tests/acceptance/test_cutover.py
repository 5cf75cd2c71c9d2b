"""Acceptance: ``migrator run --until-converged`` from the command line — option combinations
that make no sense are refused in one line, a live bucket is followed over separate CLI
passes, and Ctrl-C ends the loop at once with exit 130, without another pass."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from seed.__main__ import upload
from seed.data import seed_object
from tests.acceptance.test_bad_input import assert_rejected
from tests.acceptance.test_kill import wait_for_progress
from tests.conftest import REPO
from tests.helpers import assert_converged, invariant_violations, run_cli, sqlite_job

MIGRATOR_RUN = (sys.executable, "-m", "migrator", "run", "--quiet")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--until-converged", "0", "--dry-run"], "--dry-run previews one run"),
        (["--until-converged", "0", "--max-delete", "5"], "takes --max-delete 0 only"),
        (["--max-passes", "3"], "--max-passes needs --until-converged N"),
    ],
)
def test_bad_combinations_exit_2_in_one_line_and_write_nothing(
    tmp_path: Path, moto_s3: Any, moto_endpoint: str, args: list[str], message: str
) -> None:
    job = sqlite_job(tmp_path, moto_s3, moto_endpoint, with_app=False, count=2)
    proc = run_cli("run", "--config", str(job.config_path), *args)
    assert_rejected(proc, says=message)
    assert not (tmp_path / "ledger.db").exists(), "nothing may be written"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--until-converged", "-1"], "-1 is not in the range x>=0"),
        (["--until-converged", "0", "--max-passes", "0"], "0 is not in the range x>=1"),
    ],
)
def test_out_of_range_numbers_are_usage_errors(
    tmp_path: Path, moto_s3: Any, moto_endpoint: str, args: list[str], message: str
) -> None:
    """Click's own range check (its usage block, like ``--max-delete -1``): exit 2, nothing
    written."""
    job = sqlite_job(tmp_path, moto_s3, moto_endpoint, with_app=False, count=2)
    proc = run_cli("run", "--config", str(job.config_path), *args)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "ledger.db").exists(), "nothing may be written"


def test_cli_passes_follow_writes_between_them(
    tmp_path: Path, moto_s3: Any, moto_endpoint: str
) -> None:
    """Objects the application adds between two CLI invocations are migrated by the next one;
    a run with nothing new does one pass and starts no worker."""
    job = sqlite_job(tmp_path, moto_s3, moto_endpoint, with_app=False, count=5)
    cfg = ["--config", str(job.config_path), "--quiet"]
    first = run_cli("run", "--until-converged", "0", *cfg)
    assert first.returncode == 0, first.stderr
    assert "pass 2: 0 new, 0 changed; nothing to copy" in first.stderr
    for i in range(5, 8):
        obj = seed_object(i, job.cfg.source.prefix, 128)
        upload(moto_s3, job.cfg.source.bucket, obj)
        job.objects.append(obj)
    second = run_cli("run", "--until-converged", "0", "--max-passes", "4", *cfg)
    assert second.returncode == 0, second.stderr
    assert "pass 1: 3 new, 0 changed; 3 objects to finish; copying" in second.stderr
    assert "converged after 2 passes" in second.stderr
    assert_converged(job)


def test_ctrl_c_during_a_pass_exits_130_without_another_pass(
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
    proc = subprocess.Popen(
        [*MIGRATOR_RUN, "--until-converged", "0", "--config", str(job.config_path)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    wait_for_progress(proc, moto_s3, job.cfg.destination.bucket, 0)
    time.sleep(0.5)
    assert proc.poll() is None, "the pass finished before Ctrl-C"
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    text = err.decode()
    assert proc.returncode == 130, text[-2000:]
    assert "interrupted" in text and "Traceback" not in text
    assert "pass 1:" in text and "pass 2" not in text
    assert invariant_violations(job) == []
    again = run_cli("run", "--until-converged", "0", "--quiet", "--config", str(job.config_path))
    assert again.returncode == 0, again.stderr[-2000:]
    assert_converged(job)


@pytest.mark.parametrize("policy", ["per_chunk", "never"])
def test_a_writer_during_the_passes_is_followed_to_the_end(
    tmp_path: Path, moto_s3: Any, moto_endpoint: str, policy: str
) -> None:
    """The application writes while the loop runs: new objects, each with its app row
    (written first, as an application that stores the row before the upload would), and —
    under ``never`` only, see docs/cutover.md — new bytes at keys already planned or
    migrated. The loop ends after the writer stopped, with every final version migrated, the
    app rows rewritten and nothing lost. Writes 0.1 s apart never leave a whole pass (worker
    start alone takes longer) without a change, so the loop cannot converge before the last."""
    job = sqlite_job(
        tmp_path, moto_s3, moto_endpoint, with_app=True, count=20, delete_source=policy
    )
    originals = list(job.objects)
    assert job.cfg.app_db is not None
    app = sa.create_engine(job.cfg.app_db.url)

    def application() -> None:
        for i in range(20, 35):
            obj = seed_object(i, job.cfg.source.prefix, 256)
            with app.begin() as conn:
                conn.execute(
                    sa.text("INSERT INTO avatars (user_id, path) VALUES (:u, :p)"),
                    {"u": obj.user_id, "p": obj.key},
                )
            upload(moto_s3, job.cfg.source.bucket, obj)
            job.objects.append(obj)
            if policy == "never" and i % 5 == 0:
                n = (i - 20) // 5
                again = dataclasses.replace(originals[n], body=b"version 2 of " + bytes([n]))
                upload(moto_s3, job.cfg.source.bucket, again)
                job.objects[n] = again
            time.sleep(0.1)

    loop = ("--until-converged", "0", "--max-passes", "30")
    proc = subprocess.Popen(
        [*MIGRATOR_RUN, *loop, "--config", str(job.config_path)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    writer = threading.Thread(target=application)
    wait_for_progress(proc, moto_s3, job.cfg.destination.bucket, 0)
    writer.start()
    _, err = proc.communicate(timeout=300)
    writer.join()
    app.dispose()
    text = err.decode()
    assert proc.returncode == 0, text[-3000:]
    assert "nothing to copy" in text and "converged after" in text
    # the writer started after pass 1 listed: a later pass found its objects
    assert "pass 2: 0 new, 0 changed" not in text and "pass 3:" in text, text[-3000:]
    assert invariant_violations(job) == []
    assert_converged(job, sources_deleted=policy != "never")
