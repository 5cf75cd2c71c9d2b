"""One worker process: claim a chunk → copy → verify → rewrite → delete → record, until no
work is left. Started by the supervisor; builds its own boto3 clients and engines."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from migrator import stages
from migrator.appdb import AppDatabase
from migrator.config import Config
from migrator.errors import MigratorError, UnreachableError, db_reason, redact
from migrator.ledger.repo import Ledger, ObjectRow, lease_owner_id, open_ledger
from migrator.ledger.tables import State
from migrator.logs import setup_logging
from migrator.storage.s3 import RetryCounter
from migrator.storage.sides import open_sides

log = logging.getLogger("migrator.worker")

IDLE_SLEEP = 0.5
MAX_CONSECUTIVE_ERRORS = 30
EXIT_WORKER_ERROR = 3


def claim_states(
    cfg: Config, ledger: Ledger, budget: stages.DeleteBudget | None = None
) -> list[State]:
    """Which rows this worker may take now, under the job's delete policy and --max-delete."""
    states = [State.PENDING, State.COPIED]
    if budget is not None and budget.exhausted():
        return states
    if cfg.delete_source == "per_chunk" or (
        cfg.delete_source == "after_all" and ledger.delete_gate_open()
    ):
        states.append(State.REWRITTEN)
    return states


def nothing_left(cfg: Config, ledger: Ledger, budget: stages.DeleteBudget | None = None) -> bool:
    """True when this worker can stop: no row left to copy or rewrite, and no rewritten row
    that may still be deleted in this run. Under ``after_all``, rewritten rows wait for the
    delete gate, which opens once the last copies of other workers are recorded; only failures
    before a rewrite keep it shut, and then there is nothing more to do. While the job is
    being planned (``run`` lists it as the workers start) more rows may come."""
    if ledger.any_in_states([State.PENDING, State.COPIED]) or not ledger.is_planned():
        return False
    if cfg.delete_source == "never" or (budget is not None and budget.exhausted()):
        return True
    if not ledger.any_in_states([State.REWRITTEN]):
        return True
    return cfg.delete_source == "after_all" and not ledger.delete_gate_open()


def process_chunk(ctx: stages.ChunkContext, rows: list[ObjectRow]) -> None:
    copied = stages.copy_stage(ctx, rows)
    if ctx.stop.is_set():
        return
    rewritten = stages.rewrite_stage(ctx, copied)
    if ctx.cfg.delete_source == "per_chunk":
        to_delete = rewritten + [r for r in rows if r.state is State.REWRITTEN]
    elif ctx.cfg.delete_source == "after_all":
        to_delete = [r for r in rows if r.state is State.REWRITTEN]
    else:
        to_delete = []
    if to_delete and not ctx.stop.is_set():
        stages.delete_stage(ctx, to_delete)


class _Heartbeat(threading.Thread):
    """Extends this worker's leases every third of the lease time."""

    def __init__(self, ledger: Ledger, owner: str, lease_seconds: int) -> None:
        super().__init__(daemon=True, name="heartbeat")
        self.ledger, self.owner, self.lease_seconds = ledger, owner, lease_seconds
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.lease_seconds / 3):
            try:
                self.ledger.heartbeat(self.owner, self.lease_seconds)
            except SQLAlchemyError as exc:
                log.warning("heartbeat failed: %s", db_reason(exc))


class StopFlag:
    """Set when the supervisor asks us to stop or has gone away; checked before every request,
    so Ctrl-C waits only for the requests already in flight."""

    def __init__(self, event: Any) -> None:
        self.event = event
        self.parent = os.getppid()

    def is_set(self) -> bool:
        return self.event.is_set() or os.getppid() != self.parent


def _open_appdb(cfg: Config, stop: StopFlag) -> AppDatabase | None:
    """The app database for this worker; an outage at start (a restart, a failover) is
    waited out with backoff instead of ending the worker."""
    if cfg.app_db is None:
        return None
    attempt = 0
    while True:
        try:
            return AppDatabase(cfg.app_db)
        except UnreachableError as exc:
            attempt += 1
            if attempt >= MAX_CONSECUTIVE_ERRORS or stop.is_set():
                raise
            log.warning("%s (attempt %d); retrying", exc, attempt)
            time.sleep(_backoff(attempt))


def _backoff(errors: int) -> float:
    return min(2 ** min(errors, 5), 30) / 4


def run_worker(cfg: Config, owner: str, stop: Any, delete_budget: Any = None) -> int:
    """The worker loop; returns the process exit code."""
    local_stop = StopFlag(stop)
    engine = open_ledger(cfg.ledger, upgrade=False)
    ledger = Ledger(engine, cfg.job)
    retries = RetryCounter()
    sides = open_sides(cfg, retries)
    appdb = _open_appdb(cfg, local_stop)
    heartbeat = _Heartbeat(ledger, owner, cfg.lease_seconds)
    heartbeat.start()
    errors = 0
    may_hold = False  # the last iteration ended in an error: rows may still be leased to us
    budget = stages.DeleteBudget(delete_budget) if delete_budget is not None else None
    ctx = stages.ChunkContext(
        cfg, ledger, owner, sides.source, sides.dest, appdb, local_stop, budget
    )
    try:
        while True:
            if local_stop.is_set():
                break
            try:
                if may_hold:
                    # Rows of the chunk that ended in an error (or of a claim whose commit
                    # went through unseen) may still be leased to us, and the heartbeat
                    # would keep them so for ever; nothing works on them now.
                    ledger.release(owner)
                    may_hold = False
                states = claim_states(cfg, ledger, budget)
                rows = ledger.claim(owner, states, cfg.chunk_size, cfg.lease_seconds)
                if not rows:
                    if nothing_left(cfg, ledger, budget):
                        break
                    time.sleep(IDLE_SLEEP)
                    continue
                log.debug("claimed %d rows in states %s", len(rows), [s.value for s in states])
                process_chunk(ctx, rows)
                ledger.release(owner)
                ledger.add_s3_retries(retries.take())
                errors = 0
            except SQLAlchemyError as exc:
                may_hold = True
                errors += 1
                log.warning(
                    "ledger or app database error (%d in a row): %s",
                    errors,
                    db_reason(exc),
                )
                if errors >= MAX_CONSECUTIVE_ERRORS:
                    return EXIT_WORKER_ERROR
                time.sleep(_backoff(errors))
    finally:
        heartbeat.done.set()
        with contextlib.suppress(SQLAlchemyError):  # else the lease expires by itself
            ledger.release(owner)
            ledger.add_s3_retries(retries.take())
        if appdb is not None:
            appdb.dispose()
        sides.close()
        engine.dispose()
    return 0


def worker_main(
    cfg: Config,
    serial: int,
    stop: Any,
    log_level: int,
    delete_budget: Any = None,
    log_format: str = "text",
) -> None:
    """Entry point of a worker process; its lease owner id carries its own PID."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor tells us to stop
    owner = lease_owner_id(serial)
    setup_logging(log_level, owner, log_format, cfg.job)
    try:
        code = run_worker(cfg, owner, stop, delete_budget)
    except MigratorError as exc:
        log.error("%s", redact(str(exc)))
        code = EXIT_WORKER_ERROR
    raise SystemExit(code)
