"""The native engine: PostgreSQL's own logical replication, pgcopydb for the copy.

1. Source: `db_upgrade.barrier` (before anything else, so the copy carries it),
   a publication FOR TABLE the application's tables and the barrier, then a
   pgoutput slot created on a replication connection with an exported snapshot.
   That connection is held, idle, while `pgcopydb clone --snapshot` copies
   schema, data, indexes and constraints in parallel: the copy is exactly the
   slot's starting point.
2. Target: once the copy is done, a subscription on the slot with
   `create_slot = false, copy_data = false`. The apply runs inside the target
   server: from here on no pod is needed to stay in sync, and a killed follow
   pod loses nothing (the follow step only watches).
3. End: a barrier row written on the source (after the freeze). Apply follows
   the source's commit order, so once the target shows the row it has every
   transaction committed before it. Nothing to poll but that row, no timer.

An interrupted copy cannot be resumed (the exported snapshot died with its
connection): it starts over, loudly, with a new slot and an emptied target.

Measured (shared/research/pgcopydb.md): the values pgcopydb 0.17's own change
stream corrupts (unchanged TOAST, text starting with `null`, trailing quotes,
numerics) all arrive exact this way.
"""

from __future__ import annotations

import signal
import threading
import time
import uuid

import psycopg

from steps import pgcopydb, state
from steps.engines.base import Engine
from steps.engines.native import statements as q
from steps.errors import StepError
from steps.log import log
from steps.pg import connect, lsn, open_connection, pretty_bytes, scrub

WATCH_INTERVAL = 1.0
LOG_EVERY = 30.0
DDL_EVERY = 10.0
SLOT_RELEASE_WAIT = 30.0
BANNER = "follow: RESTARTING THE COPY FROM SCRATCH"


class Native(Engine):
    name = "native"
    apply_in_target = True
    _drain_conn = None

    @property
    def slot(self) -> str:
        return self.s.slot_name

    publication = subscription = slot

    # -- preflight -----------------------------------------------------------------------

    def preflight_checks(self, src, tgt, report) -> None:
        try:
            from steps.engines.native import preflight
        except ImportError:
            return
        preflight.checks(self.s, src, tgt, report)

    # -- follow ----------------------------------------------------------------------------

    def follow(self) -> None:
        s = self.s
        for role, uri in (("source", s.source()), ("target", s.target())):
            with connect(uri, role):
                pass
        st = state.load(s)
        if st.stream_started_at:
            problem = self._stream_problem()
            if problem is None:
                log("follow: the subscription is applying changes inside the target server; watching it")
                return self._watch()
            self._restart(f"the change stream of the earlier run is broken ({problem}): changes since the copy "
                          "may be missing")
        elif st.follow_started_at:
            self._restart("the earlier run was interrupted during the initial copy, which cannot be resumed "
                          "(its exported snapshot ended with its connection)")
        self._copy()
        self._watch()

    def _stream_problem(self) -> str | None:
        with connect(self.s.target(), "target") as tgt:
            if tgt.execute(q.SUBSCRIPTION_STATE, (self.subscription,)).fetchone() is None:
                return f"no subscription {self.subscription!r} on the target"
        with connect(self.s.source(), "source") as src:
            if src.execute(q.SLOT_STATE, (self.slot,)).fetchone() is None:
                return f"no replication slot {self.slot!r} on the source"
        return None

    def _restart(self, reason: str) -> None:
        from steps import target

        s = self.s
        log(f"{BANNER}: {reason}")
        dropped = target.drop_copied_objects(s)  # first: it refuses, changing nothing, on foreign objects
        log(f"{BANNER}: dropped {len(dropped)} object(s) the earlier copy created on the target"
            + (f": {', '.join(dropped[:10])}{' ...' if len(dropped) > 10 else ''}" if dropped else ""))
        self.cleanup()
        if s.dir is not None and s.dir.exists():
            n = target.empty_dir(s.dir)
            log(f"{BANNER}: emptied {s.dir} ({n} entries)")
        st = state.load(s)
        if st.end_position:
            log(f"{BANNER}: the end position set earlier belonged to the abandoned copy and is dropped: "
                "run finish again once the new copy has caught up")
        state.record(s, copy_restarts=[*st.copy_restarts, {"at": state.now(), "reason": reason}],
                     copy_done_at=None, stream_started_at=None, end_position=None, end_position_set_at=None,
                     follow_done_at=None, caught_up_at=None)

    def _app_tables(self, conn) -> list[tuple[str, str]]:
        return [(r[0], r[1]) for r in conn.execute(q.APP_TABLES, ()).fetchall()]

    def _copy(self) -> None:
        s = self.s
        workdir = s.workdir()
        if "'" in str(workdir):
            # pgcopydb 0.17 splices the path into SQLite SQL (catalog.c: "attach '%s' as %s").
            raise StepError(f"DB_UPGRADE_DIR={workdir} contains a single quote, which pgcopydb 0.17 cannot handle: "
                            "use a path without quotes")
        with connect(s.source(), "source") as src:
            with src.transaction():
                src.execute(q.BARRIER_DDL)
                tables = self._app_tables(src)
                src.execute(q.drop_publication(self.publication))
                try:
                    src.execute(q.create_publication(self.publication, tables))
                except psycopg.errors.InsufficientPrivilege as exc:
                    raise StepError(f"follow: cannot create the publication on the source ({_first(exc)}): the role "
                                    "must own every application table, or be a superuser") from None
            total = src.execute(_TOTAL, ([t[0] for t in tables], [t[1] for t in tables])).fetchone()[0]
            if src.execute(q.SLOT_STATE, (self.slot,)).fetchone() is not None:
                self._drop_slot(src)
        workdir.mkdir(parents=True, exist_ok=True)
        state.record(s, engine=self.name, follow_started_at=state.now(), copy_bytes_total=int(total),
                     copy_done_at=None, stream_started_at=None, follow_failed_at=None, follow_error=None)
        log(f"follow: publication {self.publication!r} for {len(tables)} table(s) on the source; creating slot "
            f"{self.slot!r} with an exported snapshot, then copying {pretty_bytes(total)} of tables")
        try:
            repl = psycopg.connect(s.source(), autocommit=True, replication="database", connect_timeout=10,
                                   application_name="db-upgrade-snapshot")
        except psycopg.OperationalError as exc:
            raise StepError(f"follow: cannot open a replication connection to the source: {scrub(_first(exc), s.source())}"
                            "; the role needs REPLICATION (grant-replication) and pg_hba must allow it") from None
        try:
            res = repl.pgconn.exec_(q.create_slot_command(self.slot))
            if res.status != psycopg.pq.ExecStatus.TUPLES_OK:
                raise StepError(f"follow: creating the replication slot failed: "
                                f"{(res.error_message or b'').decode(errors='replace').strip()}")
            consistent, snapshot = res.get_value(0, 1).decode(), res.get_value(0, 2).decode()
            log(f"follow: slot {self.slot!r} created at {consistent}, snapshot {snapshot} exported; pgcopydb copies "
                "exactly that state")
            self._run_clone(snapshot)
        finally:
            repl.close()  # the snapshot is no longer needed: the slot keeps the position
        copied = state.now()
        with connect(s.target(), "target") as tgt:
            # pg_dump carried our publication over to the target: it is not the application's.
            tgt.execute(q.drop_publication(self.publication))
            try:
                with tgt.transaction():  # allowed in a transaction: create_slot = false
                    for stmt in q.QUIET_LOGGING:
                        try:
                            with tgt.transaction():
                                tgt.execute(stmt)
                        except psycopg.errors.InsufficientPrivilege:
                            pass
                    tgt.execute(q.create_subscription(self.subscription, s.subscription_source(), self.publication,
                                                      self.slot))
            except psycopg.Error as exc:
                raise StepError(f"follow: creating the subscription on the target failed: "
                                f"{scrub(_first(exc), s.subscription_source())} (the target server connects to the "
                                "source with DB_UPGRADE_SUBSCRIPTION_PGURI, default the source URI; it needs a "
                                "superuser or pg_create_subscription)") from None
        state.record(s, copy_done_at=copied, stream_started_at=state.now())
        log(f"follow: copy done; subscription {self.subscription!r} on the target streams changes from slot "
            f"{self.slot!r} (from here on the apply runs inside the target server)")

    def _run_clone(self, snapshot: str) -> None:
        s = self.s
        workdir = s.workdir()
        argv = pgcopydb.locate(workdir).argv(
            "clone", "--dir", str(workdir), "--snapshot", snapshot,
            "--table-jobs", str(s.table_jobs), "--index-jobs", str(s.index_jobs))
        with pgcopydb.Session(argv, pgcopydb.environment(s), "follow") as run:
            for _line in run.lines():
                pass
        rc, stopping, first_error, disk_full = run.rc, run.stopping, run.first_error, run.disk_full
        if rc != 0 and not disk_full:
            import shutil

            # pgcopydb does not always say why a write failed ("Failed to write file ...").
            disk_full = shutil.disk_usage(workdir).free < 1024 * 1024
        if rc == 0 and not stopping.is_set():
            return
        why = "stopped by a signal" if stopping.is_set() else f"pgcopydb clone exited {rc}"
        if disk_full:
            why += f" because the work volume {workdir} is full (No space left on device): enlarge it"
        elif first_error and not stopping.is_set():
            why += f" (its first error: {first_error})"
        raise StepError(f"follow: {why} during the initial copy; run the follow step again: the copy starts over")

    def _watch(self) -> None:
        s = self.s
        stop = threading.Event()

        def on_signal(signum, _frame):
            stop.set()

        old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        last_log = last_ddl = 0.0
        errors_seen = None
        published = known = None
        down_since = None
        try:
            while not stop.is_set():
                try:
                    with connect(s.source(), "source", purpose="watch") as src:
                        if published is None:
                            published = {(r[0], r[1]) for r in src.execute(
                                "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = %s",
                                (self.publication,)).fetchall()}
                        while not stop.is_set():
                            st = state.load_from(src, s.run_id)
                            if st.end_position and self.reached(st.end_position):
                                state.record(s, follow_done_at=state.now())
                                log(f"follow: the target has everything up to the end position ({st.end_position}); "
                                    "done (the subscription stays until cleanup)")
                                return
                            down_since = None
                            now = time.monotonic()
                            if now - last_ddl >= DDL_EVERY:
                                last_ddl = now
                                known = self._check_ddl(src, published, known, st)
                            if now - last_log >= LOG_EVERY:
                                last_log = now
                                lag, errors = self._lag_and_errors()
                                if lag is not None:
                                    log(f"follow: the target is {pretty_bytes(lag)} behind the source"
                                        + (f"; end position {st.end_position} set, waiting for it"
                                           if st.end_position else ""))
                                if errors_seen is not None and errors > errors_seen:
                                    log(f"follow: THE SUBSCRIPTION'S APPLY FAILED {errors - errors_seen} more "
                                        f"time(s) ({errors} in all): it retries; the cause is in the target "
                                        "server's log")
                                errors_seen = errors
                            stop.wait(WATCH_INTERVAL)
                except (StepError, psycopg.Error) as exc:
                    # A server restart or a network blip: the subscription reconnects by
                    # itself inside the target server; the watcher just tries again.
                    if down_since is None:
                        down_since = time.monotonic()
                        log(f"follow: lost the connection while watching ({_first(exc)}); retrying (the "
                            "subscription reconnects by itself)")
                    stop.wait(2.0)
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)
        raise StepError("follow: stopped by a signal before the end position was reached; the subscription keeps "
                        "applying inside the target server: run the follow step again to watch it")

    def _check_ddl(self, src, published: set, known: set | None, st) -> set:
        """Tables or sequences created on the source after the copy began: DDL is
        not replicated, so their rows would never reach the target."""
        rels = {(k, name) for k, name in src.execute(q.APP_RELATIONS, ()).fetchall()}
        if known is None:
            with connect(self.s.target(), "target") as tgt:
                known = {(k, name) for k, name in tgt.execute(q.APP_RELATIONS, ()).fetchall()}
        new = sorted(f"{'sequence' if k == 'S' else 'table'} {name}" for k, name in rels - known)
        if new and new != st.new_objects:
            state.record(self.s, new_objects=new)
            log(f"follow: CREATED ON THE SOURCE AFTER THE COPY BEGAN, NOT REPLICATED: {', '.join(new[:10])}. DDL "
                "is not replicated: create them on the target (and add tables to the publication), or abort and "
                "start again; the cutover refuses until then")
        return known

    def _lag_and_errors(self) -> tuple[int | None, int]:
        try:
            with connect(self.s.source(), "source", purpose="watch") as src, \
                    connect(self.s.target(), "target", purpose="watch") as tgt:
                return self._lag(src, tgt), self._sub_state(tgt)[4]
        except (StepError, psycopg.Error, TypeError):
            return None, 0

    def _sub_state(self, tgt):
        row = tgt.execute(q.SUBSCRIPTION_STATE, (self.subscription,)).fetchone()
        if row is None:
            raise StepError(f"no subscription {self.subscription!r} on the target")
        return row

    def _lag(self, src, tgt) -> int | None:
        row = src.execute(q.SLOT_STATE, (self.slot,)).fetchone()
        if row is None:
            return None
        confirmed, _pid, current = row
        applied = max(lsn(confirmed), lsn(self._sub_state(tgt)[2]))
        return max(0, lsn(current) - applied)

    # -- the rest of the interface -----------------------------------------------------

    def lag(self) -> int | None:
        st = state.load(self.s)
        if not st.stream_started_at:
            return None
        with connect(self.s.source(), "source", purpose="lag") as src, \
                connect(self.s.target(), "target", purpose="lag") as tgt:
            return self._lag(src, tgt)

    def set_end(self, since: float | None = None) -> str:
        s = self.s
        st = state.load(s)
        if st.end_position and (since is None or (st.end_position_set_at or 0) >= since):
            log(f"finish: end position already set ({st.end_position}); keeping it")
            return st.end_position
        ident = f"{s.run_id}:{uuid.uuid4().hex[:12]}"
        with connect(s.source(), "source", purpose="barrier") as src:
            with src.transaction():
                # Flushed at commit, so the walsender sends it at once.
                src.execute("SET LOCAL synchronous_commit = on")
                try:
                    src.execute(q.insert_barrier(), (ident,))
                except psycopg.errors.UndefinedTable:
                    raise StepError("finish: no db_upgrade.barrier on the source: the follow step has not started "
                                    "its copy yet; nothing to stop") from None
            at = src.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0]
        end = f"barrier:{ident}"
        state.record(s, end_position=end, end_position_set_at=state.now())
        log(f"finish: end position set: barrier row {ident!r} written on the source at {at}; the target has "
            "everything committed before it once it shows that row")
        return end

    def reached(self, end: str) -> bool:
        # Polled every few ms by the cutover's drain: one connection for all the polls.
        for attempt in (1, 2):
            tgt = self._drain_conn
            if tgt is None or tgt.closed or tgt.broken:
                tgt = self._drain_conn = open_connection(self.s.target(), "target", purpose="drain")
            try:
                return tgt.execute(q.barrier_seen(), (q.barrier_id(end),)).fetchone() is not None
            except psycopg.errors.UndefinedTable:
                return False
            except psycopg.OperationalError:
                tgt.close()
                if attempt == 2:
                    raise
        return False

    def cleanup(self) -> None:
        s = self.s
        with connect(s.target(), "target") as tgt:
            if tgt.execute("SELECT 1 FROM pg_subscription WHERE subname = %s", (self.subscription,)).fetchone():
                for stmt in q.drop_subscription(self.subscription):
                    tgt.execute(stmt)
                log(f"cleanup: dropped subscription {self.subscription!r} on the target")
            tgt.execute(q.drop_publication(self.publication))
        with connect(s.source(), "source") as src:
            self._drop_slot(src)
            src.execute(q.drop_publication(self.publication))

    def _drop_slot(self, src) -> None:
        deadline = time.monotonic() + SLOT_RELEASE_WAIT
        while True:
            row = src.execute(q.SLOT_STATE, (self.slot,)).fetchone()
            if row is None:
                return
            pid = row[1]
            if pid is None:
                break
            if time.monotonic() >= deadline:
                # A walsender whose subscriber is gone: it would hold the slot until wal_sender_timeout.
                src.execute("SELECT pg_terminate_backend(%s)", (pid,))
                time.sleep(0.5)
                deadline = time.monotonic() + SLOT_RELEASE_WAIT
            time.sleep(0.2)
        src.execute("SELECT pg_drop_replication_slot(%s)", (self.slot,))
        log(f"cleanup: dropped replication slot {self.slot!r} on the source")

    def stream_problem(self) -> str | None:
        try:
            with connect(self.s.target(), "target", purpose="check") as tgt:
                row = tgt.execute(q.SUBSCRIPTION_STATE, (self.subscription,)).fetchone()
        except (StepError, psycopg.Error) as exc:
            return f"cannot read the subscription on the target ({_first(exc)})"
        if row is None:
            return f"no subscription {self.subscription!r} on the target (cleaned up after a failure?)"
        if not row[1]:
            return f"the subscription {self.subscription!r} is disabled"
        if row[3] is None:
            return f"the subscription {self.subscription!r} has no running apply worker (see the target's log)"
        return None

    def copy_progress(self) -> tuple[int, int] | None:
        st = state.try_load(self.s)
        if st is None or not st.copy_bytes_total:
            return None
        if st.copy_done_at:
            return st.copy_bytes_total, st.copy_bytes_total
        try:
            with connect(self.s.target(), "target", purpose="progress") as tgt:
                done = tgt.execute(_COPIED).fetchone()[0]
        except (StepError, psycopg.Error):
            return None
        return min(int(done), st.copy_bytes_total), st.copy_bytes_total


# Bytes of the application's tables (partitions included) on the source, and
# what has arrived on the target: tables whose COPY is done plus the bytes the
# running COPYs have read (pg_stat_progress_copy). Approximate by design.
_TOTAL = ("SELECT coalesce(sum(pg_table_size(c.oid)), 0)::bigint FROM pg_class c "
          "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind = 'r' AND "
          "((n.nspname, c.relname) IN (SELECT * FROM unnest(%s::text[], %s::text[])) OR c.relispartition)")
_COPIED = ("SELECT coalesce((SELECT sum(pg_table_size(c.oid)) FROM pg_class c JOIN pg_namespace n "
           "ON n.oid = c.relnamespace WHERE c.relkind = 'r' AND n.nspname NOT IN "
           "('pg_catalog', 'information_schema', 'pgcopydb', 'db_upgrade') AND n.nspname NOT LIKE 'pg_toast%' "
           "AND c.oid NOT IN (SELECT relid FROM pg_stat_progress_copy)), 0)::bigint "
           "+ coalesce((SELECT sum(bytes_processed) FROM pg_stat_progress_copy "
           "WHERE datname = current_database()), 0)::bigint")


def _first(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
