"""pgcopydb 0.17's SQLite catalog (`<dir>/schema/source.db`), read-only.

Never through `pgcopydb list ...`: a process that opens the catalog for
writing while the copy's workers record their work in it (and, before clone
has registered its snapshot, one that breaks clone: see sentinel.started).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from steps import pgcopydb

# Bytes of every table (pgcopydb's own size estimate, s_table_size), and of the
# ones whose COPY is done; a table split in N parts counts 1/N per part done.
COPY_BYTES = """
SELECT coalesce(sum(z.bytes), 0),
       coalesce(sum(z.bytes * min(1.0,
           (SELECT count(*) FROM summary m WHERE m.tableoid = t.oid AND m.indexoid IS NULL
              AND m.conoid IS NULL AND m.done_time_epoch IS NOT NULL) * 1.0
           / max(1, (SELECT count(*) FROM s_table_part p WHERE p.oid = t.oid)))), 0)
FROM s_table t JOIN s_table_size z ON z.oid = t.oid
"""

# Tables and indexes done, and how many there are.
ITEMS_DONE = """
SELECT (SELECT count(DISTINCT tableoid) FROM summary WHERE tableoid IS NOT NULL AND indexoid IS NULL
          AND conoid IS NULL AND done_time_epoch IS NOT NULL)
     + (SELECT count(DISTINCT indexoid) FROM summary WHERE indexoid IS NOT NULL AND done_time_epoch IS NOT NULL),
       (SELECT count(*) FROM s_table) + (SELECT count(*) FROM s_index)
"""

KNOWS_TABLE = "SELECT 1 FROM s_table WHERE nspname = ? AND relname = ?"


def _one(workdir: Path, query: str, params: tuple = ()) -> tuple | None:
    if not pgcopydb.catalog_path(workdir).exists():
        return None
    try:
        conn = pgcopydb.read_catalog(workdir)
        try:
            return conn.execute(query, params).fetchone()
        finally:
            conn.close()
    except sqlite3.Error:  # not there yet, being written, or a pgcopydb without these tables
        return None


def copy_bytes(workdir: Path) -> tuple[int, int] | None:
    """(bytes copied, bytes in all), or None before pgcopydb has sized the tables."""
    row = _one(workdir, COPY_BYTES)
    if not row or not row[0]:
        return None
    total, done = int(row[0]), int(row[1])
    return min(done, total), total


def items_done(workdir: Path) -> tuple[int, int] | None:
    """(tables and indexes done, tables and indexes in all)."""
    row = _one(workdir, ITEMS_DONE)
    return (int(row[0]), int(row[1])) if row and row[1] else None


def knows_table(workdir: Path, schema: str, table: str) -> bool:
    """Is this table in pgcopydb's catalog (so in its copy and its change stream's filter)?"""
    return _one(workdir, KNOWS_TABLE, (schema, table)) is not None
