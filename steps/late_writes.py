"""Late writes: did anything write to the old database after the freeze?

An application the readonly SQL did not cover (another role, a cron job) keeps
writing to the old database after the cutover, and those rows never reach the
new one. After the switch the cutover compares the old database's per-table
write counters (pg_stat_user_tables) over a few seconds; any increase is a late
write, reported loudly with the tables. verify already catches a late write
that commits before it reads; this covers the ones after.

Counters are flushed by each backend at most once a second when idle
(PostgreSQL 15 pgstat), so the first sample is taken at least FLUSH seconds
after the freeze and the second a few seconds later.
"""

from __future__ import annotations

import time

from steps.log import log
from steps.pg import connect
from steps.settings import StepSettings

FLUSH = 2.0
WATCH = 3.0

COUNTERS = ("SELECT format('%I.%I', schemaname, relname), n_tup_ins + n_tup_upd + n_tup_del "
            "FROM pg_stat_user_tables WHERE schemaname NOT IN ('db_upgrade', 'pgcopydb')")


def snapshot(conn) -> dict[str, int]:
    return {name: int(n) for name, n in conn.execute(COUNTERS).fetchall()}


def changed(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """Tables whose write counters grew (pure)."""
    return {t: after[t] - before.get(t, 0) for t in sorted(after) if after[t] > before.get(t, 0)}


def check(s: StepSettings, frozen_at: float) -> dict[str, int]:
    wait = frozen_at + FLUSH - time.time()
    if wait > 0:
        time.sleep(wait)
    with connect(s.source(), "source", purpose="late-writes") as conn:
        before = snapshot(conn)
        time.sleep(WATCH)
        after = snapshot(conn)
    late = changed(before, after)
    if late:
        log("LATE WRITES ON THE OLD DATABASE after the freeze, not on the target: "
            + ", ".join(f"{t} ({n} row changes)" for t, n in list(late.items())[:10])
            + ". Some application still writes to the old database: the readonly SQL does not cover it; "
            "find it and move it, and reconcile those rows by hand")
    else:
        log(f"late-writes: no write to the old database's tables in the {WATCH:.0f}s after the switch")
    return late
