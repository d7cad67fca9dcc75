"""Faults during an upgrade with the pgcopydb-follow engine, on real PostgreSQL
15 -> 17 and pgcopydb 0.17, under concurrent application writes. Each test ends
with an exact verification (steps.verify plus an independent digest) and no
replication slot left.

The follow step runs as in its pod (`db-upgrade step follow`); lag, the end
position, reached and cleanup go through the engine's own methods, which is
what wait-caught-up, finish, the cutover and cleanup call.

Numbers (rows, times) are printed with -s; README.md ("Failure modes") has what the
operator sees for each fault.
"""

import errno
import os
import re
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from local import workload
from steps import freeze, state, verify
from steps.engines.pgcopydb_follow import PgcopydbFollow
from steps.errors import StepError
from steps.pg import lsn
from steps.settings import load_settings
from tests.conftest import DB_UPGRADE, step_env, tmpfs_volume
from tests.digests import row_differences, table_digests

pytestmark = pytest.mark.slow

# Big enough that the initial copy takes a couple of seconds (a window to kill
# it in), small enough to load in a few seconds.
FAULT_SIZE = 60_000
FOLLOW_STEP = [DB_UPGRADE, "step", "follow"]


def slot_count(uri: str, slot: str) -> int:
    with psycopg.connect(uri) as conn:
        return conn.execute("SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s", (slot,)).fetchone()[0]


def app_can_write(src_db: str) -> bool:
    try:
        with psycopg.connect(workload.app_uri(src_db), autocommit=True) as app:
            app.execute(sql.SQL("INSERT INTO {} (actor, detail) VALUES ('probe', 'can write')").format(
                sql.Identifier(workload.SCHEMA, workload.AUDIT)))
        return True
    except psycopg.Error:
        return False


def reset_app_role(uri: str) -> None:
    """The sample's freeze SQL sets a role default, which is per server, not per
    database: a test that froze must not leave other tests' writers read-only."""
    with psycopg.connect(uri, autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER ROLE {} RESET default_transaction_read_only").format(
            sql.Identifier(workload.APP_ROLE)))


def quote_ident(name: str) -> str:
    """As PostgreSQL's format('%I') prints a name (verify's labels): quoted only when it must be."""
    return name if re.fullmatch(r"[a-z_][a-z0-9_$]*", name) else '"' + name.replace('"', '""') + '"'


class Run:
    """One upgrade's settings, work dir and follow step process."""

    def __init__(self, pair, dbs, tmp_path: Path, slot: str, size: str | int = "small", **extra):
        self.src_db, self.tgt_db = dbs
        workload.ensure_app_role(pair.target.uri())
        if isinstance(size, int):
            workload.SIZES[f"n{size}"] = size
            size = f"n{size}"
        workload.ensure_app_role(self.src_db)
        reset_app_role(self.src_db)
        t = time.monotonic()
        workload.load_sample(self.src_db, size)
        self.load_seconds = time.monotonic() - t
        self.readonly, self.unfreeze = workload.freeze_sql_files(tmp_path / "sql")
        self.workdir = tmp_path / "work"
        self.tmp = tmp_path
        self.slot = slot
        settings = dict(DB_UPGRADE_SLOT_NAME=slot, DB_UPGRADE_READONLY_SQL=self.readonly,
                        DB_UPGRADE_UNFREEZE_SQL=self.unfreeze, DB_UPGRADE_LAG_THRESHOLD_BYTES=256 * 1024,
                        DB_UPGRADE_POLL_INTERVAL=0.3, DB_UPGRADE_CATCHUP_TIMEOUT=240,
                        DB_UPGRADE_TABLE_JOBS=2, DB_UPGRADE_INDEX_JOBS=2, DB_UPGRADE_FREEZE_TIMEOUT=20,
                        DB_UPGRADE_ENGINE="pgcopydb-follow")
        settings.update(extra)
        self.env = step_env(self.src_db, self.tgt_db, self.workdir, **settings)
        self.s = load_settings(**{k.removeprefix("DB_UPGRADE_").lower(): v for k, v in self.env.items()
                                  if k.startswith("DB_UPGRADE_")},
                               source_pguri=self.src_db, target_pguri=self.tgt_db)
        self.engine = PgcopydbFollow(self.s)
        self.follow: subprocess.Popen | None = None
        self.logs: list[str] = []
        self.writer: workload.Writer | None = None
        self.follow_retries = 0

    # -- the follow step -------------------------------------------------
    def start_caught_up(self, rate: int, threads: int) -> None:
        """The application writing, follow started, and caught up."""
        self.writer = workload.Writer(workload.app_uri(self.src_db), rate=rate, threads=threads).start()
        self.start_follow()
        self.wait_caught_up()

    def wait_caught_up(self, timeout: float = 240) -> int:
        """What wait-caught-up does with the engine: the copy done, the lag under the threshold."""
        deadline = time.monotonic() + timeout
        while True:
            st = state.load(self.s)
            assert not (st.follow_failed_at and not st.follow_done_at), st.follow_error
            lag = self.engine.lag()
            if lag is not None and lag <= self.s.lag_threshold_bytes:
                return lag
            assert time.monotonic() < deadline, f"not caught up (lag {lag}):\n{self.follow_log()[-3000:]}"
            time.sleep(self.s.poll_interval)

    def start_follow(self, command: list[str] = FOLLOW_STEP) -> subprocess.Popen:
        n = len(self.logs) + 1
        self._log = open(self.tmp / f"follow{n}.log", "w")
        self.follow = subprocess.Popen(command, env=self.env, stdout=self._log,
                                       stderr=subprocess.STDOUT, text=True)
        self.logs.append(str(self.tmp / f"follow{n}.log"))
        return self.follow

    def follow_log(self) -> str:
        return Path(self.logs[-1]).read_text()

    def pgcopydb_sid(self, timeout: float = 30) -> int:
        """The follow step starts pgcopydb in a session of its own: its session id
        is the pid of the step's child (bwrap locally, pgcopydb in the pod)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for entry in Path("/proc").iterdir():
                if not entry.name.isdigit():
                    continue
                try:
                    stat = (entry / "stat").read_text()
                except OSError:
                    continue
                if int(stat.rsplit(")", 1)[1].split()[1]) == self.follow.pid:
                    return int(entry.name)
            time.sleep(0.05)
        raise AssertionError("pgcopydb never started under the follow step")

    def session_pids(self, sid: int) -> list[int]:
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    zombie = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
                    if not zombie and os.getsid(int(entry)) == sid:
                        pids.append(int(entry))
                except (OSError, ProcessLookupError, PermissionError):
                    pass
        return pids

    def kill_all(self) -> None:
        """SIGKILL the step and every process of pgcopydb's session, as losing the pod would."""
        sid = self.pgcopydb_sid()
        self.follow.kill()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            pids = self.session_pids(sid)
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)
        self.follow.wait(timeout=30)
        assert not self.session_pids(sid), "pgcopydb processes survived the kill"

    def wait_follow(self, timeout: float = 180) -> int:
        rc = self.follow.wait(timeout=timeout)
        self._log.close()
        return rc

    # -- pgcopydb's catalog, read as a bystander ---------------------------
    def catalog(self, query: str):
        db = self.workdir / "schema" / "source.db"
        if not db.exists():
            return None
        try:
            conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
            try:
                return conn.execute(query).fetchone()
            finally:
                conn.close()
        except sqlite3.Error:
            return None

    def wait_copy_midway(self, timeout: float = 120) -> tuple[int, int]:
        """Until at least one table is copied and the copy is not finished."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done = self.catalog("SELECT count(*) FROM summary WHERE tableoid IS NOT NULL "
                                "AND done_time_epoch IS NOT NULL")
            busy = self.catalog("SELECT count(*) FROM summary WHERE tableoid IS NOT NULL "
                                "AND done_time_epoch IS NULL")
            apply = self.catalog("SELECT apply FROM sentinel")
            if (done and done[0] >= 1 and busy and busy[0] >= 1 and apply is not None
                    and str(apply[0]) in ("0", "False")):
                return done[0], busy[0] if busy else 0
            time.sleep(0.02)
        raise AssertionError(f"the copy never got midway; log:\n{self.follow_log()[-3000:]}")

    # -- the end of an upgrade ------------------------------------------
    def set_end(self) -> str:
        """What finish (and the cutover) does with the engine."""
        return self.engine.set_end()

    def wait_reached(self, end: str, timeout: float = 120, retry: bool = False) -> float:
        """The cutover's drain: until the engine says the target has everything before
        the end. With retry, a follow step that fails meanwhile is run again, as Argo's
        retry does."""
        t = time.monotonic()
        while not self.engine.reached(end):
            if self.follow.poll() not in (None, 0):
                assert retry, f"follow failed before the end {end} was reached:\n{self.follow_log()[-3000:]}"
                self.retry_follow()
            assert time.monotonic() - t < timeout, f"end {end} never reached:\n{self.follow_log()[-3000:]}"
            time.sleep(0.05)
        return time.monotonic() - t

    def retry_follow(self) -> None:
        self._log.close()
        self.follow_retries += 1
        print(f"\nfollow failed after the endpos was set, retrying it: "
              f"{[ln for ln in self.follow_log().splitlines() if ln.startswith('error:')]}")
        self.start_follow()

    def cut_over(self) -> verify.VerifyReport:
        """wait-caught-up, freeze, the end position, the target reaches it, follow exits 0, verify."""
        t0 = time.monotonic()
        self.wait_caught_up()
        t1 = time.monotonic()
        time.sleep(1)
        freeze.freeze(self.s)
        t2 = time.monotonic()
        end = self.set_end()
        drained = self.wait_reached(end, timeout=180, retry=True)
        print(f"\ncut over: caught up {t1 - t0:.1f}s, freeze (settle included) {t2 - t1 - 1:.1f}s, "
              f"end set -> reached {drained:.2f}s")
        rc = self.wait_follow()
        if rc != 0:
            # What Argo's retry of the follow step does; counted, and reported by -s.
            self.retry_follow()
            rc = self.wait_follow()
        assert rc == 0, self.follow_log()[-4000:]
        if self.writer:
            self.writer.stop()
        src, tgt = table_digests(self.src_db), table_digests(self.tgt_db)
        diff = {k: (src.get(k), tgt.get(k)) for k in set(src) | set(tgt) if src.get(k) != tgt.get(k)}
        try:
            report = verify.verify(self.s)
        except Exception as exc:  # the gate must catch what the independent digest sees
            report = exc
        if diff:
            # Never silent: the gate must name every table the independent digest sees differ.
            assert isinstance(report, Exception), f"verify passed but source != target: {diff}"
            assert all(f"shop.{quote_ident(t)}" in str(report) for t in diff), (diff, str(report))
        assert not diff, (f"source != target after the run (verify caught it: {report}): {diff}; "
                          + "; ".join(row_differences(self.src_db, self.tgt_db, t) for t in diff))
        assert not isinstance(report, Exception), report
        assert report.ok
        return report

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, exc_type, *_exc) -> None:
        self.close()
        if exc_type is None:
            assert slot_count(self.src_db, self.slot) == 0, f"replication slot {self.slot!r} left on the source"

    def close(self) -> None:
        if self.writer:
            self.writer.stop()
        reset_app_role(self.src_db)
        if self.follow is not None and self.follow.poll() is None:
            try:
                self.kill_all()
            except AssertionError:
                pass
        try:
            self.engine.cleanup()
        except StepError as exc:
            print(f"cleanup after the test: {exc}")
        for uri in (self.src_db,):
            with psycopg.connect(uri, autocommit=True) as conn:
                conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                             "WHERE slot_name = %s AND active_pid IS NULL", (self.slot,))


def test_sigkill_during_initial_copy_restarts_the_copy(pair, dbs, tmp_path):
    """Fault 1: the whole tree SIGKILLed mid-copy; the re-run starts the copy over
    (a resume would replay changes onto tables copied with a newer snapshot)."""
    with Run(pair, dbs, tmp_path, "fault_kill_copy", size=FAULT_SIZE) as r:
        r.writer = workload.Writer(workload.app_uri(r.src_db), rate=100, threads=2).start()
        t0 = time.monotonic()
        r.start_follow()
        done, busy = r.wait_copy_midway()
        t_kill = time.monotonic() - t0
        r.kill_all()
        assert slot_count(r.src_db, r.slot) == 1  # the kill leaves the slot behind
        with psycopg.connect(r.tgt_db) as conn:
            copied = conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = %s",
                                  (workload.SCHEMA,)).fetchone()[0]
        assert copied > 0
        t1 = time.monotonic()
        r.start_follow()
        report = r.cut_over()
        log = r.follow_log()
        assert "RESTARTING THE COPY FROM SCRATCH" in log, log[-3000:]
        assert "dropped replication slot" in log
        restarts = state.load(r.s).copy_restarts
        assert len(restarts) == 1 and "interrupted during the initial copy" in restarts[0]["reason"], restarts
        rows = sum(t.source_rows for t in report.tables)
        print(f"\nfault 1: load {r.load_seconds:.1f}s, killed after {t_kill:.1f}s ({done} tables done, "
              f"{busy} in progress); restart to verified {time.monotonic() - t1:.1f}s; {rows} rows exact; "
              f"{r.writer.stats.ok} writes")


def wait_log(r: Run, text: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while text not in r.follow_log():
        if r.follow.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{text!r} not in the follow log:\n{r.follow_log()[-3000:]}")
        time.sleep(0.1)


RESUMED, RESTARTED = "follow: resuming the interrupted run", "RESTARTING THE COPY FROM SCRATCH"
LOST_BUFFER = "confirms what is still in its write buffer"


def wait_resumed_or_restarted_for_a_lost_buffer(r: Run) -> bool:
    """After a kill or a full volume, pgcopydb 0.17 may have confirmed to the
    source changes that died in its write buffer: then the only exact way on is
    a new copy (repair.confirmed_beyond_volume), else a resume. Which one depends
    on where the buffer stood; both must end exact. True if the copy restarted."""
    deadline = time.monotonic() + 60
    while True:
        log = r.follow_log()
        if RESUMED in log:
            assert "holds every change the source counts as stored" in log, log[-3000:]
            return False
        if RESTARTED in log:
            assert LOST_BUFFER in log, log[-3000:]
            return True
        if r.follow.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"neither a resume nor a restart in the follow log:\n{log[-3000:]}")
        time.sleep(0.1)


def test_sigterm_resumes_then_sigkill_restarts_the_copy(pair, dbs, tmp_path):
    """Faults 3 and 2 after the copy: SIGTERM (as Kubernetes stops a pod) makes the
    step stop pgcopydb and fail, and a re-run resume; SIGKILL of the whole tree
    (OOM, a lost node) leaves a pgcopydb never seen to exit, after which 0.17
    cannot resume exactly: the re-run starts the copy over. Exact both times."""
    with Run(pair, dbs, tmp_path, "fault_follow") as r:
        r.start_caught_up(rate=150, threads=3)
        time.sleep(1.5)
        # Fault 3: SIGTERM to the step only, as the kubelet sends it to the container's pid 1.
        sid = r.pgcopydb_sid()
        t = time.monotonic()
        r.follow.send_signal(signal.SIGTERM)
        rc = r.wait_follow(timeout=60)
        t_term = time.monotonic() - t
        log1 = r.follow_log()
        assert rc != 0, log1[-3000:]
        errors = [ln for ln in log1.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and "stopped by a signal" in errors[0], errors
        assert not r.session_pids(sid), "pgcopydb outlived the follow step"
        time.sleep(1.5)  # the application keeps writing while follow is down
        r.start_follow()
        wait_log(r, RESUMED)
        assert RESTARTED not in r.follow_log()
        r.wait_caught_up()
        time.sleep(1.5)
        # Fault 2: SIGKILL of everything.
        r.kill_all()
        time.sleep(1.5)
        r.start_follow()
        wait_log(r, RESTARTED)
        log3 = r.follow_log()
        assert "killed without stopping" in log3 and RESUMED not in log3, log3[-3000:]
        report = r.cut_over()
        rows = sum(t.source_rows for t in report.tables)
        print(f"\nfaults 2+3: SIGTERM -> step exit {rc} in {t_term:.1f}s, resumed; SIGKILL -> the copy restarted; "
              f"{rows} rows exact, {r.writer.stats.ok} writes during the run, "
              f"copy restarts recorded: {len(state.load(r.s).copy_restarts)}")


def test_finish_before_catch_up_and_twice(pair, dbs, tmp_path):
    """Fault 5: finish while the initial copy still runs is allowed: follow applies
    up to that endpos and stops; a second finish keeps the first endpos."""
    with Run(pair, dbs, tmp_path, "fault_early_finish") as r:
        r.writer = workload.Writer(workload.app_uri(r.src_db), rate=100, threads=2).start()
        r.start_follow()
        deadline = time.monotonic() + 60
        from steps.engines.pgcopydb_follow.sentinel import started

        while not started(r.workdir):  # pgcopydb's sentinel and snapshot are registered: the copy starts
            assert time.monotonic() < deadline and r.follow.poll() is None, r.follow_log()[-3000:]
            time.sleep(0.02)
        r.writer.stop()  # the application stopped (no freeze SQL needed for this test)
        assert r.engine.lag() is None  # the copy runs
        endpos = r.set_end()
        assert lsn(endpos) > 0
        assert r.catalog("SELECT apply FROM sentinel")[0] in (0, "0")  # still copying when finish ran
        assert not r.engine.reached(endpos)  # the origin sits at the copy's snapshot, the copy runs
        assert r.set_end() == endpos
        r.wait_reached(endpos)
        assert r.wait_follow() == 0, r.follow_log()[-3000:]
        assert r.set_end() == endpos and r.engine.reached(endpos)
        # The sequence reset follow runs itself when pgcopydb fails on its way out after the endpos.
        with psycopg.connect(r.tgt_db, autocommit=True) as conn:
            conn.execute(sql.SQL("SELECT setval({}, 1)").format(sql.Literal(f"{workload.SCHEMA}.orders_id_seq")))
        with pytest.raises(StepError, match="sequences behind"):
            verify.verify(r.s)
        from steps.engines.pgcopydb_follow.follow import reset_sequences

        reset_sequences(r.s)
        report = verify.verify(r.s)
        assert report.ok
        assert table_digests(r.src_db) == table_digests(r.tgt_db)
        print(f"\nfault 5: finish during the copy; {sum(t.source_rows for t in report.tables)} rows exact")


def test_abort_after_approval_wait(pair, dbs, tmp_path):
    """Fault 6: the approval is refused (or times out): finish without freeze, then
    cleanup. The source stays writable, no slot, the target is left as it was."""
    with Run(pair, dbs, tmp_path, "fault_abort") as r:
        r.start_caught_up(rate=100, threads=2)
        end = r.set_end()
        r.wait_reached(end)
        assert r.wait_follow() == 0, r.follow_log()[-3000:]
        for _ in range(2):  # idempotent
            proc = subprocess.run([DB_UPGRADE, "step", "cleanup"], env=r.env, capture_output=True, text=True)
            assert proc.returncode == 0, proc.stderr
        refused_before = r.writer.stats.refused
        time.sleep(1)
        stats = r.writer.stop()
        assert stats.refused == refused_before == 0, stats.errors
        assert app_can_write(r.src_db)
        assert slot_count(r.src_db, r.slot) == 0
        with psycopg.connect(r.tgt_db) as conn:
            n = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(
                sql.Identifier(workload.SCHEMA, "customers"))).fetchone()[0]
            origins = conn.execute("SELECT count(*) FROM pg_replication_origin WHERE roname = %s",
                                   (r.slot,)).fetchone()[0]
            left = conn.execute("SELECT to_regnamespace('pgcopydb'), to_regclass('db_upgrade.heartbeat')").fetchone()
        assert n >= workload.SIZES["small"] and origins == 0 and left == (None, None), (n, origins, left)
        with psycopg.connect(r.src_db) as conn:
            assert conn.execute("SELECT to_regnamespace('pgcopydb'), to_regclass('db_upgrade.heartbeat')"
                                ).fetchone() == (None, None)
        print(f"\nfault 6: aborted; source writable ({stats.ok} writes, none refused), target kept ({n} customers)")


def test_failure_after_freeze_unfreezes(pair, dbs, tmp_path):
    """Fault 7: verify fails after the freeze; the failure path's unfreeze gives
    the application role its writes back."""
    with Run(pair, dbs, tmp_path, "fault_after_freeze") as r:
        r.start_follow()
        r.wait_caught_up()
        freeze.freeze(r.s)
        assert not app_can_write(r.src_db)
        r.wait_reached(r.set_end())
        assert r.wait_follow() == 0, r.follow_log()[-3000:]
        with psycopg.connect(r.tgt_db, autocommit=True) as conn:  # the target loses a row
            conn.execute(sql.SQL("DELETE FROM {} WHERE id = (SELECT max(id) FROM {})").format(
                sql.Identifier(workload.SCHEMA, "orders"), sql.Identifier(workload.SCHEMA, "orders")))
        proc = subprocess.run([DB_UPGRADE, "step", "verify"], env=r.env, capture_output=True, text=True)
        assert proc.returncode != 0
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and "orders" in errors[0], proc.stderr
        assert not app_can_write(r.src_db)
        proc = subprocess.run([DB_UPGRADE, "step", "unfreeze"], env=r.env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert app_can_write(r.src_db)
        print(f"\nfault 7: {errors[0]}; unfreeze restored writes")


def test_long_transaction_at_freeze(pair, dbs, tmp_path):
    """Fault 9: a transaction open since before the freeze. Left open, freeze times
    out with a clear message and restores writes; committed during the wait, freeze
    waits for it and its row reaches the target."""
    with Run(pair, dbs, tmp_path, "fault_long_txn", DB_UPGRADE_FREEZE_TIMEOUT=2) as r:
        audit = sql.Identifier(workload.SCHEMA, workload.AUDIT)
        r.start_follow()
        r.wait_caught_up()
        long = psycopg.connect(workload.app_uri(r.src_db))
        long.execute(sql.SQL("INSERT INTO {} (actor, detail) VALUES ('long', 'open across a freeze')").format(audit))
        t = time.monotonic()
        proc = subprocess.run([DB_UPGRADE, "step", "freeze"], env=r.env, capture_output=True, text=True)
        waited = time.monotonic() - t
        assert proc.returncode != 0
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and "transaction(s) open" in errors[0] and "writes were restored" in errors[0], \
            proc.stderr
        assert app_can_write(r.src_db)
        # Second attempt: the transaction commits while freeze waits for it.
        r.s = r.s.model_copy(update={"freeze_timeout": 30.0})
        committer = __import__("threading").Timer(1.5, long.commit)
        committer.start()
        t = time.monotonic()
        freeze.freeze(r.s)
        waited2 = time.monotonic() - t
        committer.join()
        long.close()
        assert waited2 >= 1.0
        assert not app_can_write(r.src_db)
        r.wait_reached(r.set_end())
        assert r.wait_follow() == 0, r.follow_log()[-3000:]
        verify.verify(r.s)
        with psycopg.connect(r.tgt_db) as conn:
            assert conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE actor = 'long'").format(audit)).fetchone()[0] == 1
        assert table_digests(r.src_db) == table_digests(r.tgt_db)
        print(f"\nfault 9: freeze timed out after {waited:.1f}s (writes restored); "
              f"second freeze waited {waited2:.1f}s for the commit; the row is on the target")


def test_endpos_loop_detector():
    """pgcopydb 0.17's endless restart after its apply reached the endpos (log
    lines as measured on an abort under writes) is recognised; a normal end is not."""
    from steps.engines.pgcopydb_follow.follow import EndposLoop

    stuck = """\
INFO   ld_replay.c:241           Replay reached end position 0/12DD6448 at 0/12DD6408
INFO   follow.c:646              Subprocesses for prefetch, transform, and catchup have now all exited
INFO   follow.c:218              Current sentinel replay_lsn is 0/12DD6408, endpos is 0/12DD6448
INFO   follow.c:418              Catching-up from existing on-disk files
INFO   follow.c:218              Current sentinel replay_lsn is 0/12DD6408, endpos is 0/12DD6448
INFO   follow.c:361              Restarting logical decoding follower in catchup mode""".splitlines()
    loop = EndposLoop()
    assert [loop.feed(ln) for ln in stuck].count(True) == 1 and loop.stuck and loop.endpos_text == "0/12DD6448"
    normal = """\
INFO   follow.c:209              Current sentinel replay_lsn is 0/EAE1E98, endpos has now been set to 0/EAE15F0
INFO   ld_replay.c:241           Replay reached end position 0/EAE15F0 at 0/EAE1E98
INFO   follow.c:218              Current sentinel replay_lsn is 0/EAE1E98, endpos is 0/EAE15F0
INFO   follow.c:399              Current endpos 0/EAE15F0 has been reached at 0/EAE1E98""".splitlines()
    loop = EndposLoop()
    assert not any(loop.feed(ln) for ln in normal) and not loop.stuck


def restart_follow_if_it_died(r: Run, what: str) -> str:
    """pgcopydb either rides out a server restart or exits; then the step is re-run."""
    try:
        rc = r.follow.wait(timeout=8)
    except subprocess.TimeoutExpired:
        return f"{what}: follow kept running"
    r._log.close()
    r.start_follow()
    wait_log(r, "follow: resuming the interrupted run")
    return f"{what}: follow exited {rc}, re-run resumed"


def test_server_restarts_during_follow(pair, dbs, tmp_path):
    """Fault 4: the source restarts during follow, then the target during apply."""
    with Run(pair, dbs, tmp_path, "fault_restarts") as r:
        notes = []
        r.start_caught_up(rate=100, threads=2)
        time.sleep(1)
        pair.source.restart()
        time.sleep(1)
        notes.append(restart_follow_if_it_died(r, "source restart"))
        r.wait_caught_up()
        time.sleep(1)
        # The apply is held up on the target (a lock) while the application
        # writes on and the source switches WAL segments, then the target
        # restarts: the apply stops segments behind the receiver, which is where
        # a resume must rewrite the SQL files it reads (measured before the fix:
        # the transactions of the skipped segments were lost, or a duplicate key).
        blocker = psycopg.connect(r.tgt_db)
        blocker.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(
            sql.Identifier(workload.SCHEMA, "orders")))
        for _ in range(3):
            time.sleep(0.5)
            with psycopg.connect(pair.source.uri(), autocommit=True) as conn:
                conn.execute("SELECT pg_switch_wal()")
        time.sleep(0.5)
        pair.target.restart()
        blocker.close()
        notes.append(restart_follow_if_it_died(r, "target restart"))
        rewrote = [ln for ln in r.follow_log().splitlines() if "rewrote" in ln]
        assert rewrote and "apply's resume position" in rewrote[0], r.follow_log()[-3000:]
        files = int(rewrote[0].split("rewrote ")[1].split()[0])
        assert files >= 2, rewrote  # the apply's segment and the ones written while the target was down
        report = r.cut_over()
        print(f"\nfault 4: {'; '.join(notes)}; {files} SQL files rewritten on resume; "
              f"{sum(t.source_rows for t in report.tables)} rows exact, "
              f"{r.writer.stats.ok} writes ({r.writer.stats.refused} failed during restarts/freeze)")


@pytest.fixture
def small_volume(tmp_path):
    with tmpfs_volume(tmp_path / "volume", "12m") as mnt:
        yield mnt


def test_work_volume_full(pair, dbs, tmp_path, small_volume):
    """Fault 8: the work volume fills up during follow: the step fails with a line
    saying so, cleanup with keep-slot keeps the slot; once there is room again a
    re-run repairs what ENOSPC left (a torn CDC line) and resumes; exact."""
    with Run(pair, dbs, tmp_path, "fault_disk_full") as r:
        r.workdir = small_volume / "work"
        r.env["DB_UPGRADE_DIR"] = str(r.workdir)
        r.s = r.s.model_copy(update={"dir": r.workdir})
        r.start_caught_up(rate=200, threads=3)
        filler = small_volume / "filler"
        free = os.statvfs(small_volume).f_bavail * os.statvfs(small_volume).f_frsize
        try:
            with open(filler, "wb") as f:  # leave ~64 kB
                f.write(b"\0" * max(0, free - 64 * 1024))
        except OSError as exc:  # pgcopydb wrote meanwhile: the volume is full already, as wanted
            assert exc.errno == errno.ENOSPC, exc
        rc = r.wait_follow(timeout=120)
        log1 = r.follow_log()
        assert rc != 0
        errors = [ln for ln in log1.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1, log1[-3000:]
        assert "work volume" in errors[0] and "No space left on device" in errors[0], errors
        keep = subprocess.run([DB_UPGRADE, "step", "cleanup"], env=dict(r.env, DB_UPGRADE_KEEP_SLOT="true"),
                              capture_output=True, text=True)
        assert keep.returncode == 0 and slot_count(r.src_db, r.slot) == 1, keep.stderr
        filler.unlink()  # the operator grows the volume
        r.start_follow()
        restarted = wait_resumed_or_restarted_for_a_lost_buffer(r)
        report = r.cut_over()
        print(f"\nfault 8: {errors[0][:200]}; after freeing space: "
              f"{'the copy restarted (pgcopydb had confirmed changes it lost)' if restarted else 'resumed'}, "
              f"{sum(t.source_rows for t in report.tables)} rows exact")


def test_replication_connection_lost_while_apply_behind(pair, dbs, tmp_path):
    """Fault 4, the walsender side: the source ends pgcopydb's replication
    connection (wal_sender_timeout, a restart, the network) while its apply is
    behind its receiver. pgcopydb 0.17 would reconnect in-process and stream
    again from the slot into a live apply that is past that point (measured in
    the 5 GB bench: "duplicate key" after a walsender timeout); follow stops it
    and resumes from the target's replication origin instead, or, when the
    origin was last moved by a transaction pgcopydb's pipelined apply left cut
    short (here it may be: the lock holds the apply up), starts the copy over
    (repair.origin_advanced_by_abort). Exact either way."""
    with Run(pair, dbs, tmp_path, "fault_reconnect") as r:
        r.start_caught_up(rate=150, threads=3)
        # Live replay (receiver streaming into the apply): in catch-up mode a held-up
        # apply makes pgcopydb stop its receiver, and there is no connection to lose.
        wait_log(r, "Restarting logical decoding follower in replay mode")
        time.sleep(1)
        blocker = psycopg.connect(r.tgt_db)  # the apply waits on this lock; the receiver runs on
        try:
            blocker.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(
                sql.Identifier(workload.SCHEMA, "orders")))
            time.sleep(2)
            deadline = time.monotonic() + 20
            with psycopg.connect(pair.source.uri(), autocommit=True) as conn:
                while not (ended := conn.execute(
                        "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
                        "WHERE slot_name = %s AND active_pid IS NOT NULL", (r.slot,)).fetchall()):
                    assert time.monotonic() < deadline, r.follow_log()[-3000:]
                    time.sleep(0.1)
            assert ended == [(True,)], ended
            time.sleep(0.5)
        finally:
            blocker.close()  # never leave the apply (or cleanup) waiting on it
        wait_log(r, "lost its replication connection")
        wait_log(r, "resuming after the lost replication connection")
        assert r.follow.poll() is None, r.follow_log()[-3000:]
        report = r.cut_over()
        log = r.follow_log()
        aborted = "by a rolled-back transaction" in log
        assert aborted == (RESTARTED in log), log[-3000:]
        assert aborted or "is the COMMIT of an applied transaction" in log, log[-3000:]
        print(f"\nfault 4b: walsender ended with the apply behind; follow stopped pgcopydb and "
              f"{'started the copy over (the origin was past a rolled-back transaction)' if aborted else 'resumed'}"
              f"{' (its apply session outlived it)' if 'outlived pgcopydb' in log else ''}; "
              f"{sum(t.source_rows for t in report.tables)} rows exact")
