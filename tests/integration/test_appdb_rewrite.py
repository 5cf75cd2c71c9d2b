"""``AppDatabase.rewrite`` on SQLite, Postgres and MySQL/MariaDB: batches of the worker's size and
larger ones (Postgres binds each batch as two arrays, and keeps large batches to index lookups;
MySQL joins one JSON_TABLE), value templates, several targets in one transaction, and exact
matches where MySQL's default collation would ignore case and trailing spaces."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from migrator.appdb import AppDatabase
from migrator.config import AppDB

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
