"""The fence: the application roles cannot log in to the target until the switch.

An application pod that restarts too early (a crash, a scale-up, a node drain)
and finds the target's address would write there while replication is still
applying: a divergence, or a duplicate key that stops the apply. Fenced, it is
refused at once and loudly ("role ... is not permitted to log in"), and it keeps
retrying the source, which still takes its writes.

`ALTER ROLE ... NOLOGIN` on the target server (roles are per server) for each
role in DB_UPGRADE_APP_ROLES, remembering whether it could log in before; the
cutover lifts it right before the switch, cleanup after an abort or failure.
The engines' own sessions are not affected: they run as the migration role
(pgcopydb's apply; the native apply runs as the subscription's owner).
"""

from __future__ import annotations

from psycopg import sql

from steps import state
from steps.errors import StepError
from steps.log import log
from steps.pg import connect
from steps.settings import StepSettings


def roles(s: StepSettings) -> list[str]:
    return [r.strip() for r in (s.app_roles or "").split(",") if r.strip()]


def nologin(role: str) -> sql.Composed:
    return sql.SQL("ALTER ROLE {} NOLOGIN").format(sql.Identifier(role))


def login(role: str) -> sql.Composed:
    return sql.SQL("ALTER ROLE {} LOGIN").format(sql.Identifier(role))


TERMINATE = ("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
             "WHERE usename = %s AND datname = current_database()")


def fence(s: StepSettings) -> list[str]:
    """Fence every configured role; idempotent (the first fence's memory of which
    roles could log in is kept)."""
    names = roles(s)
    if not names:
        return []
    st = state.load(s)
    could_login = dict(st.fenced_roles or {})
    with connect(s.target(), "target", purpose="fence") as tgt:
        found = dict(tgt.execute("SELECT rolname, rolcanlogin FROM pg_roles WHERE rolname = ANY(%s)",
                                 (names,)).fetchall())
        missing = [r for r in names if r not in found]
        if missing:
            raise StepError(f"fence: application role(s) {', '.join(map(repr, missing))} do not exist on the target: "
                            "create them there (DB_UPGRADE_APP_ROLES names the roles the applications log in as)")
        for role in names:
            could_login.setdefault(role, bool(found[role]))
        state.record(s, fenced_roles=could_login)  # first: a crash after the ALTER still knows what to restore
        for role in names:
            if found[role]:
                tgt.execute(nologin(role))
            ended = tgt.execute(TERMINATE, (role,)).fetchone()[0]
            if ended:
                log(f"fence: ended {ended} session(s) of {role!r} already on the target")
    log(f"fence: application role(s) {', '.join(names)} cannot log in to the target until the switch")
    return names


def lift(s: StepSettings) -> list[str]:
    """Give back LOGIN to the roles that had it before the fence; idempotent."""
    st = state.load(s)
    fenced = st.fenced_roles or {}
    if not fenced:
        return []
    lifted = [role for role, could in fenced.items() if could]
    with connect(s.target(), "target", purpose="fence") as tgt:
        for role in lifted:
            tgt.execute(login(role))
    state.record(s, fenced_roles=None)
    if lifted:
        log(f"fence: lifted: {', '.join(lifted)} can log in to the target again")
    return lifted
