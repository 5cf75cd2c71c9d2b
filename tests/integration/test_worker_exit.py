"""When a worker may stop: never while rows wait for a delete gate that is about to open.

A worker used to stop as soon as nothing was claimable in its current states; under
``after_all`` that let every worker of a supervisor exit while other hosts still held the last
copies, leaving the job's rewritten rows undeleted and the run "not finished"."""

from __future__ import annotations

from pathlib import Path

import pytest

from migrator.config import Config
from migrator.ledger.repo import Ledger, Planned, open_ledger
from migrator.ledger.tables import objects
from migrator.worker import nothing_left


def ledger_in_states(
    tmp_path: Path, states: list[str], failed_stage: str | None = None, planned: bool = True
) -> Ledger:
    engine = open_ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    ledger = Ledger(engine, "job")
    ledger.ensure_job("s3://a/image/", "s3://b/avatar/")
    ledger.upsert_page(
        [Planned(f"image/{i}", f"avatar/{i}", 1, "e", None) for i in range(len(states))]
    )
    with engine.begin() as conn:
        for i, state in enumerate(states):
            conn.execute(
                objects.update()
                .where(objects.c.source_key == f"image/{i}")
                .values(state=state, failed_stage=failed_stage if state == "failed" else None)
            )
    if planned:
        ledger.mark_planned()
    return ledger


def cfg(delete_source: str) -> Config:
    return Config.model_validate(
        {
            "job": "job",
            "source": {"bucket": "legacy", "prefix": "image/"},
            "destination": {"bucket": "production", "prefix": "avatar/"},
            "delete_source": delete_source,
        }
    )


@pytest.mark.parametrize(
    ("policy", "states", "failed_stage", "stop"),
    [
        # another worker still holds a copy: wait, the gate opens when it is recorded
        ("after_all", ["copied", "rewritten", "done"], None, False),
        # the gate is open: rewritten rows are there to delete
        ("after_all", ["rewritten", "done"], None, False),
        # a row failed before its rewrite: the gate stays shut for this run
        ("after_all", ["rewritten", "failed"], "copy", True),
        # a delete failure does not shut the gate
        ("after_all", ["rewritten", "failed"], "delete", False),
        ("per_chunk", ["rewritten", "done"], None, False),
        ("never", ["done", "done"], None, True),
        ("after_all", ["done", "failed"], "copy", True),
        ("after_all", ["pending", "done"], None, False),
    ],
)
def test_a_worker_stops_only_when_nothing_is_left(
    tmp_path: Path, policy: str, states: list[str], failed_stage: str | None, stop: bool
) -> None:
    ledger = ledger_in_states(tmp_path, states, failed_stage)
    try:
        assert nothing_left(cfg(policy), ledger) is stop
    finally:
        ledger.engine.dispose()


@pytest.mark.parametrize("policy", ["after_all", "per_chunk", "never"])
def test_a_worker_waits_while_the_job_is_being_planned(tmp_path: Path, policy: str) -> None:
    """``run`` starts the workers while it still lists the job: every row finished so far is
    no reason to stop, and under ``after_all`` no source may be deleted yet."""
    ledger = ledger_in_states(tmp_path, ["done", "rewritten"], planned=False)
    try:
        assert nothing_left(cfg(policy), ledger) is False
        assert ledger.delete_gate_open() is False
        ledger.mark_planned()
        assert nothing_left(cfg(policy), ledger) is (policy == "never")
        assert ledger.delete_gate_open() is True
    finally:
        ledger.engine.dispose()
