"""Getting pgcopydb 0.17's follow to stop within about a second of its endpos.

pgcopydb's stream receiver ("follow prefetch") reads the endpos only on a fixed
10 s feedback timer and then needs one more message from the source; its apply
process publishes replay_lsn in the sentinel at most every ~2 s, and only when
it applies a transaction or a keepalive. On a frozen source that adds up to
10 s or more of write downtime. What this module does, in the follow step's
process, beside pgcopydb:

0. The end position. The cutover pod (no work volume) records it in the run
   state (PgcopydbFollow.set_end); this thread, in the follow step, sees it
   there and gives it to pgcopydb (`stream sentinel set endpos --dir ...`).

1. Heartbeat. `prepare_source()` (called by follow before pgcopydb starts, so
   that the table is in pgcopydb's snapshot, catalogs and copy) creates
   `db_upgrade.heartbeat`, two rows. Once the copy is done (`copy_done_at`),
   two connections update them in overlapping transactions every 100 ms with
   synchronous_commit on (see Heartbeat: the first transaction to commit after
   any endpos began before it, which pgcopydb needs to finish cleanly). They
   are real transactions, decoded and applied on the target, so the target's
   replication origin keeps moving, on an idle source too: the lag read from
   the databases (PgcopydbFollow.lag) is true, and the origin moves past the
   endpos within a few hundred ms. Once the freeze is recorded (`frozen_at`)
   the pad column gets a changing ~70 kB value: pgcopydb's apply runs in libpq
   pipeline mode and syncs the pipeline about every 2 s; a statement larger
   than libpq's 64 kB output threshold makes libpq send the buffered
   statements (the previous heartbeat's COMMIT included) at once. verify
   ignores the db_upgrade schema; cleanup drops the table. Without the table in
   pgcopydb's catalog and on the target (a run started before this existed, or
   a role that may not create a schema), an empty transaction
   (txid_current()) every 100 ms is used instead: safe, about 10 s.

2. Gate. "Everything up to the endpos is durably applied on the target" is
   read from the target: `pg_replication_origin_progress(<origin>, true)`.
   pgcopydb applies transactions one at a time in source commit order and
   records each one's commit LSN (the end of its commit record) as the origin
   position in the same target transaction. A transaction committed on the
   source before the endpos (pg_current_wal_insert_lsn() after the freeze) has
   a commit LSN <= endpos; so once the flushed origin position is >= endpos,
   every such transaction is committed and flushed on the target. The
   sentinel's replay_lsn >= endpos is accepted too (the slower, older gate).

3. Stop. Then, and only then, SIGTERM goes to the one `follow prefetch`
   process. The receiver flushes, syncs the sentinel (learning the endpos) and,
   as it has received past the endpos, writes an ENDPOS message; transform and
   apply stop on it, apply publishes replay_lsn >= endpos, and follow finishes
   normally (sequence reset included).

Never before the gate, never the whole process group: both were measured to
lose or duplicate changes. Lowering wal_sender_timeout or terminating the
walsender were measured unsafe too.
"""

import os
import signal
import threading
import time
from pathlib import Path

import psycopg

from steps import pgcopydb, state
from steps.engines.pgcopydb_follow import catalog, sentinel
from steps.errors import StepError
from steps.log import log
from steps.pg import application_name, connect, fmt_lsn, lsn, origin_progress, read_write_options
from steps.settings import StepSettings

NUDGE_INTERVAL = 0.2
STATE_POLL = 0.1  # how soon the end position recorded by the cutover is seen
HEARTBEAT_CHECK = 2.0
HEARTBEAT_RETRY = 5.0
SCHEMA = "db_upgrade"
HEARTBEAT = "heartbeat"
# Above libpq's OUTBUFFER_THRESHOLD (64 kB): makes pgcopydb's pipelined apply
# send what it has buffered. Compressible (a repeated md5): little WAL.
PAD_REPEAT = 2200  # x 32 characters = 70,400 bytes
HEARTBEAT_DDL = f"""
CREATE SCHEMA IF NOT EXISTS {SCHEMA};
CREATE TABLE IF NOT EXISTS {SCHEMA}.{HEARTBEAT} (
    id int PRIMARY KEY CHECK (id IN (1, 2)),
    beat bigint NOT NULL DEFAULT 0,
    at timestamptz NOT NULL DEFAULT now(),
    pad text
);
INSERT INTO {SCHEMA}.{HEARTBEAT} (id) VALUES (1), (2) ON CONFLICT (id) DO NOTHING;
"""
BEAT = (f"UPDATE {SCHEMA}.{HEARTBEAT} SET beat = beat + 1, at = clock_timestamp(), "
        f"pad = repeat(md5((beat + 1)::text), %s) WHERE id = %s")
BEAT_INTERVAL = 0.1
SETTLE_PAUSE = 0.15


def prepare_source(s: StepSettings) -> bool:
    """Create the heartbeat table on the source. For the follow step, before it
    starts pgcopydb on a fresh run (on a resume the table is either already in
    the copy or must not appear now). Idempotent; False when it cannot."""
    try:
        with connect(s.source(), "source", purpose="heartbeat") as conn:
            with conn.transaction():
                conn.execute(HEARTBEAT_DDL)
        return True
    except psycopg.Error as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        log(f"follow: no heartbeat table on the source ({first}); the cutover will take about 10 s longer")
        return False


def heartbeat_ready(s: StepSettings) -> bool:
    """Is updating the heartbeat safe: pgcopydb knows the table (its catalog was
    built from the copy's snapshot) and the target has it with its rows."""
    if not catalog.knows_table(s.workdir(), SCHEMA, HEARTBEAT):
        return False
    try:
        with connect(s.target(), "target", purpose="heartbeat") as tgt:
            if not tgt.execute(f"SELECT to_regclass('{SCHEMA}.{HEARTBEAT}') IS NOT NULL").fetchone()[0]:
                return False
            return tgt.execute(f"SELECT count(*) FROM {SCHEMA}.{HEARTBEAT} WHERE id IN (1, 2)").fetchone()[0] == 2
    except (StepError, psycopg.Error):
        return False


def prefetch_pids(sid: int) -> list[int]:
    """pgcopydb's receiver: the `follow prefetch` process of the session (pgcopydb
    was started with start_new_session; under bwrap it may have its own group)."""
    pids = []
    for pid in pgcopydb.session_pids(sid):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "follow prefetch" in title:
            pids.append(pid)
    return pids


class RunStateReader:
    """The run's record, polled over one source connection kept open (a new
    connection every 100 ms would cost more than the query). A lost connection
    (the source restarting) is opened again on the next poll; meanwhile the last
    record read stands."""

    def __init__(self, s: StepSettings):
        self.s = s
        self.conn: psycopg.Connection | None = None
        self.last = state.RunState()
        self.failing_since: float | None = None

    def read(self) -> state.RunState:
        try:
            if self.conn is None or self.conn.closed:
                uri = self.s.source()
                self.conn = psycopg.connect(uri, autocommit=True, connect_timeout=10,
                                            application_name=application_name("drain"),
                                            options=read_write_options(uri))
            self.last = state.load_from(self.conn, self.s.run_id)
            if self.failing_since is not None:
                log("follow: the run state on the source can be read again")
            self.failing_since = None
        except psycopg.Error as exc:
            self.close()
            if self.failing_since is None:
                self.failing_since = time.monotonic()
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                log(f"follow: cannot read the run state on the source ({first}); retrying")
            time.sleep(1)
        return self.last

    def close(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            except psycopg.Error:
                pass
        self.conn = None


def apply_endpos(s: StepSettings, endpos: int, finished: threading.Event) -> bool:
    """Give the end position to pgcopydb, once its catalogs are set up (before
    that, a pgcopydb call on the dir breaks clone's setup: see sentinel.started)."""
    workdir = s.workdir()
    while not sentinel.started(workdir):
        if finished.wait(0.2):
            return False
    sen = sentinel.read(s, strict=False)
    if sen is not None and sen.endpos == endpos:
        return True
    try:
        pgcopydb.run(s, "stream", "sentinel", "set", "endpos", "--dir", str(workdir), fmt_lsn(endpos))
    except StepError as exc:
        log(f"follow: could not give the end position {fmt_lsn(endpos)} to pgcopydb ({exc}); retrying")
        return False
    if sen is not None and sen.endpos:
        log(f"follow: pgcopydb's endpos was {fmt_lsn(sen.endpos)}; set to the run's end position "
            f"{fmt_lsn(endpos)}")
    return True


class Heartbeat:
    """Overlapping heartbeat transactions on the source, from the end of the copy on.

    Two connections take turns: each opens a transaction, updates its own row,
    and only then does the other commit the transaction it opened one interval
    earlier. So at any instant a heartbeat transaction whose first change is
    already in the WAL is open, and whatever LSN finish takes as the endpos,
    the first transaction to commit after it began before it. That matters:
    pgcopydb's apply stops without applying a transaction whose BEGIN is at or
    after the endpos and then publishes the previous commit's LSN, below the
    endpos, as replay_lsn, and follow fails (measured: exit 12, "replay_lsn
    below endpos"). A transaction that straddles the endpos is applied, and its
    commit LSN (>= endpos) becomes replay_lsn and the origin position. The
    transactions last about one interval, so freeze's wait for transactions
    open since before the freeze is not held up."""

    def __init__(self, s: StepSettings):
        self.s = s
        self.pad = 0
        self.started = 0.0
        self.error: str | None = None
        self._stop = threading.Event()
        self._settle = threading.Event()
        self._settled = False
        self._thread = threading.Thread(target=self._run, daemon=True, name="heartbeat")

    def start(self) -> "Heartbeat":
        self.started = time.monotonic()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def settle(self) -> None:
        """The endpos is set: pad from now on, commit the open (straddling)
        transactions at once, then pause briefly. If pgcopydb's apply already
        knows the endpos it stops at the first commit past it and exits; a
        transaction decoded right behind it would reach its transform with
        nobody reading (broken pipe, exit 12). The pause gives the drain's gate
        time to stop the receiver first; otherwise the next, padded heartbeat
        is what pushes the straddling COMMIT through the apply's pipeline."""
        self.pad = PAD_REPEAT
        self._settle.set()

    def _run(self) -> None:
        conns = []
        try:
            for _ in (1, 2):
                uri = self.s.source()
                c = psycopg.connect(uri, autocommit=False, connect_timeout=10,
                                    application_name=application_name("heartbeat"),
                                    options=read_write_options(uri))
                c.execute("SET synchronous_commit = on")  # the walsender only sends flushed WAL
                c.commit()
                conns.append(c)
            turn, open_ = 0, []
            while not self._stop.is_set():
                if self._settle.is_set() and not self._settled:
                    # The endpos is known: commit the transactions open across it
                    # now, and leave the receiver a moment before the next one
                    # (see settle()).
                    self._settled = True
                    while open_:
                        open_.pop(0).commit()
                    self._stop.wait(SETTLE_PAUSE)
                    continue
                conn = conns[turn]
                conn.execute(BEAT, (self.pad, turn + 1))  # opens the transaction, writes its first change
                open_.append(conn)
                if len(open_) > 1:
                    open_.pop(0).commit()
                turn = 1 - turn
                self._stop.wait(BEAT_INTERVAL)
            for conn in open_:
                conn.commit()
        except Exception as exc:  # the nudge only speeds things up
            self.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        finally:
            for c in conns:
                try:
                    c.close()
                except Exception:
                    pass


def frozen(st: state.RunState) -> bool:
    """Are the application's writes frozen now (not given back since)?"""
    return bool(st.frozen_at and not (st.unfrozen_at and st.unfrozen_at >= st.frozen_at))


def drain(s: StepSettings, sid: int, finished: threading.Event) -> None:
    """Runs beside pgcopydb in the follow step until pgcopydb exits: starts the
    heartbeat once the copy is done, pads it from the freeze on, and once the
    end position is recorded gives it to pgcopydb and stops it there."""
    reader = RunStateReader(s)
    beat: Heartbeat | None = None
    next_beat_check = 0.0
    retrying = False
    try:
        while True:
            st = reader.read()
            endpos = lsn(st.end_position)  # the run state is the one source of the end (not pgcopydb's sentinel)
            if endpos:
                break
            if beat is not None and beat.error:
                if not retrying or time.monotonic() - beat.started >= 30:  # once per outage, not every retry
                    log(f"follow: the heartbeat stopped ({beat.error}); starting it again every "
                        f"{HEARTBEAT_RETRY:.0f}s until it runs")
                retrying = True
                beat.stop()
                beat = None
                next_beat_check = time.monotonic() + HEARTBEAT_RETRY
            if beat is not None:
                # Frozen: the endpos follows within a second (writes given back: not any more).
                beat.pad = PAD_REPEAT if frozen(st) else 0
            if beat is None and st.copy_done_at and time.monotonic() >= next_beat_check:
                next_beat_check = time.monotonic() + HEARTBEAT_CHECK
                if heartbeat_ready(s):
                    beat = Heartbeat(s).start()
                    if not retrying:
                        log(f"follow: db_upgrade.heartbeat is updated every {BEAT_INTERVAL * 1000:.0f} ms from now on, "
                            "so that the target's replication origin (what the lag is read from) keeps moving")
            if finished.wait(STATE_POLL):
                return
        reader.close()
        while not apply_endpos(s, endpos, finished):
            if finished.wait(1.0):
                return
        # No heartbeat yet (endpos set before the copy was done, e.g. an abort):
        # starting one now could put a heartbeat BEGIN right after the endpos (see
        # Heartbeat); empty transactions are safe, if slower.
        _drain_to(s, sid, endpos, finished, beat)
    finally:
        reader.close()
        if beat is not None:
            beat.stop()


def _drain_to(s: StepSettings, sid: int, endpos: int, finished: threading.Event, beat: "Heartbeat | None") -> None:
    if beat is not None:
        beat.settle()
    log(f"follow: end position {fmt_lsn(endpos)} given to pgcopydb; "
        + ("db_upgrade.heartbeat is being updated" if beat else "nudging the source with empty transactions")
        + " so that pgcopydb reaches it promptly")
    signalled = False
    tgt = None
    try:
        with connect(s.source(), "source", purpose="drain") as conn:
            try:
                tgt = psycopg.connect(s.target(), autocommit=True, connect_timeout=10,
                                      application_name=application_name("drain"))
            except psycopg.Error:
                tgt = None
            next_sentinel = 0.0
            copied = False
            while True:
                if beat is None or beat.error:
                    conn.execute("SELECT txid_current()")  # decoded, skipped, keeps messages flowing
                # During the copy the origin already sits at the copy's snapshot
                # position, which an early end position may be below.
                copied = copied or _copy_finished(s)
                if copied and not signalled:
                    reached, how = _gate(s, tgt, endpos, next_sentinel)
                    if how == "pgcopydb sentinel":
                        next_sentinel = time.monotonic() + 1.0
                    if reached:
                        for pid in prefetch_pids(sid):
                            try:
                                os.kill(pid, signal.SIGTERM)
                            except ProcessLookupError:
                                pass
                        signalled = True
                        log(f"follow: the target has durably applied everything up to the endpos ({how}); "
                            "stopping pgcopydb's receiver")
                if finished.wait(0.05 if not signalled else NUDGE_INTERVAL):
                    break
    except Exception as exc:  # the nudge only speeds things up; follow is still correct without it
        log(f"follow: could not nudge the source ({type(exc).__name__}); waiting for pgcopydb on its own")
    finally:
        if tgt is not None:
            tgt.close()


def _copy_finished(s: StepSettings) -> bool:
    sen = sentinel.read(s, strict=False)
    return sen is not None and sen.apply


def _gate(s: StepSettings, tgt, endpos: int, next_sentinel: float) -> tuple[bool, str]:
    if tgt is not None:
        try:
            if origin_progress(tgt, s.slot_name, flush=True) >= endpos:
                return True, "target replication origin"
        except psycopg.Error:
            pass
    if time.monotonic() >= next_sentinel:
        try:
            return sentinel.replay_lsn(s) >= endpos, "pgcopydb sentinel"
        except Exception:
            return False, "pgcopydb sentinel"
    return False, ""
