"""follow: copy the source into the target, then keep it in sync until the end
position that finish (or the cutover) sets is reached on the target.

Which engine does it is DB_UPGRADE_ENGINE (steps/engines/); this step adds what
every engine shares: the fence on the target's application roles before the
first row arrives, copy progress for the Argo UI, and the failure record that
wait-caught-up, beside it, stops on. Exits 0 only once the end is reached.
"""

from __future__ import annotations

import threading
import time

from steps import engines, state
from steps.errors import StepError
from steps.log import log
from steps.settings import StepSettings

PROGRESS_INTERVAL = 5.0
PULSE_EVERY = 10.0  # follow_alive_at; wait-caught-up gives up on a copy whose follow went silent


def follow(s: StepSettings) -> None:
    engine = engines.get(s)
    st = state.load(s)
    # Done, unless the stream stopped at an end a failed cutover set and gave up (then it
    # must stream on to the next one: the engine drops the stale end).
    if st.follow_done_at and st.end_position and engine.reached(st.end_position) and engine.stream_problem() is None:
        log("follow: already done (the target has everything up to the end position); nothing to do")
        return
    # A re-run: wait-caught-up beside it must not stop on the earlier failure.
    state.record(s, follow_attempt_at=state.now(), follow_alive_at=state.now(), follow_failed_at=None,
                 follow_error=None)
    if s.mode != "rehearsal":
        from steps import fence

        fence.fence(s)
    done = threading.Event()
    threading.Thread(target=_progress, args=(engine, done), daemon=True, name="copy-progress").start()
    try:
        engine.follow()
    except StepError as exc:
        _record_failure(s, str(exc))
        raise
    except OSError as exc:  # the work volume: full, read-only, gone
        error = StepError(f"follow: cannot write to the work dir {s.dir}: {exc.strerror}")
        _record_failure(s, str(error))
        raise error from None
    except Exception as exc:  # a bug: wait-caught-up beside us must still stop
        _record_failure(s, f"unexpected {type(exc).__name__}: {exc}")
        raise
    finally:
        done.set()


def _record_failure(s: StepSettings, error: str) -> None:
    try:
        state.record(s, follow_failed_at=state.now(), follow_error=error)
    except Exception:  # the source unreachable: the error line still says it all
        pass


def _progress(engine, done: threading.Event) -> None:
    """Bytes copied for the Argo UI (progress N/M) and the log, while the copy runs."""
    from steps.progress import copy_progress

    last_pulse = 0.0
    while not done.wait(PROGRESS_INTERVAL):
        try:
            if time.monotonic() - last_pulse >= PULSE_EVERY:
                state.record(engine.s, follow_alive_at=state.now())
                last_pulse = time.monotonic()
            p = engine.copy_progress()
            if p is not None and not state.load(engine.s).copy_done_at:
                copy_progress(*p)
        except Exception:  # cosmetic: never let it break the copy
            continue
