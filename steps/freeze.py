"""freeze and unfreeze: stop and restore application writes on the source.

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


def freeze(s: StepSettings) -> float:
    if s.mode == "rehearsal":
        raise StepError("freeze never runs in rehearsal mode: the readonly SQL is not for the production source")
    workdir = s.workdir()
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
