"""The ``migrator`` command line: parse, call one function, print."""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
from rich.console import Console

from migrator.errors import (
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    ConfigError,
    LedgerError,
    MigratorError,
    db_reason,
    redact,
)
from migrator.logs import setup_logging

# Pydantic, SQLAlchemy, boto3 and awscrt load inside the commands that use them: `run` starts
# its worker fork server first, so that the two processes import at the same time, and
# `status` never loads boto3 at all.
if TYPE_CHECKING:
    from migrator.config import Config
    from migrator.ledger.repo import Ledger

F = TypeVar("F", bound=Callable[..., Any])
err_console = Console(stderr=True)
out_console = Console()


def _fail(message: str, code: int) -> None:
    err_console.print(f"error: {redact(message)}", highlight=False, markup=False, soft_wrap=True)
    sys.exit(code)


def handle_errors(fn: F) -> F:
    """Turn our exceptions into one line and an exit code; Ctrl-C into 130."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MigratorError as exc:
            _fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            err_console.print("interrupted")
            sys.exit(EXIT_INTERRUPTED)
        except Exception as exc:
            message = _library_failure(exc)
            if message is None:
                raise
            _fail(message, 1)

    return wrapper  # type: ignore[return-value]


def _library_failure(exc: Exception) -> str | None:
    """One line for a database or S3 library error that reached the CLI. Those libraries
    load lazily: one that was never imported cannot have raised."""
    sa_exc = sys.modules.get("sqlalchemy.exc")
    if sa_exc is not None and isinstance(exc, sa_exc.SQLAlchemyError):
        return f"database error: {db_reason(exc)}"
    boto_exc = sys.modules.get("botocore.exceptions")
    if boto_exc is not None and isinstance(exc, boto_exc.ClientError | boto_exc.BotoCoreError):
        return f"S3 error: {exc}"
    return None


def config_option(fn: F) -> F:
    return click.option(
        "--config",
        "config_path",
        default="config.yaml",
        show_default=True,
        type=click.Path(path_type=Path),
        help="Job configuration file.",
    )(fn)


def _load(config_path: Path, *, relocate: bool = False) -> Config:
    from migrator.config import load_config

    return load_config(config_path, relocate=relocate)


def _ledger_for_reading(cfg: Config) -> Ledger:
    """Open an existing ledger without creating one; the job must be in it."""
    from migrator.ledger.repo import Ledger, open_existing_ledger

    ledger = Ledger(open_existing_ledger(cfg.ledger), cfg.job)
    if cfg.job not in ledger.list_jobs():
        ledger.engine.dispose()
        raise LedgerError(f"job {cfg.job!r} is not in the ledger; run `migrator plan` first")
    return ledger


class _Group(click.Group):
    """click's own usage errors (a bad option value, a missing argument) as one ``error:``
    line and exit 2, like every other bad input, instead of a usage block."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        try:
            code = super().main(*args, **kwargs)
        except click.UsageError as exc:
            command = exc.ctx.command_path if exc.ctx is not None else "migrator"
            _fail(f"{exc.format_message().rstrip('.')} (see `{command} --help`)", EXIT_USAGE)
        except click.ClickException as exc:
            _fail(exc.format_message(), exc.exit_code)
        except click.Abort:
            err_console.print("interrupted")
            sys.exit(EXIT_INTERRUPTED)
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.version_option(package_name="migrator")
def main(verbose: int) -> None:
    """Move objects from one S3 location to another and rewrite the database that points at
    them, resumably. Every command reads ./config.yaml unless --config says otherwise.

    \b
    Examples:
      migrator plan                    list the source into the ledger
      migrator run                     copy, verify, rewrite, delete; re-run to resume
      migrator status --json           progress for scripts
    """
    level = logging.WARNING - 10 * min(verbose, 2)
    setup_logging(level)


@main.command()
@config_option
@click.option(
    "--from-inventory",
    "inventory",
    metavar="S3_URL",
    default=None,
    help="Plan from this S3 Inventory report (s3://bucket/…/manifest.json, CSV or Parquet) "
    "instead of listing the source; read with the source's credentials.",
)
@handle_errors
def plan(config_path: Path, inventory: str | None) -> None:
    """List the source prefix into the ledger (idempotent, delta-aware).

    New objects are added, changed ones (ETag differs) go back to pending — done ones too, and
    under a deleting policy any done key listed again (its source was deleted, so it is a new
    upload) — the rest are kept (docs/cutover.md). With --from-inventory the objects come from
    an S3 Inventory report instead of ListObjectsV2 (for buckets too large to list); objects
    written after the report are not in it, and done rows are left alone: see
    docs/operations.md.

    \b
    Examples:
      migrator plan --config config.yaml
      migrator plan --from-inventory \\
        s3://inventory/legacy/daily/2026-11-24T01-00Z/manifest.json
    """
    cfg = _load(config_path)
    pages = None
    if inventory is not None and cfg.lists_versions:
        raise ConfigError(
            "--from-inventory plans current objects only; a job with versions: all or "
            "delete_versions: true needs their version ids: plan by listing (without "
            "--from-inventory)"
        )
    if inventory is not None:
        from migrator.inventory import inventory_pages, load_manifest
        from migrator.storage import s3

        client = s3.ClientFactory(cfg.source).client()
        manifest = load_manifest(client, inventory, cfg)  # bad input: exit 2, nothing written
        pages = inventory_pages(client, manifest, cfg.source.prefix)
        err_console.print(
            f"planning from the inventory of {manifest.created:%Y-%m-%d %H:%M} UTC "
            f"({manifest.file_format}, {len(manifest.files):,} data "
            f"file{'' if len(manifest.files) == 1 else 's'})",
            highlight=False,
        )
    from migrator.supervisor import preflight, run_plan

    res = preflight(cfg)
    try:
        run_plan(cfg, res, err_console, pages=pages)
    finally:
        res.close()


@main.command()
@config_option
@click.option("--quiet", is_flag=True, help="No progress display, only the final summary.")
@click.option(
    "--max-delete",
    type=click.IntRange(0),
    default=None,
    help="Delete at most N sources in this run; the rest wait for the next run.",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Print what would be copied, rewritten and deleted; touch nothing.",
)
@click.option(
    "--until-converged",
    "threshold",
    type=click.IntRange(0),
    default=None,
    metavar="N",
    help="Live bucket: repeat plan + run until a plan finds at most N new or changed objects "
    "(0: none). See docs/cutover.md.",
)
@click.option(
    "--max-passes",
    type=click.IntRange(1),
    default=None,
    help="With --until-converged: give up (exit 1) after this many passes.  [default: 10]",
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="json: stderr is one JSON object per line (events: run_started, copied, rewritten, "
    "deleted, retry, failed, progress, run_finished …), for log shippers.",
)
@handle_errors
def run(
    config_path: Path,
    quiet: bool,
    max_delete: int | None,
    dry_run: bool,
    threshold: int | None,
    max_passes: int | None,
    log_format: str,
) -> None:
    """Plan if needed, then copy → verify → rewrite → delete until done.

    Killed or interrupted, the same command continues where it stopped. Exit 0 when every
    object is done, 1 when some failed, 130 on Ctrl-C.

    \b
    Examples:
      migrator run
      migrator run --until-converged 100          while the application still writes
      migrator run --until-converged 0            writers stopped: the final delta
      migrator run --until-converged 0 --max-delete 0   ... and keep every source for now
      migrator run --log-format json 2>> migration.jsonl
    """
    console = err_console
    if log_format == "json":
        console = _json_logging("")
    _check_run_options(dry_run, max_delete, threshold, max_passes)
    if threshold is not None:
        from migrator.spawn import start_fork_server

        start_fork_server()
        cfg = _load(config_path)
        if log_format == "json":
            console = _json_logging(cfg.job)
        from migrator.supervisor import run_until_converged

        sys.exit(
            run_until_converged(
                cfg,
                threshold=threshold,
                max_passes=max_passes or DEFAULT_MAX_PASSES,
                console=console,
                quiet=quiet,
                max_delete=max_delete,
                log_format=log_format,
            )
        )
    if dry_run:
        from migrator.dryrun import dry_run as preview

        preview(_load(config_path), out_console)
        return
    from migrator.spawn import start_fork_server

    start_fork_server()  # it imports the worker code while this process loads the rest
    cfg = _load(config_path)
    if log_format == "json":
        console = _json_logging(cfg.job)
    from migrator.supervisor import run_job

    sys.exit(
        run_job(cfg, console=console, quiet=quiet, max_delete=max_delete, log_format=log_format)
    )


def _json_logging(job: str) -> Console:
    """``--log-format json``: every line on stderr a JSON object. The log gets the JSON
    format (at INFO unless -vv asked for more), the error line of a failed command becomes an
    ``error`` event, and the console the run prints its messages to becomes ``message``
    events. Returns that console."""
    from migrator.logs import EventWriter

    global err_console
    root = logging.getLogger()
    setup_logging(min(root.level, logging.INFO), "supervisor", "json", job)
    log = logging.getLogger("migrator")
    err_console = Console(file=EventWriter(log, logging.ERROR, "error"), width=10_000)
    return Console(file=EventWriter(log), width=10_000)


DEFAULT_MAX_PASSES = 10


def _check_run_options(
    dry_run: bool, max_delete: int | None, threshold: int | None, max_passes: int | None
) -> None:
    """Refuse option combinations that have no meaning, before anything is read or written."""
    if threshold is None:
        if max_passes is not None:
            _fail("--max-passes needs --until-converged N", EXIT_USAGE)
        return
    if dry_run:
        _fail(
            "--dry-run previews one run; it cannot repeat: use `migrator run --dry-run` "
            "without --until-converged",
            EXIT_USAGE,
        )
    if max_delete not in (None, 0):
        _fail(
            "--until-converged takes --max-delete 0 only (delete nothing in any pass): a cap "
            "of N deletes would end the first pass that reaches it",
            EXIT_USAGE,
        )


@main.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
@handle_errors
def status(config_path: Path, as_json: bool) -> None:
    """Counts and bytes by state, throughput over the last minute, ETA, retries, errors
    grouped by code and the latest ones. Reads only the ledger: safe from any host while a
    job runs, and quick on a ledger of millions of rows.

    \b
    Examples:
      migrator status
      migrator status --json | jq '{counts, rates, eta_seconds}'
      watch -n 10 migrator status --config avatars.yaml
    """
    cfg = _load(config_path)
    from migrator.status import status_document

    ledger = _ledger_for_reading(cfg)
    try:
        doc = status_document(cfg, ledger)
    finally:
        ledger.engine.dispose()
    if as_json:
        click.echo(json.dumps(doc))
        return
    _print_status(doc)


def _print_status(doc: dict[str, Any]) -> None:
    from rich.table import Table
    from rich.text import Text

    from migrator.progress import fmt_eta
    from migrator.status import mb

    table = Table(title=f"job {doc['job']}", show_footer=True)
    table.add_column("state", footer="total")
    table.add_column("objects", justify="right", footer=f"{doc['total']:,}")
    table.add_column("bytes", justify="right", footer=f"{sum(doc['bytes'].values()):,}")
    for state, n in doc["counts"].items():
        table.add_row(state, f"{n:,}", f"{doc['bytes'][state]:,}")
    out_console.print(table)
    r = doc["rates"]
    eta = fmt_eta(doc["eta_seconds"]) if doc["eta_seconds"] is not None else "--"
    out_console.print(
        f"last minute: copied {r['copied_objects_per_second']:,} obj/s "
        f"({mb(r['copied_bytes_per_second'])}/s), done {r['done_objects_per_second']:,} obj/s "
        f"({mb(r['done_bytes_per_second'])}/s) · ETA {eta}"
        + ("" if doc["planned"] else " (still planning: the total grows)"),
        highlight=False,
    )
    if "versions" in doc:
        v = doc["versions"]
        out_console.print(
            f"versions (versions: all; the objects above are keys): {v['copied']:,} of "
            f"{v['recorded']:,} copied ({mb(v['copied_bytes'])} of {mb(v['recorded_bytes'])})",
            highlight=False,
        )
    a = doc["attempts"]
    out_console.print(
        f"S3 retries so far: {doc['s3_retries']:,} · objects with an error: "
        f"{a['rows_with_errors']:,}{'+' if a['sampled'] else ''} "
        f"({a['attempts']:,} attempts, at most {a['max_attempts']} on one)",
        highlight=False,
    )
    if doc["top_errors"]:
        errors = Table(title="errors by code")
        for column in ("code", "objects", "failed", "example"):
            errors.add_column(
                column,
                overflow="fold",
                justify="right" if column in ("objects", "failed") else "left",
            )
        for g in doc["top_errors"]:
            example = f"{g['example']['key']}: {g['example']['error']}"
            errors.add_row(Text(g["code"]), f"{g['objects']:,}", f"{g['failed']:,}", Text(example))
        out_console.print(errors)
    for e in doc["recent_errors"]:
        out_console.print(
            f"  {e['at']}  {e['key']}  [{e['state']}, attempts {e['attempts']}]  {e['error']}",
            highlight=False,
            markup=False,
        )


@main.command()
@config_option
@click.option(
    "--ledger", "ledger_url", default=None, help="Ledger URL to read instead of the config's."
)
@click.option("--json", "as_json", is_flag=True, help="One JSON array on stdout.")
@handle_errors
def jobs(config_path: Path, ledger_url: str | None, as_json: bool) -> None:
    """List the jobs in a ledger: source, destination, counts, and whether workers hold rows
    of it right now.

    \b
    Examples:
      migrator jobs
      migrator jobs --ledger postgresql+psycopg2://migrator@db.internal/ledger --json
    """
    from migrator.ledger.repo import jobs_overview, open_existing_ledger
    from migrator.status import job_state

    url = ledger_url or _load(config_path).ledger
    engine = open_existing_ledger(url)
    try:
        found = jobs_overview(engine)
    finally:
        engine.dispose()
    for job in found:
        job["state"] = job_state(job)
    if as_json:
        click.echo(json.dumps(found))
        return
    from rich import box
    from rich.table import Table

    table = Table(title=f"{len(found)} job{'' if len(found) == 1 else 's'}", box=box.SIMPLE)
    for column in ("job", "state", "done", "failed"):  # never folded
        right = column in ("done", "failed")
        table.add_column(column, no_wrap=True, justify="right" if right else "left")
    table.add_column("from → to", overflow="fold")
    for j in found:
        total = sum(j["counts"].values())
        table.add_row(
            j["job"],
            j["state"],
            f"{j['counts']['done']:,}/{total:,}",
            f"{j['counts']['failed']:,}",
            f"{j['source']} → {j['destination']}",
        )
    out_console.print(table)


@main.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
@handle_errors
def check(config_path: Path, as_json: bool) -> None:
    """Check everything a run needs and print a checklist: credentials, buckets and their
    regions and versioning, list/read/delete rights on the source, write rights on the
    destination (an empty probe object, removed again), the app table, column and its index,
    and the ledger. Exit 2 when an item fails. `run` checks credentials, the source's
    versioning and the app index first.

    Example: migrator check --config config.yaml
    """
    cfg = _load(config_path)
    from migrator.check import run_checks

    items = run_checks(cfg)
    failed = [i for i in items if i.status == "fail"]
    if as_json:
        click.echo(json.dumps({"ok": not failed, "items": [i.as_dict() for i in items]}))
    else:
        from rich.table import Table

        table = Table(title=f"checks for job {cfg.job}")
        for column in ("check", "result", "detail"):
            table.add_column(column, overflow="fold")
        from rich.text import Text

        style = {"ok": "green", "warn": "yellow", "fail": "bold red", "skip": "dim"}
        for i in items:  # Text: an error's "[Errno …]" is not markup
            table.add_row(Text(i.check), Text(i.status, style=style[i.status]), Text(i.detail))
        out_console.print(table)
    if failed:
        names = ", ".join(i.check for i in failed)
        _fail(f"{len(failed)} check(s) failed: {names}; see the table for how to fix", EXIT_USAGE)


@main.command("iam-policy")
@config_option
@handle_errors
def iam_policy(config_path: Path) -> None:
    """Print least-privilege IAM policies for this job as one JSON object: "source" for the
    principal that reads (and deletes) the sources, "destination" for the one that writes the
    copies; attach both to one principal when one profile serves both sides.

    Example: migrator iam-policy | jq .source > source-policy.json
    """
    cfg = _load(config_path)
    from migrator.iam import policies

    click.echo(json.dumps(policies(cfg), indent=2))


@main.command("retry-failed")
@config_option
@handle_errors
def retry_failed(config_path: Path) -> None:
    """Put failed rows back to pending (attempts reset); then run again.

    Example: migrator retry-failed && migrator run
    """
    cfg = _load(config_path)
    ledger = _ledger_for_reading(cfg)
    n = ledger.retry_failed()
    ledger.engine.dispose()
    click.echo(f"{n:,} failed objects put back to pending; run `migrator run` to continue")


@main.command()
@config_option
@click.option(
    "--out",
    default=None,
    type=click.Path(path_type=Path),
    help="Per-object report file: .csv or .parquet.",
)
@click.option(
    "--summary", is_flag=True, help="Print counts, errors by code, bytes and throughput over time."
)
@click.option("--json", "as_json", is_flag=True, help="With --summary: one JSON object on stdout.")
@click.option(
    "--html",
    default=None,
    type=click.Path(path_type=Path, dir_okay=False),
    help="Write the summary as an HTML page with a throughput chart.",
)
@handle_errors
def report(
    config_path: Path, out: Path | None, summary: bool, as_json: bool, html: Path | None
) -> None:
    """Write one row per object (keys, sizes, states, attempts, errors, times) as CSV or
    Parquet, and/or summarise the job: counts by state and error code, bytes moved, when it
    ran, and objects copied and finished per minute.

    \b
    Examples:
      migrator report --out report.parquet
      migrator report --summary
      migrator report --summary --json | jq .per_minute
      migrator report --html summary.html
    """
    if out is None and not summary and html is None:
        _fail("say what to write: --out FILE, --summary or --html FILE", EXIT_USAGE)
    if as_json and not summary:
        _fail("--json goes with --summary", EXIT_USAGE)
    if out is not None and (out.suffix.lower() not in (".csv", ".parquet") or out.is_dir()):
        _fail(f"--out {out}: use a .csv or .parquet file name", EXIT_USAGE)
    cfg = _load(config_path)
    from migrator.report import summarize, write_html, write_report  # pandas loads here

    ledger = _ledger_for_reading(cfg)
    try:
        if out is not None:
            n = write_report(ledger, out)
            err_console.print(f"wrote {n:,} rows to {out}", highlight=False, markup=False)
        result = summarize(ledger) if summary or html is not None else None
    finally:
        ledger.engine.dispose()
    if result is None:
        return
    if html is not None:
        write_html(result, html)
        err_console.print(f"wrote the summary to {html}", highlight=False, markup=False)
    if summary and as_json:
        click.echo(json.dumps(result.as_dict()))
    elif summary:
        _print_summary(result)


def _print_summary(result: Any) -> None:
    from migrator.report import over_time
    from migrator.status import mb

    total = sum(result.counts.values())
    when = (
        f"{result.first:%Y-%m-%d %H:%M} – {result.last:%H:%M} UTC "
        f"({int((result.last - result.first).total_seconds() // 60):,} min)"
        if result.first is not None
        else "no activity recorded"
    )
    p = functools.partial(out_console.print, highlight=False, markup=False, soft_wrap=True)
    p(f"job {result.job}: {total:,} objects, {mb(result.moved_bytes)} copied, {when}")
    p("by state: " + " · ".join(f"{s} {n:,}" for s, n in result.counts.items()))
    groups = result.errors["top_errors"]
    if groups:
        p(
            "errors by code: "
            + " · ".join(f"{g['code']} {g['objects']:,} ({g['failed']:,} failed)" for g in groups)
        )
    size, rows = over_time(result.minutes)
    if len(rows):
        p(f"objects per {size} min (copied / done):")
        for t, row in rows.iterrows():
            p(f"  {t:%Y-%m-%d %H:%M}  {int(row['copied']):>9,} / {int(row['done']):,}")
        busy = result.minutes[result.minutes["copied"] > 0]["copied"]
        if len(busy):
            p(
                f"copies: peak {int(busy.max()):,}/min, mean {busy.mean():,.0f}/min over "
                f"{len(busy):,} active minutes"
            )


@main.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
@handle_errors
def verify(config_path: Path, as_json: bool) -> None:
    """Audit: every done object is at the destination with its size and ETag, its source is
    deleted per policy, and no app row still points at a migrated source key. Exit 1 on any
    discrepancy. Example: migrator verify --json
    """
    cfg = _load(config_path)
    _ledger_for_reading(cfg).engine.dispose()
    from migrator.audit import audit
    from migrator.supervisor import preflight

    res = preflight(cfg)
    try:
        result = audit(cfg, res)
    finally:
        res.close()
    if as_json:
        click.echo(json.dumps(result.as_dict()))
    else:
        if result.ok:
            click.echo(f"verify: OK, {result.checked:,} objects checked, no discrepancy")
        else:
            click.echo(f"verify: {sum(result.kinds.values()):,} discrepancies")
            for kind, n in sorted(result.kinds.items()):
                click.echo(f"  {kind}: {n:,} (e.g. {', '.join(result.examples[kind][:3])})")
    sys.exit(0 if result.ok else 1)


@main.command()
@config_option
@click.option(
    "--to-region",
    metavar="REGION",
    default=None,
    help="The region to move the bucket to (destination.region, if set, must agree).",
)
@click.option(
    "--confirm-delete-source-bucket",
    "confirmed",
    is_flag=True,
    help="Required: the bucket is deleted (after its verified copy) and created again.",
)
@click.option(
    "--temp-bucket",
    metavar="NAME",
    default=None,
    help="Name of the temporary bucket in the target region.  [default: "
    "<bucket>-relocate-<random>]",
)
@click.option(
    "--discard-noncurrent-versions",
    "discard",
    is_flag=True,
    help="A versioned bucket: delete its noncurrent versions with it (only the current "
    "version of each object is moved).",
)
@click.option(
    "--recreate-timeout",
    type=click.IntRange(1),
    default=1800,
    show_default=True,
    metavar="SECONDS",
    help="How long to wait for S3 to free the bucket's name before giving up (run again to "
    "keep trying).",
)
@click.option("--quiet", is_flag=True, help="No progress display, only the phase lines.")
@click.option(
    "--status", "show_status", is_flag=True, help="Show the phase and progress; move nothing."
)
@click.option("--json", "as_json", is_flag=True, help="With --status: one JSON object on stdout.")
@handle_errors
def relocate(
    config_path: Path,
    to_region: str | None,
    confirmed: bool,
    temp_bucket: str | None,
    discard: bool,
    recreate_timeout: int,
    quiet: bool,
    show_status: bool,
    as_json: bool,
) -> None:
    """Keep a bucket's name while moving it to another region.

    The bucket (source.bucket; source.prefix must be empty) is copied to a temporary bucket
    in the target region and verified; then it is deleted, created again under its name in
    the target region, given its configuration back (versioning, tags, policy, CORS,
    lifecycle, default encryption, public access block, ownership controls, website), filled
    from the temporary bucket and verified, and the temporary bucket is deleted. The config's
    destination describes the bucket after the move: the same bucket, no prefix, and the
    target region if it names one; its credentials serve the target region. No app database
    is rewritten (keys do not change). Every phase is recorded in the ledger: killed, the same
    command continues where it stopped.

    While the name is free, another account can take it, and S3 may take a while to free
    it: stop every writer of the bucket first, and read docs/operations.md (the risk and the
    rollback) before running this.

    \b
    Examples:
      migrator relocate --config legacy.yaml --to-region eu-central-1 \\
        --confirm-delete-source-bucket
      migrator relocate --config legacy.yaml --to-region eu-central-1 \\
        --confirm-delete-source-bucket --temp-bucket legacy-moving
      migrator relocate --config legacy.yaml --status
      migrator relocate --config legacy.yaml --status --json | jq .phase
    """
    if as_json and not show_status:
        _fail("--json goes with --status", EXIT_USAGE)
    cfg = _load(config_path, relocate=True)
    if show_status:
        from migrator.relocate import relocation_status

        doc = relocation_status(cfg)
        if as_json:
            click.echo(json.dumps(doc))
        else:
            _print_relocation(doc)
        return
    if to_region is None:
        _fail(
            "--to-region is required: the region to move the bucket to, e.g. eu-central-1",
            EXIT_USAGE,
        )
    if not confirmed:
        _fail(
            f"relocate deletes the bucket {cfg.source.bucket!r} (after copying it) and creates "
            "it again in the target region; pass --confirm-delete-source-bucket to go ahead "
            "(first read the risk and the rollback in docs/operations.md)",
            EXIT_USAGE,
        )
    from migrator.relocate import Options, check_options
    from migrator.relocate import relocate as run_relocation

    opts = Options(to_region, temp_bucket, discard, float(recreate_timeout), quiet)
    check_options(cfg, opts)  # before any process starts
    from migrator.spawn import start_fork_server

    start_fork_server()  # the copies are ordinary runs with worker processes
    sys.exit(run_relocation(cfg, opts, err_console))


def _print_relocation(doc: dict[str, Any]) -> None:
    p = functools.partial(out_console.print, highlight=False, markup=False, soft_wrap=True)
    p(
        f"relocation {doc['job']}: s3://{doc['bucket']} {doc['from_region']} -> "
        f"{doc['to_region']}, temporary bucket {doc['temp_bucket']}"
    )
    if doc["phase"] == "done":
        p(f"done: relocated {doc['updated_at']} UTC")
    else:
        p(f"phase {doc['step']} {doc['phase']}: {doc['doing']} (since {doc['updated_at']} UTC)")
    for copy in doc["copies"].values():
        counts = copy["counts"]
        total = sum(counts.values())
        if not total:
            p(f"  {copy['job']}: not started")
            continue
        p(
            f"  {copy['job']}: {counts['done']:,}/{total:,} copied and verified · "
            f"{counts['failed']:,} failed"
        )
        for e in copy["recent_errors"][:3]:
            p(f"    {e['at']}  {e['key']}  {e['error']}")
    if doc["last_error"]:
        p(f"last stop: {doc['last_error']}")


@main.command("export-manifest")
@config_option
@click.option(
    "--out",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="Manifest file to write (CSV).",
)
@handle_errors
def export_manifest(config_path: Path, out: Path) -> None:
    """Write the rows still to copy as an S3 Batch Operations manifest (CSV: bucket and
    URL-encoded key per line), to hand the copy stage to AWS. Once the Batch Operations job
    has finished, `migrator import-report` reads its completion report back; `migrator run`
    then rewrites and deletes as usual. Do not run `migrator run` on the job in between. See
    docs/operations.md.

    \b
    Example:
      migrator export-manifest --out manifest.csv
      aws s3 cp manifest.csv s3://ops-bucket/manifests/avatars.csv
    """
    cfg = _load(config_path)
    from migrator.batchops import MANIFEST_FORMAT, current_versions_only
    from migrator.batchops import export_manifest as export

    current_versions_only(cfg)
    ledger = _ledger_for_reading(cfg)
    try:
        manifest = export(cfg, ledger, out)
    finally:
        ledger.engine.dispose()
    click.echo(
        f"wrote {manifest.rows:,} rows to {out} (format {MANIFEST_FORMAT}, fields Bucket,Key)"
    )
    if manifest.multipart:
        err_console.print(
            f"left out {manifest.multipart:,} objects with multipart ETags: a Batch Operations "
            "copy of them cannot be verified; `migrator run` copies them",
            highlight=False,
        )
    if manifest.target_prefix is not None:
        err_console.print(
            f"copy operation: S3PutObjectCopy into arn:aws:s3:::{cfg.destination.bucket} with "
            f"TargetKeyPrefix {manifest.target_prefix!r} gives this job's destination keys",
            highlight=False,
            markup=False,
        )
    elif manifest.rows:
        err_console.print(
            "note: this job's destination keys are not the source keys under one added prefix, "
            "which is all S3PutObjectCopy's TargetKeyPrefix can do; copy with a Lambda "
            "operation that maps keys as the job does (docs/operations.md)",
            highlight=False,
        )


@main.command("import-report")
@config_option
@click.argument("report", type=click.Path(path_type=Path))
@handle_errors
def import_report(config_path: Path, report: Path) -> None:
    """Read an S3 Batch Operations completion report (its downloaded directory, with
    manifest.json) into the ledger: each object whose task succeeded is looked up at the
    destination and recorded as copied when it is the planned object (size and ETag);
    failed tasks mark their rows failed. Then `migrator run` rewrites and deletes.

    \b
    Example:
      aws s3 cp --recursive s3://ops-bucket/reports/job-8f1c…/ report/
      migrator import-report report/ && migrator run
    """
    cfg = _load(config_path)
    from migrator.batchops import current_versions_only, report_files
    from migrator.batchops import import_report as read_report
    from migrator.supervisor import preflight

    current_versions_only(cfg)
    report_files(report)  # a wrong path or format: exit 2 before anything is opened
    ledger = _ledger_for_reading(cfg)
    ledger.engine.dispose()
    res = preflight(cfg)
    try:
        result = read_report(cfg, res.ledger, res.dest, report)
    finally:
        res.close()
    click.echo(
        f"imported: {result.copied:,} copied, {result.failed:,} failed, "
        f"{result.mismatched:,} not as planned at the destination (copied again by `migrator "
        f"run`), {result.already:,} already past pending, {result.busy:,} busy, "
        f"{result.unknown:,} not in this job"
    )
    for kind in ("mismatched", "busy", "unknown"):
        if result.examples.get(kind):
            err_console.print(
                f"{kind}: e.g. {', '.join(result.examples[kind])}", highlight=False, markup=False
            )
    if result.busy:
        err_console.print(
            "busy rows are held by a running worker or wait to retry: import the report again "
            "once no `migrator run` is running",
            highlight=False,
        )
