"""follow: `pgcopydb clone --follow` in the work dir, until the end position is reached.

- An interrupted run in the dir is repaired and resumed (`--resume
  --not-consistent`) when its initial copy had finished; one interrupted during
  the initial copy is started over, loudly (repair.py says why).
- SIGTERM/SIGINT are forwarded to pgcopydb's whole process group: its top-level
  wait loop may not act on a signal sent to one pid only.
- The end position comes from the run state (the cutover's set_end records it);
  the drain thread (drain.py) gives it to pgcopydb and stops it there.
- pgcopydb 0.16/0.17 can exit 0 on SIGTERM before the endpos, so success is
  decided here: the sentinel's replay_lsn must have reached the end position.

What the step records for the others (steps/state.py RunState):
follow_started_at, copy_done_at (= stream_started_at), copy_bytes_done/total,
copy_restarts, follow_done_at, follow_failed_at and follow_error.
"""

import errno
import re
import signal
import threading

import psycopg

from steps import pgcopydb, state
from steps.engines.pgcopydb_follow import catalog, repair, sentinel
from steps.errors import StepError
from steps.log import log
from steps.pg import connect, fmt_lsn, lsn, origin_progress
from steps.settings import StepSettings

ENGINE = "pgcopydb-follow"
PROGRESS_INTERVAL = 10.0
RECONNECT_RESUMES = 3
RECONNECTING = "Streaming got interrupted at"  # pgcopydb's receiver, before it reconnects
COPY_DONE = ("All step are now done", "has enabled applying changes")  # pgcopydb's log once the copy is done


class EndposLoop:
    """Spots pgcopydb 0.17 looping after its apply reached the endpos.

    The apply stops on a message at or past the endpos ("Replay reached end
    position E at R": every change before E is applied) but leaves the
    sentinel's replay_lsn at R, the last commit before E. The follow supervisor
    then sees replay_lsn < endpos and restarts prefetch/transform/catchup, which
    stop at once, forever (measured on an abort: finish without freeze, under
    writes). Two such restarts after the apply's statement = stuck.

    A second form, with no such statement: the receiver stops because the
    source reported a position at or past the endpos ("Streamed up to write_lsn
    W, flush_lsn W, stopping: endpos is E") while the last transaction before E
    ended at W, and the apply has replayed up to W. Nothing else exists before
    E, yet replay_lsn stays at W < E (measured in CI). Three restarts with
    replay_lsn == W = stuck."""

    REACHED = re.compile(r"Replay reached end position (\S+) at (\S+)")
    CURRENT = re.compile(r"Current sentinel replay_lsn is (\S+), endpos is (\S+)")
    STREAMED = re.compile(r"Streamed up to write_lsn (\S+), flush_lsn (\S+), stopping: endpos is (\S+)")

    def __init__(self) -> None:
        self.endpos_text = self.at_text = ""
        self.reached_endpos = False  # the apply said "Replay reached end position" (the first form)
        self.restarts = 0
        self.stuck = False
        self.streamed: tuple[int, int, str] | None = None  # (write = flush, endpos, endpos text)
        self.streamed_restarts = 0

    def feed(self, line: str) -> bool:
        """True once, when the loop is recognised."""
        from steps.pg import lsn

        m = self.REACHED.search(line)
        if m:
            self.endpos_text, self.at_text = m.group(1), m.group(2)
            self.reached_endpos = True
            return False
        m = self.STREAMED.search(line)
        if m:
            write, flush, endpos = lsn(m.group(1)), lsn(m.group(2)), lsn(m.group(3))
            self.streamed = (write, endpos, m.group(3)) if endpos and write == flush and write < endpos else None
            return False
        m = self.CURRENT.search(line)
        if m and not self.endpos_text and self.streamed and not self.stuck:
            replay, endpos = lsn(m.group(1)), lsn(m.group(2))
            if (replay, endpos) == self.streamed[:2]:
                self.streamed_restarts += 1
                if self.streamed_restarts >= 3:
                    self.endpos_text, self.at_text = self.streamed[2], m.group(1)
                    self.stuck = True
                    return True
            else:
                self.streamed_restarts = 0
            return False
        if m and self.endpos_text and not self.stuck:
            replay, endpos = lsn(m.group(1)), lsn(m.group(2))
            if endpos == lsn(self.endpos_text) and replay < endpos:
                self.restarts += 1
                if self.restarts >= 2:
                    self.stuck = True
                    return True
            else:
                self.restarts = 0
        return False


def command_line(s: StepSettings, resume: bool) -> list[str]:
    args = [
        "clone", "--follow",
        "--dir", str(s.workdir()),
        "--plugin", s.plugin,
        "--slot-name", s.slot_name,
        "--origin", s.slot_name,
        "--table-jobs", str(s.table_jobs),
        "--index-jobs", str(s.index_jobs),
    ]
    if resume:
        # A new snapshot is the only way to resume; rows of tables whose COPY was
        # interrupted are copied again and the slot replays everything after it.
        args += ["--resume", "--not-consistent"]
    return pgcopydb.locate(s.workdir()).argv(*args)


def follow(s: StepSettings) -> None:
    workdir = s.workdir()
    try:
        _follow(s, workdir)
    except OSError as exc:  # the work volume: full, read-only, gone
        error = StepError(f"follow: cannot write to the work dir {workdir}: {exc.strerror}"
                          + (" (enlarge the volume, then run the follow step again: it resumes)"
                             if exc.errno == errno.ENOSPC else ""))
        _record_failure(s, str(error))
        raise error from None
    except StepError as exc:
        # Recorded for wait-caught-up, which polls beside follow and stops on it.
        _record_failure(s, str(exc))
        raise


def _record_failure(s: StepSettings, error: str) -> None:
    try:
        if not state.load(s).follow_failed_at:
            state.record(s, follow_failed_at=state.now(), follow_error=error)
    except (StepError, psycopg.Error):
        pass  # the source is unreachable: the error line still says it all


def _follow(s: StepSettings, workdir) -> None:
    if "'" in str(workdir):
        # pgcopydb 0.17 splices the path into SQLite SQL (catalog.c: "attach '%s' as %s").
        raise StepError(f"DB_UPGRADE_DIR={workdir} contains a single quote, which pgcopydb 0.17 cannot handle "
                        "(it breaks its SQLite catalog statements): use a path without quotes")
    # Both required and reachable: fail with one clear line before changing anything.
    for role, uri in (("source", s.source()), ("target", s.target())):
        with connect(uri, role):
            pass
    # The run's record, not pgcopydb's files, says whether this run started a
    # copy: an earlier run is repaired and resumed, or (copy unfinished) reset
    # and started over; see repair.py.
    st = state.load(s)
    if st.follow_started_at and st.engine and st.engine != ENGINE:
        raise StepError(f"follow: this run's copy was made by the {st.engine} engine, not {ENGINE}: set "
                        f"DB_UPGRADE_ENGINE={st.engine}, or clean up and start a new run")
    if stale_end(st):
        # A cutover froze, drained to this end, then gave the writes back (verify
        # failed, or it was stopped): the application wrote on since, so this
        # end must not stop pgcopydb; the next cutover sets a new one.
        log(f"follow: the end position {st.end_position} is stale: the application's writes were restored "
            "after it; streaming on until the cutover sets a new one")
        state.record(s, end_position=None, end_position_set_at=None, follow_done_at=None)
        st = state.load(s)
    if st.follow_done_at and not st.follow_failed_at and (st.end_position_set_at or 0) <= st.follow_done_at:
        sen = sentinel.read(s, strict=False)
        if sen is not None and sen.endpos_reached and sen.endpos >= lsn(st.end_position):
            log(f"follow: already done in {workdir} (replay_lsn reached the end position); nothing to do")
            return
    resume = False
    if st.follow_started_at:
        resume = repair.prepare_resume(s)
    else:
        if st.end_position:
            raise StepError(f"follow: the end position {st.end_position} was recorded (finish or the cutover ran) "
                            "before follow ever started: there is nothing to follow up to; clean up and start a "
                            "new run")
        if pgcopydb.catalog_path(workdir).exists():
            from steps.target import empty_dir

            n = empty_dir(workdir)
            log(f"follow: {workdir} holds pgcopydb files from another run (this run never started follow); "
                f"removed them ({n} entries) for a fresh copy")
    for attempt in range(RECONNECT_RESUMES + 1):
        if not resume:
            from steps.engines.pgcopydb_follow import drain

            drain.prepare_source(s)  # the heartbeat table, before the snapshot
        outcome = _run_pgcopydb(s, workdir, resume)
        if outcome != "reconnect":
            return
        if attempt == RECONNECT_RESUMES:
            break
        log("follow: resuming after the lost replication connection (repair, then pgcopydb --resume)")
        resume = repair.prepare_resume(s)
    error = (f"follow: pgcopydb lost its replication connection {RECONNECT_RESUMES + 1} times; check the source "
             "(wal_sender_timeout, restarts, network), then run the follow step again (it resumes)")
    _record_failure(s, error)
    raise StepError(error)


def stale_end(st: state.RunState) -> bool:
    """Were the application's writes restored after the end position was set?"""
    return bool(st.end_position and st.unfrozen_at and st.unfrozen_at > (st.end_position_set_at or 0))


def sync_endpos(s: StepSettings, end: str | None) -> None:
    """Before a resume: pgcopydb's endpos is the run's end, or none (0/0). The
    sentinel keeps the endpos of the run that stopped; a resumed pgcopydb
    would stop there at once (a stale or dropped end)."""
    sen = sentinel.read(s, strict=False)
    want = lsn(end)
    if sen is None or sen.endpos == want:
        return
    pgcopydb.run(s, "stream", "sentinel", "set", "endpos", "--dir", str(s.workdir()), fmt_lsn(want))
    log(f"follow: pgcopydb's endpos {fmt_lsn(sen.endpos)} set to "
        + (f"the run's end position {end}" if want else "none (the run has no end position now)"))


def _run_pgcopydb(s: StepSettings, workdir, resume: bool) -> str:
    """One pgcopydb run. Returns "done", or "reconnect" when pgcopydb was
    stopped because its receiver lost the replication connection."""
    env = pgcopydb.environment(s)
    argv = command_line(s, resume)
    log(f"follow: {'resuming the interrupted run' if resume else 'starting the copy'} in {workdir} "
        f"(plugin {s.plugin}, {s.table_jobs} table jobs, {s.index_jobs} index jobs)")
    if resume:
        state.record(s, follow_failed_at=None, follow_error=None)
        st = state.load(s)
        sync_endpos(s, st.end_position)
        copy_done = bool(st.copy_done_at)
    else:
        state.record(s, engine=ENGINE, follow_started_at=state.now(), copy_done_at=None, stream_started_at=None,
                     copy_bytes_done=None, copy_bytes_total=None, follow_done_at=None, follow_failed_at=None,
                     follow_error=None)
        copy_done = False
    repair.mark_running(workdir)
    run = pgcopydb.Session(argv, env, "follow").__enter__()
    proc, stopping = run.proc, run.stopping
    reconnect = threading.Event()
    done = threading.Event()
    copied = threading.Event()
    if copy_done:
        copied.set()
    from steps.engines.pgcopydb_follow.drain import drain

    threading.Thread(target=_watch, args=(s, done, copied), daemon=True, name="copy-progress").start()
    threading.Thread(target=drain, args=(s, proc.pid, done), daemon=True, name="drain").start()
    loop = EndposLoop()
    try:
        for line in run.lines():
            if RECONNECTING in line and not stopping.is_set() and not reconnect.is_set():
                # pgcopydb 0.17 would reconnect in-process and stream again from the
                # slot's confirmed position into a live apply that has passed it:
                # the same transactions applied twice (measured: "duplicate key"
                # after a walsender timeout while the apply was behind). A resume
                # starts the apply at the target's origin instead.
                reconnect.set()
                log("follow: pgcopydb lost its replication connection and would reconnect in-process, "
                    "which re-applies changes (pgcopydb 0.17); stopping it to resume cleanly")
                pgcopydb.signal_session(proc.pid, signal.SIGTERM)
            if loop.feed(line):
                log(f"follow: pgcopydb has applied everything before the endpos {loop.endpos_text} "
                    f"(up to {loop.at_text}, the last change before it) but "
                    "its sentinel keeps replay_lsn below the endpos, so pgcopydb restarts its follow loop "
                    "forever (pgcopydb 0.17 bug); stopping it")
                pgcopydb.signal_session(proc.pid, signal.SIGTERM)
            if not copied.is_set() and any(text in line for text in COPY_DONE):
                copied.set()
                at = state.now()
                state.record(s, copy_done_at=at, stream_started_at=at)
                log("follow: the initial copy is done; pgcopydb applies the changes made since")
    finally:
        run.__exit__(None, None, None)
        done.set()
        outlived = repair.end_outliving_apply(s)
        if outlived:
            log(f"follow: pgcopydb's apply on the target outlived pgcopydb: {outlived}")
        repair.mark_exited(workdir)
    rc, last_error, disk_full = run.rc, run.first_error, run.disk_full
    sen = sentinel.read(s)
    if loop.stuck or (loop.reached_endpos and sen is not None and not sen.endpos_reached
                      and lsn(loop.endpos_text) == sen.endpos):
        # Stuck, or pgcopydb exited right after its apply said so (measured on an
        # abort under writes: transform's "Broken pipe" once the apply had
        # stopped, exit 12): either way the apply reached the endpos.
        repair.mark_endpos_replayed(workdir, loop.endpos_text)
        log(f"follow: pgcopydb's apply reached the endpos {loop.endpos_text} (the last change before it at "
            f"{loop.at_text}); recorded replay_lsn = endpos in pgcopydb's sentinel")
        sen = sentinel.read(s)
    if sen is not None and sen.endpos_reached and sen.endpos >= lsn(state.load(s).end_position):
        if rc != 0:
            # pgcopydb resets the target's sequences only on its success path; a
            # sub-process failing on the way out (e.g. "Broken pipe" in transform
            # once the receiver stopped) skips it: measured, sequences left behind.
            log(f"follow: replay_lsn reached endpos but pgcopydb exited {rc}; resetting the target's sequences")
            reset_sequences(s)
        _done(s, sen)
        log(f"follow: done, replay_lsn reached the end position {fmt_lsn(sen.endpos)} (pgcopydb exit {rc}); "
            "target sequences were reset")
        return "done"
    if reconnect.is_set() and not stopping.is_set() and not disk_full:
        return "reconnect"
    why = "stopped by a signal" if stopping.is_set() else f"pgcopydb exited {rc}"
    if disk_full:
        why += (f" because the work volume {workdir} is full (No space left on device): enlarge it, then run "
                "the follow step again (it resumes)")
    elif last_error and not stopping.is_set():
        why += f" (its first error: {last_error})"
    where = "no sentinel yet" if sen is None else (
        "no endpos set" if not sen.endpos else
        f"pgcopydb stopped at {fmt_lsn(sen.endpos)}, an end position replaced since" if sen.endpos_reached else
        "replay_lsn below endpos")
    _record_failure(s, f"{why}, {where}")
    raise StepError(f"follow: {why} before the end position was reached ({where}); "
                    "run the follow step again on the same work dir to resume")


def _done(s: StepSettings, sen: "sentinel.Sentinel") -> None:
    """What the run records once pgcopydb replayed up to the end position."""
    end = lsn(state.load(s).end_position)
    if end and sen.endpos >= end:
        # pgcopydb's sentinel says every change before the end is applied, but its
        # apply may have stopped before moving the target's replication origin up
        # to it (no transaction between the last change and the end: an idle source
        # without the heartbeat, or the endpos loop). The origin is what the
        # cutover reads (PgcopydbFollow.reached), from the databases only.
        with connect(s.target(), "target", purpose="follow") as tgt:
            applied = origin_progress(tgt, s.slot_name, flush=True)
            if applied < end:
                tgt.execute("SELECT pg_replication_origin_advance(%s, %s::pg_lsn)", (s.slot_name, fmt_lsn(end)))
                log(f"follow: moved the target's replication origin from {fmt_lsn(applied)} to the end position "
                    f"{fmt_lsn(end)}, which pgcopydb's sentinel says is replayed")
    state.record(s, follow_done_at=state.now())


def reset_sequences(s: StepSettings) -> None:
    """What clone --follow does after its endpos: `copy sequences --resume --not-consistent`."""
    workdir = s.workdir()
    reset = pgcopydb.run(s, "copy", "sequences", "--dir", str(workdir), "--resume", "--not-consistent",
                         check=False, timeout=600)
    if reset.returncode != 0:
        error = pgcopydb.last_error(reset.stderr)
        _record_failure(s, f"sequence reset failed: {error}")
        raise StepError(f"follow: every change up to the endpos is applied, but resetting the target's "
                        f"sequences failed: {error}; run the follow step again to retry")
    log("follow: target sequences reset to the source's values")


def _watch(s: StepSettings, done: threading.Event, copied: threading.Event) -> None:
    """The copy's progress in bytes, recorded in the run state while the copy runs:
    wait-caught-up reads it there (PgcopydbFollow.copy_progress), without the
    volume. The Argo progress field and log line are steps/follow.py's."""
    workdir = s.workdir()
    last = None
    while not done.wait(PROGRESS_INTERVAL if last else 1.0) and not copied.is_set():
        if not sentinel.started(workdir):  # never race clone's catalog setup (see sentinel.started)
            continue
        try:
            p = catalog.copy_bytes(workdir)
            if p is None or p == last:
                continue
            state.record(s, copy_bytes_done=p[0], copy_bytes_total=p[1])
            last = p
        except Exception:  # progress is for watching; never let it break the copy
            continue
