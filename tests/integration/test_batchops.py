"""S3 Batch Operations hand-off: ``export-manifest`` writes the pending rows as a manifest,
the test plays AWS (copies what the manifest lists, writes a completion report as Batch
Operations lays it out), ``import-report`` records it, and ``migrator run`` finishes the job."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
import sqlalchemy as sa

from migrator.batchops import read_tasks
from migrator.ledger.repo import Ledger, open_ledger
from migrator.ledger.tables import State
from tests.conftest import unique
from tests.helpers import Job, assert_converged, invariant_violations, run_cli, sqlite_job

HOSTILE_KEYS = [
    "image/plain.png",
    "image/with space.png",
    "image/comma,in,name.png",
    'image/quote"d.png',
    "image/plus+sign.png",
    "image/percent%41.png",
    "image/ünïcødé/ß.png",
    "image/deep/a/b/c.png",
    "image/semi;colon&amp=1?.png",
]


def export(job: Job, out: Path) -> tuple[list[list[str]], str]:
    result = run_cli("export-manifest", "--config", str(job.config_path), "--out", str(out))
    assert result.returncode == 0, result.stderr
    rows = list(csv.reader(io.StringIO(out.read_text(encoding="utf-8"))))
    return rows, result.stdout + result.stderr


def write_report(
    directory: Path,
    tasks: Sequence[tuple[str, str, str, str]],
    *,
    report_format: str = "Report_CSV_20180820",
) -> Path:
    """A completion report laid out as Batch Operations writes it: manifest.json naming one
    result file per task status under ``results/``. ``tasks``: (bucket, key as it appeared in
    the manifest, status, error code). The HTTP status comes before the error code, as in
    AWS's own examples."""
    results = directory / "results"
    results.mkdir(parents=True)
    entries = []
    for status in ("succeeded", "failed"):
        lines = io.StringIO()
        writer = csv.writer(lines, lineterminator="\n")
        for bucket, key, st, code in tasks:
            if st != status:
                continue
            http = "200" if st == "succeeded" else "403"
            message = "Successful" if st == "succeeded" else f"{code}: denied, by policy"
            writer.writerow([bucket, key, "", st, http, code, message])
        data = lines.getvalue().encode()
        if not data:
            continue
        name = hashlib.sha1(data).hexdigest() + ".csv"
        (results / name).write_bytes(data)
        entries.append(
            {
                "TaskExecutionStatus": status,
                "Bucket": "ops-reports",
                "MD5Checksum": hashlib.md5(data).hexdigest(),
                "Key": f"job-3d1f0c1e/results/{name}",
            }
        )
    (directory / "manifest.json").write_text(
        json.dumps(
            {
                "Format": report_format,
                "ReportCreationDate": "2026-12-05T10:00:00.000Z",
                "Results": entries,
                "ReportSchema": "Bucket, Key, VersionId, TaskStatus, ErrorCode, HTTPStatusCode, "
                "ResultMessage",
            }
        )
    )
    return directory


def states(job: Job) -> dict[str, tuple[str, str | None]]:
    engine = sa.create_engine(job.cfg.ledger)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text("SELECT source_key, state, last_error FROM migrator_objects")
            ).all()
    finally:
        engine.dispose()
    return {r[0]: (r[1], r[2]) for r in rows}


@pytest.fixture
def job(tmp_path: Path, moto_s3: Any, moto_endpoint: str) -> Job:
    job = sqlite_job(
        tmp_path, moto_s3, moto_endpoint, with_app=True, keys=HOSTILE_KEYS, chunk_size=4
    )
    assert run_cli("plan", "--config", str(job.config_path)).returncode == 0
    return job


def test_batch_operations_hand_off_end_to_end(job: Job, tmp_path: Path) -> None:
    lines, said = export(job, tmp_path / "manifest.csv")
    src, dst = job.cfg.source, job.cfg.destination
    # every line two fields, the source bucket and a URL-encoded key that decodes to a key
    assert {len(line) for line in lines} == {2}
    assert {line[0] for line in lines} == {src.bucket}
    assert sorted(unquote(line[1]) for line in lines) == sorted(HOSTILE_KEYS)
    assert all("," not in k and "\n" not in k and "+" not in k for _, k in lines)
    # image/ → avatar/ is not a prefix added to the source key: Batch Operations' own copy
    # cannot do it, and the command says so
    assert "TargetKeyPrefix" in said and "Lambda" in said
    # AWS copies: a Lambda that maps keys as the job does. One copy goes wrong (other
    # bytes at the destination), two tasks fail (the report says why).
    failed = {"image/plus+sign.png": "AccessDenied", "image/with space.png": "SlowDown"}
    wrong = "image/deep/a/b/c.png"
    tasks = []
    for bucket, encoded in lines:
        key = unquote(encoded)
        if key in failed:
            tasks.append((bucket, encoded, "failed", failed[key]))
            continue
        if key == wrong:
            job.s3.put_object(Bucket=dst.bucket, Key=job.dest_key(key), Body=b"not the source")
        else:
            job.s3.copy_object(
                Bucket=dst.bucket,
                Key=job.dest_key(key),
                CopySource={"Bucket": bucket, "Key": key},
            )
        tasks.append((bucket, encoded, "succeeded", ""))
    report = write_report(tmp_path / "report", tasks)

    result = run_cli("import-report", "--config", str(job.config_path), str(report))
    assert result.returncode == 0, result.stderr
    assert "6 copied, 2 failed, 1 not as planned" in result.stdout
    got = states(job)
    for key in HOSTILE_KEYS:
        state, error = got[key]
        if key in failed:
            assert state == "failed"
            assert error is not None and failed[key] in error and "HTTP 403" in error
        elif key == wrong:
            assert state == "pending" and error is not None and "ETag" in error
        else:
            assert (state, error) == ("copied", None)
    assert invariant_violations(job) == []  # nothing deleted, nothing rewritten yet

    # migrator run copies the mismatched one itself, rewrites and deletes what is verified;
    # the failed tasks keep the after_all gate shut until they are retried
    first = run_cli("run", "--quiet", "--config", str(job.config_path))
    assert first.returncode == 1, first.stderr
    assert "2 objects failed" in first.stderr
    assert invariant_violations(job) == []
    assert run_cli("retry-failed", "--config", str(job.config_path)).returncode == 0
    second = run_cli("run", "--quiet", "--config", str(job.config_path))
    assert second.returncode == 0, second.stderr
    assert_converged(job)
    assert run_cli("verify", "--config", str(job.config_path)).returncode == 0

    # a report imported again changes nothing: every row is past pending now
    again = run_cli("import-report", "--config", str(job.config_path), str(report))
    assert again.returncode == 0, again.stderr
    assert "0 copied, 0 failed, 0 not as planned" in again.stdout
    assert f"{len(HOSTILE_KEYS)} already past pending" in again.stdout


def test_manifest_names_the_target_prefix_when_it_expresses_the_rule(
    tmp_path: Path, moto_s3: Any, moto_endpoint: str
) -> None:
    """image/x → copied/image/x: S3PutObjectCopy with TargetKeyPrefix 'copied/' does it.
    Multipart sources stay with migrator (their copies cannot be verified by ETag)."""
    job = sqlite_job(
        tmp_path,
        moto_s3,
        moto_endpoint,
        with_app=False,
        count=5,
        destination={
            "bucket": unique("copies"),
            "prefix": "copied/image/",
            "endpoint_url": moto_endpoint,
        },
    )
    src = job.cfg.source
    upload = moto_s3.create_multipart_upload(Bucket=src.bucket, Key="image/big.bin")
    part = moto_s3.upload_part(
        Bucket=src.bucket,
        Key="image/big.bin",
        UploadId=upload["UploadId"],
        PartNumber=1,
        Body=b"x" * 1024,
    )
    moto_s3.complete_multipart_upload(
        Bucket=src.bucket,
        Key="image/big.bin",
        UploadId=upload["UploadId"],
        MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": part["ETag"]}]},
    )
    assert run_cli("plan", "--config", str(job.config_path)).returncode == 0
    lines, said = export(job, tmp_path / "out" / "manifest.csv")
    assert len(lines) == 5
    assert "image/big.bin" not in {unquote(k) for _, k in lines}
    assert "left out 1 objects with multipart ETags" in said
    assert "TargetKeyPrefix 'copied/'" in said


def test_import_leaves_rows_a_worker_holds(job: Job, tmp_path: Path) -> None:
    lines, _ = export(job, tmp_path / "manifest.csv")
    dst = job.cfg.destination
    for bucket, encoded in lines:
        key = unquote(encoded)
        job.s3.copy_object(
            Bucket=dst.bucket, Key=job.dest_key(key), CopySource={"Bucket": bucket, "Key": key}
        )
    engine = open_ledger(job.cfg.ledger)
    ledger = Ledger(engine, job.cfg.job)
    held = ledger.claim("otherhost:1:0", [State.PENDING], 3, 600)  # a live worker elsewhere
    engine.dispose()
    report = write_report(tmp_path / "r", [(b, k, "succeeded", "") for b, k in lines])
    result = run_cli("import-report", "--config", str(job.config_path), str(report))
    assert result.returncode == 0, result.stderr
    assert f"{len(HOSTILE_KEYS) - 3} copied" in result.stdout and "3 busy" in result.stdout
    got = states(job)
    assert {got[r.source_key][0] for r in held} == {"pending"}


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("bucket", "this job's source is"),
        ("format", "is not a completion report"),
        ("md5", "MD5 differs"),
        ("missing", "is not in"),
        ("columns", "columns"),
        ("nothing", "no manifest.json and no .csv result files"),
    ],
)
def test_a_bad_report_is_one_line_and_changes_nothing(
    job: Job, tmp_path: Path, damage: str, message: str
) -> None:
    lines, _ = export(job, tmp_path / "manifest.csv")
    bucket = "someone-else" if damage == "bucket" else job.cfg.source.bucket
    report = tmp_path / "report"
    if damage == "nothing":
        report.mkdir()
    else:
        tasks = [(bucket, k, "succeeded", "") for _, k in lines]
        fmt = "Report_CSV_20990101" if damage == "format" else "Report_CSV_20180820"
        write_report(report, tasks, report_format=fmt)
        result_file = next((report / "results").glob("*.csv"))
        if damage == "md5":
            result_file.write_text(result_file.read_text() + "\n")
        elif damage == "missing":
            result_file.unlink()
        elif damage == "columns":
            text = "bucket,key,,succeeded\n"
            result_file.write_text(text)
            manifest = json.loads((report / "manifest.json").read_text())
            manifest["Results"][0]["MD5Checksum"] = hashlib.md5(text.encode()).hexdigest()
            (report / "manifest.json").write_text(json.dumps(manifest))
    before = states(job)
    result = run_cli("import-report", "--config", str(job.config_path), str(report))
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert states(job) == before


def test_report_lines_tell_http_status_from_error_code(tmp_path: Path) -> None:
    """AWS's examples put the HTTP status where the schema says ErrorCode; either order reads
    the same, and a message with commas stays whole."""
    path = tmp_path / "r.csv"
    path.write_text(
        'b,image/a%20b.png,,failed,403,AccessDenied,"Access Denied, by policy"\n'
        "b,image/c.png,,failed,SlowDown,503,Please reduce your request rate\n"
        "b,image/d.png,,succeeded,200,,Successful\n"
    )
    tasks = list(read_tasks([path]))
    assert [t.key for t in tasks] == ["image/a b.png", "image/c.png", "image/d.png"]
    assert [t.succeeded for t in tasks] == [False, False, True]
    assert tasks[0].detail == "HTTP 403 AccessDenied Access Denied, by policy"
    assert tasks[1].detail == "HTTP 503 SlowDown Please reduce your request rate"
