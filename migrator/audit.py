"""``migrator verify``: check S3 and the app database against the ledger, trusting neither."""

from __future__ import annotations

from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from migrator.config import Config
from migrator.ledger.tables import State
from migrator.storage import s3
from migrator.supervisor import Resources

EXAMPLES = 10


@dataclass
class AuditResult:
    checked: int = 0
    kinds: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    examples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    def add(self, kind: str, key: str) -> None:
        self.kinds[kind] += 1
        if len(self.examples[kind]) < EXAMPLES:
            self.examples[kind].append(key)

    @property
    def ok(self) -> bool:
        return not self.kinds

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "checked": self.checked,
            "discrepancies": dict(self.kinds),
            "examples": dict(self.examples),
        }


def _check_row(cfg: Config, res: Resources, row: dict[str, Any]) -> list[str]:
    problems = []
    dest = s3.head(res.dest_client, cfg.destination.bucket, row["dest_key"])
    if dest is None:
        problems.append("missing at destination")
    elif dest.size != row["size"]:
        problems.append("size mismatch at destination")
    elif row["dest_etag"] and dest.etag != row["dest_etag"]:
        problems.append("ETag mismatch at destination")
    source = s3.head(res.source_client, cfg.source.bucket, row["source_key"])
    if cfg.delete_source == "never":
        if source is None:
            problems.append("source missing although delete_source is never")
    elif source is not None and source.etag == row["etag"]:
        problems.append("source left behind")
    return problems


def audit(cfg: Config, res: Resources) -> AuditResult:
    """Every done row: destination present with the recorded size and ETag, source deleted per
    policy; no app row still holds a migrated source key; unfinished rows are reported too."""
    result = AuditResult()
    with ThreadPoolExecutor(cfg.concurrency) as pool:
        for batch in res.ledger.iter_rows():
            done = [r for r in batch if r["state"] == State.DONE.value]
            for r in batch:
                if r["state"] != State.DONE.value:
                    result.add(f"not done ({r['state']})", r["source_key"])
            for r, problems in zip(
                done, pool.map(lambda r: _check_row(cfg, res, r), done), strict=True
            ):
                for p in problems:
                    result.add(p, r["source_key"])
            result.checked += len(batch)
            if res.appdb is not None:
                migrated = [
                    r["source_key"]
                    for r in batch
                    if r["state"] in (State.REWRITTEN.value, State.DONE.value)
                ]
                for key in res.appdb.still_pointing(migrated):
                    result.add("app row still points at a migrated source key", key)
    return result
