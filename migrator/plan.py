"""plan: list the source prefix into the ledger, one page (≤ 1,000 objects) at a time."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from migrator.config import Config
from migrator.keys import map_key
from migrator.ledger.repo import Ledger, Planned


@dataclass
class PlanTotals:
    listed: int = 0
    added: int = 0
    reset: int = 0
    unchanged: int = 0
    complete: bool = False  # the whole listing is in the ledger (False: stopped early)


def plan_job(
    cfg: Config,
    ledger: Ledger,
    source_client: Any,
    on_page: Callable[[PlanTotals], None] | None = None,
    stop: Callable[[], bool] | None = None,
) -> PlanTotals:
    """Stream ``ListObjectsV2`` into the ledger; idempotent and delta-aware. Memory stays
    constant: one page is held at a time. ``stop`` is asked before each page; a plan stopped
    early leaves the job unplanned, and the next one lists it again from the start."""
    src, dst = cfg.source, cfg.destination
    ledger.ensure_job(cfg.safe_summary()["source"], cfg.safe_summary()["destination"])
    totals = PlanTotals()
    for page in source_client.list_pages(src.bucket, src.prefix):
        if stop is not None and stop():
            return totals
        result = ledger.upsert_page(
            [
                Planned(
                    source_key=o.key,
                    dest_key=map_key(o.key, src.prefix, dst.prefix),
                    size=o.size,
                    etag=o.etag,
                    last_modified=o.last_modified,
                )
                for o in page
            ]
        )
        totals.listed += len(page)
        totals.added += result.added
        totals.reset += result.reset
        totals.unchanged += result.unchanged
        if on_page is not None:
            on_page(totals)
    ledger.mark_planned()
    totals.complete = True
    return totals
