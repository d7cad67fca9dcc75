"""grant-replication: give the connecting role REPLICATION on the source, as the
seed's start.sh did, and remember that we did so that cleanup can take it back."""

from steps import state
from steps.errors import StepError
from steps.log import log
from steps.pg import connect
from steps.settings import StepSettings

import psycopg
from psycopg import sql


def grant_replication(s: StepSettings) -> bool:
    """Returns True when this run granted (now or in an earlier attempt)."""
    workdir = s.workdir()
    with connect(s.source(), "source") as conn:
        role, replication = conn.execute(
            "SELECT rolname, rolreplication FROM pg_roles WHERE rolname = current_user"
        ).fetchone()
        # Superusers may stream without the attribute, but we grant it as the seed
        # did, so that a role's rights do not depend on being superuser forever.
        if replication:
            granted = bool(state.read(workdir).get("granted_replication"))
            log(f"grant-replication: role {role!r} already has REPLICATION; nothing to do")
            if not granted:
                state.update(workdir, granted_replication=False)
            return granted
        try:
            conn.execute(sql.SQL("ALTER ROLE {} REPLICATION").format(sql.Identifier(role)))
        except psycopg.errors.InsufficientPrivilege:
            raise StepError(
                f"role {role!r} lacks REPLICATION and cannot grant it to itself: "
                f"run ALTER ROLE ... REPLICATION as an administrator, then retry"
            ) from None
    state.update(workdir, granted_replication=True)
    log(f"grant-replication: granted REPLICATION to {role!r} (cleanup will revoke it)")
    return True


def revoke_replication(s: StepSettings) -> None:
    workdir = s.workdir()
    if not state.read(workdir).get("granted_replication"):
        return
    with connect(s.source(), "source") as conn:
        role = conn.execute("SELECT current_user").fetchone()[0]
        conn.execute(sql.SQL("ALTER ROLE {} NOREPLICATION").format(sql.Identifier(role)))
    state.update(workdir, granted_replication=False)
    log(f"cleanup: revoked REPLICATION from {role!r} (granted by this run)")
