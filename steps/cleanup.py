"""cleanup: leave nothing of the run on the databases.

The engine drops what it created (slot, publication, subscription or origin),
verify drops its tracking, the fence on the target is lifted when the run ends
without a switch, the db_upgrade schema goes (on the source all but the run's
record, which the report step removes last), and REPLICATION is revoked if
grant-replication granted it. An orphaned slot keeps WAL on the source until
its disk is full, so cleanup checks at the end that none of ours is left.
Idempotent; safe after success, abort and failure.
"""

from __future__ import annotations

import psycopg
from psycopg import sql

from steps import engines, fence, grant, state
from steps.errors import StepError
from steps.log import log
from steps.pg import connect
from steps.settings import StepSettings

OWN_SCHEMA = state.SCHEMA

# Our objects in db_upgrade on the source, except the run's record.
OWN_TABLES = ("SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
              "WHERE n.nspname = %s AND c.relkind IN ('r', 'p') AND c.relname <> %s")


def cleanup(s: StepSettings) -> None:
    if s.keep_slot:
        log(f"cleanup: keeping replication slot {s.slot_name!r} and the run's state for a retry (keep-slot-on-failure); "
            "run cleanup without DB_UPGRADE_KEEP_SLOT to drop them")
        return
    from steps import backout, verify

    backout.end(s)  # first: the target's db_upgrade schema below carries its barrier
    verify.teardown(s)
    engines.get(s).cleanup()
    st = state.load(s)
    if st.fenced_roles and not st.switch_started_at:
        fence.lift(s)  # the run ends without a switch: the target's roles as they were
    with connect(s.source(), "source") as src:
        for (table,) in src.execute(OWN_TABLES, (OWN_SCHEMA, state.TABLE)).fetchall():
            src.execute(sql.SQL("DROP TABLE IF EXISTS {} CASCADE").format(sql.Identifier(OWN_SCHEMA, table)))
        src.execute("DROP SCHEMA IF EXISTS pgcopydb CASCADE")
        left = [r[0] for r in src.execute(
            "SELECT slot_name FROM pg_replication_slots WHERE slot_name = %s OR slot_name LIKE %s",
            (s.slot_name, s.slot_name.replace("_", r"\_") + r"\_%")).fetchall()]
    with connect(s.target(), "target") as tgt:
        for schema in ("pgcopydb", OWN_SCHEMA):
            try:
                tgt.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
            except psycopg.errors.DependentObjectsStillExist:
                raise StepError(f"cleanup: schema {schema} on the target has dependent objects") from None
    grant.revoke_replication(s)
    if left:
        raise StepError(f"cleanup: replication slot(s) {', '.join(left)} still on the source: drop them "
                        "(SELECT pg_drop_replication_slot(name)) once nothing streams from them")
    log("cleanup: no replication slot of this run on the source, no replication objects on the target")
