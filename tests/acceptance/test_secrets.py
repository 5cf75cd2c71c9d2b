"""Invariant I5 end to end: no secret in any log, report, ledger row or error message.

One job goes through every command of the CLI (plan, run with debug logging, status, status
--json, report as CSV and Parquet, verify, retry-failed, run again, and commands that fail)
with AWS credentials in the environment and passwords in both database URLs. Then every byte
the tool produced - stdout, stderr, both reports and every column of every ledger table - is
searched for each secret. URLs may appear only with the password masked as ``***``.
"""

from __future__ import annotations

import io
import json
import re
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import sqlalchemy as sa

from tests.conftest import unique
from tests.helpers import make_job, run_cli, write_config

# Recognisable random strings; moto accepts any credentials.
SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIAMT" + secrets.token_hex(7).upper(),
    "AWS_SECRET_ACCESS_KEY": "mtSecretKey" + secrets.token_hex(16),
    "AWS_SESSION_TOKEN": "mtSessionToken" + secrets.token_hex(24),
    "ledger password": "mtLedgerPw" + secrets.token_hex(8),
    "app DB password": "mtAppPw" + secrets.token_hex(8),
}
AWS_ENV = {k: v for k, v in SECRETS.items() if k.startswith("AWS_")}
LEDGER_TABLES = {"migrator_objects", "migrator_jobs", "migrator_alembic_version"}
URL_WITH_PASSWORD = re.compile(r"[a-z][a-z0-9+.\-]*://[^/\s:@]*:([^@\s/]+)@", re.IGNORECASE)


@dataclass
class Transcript:
    """Everything the tool printed or wrote, labelled by where it came from."""

    texts: dict[str, str] = field(default_factory=dict)

    def add(self, label: str, text: str) -> None:
        n = sum(1 for k in self.texts if k.startswith(label))
        self.texts[f"{label} #{n + 1}" if n else label] = text

    def leaks(self) -> list[str]:
        """``where: secret name: line shape`` for each occurrence, the secret masked."""
        found = []
        for where, text in self.texts.items():
            for name, value in SECRETS.items():
                n = text.count(value)
                if n:
                    at = text.index(value)
                    shape = text[max(0, at - 150) : at + len(value) + 60].replace(
                        value, f"<{name}>"
                    )
                    found.append(f"{where}: {name} x{n}, e.g. ...{shape!r}...")
        return found

    def unmasked_urls(self) -> list[str]:
        found = []
        for where, text in self.texts.items():
            for m in URL_WITH_PASSWORD.finditer(text):
                if m.group(1) != "***":
                    found.append(f"{where}: {m.group(0)[:20]}...")
        return found


@pytest.fixture
def pg_with_password(pg_admin_url: str, pg_database: Callable[[str], str]) -> Iterator[Any]:
    """Factory: a fresh database owned by a new role that logs in with ``password``; the URL
    carries the password. (On a trust-auth server any password works; on a password-auth
    server this one is the real one.)"""
    admin = sa.create_engine(pg_admin_url, isolation_level="AUTOCOMMIT")
    made: list[tuple[str, str]] = []

    def make(label: str, password: str) -> str:
        assert re.fullmatch(r"[A-Za-z0-9]+", password)  # safe to inline in the DDL below
        url = sa.engine.make_url(pg_database(label))
        role = unique("mt_role").replace("-", "_")
        with admin.connect() as conn:
            conn.execute(sa.text(f"CREATE ROLE \"{role}\" LOGIN PASSWORD '{password}'"))
            conn.execute(sa.text(f'ALTER DATABASE "{url.database}" OWNER TO "{role}"'))
        made.append((str(url.database), role))
        return url.set(username=role, password=password).render_as_string(hide_password=False)

    yield make
    with admin.connect() as conn:
        for db, role in made:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))
            conn.execute(sa.text(f'DROP ROLE IF EXISTS "{role}"'))
    admin.dispose()


def dump_ledger(url: str) -> dict[str, str]:
    """Every row, every column, of every ledger table, as text."""
    engine = sa.create_engine(url)
    try:
        names = {t for t in sa.inspect(engine).get_table_names() if t.startswith("migrator_")}
        assert names >= LEDGER_TABLES, f"ledger tables: {sorted(names)}"
        dumps = {}
        with engine.connect() as conn:
            for name in sorted(names):
                rows = conn.execute(sa.text(f'SELECT * FROM "{name}"')).mappings().all()
                dumps[f"ledger table {name}"] = "\n".join(repr(dict(r)) for r in rows)
        return dumps
    finally:
        engine.dispose()


def test_no_secret_in_output_reports_or_ledger(
    tmp_path: Path, moto_s3: Any, moto_endpoint: str, pg_with_password: Any
) -> None:
    ledger_url = pg_with_password("ledger", SECRETS["ledger password"])
    app_url = pg_with_password("app", SECRETS["app DB password"])
    job = make_job(tmp_path, moto_s3, moto_endpoint, ledger=ledger_url, app=app_url, count=12)
    config = str(job.config_path)
    seen = Transcript()

    def cli(*args: str, expect: int, env: dict[str, str] | None = None) -> Any:
        proc = run_cli(*args, cwd=job.dir, env={**AWS_ENV, **(env or {})}, timeout=180)
        label = " ".join(a for a in args if a != config and a != "--config")
        seen.add(f"{label} stdout", proc.stdout)
        seen.add(f"{label} stderr", proc.stderr)
        out = proc.stdout + proc.stderr
        assert "Traceback" not in out, f"{label}: {out[-1500:]}"
        assert proc.returncode == expect, f"{label}: exit {proc.returncode}: {out[-1500:]}"
        return proc

    cli("plan", "--config", config, expect=0)
    gone = [o.key for o in job.objects[:2]]  # rows that will fail: their sources vanish
    for key in gone:
        moto_s3.delete_object(Bucket=job.cfg.source.bucket, Key=key)

    debug_run = cli("-vv", "run", "--quiet", "--config", config, expect=1)
    assert " DEBUG " in debug_run.stderr, "-vv did not turn on debug logging"

    doc = json.loads(cli("status", "--json", "--config", config, expect=0).stdout)
    assert doc["total"] == len(job.objects) and doc["counts"]["failed"] == len(gone)
    assert doc["recent_errors"], "the failures should be listed with their errors"
    cli("status", "--config", config, expect=0)

    reports = {}
    for name in ("report.csv", "report.parquet"):
        cli("report", "--config", config, "--out", str(job.dir / name), expect=0)
        reports[name] = job.dir / name
    cli("verify", "--config", config, expect=1)  # two rows are failed: a discrepancy
    cli("-vv", "verify", "--json", "--config", config, expect=1)

    retried = cli("retry-failed", "--config", config, expect=0)
    assert f"{len(gone)} failed objects put back" in retried.stdout
    cli("run", "--quiet", "--config", config, expect=1)  # the sources are still gone

    # Commands that fail before doing anything: a destination bucket that does not exist
    # (debug logging on) and an app database that does not exist.
    data = job.cfg.model_dump(exclude_none=True)
    data["destination"]["bucket"] = unique("no-such-bucket")
    bad = write_config(job.dir / "bad-destination.yaml", data)
    failed = cli("-vv", "run", "--config", str(bad), expect=2)
    assert "does not exist" in failed.stderr
    absent = sa.engine.make_url(app_url).set(database=unique("mt_absent"))
    app_env = {"MIGRATOR_APP_DB_URL": absent.render_as_string(hide_password=False)}
    failed = cli("run", "--config", config, expect=2, env=app_env)
    assert "app database" in failed.stderr and ":***@" in failed.stderr, failed.stderr

    # What the tool wrote: both reports (the Parquet file raw and decoded) and the ledger.
    csv_text = reports["report.csv"].read_text()
    assert "no longer exists" in csv_text or "NoSuchKey" in csv_text, csv_text[:2000]
    seen.add("report.csv", csv_text)
    seen.add("report.parquet (bytes)", reports["report.parquet"].read_bytes().decode("latin-1"))
    frame = pd.read_parquet(reports["report.parquet"])
    assert len(frame) == len(job.objects)
    buf = io.StringIO()
    frame.to_csv(buf, index=False)
    seen.add("report.parquet (rows)", buf.getvalue())
    for where, text in dump_ledger(ledger_url).items():
        seen.add(where, text)
    assert any("migrator_objects" in k and text for k, text in seen.texts.items())

    problems = [f"secret found in {leak}" for leak in seen.leaks()]
    problems += [f"unmasked password in a URL in {url}" for url in seen.unmasked_urls()]
    assert not problems, "\n".join(problems)
