"""freeze and unfreeze: stop and restore application writes on the source.

Before it, while writes are still allowed, freeze waits briefly (settle) for the
target to come within DB_UPGRADE_SETTLE_LAG_BYTES of the source: the frozen window
has to drain what is in flight at the freeze, so freezing at a low point of the
lag shortens it. It never fails on this; after DB_UPGRADE_SETTLE_TIMEOUT it
freezes anyway.

The readonly SQL runs in one transaction: if it fails halfway, nothing is frozen.
After it commits, transactions that were already open may still commit writes;
a write that commits after the endpos would never reach the target, so freeze
waits until every transaction open before the freeze has ended.
"""

import time
from datetime import datetime, timezone

import psycopg

from steps import state
from steps.errors import StepError
from steps.log import log
from steps.pg import connect, scrub
from steps.settings import StepSettings

# Client sessions that can still hold a write begun before the freeze; pgcopydb's
# own sessions (its walsender and catalog queries) are not application writes.
IN_FLIGHT = """
SELECT pid, usename, coalesce(application_name, ''),
       round(extract(epoch FROM clock_timestamp() - xact_start))::int
FROM pg_stat_activity
WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()
  AND xact_start IS NOT NULL AND xact_start < %s
  AND coalesce(application_name, '') NOT LIKE 'pgcopydb%%'
ORDER BY xact_start
"""


def _run_sql_file(s: StepSettings, which: str) -> float:
    text = s.sql_file(which)
    uri = s.source()
    with connect(uri, "source", autocommit=False) as conn:
        try:
            with conn.transaction():
                conn.execute(text)
        except psycopg.Error as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise StepError(f"{which} SQL failed and was rolled back, nothing changed: {scrub(first, uri)}") from None
        committed = conn.execute("SELECT extract(epoch FROM clock_timestamp())::float8").fetchone()[0]
        conn.commit()
    return committed


SETTLE_POLL = 0.05


def settle(s: StepSettings) -> int | None:
    """Wait, writes still allowed, until the target's replication origin is within
    settle_lag_bytes of the source's WAL. Returns the lag frozen at (None if unknown)."""
    from steps.pg import lsn, origin_progress, pretty_bytes

    if s.settle_timeout <= 0:
        return None
    deadline = time.monotonic() + s.settle_timeout
    best = None
    try:
        with connect(s.source(), "source") as src, connect(s.target(), "target") as tgt:
            while True:
                source = lsn(src.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0])
                applied = origin_progress(tgt, s.slot_name)
                if not applied:
                    log("freeze: no replication origin on the target yet; freezing without waiting for a low lag")
                    return None
                lag = max(0, source - applied)
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
                time.sleep(SETTLE_POLL)
    except (StepError, psycopg.Error) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        log(f"freeze: cannot measure the lag ({first}); freezing without waiting for a low lag")
        return None


def freeze(s: StepSettings) -> float:
    if s.mode == "rehearsal":
        raise StepError("freeze never runs in rehearsal mode: the readonly SQL is not for the production source")
    workdir = s.workdir()
    settle(s)
    started = time.time()
    frozen_at = _run_sql_file(s, "readonly")
    state.update(workdir, frozen_at=frozen_at, unfrozen_at=None)
    s.write_output("frozen-at", f"{frozen_at:.3f}")
    log(f"freeze: readonly SQL committed in {time.time() - started:.2f}s; application writes are now refused")
    deadline = time.monotonic() + s.freeze_timeout
    with connect(s.source(), "source") as conn:
        while True:
            rows = conn.execute(IN_FLIGHT, (datetime.fromtimestamp(frozen_at, tz=timezone.utc),)).fetchall()
            blocked = time.time() - frozen_at
            if not rows:
                log(f"freeze: no transaction from before the freeze is open; writes blocked for {blocked:.2f}s so far")
                return frozen_at
            if time.monotonic() >= deadline:
                listing = ", ".join(f"pid {p} user {u!r} open {age}s" for p, u, _a, age in rows[:5])
                unfreeze(s, reason="freeze timed out")
                raise StepError(
                    f"freeze: {len(rows)} transaction(s) open since before the freeze still running after "
                    f"{s.freeze_timeout:.0f}s ({listing}); writes were restored. End them or raise "
                    "DB_UPGRADE_FREEZE_TIMEOUT, then retry")
            log(f"freeze: waiting for {len(rows)} transaction(s) open since before the freeze "
                f"(oldest pid {rows[0][0]}, user {rows[0][1]!r}); writes blocked for {blocked:.1f}s")
            time.sleep(0.1)


def unfreeze(s: StepSettings, reason: str = "unfreeze step") -> None:
    _run_sql_file(s, "unfreeze")
    if s.dir is not None:
        state.try_update(s.dir, unfrozen_at=state.now())
    log(f"unfreeze: unfreeze SQL committed ({reason}); application writes are allowed on the source again")
