"""The CLI with bad input: exit 2, one ``error:`` line, no traceback, and nothing written.

Every case builds a real job (buckets and objects on the moto server, the app table in a real
database), breaks one thing in config.yaml, runs ``migrator`` in a subprocess and then checks
from the outside that no ledger was created, nothing reached the destination bucket, no source
went away and the app rows are exactly as seeded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import yaml

from tests import helpers
from tests.conftest import free_port, unique
from tests.helpers import Job, app_paths, list_keys, make_job, run_cli, write_config

Edit = Callable[[dict[str, Any], Path], None]


@dataclass
class Before:
    """What the world looked like before the bad command."""

    files: set[Path]
    sources: set[str]
    app: list[str | None] | None


def tree(root: Path) -> set[Path]:
    return {p.relative_to(root) for p in root.rglob("*")}


def snapshot(job: Job) -> Before:
    return Before(
        files=tree(job.dir),
        sources=list_keys(job.s3, job.cfg.source.bucket),
        app=app_paths(job) if job.cfg.app_db is not None else None,
    )


def assert_rejected(proc: Any, *, says: str | tuple[str, ...]) -> str:
    """Exit 2, stdout empty, exactly one stderr line ``error: ...`` and no traceback."""
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out, out
    assert proc.returncode == 2, f"exit {proc.returncode}: {out}"
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {lines!r}"
    assert lines[0].startswith("error: "), lines[0]
    assert proc.stdout.strip() == "", proc.stdout
    for part in (says,) if isinstance(says, str) else says:
        assert part in lines[0], f"{part!r} not in {lines[0]!r}"
    return lines[0]


def assert_nothing_written(job: Job, before: Before, ledger: Path) -> None:
    assert not ledger.exists(), f"ledger {ledger} was created"
    assert tree(job.dir) == before.files, "files appeared or vanished in the job directory"
    assert list_keys(job.s3, job.cfg.destination.bucket) == set(), "objects were copied"
    assert list_keys(job.s3, job.cfg.source.bucket) == before.sources, "sources changed"
    if before.app is not None:
        assert app_paths(job) == before.app, "app rows changed"


def edit_config(job: Job, edit: Edit) -> None:
    data = yaml.safe_load(job.config_path.read_text())
    edit(data, job.dir)
    write_config(job.config_path, data)


@pytest.fixture
def sqlite_job(tmp_path: Path, moto_s3: Any, moto_endpoint: str) -> Job:
    """A small job with a SQLite ledger (not yet created) and a SQLite app table."""
    return helpers.sqlite_job(tmp_path, moto_s3, moto_endpoint, with_app=True, count=4)


def _set(section: str | None, **values: Any) -> Edit:
    def edit(data: dict[str, Any], _dir: Path) -> None:
        (data[section] if section else data).update(values)

    return edit


def _unknown_bucket(side: str) -> Edit:
    def edit(data: dict[str, Any], _dir: Path) -> None:
        data[side]["bucket"] = unique("no-such")

    return edit


def _closed_endpoint(data: dict[str, Any], _dir: Path) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    data["source"]["endpoint_url"] = endpoint
    data["destination"]["endpoint_url"] = endpoint


def _dest_inside_source(data: dict[str, Any], _dir: Path) -> None:
    data["destination"]["bucket"] = data["source"]["bucket"]
    data["destination"]["prefix"] = data["source"]["prefix"] + "avatar/"


def _source_inside_dest(data: dict[str, Any], _dir: Path) -> None:
    data["destination"]["bucket"] = data["source"]["bucket"]
    data["destination"]["prefix"] = ""


def _server_copy_to_other_endpoint(data: dict[str, Any], _dir: Path) -> None:
    data["copy_mode"] = "server"
    data["destination"]["endpoint_url"] = data["destination"]["endpoint_url"].replace(
        "127.0.0.1", "localhost"
    )


def _app_db_closed_port(data: dict[str, Any], _dir: Path) -> None:
    data["app_db"]["url"] = f"postgresql+psycopg2://postgres@127.0.0.1:{free_port()}/app"


def _app_db_missing_sqlite_file(data: dict[str, Any], d: Path) -> None:
    data["app_db"]["url"] = f"sqlite:///{d / 'typo-app.db'}"


def _app_targets_second_column_missing(data: dict[str, Any], _dir: Path) -> None:
    url = data["app_db"]["url"]
    data["app_db"] = {
        "url": url,
        "targets": [
            {"table": "avatars", "column": "path"},
            {"table": "avatars", "column": "no_such_column", "value": "https://x.example/{key}"},
        ],
    }


# Rejected by config validation: the command does not matter, `run` stands for all.
CONFIG_CASES: list[tuple[str, Edit, tuple[str, ...]]] = [
    ("invalid-config", _set(None, workers=0), ("workers", "greater than or equal to 1")),
    ("unknown-key", _set(None, worker=2), ("did you mean 'workers'",)),
    ("bad-delete-policy", _set(None, delete_source="sometimes"), ("delete_source",)),
    ("part-size-below-5-mib", _set(None, part_size=1024 * 1024), ("part_size", "5 MiB")),
    ("part-size-above-5-gib", _set(None, part_size=6 * 1024**3), ("part_size", "5 GiB")),
    ("part-size-not-bytes", _set(None, part_size="64MB"), ("part_size", "integer")),
    (
        "threshold-above-5-gib",
        _set(None, multipart_threshold=5 * 1024**3 + 1),
        ("multipart_threshold", "one CopyObject copies at most 5 GiB"),
    ),
    (
        "app-value-without-key",
        _set("app_db", value="https://legacy.s3.amazonaws.com/"),
        ("app_db.value", "must contain {key} exactly once"),
    ),
    (
        "app-targets-and-table",
        _set("app_db", targets=[{"table": "avatars", "column": "path"}]),
        ("app_db", "not both"),
    ),
    ("destination-inside-source", _dest_inside_source, ("overlaps source prefix",)),
    (
        "server-copy-across-endpoints",
        _server_copy_to_other_endpoint,
        ("copy_mode: server needs source and destination on the same endpoint_url",),
    ),
    (
        "role-arn-malformed",
        _set("destination", role_arn="arn:aws:iam::12345:role/x"),
        ("destination.role_arn", "is not an IAM role ARN"),
    ),
    (
        "external-id-without-role",
        _set("source", external_id="abc-123"),
        ("source", "external_id is used only with role_arn"),
    ),
    ("copy-mode-unknown", _set(None, copy_mode="fast"), ("copy_mode", "'auto', 'server'")),
    ("source-inside-destination", _source_inside_dest, ("overlaps source prefix",)),
    (
        "keys-bad-regex",
        _set(None, keys={"pattern": r"^image/(\d+", "replace": r"avatar/\1"}),
        ("keys.pattern", "is not a Python regular expression", "missing )"),
    ),
    (
        "keys-unknown-group",
        _set(None, keys={"pattern": r"^image/(\d+)$", "replace": r"avatar/\2"}),
        ("keys: replace", "invalid group reference 2"),
    ),
    (
        "keys-replace-outside-destination",
        _set(None, keys={"pattern": r"^image/(.*)$", "replace": r"photos/\1"}),
        ("does not start with destination.prefix 'avatar/'",),
    ),
    (
        "metadata-replace-without-values",
        _set(None, metadata="replace"),
        ("metadata_values", "is required with metadata: replace"),
    ),
    ("unknown-storage-class", _set(None, storage_class="COLD"), ("storage_class", "COLD")),
    (
        "kms-key-without-sse-kms",
        _set(None, kms_key_id="alias/avatars"),
        ("kms_key_id", "is used only with sse: aws:kms"),
    ),
    ("acl-not-canned", _set(None, acl="full-control"), ("acl", "not a canned ACL")),
    (
        "ledger-port-not-a-number",
        _set(None, ledger="postgresql+psycopg2://postgres@127.0.0.1:fivefour/ledger"),
        ("ledger",),
    ),
]

# Rejected by pre-flight checks against the real servers, for both commands that write.
PREFLIGHT_CASES: list[tuple[str, Edit, tuple[str, ...]]] = [
    ("unknown-source-bucket", _unknown_bucket("source"), ("source:", "does not exist")),
    (
        "unknown-destination-bucket",
        _unknown_bucket("destination"),
        ("destination:", "does not exist"),
    ),
    ("unreachable-endpoint", _closed_endpoint, ("cannot reach S3 endpoint",)),
    ("missing-app-table", _set("app_db", table="no_such_table"), ("'no_such_table'", "not exist")),
    (
        "missing-app-column",
        _set("app_db", column="no_such_column"),
        ("'no_such_column'", "does not exist in table"),
    ),
    (
        "missing-column-in-second-target",
        _app_targets_second_column_missing,
        ("app_db.targets[1].column 'no_such_column'", "does not exist in table"),
    ),
    ("app-db-unreachable", _app_db_closed_port, ("app database", "not reachable")),
    ("app-db-file-missing", _app_db_missing_sqlite_file, ("app_db.url", "does not exist")),
]


def check_rejected_and_untouched(job: Job, command: str, says: tuple[str, ...]) -> None:
    before = snapshot(job)
    proc = run_cli(command, "--config", str(job.config_path), cwd=job.dir, timeout=120)
    assert_rejected(proc, says=says)
    assert_nothing_written(job, before, job.dir / "ledger.db")


@pytest.mark.parametrize(("edit", "says"), [pytest.param(e, s, id=i) for i, e, s in CONFIG_CASES])
def test_invalid_config_writes_nothing(sqlite_job: Job, edit: Edit, says: tuple[str, ...]) -> None:
    edit_config(sqlite_job, edit)
    check_rejected_and_untouched(sqlite_job, "run", says)


@pytest.mark.parametrize(
    ("edit", "says"), [pytest.param(e, s, id=i) for i, e, s in PREFLIGHT_CASES]
)
@pytest.mark.parametrize("command", ["plan", "run"])
def test_failed_preflight_writes_nothing(
    sqlite_job: Job, command: str, edit: Edit, says: tuple[str, ...]
) -> None:
    edit_config(sqlite_job, edit)
    check_rejected_and_untouched(sqlite_job, command, says)


@pytest.mark.parametrize(
    ("edit", "says"),
    [
        (_set("app_db", table="no_such_table"), ("'no_such_table'", "not exist")),
        (_set("app_db", column="no_such_column"), ("'no_such_column'", "does not exist in table")),
    ],
    ids=["missing-app-table", "missing-app-column"],
)
def test_bad_app_table_on_each_backend_writes_nothing(
    tmp_path: Path,
    moto_s3: Any,
    moto_endpoint: str,
    db_urls: dict[str, str],
    edit: Edit,
    says: tuple[str, ...],
) -> None:
    job = make_job(
        tmp_path, moto_s3, moto_endpoint, ledger=db_urls["ledger"], app=db_urls["app"], count=3
    )
    edit_config(job, edit)
    before = snapshot(job)
    proc = run_cli("run", "--config", str(job.config_path), cwd=job.dir, timeout=120)
    assert_rejected(proc, says=says)
    assert_nothing_written(job, before, tmp_path / "ledger.db")
    assert ledger_tables(db_urls["ledger"]) == set(), "the ledger schema was created"


def ledger_tables(url: str) -> set[str]:
    engine = sa.create_engine(url)
    try:
        return {t for t in sa.inspect(engine).get_table_names() if t.startswith("migrator_")}
    finally:
        engine.dispose()


# -- missing files and commands that need a ledger ----------------------------------------


@pytest.mark.parametrize("command", ["plan", "run", "status"])
def test_missing_config_file(tmp_path: Path, command: str) -> None:
    proc = run_cli(command, cwd=tmp_path, timeout=60)  # default ./config.yaml, absent
    assert_rejected(proc, says=("config.yaml", "not found"))
    assert tree(tmp_path) == set()
    proc = run_cli(command, "--config", str(tmp_path / "missing.yaml"), cwd=tmp_path)
    assert_rejected(proc, says=("missing.yaml", "not found"))
    assert tree(tmp_path) == set()


def test_report_with_an_unknown_extension(sqlite_job: Job) -> None:
    job = sqlite_job
    before = snapshot(job)
    out = job.dir / "x.txt"
    proc = run_cli("report", "--config", str(job.config_path), "--out", str(out), cwd=job.dir)
    assert_rejected(proc, says=("x.txt", ".csv or .parquet"))
    assert not out.exists()
    assert_nothing_written(job, before, job.dir / "ledger.db")


@pytest.mark.parametrize(
    "args",
    [
        ("status",),
        ("status", "--json"),
        ("retry-failed",),
        ("report", "--out", "r.csv"),
        ("verify",),
    ],
    ids=lambda a: " ".join(a),
)
def test_reading_a_ledger_that_does_not_exist(sqlite_job: Job, args: tuple[str, ...]) -> None:
    job = sqlite_job
    before = snapshot(job)
    proc = run_cli(*args, "--config", str(job.config_path), cwd=job.dir)
    assert_rejected(proc, says=("no ledger in", "migrator plan"))
    assert_nothing_written(job, before, job.dir / "ledger.db")


@pytest.mark.parametrize("args", [("status",), ("retry-failed",)], ids=lambda a: a[0])
def test_reading_an_empty_postgres_ledger_creates_no_tables(
    tmp_path: Path,
    moto_s3: Any,
    moto_endpoint: str,
    pg_database: Callable[[str], str],
    args: tuple[str, ...],
) -> None:
    """An empty database holds no ledger; a read-only command must not create one there."""
    url = pg_database("empty")
    job = make_job(tmp_path, moto_s3, moto_endpoint, ledger=url, app=None, count=2)
    proc = run_cli(*args, "--config", str(job.config_path), cwd=job.dir)
    assert_rejected(proc, says="migrator plan")
    assert ledger_tables(url) == set(), "a read-only command created the ledger schema"


def test_status_on_a_postgres_database_that_does_not_exist(
    tmp_path: Path, pg_admin_url: str
) -> None:
    url = sa.engine.make_url(pg_admin_url).set(database=unique("mt_absent")).render_as_string(False)
    data = {
        "job": "j",
        "ledger": url,
        "source": {"bucket": "legacy", "prefix": "image/"},
        "destination": {"bucket": "production", "prefix": "avatar/"},
    }
    path = write_config(tmp_path / "config.yaml", data)
    proc = run_cli("status", "--config", str(path), cwd=tmp_path)
    assert_rejected(proc, says=("ledger", "not usable"))


# -- secrets ------------------------------------------------------------------------------

AWS_SECRET = "AwsSecretForTests/9f8e7d6c5b4a"
PG_PASSWORD = "PgPassw0rdForTests"


def _pg_url(db: str) -> str:
    """A Postgres URL with a password, on a port where nothing listens."""
    return f"postgresql+psycopg2://migrator:{PG_PASSWORD}@127.0.0.1:{free_port()}/{db}"


def _app_db_password(then: Edit | None = None) -> Edit:
    def edit(data: dict[str, Any], d: Path) -> None:
        data["app_db"]["url"] = _pg_url("app")
        if then is not None:
            then(data, d)

    return edit


def _ledger_password(data: dict[str, Any], _dir: Path) -> None:
    data["ledger"] = _pg_url("ledger")


def _ledger_password_and_bad_workers(data: dict[str, Any], d: Path) -> None:
    _ledger_password(data, d)
    data["workers"] = 0


@pytest.mark.parametrize(
    ("command", "edit", "says"),
    [
        ("plan", _app_db_password(_unknown_bucket("source")), "does not exist"),
        ("run", _app_db_password(_closed_endpoint), "cannot reach"),
        ("run", _app_db_password(), "not reachable"),
        ("plan", _ledger_password, "not usable"),
        ("status", _ledger_password, "not usable"),
        ("status", _ledger_password_and_bad_workers, "workers"),
    ],
    ids=["plan-bucket", "run-endpoint", "run-app-db", "plan-ledger", "status-ledger", "status-cfg"],
)
def test_no_secret_in_output(sqlite_job: Job, command: str, edit: Edit, says: str) -> None:
    job = sqlite_job
    edit_config(job, edit)
    before = snapshot(job)
    env = {"AWS_SECRET_ACCESS_KEY": AWS_SECRET}
    for flags in ([], ["-vv"]):
        proc = run_cli(*flags, command, "--config", str(job.config_path), cwd=job.dir, env=env)
        out = proc.stdout + proc.stderr
        assert AWS_SECRET not in out
        assert PG_PASSWORD not in out
        if not flags:
            assert_rejected(proc, says=says)
        else:
            assert proc.returncode == 2 and "Traceback" not in out, out
    assert_nothing_written(job, before, job.dir / "ledger.db")


def test_secret_never_in_output_of_a_failing_copy_with_verbose_logging(
    sqlite_job: Job,
) -> None:
    """A run whose rows fail (sources deleted after plan) logs errors; none carries a secret."""
    job = sqlite_job
    env = {"AWS_SECRET_ACCESS_KEY": AWS_SECRET}
    assert run_cli("plan", "--config", str(job.config_path), env=env).returncode == 0
    for obj in job.objects[:2]:
        job.s3.delete_object(Bucket=job.cfg.source.bucket, Key=obj.key)
    proc = run_cli("-vv", "run", "--config", str(job.config_path), env=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    report = job.dir / "r.csv"
    for args in (["status"], ["status", "--json"], ["report", "--out", str(report)]):
        res = run_cli(*args, "--config", str(job.config_path), env=env)
        assert res.returncode == 0, res.stderr
        assert AWS_SECRET not in res.stdout + res.stderr
    assert "source object no longer exists" in report.read_text()
    assert AWS_SECRET not in proc.stdout + proc.stderr + report.read_text()
    ledger_files = list(job.dir.glob("ledger.db*"))
    assert ledger_files, "the ledger should exist after plan and run"
    for path in ledger_files:  # nor in any ledger row
        assert AWS_SECRET.encode() not in path.read_bytes()


def test_bad_app_column_on_mysql_writes_nothing(
    tmp_path: Path, moto_s3: Any, moto_endpoint: str, mysql_database: Callable[[str], str]
) -> None:
    """The seeder creates the app table on MariaDB; reflection there refuses a wrong column."""
    job = make_job(
        tmp_path,
        moto_s3,
        moto_endpoint,
        ledger=f"sqlite:///{tmp_path / 'ledger.db'}",
        app=mysql_database("app"),
        count=3,
    )
    edit_config(job, _set("app_db", column="no_such_column"))
    before = snapshot(job)
    proc = run_cli("run", "--config", str(job.config_path), cwd=job.dir, timeout=120)
    assert_rejected(proc, says=("'no_such_column'", "does not exist in table"))
    assert_nothing_written(job, before, tmp_path / "ledger.db")


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("run", "--max-delete", "-1"), ("Invalid value for '--max-delete'", "run --help")),
        (("run", "--no-such-option"), ("No such option '--no-such-option'", "run --help")),
        (("export-manifest",), ("Missing option '--out'", "export-manifest --help")),
        (("import-report",), ("Missing argument 'REPORT'", "import-report --help")),
        (("report",), ("say what to write: --out FILE, --summary or --html FILE",)),
        (("report", "--out", "r.csv", "--json"), ("--json goes with --summary",)),
        (("no-such-command",), ("No such command 'no-such-command'",)),
    ],
    ids=[
        "out-of-range",
        "unknown-option",
        "missing-option",
        "missing-argument",
        "report-nothing",
        "report-json-alone",
        "unknown-command",
    ],
)
def test_bad_command_line_is_one_line(tmp_path: Path, args: tuple[str, ...], says: tuple) -> None:
    """click's own usage errors follow the same rule as a bad config: one line, exit 2."""
    proc = run_cli(*args, cwd=tmp_path)
    assert_rejected(proc, says=says)
    assert list(tmp_path.iterdir()) == []
