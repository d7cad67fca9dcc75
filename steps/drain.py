"""Getting pgcopydb 0.17's follow to stop within about a second of its endpos.

pgcopydb's stream receiver reads the endpos only on a fixed 10 s feedback timer
and then needs one more message from the source before it stops; on an idle
(frozen) source that can take from 10 s to minutes. Measured remedies, used by
the follow step once an endpos is set:

- an empty transaction (txid_current()) on the source every 200 ms keeps
  messages flowing, which bounds the wait at about 10 s;
- once the sentinel says replay_lsn >= endpos, everything up to the endpos is
  applied on the target, and the receiver ("follow prefetch") has nothing left
  to do: a SIGTERM to that one process lets follow finish normally, sequence
  reset included, in about a second.

Never before replay_lsn >= endpos, and never the whole process group: both were
measured to lose or duplicate changes. Lowering wal_sender_timeout or
terminating the walsender were measured unsafe too.
"""

import os
import signal
import threading
import time
from pathlib import Path

import psycopg

from steps import sentinel, state
from steps.log import log
from steps.pg import connect, lsn
from steps.settings import StepSettings

NUDGE_INTERVAL = 0.2


def prefetch_pids(pgid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) != pgid:
                continue
            title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ProcessLookupError):
            continue
        if "follow prefetch" in title:
            pids.append(int(entry.name))
    return pids


def endpos_requested(s: StepSettings, last_check: list[float]) -> int:
    """The endpos, from finish's record (cheap) or, every few seconds, the sentinel."""
    recorded = state.read(s.workdir()).get("endpos")
    if recorded:
        return lsn(recorded)
    if time.monotonic() - last_check[0] > 5:
        last_check[0] = time.monotonic()
        try:
            sen = sentinel.read(s, strict=False)
        except Exception:
            return 0
        return sen.endpos if sen else 0
    return 0


def drain(s: StepSettings, pgid: int, finished: threading.Event) -> None:
    """Runs beside pgcopydb in the follow step until pgcopydb exits."""
    last_check = [0.0]
    while not finished.wait(0.2):
        endpos = endpos_requested(s, last_check)
        if endpos:
            break
    else:
        return
    log("follow: endpos is set; nudging the source so that pgcopydb sees it promptly")
    signalled = False
    try:
        with connect(s.source(), "source") as conn:
            next_check = 0.0
            while not finished.wait(NUDGE_INTERVAL):
                conn.execute("SELECT txid_current()")  # an empty transaction: decoded, skipped, keeps messages flowing
                if signalled or time.monotonic() < next_check:
                    continue
                next_check = time.monotonic() + 0.3
                try:
                    replayed = sentinel.replay_lsn(s)
                except Exception:
                    continue
                if replayed >= endpos:
                    for pid in prefetch_pids(pgid):
                        try:
                            os.kill(pid, signal.SIGTERM)
                        except ProcessLookupError:
                            pass
                    signalled = True
                    log("follow: the target has applied everything up to the endpos; stopping pgcopydb's receiver")
    except (psycopg.Error, Exception) as exc:  # the nudge only speeds things up; follow is still correct without it
        log(f"follow: could not nudge the source ({type(exc).__name__}); waiting for pgcopydb on its own")
