"""Runs against s3fast, which (unlike moto) honours ``CopySourceIfMatch`` and counts requests.

I4: nothing copies a version other than the planned one. A source overwritten after plan gets
412 on copy, is re-planned with its new ETag and its new bytes are what reach the destination.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from rich.console import Console

from migrator.config import Config
from migrator.supervisor import preflight, run_job, run_plan
from tests.conftest import S3Fast, s3_client
from tests.helpers import (
    Job,
    app_paths,
    assert_converged,
    expected_untouched,
    ledger_rows,
    list_keys,
    make_job,
    read,
)

pytestmark = pytest.mark.s3fast


def quiet() -> Console:
    return Console(stderr=True, quiet=True)


def plan(cfg: Config) -> None:
    res = preflight(cfg)
    try:
        run_plan(cfg, res, quiet())
    finally:
        res.close()


def s3fast_job(
    tmp_path: Path, s3fast: Callable[..., S3Fast], count: int, **settings: Any
) -> tuple[S3Fast, Job]:
    server = s3fast()
    job = make_job(
        tmp_path,
        s3_client(server.endpoint),
        server.endpoint,
        ledger=f"sqlite:///{tmp_path / 'ledger.db'}",
        app=f"sqlite:///{tmp_path / 'app.db'}",
        count=count,
        **settings,
    )
    return server, job


def test_source_overwritten_after_plan_is_replanned_and_new_bytes_move(
    tmp_path: Path, s3fast: Callable[..., S3Fast]
) -> None:
    server, job = s3fast_job(tmp_path, s3fast, count=6)
    plan(job.cfg)
    planned_etag = ledger_rows(job.cfg)[job.objects[2].key]["etag"]

    # Overwrite one source with different bytes (same key, metadata and content type).
    old = job.objects[2]
    new = dataclasses.replace(old, body=b"version two: " + old.body[::-1] + b"!")
    job.s3.put_object(
        Bucket=job.cfg.source.bucket,
        Key=new.key,
        Body=new.body,
        ContentType=new.content_type,
        Metadata={"user-id": str(new.user_id)},
    )
    job.objects[2] = new
    server.reset_stats()

    assert run_job(job.cfg, console=quiet()) == 0

    stats = server.stats()
    assert stats["errors"].get("PreconditionFailed") == 1, stats["errors"]  # the 412 happened
    assert stats["ops"]["CopyObject"] == len(job.objects) + 1  # one refused, one redone
    dest_key = job.dest_key(new.key)
    assert read(job.s3, job.cfg.destination.bucket, dest_key) == new.body
    assert read(job.s3, job.cfg.destination.bucket, dest_key) != old.body
    assert_converged(job)  # new bytes everywhere, app rows rewritten, sources deleted
    row = ledger_rows(job.cfg)[new.key]
    assert row["state"] == "done"
    assert row["etag"] != planned_etag and row["dest_etag"] == row["etag"]
    assert row["size"] == len(new.body)


@pytest.mark.parametrize("policy", ["after_all", "per_chunk"])
def test_source_deleted_after_plan_fails_only_that_row(
    tmp_path: Path, s3fast: Callable[..., S3Fast], policy: str
) -> None:
    _server, job = s3fast_job(tmp_path, s3fast, count=8, delete_source=policy)
    plan(job.cfg)
    gone = job.objects[3]
    job.s3.delete_object(Bucket=job.cfg.source.bucket, Key=gone.key)

    assert run_job(job.cfg, console=quiet()) == 1

    rows = ledger_rows(job.cfg)
    assert rows[gone.key]["state"] == "failed"
    assert rows[gone.key]["failed_stage"] == "copy"
    assert "source object no longer exists" in rows[gone.key]["last_error"]
    others = [o for o in job.objects if o is not gone]
    src, dst = job.cfg.source, job.cfg.destination
    assert job.dest_key(gone.key) not in list_keys(job.s3, dst.bucket)
    for obj in others:
        assert read(job.s3, dst.bucket, job.dest_key(obj.key)) == obj.body
    # The gone object's app row still holds its old key; every other row was rewritten.
    paths = app_paths(job)
    assert paths[: len(job.objects)] == [
        o.key if o is gone else job.dest_key(o.key) for o in job.objects
    ]
    assert paths[len(job.objects) :] == expected_untouched(job)
    sources = list_keys(job.s3, src.bucket)
    if policy == "after_all":
        # A failed copy keeps the delete gate shut: no source is deleted at all.
        assert sources == {o.key for o in others}
        assert {rows[o.key]["state"] for o in others} == {"rewritten"}
    else:
        assert sources == set()
        assert {rows[o.key]["state"] for o in others} == {"done"}


def test_one_copy_per_object_and_batched_deletes(
    tmp_path: Path, s3fast: Callable[..., S3Fast]
) -> None:
    count, chunk = 300, 50
    server, job = s3fast_job(tmp_path, s3fast, count=count, size=512, chunk_size=chunk)
    server.reset_stats()

    assert run_job(job.cfg, console=quiet()) == 0

    stats = server.stats()  # before our own checks add requests
    assert_converged(job)
    ops: dict[str, int] = stats["ops"]
    assert ops.get("CopyObject") == count, ops
    chunks = math.ceil(count / chunk)
    assert 1 <= ops.get("DeleteObjects", 0) <= math.ceil(count / 1000) + chunks, ops
    assert ops.get("DeleteObject", 0) == 0, ops  # never one request per key
    assert ops.get("HeadObject", 0) == 0, ops  # the copy's ETag verifies single-part objects
    assert ops.get("GetObject", 0) == 0 and ops.get("PutObject", 0) == 0, ops  # server-side
    assert ops.get("ListObjectsV2", 0) == math.ceil(count / 1000), ops
    assert stats["errors"] == {}, stats["errors"]
    engine = sa.create_engine(job.cfg.ledger)
    try:
        with engine.connect() as conn:
            states = dict(
                conn.execute(
                    sa.text("SELECT state, count(*) FROM migrator_objects GROUP BY state")
                ).all()
            )
    finally:
        engine.dispose()
    assert states == {"done": count}


@pytest.mark.parametrize("policy", ["never", "after_all"])
def test_workers_copy_while_run_is_still_listing(
    tmp_path: Path, s3fast: Callable[..., S3Fast], policy: str
) -> None:
    """``run`` on a job never planned starts the workers at once: rows of the first pages are
    finished before the listing ends (each ListObjectsV2 page is slowed to 0.8 s here), while
    ``after_all`` deletes wait for the end of the plan — between two pages no row is pending,
    and without that rule the gate would open."""
    count = 1100  # two pages
    server = s3fast("-latency", "800ms", "-fault-ops", "ListObjectsV2")
    job = make_job(
        tmp_path,
        s3_client(server.endpoint),
        server.endpoint,
        ledger=f"sqlite:///{tmp_path / 'ledger.db'}",
        app=f"sqlite:///{tmp_path / 'app.db'}" if policy == "after_all" else None,
        count=count,
        size=16,
        chunk_size=200,
        delete_source=policy,
    )
    server.reset_stats()

    assert run_job(job.cfg, console=quiet()) == 0

    ops = server.stats()["ops"]
    assert ops.get("ListObjectsV2") == 2 and ops.get("CopyObject") == count, ops
    assert_converged(job, sources_deleted=policy != "never")
    engine = sa.create_engine(job.cfg.ledger)
    try:
        with engine.connect() as conn:
            planned_at = conn.execute(
                sa.text("SELECT planned_at FROM migrator_jobs WHERE name = :j"), {"j": job.cfg.job}
            ).scalar_one()
            # updated_at: when a row became done (copied, or its source deleted).
            before_plan_end = conn.execute(
                sa.text("SELECT count(*) FROM migrator_objects WHERE updated_at < :p"),
                {"p": planned_at},
            ).scalar_one()
    finally:
        engine.dispose()
    if policy == "never":
        assert before_plan_end > 0  # copies finished while pages were still being listed
    else:
        assert before_plan_end == 0  # no source deleted before the plan was complete
