"""A live bucket: re-plans pick up what the application wrote since the last plan, and
``run --until-converged`` repeats plan + run until a plan finds (almost) nothing new.

The application is simulated between passes (``before_plan``): it uploads new objects with
their app rows, and uploads again at keys already migrated (new bytes, app row pointing at the
old key again), as an application still writing under the source prefix does."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from rich.console import Console

from migrator.config import load_config
from migrator.supervisor import run_job, run_until_converged
from seed.__main__ import upload
from seed.data import SeedObject, seed_object
from tests.helpers import Job, assert_converged, list_keys, make_job, read, run_cli, sqlite_job


def quiet_console() -> Console:
    return Console(stderr=True, quiet=True)


def captured() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=200), out


def app_writes(job: Job, obj: SeedObject) -> None:
    """The application stores ``obj`` under the source prefix and points its user's row at
    it (a new row for a new user, the old row again for an existing one)."""
    upload(job.s3, job.cfg.source.bucket, obj)
    assert job.cfg.app_db is not None
    engine = sa.create_engine(job.cfg.app_db.url)
    try:
        with engine.begin() as conn:
            updated = conn.execute(
                sa.text("UPDATE avatars SET path = :p WHERE user_id = :u"),
                {"p": obj.key, "u": obj.user_id},
            ).rowcount
            if not updated:
                conn.execute(
                    sa.text("INSERT INTO avatars (user_id, path) VALUES (:u, :p)"),
                    {"u": obj.user_id, "p": obj.key},
                )
    finally:
        engine.dispose()
    known = {o.key: i for i, o in enumerate(job.objects)}
    if obj.key in known:
        job.objects[known[obj.key]] = obj
    else:
        job.objects.append(obj)


def new_object(job: Job, index: int) -> SeedObject:
    return seed_object(index, job.cfg.source.prefix, 300)


def overwritten(obj: SeedObject, version: int) -> SeedObject:
    return dataclasses.replace(obj, body=obj.body + f" version {version}".encode())


# -- re-plan semantics for done rows ----------------------------------------------------------


def test_replan_resets_a_done_row_whose_kept_source_was_overwritten(
    tmp_path: Path, moto_s3: Any, moto_endpoint: str
) -> None:
    """``delete_source: never``: the source of a done row is kept; overwritten, it is another
    object than the one migrated, and the next run copies the new bytes over the old copy.
    Unchanged done rows stay done."""
    job = sqlite_job(
        tmp_path, moto_s3, moto_endpoint, with_app=True, count=4, delete_source="never"
    )
    assert run_job(job.cfg, console=quiet_console()) == 0
    app_writes(job, overwritten(job.objects[1], 2))
    proc = run_cli("plan", "--config", str(job.config_path))
    assert proc.returncode == 0, proc.stderr
    assert "0 new, 1 changed, 3 unchanged" in proc.stderr
    assert run_job(job.cfg, console=quiet_console()) == 0
    assert_converged(job, sources_deleted=False)


def test_replan_under_delete_policy_migrates_keys_uploaded_again(
    tmp_path: Path, moto_s3: Any, moto_endpoint: str, db_urls: dict[str, str]
) -> None:
    """``per_chunk``: a done row's source was deleted, so a listed done key was uploaded again
    by the application — with new bytes or the very same ones — and its app row points at
    the old key again. Both go back to pending and are migrated once more (both SQL
    dialects of the re-plan)."""
    job = make_job(
        tmp_path,
        moto_s3,
        moto_endpoint,
        ledger=db_urls["ledger"],
        app=db_urls["app"],
        count=6,
        delete_source="per_chunk",
    )
    assert run_job(job.cfg, console=quiet_console()) == 0
    assert_converged(job)
    app_writes(job, overwritten(job.objects[0], 2))
    app_writes(job, job.objects[1])  # the same bytes again
    proc = run_cli("plan", "--config", str(job.config_path))
    assert proc.returncode == 0, proc.stderr
    assert "0 new, 2 changed, 0 unchanged" in proc.stderr
    assert run_job(job.cfg, console=quiet_console()) == 0
    assert_converged(job)


# -- run --until-converged --------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["after_all", "per_chunk"])
def test_until_converged_follows_the_application_and_stops_on_an_empty_delta(
    tmp_path: Path, moto_s3: Any, moto_endpoint: str, policy: str
) -> None:
    job = sqlite_job(
        tmp_path, moto_s3, moto_endpoint, with_app=True, count=20, delete_source=policy
    )

    def application(n: int) -> None:
        if n == 2:  # while pass 1 ran: three new uploads, one key uploaded again
            for i in range(20, 23):
                app_writes(job, new_object(job, i))
            app_writes(job, overwritten(job.objects[4], 2))
        if n == 3:  # fewer writes as the cutover nears
            app_writes(job, new_object(job, 23))

    console, out = captured()
    code = run_until_converged(
        job.cfg, threshold=0, max_passes=10, console=console, quiet=True, before_plan=application
    )
    text = out.getvalue()
    assert code == 0, text
    assert "pass 1: 20 new, 0 changed; 20 objects to finish; copying" in text
    assert "pass 2: 3 new, 1 changed; 4 objects to finish; copying" in text
    assert "pass 3: 1 new, 0 changed; 1 objects to finish; copying" in text
    assert "pass 4: 0 new, 0 changed; nothing to copy" in text
    assert "converged after 4 passes" in text
    assert "pass 5" not in text
    assert len(job.objects) == 24
    assert_converged(job)


def test_until_converged_threshold_stops_after_the_small_pass(
    tmp_path: Path, moto_s3: Any, moto_endpoint: str
) -> None:
    """N > 0: the pass whose plan found at most N changes still migrates them, then the loop
    ends (what is written after that waits for the final ``--until-converged 0``)."""
    job = sqlite_job(tmp_path, moto_s3, moto_endpoint, with_app=True, count=10)

    def application(n: int) -> None:
        if n == 2:
            for i in range(10, 13):
                app_writes(job, new_object(job, i))

    console, out = captured()
    code = run_until_converged(
        job.cfg, threshold=5, max_passes=10, console=console, quiet=True, before_plan=application
    )
    text = out.getvalue()
    assert code == 0, text
    assert "pass 2: 3 new, 0 changed" in text and "converged after 2 passes" in text
    assert "pass 3" not in text
    assert_converged(job)


def test_until_converged_gives_up_after_max_passes(
    tmp_path: Path, moto_s3: Any, moto_endpoint: str
) -> None:
    """An application that never stops writing: the loop ends after ``max_passes`` with exit
    1, every pass's objects migrated, the last writes waiting for the next run."""
    job = sqlite_job(tmp_path, moto_s3, moto_endpoint, with_app=True, count=5)

    def application(n: int) -> None:
        app_writes(job, new_object(job, 100 + n))

    console, out = captured()
    code = run_until_converged(
        job.cfg, threshold=0, max_passes=3, console=console, quiet=True, before_plan=application
    )
    text = out.getvalue()
    assert code == 1, text
    assert "not converged after 3 passes" in text and "pass 4" not in text
    dests = list_keys(moto_s3, job.cfg.destination.bucket)
    assert {job.dest_key(o.key) for o in job.objects} == dests


def test_until_converged_with_max_delete_0_keeps_sources_then_run_deletes(
    tmp_path: Path, moto_s3: Any, moto_endpoint: str
) -> None:
    """The cutover with a way back: every pass copies and rewrites, none deletes; the loop
    still converges (exit 1: rows wait for their delete); a plain ``run`` deletes later."""
    job = sqlite_job(tmp_path, moto_s3, moto_endpoint, with_app=True, count=8)

    def application(n: int) -> None:
        if n == 2:
            app_writes(job, new_object(job, 8))

    console, out = captured()
    code = run_until_converged(
        job.cfg,
        threshold=0,
        max_passes=5,
        console=console,
        quiet=True,
        max_delete=0,
        before_plan=application,
    )
    text = out.getvalue()
    assert code == 1, text
    assert "converged after 3 passes" in text and "9 sources are not deleted" in text
    assert list_keys(moto_s3, job.cfg.source.bucket) == {o.key for o in job.objects}
    for obj in job.objects:
        assert read(moto_s3, job.cfg.destination.bucket, job.dest_key(obj.key)) == obj.body
    assert run_job(job.cfg, console=quiet_console()) == 0
    assert_converged(job)


def test_never_first_then_a_pass_with_deletes(
    tmp_path: Path, moto_s3: Any, moto_endpoint: str
) -> None:
    """docs/cutover.md's safe order: converge under ``delete_source: never`` (sources kept),
    switch, verify; then the same job under ``after_all``: its re-plan finds every kept
    source of a done row and the run deletes them, after the usual verify and app check."""
    job = sqlite_job(
        tmp_path, moto_s3, moto_endpoint, with_app=True, count=7, delete_source="never"
    )
    code = run_until_converged(job.cfg, threshold=0, max_passes=5, console=quiet_console())
    assert code == 0
    assert_converged(job, sources_deleted=False)
    text = job.config_path.read_text().replace("delete_source: never", "delete_source: after_all")
    job.config_path.write_text(text)
    cfg = load_config(job.config_path, env={})
    console, out = captured()
    assert run_until_converged(cfg, threshold=0, max_passes=5, console=console, quiet=True) == 0
    assert "pass 1: 0 new, 7 changed" in out.getvalue()
    assert_converged(job)
