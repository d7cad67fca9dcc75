"""freeze and unfreeze: stop and restore application writes on the source.

settle() comes first, writes still allowed: it waits briefly for the target to
come within DB_UPGRADE_SETTLE_LAG_BYTES, because the frozen window has to drain
what is in flight at the freeze. It never fails; after DB_UPGRADE_SETTLE_TIMEOUT
it lets the freeze go ahead.

The readonly SQL runs in one transaction: if it fails halfway, nothing is
frozen. Transactions already open may still commit writes after it; a write
committed after the end position would never reach the target, so freeze waits
until every application transaction open before the freeze has ended. Only the
application's: our own sessions (named db-upgrade-*, steps.pg.connect) never
write application data, and waiting for them (verify's snapshots) was measured
to add seconds. pgcopydb's heartbeat is the exception on purpose (it must not
straddle the endpos unseen: steps/engines/pgcopydb_follow/drain.py).
"""

from __future__ import annotations

import time
from datetime import datetime, timezone

import psycopg

from steps import state
from steps.errors import StepError
from steps.log import log
from steps.pg import connect, pretty_bytes, scrub
from steps.settings import StepSettings

IN_FLIGHT = """
SELECT pid, usename, coalesce(application_name, ''),
       round(extract(epoch FROM clock_timestamp() - xact_start))::int
FROM pg_stat_activity
WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()
  AND xact_start IS NOT NULL AND xact_start < %s
  AND coalesce(application_name, '') NOT LIKE 'pgcopydb%%'
  AND (coalesce(application_name, '') NOT LIKE 'db-upgrade%%' OR application_name = 'db-upgrade-heartbeat')
ORDER BY xact_start
"""
SETTLE_POLL = 0.05


def run_sql_file(s: StepSettings, which: str, uri: str | None = None, side: str = "source") -> float:
    """Run the readonly or unfreeze SQL in one transaction; returns its commit time."""
    text = s.sql_file(which)
    uri = uri or s.source()
    with connect(uri, side, autocommit=False, purpose="freeze") as conn:
        try:
            with conn.transaction():
                conn.execute(text)
        except psycopg.Error as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise StepError(f"{which} SQL failed and was rolled back, nothing changed: {scrub(first, uri)}") from None
        committed = conn.execute("SELECT extract(epoch FROM clock_timestamp())::float8").fetchone()[0]
        conn.commit()
    return committed


def settle(s: StepSettings, between_polls=None) -> int | None:
    """Wait, writes still allowed, until the target is within settle_lag_bytes of
    the source. Returns the lag frozen at (None if unknown). `between_polls` runs
    between measurements (the cutover passes a verify round)."""
    from steps import engines

    if s.settle_timeout <= 0:
        return None
    engine = engines.get(s)
    deadline = time.monotonic() + s.settle_timeout
    best = None
    while True:
        try:
            lag = engine.lag()
        except (StepError, psycopg.Error) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            log(f"freeze: cannot measure the lag ({first}); freezing without waiting for a low lag")
            return None
        if lag is None:
            log("freeze: the change stream has not started; freezing without waiting for a low lag")
            return None
        best = lag if best is None else min(best, lag)
        if lag <= s.settle_lag_bytes:
            log(f"freeze: the target is {pretty_bytes(lag)} behind (at most {pretty_bytes(s.settle_lag_bytes)} "
                "wanted); freezing now")
            return lag
        if time.monotonic() >= deadline:
            log(f"freeze: the target stayed more than {pretty_bytes(s.settle_lag_bytes)} behind for "
                f"{s.settle_timeout:.0f}s (lowest {pretty_bytes(best)}, now {pretty_bytes(lag)}); freezing "
                "anyway: the frozen window will be longer")
            return lag
        if between_polls is not None:
            between_polls()
        time.sleep(SETTLE_POLL)


def freeze(s: StepSettings, settle_first: bool = True) -> float:
    if s.mode == "rehearsal":
        raise StepError("freeze never runs in rehearsal mode: the readonly SQL is not for the production source")
    if settle_first:
        settle(s)
    started = time.time()
    frozen_at = run_sql_file(s, "readonly")
    state.record(s, frozen_at=frozen_at, unfrozen_at=None)
    s.write_output("frozen-at", f"{frozen_at:.3f}")
    log(f"freeze: readonly SQL committed in {time.time() - started:.2f}s; application writes are now refused")
    open_ = wait_open_transactions(s.source(), "source", frozen_at, s.freeze_timeout, "freeze")
    if open_:
        unfreeze(s, reason="freeze timed out")
        raise StepError(
            f"freeze: {len(open_)} transaction(s) open since before the freeze still running after "
            f"{s.freeze_timeout:.0f}s ({describe_open(open_)}); writes were restored. End them or raise "
            "DB_UPGRADE_FREEZE_TIMEOUT, then retry")
    return frozen_at


def describe_open(rows) -> str:
    return ", ".join(f"pid {p} user {u!r} open {age}s" for p, u, _a, age in rows[:5])


def wait_open_transactions(uri: str, side: str, frozen_at: float, timeout: float, who: str) -> list:
    """Wait until every application transaction open before `frozen_at` has ended on
    this side; [] then, else the ones still open at the timeout."""
    deadline = time.monotonic() + timeout
    with connect(uri, side, purpose="freeze") as conn:
        while True:
            rows = conn.execute(IN_FLIGHT, (datetime.fromtimestamp(frozen_at, tz=timezone.utc),)).fetchall()
            blocked = time.time() - frozen_at
            if not rows:
                log(f"{who}: no application transaction from before the freeze is open on the {side}; writes "
                    f"blocked for {blocked:.2f}s so far")
                return []
            if time.monotonic() >= deadline:
                return rows
            log(f"{who}: waiting for {len(rows)} transaction(s) open since before the freeze on the {side} "
                f"(oldest pid {rows[0][0]}, user {rows[0][1]!r}); writes blocked for {blocked:.1f}s")
            time.sleep(0.02)


def unfreeze(s: StepSettings, reason: str = "unfreeze step") -> None:
    run_sql_file(s, "unfreeze")
    try:
        state.record(s, unfrozen_at=state.now())
    except Exception:  # writes are back: the record is a convenience here
        pass
    log(f"unfreeze: unfreeze SQL committed ({reason}); application writes are allowed on the source again")


def unfreeze_after_failure(s: StepSettings) -> None:
    """The exit handler's backstop (a killed cutover pod): restore writes only if
    this run froze the source and the switch never began. Decided from the run's
    record in the very database it would unfreeze."""
    if s.backout:  # a rollback killed inside its own frozen window: writes back on the new side
        from steps import backout

        backout.after_failure(s)
    st = state.load(s)
    if not st.switch_started_at:
        # A cutover killed while PgBouncer held the applications: let them go (on the old database).
        try:
            from steps import switch

            switch.get(s).release()
        except StepError as exc:
            log(f"unfreeze: could not release the switch ({exc})")
    if not st.frozen_at:
        log("unfreeze: this run never froze the source; nothing to restore")
        return
    if st.switch_started_at:
        log("unfreeze: NOT restoring writes on the source: the switch to the target had begun "
            f"(at {datetime.fromtimestamp(st.switch_started_at, tz=timezone.utc):%Y-%m-%d %H:%M:%S} UTC); "
            "the applications may already write to the target, and a writable source would fork the data")
        return
    if st.unfrozen_at and st.unfrozen_at >= st.frozen_at:
        log("unfreeze: writes were already restored after the freeze; running the unfreeze SQL again (harmless)")
    unfreeze(s, reason="the run failed after the freeze, before the switch")
