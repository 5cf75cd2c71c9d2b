"""``migrator status`` and ``migrator jobs``: what the ledger says about jobs, as one JSON
document for scripts and as tables for people. Every figure comes from a few rows (the counts
kept by triggers, the rows that carry an error), so a ledger of millions answers at once,
from any host, while a run goes on."""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from migrator.config import Config
from migrator.ledger.repo import Ledger

RATE_WINDOW = timedelta(seconds=60)
ERROR_SAMPLE = 100_000  # rows with an error read for the grouping (newest first)
TOP_ERRORS = 10

# An S3 error code (AccessDenied, NoSuchKey, SlowDown, PreconditionFailed) or an HTTP status.
_CODE = re.compile(r"^(?:[A-Z][a-z0-9]+(?:[A-Z][A-Za-z0-9]*)+|[A-Z][a-z]+Error|[1-5]\d\d)$")


def error_code(message: str) -> str:
    """The kind of an error message, for grouping: the first S3 error code or HTTP status
    among its ``:``-separated parts (``delete: AccessDenied: Access Denied`` →
    ``AccessDenied``), else its first part (``verify``, ``conflict``, ``rewrite``)."""
    parts = [p.strip() for p in message.split(":")]
    for part in parts[:4]:
        word = part.split(" ", 1)[0].strip("()")
        if _CODE.match(word):
            return word
    found = re.search(r"\(([A-Z][a-z]+(?:[A-Z][a-z]+)+)\)", message)  # "... (NoSuchKey) ..."
    if found:
        return found.group(1)
    return parts[0][:40] or "error"


def error_summary(rows: Sequence[tuple[str, str, str, int]], sampled: bool) -> dict[str, Any]:
    """Rows that carry an error, grouped by ``error_code``: how many, how many failed for
    good, one example each; and the attempts spent on them."""
    groups: dict[str, dict[str, Any]] = {}
    for key, state, error, _attempts in rows:
        code = error_code(error)
        g = groups.setdefault(
            code, {"code": code, "objects": 0, "failed": 0, "example": {"key": key, "error": error}}
        )
        g["objects"] += 1
        g["failed"] += state == "failed"
    top = sorted(groups.values(), key=lambda g: (-g["objects"], g["code"]))[:TOP_ERRORS]
    return {
        "attempts": {
            "rows_with_errors": len(rows),
            "attempts": sum(r[3] for r in rows),
            "max_attempts": max((r[3] for r in rows), default=0),
            "sampled": sampled,
        },
        "top_errors": top,
    }


def eta_seconds(counts: dict[str, int], copy_rate: float, done_rate: float) -> int | None:
    """Time left: the copies still to make at the copy rate while any are left (nothing may
    finish before, under ``after_all``), then the unfinished objects at the finishing rate."""
    unfinished = sum(counts.values()) - sum(counts.get(s, 0) for s in ("done", "failed", "skipped"))
    if not unfinished:
        return None
    if counts.get("pending", 0) and copy_rate > 0:
        return round(counts["pending"] / copy_rate)
    if done_rate > 0:
        return round(unfinished / done_rate)
    return None


def status_document(cfg: Config, ledger: Ledger) -> dict[str, Any]:
    """The ``status --json`` document: the contract's ``job``, ``total`` and ``counts``, and
    bytes, rates, ETA, retries, attempts, errors grouped by code and the latest errors."""
    counts = ledger.counts()
    rates = ledger.rates(RATE_WINDOW)
    errors = ledger.error_rows(ERROR_SAMPLE)
    return {
        "job": cfg.job,
        "total": sum(counts.values()),
        "counts": counts,
        "bytes": ledger.bytes_by_state(),
        "planned": ledger.is_planned(),
        "objects_per_second": round(rates.done_objects, 2),
        "eta_seconds": eta_seconds(counts, rates.copied_objects, rates.done_objects),
        "rates": {
            "window_seconds": int(rates.window_seconds),
            "copied_objects_per_second": round(rates.copied_objects, 2),
            "copied_bytes_per_second": round(rates.copied_bytes),
            "done_objects_per_second": round(rates.done_objects, 2),
            "done_bytes_per_second": round(rates.done_bytes),
        },
        "s3_retries": ledger.s3_retries(),
        # versions: all counts keys above; their versions here
        **({"versions": ledger.version_counts()} if cfg.versions == "all" else {}),
        **error_summary(errors, sampled=len(errors) == ERROR_SAMPLE),
        "recent_errors": ledger.recent_errors(),
    }


def job_state(job: dict[str, Any]) -> str:
    """One word for ``migrator jobs``: where a job stands."""
    counts = job["counts"]
    total = sum(counts.values())
    if job["workers_active"]:
        return "running"
    if job["planned_at"] is None:
        return "not planned" if not total else "planning stopped"
    if counts["done"] + counts["skipped"] == total:
        return "done"
    if counts["failed"]:
        return "failed rows"
    if counts["pending"] == total:
        return "planned"
    return "stopped"


def mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"
