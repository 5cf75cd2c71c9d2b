"""``migrator relocate``: keep a bucket's name while moving it to another region.

A bucket cannot change region and its name is global, so the move goes through a temporary
bucket in the target region: create it, copy every object into it (the job
``<job>.to-temp``) and verify each copy with its attributes, read the bucket's configuration,
delete every version and the bucket, create the bucket again in the target region, re-apply
its configuration, copy the objects back (``<job>.from-temp``) and verify, re-apply the
lifecycle rules and the policy, and delete the temporary bucket.

Each phase is recorded in the ledger (``migrator_relocations``) once its side effect is
complete, and each side effect can be repeated, so a run killed at any instant resumes at the
phase it was in. Nothing is deleted from the bucket before its verified copy is in the
temporary bucket (every object deleted is checked against the copy job's ledger first), and
the temporary bucket is deleted only after the copy back is verified the same way.
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from migrator.config import Config, Location
from migrator.errors import (
    EXIT_OK,
    ConfigError,
    LedgerError,
    MigratorError,
    NoLedgerError,
    PreflightError,
    StorageError,
    redact,
)
from migrator.ledger.repo import (
    Ledger,
    Relocation,
    Relocations,
    lease_owner_id,
    open_existing_ledger,
    open_ledger,
)
from migrator.ledger.tables import Phase, State
from migrator.storage import buckets, s3
from migrator.storage.buckets import ObjectFacts, SettingError, Version
from migrator.storage.common import ListedObject, S3OperationError

TO_TEMP = ".to-temp"  # the copy job into the temporary bucket: <job>.to-temp
FROM_TEMP = ".from-temp"  # the copy job back: <job>.from-temp
LEASE_SECONDS = 60
DEFAULT_RECREATE_TIMEOUT = 1800  # seconds to wait for S3 to free the name
EXAMPLES = 5
PROGRESS_SECONDS = 5.0
ROLLBACK = "docs/operations.md#relocate-rollback"
# S3's answers while a deleted bucket's name is not free yet (or someone else took it).
NAME_BUSY = frozenset({"BucketAlreadyExists", "OperationAborted"})
_REGION = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d{1,2}$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_STEPS = [p for p in Phase if p is not Phase.DONE]

PHASE_TEXT = {
    Phase.CREATE_TEMP: "create the temporary bucket",
    Phase.COPY_OUT: "copy the objects to the temporary bucket and verify them",
    Phase.CHECK_SOURCE: "save the bucket's configuration; check nothing changed since the copy",
    Phase.EMPTY_SOURCE: "delete every object version and the bucket",
    Phase.RECREATE: "create the bucket again in the target region",
    Phase.CONFIGURE: "re-apply the bucket's configuration",
    Phase.COPY_BACK: "copy the objects back and verify them",
    Phase.FINISH_CONFIG: "re-apply the lifecycle rules and the bucket policy",
    Phase.DELETE_TEMP: "delete the temporary bucket",
    Phase.DONE: "done",
}


@dataclass(frozen=True)
class Options:
    """What the command line asks for."""

    to_region: str
    temp_bucket: str | None = None
    discard_noncurrent: bool = False
    recreate_timeout: float = DEFAULT_RECREATE_TIMEOUT
    quiet: bool = False


def phase_number(phase: Phase) -> str:
    return "done" if phase is Phase.DONE else f"{_STEPS.index(phase) + 1}/{len(_STEPS)}"


def check_options(cfg: Config, opts: Options) -> None:
    """The config and options a relocation accepts; ConfigError (exit 2) otherwise. Pure."""
    src, dst = cfg.source, cfg.destination
    problems = []
    if not _REGION.match(opts.to_region):
        problems.append(f"--to-region {opts.to_region!r} is not an AWS region, e.g. eu-central-1")
    if src.prefix:
        problems.append(
            f"source.prefix must be empty: relocate moves the whole bucket (it is "
            f"{src.prefix!r}); to move part of a bucket use `migrator run`"
        )
    if dst.bucket != src.bucket:
        problems.append(
            f"destination.bucket must be {src.bucket!r}, the source bucket: relocate keeps the "
            f"bucket's name (it is {dst.bucket!r}); to copy into another bucket use "
            "`migrator run`"
        )
    if dst.prefix:
        problems.append("destination.prefix must be empty: the keys do not change")
    if dst.endpoint_url != src.endpoint_url:
        problems.append(
            "destination.endpoint_url must be source.endpoint_url: relocate moves a bucket "
            "between regions of one S3 service"
        )
    if dst.region is not None and dst.region != opts.to_region:
        problems.append(
            f"destination.region is {dst.region!r} but --to-region is {opts.to_region!r}; "
            "make them agree (destination.region may be left out)"
        )
    if cfg.app_db is not None:
        problems.append("app_db must be left out: relocate keeps every key, so nothing rewrites")
    if cfg.keys != type(cfg.keys)():
        problems.append("keys must be left out: relocate moves every object under its own key")
    attrs = {
        "metadata": cfg.metadata != "copy",
        "tags": cfg.tags != "copy",
        "storage_class": cfg.storage_class != "copy",
        "sse": cfg.sse is not None,
        "acl": cfg.acl is not None,
    }
    changed = [name for name, set_ in attrs.items() if set_]
    if changed:
        problems.append(
            f"{', '.join(changed)} must be left out: relocate keeps every object as it is"
        )
    if cfg.versions != "latest" or cfg.delete_versions:
        problems.append(
            "versions and delete_versions must be left out: relocate copies each key's "
            "current version and empties the bucket itself (see docs/operations.md)"
        )
    if len(cfg.job) > 100 - len(FROM_TEMP):
        problems.append(
            f"job must be at most {100 - len(FROM_TEMP)} characters for relocate (its copies "
            f"are the jobs <job>{TO_TEMP} and <job>{FROM_TEMP})"
        )
    if opts.temp_bucket is not None:
        if not _BUCKET.match(opts.temp_bucket) or ".." in opts.temp_bucket:
            problems.append(
                f"--temp-bucket {opts.temp_bucket!r} is not a valid S3 bucket name (3-63 "
                "lowercase letters, digits, '.', '-')"
            )
        elif opts.temp_bucket == src.bucket:
            problems.append("--temp-bucket must name another bucket than the one relocated")
    if problems:
        raise ConfigError("relocate: " + "; ".join(problems))


def default_temp_bucket(bucket: str) -> str:
    """``<bucket>-relocate-<8 hex>``, cut to S3's 63 characters."""
    stem = bucket[: 63 - len("-relocate-") - 8].rstrip(".-")
    return f"{stem}-relocate-{secrets.token_hex(4)}"


def job_config(cfg: Config, name: str, source: Location, destination: Location) -> Config:
    """One copy of the relocation as an ordinary job: every object under its own key, sources
    kept (``delete_source: never``), no app database; the config's workers, concurrency,
    transport, part sizes and ``copy_mode`` apply."""
    data = cfg.model_dump(exclude_unset=True, exclude={"app_db", "keys"})
    data.update(
        job=name,
        source=source.model_dump(),
        destination=destination.model_dump(),
        delete_source="never",
    )
    return Config.model_validate(data)


# -- verification -------------------------------------------------------------------------


@dataclass
class CopyCheck:
    """What the verification of one copy found. ``kinds`` stop the relocation; ``gone``
    counts sources deleted after their copy (the copy is kept, and the run goes on)."""

    checked: int = 0
    gone: int = 0
    kinds: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    examples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    def add(self, kind: str, key: str) -> None:
        self.kinds[kind] += 1
        if len(self.examples[kind]) < EXAMPLES:
            self.examples[kind].append(key)

    @property
    def ok(self) -> bool:
        return not self.kinds

    def summary(self) -> str:
        return "; ".join(
            f"{n:,} {kind} (e.g. {', '.join(repr(k) for k in self.examples[kind][:3])})"
            for kind, n in sorted(self.kinds.items())
        )


WRITTEN = "written to the source after it was listed"
CHANGED = "changed at the source after its copy"
NOT_COPIED = "not copied"


def _merge(
    rows: Iterator[dict[str, Any]], listed: Iterator[ListedObject]
) -> Iterator[tuple[dict[str, Any] | None, ListedObject | None]]:
    """Ledger rows and listed objects, both in key byte order, paired by key (either side
    None where the other has no such key)."""
    row, obj = next(rows, None), next(listed, None)
    while row is not None or obj is not None:
        if obj is None or (row is not None and row["source_key"] < obj.key):
            yield row, None
            row = next(rows, None)
        elif row is None or obj.key < row["source_key"]:
            yield None, obj
            obj = next(listed, None)
        else:
            yield row, obj
            row, obj = next(rows, None), next(listed, None)


def _objects(client: Any, bucket: str) -> Iterator[ListedObject]:
    for page in s3.list_pages(client, bucket, ""):
        yield from page


def verify_copy(
    job: Config,
    ledger: Ledger,
    source: Any,
    dest: Any,
    threads: int,
    progress: Callable[[int], None] | None = None,
) -> CopyCheck:
    """Check one copy of the relocation against S3, trusting the ledger only for what was
    planned and copied. The source's listing and the job's rows are merged in key order: an
    object listed without a done row of the same ETag was written or changed after the copy.
    Then, for every done row (``threads`` at a time), the source and the copy are read
    (``HeadObject``, ``GetObjectTagging`` for tagged objects): both have the planned size,
    the source still the planned ETag, the copy the ETag recorded when its copy was verified,
    and both the same content headers, user metadata, storage class and tags."""
    check = CopyCheck()
    src_bucket, dst_bucket = job.source.bucket, job.destination.bucket
    states = list(State)
    batch: list[dict[str, Any]] = []

    def compare(row: dict[str, Any]) -> tuple[dict[str, Any], ObjectFacts | None, Any]:
        return (
            row,
            buckets.object_facts(source, src_bucket, row["source_key"]),
            buckets.object_facts(dest, dst_bucket, row["dest_key"]),
        )

    def flush(pool: ThreadPoolExecutor) -> None:
        for row, src, dst in pool.map(compare, batch):
            key = row["source_key"]
            check.checked += 1
            if src is None:
                check.gone += 1
            elif src.etag != row["etag"]:
                check.add(CHANGED, key)
                continue
            if dst is None:
                check.add("missing in the copy", key)
                continue
            if dst.size != row["size"]:
                check.add("of another size in the copy", key)
            elif dst.etag != (row["dest_etag"] or row["etag"]):
                check.add("of another ETag in the copy than verified", key)
            elif src is not None:
                for what in src.differences(dst):
                    check.add(f"with other {what} in the copy", key)
        batch.clear()
        if progress is not None:
            progress(check.checked)

    rows = ledger.iter_sorted("source_key", states)
    with ThreadPoolExecutor(threads, thread_name_prefix="verify") as pool:
        for row, obj in _merge(rows, _objects(source, src_bucket)):
            if row is None:
                assert obj is not None
                check.add(WRITTEN, obj.key)
            elif row["state"] != State.DONE.value:
                check.add(f"{NOT_COPIED} ({row['state']})", row["source_key"])
            elif obj is not None and obj.etag != row["etag"]:
                check.add(CHANGED, row["source_key"])
            else:
                batch.append(row)
                if len(batch) >= 1000:
                    flush(pool)
        if batch:
            flush(pool)
    return check


# -- the relocation -----------------------------------------------------------------------


class _Hold(threading.Thread):
    """Keeps this run's lease on the relocation alive (a second run refuses to start)."""

    def __init__(self, relocations: Relocations, job: str, owner: str) -> None:
        super().__init__(daemon=True, name="relocate-lease")
        self.relocations, self.job, self.owner = relocations, job, owner
        self.stopped = threading.Event()
        self.lost = False

    def run(self) -> None:
        while not self.stopped.wait(LEASE_SECONDS / 6):
            try:
                if not self.relocations.renew_lease(self.job, self.owner, LEASE_SECONDS):
                    self.lost = True
            except SQLAlchemyError:  # a ledger hiccup: the next renewal tries again
                continue


class Relocator:
    """Runs the phases of one relocation from the phase the ledger says, until done."""

    def __init__(
        self,
        cfg: Config,
        opts: Options,
        engine: Engine,
        owner: str,
        console: Console,
        on_phase: Callable[[Relocation], None] | None = None,
    ) -> None:
        self.cfg, self.opts, self.engine, self.owner = cfg, opts, engine, owner
        self.console = console
        self.on_phase = on_phase
        self.relocations = Relocations(engine)
        rel = self._row()
        self.bucket = rel.bucket
        self.old = cfg.source.model_copy(update={"region": rel.from_region})
        self.new = cfg.destination.model_copy(update={"region": rel.to_region})
        self.temp = self.new.model_copy(update={"bucket": rel.temp_bucket})
        self.threads = max(4, cfg.concurrency)
        self._clients: dict[str, Any] = {}
        self.hold: _Hold | None = None
        self.steps: dict[Phase, Callable[[Relocation], None]] = {
            Phase.CREATE_TEMP: self._create_temp,
            Phase.CHECK_SOURCE: self._check_source,
            Phase.EMPTY_SOURCE: self._empty_source,
            Phase.RECREATE: self._recreate,
            Phase.CONFIGURE: self._configure,
            Phase.FINISH_CONFIG: self._finish_config,
            Phase.DELETE_TEMP: self._delete_temp,
        }

    # -- plumbing ---------------------------------------------------------------------------
    def _row(self) -> Relocation:
        rel = Relocations(self.engine).get(self.cfg.job)
        if rel is None:
            raise LedgerError(f"relocation {self.cfg.job!r} is not in the ledger")
        return rel

    def _client(self, side: str) -> Any:
        """A boto3 client for the bucket where it is now (``old``) or where it goes (``new``:
        the temporary bucket and the bucket recreated)."""
        if side not in self._clients:
            loc = self.old if side == "old" else self.new
            self._clients[side] = s3.ClientFactory(loc, max_pool=self.threads + 4).client()
        return self._clients[side]

    @property
    def out_job(self) -> Config:
        return job_config(self.cfg, self.cfg.job + TO_TEMP, self.old, self.temp)

    @property
    def back_job(self) -> Config:
        return job_config(self.cfg, self.cfg.job + FROM_TEMP, self.temp, self.new)

    def _say(self, text: str) -> None:
        self.console.print(text, highlight=False, markup=False, soft_wrap=True)

    def _advance(self, done: Phase, then: Phase, **values: Any) -> None:
        self._held()
        self.relocations.advance(self.cfg.job, self.owner, done, then, **values)

    def _held(self) -> None:
        """Before a side effect: this run still holds the relocation."""
        if self.hold is not None and self.hold.lost:
            raise LedgerError(
                "this run lost its hold on the relocation (the ledger was unreachable for a "
                "minute, or another run took it over); run `migrator relocate --status`"
            )

    def _where(self, bucket: str, region: str) -> str:
        return f"s3://{bucket} ({region})"

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> int:
        """Run the phases until done (0), or until a copy ends unfinished (its exit code);
        a stop is a MigratorError, whose message is kept for ``--status``. The caller holds
        the relocation's lease."""
        relocations = self.relocations
        self.hold = _Hold(relocations, self.cfg.job, self.owner)
        self.hold.start()
        try:
            while True:
                rel = self._row()
                if rel.phase is Phase.DONE:
                    self._say(
                        f"relocated s3://{rel.bucket} from {rel.from_region} to {rel.to_region}"
                        f"; the temporary bucket {rel.temp_bucket} is deleted"
                    )
                    return EXIT_OK
                self._say(
                    f"relocate {rel.bucket}: phase {phase_number(rel.phase)} {rel.phase.value}: "
                    f"{PHASE_TEXT[rel.phase]}"
                )
                if self.on_phase is not None:
                    self.on_phase(rel)
                try:
                    code = self._step(rel)
                except S3OperationError as err:
                    raise StorageError(
                        f"relocate: S3 refused a request in phase {rel.phase.value}: {err}; "
                        "fix the cause and run the same command again"
                    ) from None
                if code != EXIT_OK:
                    return code
        except MigratorError as exc:
            with contextlib.suppress(SQLAlchemyError):  # the stop itself matters more
                relocations.record_error(self.cfg.job, self.owner, redact(str(exc)))
            raise
        finally:
            self.hold.stopped.set()
            self.hold.join()
            for client in self._clients.values():
                client.close()

    def _step(self, rel: Relocation) -> int:
        if rel.phase in (Phase.COPY_OUT, Phase.COPY_BACK):
            return self._copy_phase(rel)
        self.steps[rel.phase](rel)
        return EXIT_OK

    # -- the phases -------------------------------------------------------------------------
    def _create_temp(self, rel: Relocation) -> None:
        client, temp = self._client("new"), rel.temp_bucket
        self._held()
        try:
            buckets.create(client, temp, rel.to_region)
        except S3OperationError as err:
            if err.code == "BucketAlreadyExists":
                raise PreflightError(
                    f"the temporary bucket name {temp!r} belongs to another account; name "
                    "another with --temp-bucket"
                ) from None
            raise StorageError(f"cannot create the temporary bucket {temp!r}: {err}") from None
        region = buckets.region_of(client, temp)
        if region != rel.to_region:
            raise PreflightError(
                f"the temporary bucket {temp!r} already exists in {region}, not in "
                f"{rel.to_region}; name another with --temp-bucket"
            )
        if not _empty(client, temp):
            raise PreflightError(
                f"the temporary bucket {temp!r} already exists and holds objects (relocate "
                "deletes its temporary bucket at the end); name another with --temp-bucket"
            )
        self._advance(Phase.CREATE_TEMP, Phase.COPY_OUT)

    def _copy_phase(self, rel: Relocation) -> int:
        """Copy (a job of its own, resumable like any), then verify; a run that ends with
        failed objects, or a copy that does not match its source, stops the relocation."""
        from migrator.supervisor import preflight, run_job, run_plan

        out = rel.phase is Phase.COPY_OUT
        job = self.out_job if out else self.back_job
        ledger = Ledger(self.engine, job.job)
        ledger.ensure_job(job.safe_summary()["source"], job.safe_summary()["destination"])
        retried = ledger.retry_failed()
        if retried:
            self._say(f"{job.job}: {retried:,} failed objects put back to pending")
        if ledger.is_planned():
            # A resumed (or repeated) copy lists the source again: objects written since the
            # last listing are copied too, and changed ones again.
            res = preflight(job)
            try:
                run_plan(job, res, self.console)
            finally:
                res.close()
        code = run_job(job, console=self.console, quiet=self.opts.quiet)
        if code != EXIT_OK:
            self._say(
                f"relocate: the copy {job.job} did not complete; nothing was deleted. Run the "
                "same command again (it retries failed objects); `migrator relocate --status` "
                "shows the errors"
            )
            return code
        src = self._client("old" if out else "new")
        check = self._verify(job, ledger, src, self._client("new"))
        if check.gone:
            self._say(
                f"note: {check.gone:,} objects were deleted from s3://{job.source.bucket} after "
                f"they were copied; their copies are kept"
            )
        if not check.ok:
            hint = (
                "stop every writer of the bucket, then run the same command again: it copies "
                "what was written and verifies before anything is deleted"
                if any(k in (WRITTEN, CHANGED) for k in check.kinds)
                else "nothing was deleted; run the same command again to retry, or see " + ROLLBACK
            )
            raise StorageError(
                f"relocate: the copy s3://{job.source.bucket} -> s3://{job.destination.bucket} "
                f"is not verified: {check.summary()}; {hint}"
            )
        self._say(f"{job.job}: verified {check.checked:,} objects (size, ETag, attributes)")
        self._advance(rel.phase, Phase.CHECK_SOURCE if out else Phase.FINISH_CONFIG)
        return EXIT_OK

    def _verify(self, job: Config, ledger: Ledger, source: Any, dest: Any) -> CopyCheck:
        last = [time.monotonic()]

        def progress(n: int) -> None:
            if not self.opts.quiet and time.monotonic() - last[0] >= PROGRESS_SECONDS:
                last[0] = time.monotonic()
                self._say(f"{job.job}: verifying, {n:,} objects checked")

        self._say(f"{job.job}: verifying every object and its attributes ...")
        return verify_copy(job, ledger, source, dest, self.threads, progress)

    def _check_source(self, rel: Relocation) -> None:
        client = self._client("old")
        if rel.bucket_config is None:
            recorded = read_configuration(client, rel.bucket, rel.to_region)
            self._advance(
                Phase.CHECK_SOURCE, Phase.CHECK_SOURCE, bucket_config=json.dumps(recorded)
            )
            kept = [k for k, v in recorded.items() if v and k != "unsupported"]
            self._say(f"saved the bucket's configuration: {', '.join(kept) or 'nothing set'}")
            others = buckets.uncarried_settings(client, rel.bucket)
            if others:
                self._say(
                    f"warning: not carried over: {', '.join(others)}; re-create them on "
                    f"s3://{rel.bucket} once it is relocated (docs/operations.md)"
                )
        status, _ = buckets.versioning(client, rel.bucket)
        ledger = Ledger(self.engine, self.out_job.job)
        noncurrent = 0
        for page in buckets.list_versions(client, rel.bucket, status is not None):
            noncurrent += sum(1 for v in page if not v.latest and not v.marker)
            self._not_copied(ledger, page, rel, Phase.CHECK_SOURCE, Phase.COPY_OUT)
        if noncurrent and not self.opts.discard_noncurrent:
            raise PreflightError(
                f"s3://{rel.bucket} holds {noncurrent:,} noncurrent object versions; relocate "
                "copies the current version of each object only. Pass "
                "--discard-noncurrent-versions to delete them with the bucket, or keep the "
                f"bucket (roll back: {ROLLBACK})"
            )
        self._advance(Phase.CHECK_SOURCE, Phase.EMPTY_SOURCE)

    def _not_copied(
        self, ledger: Ledger, page: Sequence[Version], rel: Relocation, at: Phase, back: Phase
    ) -> None:
        """Stop (and go back to the copy) if an object of this page is not the verified copy
        of the job's ledger: written or changed after the copy was verified."""
        latest = [v for v in page if v.latest and not v.marker]
        rows = ledger.rows_for_keys([v.key for v in latest])
        strays = [
            v.key
            for v in latest
            if v.key not in rows
            or rows[v.key].state is not State.DONE
            or rows[v.key].etag != v.etag
        ]
        if not strays:
            return
        self._advance(at, back)
        bucket = self.bucket if back is Phase.COPY_OUT else rel.temp_bucket
        raise StorageError(
            f"relocate: {len(strays):,}+ objects in s3://{bucket} were written after the copy "
            f"was verified (e.g. {', '.join(repr(k) for k in strays[:3])}); nothing of them "
            "was deleted. Stop every writer of the bucket, then run the same command again: "
            "it copies them and verifies before deleting anything"
        )

    def _empty_source(self, rel: Relocation) -> None:
        client = self._client("old")
        ledger = Ledger(self.engine, self.out_job.job)
        if buckets.exists(client, rel.bucket):
            self._empty_and_delete(client, rel.bucket, ledger, rel, Phase.EMPTY_SOURCE)
        self._say(
            f"deleted s3://{rel.bucket} in {rel.from_region}; its objects are in "
            f"{self._where(rel.temp_bucket, rel.to_region)}"
        )
        self._advance(Phase.EMPTY_SOURCE, Phase.RECREATE)

    def _empty_and_delete(
        self, client: Any, bucket: str, ledger: Ledger, rel: Relocation, at: Phase
    ) -> None:
        """Delete every version and delete marker, then the bucket. Noncurrent versions go
        first: once none is left, deleting a latest version uncovers nothing, so a resumed run
        finds every object still latest and checks it against the ledger again. Each page of
        latest objects is checked (:meth:`_not_copied`) before it is deleted."""
        back = Phase.COPY_OUT if at is Phase.EMPTY_SOURCE else Phase.COPY_BACK
        for _ in range(3):
            status, _mfa = buckets.versioning(client, bucket)
            versioned = status is not None
            if versioned:
                for page in buckets.list_versions(client, bucket, versioned):
                    self._delete(client, bucket, [v for v in page if not v.latest])
            for page in buckets.list_versions(client, bucket, versioned):
                self._not_copied(ledger, page, rel, at, back)
                self._delete(client, bucket, page)
            self._held()
            buckets.abort_uploads(client, bucket)
            if buckets.delete(client, bucket):
                return
        raise StorageError(
            f"relocate: s3://{bucket} is not empty after three rounds of deletes: something "
            "keeps writing to it; stop every writer and run the same command again"
        )

    def _delete(self, client: Any, bucket: str, entries: Sequence[Version]) -> None:
        if not entries:
            return
        self._held()
        errors = buckets.delete_versions(client, bucket, entries)
        if errors:
            key, error = next(iter(errors.items()))
            raise StorageError(
                f"relocate: S3 did not delete {len(errors):,} objects of s3://{bucket} (e.g. "
                f"{key!r}: {error}); fix the cause (rights: s3:DeleteObject, "
                "s3:DeleteObjectVersion) and run the same command again"
            )

    def _recreate(self, rel: Relocation) -> None:
        client = self._client("new")
        deadline = time.monotonic() + self.opts.recreate_timeout
        wait = 1.0
        while True:
            self._held()
            try:
                buckets.create(client, rel.bucket, rel.to_region)
                break
            except S3OperationError as err:
                if err.code not in NAME_BUSY:
                    raise StorageError(
                        f"relocate: cannot create s3://{rel.bucket} in {rel.to_region}: {err}; "
                        f"the objects are safe in {self._where(rel.temp_bucket, rel.to_region)}"
                        f". Fix the cause and run the same command again, or roll back: "
                        f"{ROLLBACK}"
                    ) from None
                left = deadline - time.monotonic()
                if left <= 0:
                    raise StorageError(
                        f"relocate: the name {rel.bucket!r} is still not free after "
                        f"{self.opts.recreate_timeout:,.0f} s ({err.code}): S3 may still be "
                        "releasing it, or another account has taken it. The objects are safe "
                        f"in {self._where(rel.temp_bucket, rel.to_region)}. Run the same "
                        "command again to keep trying, or roll back (use the temporary "
                        f"bucket, or copy it to a bucket of another name): {ROLLBACK}"
                    ) from None
                self._say(
                    f"the name {rel.bucket!r} is not free yet ({err.code}); trying again in "
                    f"{min(wait, left):.0f} s"
                )
                time.sleep(min(wait, left))
                wait = min(wait * 2, 60.0)
        region = buckets.region_of(client, rel.bucket)
        if region != rel.to_region:
            raise StorageError(
                f"relocate: s3://{rel.bucket} exists in this account in {region}, not in "
                f"{rel.to_region}; the objects are safe in s3://{rel.temp_bucket}. See "
                f"{ROLLBACK}"
            )
        self._say(f"created s3://{rel.bucket} in {rel.to_region}")
        self._advance(Phase.RECREATE, Phase.CONFIGURE)

    def _apply(self, rel: Relocation, *, last: bool) -> None:
        recorded = json.loads(rel.bucket_config or "{}")
        self._held()
        try:
            applied = buckets.apply_settings(self._client("new"), rel.bucket, recorded, last=last)
        except SettingError as exc:
            raise StorageError(
                f"relocate: cannot re-apply the bucket's {exc.setting} to s3://{rel.bucket}: "
                f"{exc.error}; fix the cause (rights: s3:PutBucket*) and run the same command "
                "again"
            ) from None
        if applied:
            self._say(f"re-applied to s3://{rel.bucket}: {', '.join(applied)}")

    def _configure(self, rel: Relocation) -> None:
        self._apply(rel, last=False)
        self._advance(Phase.CONFIGURE, Phase.COPY_BACK)

    def _finish_config(self, rel: Relocation) -> None:
        self._apply(rel, last=True)
        self._advance(Phase.FINISH_CONFIG, Phase.DELETE_TEMP)

    def _delete_temp(self, rel: Relocation) -> None:
        client = self._client("new")
        ledger = Ledger(self.engine, self.back_job.job)
        if buckets.exists(client, rel.temp_bucket):
            self._empty_and_delete(client, rel.temp_bucket, ledger, rel, Phase.DELETE_TEMP)
        self._advance(Phase.DELETE_TEMP, Phase.DONE)


def _empty(client: Any, bucket: str) -> bool:
    """No object, version or delete marker in the bucket."""
    status, _ = buckets.versioning(client, bucket)
    return not next(iter(buckets.list_versions(client, bucket, status is not None)), [])


def read_configuration(client: Any, bucket: str, to_region: str) -> dict[str, Any]:
    """The bucket's configuration, refused (exit 2) when it cannot be carried over: a
    setting that cannot be read, or a default encryption with a KMS key of another region."""
    try:
        recorded = buckets.read_settings(client, bucket)
    except SettingError as exc:
        raise PreflightError(
            f"relocate: cannot read the {exc.setting} of s3://{bucket} ({exc.error}); relocate "
            "must read the whole configuration to re-apply it: grant s3:GetBucket* (and "
            "s3:GetBucketPolicy, s3:GetLifecycleConfiguration, …) and run again"
        ) from None
    key = buckets.kms_key_region(recorded.get("encryption"))
    if key is not None and key[1] != to_region:
        raise PreflightError(
            f"relocate: the default encryption of s3://{bucket} uses the KMS key {key[0]}, "
            f"which cannot serve a bucket in {to_region} (a KMS key belongs to one region). "
            "Set the bucket's default encryption to SSE-S3 (or the aws/s3 key) before "
            "relocating, and to a key of the new region afterwards"
        )
    return recorded


def _start_checks(cfg: Config, opts: Options) -> str:
    """Before a relocation is recorded: the bucket exists, is elsewhere than the target region,
    has no object lock or MFA delete, its configuration can be read and carried over, and —
    unless they may be discarded — holds no noncurrent versions. Returns its region."""
    target = s3.ClientFactory(cfg.destination.model_copy(update={"region": opts.to_region}))
    if target.core.get_credentials() is None:
        raise PreflightError(
            "relocate: no AWS credentials found for the destination (the target region): set "
            "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, destination.profile or a role"
        )
    client = s3.ClientFactory(cfg.source, max_pool=2).client()
    try:
        s3.check_bucket(client, cfg.source, "source")
        bucket = cfg.source.bucket
        region = buckets.region_of(client, bucket)
        if region == opts.to_region:
            raise PreflightError(f"relocate: s3://{bucket} is already in {opts.to_region}")
        if buckets.object_lock_enabled(client, bucket):
            raise PreflightError(
                f"relocate: s3://{bucket} has Object Lock enabled: locked versions cannot be "
                "deleted, and Object Lock can only be enabled when a bucket is created; "
                "relocate does not move such buckets"
            )
        status, mfa = buckets.versioning(client, bucket)
        if mfa:
            raise PreflightError(
                f"relocate: s3://{bucket} has MFA delete enabled: its versions cannot be "
                "deleted without the MFA device; disable MFA delete first"
            )
        read_configuration(client, bucket, opts.to_region)
        if status is not None and not opts.discard_noncurrent:
            noncurrent = sum(
                1
                for page in buckets.list_versions(client, bucket, True)
                for v in page
                if not v.latest and not v.marker
            )
            if noncurrent:
                raise PreflightError(
                    f"relocate: s3://{bucket} holds {noncurrent:,} noncurrent object versions; "
                    "relocate copies the current version of each object only. Pass "
                    "--discard-noncurrent-versions to delete them with the bucket"
                )
        return region
    except S3OperationError as err:
        raise PreflightError(f"relocate: s3://{cfg.source.bucket}: {err}") from None
    finally:
        client.close()


def _existing(cfg: Config) -> tuple[Engine, Relocation] | None:
    """The relocation already recorded for this job, if the ledger exists and has one."""
    try:
        engine = open_existing_ledger(cfg.ledger)
    except NoLedgerError:
        return None
    rel = Relocations(engine).get(cfg.job)
    if rel is None:
        engine.dispose()
        return None
    return engine, rel


def relocate(
    cfg: Config,
    opts: Options,
    console: Console,
    on_phase: Callable[[Relocation], None] | None = None,
) -> int:
    """``migrator relocate``: start the relocation of ``cfg.source.bucket`` to
    ``opts.to_region``, or resume the one the ledger holds for this job, and run it to the
    end. ``on_phase`` is told each phase as it begins."""
    check_options(cfg, opts)
    found = _existing(cfg)
    if found is None:
        from_region = _start_checks(cfg, opts)
        temp = opts.temp_bucket or default_temp_bucket(cfg.source.bucket)
        engine = open_ledger(cfg.ledger)
        Relocations(engine).start(cfg.job, cfg.source.bucket, from_region, opts.to_region, temp)
        rel = Relocations(engine).get(cfg.job)
        assert rel is not None
    else:
        engine, rel = found
    relocations = Relocations(engine)
    owner = lease_owner_id(0)
    try:
        holder = relocations.take_lease(cfg.job, owner, LEASE_SECONDS)
        if holder is not None:
            raise PreflightError(
                f"another `migrator relocate` of job {cfg.job!r} is running ({holder}); wait "
                "for it, or stop it and run again"
            )
        try:
            _resume_checks(cfg, opts, rel, relocations, owner)
            return Relocator(cfg, opts, engine, owner, console, on_phase).run()
        finally:
            with contextlib.suppress(SQLAlchemyError):  # else it expires in a minute
                relocations.release_lease(cfg.job, owner)
    finally:
        engine.dispose()


def _resume_checks(
    cfg: Config, opts: Options, rel: Relocation, relocations: Relocations, owner: str
) -> None:
    """A run must ask for the relocation the ledger holds; the temporary bucket may be
    renamed only before it was created."""
    if rel.bucket != cfg.source.bucket:
        raise ConfigError(
            f"relocate: job {cfg.job!r} relocates s3://{rel.bucket}, not s3://"
            f"{cfg.source.bucket}; use another job name for another bucket"
        )
    if rel.to_region != opts.to_region:
        raise ConfigError(
            f"relocate: job {cfg.job!r} is moving s3://{rel.bucket} to {rel.to_region} (phase "
            f"{rel.phase.value}); run it with --to-region {rel.to_region}, or see {ROLLBACK}"
        )
    wanted = opts.temp_bucket
    if wanted is not None and wanted != rel.temp_bucket:
        if rel.phase is not Phase.CREATE_TEMP:
            raise ConfigError(
                f"relocate: job {cfg.job!r} already uses the temporary bucket "
                f"{rel.temp_bucket!r} (phase {rel.phase.value}); leave out --temp-bucket"
            )
        relocations.set_temp_bucket(cfg.job, owner, wanted)


# -- status -------------------------------------------------------------------------------


def relocation_status(cfg: Config) -> dict[str, Any]:
    """``migrator relocate --status``: the phase, the copies' counts and recent errors, and
    the bucket's configuration as saved. Reads only the ledger."""
    found = _existing(cfg)
    if found is None:
        raise LedgerError(
            f"no relocation of job {cfg.job!r} in the ledger; start one with `migrator "
            "relocate --to-region REGION --confirm-delete-source-bucket`"
        )
    engine, rel = found
    try:
        copies = {}
        for name, suffix in (("to_temp", TO_TEMP), ("from_temp", FROM_TEMP)):
            ledger = Ledger(engine, cfg.job + suffix)
            copies[name] = {
                "job": cfg.job + suffix,
                "counts": ledger.counts(),
                "recent_errors": ledger.recent_errors(),
            }
    finally:
        engine.dispose()
    return {
        "job": rel.job,
        "bucket": rel.bucket,
        "from_region": rel.from_region,
        "to_region": rel.to_region,
        "temp_bucket": rel.temp_bucket,
        "phase": rel.phase.value,
        "step": phase_number(rel.phase),
        "doing": PHASE_TEXT[rel.phase],
        "copies": copies,
        "bucket_config": json.loads(rel.bucket_config) if rel.bucket_config else None,
        "last_error": rel.last_error,
        "updated_at": rel.updated_at.isoformat(timespec="seconds"),
    }
