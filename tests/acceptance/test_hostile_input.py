"""Hostile input through the CLI: odd identifiers, odd config files, odd values, odd rows.

The cases here complement ``test_bad_input.py`` (mistakes a user makes) with input an attacker
or a broken tool could produce. Each bad case runs ``migrator`` in a subprocess and expects
exit 2, one ``error:`` line (or one line per config problem), no traceback, and nothing
written: no ledger, an empty destination bucket, sources and app rows as seeded.
"""

from __future__ import annotations

import json
import os
import random
import resource
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests import helpers
from tests.acceptance.test_bad_input import (
    assert_nothing_written,
    assert_rejected,
    edit_config,
    ledger_tables,
    snapshot,
)
from tests.conftest import free_port, unique
from tests.helpers import Job, list_keys, make_job, run_cli

MAX_LINE = 1000  # an error line longer than this is not "one clear line"


@pytest.fixture
def job(tmp_path: Path, moto_s3: Any, moto_endpoint: str) -> Job:
    """A small job with a SQLite ledger (not yet created) and a SQLite app table."""
    return helpers.sqlite_job(tmp_path, moto_s3, moto_endpoint, with_app=True, count=4)


def assert_config_rejected(proc: Any, config: Path, says: Sequence[str] = ()) -> list[str]:
    """Exit 2, no traceback, nothing on stdout; stderr is ``error: <first problem>`` followed
    by one line per further problem, each naming the config file and each of sane length."""
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out, out[-800:]
    assert proc.returncode == 2, f"exit {proc.returncode}: {out[-800:]}"
    assert proc.stdout.strip() == "", proc.stdout[:500]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines, "no error message"
    assert lines[0].startswith("error: "), lines[0][:500]
    for line in lines:
        assert len(line) < MAX_LINE, f"error line of {len(line):,} characters: {line[:200]!r}..."
    for line in lines[1:]:
        assert line.startswith(str(config)), f"stray line {line[:300]!r}"
    joined = "\n".join(lines)
    for part in says:
        assert part in joined, f"{part!r} not in {joined!r}"
    return lines


def run_bounded(
    *args: str, cwd: Path, seconds: float, memory: int = 2 * 2**30
) -> subprocess.CompletedProcess[str]:
    """``migrator`` with a wall-clock limit and an address-space cap, so a bomb cannot take the
    (shared) machine down with it; exceeding either fails the test."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    started = time.monotonic()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "migrator", *args],
            cwd=cwd,
            env=dict(os.environ),
            capture_output=True,
            text=True,
            timeout=seconds,
            preexec_fn=limit,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"migrator {' '.join(args)} did not finish within {seconds} s")
    assert "MemoryError" not in proc.stderr, f"ran out of {memory:,} bytes: {proc.stderr[-500:]}"
    assert time.monotonic() - started < seconds
    return proc


# -- identifiers: refused by reflection, never interpolated ----------------------------------

IDENTIFIER_CASES: list[tuple[str, str, dict[str, str], tuple[str, ...]]] = (
    [
        (
            backend,
            "table-statement-injection",
            {"table": "avatars; drop table avatars"},
            ("'avatars; drop table avatars'", "does not exist"),
        )
        for backend in ("sqlite", "postgres")
    ]
    + [
        (
            "postgres",
            "table-quote-comment",
            {"table": 'avatars"--'},
            ("avatars\"--'", "does not exist"),
        ),
        (
            "postgres",
            "column-statement-injection",
            {"column": "path; drop table avatars"},
            ("'path; drop table avatars'", "does not exist in table"),
        ),
    ]
    + [
        (backend, "column-is-integer", {"column": "user_id"}, ("'user_id'", "not a text column"))
        for backend in ("sqlite", "postgres")
    ]
)


def app_table_state(url: str) -> tuple[bool, int, list[str]]:
    """Whether ``avatars`` exists, its row count, and every table in the app database."""
    engine = sa.create_engine(url)
    try:
        insp = sa.inspect(engine)
        tables = sorted(insp.get_table_names())
        if "avatars" not in tables:
            return False, 0, tables
        with engine.connect() as conn:
            n = conn.execute(sa.text("SELECT count(*) FROM avatars")).scalar_one()
        return True, n, tables
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    ("db_kind", "change", "says"),
    [pytest.param(b, c, s, id=f"{b}-{i}") for b, i, c, s in IDENTIFIER_CASES],
)
def test_hostile_identifiers_are_refused_and_the_table_survives(
    tmp_path: Path,
    moto_s3: Any,
    moto_endpoint: str,
    db_kind: str,
    db_urls: dict[str, str],
    change: dict[str, str],
    says: tuple[str, ...],
) -> None:
    assert db_urls["app"].startswith("sqlite" if db_kind == "sqlite" else "postgresql")
    job = make_job(
        tmp_path, moto_s3, moto_endpoint, ledger=db_urls["ledger"], app=db_urls["app"], count=3
    )
    edit_config(job, lambda data, _dir: data["app_db"].update(change))
    before = snapshot(job)
    table_before = app_table_state(db_urls["app"])
    assert table_before[:2] == (True, len(before.app or []))
    proc = run_cli("run", "--config", str(job.config_path), cwd=job.dir, timeout=120)
    assert_rejected(proc, says=says)
    assert app_table_state(db_urls["app"]) == table_before, "the app database changed"
    assert_nothing_written(job, before, tmp_path / "ledger.db")
    assert ledger_tables(db_urls["ledger"]) == set(), "the ledger schema was created"


# -- the config file itself ------------------------------------------------------------------


def _write(text: bytes) -> Callable[[Path], Path]:
    def make(config: Path) -> Path:
        config.write_bytes(text)
        return config

    return make


def _directory(config: Path) -> Path:
    d = config.parent / "config.d"
    d.mkdir()
    return d


def _deeply_nested(config: Path) -> Path:
    """Valid YAML, 2 KB: a flow sequence nested 1,000 deep under an unknown key."""
    text = config.read_text() + "extra: " + "[" * 1000 + "]" * 1000 + "\n"
    config.write_text(text)
    return config


def _proc_self_mem(_config: Path) -> Path:
    """A path that is a regular file but whose read() fails (EIO), even for root."""
    return Path("/proc/self/mem")


_GARBAGE = random.Random(20240229).randbytes(4096)

FILE_CASES: list[tuple[str, Callable[[Path], Path], tuple[str, ...]]] = [
    ("yaml-list", _write(b"- job\n- source\n- destination\n"), ("expected a mapping",)),
    ("yaml-scalar", _write(b"avatars\n"), ("expected a mapping",)),
    ("binary-garbage", _write(_GARBAGE), ("not UTF-8",)),
    ("control-characters", _write(b"job: a\x00b\x07\n"), ("YAML",)),
    ("directory", _directory, ("config.d",)),
    ("nested-1000-deep", _deeply_nested, ("config.yaml",)),
    ("read-fails-with-eio", _proc_self_mem, ("/proc/self/mem",)),
]


@pytest.mark.parametrize(("make", "says"), [pytest.param(m, s, id=i) for i, m, s in FILE_CASES])
def test_config_file_that_is_not_a_config(
    job: Job, make: Callable[[Path], Path], says: tuple[str, ...]
) -> None:
    config = make(job.config_path)
    if config.is_absolute() and not config.is_relative_to(job.dir):
        assert config.exists(), f"{config} is not available on this system"
    before = snapshot(job)
    proc = run_cli("run", "--config", str(config), cwd=job.dir, timeout=60)
    assert_config_rejected(proc, config, says)
    assert_nothing_written(job, before, job.dir / "ledger.db")


def _alias_bomb(levels: int = 9, width: int = 9) -> str:
    """'Billion laughs': ``width ** levels`` (387 million) leaves if anything expands it."""
    lines = ["a0: &a0 [" + ", ".join(["lol"] * width) + "]"]
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return "lols:\n" + "\n".join("  " + line for line in lines) + "\n"


BOMB_CASES: list[tuple[str, Callable[[str], str], tuple[str, ...]]] = [
    (
        "aliases-9-to-the-9",
        lambda text: text + _alias_bomb() + "junk: [*a9, *a9, *a9]\n",
        ("lols: unknown key", "junk: unknown key"),
    ),
    (
        "self-referencing-anchor",
        lambda text: text + "loop: &loop {again: *loop, more: [*loop, *loop]}\n",
        ("loop: unknown key",),
    ),
]


@pytest.mark.parametrize(("bomb", "says"), [pytest.param(b, s, id=i) for i, b, s in BOMB_CASES])
def test_yaml_bombs_are_bounded(
    job: Job, bomb: Callable[[str], str], says: tuple[str, ...]
) -> None:
    """A few hundred bytes of anchors must neither hang nor exhaust memory: the answer (here
    the unknown keys) comes within 10 s and 2 GiB."""
    job.config_path.write_text(bomb(job.config_path.read_text()))
    assert job.config_path.stat().st_size < 2000
    before = snapshot(job)
    proc = run_bounded("run", "--config", str(job.config_path), cwd=job.dir, seconds=10)
    assert_config_rejected(proc, job.config_path, says)
    assert_nothing_written(job, before, job.dir / "ledger.db")


def test_bomb_as_the_value_of_a_typed_key_is_bounded(job: Job) -> None:
    """The expanded bomb where a string is expected: a type error, not a walk of its leaves."""
    kept = [row for row in job.config_path.read_text().splitlines() if not row.startswith("job:")]
    job.config_path.write_text("\n".join(kept) + "\n" + _alias_bomb() + "job: *a9\n")
    before = snapshot(job)
    proc = run_bounded("run", "--config", str(job.config_path), cwd=job.dir, seconds=10)
    assert_config_rejected(
        proc, job.config_path, ("job: Input should be a valid string", "lols: unknown key")
    )
    assert_nothing_written(job, before, job.dir / "ledger.db")


# -- size --------------------------------------------------------------------------------------

TEN_MB = 10 * 2**20


def test_ten_megabyte_config_with_a_huge_comment(job: Job) -> None:
    """Valid YAML of 10 MB (a valid config and one huge comment). Either behaviour is fine if
    it is clean: refused with one line that names the size, or accepted and planned normally.
    Either way it must not take unbounded time."""
    text = job.config_path.read_text()
    job.config_path.write_text(text + "# " + "x" * TEN_MB + "\n")
    before = snapshot(job)
    started = time.monotonic()
    proc = run_cli("plan", "--config", str(job.config_path), cwd=job.dir, timeout=120)
    took = time.monotonic() - started
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out, out[-800:]
    assert len(out) < 10_000, f"{len(out):,} characters of output"
    if proc.returncode == 2:  # refused: one line about the size, nothing written
        (line,) = assert_config_rejected(proc, job.config_path)
        assert "MB" in line or "too large" in line or "size" in line, line
        assert_nothing_written(job, before, job.dir / "ledger.db")
    else:  # accepted: a normal plan of the 4 objects
        assert proc.returncode == 0, out[-800:]
        assert "4 listed" in out and "4 new" in out, out
        assert list_keys(job.s3, job.cfg.destination.bucket) == set()
    assert took < 60, f"a 10 MB config took {took:.0f} s"


@pytest.mark.parametrize(
    ("where", "says"),
    [("job", "job"), ("bucket", "source.bucket"), ("unknown-key", "unknown key")],
)
def test_huge_value_gives_a_short_error(job: Job, where: str, says: str) -> None:
    """A huge value (256 KiB) in a field or an unknown key is an error; the message must not
    echo it back: one clear line."""
    huge = "x" * 2**18

    def edit(data: dict[str, Any], _dir: Path) -> None:
        if where == "job":
            data["job"] = huge
        elif where == "bucket":
            data["source"]["bucket"] = huge
        else:
            data["comment"] = huge

    edit_config(job, edit)
    before = snapshot(job)
    proc = run_cli("run", "--config", str(job.config_path), cwd=job.dir, timeout=60)
    lines = assert_config_rejected(proc, job.config_path, (says,))
    assert len(lines) == 1, lines
    assert_nothing_written(job, before, job.dir / "ledger.db")


# -- values ------------------------------------------------------------------------------------


VALUE_CASES: list[tuple[str, str, tuple[str, ...]]] = [
    ("workers-1e9", "workers: 1e9", ("workers", "valid integer")),
    ("workers-1.0e+9", "workers: 1.0e+9", ("workers", "valid integer")),
    ("chunk-size-true", "chunk_size: true", ("chunk_size",)),
    ("workers-on", "workers: on", ("workers",)),
    ("lease-seconds-negative", "lease_seconds: -30", ("lease_seconds", "greater than or equal")),
]


@pytest.mark.parametrize(("line", "says"), [pytest.param(v, s, id=i) for i, v, s in VALUE_CASES])
def test_hostile_values(job: Job, line: str, says: tuple[str, ...]) -> None:
    """YAML spellings of numbers and booleans. ``true``/``on`` are YAML 1.1 booleans: a count
    must not silently become 1."""
    key = line.split(":")[0]
    text = job.config_path.read_text()
    kept = [row for row in text.splitlines() if not row.startswith(f"{key}:")]
    job.config_path.write_text("\n".join([*kept, line]) + "\n")
    before = snapshot(job)
    proc = run_cli("run", "--config", str(job.config_path), cwd=job.dir, timeout=120)
    assert_rejected(proc, says=says)
    assert_nothing_written(job, before, job.dir / "ledger.db")


# -- environment overrides -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("this is not a url", ("ledger", "not a database URL")),
        ("\t☃://\x7f", ("ledger",)),
        (
            "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres?sslmode=bogus",
            ("ledger", "not usable"),
        ),
    ],
    ids=["words", "control-and-unicode", "bad-driver-option"],
)
def test_garbage_in_migrator_ledger(job: Job, value: str, says: tuple[str, ...]) -> None:
    before = snapshot(job)
    env = {"MIGRATOR_LEDGER": value}
    proc = run_cli("run", "--config", str(job.config_path), cwd=job.dir, env=env, timeout=60)
    assert_rejected(proc, says=says)
    assert_nothing_written(job, before, job.dir / "ledger.db")


def test_app_db_url_env_names_a_postgres_database_that_does_not_exist(
    job: Job, pg_admin_url: str
) -> None:
    name = unique("mt_absent")
    url = sa.engine.make_url(pg_admin_url).set(database=name).render_as_string(False)
    before = snapshot(job)
    env = {"MIGRATOR_APP_DB_URL": url}
    proc = run_cli("run", "--config", str(job.config_path), cwd=job.dir, env=env)
    line = assert_rejected(proc, says=("app database", name))
    assert "not reachable" in line or "does not exist" in line, line
    assert_nothing_written(job, before, job.dir / "ledger.db")
    engine = sa.create_engine(pg_admin_url)
    try:
        with engine.connect() as conn:
            found = conn.execute(
                sa.text("SELECT count(*) FROM pg_database WHERE datname = :n"), {"n": name}
            ).scalar_one()
    finally:
        engine.dispose()
    assert found == 0, "the app database was created"


# -- app rows that are not UTF-8 ---------------------------------------------------------------

ODD_ROWS: list[tuple[int, str, bytes]] = [
    # (user_id, how SQLite stores it, bytes) - all outside the migration
    (990_001, "text", b"image/\xff\xfe-not-utf8.png"),  # looks like a source key, is not one
    (990_002, "blob", b"\x00\xffimage/000001.png"),
    (990_003, "text", b"banner/\xc3(.png"),  # a truncated two-byte sequence
]


def sqlite_paths(db: Path) -> dict[int, tuple[str, bytes | None]]:
    """user_id -> (SQLite storage class, raw bytes) of every app row, without decoding."""
    conn = sqlite3.connect(db)
    conn.text_factory = bytes
    try:
        rows = conn.execute("SELECT user_id, typeof(path), path FROM avatars").fetchall()
    finally:
        conn.close()
    return {uid: (kind.decode(), value) for uid, kind, value in rows}


def test_rows_with_invalid_utf8_keys_are_left_alone(job: Job) -> None:
    """Not a bad-config case: the migration must complete (exit 0) around rows whose path is
    not valid UTF-8, and leave those rows byte for byte as they were."""
    db = job.dir / "app.db"
    conn = sqlite3.connect(db)
    try:
        for uid, kind, raw in ODD_ROWS:
            expr = "CAST(? AS TEXT)" if kind == "text" else "?"
            conn.execute(f"INSERT INTO avatars (user_id, path) VALUES (?, {expr})", (uid, raw))
        conn.commit()
    finally:
        conn.close()
    before = sqlite_paths(db)
    assert {uid: before[uid] for uid, _, _ in ODD_ROWS} == {
        uid: (kind, raw) for uid, kind, raw in ODD_ROWS
    }

    proc = run_cli("run", "--quiet", "--config", str(job.config_path), cwd=job.dir)
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out, out[-800:]
    assert proc.returncode == 0, out[-800:]

    after = sqlite_paths(db)
    migrated = {o.user_id: job.dest_key(o.key).encode() for o in job.objects}
    for uid, want in migrated.items():
        assert after[uid] == ("text", want), f"user {uid}: {after[uid]!r}"
    for uid, value in before.items():
        if uid not in migrated:
            assert after[uid] == value, f"user {uid} changed: {value!r} -> {after[uid]!r}"
    dst = job.cfg.destination
    assert list_keys(job.s3, dst.bucket) == {job.dest_key(o.key) for o in job.objects}
    assert list_keys(job.s3, job.cfg.source.bucket) == set()

    # The audit must complete around the odd rows too. The first one lies under the source
    # prefix and names no object, so "points at a source key that does not exist" is the one
    # discrepancy a correct audit may report; aborting on the undecodable value is not.
    proc = run_cli("verify", "--json", "--config", str(job.config_path), cwd=job.dir)
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out, out[-800:]
    assert proc.returncode in (0, 1) and proc.stdout.startswith("{"), out[-800:]
    audit = json.loads(proc.stdout)
    assert audit["checked"] == len(job.objects)
    assert set(audit["discrepancies"]) <= {"app row points at a source key that does not exist"}
    assert sqlite_paths(db) == after


def test_access_denied_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    """A real 403: a moto server with IAM checks on (INITIAL_NO_AUTH_ACTION_COUNT=0) refuses
    credentials it does not know."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        endpoint = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        config = tmp_path / "config.yaml"
        config.write_text(
            "job: denied\n"
            f"ledger: sqlite:///{tmp_path / 'ledger.db'}\n"
            f"source: {{bucket: legacy, prefix: image/, endpoint_url: '{endpoint}'}}\n"
            f"destination: {{bucket: production, prefix: avatar/, endpoint_url: '{endpoint}'}}\n"
        )
        for command in ("plan", "run"):
            proc = run_cli(command, "--config", str(config), cwd=tmp_path, timeout=60)
            assert_rejected(proc, says=("access to bucket 'legacy' denied", "credentials"))
        assert not (tmp_path / "ledger.db").exists()
    finally:
        server.terminate()
        server.wait(timeout=10)
