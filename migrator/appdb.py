"""The application database: reflection, identifier checks, the batched path rewrite.

This is the only module that touches the application database. Table and column names come
from config and are accepted only if reflection finds them; every value is a bound parameter.
A job may name several targets (table, column, value templates); a key appears in a target's
column as its template rendered with the key (``https://legacy.example.com/{key}``), and every
lookup is an exact match on that rendered value.

MySQL/MariaDB compare strings case-insensitively and ignore trailing spaces under their default
collations, but S3 keys are exact byte strings (``image/A.png`` is not ``image/a.png``). The
rewrite there joins on ``col = old`` (so the column's index is used) and on the binary forms
being equal (so only the exact value matches); lookups filter the candidates exactly in Python.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import NoSuchTableError, SQLAlchemyError
from sqlalchemy.sql.expression import Executable

from migrator.config import AppDB as AppDBConfig
from migrator.config import AppTarget, Template
from migrator.errors import PreflightError, UnreachableError, db_reason
from migrator.ledger.repo import safe_url

_IN_BATCH = 1000
# MySQL: the width of JSON_TABLE's columns. A key is at most 1,024 bytes and a template at most
# 1,000 characters each side, so no value is ever cut short (a cut value would match nothing).
_MYSQL_VALUE_CHARS = 3072
_MYSQL = ("mysql", "mariadb")  # the dialect names of mysql+pymysql:// and mariadb+pymysql://
_MYSQL_CHARSETS = ("utf8mb4", "utf8mb3", "utf8")


def _make_engine(url: str) -> Engine:
    if make_url(url).get_backend_name() != "sqlite":
        return sa.create_engine(url, pool_pre_ping=True, pool_size=2, max_overflow=4)
    engine = sa.create_engine(url)

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # SQLite stores whatever bytes an application wrote; a value that is not UTF-8 must
        # not stop a run or an audit (it cannot equal any key we look for).
        dbapi_conn.text_factory = lambda b: b.decode("utf-8", "surrogateescape")

    return engine


@dataclass(frozen=True, eq=False)
class Target:
    """One configured target, reflected: its table and column objects and its templates."""

    cfg: AppTarget
    where: str  # the config path named in messages, e.g. app_db.targets[1]
    table: sa.Table
    column: sa.Column[Any]

    @property
    def name(self) -> str:
        return self.cfg.name

    def pairs(self, keys: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
        """(old value, new value) for each (source key, destination key). A pair whose values
        are equal (same template, same key in another bucket) needs no rewrite and cannot be
        told apart afterwards, so it is left out."""
        old, new = self.cfg.old, self.cfg.new
        out = [(old.render(s), new.render(d)) for s, d in keys]
        return [(o, n) for o, n in out if o != n]

    def old_values(self, keys: Sequence[tuple[str, str]]) -> dict[str, str]:
        """Old value → source key, for the pairs ``pairs`` keeps."""
        old, new = self.cfg.old, self.cfg.new
        return {old.render(s): s for s, d in keys if old.render(s) != new.render(d)}


class AppDatabase:
    """The app database's targets (table and column holding keys), reflected and checked at
    start."""

    def __init__(self, cfg: AppDBConfig, engine: Engine | None = None) -> None:
        self.cfg = cfg
        url = make_url(cfg.url)
        file = url.database if url.get_backend_name() == "sqlite" else None
        if file and file != ":memory:" and not Path(file).is_file():
            # connecting would create an empty database file
            raise PreflightError(f"app database file {file} does not exist; fix app_db.url")
        self.engine = engine or _make_engine(cfg.url)
        self.dialect = self.engine.dialect.name
        self._statements: dict[int, Executable] = {}
        single = not cfg.targets
        tables: dict[str, sa.Table] = {}
        self.targets = [
            self._reflect(t, "app_db" if single else f"app_db.targets[{i}]", tables)
            for i, t in enumerate(cfg.all_targets)
        ]

    @property
    def table(self) -> sa.Table:
        """The first target's table (the only one in the single ``table``/``column`` form)."""
        return self.targets[0].table

    @property
    def column(self) -> sa.Column[Any]:
        return self.targets[0].column

    def _reflect(self, t: AppTarget, where: str, tables: dict[str, sa.Table]) -> Target:
        schema, _, name = t.table.rpartition(".")
        db = safe_url(self.cfg.url)
        try:
            table = tables.get(t.table)
            if table is None:
                insp = sa.inspect(self.engine)
                names = insp.get_table_names(schema=schema or None)
                if name not in names:
                    shown = ", ".join(sorted(names)[:10]) or "none"
                    raise PreflightError(
                        f"{where}.table {t.table!r} does not exist in {db} "
                        f"(tables there: {shown}); fix {where}.table"
                    )
                table = sa.Table(
                    name, sa.MetaData(), schema=schema or None, autoload_with=self.engine
                )
                tables[t.table] = table
            if t.column not in table.c:
                shown = ", ".join(c.name for c in table.c)
                raise PreflightError(
                    f"{where}.column {t.column!r} does not exist in table {t.table!r} "
                    f"(columns: {shown}); fix {where}.column"
                )
            column = table.c[t.column]
            if not isinstance(column.type, sa.String):
                raise PreflightError(
                    f"{where}.column {t.column!r} is {column.type}, not a text column holding "
                    "object keys"
                )
            if self.dialect in _MYSQL:
                self._check_mysql_charset(table, column, where)
        except NoSuchTableError:
            raise PreflightError(f"{where}.table {t.table!r} does not exist in {db}") from None
        except SQLAlchemyError as exc:
            reason = db_reason(exc)
            raise UnreachableError(f"app database {db} is not reachable: {reason}") from None
        return Target(t, where, table, column)

    def _check_mysql_charset(self, table: sa.Table, column: sa.Column[Any], where: str) -> None:
        """The exact comparison compares bytes, which is exact for keys only when the column
        stores UTF-8 (as the values are sent); other character sets are refused, not guessed."""
        q = sa.text(
            "SELECT CHARACTER_SET_NAME FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = "
            "COALESCE(:schema, DATABASE()) AND TABLE_NAME = :table AND COLUMN_NAME = :column"
        )
        with self.engine.connect() as conn:
            charset = conn.execute(
                q, {"schema": table.schema, "table": table.name, "column": column.name}
            ).scalar()
        if charset is not None and charset.lower() not in _MYSQL_CHARSETS:
            raise PreflightError(
                f"{where}.column {column.name!r} uses character set {charset}; migrator "
                "compares keys as UTF-8 bytes, so the column must be utf8mb4 (or utf8mb3)"
            )

    def rewrite(self, pairs: Sequence[tuple[str, str]]) -> int:
        """Point every row of every target holding an old key's value at the new key's value,
        all in one transaction (a failing target rolls back the others).

        ``WHERE column = old`` makes a replay a no-op. Returns the number of rows changed.
        """
        if not pairs:
            return 0
        with self.engine.begin() as conn:
            return sum(self._rewrite(conn, t, t.pairs(pairs)) for t in self.targets)

    def _rewrite(self, conn: sa.Connection, t: Target, pairs: Sequence[tuple[str, str]]) -> int:
        if not pairs:
            return 0
        if conn.dialect.name == "postgresql":
            # One index lookup per pair, for this transaction only. Left to itself the planner
            # hashes the pairs and reads the whole table for every batch once a batch is a
            # few thousand pairs (2.6 times slower for 10,000 pairs on 1.1 million rows), or
            # for any batch when the table's statistics are stale.
            conn.exec_driver_sql(
                "SET LOCAL enable_hashjoin = off; SET LOCAL enable_mergejoin = off"
            )
            olds, news = [o for o, _ in pairs], [n for _, n in pairs]
            stmt = self._statement(t, _update_from_arrays)
            return conn.execute(stmt, {"old": olds, "new": news}).rowcount
        if conn.dialect.name in _MYSQL:
            doc = json.dumps([list(p) for p in pairs], ensure_ascii=False)
            stmt = self._statement(t, _update_from_json)
            return conn.execute(stmt, {"pairs": doc}).rowcount
        # SQLite: one prepared UPDATE executed for the whole batch (executemany).
        col = t.column
        stmt = (
            t.table.update()
            .where(col == sa.bindparam("b_old"))
            .values({col.name: sa.bindparam("b_new")})
        )
        result = conn.execute(stmt, [{"b_old": o, "b_new": n} for o, n in pairs])
        return result.rowcount

    def _statement(self, t: Target, build: Callable[[sa.Dialect, Target], Executable]) -> Any:
        """A target's rewrite statement, built once: the same text for any batch size."""
        key = id(t)
        if key not in self._statements:
            self._statements[key] = build(self.engine.dialect, t)
        return self._statements[key]

    def pointing(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[Target, str, str]]:
        """(target, value, source key) for every row still holding an old key's value. The
        database narrows the rows with ``IN`` (index lookups); Python keeps exact matches only
        (MySQL's ``IN`` ignores case and trailing spaces)."""
        found: list[tuple[Target, str, str]] = []
        with self.engine.connect() as conn:
            for t in self.targets:
                wanted = t.old_values(pairs)
                values = list(wanted)
                for i in range(0, len(values), _IN_BATCH):
                    batch = values[i : i + _IN_BATCH]
                    rows = conn.execute(sa.select(t.column).where(t.column.in_(batch))).scalars()
                    hits = {v for v in rows if isinstance(v, str) and v in wanted}
                    found.extend((t, v, wanted[v]) for v in sorted(hits))
        return found

    def still_pointing(self, pairs: Sequence[tuple[str, str]]) -> list[str]:
        """Source keys that some row of some target still points at (the last check before a
        source is deleted)."""
        return sorted({key for _, _, key in self.pointing(pairs)})

    def iter_keys(self, t: Target, template: Template, prefix: str) -> Iterator[str]:
        """Distinct keys under ``prefix`` that ``t``'s column holds through ``template``, in
        byte order (as S3 lists keys), streamed. With text after ``{key}`` in the template the
        column's order is not the keys' order, so those keys are sorted in memory."""
        keys = (
            k
            for k in (template.key_of(v) for v in self._iter_values(t, template.head + prefix))
            if k is not None and k.startswith(prefix)
        )
        if template.tail:
            yield from sorted(set(keys))
            return
        last = None
        for k in keys:
            if k != last:
                yield k
            last = k

    def _iter_values(self, t: Target, start: str) -> Iterator[str]:
        """Distinct string values of ``t``'s column starting with ``start``, in byte order."""
        col: Any = t.column
        if self.dialect == "postgresql":
            col = col.collate("C")
        elif self.dialect in _MYSQL:
            col = sa.cast(col, sa.LargeBinary)  # byte order, and no case folding in DISTINCT
        q = (
            sa.select(col)
            .where(t.column.startswith(start, autoescape=True))
            .distinct()
            .order_by(col)
        )
        with self.engine.connect() as conn:
            rows = conn.execution_options(stream_results=True, yield_per=1000).execute(q)
            for v in rows.scalars():
                if isinstance(v, bytes | bytearray) and self.dialect in _MYSQL:
                    v = bytes(v).decode("utf-8", "surrogateescape")
                if isinstance(v, str) and v.startswith(start):
                    yield v

    def count_pointing(self, pairs: Sequence[tuple[str, str]]) -> int:
        """How many rows hold an old value of these (source, destination) keys (what a
        rewrite would change)."""
        total = 0
        with self.engine.connect() as conn:
            for t in self.targets:
                wanted = t.old_values(pairs)
                values = list(wanted)
                for i in range(0, len(values), _IN_BATCH):
                    batch = values[i : i + _IN_BATCH]
                    rows = conn.execute(sa.select(t.column).where(t.column.in_(batch))).scalars()
                    total += sum(1 for v in rows if isinstance(v, str) and v in wanted)
        return total

    def dispose(self) -> None:
        self.engine.dispose()


def _update_from_arrays(_dialect: sa.Dialect, t: Target) -> sa.Update:
    """Postgres: ``UPDATE t SET col = v.new FROM unnest(:old, :new) AS v(old, new) WHERE
    col = v.old``. The batch travels as two array parameters, so the statement is the
    same for any batch size (built once, no 2 × N placeholders to render and parse), and
    the planner joins the pairs to the table through the column's index."""
    col = t.column
    v = (
        sa.func.unnest(
            sa.bindparam("old", type_=postgresql.ARRAY(sa.Text)),
            sa.bindparam("new", type_=postgresql.ARRAY(sa.Text)),
        )
        .table_valued("old", "new")
        .render_derived(name="v")
    )
    return t.table.update().where(col == v.c.old).values({col.name: v.c.new})


def _update_from_json(dialect: sa.Dialect, t: Target) -> sa.TextClause:
    """MySQL/MariaDB: one statement per batch, ``UPDATE t JOIN JSON_TABLE(:pairs, …) AS v ON
    t.col = v.old AND CAST(t.col AS BINARY) = CAST(v.old AS BINARY) SET t.col = v.new``. The
    batch is one JSON parameter ``[[old, new], …]`` (JSON_TABLE: MySQL 8.0.4+, MariaDB 10.6+).
    The first condition lets the optimizer look each pair up in the column's index; the
    second keeps only the exact value (the default collations ignore case and trailing
    spaces). Identifiers are the reflected ones, quoted by the dialect."""
    q = dialect.identifier_preparer
    table = q.format_table(t.table)
    col = q.quote(t.column.name)
    width = f"VARCHAR({_MYSQL_VALUE_CHARS}) CHARACTER SET utf8mb4"
    return sa.text(
        f"UPDATE {table} AS t JOIN JSON_TABLE(:pairs, '$[*]' COLUMNS ("
        f"old {width} PATH '$[0]', new {width} PATH '$[1]')) AS v "
        f"ON t.{col} = v.old AND CAST(t.{col} AS BINARY) = CAST(v.old AS BINARY) "
        f"SET t.{col} = v.new"
    )
