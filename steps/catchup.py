"""wait-caught-up: wait until the copy is done and the replay lag is small.

Lag = source pg_current_wal_lsn() - what the target holds: the later of the
sentinel's replay_lsn and the target's replication origin, once pgcopydb has
finished the copy (its sentinel's apply flag). pgcopydb sets the origin to the
copy's snapshot position at setup and advances it in the same transaction as
each applied change, so it is exact at once, while the sentinel's replay_lsn
is published every few seconds and stays 0 until pgcopydb's apply has been
restarted after the copy (about 2 s). pg_stat_replication.replay_lag is not
used: pgcopydb reports it misleadingly (pgcopydb #518).
"""

import time

from steps import sentinel, state
from steps.errors import StepError
from steps.follow import _progress
from steps.log import log
from steps.pg import connect, origin_progress, pretty_bytes
from steps.settings import StepSettings

LOG_EVERY = 30.0


def applied_lsn(s: StepSettings) -> int:
    """The target's replication origin position (0 if there is none yet)."""
    import psycopg

    try:
        with connect(s.target(), "target") as conn:
            return origin_progress(conn, s.slot_name)
    except (psycopg.Error, StepError):
        return 0


def measure_lag(s: StepSettings) -> int | None:
    """Bytes behind, or None while the initial copy is still running."""
    sen = sentinel.read(s, strict=False)
    if sen is None or not sen.apply:
        return None
    # Source first: a position read after the target's can only overstate the lag.
    source = sentinel.source_lsn(s.source())
    applied = max(sen.replay_lsn, applied_lsn(s))
    return None if applied == 0 else max(0, source - applied)


def wait_caught_up(s: StepSettings) -> int:
    workdir = s.workdir()
    threshold = s.lag_threshold_bytes
    deadline = time.monotonic() + s.catchup_timeout
    last_log = 0.0
    log(f"wait-caught-up: waiting for the copy to finish and the lag to fall under {pretty_bytes(threshold)} "
        f"(timeout {s.catchup_timeout:.0f}s)")
    while True:
        record = state.read(workdir)
        if record.get("follow_failed_at") and not record.get("follow_done_at"):
            raise StepError(f"wait-caught-up: the follow step failed ({record.get('follow_error', 'see its log')}); "
                            "nothing to wait for")
        lag = measure_lag(s)
        now = time.monotonic()
        if lag is not None and lag <= threshold:
            line = f"lag {pretty_bytes(lag)} (caught up; threshold {pretty_bytes(threshold)})"
            log(f"wait-caught-up: {line}")
            state.update(workdir, caught_up_at=state.now(), lag_at_approval=lag)
            s.write_output("lag", line)
            s.write_output("lag-bytes", lag)
            return lag
        if now - last_log >= LOG_EVERY:
            last_log = now
            if lag is None:
                try:
                    p = _progress(s) if sentinel.started(workdir) else None
                except Exception:
                    p = None
                what = f"{p[0]}/{p[1]} tables and indexes done" if p and p[1] else "starting"
                log(f"wait-caught-up: initial copy in progress ({what})")
            else:
                log(f"wait-caught-up: lag {pretty_bytes(lag)}, above the {pretty_bytes(threshold)} threshold")
        if now >= deadline:
            where = "the initial copy is still running" if lag is None else f"lag is {pretty_bytes(lag)}"
            raise StepError(f"wait-caught-up: not caught up after {s.catchup_timeout:.0f}s ({where}); "
                            "raise DB_UPGRADE_CATCHUP_TIMEOUT or reduce the write load")
        time.sleep(s.poll_interval)
