"""cutover: the frozen window, in one process.

Started after the approval and before anything is frozen, so that its own start
(a pod, in a cluster) costs no downtime. In order:

1. checks: the approval really was given (not a timed-out suspend), no table
   created on the source after the copy (DDL is not replicated), the switch is
   reachable; the verify preparation is complete (or the operator said to skip it);
2. settle, writes allowed: the target within a small lag, then one last verify
   round, so that the window only re-checks the last moments' changes;
3. the window: switch.hold() (PgBouncer: PAUSE), freeze (readonly SQL, then the
   application's open transactions end), the engine's end position, the drain
   (the target shows it), sequences, verify;
4. the fence on the target lifts, `switch_started_at` is recorded, the switch.

A failure anywhere in 3 or before the record in 4 restores writes right there
(unfreeze, fence back, switch.release()), beside the action, like
pg_easy_replicate's switchover rescue. After `switch_started_at` nothing
unfreezes the source: the applications may already write to the target. The
exit handler's unfreeze-after-failure is only the backstop for a killed pod,
and it reads the same record.

In rehearsal mode nothing is frozen, fenced or switched: the cutover measures
settle, the drain to an end position and a bounded verify while the source
keeps writing, and reports the write-downtime they predict.
"""

from __future__ import annotations

import json
import time

from steps import engines, fence, freeze, sequences, state
from steps.errors import StepError
from steps.log import log
from steps.settings import StepSettings

DRAIN_POLL = 0.01
PREPARE_POLL = 2.0
# What the switch adds in a rehearsal's prediction when it cannot be measured
# (a rollout restart is the application's own start time: see the README).
PREDICTED_FREEZE_SECONDS = 0.05


def _switch(s: StepSettings):
    from steps import switch

    return switch.get(s)


def _verify():
    from steps import verify

    return verify


def check_approval(s: StepSettings) -> None:
    """A decision only counts when the approve node was resumed before its timeout (steps/suspend.py)."""
    from steps.suspend import decided_by_timeout

    if decided_by_timeout(s.approval_started_at, s.approval_finished_at, s.approval_timeout):
        raise StepError(
            f"cutover: the approval timed out after {s.approval_timeout:.0f}s; a decision that was set but never "
            "resumed does not count, so nothing was frozen. Submit the workflow again to cut over")


def _wait_prepared(s: StepSettings) -> None:
    if s.skip_verify_preparation:
        log("cutover: NOT waiting for the verify preparation (skip-verify-preparation): the frozen window "
            "compares everything that is not prepared; the report records it")
        state.record(s, verify_skipped_preparation=True)
        return
    deadline = time.monotonic() + s.verify_prepare_timeout
    said = False
    while True:
        st = state.load(s)
        if st.verify_prepared_at:
            return
        if st.verify_prepare_failed_at:
            raise StepError(f"cutover: the verify preparation failed ({st.verify_prepare_error}); nothing was frozen. "
                            "Run the verify-prepare step again, or submit with skip-verify-preparation=true (the "
                            "frozen window then compares whole tables)")
        if time.monotonic() >= deadline:
            raise StepError(f"cutover: the verify preparation is not complete after {s.verify_prepare_timeout:.0f}s; "
                            "nothing was frozen. Wait for it, or submit with skip-verify-preparation=true")
        if not said:
            log("cutover: waiting for the verify preparation to complete before freezing (writes stay allowed)")
            said = True
        time.sleep(PREPARE_POLL)


def _drain(s: StepSettings, engine, end: str) -> float:
    started = time.monotonic()
    deadline = started + s.drain_timeout
    next_check = started + 1.0
    while not engine.reached(end):
        now = time.monotonic()
        if now >= deadline:
            raise StepError(f"cutover: the target did not reach the end position within {s.drain_timeout:.0f}s")
        if now >= next_check:  # a stream that died meanwhile: do not keep writes frozen for nothing
            next_check = now + 1.0
            problem = engine.stream_problem()
            if problem:
                raise StepError(f"cutover: the change stream stopped during the drain: {problem}")
        time.sleep(DRAIN_POLL)
    return time.monotonic() - started


def _last_round(s: StepSettings) -> None:
    try:
        verify = _verify()
        started = time.monotonic()
        verify.round(s)
        log(f"cutover: last verify round before the freeze took {time.monotonic() - started:.2f}s")
    except (ImportError, AttributeError):
        pass
    except StepError as exc:
        log(f"cutover: the last verify round did not complete ({exc}); verify re-checks it in the window")


def cutover(s: StepSettings) -> dict:
    check_approval(s)
    engine = engines.get(s)
    sw = _switch(s)
    st = state.load(s)
    if st.new_objects:
        raise StepError(f"cutover: created on the source after the copy began and not replicated: "
                        f"{', '.join(st.new_objects[:10])}; nothing was frozen. Create them on the target (tables "
                        "also in the publication) or start the upgrade again")
    if not st.copy_done_at:
        raise StepError("cutover: the initial copy is not done; nothing was frozen")
    if st.switch_started_at:
        raise StepError("cutover: this run has already begun its switch; a second cutover would freeze the new "
                        "primary's old source again for nothing. Nothing was changed")
    problem = engine.stream_problem()
    if problem:
        raise StepError(f"cutover: the change stream cannot drain to an end position: {problem}; nothing was "
                        "frozen. Fix it (or run follow again), then retry")
    sw.check()
    state.record(s, cutover_started_at=state.now(), cutover_failed_at=None, cutover_error=None)
    log(f"cutover: starting ({engine.name} engine, switch: {sw.describe()})")
    _wait_prepared(s)
    t0 = time.monotonic()
    freeze.settle(s)
    _last_round(s)
    settle_seconds = round(time.monotonic() - t0, 3)
    state.record(s, settle_seconds=settle_seconds)
    if s.mode == "rehearsal":
        return _rehearse(s, engine, sw, settle_seconds)
    return _window(s, engine, sw)


def _window(s: StepSettings, engine, sw) -> dict:
    sw.hold()
    try:
        frozen_at = freeze.freeze(s, settle_first=False)  # restores writes itself if it cannot complete
    except BaseException:
        sw.release()
        raise
    timings = {}
    lifted = False
    try:
        t = time.monotonic()
        end = engine.set_end(since=frozen_at)  # never an end from before this freeze
        timings["end_position"] = time.monotonic() - t
        timings["drain"] = _drain(s, engine, end)
        state.record(s, drained_at=state.now())
        t = time.monotonic()
        sequences.sync(s)
        state.record(s, sequences_synced_at=state.now())
        timings["sequences"] = time.monotonic() - t
        t = time.monotonic()
        report = _verify().verify(s)
        timings["verify"] = time.monotonic() - t
        # The change recording's triggers on the target would make the applications'
        # first writes there fail (they may not write our schema): gone before the switch.
        t = time.monotonic()
        _verify().teardown(s)
        timings["verify_teardown"] = time.monotonic() - t
        if s.backout:  # before the first application write on the new side: nothing to copy back
            from steps import backout

            timings["backout_prepare"] = backout.prepare(s)
        fence.lift(s)
        lifted = True
        state.record(s, switch_started_at=state.now())  # the point of no return
    except BaseException as exc:
        _rescue(s, sw, lifted, exc)
        raise
    log("cutover: verified; switching the applications to the target (from here on the source stays frozen)")
    sw.switch()
    switched = time.time()
    downtime = round(switched - frozen_at, 3)
    state.record(s, switched_at=round(switched, 3), write_downtime_seconds=downtime)
    s.write_output("write-downtime-seconds", f"{downtime:.3f}")
    s.write_output("timings", json.dumps({k: round(v, 3) for k, v in timings.items()}))
    parts = ", ".join(f"{k} {v:.2f}s" for k, v in timings.items())
    log(f"cutover: done; application writes were frozen for {downtime:.2f}s ({parts})")
    late = _late_writes(s, frozen_at)  # before the reverse stream writes to the old database
    backout_open = _start_backout(s)
    return {"write_downtime_seconds": downtime, "timings": timings, "verify": report, "late_writes": late,
            "backout": backout_open}


def _start_backout(s: StepSettings) -> bool:
    """After the switch: the old database replays the new one's writes (the back-out window).
    A failure here never fails the cutover: the applications already write to the new side."""
    if not s.backout:
        s.write_output("backout", "off")
        return False
    from steps import backout

    try:
        backout.start(s)
    except StepError as exc:
        log(f"cutover: THE BACK-OUT WINDOW COULD NOT OPEN ({exc}); the upgrade is done, there is no way back "
            "without losing the writes made on the new database")
        s.write_output("backout", "off")
        return False
    s.write_output("backout", "open")
    return True


def _rescue(s: StepSettings, sw, lifted: bool, exc: BaseException) -> None:
    """The undo of the window, before the switch began: fence back, writes back."""
    error = str(exc) if isinstance(exc, StepError) else f"{type(exc).__name__}: {exc}"
    log(f"cutover: FAILED before the switch ({error}); restoring writes on the source")
    try:
        if lifted:
            fence.fence(s)
        if s.backout:  # a slot left on the new side would keep its WAL
            from steps import backout

            try:
                backout.end(s)
            except Exception as end_exc:
                log(f"cutover: could not drop the back-out window's objects ({end_exc}); cleanup drops them")
    finally:
        try:
            freeze.unfreeze(s, reason="the cutover failed before the switch")
        finally:
            sw.release()
            try:
                state.record(s, cutover_failed_at=state.now(), cutover_error=error[:500])
            except Exception:
                pass


def _late_writes(s: StepSettings, frozen_at: float) -> dict:
    from steps import late_writes

    try:
        late = late_writes.check(s, frozen_at)
    except Exception as exc:  # after the switch: a report, never a reason to fail the cutover
        log(f"late-writes: could not check the old database ({type(exc).__name__})")
        return {}
    state.record(s, late_writes=late)
    s.write_output("late-writes", str(sum(late.values())))
    return late


def _rehearse(s: StepSettings, engine, sw, settle_seconds: float) -> dict:
    """What the window would take, measured while the source keeps writing."""
    t = time.monotonic()
    end = engine.set_end(since=time.time())
    drain = _drain(s, engine, end)
    state.record(s, drained_at=state.now())
    t2 = time.monotonic()
    report = _verify().verify(s)
    verify_seconds = time.monotonic() - t2
    predicted = round(PREDICTED_FREEZE_SECONDS + (t2 - t) + verify_seconds, 3)
    s.write_output("timings", json.dumps({"settle": round(settle_seconds, 3), "drain": round(drain, 3),
                                          "verify": round(verify_seconds, 3)}))
    state.record(s, predicted_write_downtime_seconds=predicted)
    s.write_output("predicted-write-downtime-seconds", f"{predicted:.3f}")
    log(f"cutover (rehearsal): end position reached in {drain:.2f}s, bounded verify {verify_seconds:.2f}s: a cutover "
        f"now would freeze writes for about {predicted:.2f}s plus the switch ({sw.describe()})")
    return {"predicted_write_downtime_seconds": predicted, "verify": report, "settle_seconds": settle_seconds}
