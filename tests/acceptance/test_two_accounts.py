"""Two accounts on two endpoints, each side with credentials of its own, through the CLI.

Two moto servers, each in its own process and enforcing IAM (``moto_accounts``), stand in for
two AWS accounts: the source's user may use S3 there; the destination's user may only assume
a role (``role_arn``, with an ``external_id``) that may use S3. Each side's keys are unknown to
the other server, and the keys in the environment are unknown to both, so a request made with
the wrong side's credentials fails. The profiles live in a temporary AWS config and credentials
file; the destination's STS endpoint comes from a ``services`` section of its profile, as it
would for any custom endpoint. No server-side copy can work across the two servers: ``auto``
streams GET → PUT.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from botocore.exceptions import ClientError

from migrator.config import load_config
from migrator.storage.multipart import MIB
from seed.__main__ import seed_app_db
from seed.data import SeedObject, seed_object
from tests.conftest import MotoAccount, unique
from tests.helpers import Job, assert_converged, list_keys, run_cli, write_config

EXTERNAL_ID = "migrator-test-external-id"
HEADERS = {
    "CacheControl": "max-age=60",
    "ContentDisposition": 'inline; filename="a.png"',
    "ContentLanguage": "fr",
    "Expires": datetime(2030, 5, 6, 7, 8, 9, tzinfo=UTC),
}
TAGS = [{"Key": "team", "Value": "avatars"}, {"Key": "tier", "Value": "hot"}]


def aws_files(tmp_path: Path, source: MotoAccount, dest: MotoAccount) -> dict[str, str]:
    """Profiles ``src`` and ``dst`` in files of their own; the environment's keys (which
    neither server knows) are left in place to show they are not what is used."""
    credentials = tmp_path / "aws-credentials"
    credentials.write_text(
        f"[src]\naws_access_key_id = {source.access_key}\n"
        f"aws_secret_access_key = {source.secret_key}\n\n"
        f"[dst]\naws_access_key_id = {dest.access_key}\n"
        f"aws_secret_access_key = {dest.secret_key}\n"
    )
    config = tmp_path / "aws-config"
    config.write_text(
        "[profile src]\nregion = us-east-1\n\n"
        "[profile dst]\nregion = us-east-1\nservices = destination-account\n\n"
        f"[services destination-account]\nsts =\n  endpoint_url = {dest.endpoint}\n"
    )
    return {
        "AWS_CONFIG_FILE": str(config),
        "AWS_SHARED_CREDENTIALS_FILE": str(credentials),
    }


def two_account_job(
    tmp_path: Path,
    accounts: tuple[MotoAccount, MotoAccount],
    ledger: str,
    *,
    large: int = 0,
    **settings: Any,
) -> Job:
    """Small objects with headers and tags (and ``large`` objects above the lowered
    threshold) in the source account, an empty bucket in the destination account, an app
    table pointing at every object."""
    source, dest = accounts
    data: dict[str, Any] = {
        "job": unique("accounts"),
        "ledger": ledger,
        "source": {
            "bucket": unique("legacy"),
            "prefix": "image/",
            "endpoint_url": source.endpoint,
            "profile": "src",
        },
        "destination": {
            "bucket": unique("production"),
            "prefix": "avatar/",
            "endpoint_url": dest.endpoint,
            "profile": "dst",
            "role_arn": dest.role_arn,
            "external_id": EXTERNAL_ID,
            "role_session_name": "migrator-test",
        },
        "app_db": {"url": f"sqlite:///{tmp_path / 'app.db'}", "table": "avatars", "column": "path"},
        "workers": 2,
        "concurrency": 4,
        "chunk_size": 5,
        "multipart_threshold": 5 * MIB,
        "part_size": 5 * MIB,
        **settings,
    }
    path = write_config(tmp_path / "config.yaml", data)
    cfg = load_config(path, env={})
    src_s3, dst_s3 = source.client(), dest.role_s3()
    src_s3.create_bucket(Bucket=cfg.source.bucket)
    dst_s3.create_bucket(Bucket=cfg.destination.bucket)
    objects = [seed_object(i, "image/", 700 * i) for i in range(12)]  # object 0 is empty
    objects += [
        SeedObject(100 + i, f"image/big/{i}.bin", "application/x-big", body, 300_000 + i)
        for i, body in enumerate(random.Random(7).randbytes(11 * MIB + 5) for _ in range(large))
    ]
    for obj in objects:
        src_s3.put_object(
            Bucket=cfg.source.bucket,
            Key=obj.key,
            Body=obj.body,
            ContentType=obj.content_type,
            Metadata={"user-id": str(obj.user_id)},
            Tagging="&".join(f"{t['Key']}={t['Value']}" for t in TAGS),
            **HEADERS,
        )
    seed_app_db(cfg, objects, replace=True)
    return Job(tmp_path, path, cfg, src_s3, objects, dest_s3=dst_s3)


def cli(job: Job, env: dict[str, str], *args: str) -> Any:
    proc = run_cli(*args, "--config", str(job.config_path), cwd=job.dir, env=env)
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    return proc


def ledger_url(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    make: Callable[[str], str] = request.getfixturevalue("pg_database")
    return make("ledger")


def test_each_server_knows_only_its_own_keys(
    moto_accounts: tuple[MotoAccount, MotoAccount],
) -> None:
    """The premise of the tests below: a side's keys fail on the other server, and the
    destination user's own keys may not use S3 (only its role may)."""
    source, dest = moto_accounts
    crossed = dest.client(
        aws_access_key_id=source.access_key, aws_secret_access_key=source.secret_key
    )
    with pytest.raises(ClientError):
        crossed.list_buckets()
    with pytest.raises(ClientError) as denied:
        dest.client().list_buckets()
    assert denied.value.response["Error"]["Code"] == "AccessDenied"
    dest.role_s3().list_buckets()  # the role may


@pytest.mark.parametrize("ledger_kind", ["sqlite", "postgres"])
def test_stream_between_accounts_end_to_end(
    tmp_path: Path,
    moto_accounts: tuple[MotoAccount, MotoAccount],
    request: pytest.FixtureRequest,
    ledger_kind: str,
) -> None:
    """check, run, verify: every object (a large one in streamed parts) arrives with its
    headers, metadata and tags, the app rows point at it and the sources are deleted, each
    side having used its own credentials (the destination's through the assumed role)."""
    job = two_account_job(
        tmp_path, moto_accounts, ledger_url(ledger_kind, tmp_path, request), large=1
    )
    env = aws_files(tmp_path, *moto_accounts)

    checked = cli(job, env, "check", "--json")
    items = {i["check"]: i for i in json.loads(checked.stdout)["items"]}
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert {k: v["status"] for k, v in items.items() if k.split(":")[0] == "destination"} == {
        "destination: credentials": "ok",
        "destination: bucket": "ok",
        "destination: versioning": "ok",
        "destination: list": "ok",
        "destination: write": "ok",
    }
    assert "assume-role" in items["destination: credentials"]["detail"]
    assert items["copy"]["status"] == "ok"
    assert "streamed GET -> PUT" in items["copy"]["detail"]

    run = cli(job, env, "run", "--quiet")
    assert run.returncode == 0, run.stderr[-3000:]

    assert_converged(job)  # bodies, app rows, sources deleted
    dst = job.cfg.destination.bucket
    for obj in job.objects:
        key = job.dest_key(obj.key)
        head = job.dst_s3.head_object(Bucket=dst, Key=key)
        assert head["ContentType"] == obj.content_type
        assert head["Metadata"] == {"user-id": str(obj.user_id)}
        for name, value in HEADERS.items():
            assert head[name] == value, (key, name)
        assert job.dst_s3.get_object_tagging(Bucket=dst, Key=key)["TagSet"] == TAGS
        parts = head["ETag"].strip('"').partition("-")[2]
        assert parts == ("3" if len(obj.body) > 5 * MIB else ""), (key, head["ETag"])
    audit = cli(job, env, "verify")
    assert audit.returncode == 0, audit.stdout + audit.stderr
    secrets = [a.secret_key for a in moto_accounts]
    for text in (checked.stdout, checked.stderr, run.stdout, run.stderr):
        assert not any(s in text for s in secrets)
    engine = sa.create_engine(job.cfg.ledger)
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT * FROM migrator_objects")).all()
    engine.dispose()
    assert not any(s in repr(rows) for s in secrets)


def test_a_role_that_cannot_be_assumed_stops_run_before_anything(
    tmp_path: Path, moto_accounts: tuple[MotoAccount, MotoAccount]
) -> None:
    """The destination's user may assume only its own role: another ARN is refused by STS,
    and ``run`` ends with one line naming the side, before the ledger exists; ``check``
    fails that side's credentials and leaves the source's alone."""
    job = two_account_job(tmp_path, moto_accounts, f"sqlite:///{tmp_path / 'ledger.db'}")
    data = job.cfg.model_dump(exclude_none=True)
    data["destination"]["role_arn"] = "arn:aws:iam::123456789012:role/someone-else"
    write_config(job.config_path, data)
    env = aws_files(tmp_path, *moto_accounts)

    run = cli(job, env, "run")

    assert run.returncode == 2
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: destination.role_arn arn:aws:iam::123456789012:role/"), lines
    assert "AccessDenied" in lines[0]
    assert not (tmp_path / "ledger.db").exists()
    assert list_keys(job.s3, job.cfg.source.bucket) == {o.key for o in job.objects}

    checked = cli(job, env, "check", "--json")
    items = {i["check"]: i for i in json.loads(checked.stdout)["items"]}
    assert checked.returncode == 2
    assert items["destination: credentials"]["status"] == "fail"
    assert items["source: credentials"]["status"] == "ok"
    assert items["source: read"]["status"] == "ok"
