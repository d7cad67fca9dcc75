"""Preflight checks of the native engine (PostgreSQL's logical replication,
pgcopydb for the copy), called by `Native.preflight_checks` after the common
checks of steps/preflight.py.

What the engine needs: on the source a pgoutput slot (plus verify's), a WAL
sender, and the right to publish every application table; on the target an
apply worker and the right to create a subscription that connects back to the
source. The last is proven, not guessed: a test subscription with
`connect = true` makes the target server itself connect to the source, inside a
transaction that is rolled back (CREATE SUBSCRIPTION without create_slot may
run in one), so nothing is left behind even if this pod dies halfway.
"""

from __future__ import annotations

import os

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from steps import preflight as p
from steps.pg import USER_SCHEMAS, server_major
from steps.settings import StepSettings

SLOTS = 2  # the engine's slot and verify's
SENDERS = 1  # the snapshot connection during the copy, then the subscription's walsender
PLUGIN = "pgoutput"
# How long the target server may take to reach the source in the test.
TEST_TIMEOUT = "20s"
from steps.engines.native.statements import QUIET_LOGGING  # noqa: E402  (the engine's own CREATE SUBSCRIPTION uses it too)

# -- SQL (pure) ------------------------------------------------------------------------------

# Top-level application tables (what the publication lists), and their owners,
# where the connecting role does not have its owner's privileges.
NOT_OWNED = f"""SELECT format('%%I.%%I', n.nspname, c.relname), pg_get_userbyid(c.relowner)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition AND c.relpersistence = 'p' AND {USER_SCHEMAS}
  AND NOT pg_has_role(c.relowner, 'USAGE')
ORDER BY 1"""
TABLE_OWNERS = f"""SELECT DISTINCT pg_get_userbyid(c.relowner)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND c.relpersistence = 'p' AND {USER_SCHEMAS}
ORDER BY 1"""
CREATE_SUBSCRIPTION_ROLE = """SELECT EXISTS (SELECT 1 FROM pg_roles g WHERE g.rolname = 'pg_create_subscription'
                               AND pg_has_role(current_user, g.oid, 'USAGE'))"""

# Backends that are not background workers (the rest count against max_worker_processes).
_NOT_BGWORKERS = ("client backend", "autovacuum launcher", "autovacuum worker", "background writer", "checkpointer",
                  "walwriter", "startup", "walreceiver", "walsender", "walsummarizer", "archiver",
                  "standalone backend", "slotsync worker", "io worker")
TARGET_WORKERS = """SELECT current_setting('max_logical_replication_workers')::int,
       (SELECT count(*) FROM pg_stat_subscription WHERE pid IS NOT NULL)::int,
       current_setting('max_worker_processes')::int,
       (SELECT count(*) FROM pg_stat_activity WHERE backend_type <> ALL(%s))::int,
       current_setting('max_replication_slots')::int"""
ORIGINS = "SELECT count(*)::int FROM pg_replication_origin"


# REPLICA IDENTITY FULL tables with a column whose type has no default btree or
# hash equality operator (json, point, xml, ...): the subscriber finds the row of
# an UPDATE or DELETE by comparing every column, and stops on the first one
# ("could not identify an equality operator for type json"), retrying forever.
# Measured 15 -> 17 (docs/fidelity.md).
FULL_IDENTITY_WITHOUT_EQUALITY = f"""SELECT format('%%I.%%I', n.nspname, c.relname), a.attname, format_type(a.atttypid, NULL)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
WHERE c.relkind = 'r' AND c.relreplident = 'f' AND c.relpersistence = 'p' AND {USER_SCHEMAS}
  AND NOT EXISTS (SELECT 1 FROM pg_opclass oc JOIN pg_am am ON am.oid = oc.opcmethod
                  WHERE am.amname IN ('btree', 'hash') AND oc.opcdefault
                    AND oc.opcintype IN (a.atttypid, (SELECT typbasetype FROM pg_type WHERE oid = a.atttypid)))
  AND NOT EXISTS (SELECT 1 FROM pg_type t WHERE t.oid = a.atttypid AND t.typtype IN ('e', 'r', 'm', 'c')
                  OR t.oid = a.atttypid AND t.typcategory = 'A')
ORDER BY 1, 2"""


def judge_full_identity_equality(rows: list[tuple[str, str, str]]) -> p.Finding:
    if not rows:
        return p.fine("every REPLICA IDENTITY FULL table has columns the subscriber can compare")
    listed = ", ".join(f"{t}.{c} ({ty})" for t, c, ty in rows[:10])
    return p.problem(f"{len(rows)} column(s) of REPLICA IDENTITY FULL tables have a type without an equality "
                     f"operator: {listed}; the subscriber cannot find the row of an UPDATE or DELETE there and stops "
                     "(\"could not identify an equality operator\"): give those tables a primary key or a replica "
                     "identity index, or change json to jsonb")


def owners_settable_sql(target_major: int) -> str:
    """Table owners the apply could not act as. Since PostgreSQL 16 the apply runs
    as each table's owner, so the subscription's owner must be able to SET ROLE to
    it; before, being its member is what counts."""
    privilege = "SET" if target_major >= 16 else "MEMBER"
    return (f"SELECT r.rolname FROM pg_roles r WHERE r.rolname = ANY(%s) "
            f"AND NOT pg_has_role(current_user, r.oid, '{privilege}') ORDER BY 1")


def test_subscription_name(pid: int) -> str:
    return f"db_upgrade_preflight_{pid}"


def test_subscription_sql(name: str, conninfo: str) -> sql.Composed:
    """Connects (connect = true) but creates no slot, starts no worker and names
    no slot (so it could be dropped without the source); the publication need not
    exist (the target only warns)."""
    return sql.SQL(
        "CREATE SUBSCRIPTION {name} CONNECTION {conninfo} PUBLICATION {name} "
        "WITH (connect = true, enabled = false, create_slot = false, slot_name = NONE)"
    ).format(name=sql.Identifier(name), conninfo=sql.Literal(conninfo))


# -- verdicts (pure) -------------------------------------------------------------------------

def judge_publication(me: p.RoleFacts, not_owned: list[tuple[str, str]]) -> p.Finding:
    if me.superuser:
        return p.fine(f"role {me.name!r} is a superuser on the source: it may create the publication")
    if not not_owned:
        return p.fine(f"role {me.name!r} owns every application table: it may create the publication")
    owners = sorted({o for _t, o in not_owned})
    return p.problem(f"role {me.name!r} does not own {len(not_owned)} application table(s) (a publication FOR TABLE "
                     f"needs their owner or a superuser): {p.names([f'{t} (owner {o})' for t, o in not_owned])}; "
                     f"connect as a superuser, or GRANT {', '.join(p.ident(o) for o in owners)} TO {p.ident(me.name)}")


def judge_subscription(target_major: int, me: p.RoleFacts, create_role: bool, not_settable: list[str]) -> p.Finding:
    if me.superuser:
        return p.fine(f"role {me.name!r} is a superuser on the target: it may create the subscription")
    if target_major < 16:
        return p.problem(f"on PostgreSQL {target_major} only a superuser may create a subscription: connect to the "
                         "target as one")
    if not create_role:
        return p.problem(f"role {me.name!r} may not create a subscription on the target: GRANT pg_create_subscription "
                         f"TO {p.ident(me.name)} (and CREATE on the database), or connect as a superuser")
    if not_settable:
        return p.problem(f"the subscription's apply acts as each table's owner, and role {me.name!r} cannot SET ROLE "
                         f"to {', '.join(map(repr, not_settable))} on the target: GRANT "
                         f"{', '.join(p.ident(o) for o in not_settable)} TO {p.ident(me.name)}")
    return p.fine(f"role {me.name!r} may create the subscription (pg_create_subscription) and act as the tables' owners")


def judge_workers(max_apply: int, apply_used: int, max_workers: int, workers_used: int, max_origins: int,
                  origins: int | None) -> list[p.Finding]:
    out = []
    if max_apply - apply_used < 1:
        out.append(p.problem(f"max_logical_replication_workers = {max_apply} on the target with {apply_used} in use: "
                             "the subscription needs 1 apply worker; raise it (restart)"))
    if max_workers - workers_used < 1:
        out.append(p.problem(f"max_worker_processes = {max_workers} on the target with ~{workers_used} background "
                             "worker(s) running: the apply worker needs 1 more; raise it (restart)"))
    if origins is not None and max_origins - origins < 1:
        out.append(p.problem(f"max_replication_slots = {max_origins} on the target with {origins} replication "
                             "origin(s): on a subscriber it limits the origins, and the subscription needs 1; raise it "
                             "(restart)"))
    if not out:
        tracked = f", {origins} of {max_origins} replication origins" if origins is not None else ""
        out.append(p.fine(f"target workers: {apply_used} of {max_apply} logical replication workers, ~{workers_used} "
                          f"of {max_workers} worker processes{tracked} in use (the subscription needs 1 of each)"))
    return out


def judge_test_subscription(error: str | None, uri_var: str, same_role: bool, role_gets_replication: bool,
                            logged: bool) -> p.Finding:
    """What the target server's test connection to the source says. `error` is
    already scrubbed of secrets; the URI itself is never printed."""
    if error is None:
        return p.fine(f"the target server connects to the source with {uri_var} (a test subscription connected; "
                      "rolled back, nothing left)")
    low = error.lower()
    log_hint = ("; the failed statement, CONNECTION included, may be in the target's server log (this role may not "
                "set log_min_error_statement): keep passwords out of the URI" if logged else "")
    if "replication role" in low or "start wal sender" in low or "replication attribute" in low:
        if same_role and role_gets_replication:
            return p.fine(f"the target server reaches the source with {uri_var} and logs in; the role gets REPLICATION "
                          "from grant-replication")
        return p.problem(f"the target server reaches the source with {uri_var}, but the role it logs in as lacks "
                         "REPLICATION: ALTER ROLE ... REPLICATION for that role on the source" + log_hint)
    if "statement timeout" in low:
        return p.problem(f"the target server did not reach the source within {TEST_TIMEOUT} with {uri_var}: a "
                         "firewall or route drops the connection; the URI must work from the target server's "
                         "network" + log_hint)
    if "password is required" in low or "does not request a password" in low or "password_required" in low:
        return p.problem(f"the target server reaches the source with {uri_var}, but a subscription owned by a "
                         "non-superuser must log in with a password: put it in a passfile on the target server "
                         "(or the URI), or connect to the target as a superuser" + log_hint)
    return p.problem(f"the target server cannot connect to the source with {uri_var} ({error}): set "
                     "DB_UPGRADE_SUBSCRIPTION_PGURI to the address the target server reaches the source by; "
                     "pg_hba.conf on the source must allow the target server for this database; keep the password "
                     "in a passfile on the target server, not in the URI (it is stored in pg_subscription)" + log_hint)


def same_role(s: StepSettings) -> bool:
    """Does the subscription log in as the migration role (the one preflight
    checked on the source)? Unknown (a service file, no user) counts as no."""
    if s.subscription_pguri is None or not s.subscription_pguri.get_secret_value().strip():
        return True
    try:
        mine = conninfo_to_dict(s.source()).get("user")
        theirs = conninfo_to_dict(s.subscription_source()).get("user")
    except psycopg.ProgrammingError:
        return False
    return bool(mine) and mine == theirs


def uri_label(s: StepSettings) -> str:
    if s.subscription_pguri is not None and s.subscription_pguri.get_secret_value().strip():
        return "DB_UPGRADE_SUBSCRIPTION_PGURI"
    return "the source URI (DB_UPGRADE_SUBSCRIPTION_PGURI is not set)"


# -- running them ----------------------------------------------------------------------------

def check_test_subscription(s: StepSettings, tgt: psycopg.Connection, src_me: p.RoleFacts, r: p.Report) -> None:
    conninfo = s.subscription_source()
    error, logged = None, False
    try:
        conninfo_to_dict(conninfo)
    except psycopg.ProgrammingError:
        r.bad("DB_UPGRADE_SUBSCRIPTION_PGURI is not a valid libpq URI: expected postgres://user@host:port/dbname "
              "or postgres://?service=NAME")
        return
    try:
        with tgt.transaction(force_rollback=True):
            for statement in QUIET_LOGGING:
                try:
                    with tgt.transaction():
                        tgt.execute(statement)
                except psycopg.errors.InsufficientPrivilege:
                    logged = True
            tgt.execute(f"SET LOCAL statement_timeout = '{TEST_TIMEOUT}'")
            tgt.execute(test_subscription_sql(test_subscription_name(os.getpid()), conninfo))
    except psycopg.Error as exc:
        error = p.first_line(exc, conninfo)
    r.add(judge_test_subscription(error, uri_label(s), same_role(s), src_me.superuser, logged))


def checks(s: StepSettings, src: psycopg.Connection, tgt: psycopg.Connection, r: p.Report) -> None:
    p.check_pgcopydb(s, r)
    p.check_workdir(s, src.execute(p.DATABASE_SIZE).fetchone()[0], r, share=0.0)  # the copy's dump files only
    p.check_slots_and_senders(src, r, SLOTS, "the engine's slot and verify's", SENDERS,
                              "the copy's snapshot, then the subscription")
    p.check_output_plugin(src, r, PLUGIN)
    src_me = p.role_facts(src)
    r.add(judge_publication(src_me, [(t, o) for t, o in src.execute(NOT_OWNED, ())]))
    r.add(judge_full_identity_equality(src.execute(FULL_IDENTITY_WITHOUT_EQUALITY, ()).fetchall()))

    tv = server_major(tgt)
    tgt_me = p.role_facts(tgt)
    create_role = tgt.execute(CREATE_SUBSCRIPTION_ROLE).fetchone()[0]
    owners = [o for (o,) in src.execute(TABLE_OWNERS, ())]
    not_settable = [o for (o,) in tgt.execute(owners_settable_sql(tv), (owners,))] if not tgt_me.superuser else []
    subscription = judge_subscription(tv, tgt_me, create_role, not_settable)
    r.add(subscription)
    max_apply, apply_used, max_workers, workers_used, max_origins = tgt.execute(
        TARGET_WORKERS, (list(_NOT_BGWORKERS),)).fetchone()
    origins = p.try_query(tgt, ORIGINS, fetch="one")
    r.add(*judge_workers(max_apply, apply_used, max_workers, workers_used, max_origins,
                         origins[0] if origins else None))
    if subscription.kind == "problem":
        r.note("the target server's connection to the source was not tried: this role may not create the test "
               "subscription (see above)")
    else:
        check_test_subscription(s, tgt, src_me, r)
