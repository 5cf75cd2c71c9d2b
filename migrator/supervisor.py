"""The supervisor: pre-flight checks, plan when needed, start and watch the worker processes,
show progress, stop cleanly on Ctrl-C."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import signal
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any, ClassVar

from rich.console import Console
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from migrator.appdb import AppDatabase
from migrator.check import start_checks
from migrator.config import Config
from migrator.errors import (
    EXIT_FAILED_ROWS,
    EXIT_INTERRUPTED,
    EXIT_OK,
    LedgerError,
    MigratorError,
    PreflightError,
    db_reason,
    redact,
)
from migrator.ledger.repo import Ledger, lease_owner_id, open_ledger
from migrator.ledger.tables import State
from migrator.logs import event
from migrator.notify import Notifier, StageWatch
from migrator.plan import PlanTotals, plan_job, plan_pages
from migrator.progress import RunDisplay, Snapshot, Workers
from migrator.spawn import start_fork_server
from migrator.storage import s3
from migrator.storage.common import ListedObject
from migrator.storage.sides import Sides, open_sides
from migrator.worker import worker_main

log = logging.getLogger("migrator")

POLL_SECONDS = 1.0


@dataclass
class Resources:
    """What pre-flight opened and checked, for commands run in the supervisor process."""

    engine: Engine
    ledger: Ledger
    source: s3.S3Service
    dest: s3.S3Service
    appdb: AppDatabase | None

    def close(self) -> None:
        Sides(self.source, self.dest).close()
        if self.appdb is not None:
            self.appdb.dispose()
        self.engine.dispose()


def check_s3(cfg: Config) -> Sides:
    """Both buckets reachable, each with its own side's credentials; returns the S3 services
    of this process."""
    probes: dict[tuple[str | None, ...], Any] = {}
    try:
        for loc, side in ((cfg.source, "source"), (cfg.destination, "destination")):
            if loc.connection not in probes:
                factory = s3.ClientFactory(loc, max_pool=2, max_attempts=2, connect_timeout=5)
                probes[loc.connection] = factory.client()
            s3.check_bucket(probes[loc.connection], loc, side)
    finally:
        for probe in probes.values():
            probe.close()
    return open_sides(cfg)


def preflight(cfg: Config) -> Resources:
    """Check everything a run needs before anything is written: buckets, app table and column,
    then the ledger (created or upgraded last, so bad input leaves nothing behind)."""
    sides = check_s3(cfg)
    try:
        appdb = AppDatabase(cfg.app_db) if cfg.app_db is not None else None
    except Exception:
        sides.close()
        raise
    try:
        engine = open_ledger(cfg.ledger)
    except Exception:
        if appdb is not None:
            appdb.dispose()
        sides.close()
        raise
    return Resources(engine, Ledger(engine, cfg.job), sides.source, sides.dest, appdb)


def run_plan(
    cfg: Config,
    res: Resources,
    console: Console,
    stop: Callable[[], bool] | None = None,
    pages: Iterable[Sequence[ListedObject]] | None = None,
) -> PlanTotals:
    """Plan with progress lines and a summary: from the listing, or from ``pages`` (an S3
    Inventory report) when given."""
    last = [0.0]

    def on_page(t: PlanTotals) -> None:
        if time.monotonic() - last[0] >= 2:
            last[0] = time.monotonic()
            console.print(f"planning: {t.listed:,} objects listed", highlight=False)

    if pages is None:
        totals = plan_job(cfg, res.ledger, res.source, on_page, stop)
    else:
        totals = plan_pages(cfg, res.ledger, pages, on_page, stop)
    if not totals.complete:
        console.print(f"planning stopped after {totals.listed:,} objects", highlight=False)
        return totals
    extra = [
        f"{n:,} {what}"
        for n, what in (
            (totals.excluded, "excluded"),
            (totals.not_matched, "not matched"),
            (totals.remapped, "given a new destination"),
            (totals.dropped, "dropped"),
            (totals.versions_added, "versions recorded"),
            (totals.delete_marked, "left out (current version is a delete marker)"),
        )
        if n
    ]
    console.print(
        f"planned {cfg.job}: {totals.listed:,} listed, {totals.added:,} new, "
        f"{totals.reset:,} changed, {totals.unchanged:,} unchanged"
        + "".join(f", {e}" for e in extra),
        highlight=False,
        soft_wrap=True,
    )
    return totals


def _start_checks(cfg: Config, console: Console) -> None:
    """The light part of ``migrator check``, before anything is written: a failed item ends
    the run (exit 2), a warning is printed and the run goes on."""
    items = start_checks(cfg)
    failed = [i for i in items if i.status == "fail"]
    if failed:
        more = f" (and {len(failed) - 1} more; see `migrator check`)" if len(failed) > 1 else ""
        raise PreflightError(f"{failed[0].detail}{more}")
    for item in items:
        if item.status == "warn":
            console.print(f"warning: {item.check}: {item.detail}", highlight=False, markup=False)


class Planner(threading.Thread):
    """``run`` on a job never planned: the listing goes into the ledger page by page while
    the workers start and claim the first pages, instead of before them. The workers wait
    for more rows, and the ``after_all`` delete gate stays shut, until the plan is complete."""

    def __init__(self, cfg: Config, res: Resources, console: Console) -> None:
        super().__init__(daemon=True, name="plan")
        self.cfg, self.res, self.console = cfg, res, console
        self.stop = threading.Event()
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            run_plan(self.cfg, self.res, self.console, self.stop.is_set)
        except Exception as exc:  # raised again by the supervisor once the workers stopped
            self.error = exc


class _Stop:
    def __init__(self) -> None:
        self.requested = 0

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.requested += 1


def run_job(
    cfg: Config,
    *,
    console: Console | None = None,
    quiet: bool = False,
    max_delete: int | None = None,
    log_format: str = "text",
) -> int:
    """``migrator run``: plan if needed, then process every stage until done; resumable.
    ``max_delete`` caps the sources this run deletes (rclone's ``--max-delete``)."""
    console = console or Console(stderr=True)
    ctx = start_fork_server()  # already running when the CLI started it
    _start_checks(cfg, console)
    res = preflight(cfg)
    planner: Planner | None = None
    notifier = Announcer(Notifier(cfg.notify, cfg.job))
    try:
        res.ledger.ensure_job(cfg.safe_summary()["source"], cfg.safe_summary()["destination"])
        freed = res.ledger.reclaim_dead_local_leases()
        if freed:
            console.print(f"reclaimed {freed:,} rows leased by stopped processes", highlight=False)
        if not res.ledger.is_planned():
            if cfg.keys.pattern is not None:
                # A regex rule may map two sources to one key; the plan finds that out only
                # at the colliding page, and nothing may be copied by then (docs/architecture).
                run_plan(cfg, res, console)
            else:
                planner = Planner(cfg, res, console)
                planner.start()
        if notifier.active:
            counts = res.ledger.counts()
            notifier.send(
                "started",
                f"run started, {sum(counts.values()):,} objects in the ledger"
                + (" (still planning)" if planner is not None else ""),
                counts=counts,
            )
        code = _supervise(
            cfg, ctx, res.ledger, console, quiet, max_delete, planner, notifier, log_format
        )
        if planner is not None and planner.error is not None:
            raise planner.error
        if notifier.active:
            _notify_end(notifier, code, res.ledger)
    except MigratorError as exc:
        notifier.send("failed", f"run failed: {redact(str(exc))}", error=redact(str(exc)))
        raise
    finally:
        if planner is not None:
            planner.stop.set()
            planner.join()
        res.close()
        notifier.close()
    return code


class Announcer:
    """The run's own events (started, a stage completed, failed, finished): to the webhook
    when one is configured, and to the log (``run_started`` … at INFO: JSON logs, ``-v``)."""

    LOG_NAMES: ClassVar[dict[str, str]] = {
        "started": "run_started",
        "failed": "run_failed",
        "finished": "run_finished",
    }

    def __init__(self, notifier: Notifier) -> None:
        self.notifier = notifier

    @property
    def active(self) -> bool:
        return self.notifier.active or log.isEnabledFor(logging.INFO)

    def send(self, name: str, text: str, **fields: Any) -> None:
        event(log, logging.INFO, self.LOG_NAMES.get(name, name), text, **fields)
        self.notifier.send(name, text, **fields)

    def close(self) -> None:
        self.notifier.close()


def _notify_end(notifier: Announcer, code: int, ledger: Ledger) -> None:
    try:
        counts = ledger.counts()
    except SQLAlchemyError:  # the run's own end message has the counts; the event goes anyway
        counts = {}
    total = sum(counts.values())
    if code == EXIT_OK:
        notifier.send("finished", f"finished: all {total:,} objects done", counts=counts)
    elif code == EXIT_INTERRUPTED:
        notifier.send("failed", "interrupted; run again to continue", counts=counts)
    else:
        notifier.send(
            "failed",
            f"run ended with {counts.get('failed', 0):,} failed and "
            f"{total - counts.get('done', 0) - counts.get('skipped', 0):,} unfinished objects",
            counts=counts,
        )


def run_until_converged(
    cfg: Config,
    *,
    threshold: int,
    max_passes: int,
    console: Console | None = None,
    quiet: bool = False,
    max_delete: int | None = None,
    before_plan: Callable[[int], None] | None = None,
    log_format: str = "text",
) -> int:
    """``migrator run --until-converged N``: for a bucket the application still writes to.

    Each pass plans (always: the listing is the only way to see what the application
    uploaded or overwrote since the last one), then runs the job to completion. It stops
    after a pass whose plan found at most ``threshold`` changes (new, changed or remapped
    rows): with 0 that is a listing identical to the ledger, i.e. nothing left to move while
    writers are stopped. A pass whose run did not end cleanly ends the loop with its exit
    code (failed rows 1, Ctrl-C 130): another pass would not fix it. ``max_delete`` may only
    be 0 (copy and rewrite in every pass, delete nothing). ``before_plan`` is called with the
    pass number before each listing; tests use it to write to the bucket between passes."""
    console = console or Console(stderr=True)
    for n in range(1, max_passes + 1):
        if before_plan is not None:
            before_plan(n)
        console.print(f"pass {n}: listing the source ...", highlight=False)
        res = preflight(cfg)
        try:
            res.ledger.ensure_job(cfg.safe_summary()["source"], cfg.safe_summary()["destination"])
            totals = run_plan(cfg, res, console)
            counts = res.ledger.counts()
        finally:
            res.close()
        changes = totals.added + totals.reset + totals.remapped
        left = _unfinished(counts, max_delete)
        summary = f"pass {n}: {totals.added:,} new, {totals.reset:,} changed" + (
            f", {totals.remapped:,} remapped" if totals.remapped else ""
        )
        if changes <= threshold and not left:
            console.print(f"{summary}; nothing to copy", highlight=False)
            _converged(cfg, n, changes, threshold, console)
            if max_delete == 0:
                return _without_deletes(counts, console)
            return finish_message(cfg, counts, console)
        console.print(f"{summary}; {left:,} objects to finish; copying ...", highlight=False)
        code = run_job(
            cfg, console=console, quiet=quiet, max_delete=max_delete, log_format=log_format
        )
        if code == EXIT_FAILED_ROWS and max_delete == 0:  # it exits 1 while deletes wait
            counts = _job_counts(cfg)
            code = EXIT_FAILED_ROWS if _unfinished(counts, 0) else EXIT_OK
        if code != EXIT_OK:
            return code
        if changes <= threshold:
            _converged(cfg, n, changes, threshold, console)
            return _without_deletes(_job_counts(cfg), console) if max_delete == 0 else EXIT_OK
    console.print(
        f"{cfg.job}: not converged after {max_passes} passes: every pass still found more "
        f"than {threshold:,} changes. Stop the writers (or raise --max-passes) and run again.",
        highlight=False,
    )
    return EXIT_FAILED_ROWS


def _unfinished(counts: dict[str, int], max_delete: int | None) -> int:
    """Rows a run still has to move; with ``--max-delete 0`` rewritten rows are finished."""
    settled = {State.DONE.value, State.SKIPPED.value}
    if max_delete == 0:
        settled.add(State.REWRITTEN.value)
    return sum(n for state, n in counts.items() if state not in settled)


def _job_counts(cfg: Config) -> dict[str, int]:
    engine = open_ledger(cfg.ledger)
    try:
        return Ledger(engine, cfg.job).counts()
    finally:
        engine.dispose()


def _converged(cfg: Config, passes: int, changes: int, threshold: int, console: Console) -> None:
    console.print(
        f"{cfg.job}: converged after {passes} pass{'es' if passes > 1 else ''} (its plan "
        f"found {changes:,} changes; --until-converged {threshold:,})",
        highlight=False,
    )


def _without_deletes(counts: dict[str, int], console: Console) -> int:
    """The end under ``--max-delete 0``: exit 1 as long as sources wait for their delete,
    like ``run --max-delete 0``."""
    if not counts.get(State.REWRITTEN.value):
        return EXIT_OK
    console.print(
        f"{counts[State.REWRITTEN.value]:,} sources are not deleted (--max-delete 0); once the "
        "switch is verified, `migrator run` deletes them",
        highlight=False,
    )
    return EXIT_FAILED_ROWS


def _supervise(
    cfg: Config,
    ctx: Any,
    ledger: Ledger,
    console: Console,
    quiet: bool,
    max_delete: int | None,
    planner: Planner | None = None,
    notifier: Announcer | None = None,
    log_format: str = "text",
) -> int:
    budget = ctx.Value("q", -1 if max_delete is None else max_delete)
    stages = ("copy",) + (("rewrite",) if cfg.app_db is not None else ())
    stages += ("delete",) if cfg.delete_source != "never" and max_delete != 0 else ()
    watch = StageWatch(stages)
    if notifier is not None and notifier.active:
        with contextlib.suppress(SQLAlchemyError):  # stages done before this run are not news
            watch.completed(ledger.counts(), planner is None)
    stop_event = ctx.Event()
    stop = _Stop()
    old_int = signal.signal(signal.SIGINT, stop)
    old_term = signal.signal(signal.SIGTERM, stop)
    level = logging.getLogger().getEffectiveLevel()
    procs: dict[str, Any] = {}
    serial = [0]

    owners: list[str] = []

    def start_worker() -> None:
        serial[0] += 1
        p = ctx.Process(
            target=worker_main,
            args=(cfg, serial[0], stop_event, level, budget, log_format),
            name=f"migrator-worker-{serial[0]}",
        )
        p.start()
        owner = lease_owner_id(serial[0], p.pid)  # the id the worker gives itself
        procs[owner] = p
        owners.append(owner)

    display = RunDisplay(cfg, console, quiet=quiet, structured=log_format == "json")
    restarts = 0
    gave_up = False
    try:
        for _ in range(cfg.workers):
            start_worker()
        display.start()
        while procs:
            # wake at once when a worker exits (the last one finishing ends the run)
            multiprocessing.connection.wait([p.sentinel for p in procs.values()], POLL_SECONDS)
            if stop.requested and not stop_event.is_set():
                stop_event.set()
                display.stop()
                console.print("stopping: workers finish their in-flight requests ...")
            if planner is not None and planner.error is not None and not stop_event.is_set():
                stop_event.set()  # the plan failed: stop the workers, then report it
                display.stop()
            if stop.requested and planner is not None:
                planner.stop.set()
            if stop.requested > 1:
                for p in procs.values():
                    p.terminate()
            for owner, p in list(procs.items()):
                if p.is_alive():
                    continue
                p.join()
                del procs[owner]
                if p.exitcode != 0 and not stop_event.is_set():
                    with contextlib.suppress(SQLAlchemyError):  # else its leases expire
                        ledger.release(owner)
                    if restarts < cfg.workers * 3:
                        restarts += 1
                        log.warning("worker %s exited with %s; starting another", owner, p.exitcode)
                        start_worker()
                    else:
                        gave_up = True
            try:
                planning = planner is not None and planner.is_alive()
                counts, sizes = ledger.totals()
                display.update(
                    Snapshot.from_counts(counts, sizes),
                    Workers(len(procs), cfg.workers, restarts),
                    planning=planning,
                    s3_retries=ledger.s3_retries(),
                )
                planned = planner is None or (not planning and planner.error is None)
                if notifier is not None and notifier.active:
                    for stage in watch.completed(counts, planned):
                        notifier.send(
                            "stage_completed", f"{stage} stage complete", stage=stage, counts=counts
                        )
            except SQLAlchemyError as exc:
                log.warning("cannot read progress: %s", db_reason(exc))
    finally:
        display.stop()
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)
        for p in procs.values():
            p.join(timeout=30)
        for owner in owners:  # workers release their rows; these are the ones that could not
            with contextlib.suppress(SQLAlchemyError):
                ledger.release(owner)
    if planner is not None:
        planner.stop.set()  # complete by now, unless the run was stopped or workers failed
        planner.join()
        if planner.error is not None:
            return EXIT_FAILED_ROWS  # run_job raises the plan's error
    counts = _final_counts(ledger)
    snap = Snapshot.from_counts(counts)
    display.plain(snap, f"failed {snap.failed}")
    if stop.requested:
        console.print("interrupted; run the same command again to continue")
        return EXIT_INTERRUPTED
    if gave_up:
        console.print("workers kept failing; see the log above, fix the cause and run again")
        return EXIT_FAILED_ROWS
    if max_delete is not None and budget.value == 0 and counts["rewritten"]:
        console.print(
            f"--max-delete {max_delete:,} reached: {counts['rewritten']:,} sources not deleted "
            "yet; run again to continue",
            highlight=False,
        )
        return EXIT_FAILED_ROWS
    return finish_message(cfg, counts, console)


def _final_counts(ledger: Ledger, tries: int = 60) -> dict[str, int]:
    """The end-of-run counts, waiting out a ledger outage for up to about a minute."""
    attempt = 0
    while True:
        try:
            return ledger.counts()
        except SQLAlchemyError as exc:
            attempt += 1
            if attempt >= tries:
                raise LedgerError(
                    f"ledger unreachable at the end of the run ({db_reason(exc)}); the work "
                    "is recorded: run `migrator status` once it is back"
                ) from None
            log.warning("cannot read the ledger: %s; retrying", db_reason(exc))
            time.sleep(1)


def finish_message(cfg: Config, counts: dict[str, int], console: Console) -> int:
    total = sum(counts.values())
    skipped = counts.get("skipped", 0)
    if counts["done"] + skipped == total:
        note = (
            f" ({skipped:,} skipped: their destination keys hold other objects)" if skipped else ""
        )
        console.print(f"{cfg.job}: all {total:,} objects done{note}", highlight=False)
        return EXIT_OK
    if counts["failed"]:
        held = (
            " Sources are not deleted while any row has failed (delete_source: after_all)."
            if cfg.delete_source == "after_all" and counts["rewritten"]
            else ""
        )
        console.print(
            f"{cfg.job}: {counts['failed']:,} objects failed.{held} See `migrator status`, fix "
            "the cause, then `migrator retry-failed` and `migrator run`.",
            highlight=False,
        )
    else:
        console.print(
            f"{cfg.job}: {total - counts['done']:,} objects not finished; run again",
            highlight=False,
        )
    return EXIT_FAILED_ROWS
