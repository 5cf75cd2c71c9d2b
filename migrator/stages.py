"""The four stages as functions over a claimed chunk: copy → verify → rewrite → delete.

Each stage performs its side effect first and records it in the ledger afterwards (I2), and
returns the rows that moved on, so the next stage sees them. Every side effect is idempotent:
a copy of the planned version, an ``UPDATE ... WHERE column = old``, a delete of a key that may
already be gone.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from migrator import keys
from migrator.appdb import AppDatabase
from migrator.config import Config
from migrator.errors import db_reason, redact
from migrator.ledger.repo import Ledger, NewVersion, ObjectRow, VersionRow
from migrator.ledger.tables import Stage, State
from migrator.logs import event
from migrator.storage import s3
from migrator.storage.attributes import OPAQUE_ETAG_SSE, ObjectAttributes
from migrator.storage.common import CopyItem, same_content

log = logging.getLogger("migrator.stages")


class DeleteBudget:
    """``--max-delete``: how many sources this run may still delete, shared by its workers
    through a ``multiprocessing.Value`` (a negative value means no limit)."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def take(self, wanted: int) -> int:
        """Reserve up to ``wanted`` deletes; returns how many may go ahead."""
        with self.value.get_lock():
            if self.value.value < 0:
                return wanted
            granted = min(wanted, self.value.value)
            self.value.value -= granted
            return granted

    def exhausted(self) -> bool:
        return self.value.value == 0


@dataclass
class ChunkContext:
    """What a worker hands to the stages: config, ledger, clients, the app DB, a thread pool."""

    cfg: Config
    ledger: Ledger
    owner: str
    source: s3.S3Service
    dest: s3.S3Service
    appdb: AppDatabase | None
    stop: Any  # has is_set(): the worker's StopFlag
    budget: DeleteBudget | None = None
    attrs: ObjectAttributes = field(init=False)  # what the copies set (cfg.attributes)

    def __post_init__(self) -> None:
        self.attrs = self.cfg.attributes


@dataclass(frozen=True)
class CopyOutcome:
    row: ObjectRow
    dest_etag: str | None = None  # set when the destination is verified
    error: str | None = None
    permanent: bool = False
    replan: s3.Head | None = None  # the source's new version, when it changed after plan
    not_sent: bool = False  # stop requested before the request was sent
    conflict_skipped: bool = False  # on_conflict: skip, and the destination holds another object


CopyResult = str | s3.MultipartCopy | s3.S3OperationError | None
HeadResult = s3.Head | s3.S3OperationError | None
Heads = tuple[HeadResult, HeadResult]  # the source's and the destination's, with checksums


def _outcome(
    ctx: ChunkContext, row: ObjectRow, result: CopyResult, guarded: bool, heads: Heads | None
) -> CopyOutcome:
    """What one copy request's result means for its row (more requests only on errors, and
    ``heads`` already fetched when the ETags could not be compared)."""
    if result is None:
        return CopyOutcome(row, not_sent=True)
    if isinstance(result, s3.S3OperationError):
        if guarded and result.kind is s3.ErrorKind.SOURCE_CHANGED:
            return _precondition_failed(ctx, row, result)
        return _copy_failed(ctx, row, result)
    return _verify(ctx, row, result, heads)


def _item(row: ObjectRow) -> CopyItem:
    return CopyItem(row.source_key, row.dest_key, row.etag, row.storage_class)


def _is_large(cfg: Config, row: ObjectRow) -> bool:
    """Copied in parts: above ``multipart_threshold`` (at most 5 GiB, CopyObject's limit)."""
    return row.size > cfg.multipart_threshold


def _copy(ctx: ChunkContext, row: ObjectRow, *, if_absent: bool) -> str | s3.MultipartCopy:
    src, dst = ctx.cfg.source, ctx.cfg.destination
    if not _is_large(ctx.cfg, row):
        return ctx.dest.copy(
            src.bucket, _item(row), dst.bucket, if_absent=if_absent, attrs=ctx.attrs
        )
    result = _copy_large(ctx, row, if_absent=if_absent, stop=None)
    if result is None:  # without a stop flag, only a lost lease leaves the upload uncompleted
        raise s3.S3OperationError(s3.ErrorKind.RETRYABLE, "LeaseLost", "row taken over")
    if isinstance(result, s3.S3OperationError):
        raise result
    return result


def _copy_large(
    ctx: ChunkContext, row: ObjectRow, *, if_absent: bool, stop: Any
) -> s3.MultipartCopy | s3.S3OperationError | None:
    """A multipart copy of the row. The ETag the object will have is recorded as the row's
    ``dest_etag`` before the upload is completed: after a kill between completion and
    ``record_copied``, the re-run then knows the object at the destination as this job's
    (copied again, not a conflict). A lost lease leaves the upload uncompleted."""
    src, dst = ctx.cfg.source, ctx.cfg.destination
    return ctx.dest.copy_multipart(
        src.bucket,
        row.source_key,
        dst.bucket,
        row.dest_key,
        row.etag,
        row.size,
        ctx.cfg.transfer_part_size,
        if_absent=if_absent,
        stop=stop,
        before_complete=lambda etag: ctx.ledger.record_dest_etag(ctx.owner, row.id, etag),
        attrs=ctx.attrs,
    )


def _precondition_failed(
    ctx: ChunkContext, row: ObjectRow, err: s3.S3OperationError
) -> CopyOutcome:
    """412 on a guarded copy: either the destination key is taken or the source changed.

    The destination decides: absent → the source changed; the planned object → already
    copied (re-runs cost no copy); an object this job wrote before (a source that changed
    since) → overwrite it; anything else is a conflict, handled per ``on_conflict``. The
    planned object is known by its ETag, or — where ETags cannot be compared (SSE-KMS on
    either side) — by its size and checksum: a copy recorded nowhere because its worker was
    killed right after it is found so.
    """
    try:
        found = ctx.dest.head(ctx.cfg.destination.bucket, row.dest_key)
        if found is None:
            return _copy_failed(ctx, row, err)
        if found.size == row.size and found.etag == row.etag:
            return CopyOutcome(row, dest_etag=found.etag)
        if row.dest_etag is not None and found.etag == row.dest_etag:
            return _verify(ctx, row, _copy(ctx, row, if_absent=False))
        undecided = ""
        if found.size == row.size:
            src, dst = _content_heads(ctx, row)
            if isinstance(src, s3.S3OperationError) and src.kind is s3.ErrorKind.SOURCE_CHANGED:
                return _copy_failed(ctx, row, src)
            for head in (src, dst):
                if isinstance(head, s3.S3OperationError):
                    raise head
            same = same_content(src, dst) if src is not None and dst is not None else False
            if same is True:
                assert dst is not None
                return CopyOutcome(row, dest_etag=dst.etag)
            if same is None:
                undecided = (
                    " that cannot be told from the planned one: its ETag says nothing "
                    "(SSE-KMS) and the two objects carry no checksum to compare"
                )
    except s3.S3OperationError as again:
        return _copy_failed(ctx, row, again)
    what = "an object" if undecided else "a different object"
    message = (
        f"conflict: destination key already holds {what} ({found.size} bytes, "
        f"ETag {found.etag}){undecided or ' not written by this job'}; set on_conflict: "
        "overwrite or skip"
    )
    if ctx.cfg.on_conflict == "skip":
        return CopyOutcome(
            row, error=message.replace("conflict", "skipped", 1), conflict_skipped=True
        )
    return CopyOutcome(row, error=message, permanent=True)


def _content_heads(ctx: ChunkContext, row: ObjectRow) -> Heads:
    """``HeadObject`` with checksums of the planned source version (``If-Match``) and of the
    destination, for judging by content what ETags cannot tell."""
    src, dst = ctx.cfg.source, ctx.cfg.destination
    [source] = ctx.source.head_many([(src.bucket, row.source_key, row.etag)])
    [dest] = ctx.dest.head_many([(dst.bucket, row.dest_key, None)])
    return source, dest


def _copy_failed(ctx: ChunkContext, row: ObjectRow, err: s3.S3OperationError) -> CopyOutcome:
    src, dst = ctx.cfg.source, ctx.cfg.destination
    try:
        if err.kind is s3.ErrorKind.SOURCE_MISSING:
            # A destination that already holds the planned object counts as copied.
            found = ctx.dest.head(dst.bucket, row.dest_key)
            if found is not None and _same_object(row, found):
                return CopyOutcome(row, dest_etag=found.etag)
            return CopyOutcome(
                row,
                error="source object no longer exists (NoSuchKey); app rows left untouched",
                permanent=True,
            )
        if err.kind is s3.ErrorKind.SOURCE_CHANGED:
            now = ctx.source.head(src.bucket, row.source_key)
            if now is None:
                return CopyOutcome(
                    row, error="source object no longer exists (deleted after plan)", permanent=True
                )
            return CopyOutcome(row, replan=now)
    except s3.S3OperationError as head_err:
        return CopyOutcome(row, error=str(head_err))
    return CopyOutcome(row, error=str(err), permanent=err.kind is s3.ErrorKind.PERMANENT)


def _same_object(row: ObjectRow, found: s3.Head) -> bool:
    return found.size == row.size and found.etag in {row.etag, row.dest_etag}


def _needs_content_check(row: ObjectRow, result: CopyResult) -> bool:
    """A single copy whose ETag differs from the planned single-part ETag: either side may
    be encrypted so that its ETag is no MD5 (SSE-KMS), which only the objects can tell."""
    return isinstance(result, str) and "-" not in row.etag and result != row.etag


def _verify(
    ctx: ChunkContext,
    row: ObjectRow,
    dest_etag: str | s3.MultipartCopy,
    heads: Heads | None = None,
) -> CopyOutcome:
    """Single-part ETags are MD5s: equal ETags mean equal bytes and size. A multipart source's
    ETag cannot match a copy's, so its size is checked on the destination instead. ETags that
    differ are judged by the objects themselves (:func:`_verify_content`)."""
    if isinstance(dest_etag, s3.MultipartCopy):
        return _verify_multipart(ctx, row, dest_etag)
    if "-" not in row.etag:
        if dest_etag == row.etag:
            return CopyOutcome(row, dest_etag=dest_etag)
        return _verify_content(ctx, row, dest_etag, heads or _content_heads(ctx, row))
    try:
        found = ctx.dest.head(ctx.cfg.destination.bucket, row.dest_key)
    except s3.S3OperationError as err:
        return CopyOutcome(row, error=f"verify: {err}")
    if found is None or found.size != row.size:
        got = "missing" if found is None else f"{found.size} bytes"
        return CopyOutcome(row, error=f"verify: destination is {got}, expected {row.size} bytes")
    return CopyOutcome(row, dest_etag=found.etag)


def _verify_content(ctx: ChunkContext, row: ObjectRow, copied: str, heads: Heads) -> CopyOutcome:
    """A copy whose ETag is not the planned one. Accepted only if an encryption explains it
    (either object's ETag is no MD5: SSE-KMS, DSSE-KMS), the destination has the planned
    size, and — where both carry a full-object checksum of one algorithm, which S3 computes
    over the source's bytes as it copies them — the checksums are equal. The copy itself read
    exactly the planned version (``CopySourceIfMatch``). A source changed since the copy is
    judged by the destination's size alone; the next plan finds its new version."""
    source, dest = heads
    for head in heads:
        if isinstance(head, s3.S3OperationError) and not (
            head is source and head.kind is s3.ErrorKind.SOURCE_CHANGED
        ):
            return CopyOutcome(row, error=f"verify: {head}")
    if not isinstance(dest, s3.Head) or dest.size != row.size:
        got = "missing" if not isinstance(dest, s3.Head) else f"{dest.size} bytes"
        return CopyOutcome(row, error=f"verify: destination is {got}, expected {row.size} bytes")
    if isinstance(source, s3.Head):
        if source.md5_etag and dest.md5_etag:
            return CopyOutcome(
                row, error=f"verify: destination ETag {copied} differs from source {row.etag}"
            )
        if same_content(source, dest) is False:
            assert source.checksum is not None and dest.checksum is not None
            return CopyOutcome(
                row,
                error=f"verify: destination {dest.checksum.algorithm} checksum "
                f"{dest.checksum.value} differs from source {source.checksum.value}",
            )
    return CopyOutcome(row, dest_etag=dest.etag)


def _verify_multipart(ctx: ChunkContext, row: ObjectRow, copied: s3.MultipartCopy) -> CopyOutcome:
    """A copy made of parts: its ETag must be the one its parts imply (MD5 of the part MD5s,
    ``-N``), which proves the object is exactly the parts copied, each from the planned
    version (``CopySourceIfMatch``); and ``HeadObject`` must show that ETag and the planned
    size, which proves the parts cover the whole source and nothing replaced the object since.
    An object S3 encrypted with SSE-KMS may get an ETag of its own: then the ETag S3 answered
    and the planned size are what ``HeadObject`` must show.
    """
    if copied.etag != copied.expected_etag and copied.sse not in OPAQUE_ETAG_SSE:
        return CopyOutcome(
            row,
            error=f"verify: completed ETag {copied.etag} is not the ETag of the copied parts "
            f"({copied.expected_etag})",
        )
    try:
        found = ctx.dest.head(ctx.cfg.destination.bucket, row.dest_key)
    except s3.S3OperationError as err:
        return CopyOutcome(row, error=f"verify: {err}")
    if found is None or found.size != row.size or found.etag != copied.etag:
        got = "missing" if found is None else f"{found.size} bytes, ETag {found.etag}"
        return CopyOutcome(
            row,
            error=f"verify: destination is {got}, expected {row.size} bytes, ETag {copied.etag}",
        )
    return CopyOutcome(row, dest_etag=copied.etag)


def _copy_current(ctx: ChunkContext, rows: Sequence[ObjectRow]) -> list[CopyOutcome]:
    """Copies of each row's current source object (the planned version, ``If-Match``), the
    small ones in parallel, then the large ones one at a time, their parts in parallel."""
    small = [r for r in rows if not _is_large(ctx.cfg, r)]
    large = [r for r in rows if _is_large(ctx.cfg, r)]
    guarded = ctx.cfg.on_conflict != "overwrite"
    results: list[CopyResult] = list(
        ctx.dest.copy_many(
            ctx.cfg.source.bucket,
            ctx.cfg.destination.bucket,
            [_item(r) for r in small],
            if_absent=guarded,
            stop=ctx.stop,
            attrs=ctx.attrs,
        )
    )
    # One large object at a time, its parts in parallel (``concurrency`` at most).
    results += [_copy_large(ctx, r, if_absent=guarded, stop=ctx.stop) for r in large]
    pending = small + large
    heads = _heads_for_content_checks(ctx, pending, results)
    return [
        _outcome(ctx, r, res, guarded, heads.get(r.id))
        for r, res in zip(pending, results, strict=True)
    ]


def _copy_every_version(ctx: ChunkContext, rows: Sequence[ObjectRow]) -> list[CopyOutcome]:
    """``versions: all``: each key's versions copied oldest first (:func:`_copy_versions`),
    the keys of the chunk in parallel (``concurrency`` at a time)."""
    recorded = ctx.ledger.versions_of([r.source_key for r in rows])
    return ctx.dest.map(lambda r: _copy_versions(ctx, r, recorded.get(r.source_key, [])), rows)


def _copy_versions(ctx: ChunkContext, row: ObjectRow, versions: list[VersionRow]) -> CopyOutcome:
    """Copy the key's versions not copied yet, in order, each from its version id, so the
    destination key gets them as new versions in the source's order and its current version
    is the source's. Each copy is verified and its destination version id recorded before
    the next version is copied; the row counts as copied once the last one is.

    Before each copy the destination's current version is read: a version this job did not
    record (a copy made by a run killed before recording it) with the version's size and
    ETag — or, where ETags differ by design, its checksum — is taken as that copy, not made
    twice; any other unrecorded object there is a
    conflict, as for a single copy (``on_conflict``)."""
    if not versions:
        return CopyOutcome(
            row,
            error="no versions recorded for this key (planned before versions: all was set); "
            "run `migrator plan` again",
            permanent=True,
        )
    dst = ctx.cfg.destination.bucket
    ours = {v.dest_version_id for v in versions if v.dest_version_id is not None}
    last = next((v.dest_etag for v in reversed(versions) if v.dest_version_id), None)
    for v in versions:
        if v.dest_version_id is not None:
            continue
        if ctx.stop.is_set():
            return CopyOutcome(row, not_sent=True)
        try:
            found = ctx.dest.head(dst, row.dest_key)
            if found is not None and found.version_id not in ours:
                if found.size == v.size and (
                    found.etag in (v.etag, v.dest_etag) or _same_version(ctx, row, v, found)
                ):
                    copied: tuple[str, str | None] | CopyOutcome = (found.etag, found.version_id)
                elif ctx.cfg.on_conflict == "overwrite":
                    copied = _copy_version(ctx, row, v)
                else:
                    message = (
                        f"conflict: destination key already holds an object ({found.size} "
                        f"bytes, ETag {found.etag}, version {found.version_id}) not written "
                        "by this job; set on_conflict: overwrite or skip"
                    )
                    if ctx.cfg.on_conflict == "skip" and not ours:
                        return CopyOutcome(
                            row,
                            error=message.replace("conflict", "skipped", 1),
                            conflict_skipped=True,
                        )
                    return CopyOutcome(row, error=message, permanent=True)
            else:
                copied = _copy_version(ctx, row, v)
        except s3.S3OperationError as err:
            return _version_failed(row, v, err)
        if isinstance(copied, CopyOutcome):
            return copied
        etag, dest_version = copied
        if dest_version is None or dest_version == "null":
            return CopyOutcome(
                row,
                error=f"destination bucket {dst} keeps no versions: versions: all needs "
                "versioning enabled there (put-bucket-versioning Status=Enabled), or every "
                "copy would replace the last",
                permanent=True,
            )
        if not ctx.ledger.record_version(ctx.owner, row.id, v, etag, dest_version):
            return CopyOutcome(row, error="lease lost; another worker has the row")
        ours.add(dest_version)
        last = etag
    return CopyOutcome(row, dest_etag=last)


def _same_version(ctx: ChunkContext, row: ObjectRow, v: VersionRow, found: s3.Head) -> bool:
    """Whether the destination's current object holds the bytes of source version ``v``
    although their ETags differ (a version uploaded in parts, copied in one request; an
    encrypted one): by full-object checksums of one algorithm, which S3 keeps on copies.
    False when the objects cannot tell."""
    src, dst = ctx.cfg.source.bucket, ctx.cfg.destination.bucket
    source = ctx.source.head(src, row.source_key, checksum=True, version_id=v.version_id)
    dest = ctx.dest.head(dst, row.dest_key, checksum=True, version_id=found.version_id)
    return source is not None and dest is not None and same_content(source, dest) is True


def _copy_version(
    ctx: ChunkContext, row: ObjectRow, v: VersionRow
) -> tuple[str, str | None] | CopyOutcome:
    """One version's copy, verified: its ETag and destination version id, or the outcome
    that ends the row's copy for now. A single copy is verified by its ETag (the version's
    MD5). Otherwise (a copy in parts, a version uploaded in parts, an encryption whose ETags
    are no MD5s) ``HeadObject`` of the new version must show the size listed and the ETag S3
    answered, and — as for current versions — two MD5 ETags must be equal and two full-object
    checksums of one algorithm must be equal."""
    src, dst = ctx.cfg.source.bucket, ctx.cfg.destination.bucket
    if v.size <= ctx.cfg.multipart_threshold:
        etag, dest_version = s3.copy_version(
            ctx.dest.boto,
            src,
            row.source_key,
            v.version_id,
            dst,
            row.dest_key,
            attrs=ctx.attrs,
            storage_class=v.storage_class,
        )
        if etag == v.etag and "-" not in v.etag:
            return etag, dest_version
    else:
        result = ctx.dest.copy_multipart(
            src,
            row.source_key,
            dst,
            row.dest_key,
            v.etag,
            v.size,
            ctx.cfg.transfer_part_size,
            if_absent=False,
            stop=ctx.stop,
            before_complete=lambda e: ctx.ledger.record_version(ctx.owner, row.id, v, e, None),
            attrs=ctx.attrs,
            version_id=v.version_id,
        )
        if result is None:
            return CopyOutcome(row, not_sent=True)
        if isinstance(result, s3.S3OperationError):
            raise result
        if result.etag != result.expected_etag and result.sse not in OPAQUE_ETAG_SSE:
            return CopyOutcome(
                row,
                error=f"verify: version {v.version_id}: completed ETag {result.etag} is not "
                f"the ETag of the copied parts ({result.expected_etag})",
            )
        etag, dest_version = result.etag, result.version_id
    if dest_version is None:
        return etag, dest_version  # the caller refuses a destination without versions
    found = ctx.dest.head(dst, row.dest_key, checksum=True, version_id=dest_version)
    what = f"verify: version {v.version_id}: destination"
    if found is None or found.size != v.size or found.etag != etag:
        got = "missing" if found is None else f"{found.size} bytes, ETag {found.etag}"
        return CopyOutcome(row, error=f"{what} is {got}, expected {v.size} bytes, ETag {etag}")
    source = ctx.source.head(src, row.source_key, checksum=True, version_id=v.version_id)
    if source is not None and source.md5_etag and found.md5_etag:
        return CopyOutcome(row, error=f"{what} ETag {etag} differs from the version's {v.etag}")
    if source is not None and same_content(source, found) is False:
        assert source.checksum is not None and found.checksum is not None
        return CopyOutcome(
            row,
            error=f"{what} {found.checksum.algorithm} checksum {found.checksum.value} differs "
            f"from the version's {source.checksum.value}",
        )
    return etag, dest_version


def _version_failed(row: ObjectRow, v: VersionRow, err: s3.S3OperationError) -> CopyOutcome:
    if err.kind is s3.ErrorKind.SOURCE_MISSING:
        return CopyOutcome(
            row,
            error=f"source version {v.version_id} no longer exists ({err.code}); app rows "
            "left untouched",
            permanent=True,
        )
    return CopyOutcome(
        row,
        error=f"version {v.version_id}: {err}",
        permanent=err.kind is s3.ErrorKind.PERMANENT,
    )


def copy_stage(ctx: ChunkContext, rows: Sequence[ObjectRow]) -> list[ObjectRow]:
    """Copy the chunk's pending rows in parallel; return the rows now verified at the
    destination (with those that already were)."""
    ready = [r for r in rows if r.state is State.COPIED]
    pending = [r for r in rows if r.state is State.PENDING]
    if ctx.cfg.versions == "all":
        outcomes = _copy_every_version(ctx, pending)
    else:
        outcomes = _copy_current(ctx, pending)
    copied = [o for o in outcomes if o.dest_etag is not None]
    # Without an app database there is nothing to rewrite: the copy is recorded as the
    # state after the rewrite in the same statement.
    state = State.COPIED if ctx.appdb is not None else after_rewrite(ctx.cfg)
    held = ctx.ledger.record_copied(
        ctx.owner,
        [(o.row.id, o.dest_etag or "") for o in copied],
        state,
        release=releases_at(ctx.cfg, state),  # never for copied: the rewrite follows
    )
    _announce("copied", "copied", [o.row for o in copied if o.row.id in held])
    for o in outcomes:
        if o.replan is not None:
            event(
                log,
                logging.INFO,
                "replanned",
                f"source changed after plan, copied again next: {o.row.source_key}",
                key=o.row.source_key,
                etag=o.replan.etag,
            )
            ctx.ledger.replan_row(
                ctx.owner,
                o.row,
                o.replan.etag,
                o.replan.size,
                "source changed after plan (ETag differs); re-planned with the new version",
                ctx.cfg.max_attempts,
                storage_class=o.replan.storage_class,
            )
            if ctx.cfg.lists_versions and o.replan.version_id is not None:
                # delete_versions deletes the version copied: the new one, once it is.
                new = NewVersion(
                    o.replan.version_id, o.replan.size, o.replan.etag, None, o.replan.storage_class
                )
                ctx.ledger.add_versions({o.row.source_key: [new]})
    failed = [o for o in outcomes if o.error and not o.conflict_skipped]
    _record_errors(ctx, [o for o in failed if not o.permanent], Stage.COPY)
    _record_errors(ctx, [o for o in failed if o.permanent], Stage.COPY, True)
    skipped = [(o.row.id, o.error or "") for o in outcomes if o.conflict_skipped]
    ctx.ledger.record_skipped(ctx.owner, skipped)
    _announce("skipped", "skipped", [o.row for o in outcomes if o.conflict_skipped])
    not_sent = [o.row.id for o in outcomes if o.not_sent]
    if not_sent:
        ctx.ledger.release(ctx.owner, not_sent)
    return ready + [
        dataclasses.replace(o.row, state=state, dest_etag=o.dest_etag)
        for o in copied
        if o.row.id in held  # a row whose lease was lost goes no further here
    ]


def _heads_for_content_checks(
    ctx: ChunkContext, rows: Sequence[ObjectRow], results: Sequence[CopyResult]
) -> dict[int, Heads]:
    """The heads :func:`_verify_content` needs for the copies whose ETags differ, fetched
    in parallel: where every copy is SSE-KMS, that is two ``HeadObject`` per object, sent
    ``concurrency`` at a time like the copies."""
    todo = [r for r, res in zip(rows, results, strict=True) if _needs_content_check(r, res)]
    if not todo:
        return {}
    src, dst = ctx.cfg.source, ctx.cfg.destination
    sources = ctx.source.head_many([(src.bucket, r.source_key, r.etag) for r in todo])
    dests = ctx.dest.head_many([(dst.bucket, r.dest_key, None) for r in todo])
    return {r.id: (s, d) for r, s, d in zip(todo, sources, dests, strict=True)}


def after_rewrite(cfg: Config) -> State:
    """A row's state once its app rows point at the destination."""
    return State.DONE if cfg.delete_source == "never" else State.REWRITTEN


def releases_at(cfg: Config, state: State) -> bool:
    """Whether a row recorded in ``state`` leaves this worker's hands with that record (the
    lease is given back in the same statement): done rows, and rewritten rows whose delete
    waits for the end of the job (``after_all``); under ``per_chunk`` the delete follows."""
    return state is State.DONE or (state is State.REWRITTEN and cfg.delete_source == "after_all")


def _record_errors(
    ctx: ChunkContext, failed: Sequence[CopyOutcome], stage: Stage, permanent: bool = False
) -> None:
    _record_failures(ctx, [(o.row, redact(o.error or "")) for o in failed], stage, permanent)


def _app_db_failed(ctx: ChunkContext, rows: Sequence[ObjectRow], stage: Stage, reason: str) -> None:
    """The app database failed the whole chunk: one attempt for each of its rows."""
    _record_failures(ctx, [(r, reason) for r in rows], stage)


def _record_failures(
    ctx: ChunkContext,
    failures: Sequence[tuple[ObjectRow, str]],
    stage: Stage,
    permanent: bool = False,
) -> None:
    """Count an attempt for each row (the ledger fails those out of attempts) and log it: a
    ``retry`` event, or a ``failed`` warning for a row that will not be tried again."""
    ctx.ledger.record_failures(
        ctx.owner, failures, stage, ctx.cfg.max_attempts, permanent=permanent
    )
    for row, error in failures:
        final = permanent or row.attempts + 1 >= ctx.cfg.max_attempts
        event(
            log,
            logging.WARNING if final else logging.INFO,
            "failed" if final else "retry",
            f"{stage.value} {'failed' if final else 'will be retried'}: {row.source_key}: {error}",
            key=row.source_key,
            stage=stage.value,
            attempts=row.attempts + 1,
            error=error,
        )


def _announce(name: str, verb: str, rows: Iterable[ObjectRow]) -> None:
    """One ``name`` event per row that moved on (logged at INFO: ``-v`` or JSON logs)."""
    if not log.isEnabledFor(logging.INFO):
        return
    for r in rows:
        event(
            log,
            logging.INFO,
            name,
            f"{verb} {r.source_key} -> {r.dest_key}",
            key=r.source_key,
            dest_key=r.dest_key,
            size=r.size,
        )


def rewrite_stage(ctx: ChunkContext, rows: Sequence[ObjectRow]) -> list[ObjectRow]:
    """Point the app rows of every copied row at its destination key, in one transaction;
    returns the rows now past the rewrite (with those that already were)."""
    final = after_rewrite(ctx.cfg)
    passed = [r for r in rows if r.state is final]
    copied = [r for r in rows if r.state is State.COPIED]
    if not copied:
        return passed
    if ctx.appdb is not None:
        try:
            ctx.appdb.rewrite([(r.source_key, r.dest_key) for r in copied])
        except SQLAlchemyError as exc:
            _app_db_failed(ctx, copied, Stage.REWRITE, f"rewrite: {db_reason(exc)}")
            return passed
    held = ctx.ledger.record_state(
        ctx.owner, [r.id for r in copied], final, release=releases_at(ctx.cfg, final)
    )
    _announce("rewritten", "rewrote app rows of", [r for r in copied if r.id in held])
    return passed + [dataclasses.replace(r, state=final) for r in copied if r.id in held]


def delete_stage(ctx: ChunkContext, rows: Sequence[ObjectRow]) -> list[ObjectRow]:
    """Delete the sources of rewritten rows, ≤ 1,000 per request, after re-checking I1."""
    todo = [r for r in rows if r.state is State.REWRITTEN]
    held = ctx.ledger.held_in_state(ctx.owner, [r.id for r in todo], State.REWRITTEN)
    todo = [r for r in todo if r.id in held]  # lost leases or re-planned rows are not ours
    if not todo:
        return []
    if ctx.appdb is not None:
        try:
            todo = _recheck_app_rows(ctx, todo)
        except SQLAlchemyError as exc:
            _app_db_failed(ctx, todo, Stage.DELETE, f"delete guard: {db_reason(exc)}")
            return []
    if ctx.budget is not None:
        todo = todo[: ctx.budget.take(len(todo))]  # the rest stay rewritten for a later run
    done: list[ObjectRow] = []
    failures: list[tuple[ObjectRow, str]] = []
    if ctx.cfg.delete_versions:
        done, failures = _delete_version_ids(ctx, todo)
    else:
        for batch in keys.batched(todo, s3.DELETE_BATCH):
            errors = ctx.source.delete(ctx.cfg.source.bucket, [r.source_key for r in batch])
            for r in batch:
                if r.source_key in errors:
                    failures.append((r, redact(f"delete: {errors[r.source_key]}")))
                else:
                    done.append(r)
    recorded = ctx.ledger.record_state(ctx.owner, [r.id for r in done], State.DONE, release=True)
    _announce("deleted", "deleted the source of", [r for r in done if r.id in recorded])
    _record_failures(ctx, failures, Stage.DELETE)
    return [dataclasses.replace(r, state=State.DONE) for r in done]


def migrated_versions(cfg: Config, row: ObjectRow, recorded: Sequence[VersionRow]) -> list[str]:
    """The source version ids of ``row`` that ``delete_versions`` removes: under
    ``versions: all`` every version whose copy is recorded; under ``latest`` the versions
    recorded with the ETag that was copied (the same bytes as the destination's)."""
    if cfg.versions == "all":
        return [v.version_id for v in recorded if v.dest_version_id is not None]
    return [v.version_id for v in recorded if v.etag == row.etag]


def _delete_version_ids(
    ctx: ChunkContext, rows: Sequence[ObjectRow]
) -> tuple[list[ObjectRow], list[tuple[ObjectRow, str]]]:
    """``delete_versions: true``: the migrated versions of each row's key are removed for
    good (``DeleteObjects`` with version ids, ≤ 1,000 per request), leaving no delete
    marker; versions that were not migrated stay. A row whose versions are not recorded
    (planned before ``delete_versions`` was set) is not deleted: its attempt says why."""
    recorded = ctx.ledger.versions_of([r.source_key for r in rows])
    failures: list[tuple[ObjectRow, str]] = []
    wanted: dict[int, list[tuple[str, str]]] = {}
    for r in rows:
        ids = migrated_versions(ctx.cfg, r, recorded.get(r.source_key, []))
        if ids:
            wanted[r.id] = [(r.source_key, v) for v in ids]
        else:
            failures.append(
                (
                    r,
                    "delete: no migrated version id recorded (planned before delete_versions "
                    "was set); run `migrator plan` again",
                )
            )
    pairs = [p for ps in wanted.values() for p in ps]
    errors: dict[tuple[str, str], str] = {}
    for batch in keys.batched(pairs, s3.DELETE_BATCH):
        errors.update(s3.delete_versions(ctx.source.boto, ctx.cfg.source.bucket, batch))
    done: list[ObjectRow] = []
    for r in rows:
        if r.id not in wanted:
            continue
        failed = [errors[p] for p in wanted[r.id] if p in errors]
        if failed:
            failures.append((r, redact(f"delete: {failed[0]}")))
        else:
            done.append(r)
    return done, failures


def _recheck_app_rows(ctx: ChunkContext, rows: list[ObjectRow]) -> list[ObjectRow]:
    """I1's last line of defence: rows written with an old value since the rewrite (an app
    still writing old paths) are rewritten again before their source may go; a source whose
    rows still point at it after that (the rewrite missed them) is not deleted, and its row
    gets a failed attempt. Returns the rows whose sources may be deleted."""
    assert ctx.appdb is not None
    pairs = [(r.source_key, r.dest_key) for r in rows]
    left = set(ctx.appdb.still_pointing(pairs))
    if not left:
        return rows
    ctx.appdb.rewrite([p for p in pairs if p[0] in left])
    stuck = set(ctx.appdb.still_pointing([p for p in pairs if p[0] in left]))
    if stuck:
        _app_db_failed(
            ctx,
            [r for r in rows if r.source_key in stuck],
            Stage.DELETE,
            "delete guard: app rows still point at the source after a rewrite",
        )
    return [r for r in rows if r.source_key not in stuck]
