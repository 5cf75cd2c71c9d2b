"""plan: list the source prefix (or read an S3 Inventory report) into the ledger, one page
(≤ 1,000 objects) at a time."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from migrator.config import Config
from migrator.errors import ConfigError
from migrator.keys import KeyRule, KeyRuleError, Skip
from migrator.ledger.repo import DoneRows, Ledger, NewVersion, Planned, collision_message
from migrator.storage.common import ListedObject

if TYPE_CHECKING:
    from migrator.storage.common import ListedVersion


@dataclass
class PlanTotals:
    listed: int = 0
    added: int = 0
    reset: int = 0
    unchanged: int = 0
    excluded: int = 0  # listed, left out by keys.include / keys.exclude
    not_matched: int = 0  # listed, not matched by keys.pattern
    delete_marked: int = 0  # listed with versions, current version a delete marker: left out
    versions_added: int = 0  # object versions recorded (a job that lists versions)
    remapped: int = 0  # never-copied rows given a new destination key (the rule changed)
    dropped: int = 0  # never-copied rows removed from the job (the rule no longer selects them)
    complete: bool = False  # the whole listing is in the ledger (False: stopped early)


@dataclass
class VersionPage:
    """A page of a versions listing: each key's current version as an object to plan, and
    the versions to record for it (oldest first)."""

    objects: list[ListedObject] = field(default_factory=list)
    versions: dict[str, list[NewVersion]] = field(default_factory=dict)
    delete_marked: int = 0


def version_pages(
    cfg: Config, groups: Iterable[list[list[ListedVersion]]]
) -> Iterator[VersionPage]:
    """Pages of :func:`migrator.storage.s3.list_version_pages` as what a plan records. A key
    whose current version is a delete marker (deleted at the source) is left out, its older
    versions with it. ``versions: all`` records every object version of a key, ``latest``
    the current one only (its id, for ``delete_versions``)."""
    every = cfg.versions == "all"
    for page in groups:
        out = VersionPage()
        for entries in page:
            current = next((v for v in entries if v.is_latest), None)
            if current is None or current.delete_marker:
                out.delete_marked += 1
                continue
            out.objects.append(
                ListedObject(
                    current.key,
                    current.size,
                    current.etag,
                    current.last_modified,
                    current.storage_class,
                )
            )
            kept = [v for v in entries if not v.delete_marker] if every else [current]
            out.versions[current.key] = [
                NewVersion(v.version_id, v.size, v.etag, v.last_modified, v.storage_class)
                for v in reversed(kept)  # S3 lists newest first
            ]
        yield out


def plan_page(
    rule: KeyRule, page: Sequence[ListedObject], totals: PlanTotals
) -> tuple[list[Planned], list[str]]:
    """The page's selected objects with their destination keys, and the keys left out.

    Raises ConfigError for a key the rule cannot map or two keys of the page mapped to one
    destination (collisions with earlier pages are the ledger's unique index's to find)."""
    planned: list[Planned] = []
    left_out: list[str] = []
    owner: dict[str, str] = {}
    for o in page:
        try:
            dest = rule.map(o.key)
        except KeyRuleError as exc:
            raise ConfigError(str(exc)) from None
        if isinstance(dest, Skip):
            if dest is Skip.EXCLUDED:
                totals.excluded += 1
            else:
                totals.not_matched += 1
            left_out.append(o.key)
            continue
        first = owner.setdefault(dest, o.key)
        if first != o.key:
            raise ConfigError(collision_message(first, o.key, dest))
        planned.append(Planned(o.key, dest, o.size, o.etag, o.last_modified, o.storage_class))
    return planned, left_out


def plan_job(
    cfg: Config,
    ledger: Ledger,
    source_client: Any,
    on_page: Callable[[PlanTotals], None] | None = None,
    stop: Callable[[], bool] | None = None,
) -> PlanTotals:
    """Stream ``ListObjectsV2`` of the source prefix into the ledger (:func:`plan_pages`).
    A listing shows the source as it is now, so it also revisits done rows whose key is
    listed again (``DoneRows``; docs/cutover.md)."""
    src = cfg.source
    done_rows = DoneRows.CHANGED if cfg.delete_source == "never" else DoneRows.LISTED
    pages: Iterable[Sequence[ListedObject] | VersionPage]
    if cfg.lists_versions:
        pages = version_pages(cfg, source_client.list_version_pages(src.bucket, src.prefix))
    else:
        pages = source_client.list_pages(src.bucket, src.prefix)
    return plan_pages(cfg, ledger, pages, on_page, stop, done_rows=done_rows)


def plan_pages(
    cfg: Config,
    ledger: Ledger,
    pages: Iterable[Sequence[ListedObject] | VersionPage],
    on_page: Callable[[PlanTotals], None] | None = None,
    stop: Callable[[], bool] | None = None,
    *,
    done_rows: DoneRows = DoneRows.KEEP,
) -> PlanTotals:
    """Upsert pages of the source's objects into the ledger; idempotent and delta-aware.
    Whatever produces the pages (a listing, an S3 Inventory report), re-plan semantics,
    counts and collisions are the same. Memory stays constant: one page is held at a time.
    ``stop`` is asked before each page; a plan stopped early (or ended by an error from
    ``pages``) leaves the job unplanned, and the next one starts again from the beginning.

    Keys are selected and mapped by ``cfg.key_rule``. A key the rule cannot map, or a
    destination key that two sources would share, stops the plan with a ConfigError; the
    pages before it stay in the ledger, and a re-plan with a corrected rule gives their rows
    (those never copied) the new destination keys or drops them."""
    rule = cfg.key_rule
    ledger.ensure_job(cfg.safe_summary()["source"], cfg.safe_summary()["destination"])
    replan = ledger.has_rows()
    totals = PlanTotals()
    for listed in pages:
        if stop is not None and stop():
            return totals
        page = listed.objects if isinstance(listed, VersionPage) else listed
        planned, left_out = plan_page(rule, page, totals)
        if isinstance(listed, VersionPage):
            totals.delete_marked += listed.delete_marked
            # Before the object rows: a worker that claims a row finds its versions.
            totals.versions_added += ledger.add_versions(
                {p.source_key: listed.versions[p.source_key] for p in planned}
            )
        result = ledger.upsert_page(planned, left_out, replan=replan, done_rows=done_rows)
        totals.listed += len(page)
        totals.added += result.added
        totals.reset += result.reset
        totals.unchanged += result.unchanged
        totals.remapped += result.remapped
        totals.dropped += result.dropped
        if on_page is not None:
            on_page(totals)
    ledger.mark_planned()
    totals.complete = True
    return totals
