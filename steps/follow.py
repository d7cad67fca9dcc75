"""follow: `pgcopydb clone --follow` in the work dir, until the endpos is reached.

- An interrupted run in the dir is resumed (`--resume --not-consistent`), never
  started over.
- SIGTERM/SIGINT are forwarded to pgcopydb's whole process group: its top-level
  wait loop may not act on a signal sent to one pid only.
- pgcopydb 0.16/0.17 can exit 0 on SIGTERM before the endpos, so success is
  decided here: the sentinel's replay_lsn must have reached its endpos.
"""

import json
import os
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


def _progress(s) -> tuple[int, int] | None:
    proc = pgcopydb.run(s, "list", "progress", "--dir", str(s.workdir()), "--json", check=False, timeout=30)
    try:
        data = json.loads(proc.stdout)
    except ValueError:
        return None
    done = data["tables"]["done"] + data["indexes"]["done"]
    total = data["tables"]["total"] + data["indexes"]["total"]
    return done, total


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
    # Our own record, not pgcopydb's files: other steps' pgcopydb calls (progress,
    # sentinel reads) create its catalogs in the dir before any copy has started.
    resume = bool(state.read(workdir).get("follow_started_at")) and sentinel.exists(workdir)
    if resume:
        from steps import repair

        repair.prepare_resume(s)
    s.source(), s.target()  # both required: fail with a clear line before starting anything
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

    def forward(signum, _frame):
        stopping.set()
        log(f"follow: got {signal.Signals(signum).name}, stopping pgcopydb (its process group)")
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    old = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    done = threading.Event()
    from steps.drain import drain

    for target in (_watch, lambda s, d: drain(s, proc.pid, d)):
        threading.Thread(target=target, args=(s, done), daemon=True).start()
    try:
        for line in proc.stdout:  # pgcopydb's own log, for the pod log
            sys.stderr.write(line)
            if "All step are now done" in line or "has enabled applying changes" in line:
                if not state.read(workdir).get("copy_done_at"):
                    state.update(workdir, copy_done_at=state.now())
        rc = proc.wait()
    finally:
        done.set()
        for sig, handler in old.items():
            signal.signal(sig, handler)
    sen = sentinel.read(s)
    if sen is not None and sen.endpos_reached:
        state.update(workdir, follow_done_at=state.now())
        log(f"follow: done, replay_lsn reached endpos (pgcopydb exit {rc}); target sequences were reset")
        return
    why = "stopped by a signal" if stopping.is_set() else f"pgcopydb exited {rc}"
    where = "no sentinel yet" if sen is None else (
        "no endpos set" if not sen.endpos else "replay_lsn below endpos")
    state.update(workdir, follow_failed_at=state.now(), follow_error=f"{why}, {where}")
    raise StepError(f"follow: {why} before the end position was reached ({where}); "
                    "run the follow step again on the same work dir to resume")


def _watch(s: StepSettings, done: threading.Event) -> None:
    """Argo progress (N/M tables and indexes copied) while the copy runs."""
    progress_file = os.environ.get("ARGO_PROGRESS_FILE")
    workdir = s.workdir()
    last = None
    while not done.wait(PROGRESS_INTERVAL):
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
