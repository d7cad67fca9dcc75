"""The pgcopydb-follow engine: pgcopydb 0.17 `clone --follow` copies the
source and streams its changes (test_decoding or wal2json) into the target.

Everything that works around pgcopydb's internals lives in this package and
nowhere else: follow.py (running pgcopydb, resume or restart, endpos loop,
lost replication connection), repair.py (what a killed run leaves in the work
dir), drain.py (heartbeat, gate and stop once the end position is set),
sentinel.py and catalog.py (pgcopydb's SQLite catalog, read-only).

Only the follow step mounts the work volume. The other methods work from the
databases alone: the end position is recorded in the run state (the follow
step's drain hands it to pgcopydb), and progress is the target's replication
origin, which pgcopydb advances in the same transaction as each change it
applies. pgcopydb 0.17's measured data limits (TOASTed columns, text, numerics
with wal2json) are in docs/engine-pgcopydb.md; verify names them.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import psycopg
from psycopg import sql

from steps import state
from steps.engines.base import Engine
from steps.errors import StepError
from steps.log import log
from steps.pg import connect, fmt_lsn, lsn, origin_progress, pretty_bytes

ACTIVE_WAIT = 30.0  # follow may still be shutting down after its endpos or a SIGTERM
HEARTBEAT_TABLE = ("db_upgrade", "heartbeat")  # drain.py's; the db_upgrade schema itself is steps/cleanup.py's
REACHED_RECHECK = 1.0  # seconds a confirmed run state is trusted by reached()
FOLLOW_PULSE_FRESH = 25.0  # steps/follow.py pulses every 10 s; under ACTIVE_WAIT, so a killed pod's expires
SILENT_AFTER = 45.0  # steps/follow.py records follow_alive_at every 10 s while the step runs


@contextmanager
def _one_line(what: str):
    """A database error as the step's one line (connection failures already are)."""
    try:
        yield
    except psycopg.Error as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise StepError(f"{what}: {first}") from None


class PgcopydbFollow(Engine):
    name = "pgcopydb-follow"
    apply_in_target = False  # pgcopydb's apply runs in the follow pod

    def __init__(self, s):
        super().__init__(s)
        self._state_ok: tuple[float, str] | None = None  # (monotonic time, end) reached() last confirmed

    # -- preflight -----------------------------------------------------------
    def preflight_checks(self, src, tgt, report) -> None:
        try:
            from steps.engines.pgcopydb_follow import preflight
        except ImportError:  # written by the preflight developer; absent in a partial tree
            return
        preflight.checks(self.s, src, tgt, report)

    # -- the follow step -----------------------------------------------------
    def follow(self) -> None:
        from steps.engines.pgcopydb_follow import follow

        follow.follow(self.s)

    # -- wait-caught-up, the cutover: databases only, no work volume ---------
    def lag(self) -> int | None:
        with _one_line("cannot read the lag"):
            return self._lag()

    def _lag(self) -> int | None:
        s = self.s
        with connect(s.source(), "source", purpose="lag") as src:
            if not state.load_from(src, s.run_id).copy_done_at:
                return None
            # Source first: a position read after the target's can only overstate the lag.
            source = lsn(src.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0])
        with connect(s.target(), "target", purpose="lag") as tgt:
            applied = origin_progress(tgt, s.slot_name)
        return None if applied == 0 else max(0, source - applied)

    def set_end(self, since: float | None = None) -> str:
        """The source's WAL *insert* position, taken after the freeze, not
        pgcopydb's `--current`: that is pg_current_wal_flush_lsn(), which lags
        behind transactions committed with synchronous_commit=off, whose rows
        would then be lost (measured: 12 to 32 rows in 3 of 7 runs under writes).
        Recorded in the run state; the follow step's drain gives it to pgcopydb."""
        with _one_line("finish: cannot set the end position on the source"):
            return self._set_end(since)

    def _set_end(self, since: float | None) -> str:
        s = self.s
        with connect(s.source(), "source", purpose="finish") as src:
            st = state.load_from(src, s.run_id)
            if st.end_position and (since is None or (st.end_position_set_at or 0) >= since):
                log(f"finish: end position already set to {st.end_position}; keeping it")
                return st.end_position
            end = fmt_lsn(lsn(src.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0]))
        if st.end_position:
            log(f"finish: the end position {st.end_position} was set before this freeze; replacing it")
        state.record(s, end_position=end, end_position_set_at=state.now())
        behind = ""
        try:
            with connect(s.target(), "target", purpose="finish") as tgt:
                applied = origin_progress(tgt, s.slot_name)
            if st.copy_done_at and applied:
                behind = f"; {pretty_bytes(max(0, lsn(end) - applied))} left to apply"
            elif not st.copy_done_at:
                behind = "; the initial copy is still running"
        except (StepError, psycopg.Error):
            pass
        log(f"finish: end position set to {end} (the source's WAL insert position){behind}; "
            "the follow step hands it to pgcopydb")
        return end

    def reached(self, end: str) -> bool:
        """The target's replication origin has durably passed `end`. pgcopydb applies
        transactions in source commit order and moves the origin to each one's commit
        LSN in the same target transaction, so every transaction committed before
        `end` is flushed on the target then. Only for this copy's end, once the copy
        is done: during the copy the origin already sits at the copy's snapshot."""
        with _one_line("cannot tell whether the target reached the end position"):
            return self._reached(end)

    def _reached(self, end: str) -> bool:
        s = self.s
        with connect(s.target(), "target", purpose="drain") as tgt:
            if origin_progress(tgt, s.slot_name, flush=True) < lsn(end):
                return False
        if self._state_ok and self._state_ok[1] == end and time.monotonic() - self._state_ok[0] < REACHED_RECHECK:
            return True
        st = state.load(s)
        if not st.copy_done_at or lsn(st.end_position) != lsn(end):
            return False  # a copy started over (repair.restart_copy drops the end), or another end
        self._state_ok = (time.monotonic(), end)
        return True

    def stream_problem(self) -> str | None:
        """From the run state: follow failed, went silent, or has already stopped
        at an end it cannot go past (pgcopydb exits there)."""
        try:
            st = state.load(self.s)
        except (StepError, psycopg.Error) as exc:
            return f"cannot read the run state on the source ({str(exc).strip().splitlines()[0]})"
        if not st.follow_started_at:
            return "the follow step has not started"
        if st.follow_failed_at and st.follow_failed_at >= max(st.follow_done_at or 0, st.follow_alive_at or 0):
            return f"the follow step failed ({st.follow_error or 'see its log'}); run it again (it resumes)"
        if st.follow_done_at:
            from steps.engines.pgcopydb_follow.follow import stale_end

            current = st.end_position and (st.end_position_set_at or 0) <= st.follow_done_at and not stale_end(st)
            if current and self.reached(st.end_position):
                return None  # it stopped at this very end: nothing left to drain
            return (f"pgcopydb has already stopped at an earlier end position ({st.end_position or 'since dropped'}) "
                    "and cannot go past it; run the follow step again to stream the changes since")
        if st.follow_alive_at and time.time() - st.follow_alive_at > SILENT_AFTER:
            return (f"the follow step has not been seen for {time.time() - st.follow_alive_at:.0f}s (its pod gone?); "
                    "run it again (it resumes)")
        return None

    def copy_progress(self) -> tuple[int, int] | None:
        """From pgcopydb's catalog where the work dir is mounted (the follow step),
        else what the follow step last recorded in the run state."""
        from steps.engines.pgcopydb_follow import catalog

        if self.s.dir is not None:
            p = catalog.copy_bytes(self.s.dir)
            if p is not None:
                return p
        st = state.try_load(self.s)
        if st is None or not st.copy_bytes_total:
            return None
        if st.copy_done_at:
            return st.copy_bytes_total, st.copy_bytes_total
        return min(st.copy_bytes_done or 0, st.copy_bytes_total), st.copy_bytes_total

    # -- cleanup -------------------------------------------------------------
    def cleanup(self) -> None:
        """By SQL only (the cleanup pod has no work volume): the slot, pgcopydb's
        schema on both sides, the target's replication origin, the heartbeat table.
        Idempotent. The db_upgrade schema, verify's tracking and the REPLICATION
        grant are steps/cleanup.py's."""
        s = self.s
        deadline = time.monotonic() + ACTIVE_WAIT
        try:
            with connect(s.source(), "source", purpose="cleanup") as src:
                src.execute("SET lock_timeout = '10s'")
                while True:
                    row = src.execute("SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s",
                                      (s.slot_name,)).fetchone()
                    # pgcopydb's receiver reconnects now and then: an idle slot alone does not
                    # mean follow has stopped; its pulse in the run state says so.
                    st = state.try_load(s)
                    running = st.follow_pulse_age(FOLLOW_PULSE_FRESH) if st else None
                    if row is None or (row[0] is None and running is None):
                        break
                    if time.monotonic() >= deadline:
                        holder = f"in use by pid {row[0]}" if row[0] is not None else \
                            f"in use: the follow step is still running (its pulse {running:.0f}s ago)"
                        raise StepError(f"cleanup: replication slot {s.slot_name!r} is still {holder} "
                                        f"on the source after {ACTIVE_WAIT:.0f}s: stop the follow step first, "
                                        "then run cleanup again")
                    time.sleep(0.5)
                if row is not None:
                    src.execute("SELECT pg_drop_replication_slot(%s)", (s.slot_name,))
                    log(f"cleanup: dropped replication slot {s.slot_name!r} on the source")
                _drop_schema_and_heartbeat(src)
            with connect(s.target(), "target", purpose="cleanup") as tgt:
                tgt.execute("SET lock_timeout = '10s'")
                while tgt.execute("SELECT 1 FROM pg_replication_origin WHERE roname = %s",
                                  (s.slot_name,)).fetchone():
                    try:
                        tgt.execute("SELECT pg_replication_origin_drop(%s)", (s.slot_name,))
                        log(f"cleanup: dropped replication origin {s.slot_name!r} on the target")
                    except psycopg.errors.ObjectInUse:  # pgcopydb's apply is still exiting
                        if time.monotonic() >= deadline:
                            raise StepError(f"cleanup: replication origin {s.slot_name!r} on the target is still in "
                                            "use by pgcopydb's apply: stop the follow step first, then run cleanup "
                                            "again") from None
                        time.sleep(0.5)
                _drop_schema_and_heartbeat(tgt)
        except psycopg.Error as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise StepError(f"cleanup: {first}; run cleanup again (it is idempotent)") from None
        log(f"cleanup: no replication slot {s.slot_name!r} on the source, no origin on the target, "
            "no pgcopydb schema or heartbeat table left")


def _drop_schema_and_heartbeat(conn: psycopg.Connection) -> None:
    conn.execute("DROP SCHEMA IF EXISTS pgcopydb CASCADE")
    conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(*HEARTBEAT_TABLE)))
