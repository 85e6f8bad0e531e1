"""A psycopg sync connection in the shape the table functions expect of sqlite3's.

The table functions (cloudtaskd/core/tables/) write `?` placeholders and read rows by index, by
unpacking, or by column name (sqlite3.Row). `PgDb` takes the same calls: it rewrites each SQL
string once to psycopg's `%s` form (cached by the string), and its rows are tuples that also
answer row["column"] and keys(). What differs between the databases stays in the table modules,
side by side (`tables.bulk.postgres(db)` tells which one a function runs on).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import Any

import psycopg

SQL_CACHE_SIZE = 1024  # distinct statements: the product has a few hundred, with spliced IN-lists


def to_pg(sql: str) -> bytes:
    """`?` placeholders to `%s`, and a literal `%` to `%%`, outside quoted strings and identifiers."""
    return _to_pg(sql)


@lru_cache(maxsize=SQL_CACHE_SIZE)
def _to_pg(sql: str) -> bytes:
    out: list[str] = []
    quote = ""
    for ch in sql:
        if quote:
            if ch == quote:
                quote = ""
            out.append("%%" if ch == "%" else ch)  # psycopg reads % everywhere once there are parameters
        elif ch in "'\"":
            quote = ch
            out.append(ch)
        elif ch == "?":
            out.append("%s")
        elif ch == "%":
            out.append("%%")
        else:
            out.append(ch)
    return "".join(out).encode()


class Row(tuple[Any, ...]):
    """A result row: a tuple that also answers row["column"] and keys(), as sqlite3.Row does."""

    __slots__ = ()
    _index: dict[str, int] = {}

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return tuple.__getitem__(self, self._index[key])
        return tuple.__getitem__(self, key)

    def keys(self) -> list[str]:
        return list(self._index)


@lru_cache(maxsize=SQL_CACHE_SIZE)
def _row_class(names: tuple[str, ...]) -> type[Row]:
    return type("Row", (Row,), {"__slots__": (), "_index": {n: i for i, n in enumerate(names)}})


def row_factory(cursor: Any) -> Any:
    """psycopg's RowFactory protocol: a maker of rows for this cursor's columns."""
    description = cursor.description
    if description is None:
        return tuple
    return _row_class(tuple(col.name for col in description))


class PgDb:
    """execute/executemany with `?` placeholders; everything else of the connection via `conn`."""

    __slots__ = ("conn",)

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> psycopg.Cursor[Any]:
        # Always a parameter tuple, even empty: psycopg then reads `%%` as `%` in every statement.
        return self.conn.execute(to_pg(sql), tuple(params))

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> psycopg.Cursor[Any]:
        cur = self.conn.cursor()
        cur.executemany(to_pg(sql), rows)  # pipelined by psycopg: one round trip, not one per row
        return cur
