"""wait-caught-up: wait until the copy is done and the target's lag is small.

The lag is the engine's (steps/engines/): bytes of source WAL the target has
not applied yet, None while the initial copy runs. Runs beside follow and
stops as soon as follow records a failure.
"""

from __future__ import annotations

import time

import psycopg

from steps import engines, state
from steps.errors import StepError
from steps.log import log
from steps.pg import pretty_bytes
from steps.settings import StepSettings

LOG_EVERY = 30.0
# A copy whose follow step has been silent this long is dead (an OOM kill or a
# lost node records no failure): stop instead of holding the slot for hours.
SILENT_FOLLOW = 120.0
# A failure recorded before this step started may be an earlier attempt's, with a
# retried follow (argo retry runs both again at once) about to start: wait this long for it.
RETRY_GRACE = 60.0


def lag_line(lag: int, threshold: int) -> str:
    return f"lag {pretty_bytes(lag)} (caught up; threshold {pretty_bytes(threshold)})"


def wait_caught_up(s: StepSettings) -> int:
    from steps.pg import connect

    for role, uri in (("source", s.source()), ("target", s.target())):
        with connect(uri, role):  # a wrong URI is one line now, not a timeout later
            pass
    engine = engines.get(s)
    threshold = s.lag_threshold_bytes
    deadline = time.monotonic() + s.catchup_timeout
    last_log = 0.0
    log(f"wait-caught-up: waiting for the copy to finish and the lag to fall under {pretty_bytes(threshold)} "
        f"(timeout {s.catchup_timeout:.0f}s)")
    started = time.time()
    while True:
        st = state.try_load(s)
        if st is not None and st.follow_failed_at and not st.follow_done_at and (
                st.follow_failed_at >= started or time.time() - started > RETRY_GRACE):
            raise StepError(f"wait-caught-up: the follow step failed ({st.follow_error or 'see its log'}); "
                            "nothing to wait for")
        if st is not None and st.follow_started_at and not st.copy_done_at and st.follow_alive_at \
                and time.time() - st.follow_alive_at > SILENT_FOLLOW:
            raise StepError(f"wait-caught-up: the follow step has been silent for {time.time() - st.follow_alive_at:.0f}s "
                            "during the initial copy (killed, out of memory, node lost?); run it again: the copy "
                            "starts over")
        try:
            lag = engine.lag()
        except (StepError, psycopg.Error):
            lag = None
        now = time.monotonic()
        if lag is not None and lag <= threshold:
            line = lag_line(lag, threshold)
            log(f"wait-caught-up: {line}")
            state.record(s, caught_up_at=state.now(), lag_at_catchup=lag)
            s.write_output("lag", line)
            s.write_output("lag-bytes", lag)
            return lag
        if now - last_log >= LOG_EVERY:
            last_log = now
            if lag is None:
                p = _safe(engine.copy_progress)
                what = f"{pretty_bytes(p[0])} of about {pretty_bytes(p[1])}" if p else "starting"
                log(f"wait-caught-up: initial copy in progress ({what})")
            else:
                log(f"wait-caught-up: lag {pretty_bytes(lag)}, above the {pretty_bytes(threshold)} threshold")
        if now >= deadline:
            where = "the initial copy is still running" if lag is None else f"lag is {pretty_bytes(lag)}"
            raise StepError(f"wait-caught-up: not caught up after {s.catchup_timeout:.0f}s ({where}); "
                            "raise DB_UPGRADE_CATCHUP_TIMEOUT or reduce the write load")
        time.sleep(s.poll_interval)


def _safe(fn):
    try:
        return fn()
    except Exception:
        return None
