"""``migrator run --dry-run``: what a run would copy, rewrite and delete, touching nothing.

It lists the source and reads the app database and, if one exists, the ledger; it writes to
none of them and creates no ledger.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

from rich.console import Console

from migrator.appdb import AppDatabase
from migrator.config import Config
from migrator.errors import ConfigError, LedgerError
from migrator.keys import KeyRuleError, Skip
from migrator.ledger.repo import Ledger, open_existing_ledger
from migrator.ledger.tables import State
from migrator.storage import s3
from migrator.supervisor import check_s3

EXAMPLES = 5
_NEEDS_COPY = {None, State.PENDING.value, State.FAILED.value}
_NEEDS_REWRITE = _NEEDS_COPY | {State.COPIED.value}


@dataclass
class Preview:
    listed: int = 0
    excluded: int = 0  # left out by keys.include / keys.exclude
    not_matched: int = 0  # not matched by keys.pattern
    copy: int = 0
    copy_bytes: int = 0
    rewrite_keys: int = 0
    rewrite_rows: int = 0
    delete: int = 0
    examples: list[tuple[str, str]] = field(default_factory=list)


def preview(
    cfg: Config, client: s3.S3Service, appdb: AppDatabase | None, ledger: Ledger | None
) -> Preview:
    """Counts and examples over the listing, with the keys selected and mapped as ``plan``
    would (a rule that ``plan`` refuses key by key is refused here too; collisions across
    pages are not looked for: that needs the ledger's index)."""
    rule = cfg.key_rule
    p = Preview()
    for page in client.list_pages(cfg.source.bucket, cfg.source.prefix):
        states = ledger.states_of([o.key for o in page]) if ledger is not None else {}
        rewrite: list[tuple[str, str]] = []
        for o in page:
            p.listed += 1
            try:
                dest = rule.map(o.key)
            except KeyRuleError as exc:
                raise ConfigError(str(exc)) from None
            if isinstance(dest, Skip):
                p.excluded += dest is Skip.EXCLUDED
                p.not_matched += dest is Skip.NOT_MATCHED
                continue
            state = states.get(o.key)
            if state in _NEEDS_COPY:
                p.copy += 1
                p.copy_bytes += o.size
                if len(p.examples) < EXAMPLES:
                    p.examples.append((o.key, dest))
            if state in _NEEDS_REWRITE:
                rewrite.append((o.key, dest))
            if (
                state not in (State.DONE.value, State.SKIPPED.value)
                and cfg.delete_source != "never"
            ):
                p.delete += 1
        p.rewrite_keys += len(rewrite)
        if appdb is not None:
            p.rewrite_rows += appdb.count_pointing(rewrite)
    return p


def dry_run(cfg: Config, out: Console) -> Preview:
    sides = check_s3(cfg)
    appdb = AppDatabase(cfg.app_db) if cfg.app_db is not None else None
    ledger = None
    with contextlib.suppress(LedgerError):
        ledger = Ledger(open_existing_ledger(cfg.ledger), cfg.job)
    try:
        p = preview(cfg, sides.source, appdb, ledger)
    finally:
        sides.close()
        if appdb is not None:
            appdb.dispose()
        if ledger is not None:
            ledger.engine.dispose()
    src = f"s3://{cfg.source.bucket}/{cfg.source.prefix}"
    dst = f"s3://{cfg.destination.bucket}/{cfg.destination.prefix}"
    out.print(f"dry run of job {cfg.job}: nothing is copied, rewritten or deleted", highlight=False)
    out.print(f"  listed         {p.listed:,} objects under {src}", highlight=False)
    if p.excluded or p.not_matched:
        out.print(
            f"  would skip     {p.excluded:,} excluded, {p.not_matched:,} not matched "
            "(keys: include, exclude, pattern)",
            highlight=False,
        )
    out.print(
        f"  would copy     {p.copy:,} objects ({p.copy_bytes:,} bytes) to {dst}"
        + (", each with every version (versions: all)" if cfg.versions == "all" else ""),
        highlight=False,
        soft_wrap=True,
    )
    if cfg.app_db is not None:
        out.print(
            f"  would rewrite  {p.rewrite_rows:,} rows of "
            f"{', '.join(dict.fromkeys(t.name for t in cfg.app_db.all_targets))} "
            f"(for {p.rewrite_keys:,} objects)",
            highlight=False,
        )
    out.print(
        f"  would delete   {p.delete:,} source objects (delete_source: {cfg.delete_source})"
        + _how_deleted(cfg),
        highlight=False,
        soft_wrap=True,
    )
    for old, new in p.examples:
        out.print(f"  e.g. copy {old} -> {new}", highlight=False, markup=False, soft_wrap=True)
    return p


def _how_deleted(cfg: Config) -> str:
    """What a delete does in a versioned source (docs/configuration.md#versioned-sources)."""
    if cfg.delete_source == "never":
        return ""
    if cfg.delete_versions:
        return ", their migrated versions deleted for good (delete_versions)"
    return "; in a versioned bucket: a delete marker each, the versions kept"
