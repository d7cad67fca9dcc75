"""Independent of steps.verify: what the tests compare source and target with."""

from __future__ import annotations

import psycopg
from psycopg import sql

from local import workload


def table_digests(uri: str, schema: str = workload.SCHEMA) -> dict[str, tuple[int, str]]:
    """Per table of the schema: its row count and every row's text, sorted, hashed."""
    out = {}
    with psycopg.connect(uri) as conn:
        for (table,) in conn.execute(
                "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE c.relkind = 'r' AND n.nspname = %s ORDER BY 1", (schema,)).fetchall():
            out[table] = conn.execute(sql.SQL(
                "SELECT count(*), md5(coalesce(string_agg(t::text, E'\\n' ORDER BY t::text), '')) FROM ONLY {} t"
            ).format(sql.Identifier(schema, table))).fetchone()
    return out


def sequences(uri: str, schema: str = workload.SCHEMA) -> dict[str, int]:
    with psycopg.connect(uri) as conn:
        return dict(conn.execute("SELECT schemaname || '.' || sequencename, coalesce(last_value, 0) "
                                 "FROM pg_sequences WHERE schemaname = %s", (schema,)).fetchall())


def sequences_not_behind(source: str, target: str, schema: str = workload.SCHEMA) -> bool:
    src, tgt = sequences(source, schema), sequences(target, schema)
    return bool(src) and all(tgt.get(k, -1) >= v for k, v in src.items())


def row_differences(source: str, target: str, table: str, schema: str = workload.SCHEMA,
                    limit: int = 5) -> str:
    """For a failure message: a few rows only on one side (whole row text), so a
    lost or undone change can be found in the change files by its values."""
    def rows(uri: str) -> set[str]:
        with psycopg.connect(uri) as conn:
            return {r[0] for r in conn.execute(sql.SQL("SELECT t::text FROM ONLY {} t").format(
                sql.Identifier(schema, table)))}
    src, tgt = rows(source), rows(target)
    only_src, only_tgt = sorted(src - tgt)[:limit], sorted(tgt - src)[:limit]
    return f"{table}: only on the source {only_src}, only on the target {only_tgt}"
