"""follow: `pgcopydb clone --follow` in the work dir, until the endpos is reached.

- An interrupted run in the dir is repaired and resumed (`--resume
  --not-consistent`) when its initial copy had finished; one interrupted during
  the initial copy is started over, loudly (steps/repair.py says why).
- SIGTERM/SIGINT are forwarded to pgcopydb's whole process group: its top-level
  wait loop may not act on a signal sent to one pid only.
- pgcopydb 0.16/0.17 can exit 0 on SIGTERM before the endpos, so success is
  decided here: the sentinel's replay_lsn must have reached its endpos.
"""

import errno
import os
import re
import signal
import subprocess
import sys
import threading
import time

from steps import pgcopydb, sentinel, state
from steps.errors import StepError
from steps.log import log
from steps.settings import StepSettings

PROGRESS_INTERVAL = 10.0
RECONNECT_RESUMES = 3
RECONNECTING = "Streaming got interrupted at"  # pgcopydb's receiver, before it reconnects


def _progress(s) -> tuple[int, int] | None:
    """(tables and indexes done, total), read from pgcopydb's catalog read-only.
    Not `pgcopydb list progress`: a process that opens the catalog for writing
    while the copy's workers record their work in it."""
    import sqlite3

    try:
        conn = pgcopydb.read_catalog(s.workdir())
        try:
            done = conn.execute(
                "SELECT (SELECT count(DISTINCT tableoid) FROM summary WHERE tableoid IS NOT NULL AND indexoid IS NULL "
                "        AND conoid IS NULL AND done_time_epoch IS NOT NULL)"
                "     + (SELECT count(DISTINCT indexoid) FROM summary WHERE indexoid IS NOT NULL "
                "        AND done_time_epoch IS NOT NULL)").fetchone()[0]
            total = conn.execute("SELECT (SELECT count(*) FROM s_table) + (SELECT count(*) FROM s_index)").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error:
        return None
    return done, total


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


def signal_session(sid: int, signum: int) -> None:
    """Signal every process group in pgcopydb's session. pgcopydb was started
    with start_new_session, so its session id is its pid; its process group may
    differ (under bwrap, pgcopydb runs in a group of its own inside the session)."""
    groups = {sid}
    for pid in pgcopydb.session_pids(sid):
        try:
            groups.add(os.getpgid(pid))
        except ProcessLookupError:
            continue
    for pgid in groups:
        try:
            os.killpg(pgid, signum)
        except (ProcessLookupError, PermissionError):
            pass


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
        _record_failure(workdir, str(error))
        raise error from None
    except StepError as exc:
        # Recorded for wait-caught-up, which polls beside follow and stops on it.
        _record_failure(workdir, str(exc))
        raise


def _record_failure(workdir, error: str) -> None:
    try:
        if not state.read(workdir).get("follow_failed_at"):
            state.update(workdir, follow_failed_at=state.now(), follow_error=error)
    except (OSError, ValueError):
        pass  # e.g. no space left for the state file: the error line still says it all


def _follow(s: StepSettings, workdir) -> None:
    if "'" in str(workdir):
        # pgcopydb 0.17 splices the path into SQLite SQL (catalog.c: "attach '%s' as %s").
        raise StepError(f"DB_UPGRADE_DIR={workdir} contains a single quote, which pgcopydb 0.17 cannot handle "
                        "(it breaks its SQLite catalog statements): use a path without quotes")
    # Both required and reachable: fail with one clear line before changing anything.
    from steps.pg import connect

    for role, uri in (("source", s.source()), ("target", s.target())):
        with connect(uri, role):
            pass
    # Our own record, not pgcopydb's files: other steps' pgcopydb calls (progress,
    # sentinel reads) create its catalogs in the dir before any copy has started.
    # An earlier run is repaired and resumed, or (copy unfinished) reset and
    # started over: see steps/repair.py.
    resume = False
    record = state.read(workdir)
    if record.get("follow_done_at") and not record.get("follow_failed_at"):
        sen = sentinel.read(s, strict=False)
        if sen is not None and sen.endpos_reached:
            log(f"follow: already done in {workdir} (replay_lsn reached endpos); nothing to do")
            return
    if record.get("follow_started_at"):
        from steps import repair

        resume = repair.prepare_resume(s)
    if not resume:
        from steps import drain

        prepare = getattr(drain, "prepare_source", None)  # the heartbeat table, before the snapshot
        if prepare is not None:
            prepare(s)
    for attempt in range(RECONNECT_RESUMES + 1):
        outcome = _run_pgcopydb(s, workdir, resume)
        if outcome != "reconnect":
            return
        if attempt == RECONNECT_RESUMES:
            break
        from steps import repair

        log("follow: resuming after the lost replication connection (repair, then pgcopydb --resume)")
        resume = repair.prepare_resume(s)
    error = (f"follow: pgcopydb lost its replication connection {RECONNECT_RESUMES + 1} times; check the source "
             "(wal_sender_timeout, restarts, network), then run the follow step again (it resumes)")
    _record_failure(workdir, error)
    raise StepError(error)


def _run_pgcopydb(s: StepSettings, workdir, resume: bool) -> str:
    """One pgcopydb run. Returns "done", or "reconnect" when pgcopydb was
    stopped because its receiver lost the replication connection."""
    env = pgcopydb.environment(s)
    argv = command_line(s, resume)
    log(f"follow: {'resuming the interrupted run' if resume else 'starting the copy'} in {workdir} "
        f"(plugin {s.plugin}, {s.table_jobs} table jobs, {s.index_jobs} index jobs)")
    started = state.now()
    if resume:
        state.update(workdir, follow_failed_at=None, follow_error=None)
    else:
        state.update(workdir, follow_started_at=started, copy_done_at=None, follow_done_at=None,
                     follow_failed_at=None, follow_error=None)
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    stopping = threading.Event()
    reconnect = threading.Event()

    def forward(signum, _frame):
        stopping.set()
        log(f"follow: got {signal.Signals(signum).name}, stopping pgcopydb (every process group of its session)")
        signal_session(proc.pid, signal.SIGTERM)

    old = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    done = threading.Event()
    from steps.drain import drain

    for target in (_watch, lambda s, d: drain(s, proc.pid, d)):
        threading.Thread(target=target, args=(s, done), daemon=True).start()
    last_error = None
    disk_full = False
    loop = EndposLoop()
    try:
        for line in proc.stdout:  # pgcopydb's own log, for the pod log
            sys.stderr.write(line)
            if (" ERROR " in line or " FATAL " in line) and last_error is None:
                last_error = pgcopydb.last_error(line)  # the first one: the cause, not the cascade
            if "No space left on device" in line or "database or disk is full" in line:  # the latter: SQLite
                disk_full = True
            if RECONNECTING in line and not stopping.is_set() and not reconnect.is_set():
                # pgcopydb 0.17 would reconnect in-process and stream again from the
                # slot's confirmed position into a live apply that has passed it:
                # the same transactions applied twice (measured: "duplicate key"
                # after a walsender timeout while the apply was behind). A resume
                # starts the apply at the target's origin instead.
                reconnect.set()
                log("follow: pgcopydb lost its replication connection and would reconnect in-process, "
                    "which re-applies changes (pgcopydb 0.17); stopping it to resume cleanly")
                signal_session(proc.pid, signal.SIGTERM)
            if loop.feed(line):
                log(f"follow: pgcopydb has applied everything before the endpos {loop.endpos_text} "
                    f"(up to {loop.at_text}, the last change before it) but "
                    "its sentinel keeps replay_lsn below the endpos, so pgcopydb restarts its follow loop "
                    "forever (pgcopydb 0.17 bug); stopping it")
                signal_session(proc.pid, signal.SIGTERM)
            if "All step are now done" in line or "has enabled applying changes" in line:
                if not state.read(workdir).get("copy_done_at"):
                    state.update(workdir, copy_done_at=state.now())
        rc = proc.wait()
    finally:
        done.set()
        for sig, handler in old.items():
            signal.signal(sig, handler)
    if loop.stuck:
        from steps import repair

        repair.mark_endpos_replayed(workdir, loop.endpos_text)
        log(f"follow: recorded replay_lsn = endpos {loop.endpos_text} in pgcopydb's sentinel")
    sen = sentinel.read(s)
    if sen is not None and sen.endpos_reached:
        if rc != 0:
            # pgcopydb resets the target's sequences only on its success path; a
            # sub-process failing on the way out (e.g. "Broken pipe" in transform
            # once the receiver stopped) skips it: measured, sequences left behind.
            log(f"follow: replay_lsn reached endpos but pgcopydb exited {rc}; resetting the target's sequences")
            reset_sequences(s)
        state.update(workdir, follow_done_at=state.now())
        log(f"follow: done, replay_lsn reached endpos (pgcopydb exit {rc}); target sequences were reset")
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
        "no endpos set" if not sen.endpos else "replay_lsn below endpos")
    _record_failure(workdir, f"{why}, {where}")
    raise StepError(f"follow: {why} before the end position was reached ({where}); "
                    "run the follow step again on the same work dir to resume")


def reset_sequences(s: StepSettings) -> None:
    """What clone --follow does after its endpos: `copy sequences --resume --not-consistent`."""
    workdir = s.workdir()
    reset = pgcopydb.run(s, "copy", "sequences", "--dir", str(workdir), "--resume", "--not-consistent",
                         check=False, timeout=600)
    if reset.returncode != 0:
        error = pgcopydb.last_error(reset.stderr)
        state.update(workdir, follow_failed_at=state.now(), follow_error=f"sequence reset failed: {error}")
        raise StepError(f"follow: every change up to the endpos is applied, but resetting the target's "
                        f"sequences failed: {error}; run the follow step again to retry")
    log("follow: target sequences reset to the source's values")


def _watch(s: StepSettings, done: threading.Event) -> None:
    """Argo progress (N/M tables and indexes copied) while the copy runs."""
    progress_file = os.environ.get("ARGO_PROGRESS_FILE")
    workdir = s.workdir()
    last = None
    while not done.wait(PROGRESS_INTERVAL):
        if not sentinel.started(workdir):  # never race clone's catalog setup (see sentinel.started)
            continue
        try:
            p = _progress(s)
        except Exception:  # progress is cosmetic; never let it break the copy
            continue
        if p is None or p == last or p[1] == 0:
            continue
        last = p
        if progress_file:
            with open(progress_file, "w") as f:
                f.write(f"{p[0]}/{p[1]}\n")
        if p[0] >= p[1]:
            if progress_file is None:
                break
