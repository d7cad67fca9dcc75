"""grant-replication: give the connecting role REPLICATION on the source, as the
seed's start.sh did, and remember that we did so that cleanup can take it back."""

from __future__ import annotations

import psycopg
from psycopg import sql

from steps import state
from steps.errors import StepError
from steps.log import log
from steps.pg import connect
from steps.settings import StepSettings


def grant_replication(s: StepSettings) -> bool:
    """Returns True when this run granted (now or in an earlier attempt)."""
    with connect(s.source(), "source") as conn:
        role, replication, rds = conn.execute(
            "SELECT r.rolname, r.rolreplication, EXISTS (SELECT 1 FROM pg_roles g WHERE g.rolname = 'rds_replication' "
            "AND pg_has_role(r.oid, g.oid, 'MEMBER')) FROM pg_roles r WHERE r.rolname = current_user"
        ).fetchone()
        if rds and not replication:
            # Amazon RDS: membership in rds_replication is what allows replication; the
            # attribute cannot be granted there.
            log(f"grant-replication: role {role!r} is a member of rds_replication; nothing to grant")
            state.record(s, granted_replication=False)
            return False
        # Superusers may stream without the attribute, but we grant it as the seed
        # did, so that a role's rights do not depend on being superuser forever.
        if replication:
            granted = bool(state.load(s).granted_replication)
            log(f"grant-replication: role {role!r} already has REPLICATION; nothing to do")
            if not granted:
                state.record(s, granted_replication=False)
            return granted
        try:
            conn.execute(sql.SQL("ALTER ROLE {} REPLICATION").format(sql.Identifier(role)))
        except psycopg.errors.InsufficientPrivilege:
            raise StepError(
                f"role {role!r} lacks REPLICATION and cannot grant it to itself: "
                f"run ALTER ROLE ... REPLICATION as an administrator, then retry"
            ) from None
    state.record(s, granted_replication=True)
    log(f"grant-replication: granted REPLICATION to {role!r} (cleanup will revoke it)")
    return True


def revoke_replication(s: StepSettings) -> None:
    if not state.load(s).granted_replication:
        return
    with connect(s.source(), "source") as conn:
        role = conn.execute("SELECT current_user").fetchone()[0]
        conn.execute(sql.SQL("ALTER ROLE {} NOREPLICATION").format(sql.Identifier(role)))
    state.record(s, granted_replication=False)
    log(f"cleanup: revoked REPLICATION from {role!r} (granted by this run)")
