"""``migrator check`` and ``migrator iam-policy`` through the CLI, against the moto server and
real databases: the checklist finds what is wrong, its probes leave nothing behind, and
``run`` repeats the checks and prints their warnings."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import sqlalchemy as sa
import yaml

from tests.helpers import Job, app_paths, list_keys, make_job, run_cli, sqlite_job, write_config


def check(job: Job, env: dict[str, str] | None = None) -> tuple[Any, dict[str, dict[str, str]]]:
    proc = run_cli("check", "--json", "--config", str(job.config_path), env=env)
    assert "Traceback" not in proc.stderr, proc.stderr
    doc = json.loads(proc.stdout)
    return proc, {i["check"]: i for i in doc["items"]}


def no_credentials(tmp_path: Path) -> dict[str, str]:
    """An environment in which the standard AWS chain finds nothing (empty means unset)."""
    return {
        "AWS_ACCESS_KEY_ID": "",
        "AWS_SECRET_ACCESS_KEY": "",
        "AWS_SESSION_TOKEN": "",
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def test_a_good_job_passes_and_the_probes_leave_nothing_behind(
    tmp_path: Path, moto_s3: Any, moto_endpoint: str
) -> None:
    job = sqlite_job(tmp_path, moto_s3, moto_endpoint, with_app=True, count=5)
    sources = list_keys(moto_s3, job.cfg.source.bucket)
    app = app_paths(job)

    proc, items = check(job)

    assert proc.returncode == 0, proc.stderr
    statuses = {name: i["status"] for name, i in items.items()}
    assert statuses == {
        "source: credentials": "ok",
        "source: bucket": "ok",
        "source: versioning": "ok",
        "source: list": "ok",
        "source: read": "ok",
        "source: delete": "ok",
        "destination: credentials": "ok",
        "destination: bucket": "ok",
        "destination: versioning": "ok",
        "destination: list": "ok",
        "destination: write": "ok",
        "copy": "ok",
        "app database": "ok",
        "app index": "ok",  # the seeder indexes the path column
        "ledger": "ok",
    }
    assert items["copy"]["detail"].startswith("server-side (CopyObject)")
    assert "testing-secret-key" not in proc.stdout + proc.stderr
    # Nothing written: no probe left in either bucket, no ledger file, app rows as seeded.
    assert list_keys(moto_s3, job.cfg.source.bucket) == sources
    assert list_keys(moto_s3, job.cfg.destination.bucket) == set()
    assert not (tmp_path / "ledger.db").exists()
    assert app_paths(job) == app


def test_failures_are_listed_and_exit_2(tmp_path: Path, moto_s3: Any, moto_endpoint: str) -> None:
    job = sqlite_job(tmp_path, moto_s3, moto_endpoint, with_app=True, count=2)
    data = job.cfg.model_dump(exclude_none=True)
    data["destination"]["bucket"] = "no-such-bucket-here"
    data["app_db"]["column"] = "nope"
    write_config(job.config_path, data)

    proc, items = check(job)

    assert proc.returncode == 2
    assert items["destination: bucket"]["status"] == "fail"
    assert "does not exist" in items["destination: bucket"]["detail"]
    assert items["app database"]["status"] == "fail"
    assert "'nope' does not exist" in items["app database"]["detail"]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [
        "error: 2 check(s) failed: destination: bucket, app database; see the table for how to fix"
    ]


def test_missing_credentials_fail(tmp_path: Path, moto_s3: Any, moto_endpoint: str) -> None:
    job = sqlite_job(tmp_path, moto_s3, moto_endpoint, with_app=False, count=1)
    env = no_credentials(tmp_path)
    proc, items = check(job, env)
    assert proc.returncode == 2
    assert items["source: credentials"]["status"] == "fail"
    assert "no AWS credentials found" in items["source: credentials"]["detail"]


def test_unindexed_app_column_and_versioned_source_warn_and_run_says_so(
    tmp_path: Path, moto_s3: Any, moto_endpoint: str
) -> None:
    job = sqlite_job(tmp_path, moto_s3, moto_endpoint, with_app=True, count=3)
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'app.db'}")
    with engine.begin() as conn:
        for (name,) in conn.exec_driver_sql(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'avatars' "
            "AND sql IS NOT NULL"
        ).all():
            conn.exec_driver_sql(f'DROP INDEX "{name}"')
    engine.dispose()
    moto_s3.put_bucket_versioning(
        Bucket=job.cfg.source.bucket, VersioningConfiguration={"Status": "Enabled"}
    )

    proc, items = check(job)

    assert proc.returncode == 0, proc.stderr
    assert items["app index"]["status"] == "warn"
    assert "CREATE INDEX ON avatars (path)" in items["app index"]["detail"]
    assert items["source: versioning"]["status"] == "warn"
    assert "delete marker" in items["source: versioning"]["detail"]
    assert items["source: delete"]["status"] == "skip"  # no probe on a versioned bucket
    versions = moto_s3.list_object_versions(Bucket=job.cfg.source.bucket)
    assert versions.get("DeleteMarkers", []) == []

    run = run_cli("run", "--quiet", "--config", str(job.config_path))
    assert run.returncode == 0, run.stderr
    assert "warning: app index: no index on avatars.path" in run.stderr
    assert "warning: source: versioning: Enabled" in run.stderr


def test_run_refuses_to_start_when_a_check_fails(
    tmp_path: Path, moto_s3: Any, moto_endpoint: str
) -> None:
    job = make_job(
        tmp_path, moto_s3, moto_endpoint, ledger=f"sqlite:///{tmp_path / 'l.db'}", app=None
    )
    env = no_credentials(tmp_path)
    proc = run_cli("run", "--config", str(job.config_path), env=env)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: no AWS credentials found"), lines
    assert not (tmp_path / "l.db").exists()


def test_iam_policy_names_exactly_the_job_and_its_rights(
    tmp_path: Path, moto_s3: Any, moto_endpoint: str
) -> None:
    job = sqlite_job(tmp_path, moto_s3, moto_endpoint, with_app=False, count=1)
    src, dst = job.cfg.source, job.cfg.destination

    def policy(delete_source: str) -> dict[str, Any]:
        data = job.cfg.model_dump(exclude_none=True)
        data["delete_source"] = delete_source
        write_config(job.config_path, data)
        proc = run_cli("iam-policy", "--config", str(job.config_path))
        assert proc.returncode == 0, proc.stderr
        doc: dict[str, Any] = json.loads(proc.stdout)
        return doc

    def actions(doc: dict[str, Any], resource: str) -> set[str]:
        return {a for s in doc["Statement"] if s["Resource"] == resource for a in s["Action"]}

    moved = policy("after_all")
    assert set(moved) == {"source", "destination"}
    assert actions(moved["source"], f"arn:aws:s3:::{src.bucket}/{src.prefix}*") == {
        "s3:GetObject",
        "s3:GetObjectTagging",
        "s3:DeleteObject",
    }
    assert "s3:ListBucket" in actions(moved["source"], f"arn:aws:s3:::{src.bucket}")
    assert actions(moved["destination"], f"arn:aws:s3:::{dst.bucket}/{dst.prefix}*") >= {
        "s3:PutObject",
        "s3:GetObject",
    }
    assert "s3:DeleteObject" not in json.dumps(moved["destination"])
    kept = policy("never")
    assert "s3:DeleteObject" not in json.dumps(kept)
    for doc in (*moved.values(), *kept.values()):
        assert doc["Version"] == "2012-10-17"
        assert all(s["Effect"] == "Allow" and s["Sid"] for s in doc["Statement"])


def test_on_aws_the_credentials_are_validated_by_sts(
    tmp_path: Path, moto_s3: Any, moto_endpoint: str
) -> None:
    """Without endpoint_url the job is on AWS: STS GetCallerIdentity says whose credentials
    they are. botocore's AWS_ENDPOINT_URL sends every service, STS included, to the moto
    server here instead of AWS."""
    job = sqlite_job(tmp_path, moto_s3, moto_endpoint, with_app=False, count=2)
    data = job.cfg.model_dump(exclude_none=True)
    for side in ("source", "destination"):
        data[side].pop("endpoint_url")
        data[side]["region"] = "us-east-1"
    write_config(job.config_path, data)

    proc, items = check(job, {"AWS_ENDPOINT_URL": moto_endpoint})

    assert proc.returncode == 0, proc.stderr
    detail = items["source: credentials"]["detail"]
    assert items["source: credentials"]["status"] == "ok"
    assert detail.startswith("valid (env): account 123456789012, arn:aws:"), detail
    assert items["destination: write"]["status"] == "ok"  # S3 went to moto too


def test_check_on_mysql_with_several_targets_names_each_index(
    tmp_path: Path, moto_s3: Any, moto_endpoint: str, mysql_database: Callable[[str], str]
) -> None:
    """The seeder's avatars.path is indexed (a 768-character prefix); profiles.url is not."""
    url = mysql_database("app")
    job = make_job(
        tmp_path, moto_s3, moto_endpoint, ledger=f"sqlite:///{tmp_path / 'l.db'}", app=url, count=2
    )
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE profiles (id INT PRIMARY KEY, url VARCHAR(1024))"))
    engine.dispose()
    data = yaml.safe_load(job.config_path.read_text())
    data["app_db"] = {
        "url": url,
        "targets": [
            {"table": "avatars", "column": "path"},
            {"table": "profiles", "column": "url", "value": "https://legacy.example.com/{key}"},
        ],
    }
    write_config(job.config_path, data)

    proc, items = check(job)

    assert proc.returncode == 0, proc.stderr
    assert items["app database"]["status"] == "ok"
    assert (
        "avatars.path, profiles.url found in mysql+pymysql://root@"
        in (items["app database"]["detail"])
    )
    assert items["app index: avatars.path"]["status"] == "ok"
    assert items["app index: profiles.url"]["status"] == "warn"
    assert (
        "CREATE INDEX ix_url ON profiles (url(768))" in items["app index: profiles.url"]["detail"]
    )


def kms_job(tmp_path: Path, moto_s3: Any, moto_endpoint: str, key_id: str) -> Job:
    return sqlite_job(
        tmp_path,
        moto_s3,
        moto_endpoint,
        with_app=False,
        count=2,
        sse="aws:kms",
        kms_key_id=key_id,
        acl="bucket-owner-full-control",
    )


def test_sse_kms_checks_the_key_and_probes_with_it(
    tmp_path: Path, moto_s3: Any, moto_endpoint: str
) -> None:
    """The destination's key is described with the destination's credentials, and the write
    probe is written with SSE-KMS, that key and the ACL, read back and removed."""
    kms = boto3.client("kms", endpoint_url=moto_endpoint, region_name="us-east-1")
    key = kms.create_key()["KeyMetadata"]
    job = kms_job(tmp_path, moto_s3, moto_endpoint, key["KeyId"])

    proc, items = check(job)

    assert proc.returncode == 0, proc.stderr
    assert items["destination: kms key"]["status"] == "ok"
    assert items["destination: kms key"]["detail"] == f"{key['Arn']} is enabled for encryption"
    write = items["destination: write"]
    assert write["status"] == "ok"
    assert f"SSE-KMS key {key['KeyId']}, ACL bucket-owner-full-control" in write["detail"]
    assert list_keys(moto_s3, job.cfg.destination.bucket) == set()


def test_a_missing_or_disabled_kms_key_fails_check_and_stops_run(
    tmp_path: Path, moto_s3: Any, moto_endpoint: str
) -> None:
    missing = "0b0e1c1e-aaaa-4bbb-8ccc-123456789012"
    job = kms_job(tmp_path, moto_s3, moto_endpoint, missing)

    proc, items = check(job)

    assert proc.returncode == 2
    assert items["destination: kms key"]["status"] == "fail"
    assert f"KMS key {missing} not found" in items["destination: kms key"]["detail"]
    run = run_cli("run", "--config", str(job.config_path))
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert run.returncode == 2 and len(lines) == 1, run.stderr
    assert lines[0].startswith(f"error: KMS key {missing} not found"), lines
    assert list_keys(moto_s3, job.cfg.destination.bucket) == set()
    assert not (tmp_path / "ledger.db").exists()

    kms = boto3.client("kms", endpoint_url=moto_endpoint, region_name="us-east-1")
    disabled = kms.create_key()["KeyMetadata"]["KeyId"]
    kms.disable_key(KeyId=disabled)
    data = yaml.safe_load(job.config_path.read_text())
    data["kms_key_id"] = disabled
    write_config(job.config_path, data)
    proc, items = check(job)
    assert proc.returncode == 2
    assert "is Disabled; enable it or fix kms_key_id" in items["destination: kms key"]["detail"]


def test_iam_policy_grants_the_kms_key_and_the_acl_right(
    tmp_path: Path, moto_s3: Any, moto_endpoint: str
) -> None:
    arn = "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    job = kms_job(tmp_path, moto_s3, moto_endpoint, arn)

    proc = run_cli("iam-policy", "--config", str(job.config_path))

    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    [kms] = [s for s in doc["destination"]["Statement"] if s["Resource"] == arn]
    assert set(kms["Action"]) == {"kms:GenerateDataKey", "kms:Decrypt", "kms:DescribeKey"}
    dst = job.cfg.destination
    [objects] = [
        s
        for s in doc["destination"]["Statement"]
        if s["Resource"] == f"arn:aws:s3:::{dst.bucket}/{dst.prefix}*"
    ]
    assert "s3:PutObjectAcl" in objects["Action"]
    assert "kms:" not in json.dumps(doc["source"])
    assert "s3:GetObjectTagging" in json.dumps(doc["source"])  # tags: copy reads them

    data = yaml.safe_load(job.config_path.read_text())
    data.update(tags="replace", tag_values={"project": "avatars"})
    write_config(job.config_path, data)
    proc = run_cli("iam-policy", "--config", str(job.config_path))
    assert proc.returncode == 0, proc.stderr
    assert "s3:GetObjectTagging" not in json.dumps(json.loads(proc.stdout)["source"])
