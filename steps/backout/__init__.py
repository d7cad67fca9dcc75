"""The back-out window: after the cutover the old database replays every write
made on the new one, so that going back loses nothing (native engine).

- `prepare(s)`: the cutover calls it inside its frozen window, after verify and
  before the fence lifts. On the new database: `db_upgrade.backout_barrier`
  (created on both sides), a publication FOR TABLE the application's tables and
  that barrier, and a pgoutput slot. No application has written to the new
  database yet (it is fenced), so the slot's start is before its first write:
  nothing to copy, nothing missed.
- `start(s)`: the cutover calls it after the switch (and its late-writes check).
  The forward stream and verify's tracking go first (PostgreSQL 15 cannot filter
  changes by origin: each change the old database applies would flow forward
  again, and the forward slots would keep the old server's WAL all window long);
  then a subscription on the old database (create_slot = false, copy_data =
  false). The old database's application roles stay frozen: the apply runs as
  the subscription's owner. The deadline is recorded.
- `rollback(s)`: the cutover in reverse, with its guarantees: hold, freeze the
  new database (its readonly SQL, then its open application transactions end),
  a barrier row there, the old database shows it, sequences new -> old, verify
  (new vs old, every table whole), unfreeze the old database, switch back,
  fence the new database's roles, end. Any failure before the switch back
  restores writes on the new database right there.
- `end(s)`: the end-backout step and the deadline's action: the subscription
  (disable, slot_name = NONE, drop), the slot, the publication, the barrier
  tables. Idempotent; each side on its own (an unreachable old server does not
  keep the slot on the new one).
- `status(s)`: phase, lag of the reverse stream, WAL it keeps, time left.
- `check(s)`: preflight, when the back-out window is enabled.
- `after_failure(s)`: the exit handler's backstop for a killed rollback pod.

Docs: docs/backout.md.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from datetime import datetime, timezone

import psycopg
from pydantic import SecretStr

from steps import fence, freeze, late_writes, sequences, state
from steps.backout import plan
from steps.backout import statements as q
from steps.errors import StepError
from steps.log import log
from steps.pg import connect, lsn, pretty_bytes, scrub, server_major
from steps.settings import StepSettings
from steps.switch.none import NoSwitch

DRAIN_POLL = 0.01
ERRORS_EVERY = 1.0  # rollback: how often the drain looks at the old side's apply errors
APPLY_WAIT = 30.0  # rollback: how long the old side's apply worker may take to (re)start before the freeze
SLOT_RELEASE_WAIT = 10.0
STATE_POLL = 1.0  # backout-verify-prepare: how often it looks for a rollback or the window's end
TEST_TIMEOUT = "20s"


def names(s: StepSettings) -> str:
    """The back-out's publication, slot and subscription name."""
    return q.name(s.slot_name)


def _conninfo(s: StepSettings) -> str:
    """The new database as the OLD server reaches it."""
    if s.backout_pguri is not None and s.backout_pguri.get_secret_value().strip():
        return s.backout_pguri.get_secret_value()
    return s.target()


def _uri_label(s: StepSettings) -> str:
    if s.backout_pguri is not None and s.backout_pguri.get_secret_value().strip():
        return "DB_UPGRADE_BACKOUT_PGURI"
    return "the target URI (DB_UPGRADE_BACKOUT_PGURI is not set)"


def _first(exc: BaseException, uri: str | None = None) -> str:
    return scrub((str(exc).strip().splitlines() or [type(exc).__name__])[0], uri)


def _reversed(s: StepSettings) -> StepSettings:
    """The same run with the endpoints swapped (new -> old), for sequences and verify.
    Its own run id: verify records its report in the record of its 'source', the new
    database, where end() forgets it."""
    return s.model_copy(update={
        "source_pguri": SecretStr(s.target()), "target_pguri": SecretStr(s.source()), "mode": "upgrade",
        "scratch_database": None, "dir": None, "outputs": None, "run_id": f"{s.run_id}-rollback"[:200],
        "slot_name": names(s)})


# -- preflight --------------------------------------------------------------------------------------------

def check(s: StepSettings, report=None) -> list[str]:
    """Everything the window needs, tried where it can be (the old server's connection
    to the new one, in a transaction that is rolled back). Returns the problems; each
    finding goes to `report` (steps.preflight.Report) or the log."""
    from steps.engines.native import preflight as native_preflight

    findings = [plan.judge_engine(s.engine)]
    with connect(s.source(), "source", purpose="preflight") as src, \
            connect(s.target(), "target", purpose="preflight") as tgt:
        major = server_major(src)
        me, superuser = src.execute("SELECT rolname, rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()
        subscriber = plan.judge_old_subscriber(major, me, superuser, src.execute(q.CREATE_SUBSCRIPTION_ROLE).fetchone()[0])
        findings.append(subscriber)
        findings.append(plan.judge_old_workers(*src.execute(q.OLD_WORKERS).fetchone()))
        findings += plan.judge_new_server(*tgt.execute(q.NEW_SERVER).fetchone())
        new_me, new_super, new_repl = tgt.execute(q.NEW_ROLE).fetchone()
        owners = [o for (o,) in src.execute(native_preflight.TABLE_OWNERS, ())]
        unusable = [r for (r,) in tgt.execute(q.UNUSABLE_OWNERS, (owners,))] if not new_super else []
        findings += plan.judge_new_role(new_me, new_super, new_repl, unusable)
        if subscriber[0]:
            probe = f"db_upgrade_backout_probe_{os.getpid()}"[:63]
            findings.append(plan.judge_test_subscription(_test_connection(s, src, probe), _uri_label(s)))
    for ok, text in findings:
        if report is not None:
            (report.good if ok else report.bad)(text)
        else:
            log(f"  {'ok      ' if ok else 'PROBLEM '} {text}")
    return [text for ok, text in findings if not ok]


def _test_connection(s: StepSettings, src: psycopg.Connection, name: str) -> str | None:
    conninfo = _conninfo(s)
    try:
        with src.transaction(force_rollback=True):
            _quiet(src)
            src.execute(f"SET LOCAL statement_timeout = '{TEST_TIMEOUT}'")
            src.execute(q.probe_subscription(name, conninfo))
    except psycopg.Error as exc:
        return _first(exc, conninfo)
    return None


def _quiet(src: psycopg.Connection) -> None:
    """Inside a transaction: keep a failed CREATE SUBSCRIPTION, CONNECTION (a password)
    included, out of the old server's log (superuser settings: tried, not required)."""
    from steps.engines.native.preflight import QUIET_LOGGING

    for statement in QUIET_LOGGING:
        try:
            with src.transaction():
                src.execute(statement)
        except psycopg.errors.InsufficientPrivilege:
            pass


# -- prepare, in the cutover's frozen window, and its undo -----------------------------------------------

def prepare(s: StepSettings) -> float:
    """Publication and slot on the new database while it is still fenced; returns the
    seconds it added to the frozen window. A second call in the same window keeps them."""
    if s.mode == "rehearsal":
        raise StepError("backout: nothing is prepared in rehearsal mode: the cutover does not switch")
    name = names(s)
    st = state.load(s)
    if st.backout_prepared_at and not st.backout_ended_at and st.frozen_at and st.backout_prepared_at >= st.frozen_at:
        with connect(s.target(), "target", purpose="backout") as tgt:
            if _slot(tgt, name) is not None:
                log(f"backout: already prepared in this frozen window (slot {name!r} at {st.backout_slot_lsn}); "
                    "keeping it")
                return 0.0
    started = time.monotonic()
    entry = _switch_back_entry(s)  # before anything changes: the include file may be unreadable
    try:
        with connect(s.source(), "source", purpose="backout") as src:
            if src.execute(q.SUBSCRIPTION_EXISTS, (name,)).fetchone():  # an earlier attempt's: its slot goes below
                for stmt in q.drop_subscription(name):
                    src.execute(stmt)
            src.execute(q.BARRIER_DDL)
        with connect(s.target(), "target", purpose="backout") as tgt:
            with tgt.transaction():
                tgt.execute(q.BARRIER_DDL)
                tables = [(r[0], r[1]) for r in tgt.execute(q.APP_TABLES, ()).fetchall()]
                tgt.execute(q.drop_publication(name))
                tgt.execute(q.create_publication(name, tables))
            # A slot left by an earlier attempt starts too early: whatever the forward
            # stream applied since would flow back. Only ever ours, in this database.
            _drop_slot(tgt, name)
            start_lsn = tgt.execute(q.CREATE_SLOT, (name,)).fetchone()[0]
            counters = late_writes.snapshot(tgt)
        seconds = round(time.monotonic() - started, 3)
        state.record(s, backout_prepared_at=state.now(), backout_prepare_seconds=seconds, backout_slot_lsn=start_lsn,
                     backout_counters=counters, backout_switch_back=entry, backout_started_at=None,
                     backout_deadline_at=None, backout_error=None, backout_ended_at=None, rollback_started_at=None,
                     rollback_frozen_at=None, rollback_unfrozen_at=None, rollback_drained_at=None,
                     rollback_verify=None, rollback_switch_started_at=None, rollback_switched_at=None,
                     rollback_write_downtime_seconds=None, rollback_writes_after_cutover=None,
                     rollback_failed_at=None, rollback_error=None, rolled_back_at=None)
    except BaseException as exc:
        error = _first(exc) if isinstance(exc, psycopg.Error) else str(exc)
        try:
            _drop_objects(s)
        except Exception:
            pass  # the cutover's rescue calls end(), which retries
        if isinstance(exc, psycopg.Error):
            raise StepError(f"backout: preparing the reverse stream on the new database failed ({error}); nothing "
                            "of it is left (preflight's back-out checks say what the roles need)") from None
        raise
    log(f"backout: publication and slot {name!r} on the new database (slot starts at {start_lsn}, before any "
        f"application write there; {len(tables)} table(s)); took {seconds:.3f}s of the frozen window")
    return seconds


def _switch_back_entry(s: StepSettings) -> dict | None:
    """pgbouncer: the old database's entry in the include file, before the switch rewrites
    it, so that a rollback can put it back as it was."""
    from steps.switch.settings import load_switch_settings

    if load_switch_settings().switch != "pgbouncer":
        return None
    from steps.switch import include
    from steps.switch.settings import load_pgbouncer_settings

    ps = load_pgbouncer_settings()
    try:
        text = ps.include_file.read_text()
    except OSError as exc:
        raise StepError(f"backout: cannot read {ps.include_file} to remember the old database's PgBouncer entry: "
                        f"{exc.strerror}") from None
    return include.current(text, ps.database, ps.include_file)


def _slot(tgt: psycopg.Connection, name: str):
    return tgt.execute(q.SLOT_STATE, (name,)).fetchone()


def _drop_slot(tgt: psycopg.Connection, name: str) -> bool:
    """Drop our slot in this database once no walsender holds it (terminating one that
    lingers); a slot of that name for another database is not ours: refuse."""
    deadline = time.monotonic() + SLOT_RELEASE_WAIT
    while True:
        row = tgt.execute("SELECT active_pid, database = current_database() FROM pg_replication_slots "
                          "WHERE slot_name = %s", (name,)).fetchone()
        if row is None:
            return False
        pid, ours = row
        if not ours:
            raise StepError(f"backout: a replication slot named {name!r} exists on the new server for another "
                            "database: it is not this run's; set DB_UPGRADE_SLOT_NAME to another name")
        if pid is None:
            try:
                tgt.execute(q.DROP_SLOT, (name,))
                return True
            except psycopg.errors.ObjectInUse:
                pass  # the subscriber reconnected in between
        elif time.monotonic() >= deadline:
            # A walsender whose subscriber is gone holds the slot until wal_sender_timeout.
            tgt.execute("SELECT pg_terminate_backend(%s)", (pid,))
            deadline = time.monotonic() + SLOT_RELEASE_WAIT
        time.sleep(0.1)


def _drop_objects(s: StepSettings) -> list[str]:
    """Everything of the back-out, each side on its own; returns what could not be done."""
    from steps import verify
    from steps.verify import tracking

    name = names(s)
    rev = _reversed(s)
    problems = []
    verify.teardown(rev)  # the rollback's verify tracking: slot on the new side, triggers on the old (each on its own)
    try:
        with connect(s.source(), "source", purpose="backout") as src:
            if src.execute(q.SUBSCRIPTION_EXISTS, (name,)).fetchone():
                for stmt in q.drop_subscription(name):
                    src.execute(stmt)
                log(f"backout: dropped subscription {name!r} on the old database")
            src.execute(q.DROP_BARRIER)
    except (StepError, psycopg.Error) as exc:
        problems.append(f"on the old database: {_first(exc, s.source())}")
    try:
        with connect(s.target(), "target", purpose="backout") as tgt:
            if _drop_slot(tgt, name):
                log(f"backout: dropped replication slot {name!r} on the new database")
            tgt.execute(q.drop_publication(name))
            tgt.execute(q.DROP_BARRIER)
            verify_slot = tracking.names(rev)[0]
            if tgt.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (verify_slot,)).fetchone():
                problems.append(f"the rollback's verify tracking slot {verify_slot!r} is still on the new server")
        state.forget(rev)  # the rollback's verify record, in the new database
        with connect(s.target(), "target", purpose="backout") as tgt:
            try:
                tgt.execute(q.DROP_EMPTY_SCHEMA)  # only when nothing of anyone's is left in it
            except psycopg.errors.DependentObjectsStillExist:
                pass
    except (StepError, psycopg.Error) as exc:
        problems.append(f"on the new database: {_first(exc, s.target())}")
    return problems


# -- start, after the switch -------------------------------------------------------------------------------

def start(s: StepSettings) -> float:
    """The old database subscribes to the new one; returns the deadline (unix seconds).
    On failure nothing of the back-out is left (a slot without a subscriber would keep
    the new server's WAL) and StepError says why: the upgrade itself is done."""
    name = names(s)
    st = state.load(s)
    if not st.backout_prepared_at or st.backout_ended_at:
        raise StepError("backout: the cutover prepared no reverse stream in this run, so there is no back-out "
                        "window: the new database is the primary")
    with connect(s.source(), "source", purpose="backout") as src:
        if src.execute(q.SUBSCRIPTION_EXISTS, (name,)).fetchone() and st.backout_started_at:
            log(f"backout: subscription {name!r} already replays the new database on the old one")
            return st.backout_deadline_at
    conninfo = _conninfo(s)
    try:
        _stop_forward(s)
        with connect(s.source(), "source", purpose="backout") as src:
            with src.transaction():  # allowed in one: it creates no slot
                _quiet(src)
                src.execute(q.create_subscription(name, conninfo, name, name))
    except (StepError, psycopg.Error) as exc:
        error = _first(exc, conninfo)
        log(f"backout: THE BACK-OUT WINDOW COULD NOT BE OPENED ({error}); dropping what was prepared. The upgrade "
            "itself is done: the applications stay on the new database, and there is no way back without losing "
            "its writes")
        problems = _drop_objects(s)
        try:
            state.record(s, backout_error=error[:500], **({} if problems else {"backout_ended_at": state.now()}))
        except StepError:
            pass
        raise StepError(f"backout: creating the subscription on the old database failed ({error}); no back-out "
                        f"window (the old server reaches the new one with {_uri_label(s)}; preflight tries it)"
                        + (f"; and: {'; '.join(problems)}" if problems else "")) from None
    started = state.now()
    deadline = plan.deadline(started, s.backout_window_seconds)
    state.record(s, backout_started_at=started, backout_deadline_at=deadline)
    log(f"backout: the old database replays the new one's writes (subscription {name!r}; its application roles "
        f"stay frozen). Back-out window open until "
        f"{datetime.fromtimestamp(deadline, tz=timezone.utc):%Y-%m-%d %H:%M:%S} UTC: then end-backout drops it")
    return deadline


def _stop_forward(s: StepSettings) -> None:
    """The forward direction's replication goes before the reverse one starts.
    PostgreSQL 15 publishers cannot filter by origin: every change the reverse apply
    makes on the old database would be decoded by the forward slot and applied on
    the new one again (a loop); and the forward slot and verify's tracking slot would
    keep the old server's WAL for the whole window. Both calls are idempotent (cleanup
    repeats them)."""
    from steps import engines, verify

    verify.teardown(s)
    engines.get(s).cleanup()
    log("backout: the forward stream (and verify's tracking) is dropped: nothing flows old -> new any more")


# -- the rollback's verify preparation, during the window -------------------------------------------------

def verify_prepare(s: StepSettings) -> None:
    """`db-upgrade step backout-verify-prepare`, beside the backout suspend: verify's
    preparation (steps/verify), new -> old, with the back-out's names (so verify finds the
    reverse subscription's origin on the old database). Then the rollback's verify re-checks
    only what changed since its last round, instead of reading every table whole inside its
    frozen window. Runs until a rollback begins or the window ends."""
    from steps import verify

    st = state.load(s)
    if not st.backout_started_at or st.backout_ended_at or st.rolled_back_at:
        log("backout-verify-prepare: no back-out window is open; nothing to prepare")
        return
    rev = _reversed(s)
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(STATE_POLL):
            now = state.try_load(s)
            if now is not None and (now.rollback_started_at or now.backout_ended_at or now.rolled_back_at):
                stop.set()

    threading.Thread(target=watch, daemon=True).start()
    try:
        if not verify.prepare(rev, stop):
            log("backout-verify-prepare: stopped before the preparation was complete (the rollback compares every "
                "table whole)")
            return
        while not stop.wait(s.poll_interval):
            try:
                verify.round(rev, stop)
            except InterruptedError:
                break
            except (StepError, psycopg.Error) as exc:  # a window end racing the round, or a blip: the next one tells
                if stop.is_set():
                    break  # interrupted by the rollback (or the end) it makes way for
                log(f"backout-verify-prepare: a round failed ({_first(exc)}); retrying")
    finally:
        stop.set()
    log("backout-verify-prepare: stopping (a rollback began, or the window ended)")


def _verify_prepared(s: StepSettings) -> bool:
    try:
        return bool(state.load(_reversed(s)).verify_prepared_at)
    except StepError:
        return False


# -- rollback: the cutover in reverse ------------------------------------------------------------------------

def rollback(s: StepSettings) -> dict:
    if s.mode == "rehearsal":
        raise StepError("rollback: never in rehearsal mode: the rehearsal's cutover switched nothing")
    st = state.load(s)
    if st.rolled_back_at:
        log("rollback: this run was already rolled back; nothing to do")
        return plan.report("rolled back", (st.rollback_verify or {}).get("summary", ""),
                           st.rollback_writes_after_cutover or {}, st.rollback_write_downtime_seconds, {})
    if st.backout_ended_at or (st.backout_prepared_at and not st.backout_started_at and st.backout_error):
        raise StepError("rollback: the back-out window has ended"
                        + (f" ({_when(st.backout_ended_at)})" if st.backout_ended_at else "")
                        + ": the old database no longer receives the new one's writes, so going back would lose "
                        "them; nothing was frozen")
    if not st.backout_started_at:
        raise StepError("rollback: no back-out window is open in this run (the cutover did not open one); "
                        "nothing was frozen")
    if plan.decided_by_timeout(s.backout_decision_started_at, s.backout_decision_finished_at,
                               s.backout_window_seconds):
        log("rollback: NOT rolling back: the decision was set but only the window's timeout resumed it; the "
            "deadline's action runs instead: end-backout")
        end(s)
        raise StepError("rollback: the back-out window timed out (a rollback that was set but never resumed does "
                        "not count); it is ended and the new database stays the primary")
    sw = _switch_back(s, st)
    if st.rollback_switch_started_at:  # a rollback pod died after its point of no return
        log("rollback: an earlier attempt had unfrozen the old database; finishing its switch back")
        return _switch_back_and_end(s, sw, st.rollback_frozen_at or time.time(), {}, "verified by the earlier attempt")
    sw.check()
    _check_stream(s)
    state.record(s, rollback_started_at=state.now(), rollback_failed_at=None, rollback_error=None)
    log(f"rollback: starting (switch back: {sw.describe()})")
    _settle(s)
    sw.hold()
    try:
        frozen_at = _freeze_new(s)  # restores writes itself if it cannot complete
    except BaseException as exc:
        sw.release()
        try:
            state.record(s, rollback_failed_at=state.now(), rollback_error=str(exc)[:500])
        except Exception:
            pass
        raise
    timings: dict[str, float] = {}
    unfrozen_old = False
    try:
        t = time.monotonic()
        ident = _barrier(s)
        timings["barrier"] = time.monotonic() - t
        timings["drain"] = _drain(s, ident)
        state.record(s, rollback_drained_at=state.now())
        t = time.monotonic()
        log("rollback: sequences: setting the old database's from the new one's (in the lines below the new "
            "database is the 'source')")
        sequences.sync(_reversed(s))
        timings["sequences"] = time.monotonic() - t
        t = time.monotonic()
        verification = _verify_back(s)
        timings["verify"] = time.monotonic() - t
        freeze.unfreeze(s, reason="rollback: the old database takes the writes again")
        unfrozen_old = True
        state.record(s, rollback_switch_started_at=state.now())  # the point of no return
    except BaseException as exc:
        _rescue(s, sw, unfrozen_old, exc)
        raise
    return _switch_back_and_end(s, sw, frozen_at, timings, verification)


def _when(at: float | None) -> str:
    return f"at {datetime.fromtimestamp(at, tz=timezone.utc):%Y-%m-%d %H:%M:%S} UTC" if at else "earlier"


def _switch_back(s: StepSettings, st: state.RunState):
    """The cutover's switch with the old database as the destination. none and restart
    need nothing else (restart restarts the deployments onto whatever their configuration
    says: point it back at the old database first); pgbouncer repoints the entry to what
    it was before the cutover (recorded by prepare)."""
    from steps import switch
    from steps.switch.settings import load_switch_settings

    strategy = load_switch_settings().switch
    if strategy == "none":
        return _NothingMovesBack()
    if strategy != "pgbouncer":
        return switch.get(s)
    from steps.switch.pgbouncer import PgBouncerSwitch
    from steps.switch.settings import load_pgbouncer_settings

    forward = load_pgbouncer_settings()
    if not st.backout_switch_back:
        raise StepError("rollback: the cutover recorded no PgBouncer entry of the old database, so the switch back "
                        "does not know where to point; nothing was frozen")
    try:
        overrides = plan.switch_back_overrides(st.backout_switch_back, forward.database or "")
    except ValueError as exc:
        raise StepError(f"rollback: {exc}; nothing was frozen") from None
    return PgBouncerSwitch(load_pgbouncer_settings(**overrides))


class _NothingMovesBack(NoSwitch):
    """none, said the right way round."""

    def describe(self) -> str:
        return ("none: the applications are not moved (DB_UPGRADE_SWITCH=none): point them back at the old "
                "database yourself")

    def switch(self) -> None:
        log("switch none: the applications were not moved; point them back at the old database now")


def _check_stream(s: StepSettings) -> None:
    """Before anything is frozen: the slot exists, the subscription is enabled and its
    worker runs (waiting a little for one that restarts after an error)."""
    name = names(s)
    with connect(s.target(), "target", purpose="backout") as tgt:
        if _slot(tgt, name) is None:
            raise StepError(f"rollback: the reverse slot {name!r} is gone from the new database: the old one no longer "
                            "receives its writes; nothing was frozen. Run end-backout; going back would lose writes")
    deadline = time.monotonic() + APPLY_WAIT
    with connect(s.source(), "source", purpose="backout") as src:
        while True:
            row = src.execute(q.SUBSCRIPTION_STATE, (name,)).fetchone()
            if row is None:
                raise StepError(f"rollback: no subscription {name!r} on the old database: the back-out window is "
                                "broken; nothing was frozen. Run end-backout")
            _oid, enabled, _applied, pid, errors = row
            if not enabled:
                raise StepError(f"rollback: subscription {name!r} on the old database is disabled: ALTER SUBSCRIPTION "
                                f"{name} ENABLE, then retry; nothing was frozen")
            if pid is not None:
                return
            if time.monotonic() >= deadline:
                raise StepError(f"rollback: the old database's apply worker for {name!r} is not running after "
                                f"{APPLY_WAIT:.0f}s ({errors} apply error(s); the cause is in the old server's log); "
                                "nothing was frozen")
            time.sleep(0.5)


def _lag(s: StepSettings) -> int | None:
    with connect(s.target(), "target", purpose="lag") as tgt:
        row = _slot(tgt, names(s))
    if row is None or row[0] is None:
        return None
    return max(0, lsn(row[3]) - lsn(row[0]))


def _settle(s: StepSettings) -> None:
    """Writes still allowed: wait briefly for the old database to come close, and run a
    last verify round when prepared, so that the frozen window covers only the last moments."""
    deadline = time.monotonic() + s.settle_timeout
    while True:
        lag = _lag(s)
        if lag is None or lag <= s.settle_lag_bytes or time.monotonic() >= deadline:
            if lag is not None:
                log(f"rollback: the old database is {pretty_bytes(lag)} behind the new one")
            break
        time.sleep(0.05)
    if _verify_prepared(s):
        from steps import verify

        started = time.monotonic()
        try:
            verify.round(_reversed(s))
            log(f"rollback: last verify round before the freeze took {time.monotonic() - started:.2f}s")
        except StepError as exc:
            log(f"rollback: the last verify round did not complete ({exc}); verify re-checks it in the window")


def _freeze_new(s: StepSettings) -> float:
    """The readonly SQL on the NEW database, then its application transactions open
    from before end (the same rule as freeze.freeze, on the other side)."""
    started = time.time()
    frozen_at = freeze.run_sql_file(s, "readonly", uri=s.target(), side="target")
    state.record(s, rollback_frozen_at=frozen_at, rollback_unfrozen_at=None)
    s.write_output("rollback-frozen-at", f"{frozen_at:.3f}")
    log(f"rollback: readonly SQL committed on the NEW database in {time.time() - started:.2f}s; application writes "
        "are refused there now")
    open_ = freeze.wait_open_transactions(s.target(), "target", frozen_at, s.freeze_timeout, "rollback")
    if open_:
        _unfreeze_new(s, "the rollback's freeze timed out")
        raise StepError(f"rollback: {len(open_)} transaction(s) open on the new database since before the freeze "
                        f"still running after {s.freeze_timeout:.0f}s ({freeze.describe_open(open_)}); writes were "
                        "restored there. End them or raise DB_UPGRADE_FREEZE_TIMEOUT, then retry")
    return frozen_at


def _unfreeze_new(s: StepSettings, reason: str) -> None:
    freeze.run_sql_file(s, "unfreeze", uri=s.target(), side="target")
    try:
        state.record(s, rollback_unfrozen_at=state.now())
    except Exception:  # writes are back: the record is a convenience here
        pass
    log(f"rollback: unfreeze SQL committed on the NEW database ({reason}); application writes are allowed there "
        "again")


def _barrier(s: StepSettings) -> str:
    ident = f"{s.run_id}:rollback:{uuid.uuid4().hex[:12]}"
    with connect(s.target(), "target", purpose="barrier") as tgt:
        with tgt.transaction():
            tgt.execute("SET LOCAL synchronous_commit = on")  # flushed at commit: the walsender sends it at once
            tgt.execute(q.insert_barrier(), (ident,))
    log(f"rollback: barrier row {ident!r} written on the new database; the old one has every write before it once "
        "it shows that row")
    return ident


def _drain(s: StepSettings, ident: str) -> float:
    started = time.monotonic()
    deadline = started + s.drain_timeout
    name = names(s)
    with connect(s.source(), "source", purpose="drain") as src:
        errors0 = (src.execute(q.SUBSCRIPTION_STATE, (name,)).fetchone() or (0, 0, 0, 0, 0))[4]
        looked = started
        while src.execute(q.barrier_seen(), (ident,)).fetchone() is None:
            now = time.monotonic()
            if now >= deadline:
                raise StepError(f"rollback: the old database did not show the barrier within {s.drain_timeout:.0f}s "
                                "(DB_UPGRADE_DRAIN_TIMEOUT)")
            if now - looked >= ERRORS_EVERY:
                looked = now
                errors = (src.execute(q.SUBSCRIPTION_STATE, (name,)).fetchone() or (0, 0, 0, 0, errors0))[4]
                if errors > errors0:
                    raise StepError(f"rollback: the old database's apply failed {errors - errors0} time(s) while "
                                    "draining (the cause is in the old server's log: a row written on the old "
                                    "database by someone else conflicts?)")
            time.sleep(DRAIN_POLL)
    seconds = time.monotonic() - started
    log(f"rollback: the old database shows the barrier after {seconds:.2f}s")
    return seconds


def _verify_back(s: StepSettings) -> str:
    """steps.verify.verify with the endpoints swapped: the new database as 'source',
    the old one as 'target'. Prepared by backout-verify-prepare during the window, it
    re-checks only what changed since its last round; otherwise (the forward preparation
    cannot serve: its baseline and tracking are of the other direction, and gone) every
    table is compared whole, a full read of both sides inside the window."""
    from steps import verify

    how = "what changed since its last round" if _verify_prepared(s) else "every table whole (not prepared)"
    log(f"rollback: verify: the new database (as 'source') against the old one (as 'target'), {how}")
    report = verify.verify(_reversed(s))
    state.record(s, rollback_verify=report.as_dict())
    s.write_output("rollback-verify", report.summary())
    # Its change-recording triggers on the old database would make the applications' first
    # writes there fail (they may not write our schema): gone before the switch back.
    verify.teardown(_reversed(s))
    return report.summary()


def _rescue(s: StepSettings, sw, unfrozen_old: bool, exc: BaseException) -> None:
    """The undo of the rollback's window, before the switch back: writes back on the new database."""
    error = str(exc) if isinstance(exc, StepError) else f"{type(exc).__name__}: {exc}"
    log(f"rollback: FAILED before the switch back ({error}); restoring writes on the new database")
    try:
        if unfrozen_old:
            try:
                freeze.run_sql_file(s, "readonly")  # the old one frozen again first: never both writable
            except StepError as again:
                log(f"rollback: THE OLD DATABASE COULD NOT BE FROZEN AGAIN ({again}): the new one stays frozen so "
                    "that the two cannot fork; freeze the old one (readonly SQL), then run the unfreeze SQL on the new")
                raise
        _unfreeze_new(s, "the rollback failed before the switch back")
    finally:
        sw.release()
        try:
            state.record(s, rollback_failed_at=state.now(), rollback_error=error[:500])
        except Exception:
            pass


def _switch_back_and_end(s: StepSettings, sw, frozen_at: float, timings: dict, verification: str) -> dict:
    log("rollback: verified; switching the applications back to the old database (from here on the new database "
        "stays frozen)")
    sw.switch()
    switched = time.time()
    downtime = round(switched - frozen_at, 3)
    state.record(s, rollback_switched_at=round(switched, 3), rollback_write_downtime_seconds=downtime)
    s.write_output("rollback-write-downtime-seconds", f"{downtime:.3f}")
    parts = ", ".join(f"{k} {v:.2f}s" for k, v in timings.items())
    log(f"rollback: done; application writes were frozen for {downtime:.2f}s" + (f" ({parts})" if parts else ""))
    after = []  # after the switch back: reported, never undone
    try:
        if fence.fence(s):  # an application that still finds the new database is refused, loudly
            log("rollback: the new database's application roles stay NOLOGIN there (ALTER ROLE ... LOGIN before "
                "another upgrade to it)")
    except StepError as exc:
        after.append(f"fencing the new database failed: {exc}")
    writes = _writes_after_cutover(s, frozen_at)
    problems = _drop_objects(s)
    st_ended = {} if problems else {"backout_ended_at": state.now()}
    state.record(s, rolled_back_at=state.now(), **st_ended)
    result = plan.report("rolled back", verification, writes, downtime, timings)
    s.write_output("rollback", json.dumps(result, sort_keys=True))
    log(f"rollback: {plan.writes_total(writes)} row change(s) made on the new database after the cutover are on the "
        "old one, verified; the old database is the primary again")
    after += [f"ending the back-out: {p}" for p in problems]
    if after:
        raise StepError(f"rollback: the applications are back on the old database, but {'; '.join(after)}: run "
                        "end-backout again")
    return result


def _writes_after_cutover(s: StepSettings, frozen_at: float) -> dict[str, int]:
    """Row changes on the new database since prepare(), from its write counters (each
    backend flushes them at most once a second: read after the switch back, off the
    downtime)."""
    st = state.load(s)
    wait = frozen_at + late_writes.FLUSH - time.time()
    if wait > 0:
        time.sleep(wait)
    try:
        with connect(s.target(), "target", purpose="late-writes") as tgt:
            changes = late_writes.changed(st.backout_counters or {}, late_writes.snapshot(tgt))
    except StepError:
        return {}
    state.record(s, rollback_writes_after_cutover=changes)
    return changes


def after_failure(s: StepSettings) -> None:
    """The exit handler's backstop for a killed rollback pod: writes back on the new
    database if the rollback froze it and never reached its point of no return."""
    st = state.load(s)
    if not st.rollback_frozen_at or st.rollback_switch_started_at:
        return
    if st.rollback_unfrozen_at and st.rollback_unfrozen_at >= st.rollback_frozen_at:
        return
    _unfreeze_new(s, "the rollback failed after its freeze, before the switch back")


# -- end: the end-backout step and the deadline's action ------------------------------------------------------

def end(s: StepSettings) -> None:
    """Drop everything of the back-out on both sides; idempotent. The new database's
    side is done even when the old one is unreachable: its slot is what fills a disk."""
    st = state.try_load(s)
    problems = _drop_objects(s)
    if problems:
        raise StepError(f"end-backout: {'; '.join(problems)}; run end-backout again once it is reachable")
    if st is not None and st.backout_prepared_at and not st.backout_ended_at:
        state.record(s, backout_ended_at=state.now())
    log("end-backout: nothing of the back-out window is left on either database"
        + ("; the new database is the primary for good" if st is not None and not st.rolled_back_at else ""))


# -- status ---------------------------------------------------------------------------------------------------

def status(s: StepSettings) -> plan.BackoutStatus:
    st = state.try_load(s)
    if st is None:
        return plan.BackoutStatus("unknown", problems=["the old database cannot be read"])
    if st.rolled_back_at:
        return plan.BackoutStatus("rolled back")
    if st.backout_ended_at:
        return plan.BackoutStatus("ended")
    if not st.backout_prepared_at:
        return plan.BackoutStatus("off")
    out = plan.BackoutStatus("open" if st.backout_started_at else "prepared", deadline_at=st.backout_deadline_at,
                             time_left_seconds=plan.time_left(st.backout_deadline_at))
    name = names(s)
    try:
        with connect(s.target(), "target", purpose="status") as tgt:
            row = _slot(tgt, name)
        if row is None:
            out.problems.append(f"the reverse slot {name!r} is gone from the new database")
        else:
            confirmed, restart, _pid, current, out.wal_status, _safe = row
            out.lag_bytes = max(0, lsn(current) - lsn(confirmed)) if confirmed else None
            out.retained_bytes = max(0, lsn(current) - lsn(restart)) if restart else None
    except StepError as exc:
        out.problems.append(str(exc))
    if st.backout_started_at:
        try:
            with connect(s.source(), "source", purpose="status") as src:
                sub = src.execute(q.SUBSCRIPTION_STATE, (name,)).fetchone()
            if sub is None:
                out.problems.append(f"no subscription {name!r} on the old database")
            else:
                out.applying = bool(sub[1]) and sub[3] is not None
                out.apply_errors = int(sub[4])
        except StepError as exc:
            out.problems.append(str(exc))
    return out


def status_step(s: StepSettings) -> None:
    """`db-upgrade step backout-status`: the status, in the log."""
    for line in status(s).lines():
        log(line)
