"""Making an interrupted pgcopydb run resumable, or starting its copy over.

Measured with pgcopydb 0.17: after the whole process tree is SIGKILLed,
`clone --follow --resume --not-consistent` on the same dir fails on what the
kill left behind:

- a torn last line in the CDC JSON file being written ("Failed to parse JSON
  message");
- work items (tables, indexes, constraints) still marked in the SQLite catalog
  as owned by a pid of the dead run: pgcopydb checks them with kill(pid, 0), and
  in a new pod (new pid namespace) or after pid reuse that pid is alive again
  ("already being processed by pid N");
- a `vacuum_summary` row for a VACUUM that never finished (a plain INSERT on
  resume hits its unique(tableoid) constraint);
- pgcopydb.pid naming a pid that may be alive again.

Which choice is safe depends on whether the initial copy had finished, which
pgcopydb records itself: the sentinel's `apply` flag is set only once every
table, index, constraint and the post-data section are done.

- Copy finished (apply on), and pgcopydb was seen to stop (see died_unseen): changes
  are applied through a replication origin that advances in the same
  transaction as each applied change, so a resume can be exact, unless the
  source was told of changes the volume never got (confirmed_beyond_volume) or
  a rolled-back transaction moved the origin (origin_advanced_by_abort), and
  once the dir is repaired (each measured to lose, duplicate or fail
  without it; see each function): pidfiles removed, a torn last JSON line cut,
  a `.partial` JSON promoted over its older `.json` (or dropped if it is a cut
  short copy of it), an unfinished last transaction cut, the SQL files from the
  apply's resume position on rewritten from the JSON, the dead run's catalog
  entries removed. docs/engine-pgcopydb.md has the operator's view.
- Otherwise the copy starts over, as below.
- Copy not finished: resuming would copy the unfinished tables with a *new*
  snapshot (`--not-consistent`) while the slot replays every change since the
  *first* snapshot on top of them. pgcopydb applies INSERTs without ON CONFLICT,
  so a table with a primary key stops the apply with a duplicate key, and a
  table without one (REPLICA IDENTITY FULL) silently gets duplicate rows. The
  only safe choice is a clean restart: the slot, the origin and the pgcopydb
  schemas are dropped, the objects the copy created on the target are dropped
  (after checking the target holds nothing that is not on the source:
  steps/target.py), the work dir is emptied, and the copy starts over, loudly
  logged and recorded in the run state (`copy_restarts`).
"""

import os
import re
import sqlite3
import time
from pathlib import Path

import psycopg
from psycopg import sql

from steps import pgcopydb, state, target
from steps.errors import StepError
from steps.log import log
from steps.pg import connect, fmt_lsn, lsn, origin_progress
from steps.settings import StepSettings

SLOT_RELEASE_WAIT = 90.0  # wal_sender_timeout (60 s by default) ends a walsender whose client vanished


RUNNING_MARK = "db-upgrade.pgcopydb-running"


def mark_running(workdir: Path) -> None:
    """Before pgcopydb starts: the mark stays if it is never seen to exit."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / RUNNING_MARK).touch()


def mark_exited(workdir: Path) -> None:
    (workdir / RUNNING_MARK).unlink(missing_ok=True)  # an unlink needs no space on a full volume


OUTLIVED_GRACE = 0.5  # an idle backend ends within milliseconds of its client
OUTLIVED_WAIT = 10.0


def end_outliving_apply(s: StepSettings) -> str | None:
    """After pgcopydb exited: wait for its apply's target sessions to end (ending
    them after OUTLIVED_WAIT), so that nothing of the dead run still applies
    while this step repairs and resumes. What was seen, or None.

    pgcopydb 0.17 pipelines its apply (ld_apply.c: a pipeline sync at most once
    a second): the target backend may hold statements it received but had not
    run when pgcopydb died (measured: held up by a lock, it ran them after
    pgcopydb was gone, and the replication origin moved on during the repair).
    The last of them is a transaction cut short; what its abort does to the
    origin is origin_advanced_by_abort's question."""
    query = ("SELECT pid, state, wait_event_type FROM pg_stat_activity WHERE datname = current_database() "
             "AND application_name LIKE 'pgcopydb[%%' AND pid <> pg_backend_pid()")
    try:
        with connect(s.target(), "target") as tgt:
            deadline = time.monotonic() + OUTLIVED_WAIT
            time.sleep(OUTLIVED_GRACE)
            rows = tgt.execute(query).fetchall()
            if not rows:
                return None
            sessions = ", ".join(f"pid {pid} {state} (waiting: {wait or 'no'})" for pid, state, wait in rows)
            seen = f"{len(rows)} session(s) still there {OUTLIVED_GRACE}s after it: {sessions}"
            while rows and time.monotonic() < deadline:
                time.sleep(0.2)
                rows = tgt.execute(query).fetchall()
            for (pid, *_rest) in rows:
                tgt.execute("SELECT pg_terminate_backend(%s)", (pid,))
            return seen + (f"; ended {len(rows)} after {OUTLIVED_WAIT:.0f}s" if rows else "; all ended by themselves")
    except (StepError, psycopg.Error):
        return None  # a target that cannot be reached has no sessions of the dead run left


WALINSPECT_WINDOWS = (1 << 20, 1 << 16)  # bytes of WAL before the origin's last move to look through
_ORIGIN_LSN = re.compile(r"origin: node (\d+), lsn ([0-9A-F]+/[0-9A-F]+)")


def last_commit_position(roident: int, records: list[tuple[str, str]]) -> str | None:
    """The origin position carried by the last COMMIT of our origin in `records`
    ((record_type, description) of the target's Transaction WAL records, oldest
    first); an ABORT after it does not count. None if there is none (pure, tested)."""
    for record_type, description in reversed(records):
        m = _ORIGIN_LSN.search(description or "")
        if m and int(m[1]) == roident and record_type.startswith("COMMIT"):
            return m[2]
    return None


def trusted_origin(roident: int, remote: str, records: list[tuple[str, str]]) -> bool:
    """Is the origin's position the COMMIT of an applied transaction?"""
    return last_commit_position(roident, records) == remote


def origin_advanced_by_abort(s: StepSettings) -> str | None:
    """Why the target's replication origin cannot be trusted, or None.

    Since PostgreSQL 15 an aborted transaction also moves the replication origin,
    to what pg_replication_origin_xact_setup set in it (xact.c:
    RecordTransactionAbort). pgcopydb 0.17 sends that setup before its COMMIT;
    a transaction cut short between the two (pgcopydb stopped or killed with its
    pipeline in flight, see end_outliving_apply) is rolled back with the origin
    at its COMMIT LSN, and a resume skips it: measured, 2 runs in 12 of
    tests/test_faults.py::test_replication_connection_lost_while_apply_behind
    lost the row of the transaction the origin pointed at. So the target's WAL
    before the origin's last move (its local_lsn) is read with pg_walinspect:
    the origin is trusted when the last COMMIT with this origin carries its
    position (an abort with the previous, committed setup moves nothing), or
    when pgcopydb's sentinel says it reached that position as its end."""
    from steps.engines.pgcopydb_follow import sentinel

    with connect(s.target(), "target") as tgt:
        row = tgt.execute("SELECT o.roident, s.remote_lsn::text, s.local_lsn::text "
                          "FROM pg_replication_origin_status s JOIN pg_replication_origin o ON o.roident = s.local_id "
                          "WHERE o.roname = %s", (s.slot_name,)).fetchone()
        if row is None or not lsn(row[1]):
            return None  # nothing applied through it to doubt
        roident, remote, local = row
        if not lsn(local):
            # No transaction moved it since the target started (a restarted target keeps only
            # remote_lsn), or none at all yet: there is no record to read. Measured: reading back
            # from the end of the WAL instead finds no COMMIT at remote_lsn in the common cases
            # (a stop right after the copy, a SIGTERM after catch-up) and would restart every copy.
            log(f"follow: repair: the target's replication origin ({remote}) has no local position (nothing "
                "moved it since the target started): taken as it is")
            return None
        sen = sentinel.read(s, strict=False)
        if sen is not None and sen.endpos and sen.endpos == lsn(remote):
            return None  # moved to the end by follow, once pgcopydb had replayed up to it
        created, records, error = False, None, None
        try:
            have = tgt.execute("SELECT extnamespace::regnamespace::text FROM pg_extension "
                               "WHERE extname = 'pg_walinspect'").fetchone()
            if have is None:
                tgt.execute("CREATE EXTENSION pg_walinspect SCHEMA db_upgrade")
                created = True
            fn = sql.SQL("SELECT record_type, description FROM {}.pg_get_wal_records_info("
                         "greatest(%s::pg_lsn - %s, '0/1000000'::pg_lsn), %s::pg_lsn) "
                         "WHERE resource_manager = 'Transaction' ORDER BY start_lsn").format(
                sql.Identifier(have[0] if have else "db_upgrade"))
            for window in WALINSPECT_WINDOWS:
                try:
                    with tgt.transaction():
                        records = tgt.execute(fn, (local, window, local)).fetchall()
                    break
                except psycopg.Error as exc:
                    error = exc
        except psycopg.Error as exc:
            error = exc
        finally:
            if created:
                try:
                    tgt.execute("DROP EXTENSION IF EXISTS pg_walinspect")
                except psycopg.Error:
                    pass
    if records is None:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        return (f"which transaction last moved the target's replication origin (to {remote}) cannot be read with "
                f"pg_walinspect ({first}); with a superuser on the target the resume can be checked")
    if trusted_origin(roident, remote, records):
        log(f"follow: repair: the target's replication origin ({remote}) is the COMMIT of an applied transaction "
            f"(target WAL up to {local})")
        return None
    last = last_commit_position(roident, records)
    return (f"the target's replication origin was last moved to {remote} by a rolled-back transaction (target WAL "
            f"up to {local}, {len(records)} transaction records read, holds no COMMIT at that position; the last "
            f"COMMIT through it carries {last or 'none'}: pgcopydb 0.17 was stopped between its origin setup and "
            "its COMMIT), so the transaction it points at is not on the target")


def died_unseen(workdir: Path) -> bool:
    """Was the earlier pgcopydb killed with the step (SIGKILL, OOM, a lost node)
    rather than stopped? After such a death pgcopydb 0.17's resume loses or
    re-applies changes even with every repair below. Measured, SIGKILL of the
    whole tree under writes, then a resume: 2 runs in 15 ended with an INSERT
    lost or an UPDATE undone on the target (6 in 41 over two days), while the
    slot, the CDC files and the SQL files agreed with each other. Resumes after
    pgcopydb was stopped (SIGTERM, a lost connection, a server restart) were
    exact in the same runs."""
    return (workdir / RUNNING_MARK).exists()


def copy_finished(workdir: Path) -> bool:
    """pgcopydb's own record: the sentinel's apply flag is set after the whole copy."""
    from steps.engines.pgcopydb_follow import sentinel

    if not pgcopydb.catalog_path(workdir).exists():
        return False
    try:
        return sentinel.is_on(sentinel.row(workdir)[0])
    except StepError as exc:
        log(f"follow: {exc}; treating the copy as unfinished")
        return False


def wait_slot_released(s: StepSettings) -> bool:
    """Wait until no process streams from our slot. Returns whether the slot exists."""
    deadline = time.monotonic() + SLOT_RELEASE_WAIT
    logged = False
    while True:
        with connect(s.source(), "source") as conn:
            row = conn.execute("SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s",
                               (s.slot_name,)).fetchone()
        if row is None or row[0] is None:
            return row is not None
        if time.monotonic() >= deadline:
            raise StepError(f"follow: replication slot {s.slot_name!r} is still in use by pid {row[0]} on the "
                            f"source after {SLOT_RELEASE_WAIT:.0f}s: another pgcopydb is still running on this "
                            "slot; stop it (or the other follow step) before resuming")
        if not logged:
            log(f"follow: replication slot {s.slot_name!r} is still in use by pid {row[0]} (the interrupted "
                "run's walsender); waiting for the source to release it")
            logged = True
        time.sleep(1)


def repair_cdc_files(workdir: Path) -> list[str]:
    """Cut a torn last line (a message half written when the process died)."""
    fixed = []
    cdc = workdir / "cdc"
    if not cdc.is_dir():
        return fixed
    for f in sorted(cdc.iterdir()):
        if f.is_symlink() or not f.is_file() or not (f.name.endswith(".json") or f.name.endswith(".json.partial")):
            continue
        size = f.stat().st_size
        if size == 0:
            continue
        with open(f, "rb+") as fh:
            fh.seek(-1, 2)
            if fh.read(1) == b"\n":
                continue
            # Find the last newline, reading backwards in blocks.
            pos, keep = size, 0
            while pos > 0:
                step = min(65536, pos)
                pos -= step
                fh.seek(pos)
                block = fh.read(step)
                i = block.rfind(b"\n")
                if i >= 0:
                    keep = pos + i + 1
                    break
            fh.truncate(keep)
            fh.flush()
        fixed.append(f"{f.name}: cut a torn last message ({size - keep} bytes)")
    return fixed


def promote_partial_files(workdir: Path) -> list[str]:
    """A killed receiver leaves X.json.partial beside an older X.json. On resume
    pgcopydb 0.17 reads its start position from the .partial (through `latest`)
    but then, finding X.json, unlinks the .partial and copies X.json over it
    (ld_stream.c): the messages only the .partial held are lost, while the slot
    resumes after them. Measured: 50 transactions missing on the target. The
    .partial starts as a copy of X.json and is only appended to, so it is
    promoted to X.json, as pgcopydb's own clean close does (rename)."""
    done = []
    cdc = workdir / "cdc"
    if not cdc.is_dir():
        return done
    for partial in sorted(cdc.glob("*.json.partial")):
        final = partial.with_name(partial.name.removesuffix(".partial"))
        if not final.exists():
            continue
        old, new = final.read_bytes(), partial.read_bytes()
        if old.startswith(new):
            # An unfinished copy of X.json (pgcopydb duplicates X.json into the
            # .partial when it reopens a segment; measured cut short by a full disk).
            partial.unlink()
            done.append(f"{partial.name}: removed, an incomplete copy of {final.name}")
            continue
        if not new.startswith(old):
            raise StepError(
                f"follow: cannot repair {cdc}: {partial.name} does not extend {final.name} (pgcopydb 0.17 would "
                "drop one of them on resume, losing changes); keep the volume and restart the copy: run cleanup, "
                "empty the target database and the work dir, then run follow again")
        os.replace(partial, final)
        done.append(f"{partial.name}: promoted to {final.name} ({len(new) - len(old)} bytes of changes only it "
                    "held; pgcopydb would have overwritten them)")
    latest = cdc / "latest"
    if latest.is_symlink() and not latest.exists():
        target = Path(os.readlink(latest))
        fixed = target.with_name(target.name.removesuffix(".partial"))
        if fixed.exists():
            latest.unlink()
            latest.symlink_to(fixed)
            done.append(f"latest: now points at {fixed.name}")
    return done


def cut_open_transaction(workdir: Path) -> list[str]:
    """The file being written when the receiver died may end inside a transaction
    (BEGIN and some rows, no COMMIT). On resume the source sends that transaction
    again from its BEGIN, and pgcopydb 0.17's transform stops on "Failed to parse
    BEGIN: transaction already in progress" (measured). Logical decoding sends
    whole transactions in commit order, so cutting the file back to its last
    COMMIT loses nothing: the open transaction is streamed again, whole."""
    latest = workdir / "cdc" / "latest"
    if not latest.exists():
        return []
    f = latest.resolve()
    data = f.read_bytes()
    last_begin = max(data.rfind(b'{"action":"B"'), data.rfind(b'{"action": "B"'))
    last_commit = max(data.rfind(b'{"action":"C"'), data.rfind(b'{"action": "C"'))
    if last_begin < 0 or last_begin < last_commit:
        return []
    if last_begin > 0 and data[last_begin - 1:last_begin] != b"\n":
        return []  # not at a line start: leave it to pgcopydb rather than guess
    with open(f, "rb+") as fh:
        fh.truncate(last_begin)
    return [f"{f.name}: cut an unfinished transaction ({len(data) - last_begin} bytes from its BEGIN); "
            "the source sends it again, whole"]


_MESSAGE_LSN = re.compile(rb'^\{"action":"[A-Z]",(?:"xid":"\d+",)?"lsn":"([0-9A-F]+)/([0-9A-F]+)"', re.M)


def durable_position(workdir: Path) -> int:
    """The highest LSN of a whole message in the CDC file being written (0 if none).

    Called after repair_cdc_files, so every line counted is complete. Line LSNs
    are not in order (a change carries its own record's LSN, which can be below
    an earlier transaction's COMMIT), hence the maximum, as pgcopydb's own
    written_lsn is."""
    cdc = workdir / "cdc"
    latest = cdc / "latest"
    files = [latest.resolve()] if latest.exists() else []
    if cdc.is_dir():
        # A file opened at a segment switch may hold nothing durable yet: the one before it counts then.
        named = sorted(f for f in cdc.iterdir() if f.name.endswith((".json", ".json.partial"))
                       and len(f.name.split(".", 1)[0]) == 24 and not f.is_symlink())
        files += [f for f in named[-2:] if f not in files]
    best = 0
    for f in files:
        data = f.read_bytes()
        for m in _MESSAGE_LSN.finditer(data):
            best = max(best, (int(m[1], 16) << 32) | int(m[2], 16))
    return best


def slot_confirmed_position(s: StepSettings) -> int:
    """How far the source was told the changes are safely stored (0 if it does not say)."""
    with connect(s.source(), "source") as src:
        row = src.execute("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
                          (s.slot_name,)).fetchone()
    return lsn(row[0]) if row and row[0] else 0


def confirmed_beyond_volume(s: StepSettings) -> str | None:
    """Why resuming would lose changes, or None.

    pgcopydb 0.17 reports a flush to the source once it has fsync()ed the CDC
    file's descriptor, but writes through a stdio buffer it never fflush()es
    first (ld_stream.c: streamFlush; write_to_stream). Up to a buffer of
    messages the source counts as stored is in memory only; when the process is
    killed, or the work volume fills and fclose() fails ("Failed to close file
    ... No space left on device"), they are gone. The slot does not send them
    again (it resumes at its confirmed position), so a resume silently misses
    those transactions (measured: a change lost in 3 runs of 40 of the
    full-volume fault test; none in 37 with this check, 6 of which started
    over). Whether the lost messages held a COMMIT cannot be told from here,
    so any gap counts."""
    confirmed, durable = slot_confirmed_position(s), durable_position(s.workdir())
    if not confirmed or not durable or confirmed <= durable:
        log(f"follow: repair: the work volume holds every change the source counts as stored (slot confirmed at "
            f"{fmt_lsn(confirmed)}, volume up to {fmt_lsn(durable)})")
        return None
    return (f"the source's replication slot {s.slot_name!r} counts changes up to {fmt_lsn(confirmed)} as stored, "
            f"but the work volume holds them only up to {fmt_lsn(durable)} (pgcopydb 0.17 confirms what is still in "
            "its write buffer, and the interrupted run lost that buffer): the slot will not send those changes again")


def _segment(position: int, workdir: Path) -> str | None:
    """The WAL file name (24 hex digits) pgcopydb names the CDC files of a position by."""
    cdc = workdir / "cdc"
    try:
        segsz = int((cdc / "wal_segment_size").read_text().strip())
        tli = int((cdc / "tli").read_text().strip() or "1")
    except (OSError, ValueError):
        return None
    per_xlogid = 0x100000000 // segsz
    segno = position // segsz
    return f"{tli:08X}{segno // per_xlogid:08X}{segno % per_xlogid:08X}"


def apply_start(s: StepSettings) -> int:
    """Where pgcopydb's apply resumes reading: the target's replication origin
    (it overrides the sentinel's replay_lsn), or the sentinel's replay_lsn when
    it is earlier. 0 when neither is known."""
    from steps.engines.pgcopydb_follow import sentinel
    positions = []
    replay = lsn(sentinel.row(s.workdir())[2])
    if replay:
        positions.append(replay)
    with connect(s.target(), "target") as tgt:
        origin = origin_progress(tgt, s.slot_name)
    if origin:
        positions.append(origin)
    return min(positions) if positions else 0


def rewrite_sql_files(s: StepSettings) -> list[str]:
    """Rewrite, from the JSON, every SQL file the resumed apply will read.

    pgcopydb 0.17 on resume re-transforms only the JSON file it resumes
    streaming into (the latest); its apply starts at the target's replication
    origin, usually some segments earlier, and reads the SQL files there as it
    finds them. Those were written while streaming live: their BEGIN lines lack
    the COMMIT LSN, so the apply re-applies transactions instead of skipping
    them (ld_apply.c: continuedTxn; measured, "duplicate key value violates
    unique constraint" after a SIGTERM and resume), and a file whose tail the
    dead transform never wrote is read as complete, its missing transactions
    skipped. Merely deleting them is worse: nothing writes them again, the
    apply waits for them and then, streaming live, skips the segments between
    (measured: rows lost, or a duplicate key, after a target restart while
    WAL segments switched). So each SQL file from the apply's start segment on
    is written again with `pgcopydb stream transform JSON SQL`, the file mode
    of its own catch-up transform (BEGIN lines with the COMMIT LSN)."""
    workdir = s.workdir()
    cdc = workdir / "cdc"
    if not pgcopydb.catalog_path(workdir).exists() or not cdc.is_dir():
        return []
    start = apply_start(s)
    first = _segment(start, workdir) if start else None
    if first is None:
        return []

    def seg(name: str) -> str | None:
        head = name.split(".", 1)[0]
        return head if len(head) == 24 and all(c in "0123456789ABCDEF" for c in head) else None

    removed = 0
    for f in sorted(cdc.iterdir()):
        if seg(f.name) and seg(f.name) >= first and f.name.endswith((".sql", ".sql.partial")):
            f.unlink()
            removed += 1
    sources: dict[str, Path] = {}
    for f in sorted(cdc.iterdir()):
        name = seg(f.name)
        if name and name >= first and f.name.endswith((".json", ".json.partial")) and not f.is_symlink():
            # A closed segment's .json, else the .partial still being written
            # (promote_partial_files has already merged any pair of both).
            if f.name.endswith(".json") or name not in sources:
                sources[name] = f
    for name in sorted(sources):
        src = sources[name]
        proc = pgcopydb.run(s, "stream", "transform", "--dir", str(workdir), str(src), str(cdc / f"{name}.sql"),
                            check=False, timeout=1800)
        if proc.returncode != 0:
            if "No space left on device" in proc.stderr:
                raise StepError(f"follow: cannot rewrite {name}.sql from {src.name} for the resume: the work volume "
                                f"{workdir} is full (No space left on device): enlarge it, then run the follow step "
                                "again (it resumes)")
            raise StepError(f"follow: cannot rewrite {name}.sql from {src.name} for the resume: "
                            f"{pgcopydb.last_error(proc.stderr)}; keep the work volume and run follow again")
    return [f"rewrote {len(sources)} SQL file(s) from the JSON, from the apply's resume position {fmt_lsn(start)} "
            f"on ({', '.join(sorted(sources)) or 'none'}; {removed} stale SQL file(s) replaced)"]


def remove_invalid_txn_metadata(workdir: Path) -> list[str]:
    """pgcopydb's apply records the COMMIT LSN of a transaction split across two
    CDC files in cdc/<xid>.json, to skip it when it is read again. After a
    failure (measured after a full work volume, and once near an endpos) such a
    file can hold commit_lsn 0/0, which the resumed apply cannot parse: it
    stops ("Failed to parse metadata for transaction metadata file"), on every
    re-run. Without the file the apply treats the transaction as continued and
    its COMMIT LSN decides, as for any split transaction: removing it is safe."""
    import json

    cdc = workdir / "cdc"
    if not cdc.is_dir():
        return []
    removed = []
    for f in sorted(cdc.glob("*.json")):
        xid = f.name.removesuffix(".json")
        if not xid.isdigit() or len(xid) == 24:  # <xid>.json, never a WAL-named CDC file
            continue
        try:
            commit_lsn = json.loads(f.read_text() or "{}").get("commit_lsn")
        except (OSError, ValueError):
            commit_lsn = None
        if commit_lsn in (None, "", "0/0"):
            f.unlink()
            removed.append(f.name)
    return [f"removed {len(removed)} transaction metadata file(s) without a COMMIT LSN ({', '.join(removed)})"] \
        if removed else []


def repair_catalog(workdir: Path) -> list[str]:
    """Forget work items and processes of the dead run; keep everything marked done."""
    db = pgcopydb.catalog_path(workdir)
    if not db.exists():
        return []
    done = []
    conn = sqlite3.connect(db, timeout=30)
    try:
        with conn:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            for table, where, what in (
                ("process", "1 = 1", "process entries of the dead run"),
                ("summary", "done_time_epoch IS NULL", "unfinished table/index/constraint entries"),
                ("vacuum_summary", "done_time_epoch IS NULL", "unfinished VACUUM entries"),
            ):
                if table not in tables:
                    continue
                n = conn.execute(f"DELETE FROM {table} WHERE {where}").rowcount
                if n:
                    done.append(f"catalog: removed {n} {what}")
    finally:
        conn.close()
    return done


def remove_pidfiles(workdir: Path) -> list[str]:
    removed = []
    for f in workdir.glob("pgcopydb*.pid"):
        f.unlink(missing_ok=True)
        removed.append(f"removed stale {f.name}")
    return removed


def drop_replication(s: StepSettings) -> list[str]:
    done = []
    with connect(s.source(), "source") as src:
        if src.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (s.slot_name,)).fetchone():
            src.execute("SELECT pg_drop_replication_slot(%s)", (s.slot_name,))
            done.append(f"dropped replication slot {s.slot_name!r} on the source")
        src.execute("DROP SCHEMA IF EXISTS pgcopydb CASCADE")
    with connect(s.target(), "target") as tgt:
        if tgt.execute("SELECT 1 FROM pg_replication_origin WHERE roname = %s", (s.slot_name,)).fetchone():
            tgt.execute("SELECT pg_replication_origin_drop(%s)", (s.slot_name,))
            done.append(f"dropped replication origin {s.slot_name!r} on the target")
        tgt.execute("DROP SCHEMA IF EXISTS pgcopydb CASCADE")
    return done


def restart_copy(s: StepSettings, reason: str) -> None:
    workdir = s.workdir()
    banner = "follow: RESTARTING THE COPY FROM SCRATCH"
    log(f"{banner}: {reason}")
    log(f"{banner}: resuming is unsafe here: tables copied again with a new snapshot would receive the "
        "changes since the first snapshot a second time (duplicate keys, duplicate rows)")
    wait_slot_released(s)
    dropped = target.drop_copied_objects(s)  # first: it refuses (changing nothing) if the target holds foreign objects
    log(f"{banner}: dropped {len(dropped)} object(s) the interrupted copy created on the target"
        + (f": {', '.join(dropped[:10])}{' ...' if len(dropped) > 10 else ''}" if dropped else ""))
    for line in drop_replication(s):
        log(f"{banner}: {line}")
    n = target.empty_dir(workdir)
    log(f"{banner}: emptied {workdir} ({n} entries)")
    st = state.load(s)
    if st.end_position:
        # The end belonged to the abandoned copy: PgcopydbFollow.reached() must not
        # answer for it from the new copy's origin, which starts past it.
        log(f"{banner}: the end position {st.end_position} set by finish belonged to the abandoned copy and is "
            "dropped: run the finish step again once the new copy has caught up")
    restarts = [*st.copy_restarts, {"at": state.now(), "reason": reason}]
    state.record(s, copy_restarts=restarts, copy_done_at=None, stream_started_at=None, copy_bytes_done=None,
                 copy_bytes_total=None, end_position=None, end_position_set_at=None, follow_done_at=None)


def prepare_resume(s: StepSettings) -> bool:
    """Called by follow when an earlier run used this dir. True: resume it; False:
    the dir, slot and target were reset and a fresh copy must start."""
    workdir = s.workdir()
    if not pgcopydb.catalog_path(workdir).exists():
        restart_copy(s, f"{workdir} holds no pgcopydb catalog (the earlier run stopped before writing it, or the "
                        "work volume is a new one)")
        return False
    if not copy_finished(workdir):
        restart_copy(s, f"the earlier run in {workdir} was interrupted during the initial copy "
                        "(pgcopydb's sentinel never enabled applying changes)")
        return False
    log(f"follow: {workdir} holds an earlier run whose initial copy had finished; repairing it for a resume")
    slot_exists = wait_slot_released(s)
    if not slot_exists:
        # e.g. cleanup-after-failure ran (keep-slot-on-failure=false): the changes
        # since the copy are gone with the slot; only a new copy is exact.
        restart_copy(s, f"the initial copy in {workdir} had finished, but replication slot {s.slot_name!r} "
                        "is gone from the source (cleanup ran?), and with it the changes since the copy")
        return False
    if died_unseen(workdir):
        restart_copy(s, f"the initial copy in {workdir} had finished, but the earlier pgcopydb was killed without "
                        "stopping (SIGKILL, out of memory, a lost node: the follow step never saw it exit), and "
                        "pgcopydb 0.17 cannot resume exactly after that")
        return False
    aborted = origin_advanced_by_abort(s)
    if aborted:
        restart_copy(s, f"the initial copy in {workdir} had finished, but {aborted}")
        return False
    fixes = remove_pidfiles(workdir) + repair_cdc_files(workdir) + promote_partial_files(workdir)
    for line in fixes:
        log(f"follow: repair: {line}")
    lost = confirmed_beyond_volume(s)
    if lost:
        restart_copy(s, f"the initial copy in {workdir} had finished, but {lost}")
        return False
    more = (cut_open_transaction(workdir) + rewrite_sql_files(s) + remove_invalid_txn_metadata(workdir)
            + repair_catalog(workdir))
    for line in more:
        log(f"follow: repair: {line}")
    if not fixes + more:
        log("follow: repair: nothing to repair (the earlier run stopped cleanly)")
    return True


def mark_endpos_replayed(workdir: Path, endpos: str) -> None:
    """After pgcopydb stopped: record in its sentinel that the endpos is replayed
    (its apply said so but left replay_lsn at the last commit before it)."""
    conn = sqlite3.connect(pgcopydb.catalog_path(workdir), timeout=30)
    try:
        with conn:
            conn.execute("UPDATE sentinel SET replay_lsn = ? WHERE id = 1 AND endpos = ?", (endpos, endpos))
    finally:
        conn.close()
