"""S3 Batch Operations hand-off: the pending rows as a Batch Operations CSV manifest, and the
job's completion report read back into the ledger.

For a copy too large to run from one place, AWS can do the copy stage: ``export-manifest``
writes the rows still to copy in the ``S3BatchOperations_CSV_20180820`` format (bucket and
URL-encoded key per line), an operator creates the Batch Operations job from it, and
``import-report`` reads the job's completion report (``Report_CSV_20180820``). A task that
succeeded is not taken on trust: the destination is looked up (HeadObject) and must hold the
planned object — size and ETag as the copy stage verifies them — before the row is recorded
as copied, so the rewrite and delete stages that ``migrator run`` then carries out keep I1.
A failed task marks its row failed with the report's error; ``retry-failed`` and ``run`` copy
it with migrator instead.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, unquote, unquote_plus

from migrator.config import Config
from migrator.errors import ConfigError, redact
from migrator.ledger.repo import Ledger, ObjectRow, lease_owner_id
from migrator.ledger.tables import Stage, State
from migrator.stages import after_rewrite
from migrator.storage import s3

MANIFEST_FORMAT = "S3BatchOperations_CSV_20180820"
REPORT_FORMAT = "Report_CSV_20180820"
REPORT_SCHEMA = ("Bucket", "Key", "VersionId", "TaskStatus", "ErrorCode", "HTTPStatusCode")
_BATCH = 1000
_LEASE_SECONDS = 300


def encode_key(key: str) -> str:
    """A key as a Batch Operations manifest needs it: URL-encoded, ``/`` left as it is (a
    comma, quote or newline cannot break the CSV line; ``+`` is ``%2B``, so a decoder that
    reads ``+`` as a space still gets the key back)."""
    return quote(key, safe="/")


@dataclass(frozen=True)
class Manifest:
    rows: int
    target_prefix: str | None  # the copy operation's TargetKeyPrefix, when one expresses the rule
    multipart: int  # pending rows left out: multipart sources (see export_manifest)


def export_manifest(cfg: Config, ledger: Ledger, out: Path) -> Manifest:
    """Write the job's pending rows to ``out`` (written to a temporary file, then renamed).
    Returns the row count and, when every destination key is the source key under one added
    prefix, that prefix: only then can Batch Operations' own copy (``S3PutObjectCopy``, whose
    ``TargetKeyPrefix`` is prepended to the source key) produce the job's destination keys.

    Rows whose source has a multipart ETag are left out (and counted): Batch Operations
    copies whatever version is current, without a precondition, and a copy of a multipart
    object gets an ETag of its own, so ``import-report`` could not tell the planned bytes
    from others of the same size. ``migrator run`` copies them, guarded (I4)."""
    current_versions_only(cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    rows = multipart = 0
    prefixes: set[str | None] = set()
    try:
        with tmp.open("w", encoding="utf-8", newline="") as f:
            for page in ledger.iter_rows(states=[State.PENDING]):
                for r in page:
                    if "-" in r["etag"]:
                        multipart += 1
                        continue
                    f.write(f"{cfg.source.bucket},{encode_key(r['source_key'])}\n")
                    source, dest = r["source_key"], r["dest_key"]
                    prefixes.add(dest[: len(dest) - len(source)] if dest.endswith(source) else None)
                    rows += 1
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    target = prefixes.pop() if len(prefixes) == 1 else None
    return Manifest(rows, target, multipart)


@dataclass(frozen=True)
class Task:
    """One line of a completion report."""

    bucket: str
    key: str  # decoded
    raw_key: str  # as written in the report
    succeeded: bool
    detail: str  # HTTP status, error code and message, for a failed task


@dataclass
class ImportResult:
    copied: int = 0  # succeeded, and the destination holds the planned object
    failed: int = 0  # the task failed: the row is failed with its error
    mismatched: int = 0  # succeeded, but the destination is not the planned object
    already: int = 0  # the row had moved past pending before this import
    busy: int = 0  # a worker holds the row right now; import again once the run is over
    unknown: int = 0  # not a row of this job
    examples: dict[str, list[str]] = field(default_factory=dict)

    def note(self, kind: str, key: str) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        seen = self.examples.setdefault(kind, [])
        if len(seen) < 3:
            seen.append(key)


def report_files(path: Path) -> list[Path]:
    """The CSV files of a completion report: ``path`` is the report's directory (with its
    ``manifest.json``, whose results are looked up beside it or under ``results/``), a
    directory of result CSVs, or one CSV file. A result file whose MD5 differs from the one
    the manifest gives is refused (a partial download)."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ConfigError(f"{path}: no such report directory or file")
    manifest = path / "manifest.json"
    if not manifest.exists():
        found = sorted(path.glob("*.csv")) + sorted((path / "results").glob("*.csv"))
        if not found:
            raise ConfigError(
                f"{path}: no manifest.json and no .csv result files; give the directory of the "
                "Batch Operations completion report (as downloaded with `aws s3 cp --recursive`)"
            )
        return found
    try:
        doc = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(
            f"{manifest}: not a readable completion report manifest ({exc})"
        ) from None
    if not isinstance(doc, dict) or doc.get("Format") != REPORT_FORMAT:
        got = doc.get("Format") if isinstance(doc, dict) else type(doc).__name__
        raise ConfigError(
            f"{manifest}: format {got!r} is not a completion report ({REPORT_FORMAT})"
        )
    files = []
    for result in doc.get("Results") or []:
        name = Path(str(result.get("Key", ""))).name
        local = next((p for p in (path / "results" / name, path / name) if p.is_file()), None)
        if local is None:
            raise ConfigError(
                f"{manifest}: result file {name!r} is not in {path} or {path / 'results'}; "
                "download the whole report directory"
            )
        want = result.get("MD5Checksum")
        if want and hashlib.md5(local.read_bytes()).hexdigest() != want:
            raise ConfigError(f"{local}: MD5 differs from the report manifest's; download it again")
        files.append(local)
    return files


def read_tasks(files: Sequence[Path]) -> Iterator[Task]:
    """The tasks of the result files. The columns are the report schema's (Bucket, Key,
    VersionId, TaskStatus, ErrorCode, HTTPStatusCode, ResultMessage); AWS's own examples put
    the HTTP status before the error code, so the two are told apart by their values."""
    for path in files:
        try:
            with path.open(encoding="utf-8", newline="") as f:
                yield from _tasks_of(path, csv.reader(f))
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise ConfigError(f"{path}: cannot read the report file ({exc})") from None


def _tasks_of(path: Path, lines: Iterator[list[str]]) -> Iterator[Task]:
    for n, fields in enumerate(lines, 1):
        if not fields:
            continue
        if len(fields) < len(REPORT_SCHEMA):
            raise ConfigError(
                f"{path}:{n}: {len(fields)} columns, a completion report line has at least "
                f"{len(REPORT_SCHEMA)} ({', '.join(REPORT_SCHEMA)}, ResultMessage)"
            )
        bucket, raw_key, _version, status, code_a, code_b = fields[:6]
        message = ",".join(fields[6:])
        status = status.strip().lower()
        if status not in ("succeeded", "failed"):
            raise ConfigError(f"{path}:{n}: task status {status!r} is neither succeeded nor failed")
        http, code = (code_a, code_b) if code_a.strip().isdigit() else (code_b, code_a)
        detail = " ".join(p for p in (f"HTTP {http}" if http else "", code, message) if p)
        yield Task(bucket, unquote(raw_key), raw_key, status == "succeeded", detail.strip())


def import_report(cfg: Config, ledger: Ledger, dest: s3.S3Service, path: Path) -> ImportResult:
    """Record the tasks of a completion report in the ledger (see the module docstring).
    Every task's bucket must be the job's source bucket; rows are taken under a lease, so an
    import never changes a row a running worker holds."""
    current_versions_only(cfg)
    files = report_files(path)
    for t in read_tasks(files):  # the whole report is checked before any row changes
        if t.bucket != cfg.source.bucket:
            raise ConfigError(
                f"the report lists bucket {t.bucket!r} (key {t.key!r}); this job's source is "
                f"{cfg.source.bucket!r}: wrong report or wrong --config"
            )
    result = ImportResult()
    owner = lease_owner_id(0)
    for batch in _batches(read_tasks(files), _BATCH):
        _import_batch(cfg, ledger, dest, owner, batch, result)
    return result


def current_versions_only(cfg: Config) -> None:
    """Batch Operations copies each key's current version: a job of every version is
    ``migrator run``'s alone."""
    if cfg.versions == "all":
        raise ConfigError(
            "versions: all: S3 Batch Operations copies current versions only; copy every "
            "version with `migrator run`"
        )


def _batches(tasks: Iterable[Task], size: int) -> Iterator[list[Task]]:
    it = iter(tasks)
    while batch := list(itertools.islice(it, size)):
        yield batch


def _import_batch(
    cfg: Config,
    ledger: Ledger,
    dest: s3.S3Service,
    owner: str,
    tasks: Sequence[Task],
    result: ImportResult,
) -> None:
    by_key = ledger.rows_for_keys([t.key for t in tasks])
    # A key with a literal '+' the report may give form-encoded ('+' for a space): the
    # manifest never wrote one, but a hand-made report may.
    missing = [t for t in tasks if t.key not in by_key]
    if missing:
        by_key.update(ledger.rows_for_keys([unquote_plus(t.raw_key) for t in missing]))
    wanted: dict[int, Task] = {}
    for t in tasks:
        row = by_key.get(t.key) or by_key.get(unquote_plus(t.raw_key))
        if row is None:
            result.note("unknown", t.key)
        elif row.state is not State.PENDING:
            result.note("already", t.key)
        else:
            wanted[row.id] = t
    held = {r.id: r for r in ledger.claim_ids(owner, list(wanted), [State.PENDING], _LEASE_SECONDS)}
    for row_id, t in wanted.items():
        if row_id not in held:
            result.note("busy", t.key)
    try:
        ok = [r for r in held.values() if wanted[r.id].succeeded]
        bad = [r for r in held.values() if not wanted[r.id].succeeded]
        with ThreadPoolExecutor(max(1, min(cfg.concurrency, len(ok) or 1))) as pool:
            found = list(pool.map(lambda r: _verified(cfg, dest, r), ok))
        copied = [(r, etag) for r, (etag, _) in zip(ok, found, strict=True) if etag is not None]
        mismatched = [(r, why) for r, (etag, why) in zip(ok, found, strict=True) if etag is None]
        state = State.COPIED if cfg.app_db is not None else after_rewrite(cfg)
        recorded = ledger.record_copied(owner, [(r.id, e) for r, e in copied], state)
        for r, _ in copied:
            if r.id in recorded:
                result.note("copied", r.source_key)
        ledger.record_failures(owner, mismatched, Stage.COPY, cfg.max_attempts)
        for r, _ in mismatched:
            result.note("mismatched", r.source_key)
        failures = [(r, redact(f"batch operations: {wanted[r.id].detail}")) for r in bad]
        ledger.record_failures(owner, failures, Stage.COPY, cfg.max_attempts, permanent=True)
        for r in bad:
            result.note("failed", r.source_key)
    finally:
        ledger.release(owner)


def _verified(cfg: Config, dest: s3.S3Service, row: ObjectRow) -> tuple[str | None, str]:
    """The destination's ETag when it holds the planned object, else None and why not."""
    try:
        found = dest.head(cfg.destination.bucket, row.dest_key)
    except s3.S3OperationError as exc:
        return None, f"import-report: {exc}"
    if found is None:
        return None, "import-report: the task succeeded but the destination key is missing"
    # The planned ETag (an MD5: multipart sources are not exported) proves the bytes; Batch
    # Operations copies whatever version is current, so nothing less is accepted.
    if found.size != row.size or found.etag != row.etag:
        return None, (
            f"import-report: the destination holds {found.size} bytes, ETag {found.etag}; "
            f"planned {row.size} bytes, ETag {row.etag}"
        )
    return found.etag, ""
