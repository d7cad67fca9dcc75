"""verify: the exact comparison of source and target, bounded by the last
seconds of changes. The argument (why it is exact) is in docs/verify.md.

- `prepare(s, stop)`: the change tracking (a pgoutput slot and a publication of
  our own on the source; ALWAYS triggers recording changed keys on the target,
  or, for a keyless table, the hashes of the rows it gained and lost),
  then the baseline: every table compared once, in chunks, each at a point both
  sides have reached, throttled when the apply falls behind.
- `reconcile(s)`: the verify-prepare step: prepare, then a round every few
  seconds until the cutover takes over (or the run ends).
- `round(s)`: one round: what changed since the last one, compared by key.
- `verify(s)`: the final check inside the frozen window (steps/verify/final.py).
- `status(s)`: prepared or not, what is unchecked, tables without a usable key.
- `teardown(s)`: drop the tracking on both sides; idempotent.

State lives in the databases (db_upgrade.verify_* on the target, the run's
record on the source), so every step here is safe to kill and to run again.
"""

from __future__ import annotations

import builtins
import threading
import time

import psycopg

from steps import state
from steps.errors import StepError
from steps.log import log
from steps.pg import lsn, pretty_bytes, scrub
from steps.settings import StepSettings
from steps.verify import plan, rounds, tracking
from steps.verify import sql as q
from steps.verify.final import verify
from steps.verify.report import TableResult, VerifyReport, VerifyStatus
from steps.verify.rounds import RoundResult

__all__ = [
    "RoundResult",
    "TableResult",
    "VerifyReport",
    "VerifyStatus",
    "drop_tracking",
    "prepare",
    "ready",
    "reconcile",
    "round",
    "status",
    "teardown",
    "verify",
]

THROTTLE_LAG = 16 * 1024 * 1024  # the baseline pauses while the apply is further behind than this
THROTTLE_MAX = 120.0  # ... for at most this long at a time
STATE_POLL = 1.0
LOG_EVERY = 60.0
MAX_ROUND_FAILURES = 30
PREPARE_RETRIES = 5


def teardown(s: StepSettings) -> None:
    """Drop the tracking slot and publication (source), triggers, functions and
    tables (target). Idempotent: cleanup calls it."""
    tracking.teardown(s)


drop_tracking = teardown  # the name cleanup used before


def _tracking_exists(s: StepSettings) -> bool:
    slot, _ = tracking.names(s)
    try:
        with tracking.target(s) as tgt:
            meta = tracking.load_meta(tgt)
        if meta is None or meta["run_id"] != s.run_id:
            return False
        with tracking.source(s) as src:
            row = src.execute(q.SLOT, (slot,)).fetchone()
        return row is not None and row[3] != "lost"
    except psycopg.Error:
        return False


def _lag(s: StepSettings) -> int | None:
    """How far the apply is behind, for throttling: the engine's own measure,
    else what the engine's slot has confirmed."""
    from steps import engines

    try:
        lag = engines.get(s).lag()
        if lag is not None:
            return lag
    except (StepError, psycopg.Error, ImportError):
        pass
    try:
        with tracking.source(s) as src:
            row = src.execute("SELECT pg_current_wal_lsn()::text, confirmed_flush_lsn::text FROM pg_replication_slots "
                              "WHERE slot_name = %s", (s.slot_name,)).fetchone()
        return None if row is None or row[1] is None else max(0, lsn(row[0]) - lsn(row[1]))
    except (StepError, psycopg.Error):
        return None


def _throttle(s: StepSettings, stop: threading.Event) -> int | None:
    """Wait while the apply is far behind: the baseline reads both sides and must
    not starve it. Returns the lag measured."""
    lag = _lag(s)
    if lag is None or lag <= THROTTLE_LAG:
        return lag
    log(f"verify-prepare: the target is {pretty_bytes(lag)} behind; pausing the baseline until it catches up")
    deadline = time.monotonic() + THROTTLE_MAX
    while lag is not None and lag > max(s.lag_threshold_bytes, THROTTLE_LAG // 4) and time.monotonic() < deadline:
        if stop.wait(1.0):
            return lag
        lag = _lag(s)
    return lag


def prepare(s: StepSettings, stop: threading.Event | None = None) -> bool:
    """The tracking and the baseline (module docstring). True when complete;
    False when `stop` was set first (what is done so far stays: it resumes)."""
    stop = stop or threading.Event()
    started = time.monotonic()
    st = state.load(s)
    exists = _tracking_exists(s)
    if st.verify_prepared_at and exists:
        return True
    if exists:
        log("verify-prepare: resuming the preparation this run began (the change tracking is in place)")
    else:
        if st.verify_prepared_at:
            log("verify-prepare: the change tracking of the earlier preparation is gone; preparing again")
            state.record(s, verify_prepared_at=None)
        teardown(s)  # whatever an earlier, unfinished attempt left
        with tracking.source(s) as src:
            tables = tracking.catalogue(src)
        for t in tables:
            if t.kind != plan.KEYED and t.checksum:
                log(f"verify-prepare: {t.label} ({pretty_bytes(t.bytes)}) has no usable key ({t.why}): the cutover "
                    "does not re-read it")
            elif t.kind != plan.KEYED:
                log(f"verify-prepare: {t.label} ({pretty_bytes(t.bytes)}) has no usable key ({t.why}): the "
                    "cutover re-reads it whole" + (" when it changed" if t.kind == plan.WHOLE else ""))
        log(f"verify-prepare: tracking changes: publication and slot {tracking.names(s)[0]!r} on the source, "
            f"triggers on {sum(t.kind != plan.UNTRACKED for t in tables)} target table(s)")
        try:
            l0, snapshot = tracking.install_source(s, tables)
            tracking.install_target(s, tables, l0, snapshot, stop)
        except BaseException:
            teardown(s)  # nothing half-done: the next attempt starts clean
            if stop.is_set():
                return False
            raise
        total = sum(t.bytes for t in tables if t.kind != plan.UNTRACKED)
        log(f"verify-prepare: comparing {len(tables)} table(s) ({pretty_bytes(total)}) once on both sides, in "
            "chunks, each at a point both sides have reached")
    failures = 0
    while not stop.is_set():
        lag = _throttle(s, stop)
        if stop.is_set():
            break
        try:
            result, _ = rounds.run(s, budget=plan.CHUNK_BYTES, stop=stop)
            failures = 0
        except InterruptedError:
            break
        except (StepError, psycopg.Error) as exc:
            failures += 1
            if failures >= PREPARE_RETRIES or isinstance(exc, rounds.NotPrepared):
                raise
            log(f"verify-prepare: a baseline round failed ({_first(exc)}); retrying")
            stop.wait(2.0)
            continue
        if result.baseline:
            log(f"verify-prepare: {result.line()}" + (f"; the target is {pretty_bytes(lag)} behind"
                                                      if lag is not None else ""))
        if result.baseline_left == 0:
            seconds = builtins.round(time.monotonic() - started, 2)
            state.record(s, verify_prepared_at=state.now(), verify_prepare_seconds=seconds,
                         verify_prepare_failed_at=None, verify_prepare_error=None)
            log(f"verify-prepare: prepared in {seconds}s: from here on only what changes is re-checked")
            return True
    log("verify-prepare: stopped before the preparation was complete (it resumes when run again)")
    return False


def round(s: StepSettings, stop: threading.Event | None = None) -> RoundResult:
    """One round: re-check, by key, what changed since the last one (the cutover
    runs it in its settle; it waits while reconcile runs one)."""
    try:
        result, _ = rounds.run(s, budget=plan.CHUNK_BYTES, stop=stop)
    except psycopg.Error as exc:
        raise StepError(f"verify: the round failed: {_first(exc)}") from None
    st = state.try_load(s)
    state.record(s, verify_rounds=((st.verify_rounds if st else None) or 0) + 1, verify_last_round_at=state.now(),
                 verify_last_round=result.as_dict())
    return result


def reconcile(s: StepSettings) -> None:
    """The verify-prepare step: prepare, then keep the comparison current until
    the cutover takes over or the run ends (exit 0 then)."""
    stop = threading.Event()
    why: list[str] = []

    def watch() -> None:
        while not stop.wait(STATE_POLL):
            st = state.try_load(s)
            reason = plan.should_stop(st) if st is not None else None
            if reason:
                why.append(reason)
                stop.set()

    threading.Thread(target=watch, daemon=True).start()
    try:
        prepared = prepare(s, stop)
    except (StepError, psycopg.Error) as exc:
        error = str(exc) if isinstance(exc, StepError) else f"verify-prepare: {_first(exc)}"
        stop.set()
        try:
            state.record(s, verify_prepare_failed_at=state.now(), verify_prepare_error=error[:500])
        except (StepError, psycopg.Error):
            pass  # the source is unreachable: the cutover's wait times out instead
        raise StepError(error) from None
    if not prepared:
        stop.set()
        log(f"verify-prepare: stopping ({why[0] if why else 'stopped'})")
        return
    failures = 0
    n = keys = 0
    last_log = time.monotonic()
    while not stop.is_set():
        try:
            result = round(s, stop)
            failures = 0
            n += 1
            keys += result.keys_checked
        except InterruptedError:
            break
        except (StepError, psycopg.Error) as exc:
            failures += 1
            log(f"verify-prepare: a round failed ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                "retrying")
            if failures >= MAX_ROUND_FAILURES:
                raise StepError(f"verify-prepare: {failures} rounds in a row failed; the last: {exc}") from None
        if time.monotonic() - last_log >= LOG_EVERY and n:
            log(f"verify-prepare: {n} round(s) in the last {time.monotonic() - last_log:.0f}s re-checked {keys} "
                f"changed row(s); last {result.line()}")
            n = keys = 0
            last_log = time.monotonic()
        stop.wait(s.poll_interval)
    log(f"verify-prepare: stopping: {why[0] if why else 'stopped'}")


READY_POLL = 2.0


def ready(s: StepSettings) -> VerifyStatus:
    """The verify-ready step: wait (writes allowed) until verify-prepare has
    prepared, then say where the comparison stands and how far the target is
    behind: the approval node shows both (its inputs are fixed when it starts)."""
    from steps import engines
    from steps.catchup import lag_line

    deadline = time.monotonic() + s.verify_prepare_timeout
    said = False
    while not s.skip_verify_preparation:
        st = state.load(s)
        if st.verify_prepared_at:
            break
        if st.verify_prepare_failed_at:
            raise StepError(f"verify-ready: the verify preparation failed ({st.verify_prepare_error}); run "
                            "verify-prepare again, or submit with skip-verify-preparation=true")
        if time.monotonic() >= deadline:
            raise StepError(f"verify-ready: the verify preparation is not complete after "
                            f"{s.verify_prepare_timeout:.0f}s; submit with skip-verify-preparation=true to cut over "
                            "without it")
        if not said:
            log("verify-ready: waiting for the verify preparation (the approval follows it)")
            said = True
        time.sleep(READY_POLL)
    st_ = status(s)
    lines = st_.lines()
    if s.skip_verify_preparation:
        lines.insert(0, "verification: preparation skipped (skip-verify-preparation=true): the window compares "
                        "whole tables")
    for line in lines:
        log(f"verify-ready: {line}")
    s.write_output("verification", "; ".join(lines)[:2000])
    try:
        lag = engines.get(s).lag()
    except (StepError, psycopg.Error):
        lag = None
    if lag is not None:
        s.write_output("lag", lag_line(lag, s.lag_threshold_bytes).replace("caught up; ", "now; "))
    return st_


def _first(exc: BaseException) -> str:
    return scrub((str(exc).strip().splitlines() or [type(exc).__name__])[0])


def status(s: StepSettings) -> VerifyStatus:
    """Where the comparison stands: for the approval and `status`."""
    st = state.try_load(s)
    out = VerifyStatus(prepared=bool(st and st.verify_prepared_at), prepared_at=st.verify_prepared_at if st else None,
                       last_round_at=st.verify_last_round_at if st else None,
                       rounds=(st.verify_rounds or 0) if st else 0)
    slot, _ = tracking.names(s)
    try:
        with tracking.target(s) as tgt:
            meta = tracking.load_meta(tgt)
            if meta is None or meta["run_id"] != s.run_id:
                out.prepared = False
                with tracking.source(s) as src:
                    tables = tracking.catalogue(src, geometry=False)
            else:
                tables = tracking.load_tables(tgt)
                out.pending_keys = tgt.execute(q.count_pending_keys()).fetchone()[0]
                marked = {r[0] for r in tgt.execute(q.marked_tables()).fetchall()}
                out.whole_at_verify = sorted(t.label for t in tables if t.kind == plan.UNTRACKED or t.label in marked
                                             or not t.baselined)
                out.baseline_left = sorted(t.label for t in tables if t.kind != plan.UNTRACKED and not t.baselined)
                with tracking.source(s) as src:
                    row = src.execute(q.SLOT, (slot,)).fetchone()
                    if row is not None and row[0]:
                        out.undecoded_bytes = max(0, lsn(row[2]) - lsn(row[0]))
                    sizes = {r[2]: r[3] for r in src.execute(q.LEAF_TABLES, ()).fetchall()}
                for t in tables:
                    t.bytes = sizes.get(t.label, t.bytes)
    except (StepError, psycopg.Error):
        return out
    out.without_key = sorted(((t.label, t.bytes, t.why or "") for t in tables if t.kind != plan.KEYED),
                             key=lambda x: -x[1])
    return out
