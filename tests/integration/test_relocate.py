"""``migrator relocate`` against the moto server: one endpoint serves every region, buckets
are created with a LocationConstraint and GetBucketLocation tells where they are, and bucket
names are global across accounts, as on AWS."""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config as BotoConfig
from rich.console import Console

from migrator.errors import PreflightError, StorageError
from migrator.ledger.repo import Relocation, Relocations, open_ledger
from migrator.ledger.tables import Phase
from migrator.relocate import Options, relocate, relocation_status, verify_copy
from migrator.supervisor import run_job
from tests.helpers import (
    RELOCATE_POLICY,
    RELOCATE_SETTINGS,
    RelocateJob,
    bucket_names,
    bucket_settings,
    object_state,
    region,
    relocate_job,
    relocation_row,
    run_cli,
)

TARGET = "eu-west-1"


def console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=400), out


def run(job: RelocateJob, on_phase: Any = None, **options: Any) -> tuple[int, str]:
    con, out = console()
    opts = Options(TARGET, quiet=True, **options)
    code = relocate(job.cfg(), opts, con, on_phase=on_phase)
    return code, out.getvalue()


def states(job: RelocateJob, bucket: str | None = None) -> dict[str, dict[str, Any]]:
    return {k: object_state(job.s3, bucket or job.bucket, k) for k in job.objects}


def other_account(endpoint: str) -> Any:
    """An S3 client of another AWS account on the same moto server (credentials of a role of
    account 222222222222, which moto attributes to that account)."""
    sts = boto3.client("sts", endpoint_url=endpoint, region_name="us-east-1")
    creds = sts.assume_role(
        RoleArn="arn:aws:iam::222222222222:role/squatter", RoleSessionName="squatter"
    )["Credentials"]
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=TARGET,
        config=BotoConfig(s3={"addressing_style": "path"}),
        aws_access_key_id=creds["AccessKeyId"],
        aws_secret_access_key=creds["SecretAccessKey"],
        aws_session_token=creds["SessionToken"],
    )


def test_relocate_keeps_the_name_objects_and_configuration(
    tmp_path: Path, moto_s3: Any, moto_endpoint: str
) -> None:
    job = relocate_job(tmp_path, moto_s3, moto_endpoint)
    moto_s3.put_bucket_accelerate_configuration(
        Bucket=job.bucket, AccelerateConfiguration={"Status": "Enabled"}
    )
    before = states(job)
    settings = bucket_settings(moto_s3, job.bucket)
    assert all(v is not None for k, v in settings.items() if k != "versioning")
    assert region(moto_s3, job.bucket) == "us-east-1"
    buckets_before = bucket_names(moto_s3)
    phases: list[Phase] = []

    code, out = run(job, on_phase=lambda rel: phases.append(rel.phase))

    assert code == 0, out
    assert phases == [p for p in Phase if p is not Phase.DONE]  # each phase once, in order
    assert region(moto_s3, job.bucket) == TARGET
    assert bucket_names(moto_s3) == buckets_before  # the temporary bucket is gone
    assert states(job) == before  # bytes, headers, metadata, storage class, tags
    assert bucket_settings(moto_s3, job.bucket) == settings
    assert json.loads(moto_s3.get_bucket_policy(Bucket=job.bucket)["Policy"]) == json.loads(
        json.dumps(RELOCATE_POLICY).replace("{bucket}", job.bucket)
    )
    assert "verified 12 objects (size, ETag, attributes)" in out
    assert "warning: not carried over: transfer acceleration; re-create them" in out
    status = relocation_status(job.cfg())
    assert status["phase"] == "done" and status["from_region"] == "us-east-1"
    assert status["copies"]["to_temp"]["counts"]["done"] == 12
    assert status["copies"]["from_temp"]["counts"]["done"] == 12
    assert status["bucket_config"]["tags"] == RELOCATE_SETTINGS["tags"]

    # Done is done: the same command changes nothing and says so.
    code, out = run(job)
    assert code == 0 and "relocated s3://" in out
    assert states(job) == before


def test_a_versioned_bucket_needs_consent_to_lose_its_noncurrent_versions(
    tmp_path: Path, moto_s3: Any, moto_endpoint: str
) -> None:
    job = relocate_job(tmp_path, moto_s3, moto_endpoint, versioned=True, configure=False)
    first = next(iter(job.objects))
    moto_s3.put_object(Bucket=job.bucket, Key=first, Body=b"an older version")  # noncurrent...
    moto_s3.put_object(Bucket=job.bucket, Key=first, Body=job.objects[first])  # ...then current
    moto_s3.put_object(Bucket=job.bucket, Key="deleted.txt", Body=b"gone")
    moto_s3.delete_object(Bucket=job.bucket, Key="deleted.txt")  # a delete marker on top
    before = states(job)

    with pytest.raises(PreflightError, match="holds 3 noncurrent object versions"):
        run(job)
    assert not job.ledger_path.exists()  # refused before anything was written

    code, out = run(job, discard_noncurrent=True)
    assert code == 0, out
    assert region(moto_s3, job.bucket) == TARGET
    assert bucket_settings(moto_s3, job.bucket)["versioning"] == "Enabled"
    assert states(job) == before
    versions = moto_s3.list_object_versions(Bucket=job.bucket)
    # The current version of each object, copied once into the new bucket; nothing else.
    assert sorted(v["Key"] for v in versions.get("Versions", [])) == sorted(job.objects)
    assert all(v["IsLatest"] for v in versions["Versions"])
    assert not versions.get("DeleteMarkers")


def test_the_name_taken_while_free_stops_with_the_data_in_the_temporary_bucket(
    tmp_path: Path, moto_s3: Any, moto_endpoint: str
) -> None:
    job = relocate_job(tmp_path, moto_s3, moto_endpoint, count=6)
    before = states(job)
    squatter = other_account(moto_endpoint)

    def take_the_name(rel: Relocation) -> None:
        if rel.phase is Phase.RECREATE:
            squatter.create_bucket(
                Bucket=job.bucket, CreateBucketConfiguration={"LocationConstraint": TARGET}
            )

    with pytest.raises(StorageError) as stop:
        run(job, on_phase=take_the_name, recreate_timeout=2)
    message = str(stop.value)
    row = relocation_row(job.ledger_path)
    assert row is not None and row["phase"] == "recreate"
    temp = row["temp_bucket"]
    assert "is still not free" in message and "BucketAlreadyExists" in message
    assert f"safe in s3://{temp} ({TARGET})" in message and "roll back" in message
    assert "\n" not in message
    # Every object, with its attributes, waits in the temporary bucket.
    assert states(job, temp) == before
    assert relocation_status(job.cfg())["last_error"] == message

    # Once the name is free again, the same command finishes the relocation.
    squatter.delete_bucket(Bucket=job.bucket)
    code, out = run(job)
    assert code == 0, out
    assert region(moto_s3, job.bucket) == TARGET and states(job) == before
    assert temp not in bucket_names(moto_s3)


def test_a_name_s3_frees_late_is_waited_for(
    tmp_path: Path, moto_s3: Any, moto_endpoint: str
) -> None:
    """The name stays taken for a while after the delete (S3 takes time to free a name):
    relocate tries again with backoff and goes on once it is free."""
    job = relocate_job(tmp_path, moto_s3, moto_endpoint, count=4, configure=False)
    before = states(job)
    holder = other_account(moto_endpoint)
    timers: list[threading.Timer] = []

    def hold_the_name_briefly(rel: Relocation) -> None:
        if rel.phase is Phase.RECREATE:
            holder.create_bucket(
                Bucket=job.bucket, CreateBucketConfiguration={"LocationConstraint": TARGET}
            )
            timers.append(threading.Timer(2.5, holder.delete_bucket, kwargs={"Bucket": job.bucket}))
            timers[-1].start()

    code, out = run(job, on_phase=hold_the_name_briefly, recreate_timeout=60)
    for t in timers:
        t.join()
    assert code == 0, out
    assert "is not free yet (BucketAlreadyExists); trying again" in out
    assert region(moto_s3, job.bucket) == TARGET and states(job) == before


def test_objects_written_after_the_verified_copy_are_not_deleted(
    tmp_path: Path, moto_s3: Any, moto_endpoint: str
) -> None:
    job = relocate_job(tmp_path, moto_s3, moto_endpoint, count=5, configure=False)
    before = states(job)

    def late_writer(rel: Relocation) -> None:
        if rel.phase is Phase.CHECK_SOURCE and "late.txt" not in job.objects:
            moto_s3.put_object(Bucket=job.bucket, Key="late.txt", Body=b"written late")
            job.objects["late.txt"] = b"written late"

    with pytest.raises(StorageError, match=r"written after the copy was verified.*'late.txt'"):
        run(job, on_phase=late_writer)
    assert region(moto_s3, job.bucket) == "us-east-1"  # nothing was deleted
    assert states(job) == {**before, "late.txt": object_state(moto_s3, job.bucket, "late.txt")}
    row = relocation_row(job.ledger_path)
    assert row is not None and row["phase"] == "copy_out"  # back to the copy

    code, out = run(job)
    assert code == 0, out
    assert object_state(moto_s3, job.bucket, "late.txt")["body"] == b"written late"
    assert region(moto_s3, job.bucket) == TARGET


def test_verification_finds_a_copy_whose_attributes_differ(
    tmp_path: Path, moto_s3: Any, moto_endpoint: str
) -> None:
    """verify_copy reads both sides: a tag, a header or an object missing in the copy is
    found, whatever the ledger says."""
    job = relocate_job(tmp_path, moto_s3, moto_endpoint, count=6, configure=False)
    temp = f"{job.bucket}-copy"
    moto_s3.create_bucket(Bucket=temp, CreateBucketConfiguration={"LocationConstraint": TARGET})
    from migrator.relocate import job_config

    cfg = job.cfg()
    out_job = job_config(
        cfg,
        cfg.job + ".to-temp",
        cfg.source,
        cfg.destination.model_copy(update={"bucket": temp, "region": TARGET}),
    )
    assert run_job(out_job, console=Console(quiet=True)) == 0
    engine = open_ledger(cfg.ledger)
    from migrator.ledger.repo import Ledger

    ledger = Ledger(engine, out_job.job)
    keys = sorted(job.objects)
    assert verify_copy(out_job, ledger, moto_s3, moto_s3, 4).ok

    moto_s3.put_object_tagging(
        Bucket=temp, Key=keys[0], Tagging={"TagSet": [{"Key": "x", "Value": "y"}]}
    )
    moto_s3.copy_object(
        Bucket=temp,
        Key=keys[1],
        CopySource={"Bucket": temp, "Key": keys[1]},
        MetadataDirective="REPLACE",
        ContentType="text/html",
    )
    moto_s3.delete_object(Bucket=temp, Key=keys[2])
    moto_s3.put_object(Bucket=job.bucket, Key="new.txt", Body=b"new")
    check = verify_copy(out_job, ledger, moto_s3, moto_s3, 4)
    engine.dispose()
    assert not check.ok
    assert check.examples["with other tags in the copy"] == [keys[0]]
    assert keys[1] in check.examples["with other content-type in the copy"]
    assert check.examples["missing in the copy"] == [keys[2]]
    assert check.examples["written to the source after it was listed"] == ["new.txt"]


def test_a_temporary_bucket_of_another_account_is_refused(
    tmp_path: Path, moto_s3: Any, moto_endpoint: str
) -> None:
    job = relocate_job(tmp_path, moto_s3, moto_endpoint, count=2, configure=False)
    taken = f"{job.bucket}-taken"
    other_account(moto_endpoint).create_bucket(
        Bucket=taken, CreateBucketConfiguration={"LocationConstraint": TARGET}
    )
    with pytest.raises(PreflightError, match="belongs to another account; name another"):
        run(job, temp_bucket=taken)
    assert region(moto_s3, job.bucket) == "us-east-1"
    # Another name is taken up where the first one failed.
    code, out = run(job, temp_bucket=f"{job.bucket}-free")
    assert code == 0, out
    assert f"{job.bucket}-free" not in bucket_names(moto_s3)


def test_a_second_run_is_refused_while_one_holds_the_relocation(
    tmp_path: Path, moto_s3: Any, moto_endpoint: str
) -> None:
    job = relocate_job(tmp_path, moto_s3, moto_endpoint, count=2, configure=False)
    engine = open_ledger(job.cfg().ledger)
    try:
        Relocations(engine).start(job.cfg().job, job.bucket, "us-east-1", TARGET, "t-bucket-1")
        # A live process elsewhere (its host is not this one) holds the lease.
        assert Relocations(engine).take_lease(job.cfg().job, "elsewhere:1:0", 60) is None
    finally:
        engine.dispose()
    with pytest.raises(PreflightError, match=r"another `migrator relocate` .* \(elsewhere:1:0\)"):
        run(job)


def test_cli_refuses_without_the_confirmation_and_writes_nothing(
    tmp_path: Path, moto_s3: Any, moto_endpoint: str
) -> None:
    job = relocate_job(tmp_path, moto_s3, moto_endpoint, count=2, configure=False)
    buckets = bucket_names(moto_s3)
    proc = run_cli("relocate", "--config", str(job.config_path), "--to-region", TARGET)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "--confirm-delete-source-bucket" in proc.stderr and repr(job.bucket) in proc.stderr
    assert not job.ledger_path.exists()
    assert bucket_names(moto_s3) == buckets
    assert region(moto_s3, job.bucket) == "us-east-1"


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"source": {"prefix": "image/"}}, "source.prefix must be empty"),
        ({"destination": {"bucket": "production"}}, "destination.bucket must be"),
        ({"destination": {"region": "eu-central-1"}}, "destination.region is 'eu-central-1'"),
        ({"delete_source": "never", "tags": "replace", "tag_values": {}}, "tags must be left"),
    ],
)
def test_cli_refuses_a_config_that_is_not_a_relocation(
    tmp_path: Path, moto_s3: Any, moto_endpoint: str, change: dict[str, Any], expected: str
) -> None:
    import yaml

    job = relocate_job(tmp_path, moto_s3, moto_endpoint, count=1, configure=False)
    data = yaml.safe_load(job.config_path.read_text())
    for key, value in change.items():
        if key in ("source", "destination"):
            data[key].update(value)
        else:
            data[key] = value
    job.config_path.write_text(yaml.safe_dump(data))
    proc = run_cli(
        "relocate",
        "--config",
        str(job.config_path),
        "--to-region",
        TARGET,
        "--confirm-delete-source-bucket",
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and expected in proc.stderr
    assert not job.ledger_path.exists()


def test_cli_status(tmp_path: Path, moto_s3: Any, moto_endpoint: str) -> None:
    job = relocate_job(tmp_path, moto_s3, moto_endpoint, count=3, configure=False)
    proc = run_cli("relocate", "--config", str(job.config_path), "--status")
    assert proc.returncode == 2 and "no relocation of job" in proc.stderr
    proc = run_cli(
        "relocate",
        "--config",
        str(job.config_path),
        "--to-region",
        TARGET,
        "--confirm-delete-source-bucket",
        "--quiet",
    )
    assert proc.returncode == 0, proc.stderr
    assert "phase 1/9 create_temp" in proc.stderr and "phase 9/9 delete_temp" in proc.stderr
    proc = run_cli("relocate", "--config", str(job.config_path), "--status", "--json")
    doc = json.loads(proc.stdout)
    assert doc["phase"] == "done" and doc["to_region"] == TARGET
    assert doc["copies"]["from_temp"]["counts"]["done"] == 3
    proc = run_cli("relocate", "--config", str(job.config_path), "--status")
    assert proc.returncode == 0 and "done: relocated" in proc.stdout
    assert "3/3 copied and verified" in proc.stdout
