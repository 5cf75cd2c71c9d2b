"""``migrator verify``: check S3 and the app database against the ledger, trusting neither.

Listings and the ledger are both walked in key order (S3 lists keys in UTF-8 byte order; the
ledger sorts with a byte-order collation) and merged, so an audit of millions of objects costs
one LIST request per 1,000 keys and constant memory, not a HEAD per object.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
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
            # app values that were not UTF-8 carry surrogates: show their bytes escaped
            self.examples[kind].append(key.encode("utf-8", "backslashreplace").decode())

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


def _listing(client: s3.S3Service, bucket: str, prefix: str) -> Iterator[s3.ListedObject]:
    for page in client.list_pages(bucket, prefix):
        yield from page


def merge_by_key(
    rows: Iterator[dict[str, Any]], column: str, listed: Iterator[s3.ListedObject]
) -> Iterator[tuple[dict[str, Any], s3.ListedObject | None]]:
    """Pair each ledger row with the listed object of the same key (or None). Both inputs are
    sorted by key in byte order; Python compares str by code point, which is the same order."""
    obj = next(listed, None)
    for row in rows:
        key = row[column]
        while obj is not None and obj.key < key:
            obj = next(listed, None)
        yield row, obj if obj is not None and obj.key == key else None


def audit(cfg: Config, res: Resources) -> AuditResult:
    """Every done row: destination present with the recorded size and ETag, source deleted per
    policy; no app row (of any target) still holds a migrated source key's value, and every
    app value under a prefix names an existing object; unfinished rows are reported too. Each
    target costs one listing of each side."""
    result = AuditResult()
    src, dst = cfg.source, cfg.destination
    ledger = res.ledger
    done = [State.DONE]
    for row, obj in merge_by_key(
        ledger.iter_sorted("dest_key", done),
        "dest_key",
        _listing(res.dest, dst.bucket, dst.prefix),
    ):
        result.checked += 1
        if obj is None:
            result.add("missing at destination", row["source_key"])
        elif obj.size != row["size"]:
            result.add("size mismatch at destination", row["source_key"])
        elif row["dest_etag"] and obj.etag != row["dest_etag"]:
            result.add("ETag mismatch at destination", row["source_key"])
    for row, obj in merge_by_key(
        ledger.iter_sorted("source_key", done),
        "source_key",
        _listing(res.source, src.bucket, src.prefix),
    ):
        if cfg.delete_source == "never":
            if obj is None:
                result.add("source missing although delete_source is never", row["source_key"])
        elif obj is not None and obj.etag == row["etag"]:
            result.add("source left behind", row["source_key"])
    if res.appdb is not None:
        for t in res.appdb.targets:
            for side, loc, client, template in (
                ("destination", dst, res.dest, t.cfg.new),
                ("source", src, res.source, t.cfg.old),
            ):
                keys = ({"key": k} for k in res.appdb.iter_keys(t, template, loc.prefix))
                listing = _listing(client, loc.bucket, loc.prefix)
                for row, obj in merge_by_key(keys, "key", listing):
                    if obj is None:
                        result.add(
                            f"app row points at a {side} key that does not exist",
                            f"{t.name}: {template.render(row['key'])}",
                        )
    for batch in ledger.iter_rows():
        for r in batch:
            if r["state"] not in (State.DONE.value, State.SKIPPED.value):
                result.add(f"not done ({r['state']})", r["source_key"])
        if res.appdb is not None:
            migrated = [
                (r["source_key"], r["dest_key"])
                for r in batch
                if r["state"] in (State.REWRITTEN.value, State.DONE.value)
            ]
            for t, value, _ in res.appdb.pointing(migrated):
                result.add("app row still points at a migrated source key", f"{t.name}: {value}")
    return result
