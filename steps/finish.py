"""finish: set pgcopydb's endpos, which lets follow apply everything written
before it and then exit.

The endpos is the source's *insert* position, not `--current`: pgcopydb 0.17's
`--current` takes pg_current_wal_flush_lsn(), which lags behind transactions
that committed with synchronous_commit=off; their rows would be lost (measured:
12 to 32 rows in 3 of 7 runs under writes).

Run after freeze it marks the last application write; run on abort (no freeze)
it simply stops follow. Calling it again keeps the first endpos. Calling it
before catch-up is allowed: follow applies up to the endpos, however far it is.
"""

import time

from steps import pgcopydb, sentinel, state
from steps.log import log
from steps.pg import connect, fmt_lsn, lsn, pretty_bytes
from steps.settings import StepSettings


STARTUP_WAIT = 120.0


def finish(s: StepSettings) -> int:
    workdir = s.workdir()
    # follow may have started pgcopydb a moment ago without its sentinel being
    # ready yet: wait for it rather than leave follow running with no endpos.
    deadline = time.monotonic() + STARTUP_WAIT
    while (state.read(workdir).get("follow_started_at") and not state.read(workdir).get("follow_failed_at")
           and not sentinel.started(workdir) and time.monotonic() < deadline):
        time.sleep(0.5)
    sen = sentinel.read(s)
    if sen is None:
        log(f"finish: no pgcopydb run in {workdir} (follow never started); nothing to stop")
        return 0
    if sen.endpos:
        log(f"finish: endpos already set to {fmt_lsn(sen.endpos)}; keeping it")
        return sen.endpos
    with connect(s.source(), "source") as conn:
        endpos = lsn(conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0])
    pgcopydb.run(s, "stream", "sentinel", "set", "endpos", "--dir", str(workdir), fmt_lsn(endpos))
    behind = max(0, endpos - sen.replay_lsn) if sen.apply and sen.replay_lsn else None
    state.update(workdir, endpos=fmt_lsn(endpos), endpos_set_at=state.now())
    log(f"finish: endpos set to {fmt_lsn(endpos)}"
        + (f"; {pretty_bytes(behind)} left to apply" if behind is not None
           else "" if sen.apply else "; the initial copy is still running"))
    return endpos
