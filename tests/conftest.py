"""Real servers for the suite: a moto S3 server over HTTP, PostgreSQL, and s3fast.

Two more moto servers, each in a process of its own and enforcing IAM, stand in for two AWS
accounts with different credentials (``moto_accounts``).

PostgreSQL: MIGRATOR_TEST_PG_URL if set; else a testcontainers container where a Docker engine
answers; else the local server at 127.0.0.1:5432 (user postgres). Each test session creates its
own databases and drops them at the end. Without a server the Postgres tests skip, unless
MIGRATOR_REQUIRE_POSTGRES=1 (CI), which makes them fail instead. MySQL/MariaDB (app database
only): MIGRATOR_TEST_MYSQL_URL if set, else the local server at 127.0.0.1:3306 (user root, no
password); tests skip without it unless MIGRATOR_REQUIRE_MYSQL=1. s3fast tests follow the same
rule with MIGRATOR_REQUIRE_S3FAST=1.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import boto3
import pytest
import sqlalchemy as sa
from botocore.config import Config as BotoConfig

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MIGRATOR_SHARED_DIR", REPO.parent / "shared"))

os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing-key-id")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing-secret-key")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.pop("AWS_PROFILE", None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def s3_client(endpoint: str, **config: Any) -> Any:
    """A boto3 S3 client of the test server; ``config``: more botocore ``Config`` settings."""
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        config=BotoConfig(s3={"addressing_style": "path"}, max_pool_connections=32, **config),
    )


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture(scope="session")
def moto_s3(moto_endpoint: str) -> Any:
    return s3_client(moto_endpoint)


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:10]}"


class AwsLikeMoto:
    """What ``aws_like_moto`` changed in the moto server, and what it saw."""

    def __init__(self) -> None:
        self.copy_delay = 0.0  # seconds each CopyObject waits before it is carried out
        self.copies_received = 0
        self._lock = threading.Lock()

    def received(self) -> None:
        with self._lock:
            self.copies_received += 1


@pytest.fixture
def aws_like_moto(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> AwsLikeMoto:
    """The moto server (it runs in this process), made to do three things AWS S3 does and
    moto 5 does not, for the duration of a test:

    * an object written in one request with SSE-KMS gets an ETag that is not the MD5 of its
      bytes (AWS: "objects … encrypted by SSE-C or SSE-KMS have ETags that are not an MD5
      digest of their object data"); moto always gives the MD5. Multipart ETags stay as moto
      computes them, from the part ETags;
    * ``CopyObject`` honours ``x-amz-copy-source-if-match`` and ``If-None-Match: *`` with a 412
      (moto copies regardless);
    * ``CopyObject`` can be slowed (``copy_delay``): the copy is carried out after the delay
      even when the client has gone, as S3 finishes a request it received, which opens the
      window between a copy and its ledger record to a real ``kill -9``.

    Requests still travel over HTTP through botocore or the CRT; nothing of migrator's is
    replaced."""
    from moto.s3.exceptions import PreconditionFailed
    from moto.s3.models import FakeKey
    from moto.s3.responses import S3Response

    state = AwsLikeMoto()
    md5_etag = FakeKey.etag

    def etag(key: Any) -> str:
        value: str = md5_etag.fget(key)  # type: ignore[attr-defined]
        if key.encryption not in ("aws:kms", "aws:kms:dsse") or "-" in value:
            return value
        # Like AWS's: not the bytes' MD5, and not the same for two objects of equal bytes.
        seed = f"sse-kms:{key.bucket_name}/{key.name}:{key.last_modified}:{value}"
        return '"' + hashlib.md5(seed.encode()).hexdigest() + '"'

    copy_object = S3Response.copy_object

    def guarded_copy(self: Any) -> Any:
        state.received()
        time.sleep(state.copy_delay)
        source = self.headers.get("x-amz-copy-source")
        bucket, key = unquote(urlparse(source).path).lstrip("/").split("/", 1)
        wanted = self.headers.get("x-amz-copy-source-if-match")
        if wanted is not None:
            found = self.backend.get_object(bucket, key)
            if found is not None and found.etag.strip('"') != wanted.strip('"'):
                raise PreconditionFailed("x-amz-copy-source-If-Match")
        taken = self.backend.get_object(self.bucket_name, self.parse_key_name()) is not None
        if self.headers.get("If-None-Match") == "*" and taken:
            raise PreconditionFailed("If-None-Match")
        return copy_object(self)

    monkeypatch.setattr(FakeKey, "etag", property(etag))
    monkeypatch.setattr(S3Response, "copy_object", guarded_copy)
    return state


# -- two accounts: moto servers of their own, with IAM enforced ------------------------------

ALLOW_ALL_S3 = {"Effect": "Allow", "Action": "s3:*", "Resource": "*"}


@dataclass(frozen=True)
class MotoAccount:
    """A moto server in a process of its own (moto's state is per process) that enforces IAM:
    it knows only the user ``name``'s ``access_key``/``secret_key`` (and the credentials of
    roles assumed with them); ``role_arn``, when set, names a role with every S3 right."""

    name: str
    endpoint: str
    access_key: str
    secret_key: str
    role_arn: str | None

    def client(self, service: str = "s3", **credentials: str) -> Any:
        keys = credentials or {
            "aws_access_key_id": self.access_key,
            "aws_secret_access_key": self.secret_key,
        }
        return boto3.client(
            service,
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            config=BotoConfig(s3={"addressing_style": "path"}, max_pool_connections=32),
            **keys,
        )

    def role_s3(self) -> Any:
        """An S3 client with the role's credentials (assumed with the user's)."""
        assert self.role_arn is not None
        creds = self.client("sts").assume_role(RoleArn=self.role_arn, RoleSessionName="test")
        c = creds["Credentials"]
        return self.client(
            aws_access_key_id=c["AccessKeyId"],
            aws_secret_access_key=c["SecretAccessKey"],
            aws_session_token=c["SessionToken"],
        )


def _policy(*statements: dict[str, Any]) -> str:
    return json.dumps({"Version": "2012-10-17", "Statement": list(statements)})


def start_moto_account(
    name: str, *, with_role: bool
) -> tuple[subprocess.Popen[bytes], MotoAccount]:
    """A moto server process with one IAM user (and a role it may assume); IAM is enforced
    once they exist. Without the role the user has every S3 right; with it, the user may only
    assume the role, and only the role may use S3."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("moto server did not start") from None
            time.sleep(0.1)
    boot = {"aws_access_key_id": "bootstrap", "aws_secret_access_key": "bootstrap"}
    iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1", **boot)
    iam.create_user(UserName=name)
    key = iam.create_access_key(UserName=name)["AccessKey"]
    role_arn = None
    if with_role:
        trust = {"Effect": "Allow", "Principal": {"AWS": "*"}, "Action": "sts:AssumeRole"}
        role_arn = iam.create_role(
            RoleName=f"{name}-writer", AssumeRolePolicyDocument=_policy(trust)
        )["Role"]["Arn"]
        iam.put_role_policy(
            RoleName=f"{name}-writer", PolicyName="s3", PolicyDocument=_policy(ALLOW_ALL_S3)
        )
        user = {"Effect": "Allow", "Action": "sts:AssumeRole", "Resource": role_arn}
    else:
        user = ALLOW_ALL_S3
    iam.put_user_policy(UserName=name, PolicyName="rights", PolicyDocument=_policy(user))
    enforce = urllib.request.Request(
        f"{endpoint}/moto-api/reset-auth",
        data=b"0",
        method="POST",
        headers={"Content-Type": "text/plain"},
    )
    urllib.request.urlopen(enforce, timeout=10).close()
    account = MotoAccount(name, endpoint, key["AccessKeyId"], key["SecretAccessKey"], role_arn)
    return proc, account


@pytest.fixture(scope="session")
def moto_accounts() -> Iterator[tuple[MotoAccount, MotoAccount]]:
    """Two accounts on two servers: the source's user may use S3; the destination's user may
    only assume a role, which may use S3. Each side's keys are unknown to the other server."""
    started: list[subprocess.Popen[bytes]] = []
    try:
        src_proc, source = start_moto_account("source-user", with_role=False)
        started.append(src_proc)
        dst_proc, dest = start_moto_account("destination-user", with_role=True)
        started.append(dst_proc)
        yield source, dest
    finally:
        for proc in started:
            proc.terminate()
            proc.wait(timeout=10)


# -- PostgreSQL ------------------------------------------------------------------------------


def _docker_available() -> bool:
    if not shutil.which("docker"):
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _db_reachable(url: str) -> str | None:
    engine = sa.create_engine(url, connect_args={"connect_timeout": 5})
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        return None
    except sa.exc.SQLAlchemyError as exc:
        return str(getattr(exc, "orig", exc)).strip().splitlines()[0]
    finally:
        engine.dispose()


@pytest.fixture(scope="session")
def pg_admin_url() -> Iterator[str]:
    """URL of a PostgreSQL server (its ``postgres`` database) that tests may create DBs on."""
    container = None
    url = os.environ.get("MIGRATOR_TEST_PG_URL")
    if not url and _docker_available():
        from testcontainers.postgres import PostgresContainer

        container = PostgresContainer("postgres:16-alpine", driver="psycopg2")
        container.start()
        url = container.get_connection_url()
    url = url or "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
    problem = _db_reachable(url)
    if problem:
        if os.environ.get("MIGRATOR_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"PostgreSQL required (MIGRATOR_REQUIRE_POSTGRES=1) but: {problem}")
        pytest.skip(f"no PostgreSQL server: {problem}")
    yield url
    if container is not None:
        container.stop()


@pytest.fixture(scope="session")
def pg_database(pg_admin_url: str) -> Iterator[Callable[[str], str]]:
    """Factory: create a fresh database, return its URL; all are dropped at session end."""
    admin = sa.create_engine(pg_admin_url, isolation_level="AUTOCOMMIT")
    created: list[str] = []

    def make(label: str) -> str:
        name = f"mt_{label}_{uuid.uuid4().hex[:8]}"
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        created.append(name)
        return sa.engine.make_url(pg_admin_url).set(database=name).render_as_string(False)

    yield make
    with admin.connect() as conn:
        for name in created:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


# -- MySQL / MariaDB (app database only) ------------------------------------------------------


@pytest.fixture(scope="session")
def mysql_admin_url() -> str:
    """URL of a MySQL/MariaDB server that tests may create databases on."""
    url = os.environ.get("MIGRATOR_TEST_MYSQL_URL") or "mysql+pymysql://root@127.0.0.1:3306/test"
    problem = _db_reachable(url)
    if problem:
        if os.environ.get("MIGRATOR_REQUIRE_MYSQL") == "1":
            pytest.fail(f"MySQL/MariaDB required (MIGRATOR_REQUIRE_MYSQL=1) but: {problem}")
        pytest.skip(f"no MySQL/MariaDB server: {problem}")
    return url


@pytest.fixture(scope="session")
def mysql_database(mysql_admin_url: str) -> Iterator[Callable[[str], str]]:
    """Factory: create a fresh utf8mb4 database (the server's default collation, which ignores
    case), return its URL; all are dropped at session end."""
    admin = sa.create_engine(mysql_admin_url, isolation_level="AUTOCOMMIT")
    created: list[str] = []

    def make(label: str) -> str:
        name = f"mt_{label}_{uuid.uuid4().hex[:8]}"
        with admin.connect() as conn:
            conn.execute(sa.text(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4"))
        created.append(name)
        return sa.engine.make_url(mysql_admin_url).set(database=name).render_as_string(False)

    yield make
    with admin.connect() as conn:
        for name in created:
            conn.execute(sa.text(f"DROP DATABASE IF EXISTS `{name}`"))
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgres", "mysql"])
def app_kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def app_url(app_kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """An empty app database on each backend an app database may be on."""
    if app_kind == "sqlite":
        url = f"sqlite:///{tmp_path / 'app.db'}"
        sa.create_engine(url).connect().close()  # the file must exist
        return url
    fixture = "pg_database" if app_kind == "postgres" else "mysql_database"
    return request.getfixturevalue(fixture)("app")


@pytest.fixture(params=["sqlite", "postgres"])
def db_kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def db_urls(db_kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> dict[str, str]:
    """Ledger and app-DB URLs on the parametrised backend."""
    if db_kind == "sqlite":
        return {
            "ledger": f"sqlite:///{tmp_path / 'ledger.db'}",
            "app": f"sqlite:///{tmp_path / 'app.db'}",
        }
    make = request.getfixturevalue("pg_database")
    return {"ledger": make("ledger"), "app": make("app")}


# -- s3fast ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def s3fast_bin() -> str:
    build = SHARED / "s3fast" / "build.sh"
    problem = None
    if not build.exists():
        problem = f"{build} not found"
    else:
        proc = subprocess.run(["bash", str(build)], capture_output=True, text=True, timeout=600)
        if proc.returncode == 0 and proc.stdout.strip():
            return proc.stdout.strip().splitlines()[-1]
        problem = f"build.sh failed: {proc.stderr.strip()[-300:]}"
    if os.environ.get("MIGRATOR_REQUIRE_S3FAST") == "1":
        pytest.fail(f"s3fast required (MIGRATOR_REQUIRE_S3FAST=1) but {problem}")
    pytest.skip(f"s3fast unavailable: {problem}")


class S3Fast:
    def __init__(self, binary: str, *flags: str) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [binary, "-addr", f"127.0.0.1:{self.port}", "-quiet", *flags],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                self.stats()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("s3fast did not start")

    def stats(self) -> dict[str, Any]:
        import json

        with urllib.request.urlopen(f"{self.endpoint}/_s3fast/stats", timeout=2) as r:
            return json.loads(r.read())

    def reset_stats(self) -> None:
        req = urllib.request.Request(f"{self.endpoint}/_s3fast/stats/reset", method="POST")
        urllib.request.urlopen(req, timeout=2).close()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


@pytest.fixture
def s3fast(s3fast_bin: str) -> Iterator[Callable[..., S3Fast]]:
    """Factory: start an s3fast server with the given flags; stopped after the test."""
    started: list[S3Fast] = []

    def start(*flags: str) -> S3Fast:
        server = S3Fast(s3fast_bin, *flags)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
