"""SQL of the native engine, built by small pure functions (tested without a database).

Names (publication, slot, subscription) are validated by StepSettings
(`^[a-z0-9_]{1,52}$`) and still go through psycopg.sql; the subscription's
connection string is a literal.
"""

from __future__ import annotations

import re

from psycopg import sql

from steps.state import SCHEMA

BARRIER = "barrier"
BARRIER_DDL = sql.SQL(
    "CREATE SCHEMA IF NOT EXISTS {schema}; "
    "CREATE TABLE IF NOT EXISTS {schema}.{table} (id text PRIMARY KEY, at timestamptz NOT NULL DEFAULT clock_timestamp())"
).format(schema=sql.Identifier(SCHEMA), table=sql.Identifier(BARRIER))

_NAME = re.compile(r"^[a-z0-9_]{1,63}$")

# The application's top-level tables: plain tables that are not partitions, and
# partitioned parents (their partitions are published with them, now and later).
# Not ours (db_upgrade), not pgcopydb's, not the system's.
APP_TABLES = sql.SQL(
    "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
    "WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition AND c.relpersistence = 'p' "
    "AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pgcopydb', {own}) "
    "AND n.nspname NOT LIKE 'pg\\_toast%%' AND n.nspname NOT LIKE 'pg\\_temp%%' "
    "ORDER BY 1, 2").format(own=sql.Literal(SCHEMA))

# Every sequence and table of the application (for DDL detection after the copy began).
APP_RELATIONS = sql.SQL(
    "SELECT c.relkind::text, format('%%I.%%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
    "WHERE c.relkind IN ('r', 'p', 'S') AND c.relpersistence = 'p' "
    "AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pgcopydb', {own}) "
    "AND n.nspname NOT LIKE 'pg\\_toast%%' AND n.nspname NOT LIKE 'pg\\_temp%%' "
    "ORDER BY 2").format(own=sql.Literal(SCHEMA))


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise ValueError(f"not a valid replication object name: {name!r}")
    return name


def create_publication(name: str, tables: list[tuple[str, str]]) -> sql.Composed:
    """FOR TABLE the given tables plus our barrier table (never FOR ALL TABLES:
    that needs a superuser and would publish tables created later, whose rows
    the target has no table for)."""
    names = [sql.Identifier(schema, table) for schema, table in tables]
    names.append(sql.Identifier(SCHEMA, BARRIER))
    return sql.SQL("CREATE PUBLICATION {} FOR TABLE {}").format(sql.Identifier(check_name(name)),
                                                                 sql.SQL(", ").join(names))


def drop_publication(name: str) -> sql.Composed:
    return sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(check_name(name)))


def create_slot_command(slot: str) -> bytes:
    """Replication-protocol command (sent with the simple query protocol): a
    pgoutput slot whose snapshot is exported while this connection stays idle."""
    return f"CREATE_REPLICATION_SLOT {check_name(slot)} LOGICAL pgoutput (SNAPSHOT 'export')".encode()


def create_subscription(name: str, conninfo: str, publication: str, slot: str) -> sql.Composed:
    """On the target: stream from the slot created with the copy's snapshot;
    nothing to copy (pgcopydb did), no slot to create (it exists)."""
    return sql.SQL(
        "CREATE SUBSCRIPTION {} CONNECTION {} PUBLICATION {} "
        "WITH (create_slot = false, slot_name = {}, copy_data = false, enabled = true)"
    ).format(sql.Identifier(check_name(name)), sql.Literal(conninfo), sql.Identifier(check_name(publication)),
             sql.Literal(check_name(slot)))


def drop_subscription(name: str) -> list[sql.Composed]:
    """Disable, detach from its slot (the slot is dropped on the source by us, so
    DROP SUBSCRIPTION never needs to reach the source), drop."""
    ident = sql.Identifier(check_name(name))
    return [
        sql.SQL("ALTER SUBSCRIPTION {} DISABLE").format(ident),
        sql.SQL("ALTER SUBSCRIPTION {} SET (slot_name = NONE)").format(ident),
        sql.SQL("DROP SUBSCRIPTION {}").format(ident),
    ]


# Keep a failed CREATE SUBSCRIPTION, CONNECTION and password included, out of
# the target's server log (superuser settings: tried each in a savepoint, not required).
QUIET_LOGGING = ("SET LOCAL log_min_error_statement = panic", "SET LOCAL log_statement = 'none'")


def insert_barrier() -> sql.Composed:
    return sql.SQL("INSERT INTO {} (id) VALUES (%s)").format(sql.Identifier(SCHEMA, BARRIER))


def barrier_seen() -> sql.Composed:
    return sql.SQL("SELECT 1 FROM {} WHERE id = %s").format(sql.Identifier(SCHEMA, BARRIER))


# The target's applied position: the subscription's replication origin is
# pg_<subscription oid>, advanced with each applied transaction's commit LSN.
SUBSCRIPTION_STATE = (
    "SELECT s.oid::bigint, s.subenabled, pg_replication_origin_progress('pg_' || s.oid, false)::text, "
    "(SELECT max(w.pid) FROM pg_stat_subscription w WHERE w.subid = s.oid), "
    "coalesce((SELECT st.apply_error_count FROM pg_stat_subscription_stats st WHERE st.subid = s.oid), 0) "
    "FROM pg_subscription s WHERE s.subname = %s AND s.subdbid = (SELECT oid FROM pg_database "
    "WHERE datname = current_database())")

# The source's view: the slot's confirmed position moves with the subscriber's
# feedback even when no transaction arrives (keepalives), and its walsender.
SLOT_STATE = ("SELECT confirmed_flush_lsn::text, active_pid, pg_current_wal_lsn()::text "
              "FROM pg_replication_slots WHERE slot_name = %s")


def barrier_id(end: str) -> str:
    """The barrier row's id out of an end position `barrier:<id>`."""
    kind, _, ident = end.partition(":")
    if kind != "barrier" or not ident:
        raise ValueError(f"not a native end position: {end!r}")
    return ident
