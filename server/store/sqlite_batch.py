"""SQLite batches as plain SQL and tuples, so the writer thread runs in C, not Python.

The writer thread shares the GIL with the event loop. Handing it rows that still need
per-value processing (SQLAlchemy's type handling) makes it wait for the GIL at every
step; handing it ready tuples lets ``executemany`` bind and step in C with the GIL
released. Values are converted here exactly as SQLAlchemy stores them (naive UTC
``YYYY-MM-DD HH:MM:SS.ffffff`` datetimes, JSON text), so every reader sees the same rows.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from operator import itemgetter
from typing import Any

from sqlalchemy import JSON, Boolean, Table

from server.store.models import UTCDateTime
from server.store.rows import Mode

Convert = Callable[[Any], Any]
log = logging.getLogger(__name__)


def to_sqlite_datetime(value: datetime | None) -> str | None:
    """A datetime as SQLAlchemy stores it in SQLite: naive UTC text with microseconds."""
    if value is None:
        return None
    if value.tzinfo is not UTC:
        value = value.astimezone(UTC)
    return value.replace(tzinfo=None).isoformat(" ", "microseconds")


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value)


def _bool(value: bool | None) -> int | None:
    return None if value is None else int(value)


def _converter(column_type: Any) -> Convert | None:
    if isinstance(column_type, UTCDateTime):
        return to_sqlite_datetime
    if isinstance(column_type, JSON):
        return _json
    if isinstance(column_type, Boolean):
        return _bool
    return None


class Statement:
    """One (table, mode): its SQL and how to turn a row dict into parameters."""

    def __init__(self, table: Table, mode: Mode) -> None:
        keys = [c.name for c in table.primary_key.columns]
        columns = keys if mode is Mode.DELETE else [c.name for c in table.columns]
        self._columns = columns
        converters = [_converter(table.c[name].type) for name in columns]
        # (index, converter) of the columns whose values need converting, the rest as is.
        self._converted = [(i, c) for i, c in enumerate(converters) if c is not None]
        self._values = _getter(columns)
        self.sql = _sql(table, mode, columns, keys)

    def parameters(self, row: dict[str, Any]) -> tuple[Any, ...]:
        """The row's values in the statement's order, converted for SQLite."""
        values = self._values(row)
        if not self._converted:
            return values
        converted = list(values)
        for index, convert in self._converted:
            converted[index] = convert(converted[index])
        return tuple(converted)


def _getter(columns: list[str]) -> Callable[[dict[str, Any]], tuple[Any, ...]]:
    """A function of a row: its values of ``columns``, in order, as a tuple."""
    if len(columns) == 1:
        (name,) = columns
        return lambda row: (row[name],)
    return itemgetter(*columns)


def _quoted(name: str) -> str:
    return f'"{name}"'


def _sql(table: Table, mode: Mode, columns: list[str], keys: list[str]) -> str:
    name = _quoted(table.name)
    if mode is Mode.DELETE:
        where = " AND ".join(f"{_quoted(k)} = ?" for k in keys)
        return f"DELETE FROM {name} WHERE {where}"
    insert = (
        f"INSERT INTO {name} ({', '.join(map(_quoted, columns))}) "
        f"VALUES ({', '.join('?' for _ in columns)})"
    )
    conflict = f" ON CONFLICT ({', '.join(map(_quoted, keys))})"
    if mode is Mode.INSERT:
        return insert
    if mode is Mode.IGNORE:
        return insert + conflict + " DO NOTHING"
    if mode is Mode.OWN:
        return (
            insert + conflict + f" DO UPDATE SET recipe = coalesce({name}.recipe, excluded.recipe)"
        )
    updates = ", ".join(f"{_quoted(c)} = excluded.{_quoted(c)}" for c in columns if c not in keys)
    return insert + conflict + f" DO UPDATE SET {updates}"


class Connection:
    """The writer's SQLite connection, used from one thread at a time; checkpoints elsewhere.

    A batch is a few ``executemany`` calls in C that release the GIL while SQLite works,
    so the thread that runs them (the writer's own) leaves the event loop free. What can
    take longer, copying the write-ahead log back into the database (a checkpoint, with
    its fsync), is left to a thread of its own, so a commit never waits for it.
    """

    CHECKPOINT_INTERVAL_S = 0.5

    def __init__(self, path: str, *, busy_timeout_ms: int) -> None:
        self._path = path
        self._busy = busy_timeout_ms
        self._db = self._connect(checkpoints=False)
        self._stop = threading.Event()
        self._checkpointer = threading.Thread(
            target=self._checkpoint_loop, name="sqlite-checkpoint", daemon=True
        )
        self._checkpointer.start()

    def _connect(self, *, checkpoints: bool) -> sqlite3.Connection:
        db = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        pragmas = ["journal_mode=WAL", "synchronous=NORMAL", f"busy_timeout={self._busy}"]
        pragmas.append("foreign_keys=ON")
        if not checkpoints:
            pragmas.append("wal_autocheckpoint=0")  # the checkpointer thread does them
        for pragma in pragmas:
            db.execute(f"PRAGMA {pragma}")
        return db

    def _checkpoint_loop(self) -> None:
        db = self._connect(checkpoints=True)
        try:
            while not self._stop.wait(self.CHECKPOINT_INTERVAL_S):
                try:
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.Error:
                    log.exception("a WAL checkpoint failed; retrying at the next interval")
            db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        finally:
            db.close()

    def write(self, groups: Sequence[tuple[str, list[tuple[Any, ...]]]]) -> None:
        """Run every (sql, rows) group in one transaction."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            for sql, rows in groups:
                db.executemany(sql, rows)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def query(self, sql: str, parameters: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Every row of a query."""
        return self._db.execute(sql, parameters).fetchall()

    def execute(self, sql: str, parameters: Sequence[Any] = ()) -> None:
        """One statement in a transaction of its own."""
        self._db.execute(sql, parameters)

    def close(self) -> None:
        """Stop the checkpointer (after a last checkpoint) and close; idempotent."""
        self._stop.set()
        if self._checkpointer.is_alive():
            self._checkpointer.join()
        self._db.close()
