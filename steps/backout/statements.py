"""SQL of the back-out window, built by small pure functions (tested without a database).

The reverse direction of the native engine: the publication and the slot on the
NEW database, the subscription on the OLD one. Names are the run's slot name
(validated by StepSettings, `^[a-z0-9_]{1,52}$`) plus `_backout`, and still go
through psycopg.sql; the subscription's connection string is a literal.
"""

from __future__ import annotations

from psycopg import sql

from steps.engines.native import statements as native
from steps.state import SCHEMA

SUFFIX = "_backout"
BARRIER = "backout_barrier"
BARRIER_TABLE = sql.Identifier(SCHEMA, BARRIER)

# Our own barrier table, on both sides: not the forward one (db_upgrade.barrier is in
# the forward publication), so that nothing of the back-out ever flows forward.
BARRIER_DDL = sql.SQL(
    "CREATE SCHEMA IF NOT EXISTS {schema}; "
    "CREATE TABLE IF NOT EXISTS {table} (id text PRIMARY KEY, at timestamptz NOT NULL DEFAULT clock_timestamp())"
).format(schema=sql.Identifier(SCHEMA), table=BARRIER_TABLE)
DROP_BARRIER = sql.SQL("DROP TABLE IF EXISTS {}").format(BARRIER_TABLE)
# The schema, once nothing of anyone's is left in it (RESTRICT: fails, harmlessly, otherwise).
DROP_EMPTY_SCHEMA = sql.SQL("DROP SCHEMA IF EXISTS {}").format(sql.Identifier(SCHEMA))

# The application's top-level tables, exactly as the forward publication picks them.
APP_TABLES = native.APP_TABLES


def name(slot_name: str) -> str:
    """The publication, slot and subscription of the back-out (<= 63 bytes: the slot name is <= 52)."""
    return native.check_name(f"{slot_name}{SUFFIX}")


def create_publication(pub: str, tables: list[tuple[str, str]]) -> sql.Composed:
    """On the new database: FOR TABLE the application's tables plus our barrier
    (never FOR ALL TABLES: that needs a superuser and would publish tables the old
    database has no table for)."""
    names = [sql.Identifier(schema, table) for schema, table in tables]
    names.append(BARRIER_TABLE)
    return sql.SQL("CREATE PUBLICATION {} FOR TABLE {}").format(sql.Identifier(native.check_name(pub)),
                                                                 sql.SQL(", ").join(names))


def drop_publication(pub: str) -> sql.Composed:
    return native.drop_publication(pub)


# A pgoutput slot, created by the SQL function (no exported snapshot is needed: nothing
# is copied). Its consistent point is before the first application write on the new
# database because prepare() runs while the new database is still fenced.
CREATE_SLOT = "SELECT lsn::text FROM pg_create_logical_replication_slot(%s, 'pgoutput')"
DROP_SLOT = "SELECT pg_drop_replication_slot(%s)"
# The new database's view of the reverse stream: how far the old one confirmed, what the
# slot keeps, and its walsender (None when the subscription is not connected).
SLOT_STATE = ("SELECT confirmed_flush_lsn::text, restart_lsn::text, active_pid, pg_current_wal_lsn()::text, "
              "wal_status, safe_wal_size FROM pg_replication_slots WHERE slot_name = %s AND database = current_database()")

# The old database's side: the subscription, its worker, its apply errors.
SUBSCRIPTION_STATE = native.SUBSCRIPTION_STATE
SUBSCRIPTION_EXISTS = ("SELECT 1 FROM pg_subscription WHERE subname = %s AND subdbid = "
                       "(SELECT oid FROM pg_database WHERE datname = current_database())")


def create_subscription(sub: str, conninfo: str, pub: str, slot: str) -> sql.Composed:
    """On the old database: stream from the slot prepare() created; nothing to copy
    (both sides were equal when the slot began), no slot to create."""
    return native.create_subscription(sub, conninfo, pub, slot)


def drop_subscription(sub: str) -> list[sql.Composed]:
    """Disable, detach from its slot (we drop the slot on the new database ourselves, so
    DROP SUBSCRIPTION never needs to reach it: it works with the new server gone), drop."""
    return native.drop_subscription(sub)


def insert_barrier() -> sql.Composed:
    return sql.SQL("INSERT INTO {} (id) VALUES (%s)").format(BARRIER_TABLE)


def barrier_seen() -> sql.Composed:
    return sql.SQL("SELECT 1 FROM {} WHERE id = %s").format(BARRIER_TABLE)


# Who may create the subscription on the old server (PostgreSQL 15: superusers only;
# 16+: members of pg_create_subscription), and the workers it needs there.
CREATE_SUBSCRIPTION_ROLE = ("SELECT EXISTS (SELECT 1 FROM pg_roles g WHERE g.rolname = 'pg_create_subscription' "
                            "AND pg_has_role(current_user, g.oid, 'USAGE'))")
OLD_WORKERS = ("SELECT current_setting('max_logical_replication_workers')::int, "
               "(SELECT count(*) FROM pg_stat_subscription WHERE pid IS NOT NULL)::int")
NEW_SERVER = ("SELECT current_setting('wal_level'), current_setting('max_replication_slots')::int, "
              "(SELECT count(*) FROM pg_replication_slots)::int, current_setting('max_wal_senders')::int, "
              "(SELECT count(*) FROM pg_stat_replication)::int, current_setting('max_slot_wal_keep_size')")
# The role on the new database: may it create a logical slot?
NEW_ROLE = "SELECT rolname, rolsuper, rolreplication FROM pg_roles WHERE rolname = current_user"
# Owners of application tables (named on the old database) the role on the new one cannot act as.
UNUSABLE_OWNERS = ("SELECT r.rolname FROM pg_roles r WHERE r.rolname = ANY(%s) "
                   "AND NOT pg_has_role(current_user, r.oid, 'USAGE') ORDER BY 1")


def probe_subscription(sub: str, conninfo: str) -> sql.Composed:
    """On the old server, in a transaction that is rolled back: connects to the new server
    as the reverse subscription will (connect = true, a replication connection) but creates
    no slot, starts no worker and names no slot; the publication need not exist."""
    return sql.SQL(
        "CREATE SUBSCRIPTION {name} CONNECTION {conninfo} PUBLICATION {name} "
        "WITH (connect = true, enabled = false, create_slot = false, slot_name = NONE)"
    ).format(name=sql.Identifier(native.check_name(sub)), conninfo=sql.Literal(conninfo))
