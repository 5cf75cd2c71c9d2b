"""``AppDatabase.rewrite`` on SQLite, Postgres and MySQL/MariaDB: batches of the worker's size and
larger ones (Postgres binds each batch as two arrays, and keeps large batches to index lookups;
MySQL joins one JSON_TABLE), value templates, several targets in one transaction, and exact
matches where MySQL's default collation would ignore case and trailing spaces."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import sqlalchemy as sa

from migrator.appdb import AppDatabase
from migrator.config import AppDB
from migrator.errors import PreflightError, UnreachableError

ROWS = 3000


@pytest.fixture
def app(app_url: str) -> Iterator[AppDatabase]:
    url = app_url
    engine = sa.create_engine(url)
    table = sa.Table(
        "avatars",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("user_id", sa.Integer, nullable=False),
        sa.Column("path", sa.String(1024), nullable=True, index=True),
    )
    with engine.begin() as conn:
        table.create(conn)
        conn.execute(
            table.insert(),
            [{"user_id": i, "path": f"image/{i:06d}.png"} for i in range(ROWS)]
            + [{"user_id": 7, "path": "image/000007.png"}]  # two rows hold one key
            + [{"user_id": -1, "path": None}, {"user_id": -2, "path": "banner/1.png"}],
        )
    engine.dispose()
    db = AppDatabase(AppDB(url=url, table="avatars", column="path"))
    yield db
    db.dispose()


def paths(app: AppDatabase) -> dict[int, str | None]:
    with app.engine.connect() as conn:
        return dict(conn.execute(sa.select(app.table.c.id, app.column)).all())


@pytest.mark.parametrize("batch", [500, 2500])
def test_rewrite_batches_points_rows_at_new_keys_and_replays_as_no_op(
    app: AppDatabase, batch: int
) -> None:
    before = paths(app)
    pairs = [(f"image/{i:06d}.png", f"avatar/{i:06d}.png") for i in range(ROWS)]
    changed = sum(app.rewrite(pairs[i : i + batch]) for i in range(0, ROWS, batch))
    assert changed == ROWS + 1  # the key held by two rows changed both
    after = paths(app)
    for row_id, old in before.items():
        if old is not None and old.startswith("image/"):
            assert after[row_id] == "avatar/" + old.removeprefix("image/")
        else:
            assert after[row_id] == old
    assert sum(app.rewrite(pairs[i : i + batch]) for i in range(0, ROWS, batch)) == 0
    assert paths(app) == after
    assert app.still_pointing(pairs) == []


def test_planner_settings_stay_inside_the_rewrite_transaction(app: AppDatabase) -> None:
    pairs = [(f"image/{i:06d}.png", f"avatar/{i:06d}.png") for i in range(2000)]
    assert app.rewrite(pairs) == 2001
    if app.engine.dialect.name != "postgresql":
        return
    with app.engine.connect() as conn:
        assert conn.exec_driver_sql("SHOW enable_hashjoin").scalar_one() == "on"
        assert conn.exec_driver_sql("SHOW enable_mergejoin").scalar_one() == "on"


LEGACY = "https://legacy.s3.amazonaws.com/{key}"
CDN = "https://cdn.example.com/{key}"


def make_tables(url: str, *, poison: str | None = None) -> None:
    """``avatars.path`` holding bare keys and legacy URLs, ``profiles.photo_url`` holding legacy
    URLs; ``poison``: a CHECK constraint that refuses that one value in ``profiles``."""
    engine = sa.create_engine(url)
    meta = sa.MetaData()
    avatars = sa.Table(
        "avatars",
        meta,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("path", sa.String(1024)),
    )
    checks = [sa.CheckConstraint(f"photo_url <> '{poison}'")] if poison else []
    profiles = sa.Table(
        "profiles",
        meta,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("photo_url", sa.String(1024)),
        *checks,
    )
    sa.Index("ix_avatars_path", avatars.c.path, mysql_length=768)
    sa.Index("ix_profiles_photo_url", profiles.c.photo_url, mysql_length=768)
    with engine.begin() as conn:
        meta.create_all(conn)
        conn.execute(avatars.insert(), [{"id": i, "path": v} for i, v in enumerate(AVATARS, 1)])
        conn.execute(
            profiles.insert(), [{"id": i, "photo_url": v} for i, v in enumerate(PROFILES, 1)]
        )
    engine.dispose()


def legacy(key: str) -> str:
    return "https://legacy.s3.amazonaws.com/" + key


def cdn(key: str) -> str:
    return "https://cdn.example.com/" + key


AVATARS = [
    "image/a.png",  # 0: bare key
    legacy("image/a.png"),  # 1: the same key as a URL
    "image/A.png",  # 2: another object (S3 keys are case-sensitive); not in the batch
    "image/a.png ",  # 3: a trailing space: another key
    "https://other.example.com/image/a.png",  # 4: another host
    None,  # 5
    legacy("image/b.png"),  # 6
]
PROFILES = [
    legacy("image/a.png"),  # 0
    legacy("image/B.png"),  # 1: case differs from image/b.png; not in the batch
    legacy("image/b.png"),  # 2
    "image/b.png",  # 3: a bare key in a column configured for URLs only: not ours
]
PAIRS = [("image/a.png", "avatar/a.png"), ("image/b.png", "avatar/b.png")]


def targets_cfg(url: str) -> AppDB:
    return AppDB(
        url=url,
        targets=[
            {"table": "avatars", "column": "path"},
            {"table": "avatars", "column": "path", "value": LEGACY, "new_value": CDN},
            {"table": "profiles", "column": "photo_url", "value": LEGACY, "new_value": CDN},
        ],
    )


def values(url: str, table: str, column: str) -> list[str | None]:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        rows = conn.execute(sa.text(f"SELECT {column} FROM {table} ORDER BY id")).scalars().all()
    engine.dispose()
    return list(rows)


def test_templates_and_targets_rewrite_exact_values_only(app_url: str) -> None:
    make_tables(app_url)
    if app_url.startswith("mysql"):
        # the premise of the case tests: the server's default collation ignores case
        engine = sa.create_engine(app_url)
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT 'image/a.png' = 'IMAGE/A.PNG '")).scalar() == 1
        engine.dispose()
    db = AppDatabase(targets_cfg(app_url))
    try:
        assert db.count_pointing(PAIRS) == 5
        assert db.still_pointing(PAIRS) == ["image/a.png", "image/b.png"]
        assert db.rewrite(PAIRS) == 5
        assert db.rewrite(PAIRS) == 0  # a replay changes nothing
        assert db.still_pointing(PAIRS) == []
    finally:
        db.dispose()
    assert values(app_url, "avatars", "path") == [
        "avatar/a.png",
        cdn("avatar/a.png"),
        "image/A.png",
        "image/a.png ",
        "https://other.example.com/image/a.png",
        None,
        cdn("avatar/b.png"),
    ]
    assert values(app_url, "profiles", "photo_url") == [
        cdn("avatar/a.png"),
        legacy("image/B.png"),
        cdn("avatar/b.png"),
        "image/b.png",
    ]


def test_delete_guard_sees_an_old_value_in_any_target(app_url: str) -> None:
    make_tables(app_url)
    db = AppDatabase(targets_cfg(app_url))
    try:
        db.rewrite(PAIRS)
        with db.engine.begin() as conn:  # an app still writing the old URL into profiles
            conn.execute(
                sa.text("INSERT INTO profiles (id, photo_url) VALUES (99, :v)"),
                {"v": legacy("image/b.png")},
            )
        found = [(t.name, v, k) for t, v, k in db.pointing(PAIRS)]
        assert found == [("profiles.photo_url", legacy("image/b.png"), "image/b.png")]
        assert db.still_pointing(PAIRS) == ["image/b.png"]
    finally:
        db.dispose()


def test_a_failing_target_rolls_back_every_target_of_the_batch(app_url: str) -> None:
    make_tables(app_url, poison=cdn("avatar/b.png"))
    db = AppDatabase(targets_cfg(app_url))
    try:
        with pytest.raises(sa.exc.DBAPIError):
            db.rewrite(PAIRS)
        # avatars was updated first in the transaction and rolled back with profiles
        assert db.still_pointing(PAIRS) == ["image/a.png", "image/b.png"]
    finally:
        db.dispose()
    assert values(app_url, "avatars", "path") == AVATARS
    assert values(app_url, "profiles", "photo_url") == PROFILES


def test_audit_keys_come_back_in_byte_order_through_the_template(app_url: str) -> None:
    make_tables(app_url)
    db = AppDatabase(targets_cfg(app_url))
    try:
        bare, url, profiles = db.targets
        assert list(db.iter_keys(bare, bare.cfg.old, "image/")) == [
            "image/A.png",
            "image/a.png",
            "image/a.png ",
        ]
        assert list(db.iter_keys(url, url.cfg.old, "image/")) == ["image/a.png", "image/b.png"]
        assert list(db.iter_keys(profiles, profiles.cfg.old, "image/")) == [
            "image/B.png",
            "image/a.png",
            "image/b.png",
        ]
    finally:
        db.dispose()


def test_mariadb_url_takes_the_same_path(mysql_database: Callable[[str], str]) -> None:
    url = mysql_database("app").replace("mysql+pymysql://", "mariadb+pymysql://", 1)
    test_templates_and_targets_rewrite_exact_values_only(url)


def test_each_targets_identifiers_are_checked_against_the_schema(app_url: str) -> None:
    make_tables(app_url)
    bad_column = AppDB(
        url=app_url,
        targets=[{"table": "avatars", "column": "path"}, {"table": "profiles", "column": "nope"}],
    )
    with pytest.raises(PreflightError, match=r"app_db\.targets\[1\]\.column 'nope' does not"):
        AppDatabase(bad_column)
    bad_table = AppDB(url=app_url, targets=[{"table": "avatar", "column": "path"}])
    with pytest.raises(PreflightError, match=r"app_db\.targets\[0\]\.table 'avatar' does not"):
        AppDatabase(bad_table)
    with pytest.raises(PreflightError, match=r"^app_db\.column 'nope' does not exist"):
        AppDatabase(AppDB(url=app_url, table="avatars", column="nope"))


def test_mysql_column_that_is_not_utf8_is_refused(mysql_database: Callable[[str], str]) -> None:
    """Keys are compared as UTF-8 bytes; a latin1 column would make that comparison miss."""
    url = mysql_database("app")
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "CREATE TABLE old_avatars (id INT PRIMARY KEY, path VARCHAR(255)) CHARSET latin1"
            )
        )
    engine.dispose()
    with pytest.raises(PreflightError, match="uses character set latin1"):
        AppDatabase(AppDB(url=url, table="old_avatars", column="path"))


def test_unreachable_mysql_is_one_line_without_the_password() -> None:
    from tests.conftest import free_port

    url = f"mysql+pymysql://root:s3cretpw@127.0.0.1:{free_port()}/app"
    with pytest.raises(UnreachableError) as info:
        AppDatabase(AppDB(url=url, table="avatars", column="path"))
    message = str(info.value)
    assert "s3cretpw" not in message and "\n" not in message
    assert message.startswith("app database mysql+pymysql://root:***@127.0.0.1:")
