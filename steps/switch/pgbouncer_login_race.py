"""Works around PgBouncer's failed-login bookkeeping when PAUSE meets a login.

PAUSE closes the server connections of the database that are still logging in, and
PgBouncer counts that as a failed login (objects.c disconnect_server, state
SV_LOGIN: pool->last_login_failed, last_connect_failed; in 1.18 and still in
1.25). After RESUME the pool then opens no server connection for
server_login_retry (15 s by default), and every new request that finds no server
is refused with "server login has been failing, try again later
(server_login_retry)" (check_fast_fail). Measured here: about one switch in 30
while the pool was still growing; a server login slowed by a connect_query hits it
every time (tests/test_pgbouncer.py).

Two defences, both here:

- before PAUSE, wait until no server of the database is logging in (SHOW POOLS
  sv_login = 0): PAUSE then has no login to close;
- around RESUME, server_login_retry is 0, so that a pool marked failed anyway logs
  in again at once; it is put back as soon as the pool has a server connection
  (or after RESTORE_AFTER seconds). A RELOAD re-reads it from the file too.
"""

from __future__ import annotations

import time

from steps.log import log

POLL = 0.005
RESTORE_AFTER = 3.0  # seconds: a pool that cannot log in by then will not do it faster


def _pools(a, db: str) -> list[dict]:
    return [p for p in a.rows("SHOW POOLS") if p.get("database") == db]


def _count(pools: list[dict], *columns: str) -> int:
    return sum(int(p.get(c) or 0) for p in pools for c in columns)


def wait_no_login(a, db: str, deadline: float) -> bool:
    """True once no server connection of `db` is logging in; False at the deadline."""
    started = time.monotonic()
    while True:
        logins = _count(_pools(a, db), "sv_login")
        if logins == 0:
            if time.monotonic() - started > POLL:
                log(f"pgbouncer: {db}: waited {time.monotonic() - started:.2f}s for server logins to finish "
                    "before PAUSE")
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL)


def resume(a, db: str, command: str) -> str | None:
    """Runs the RESUME `command` with server_login_retry at 0 until the pool has a server
    again; returns PgBouncer's error message, or None."""
    config = a.config()
    retry = config.get("server_login_retry")
    lowered = retry not in (None, "0") and a.command("SET server_login_retry = 0") is None
    try:
        answer = a.command(command)
        if lowered and not (answer and "not paused" not in answer):
            deadline = time.monotonic() + RESTORE_AFTER
            while time.monotonic() < deadline:
                pools = _pools(a, db)
                if _count(pools, "cl_waiting") == 0 or _count(pools, "sv_active", "sv_idle", "sv_used", "sv_tested"):
                    break
                time.sleep(POLL)
            else:
                log(f"pgbouncer: {db}: no server connection within {RESTORE_AFTER:g}s of RESUME")
        return answer
    finally:
        if lowered:
            quoted = "'" + str(retry).replace("'", "''") + "'"
            problem = a.command(f"SET server_login_retry = {quoted}")
            if problem:
                log(f"pgbouncer: could not put server_login_retry back to {retry}: {problem}; "
                    "a RELOAD reads it from the file again")
