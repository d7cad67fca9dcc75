"""The native engine (PostgreSQL logical replication, pgcopydb for the copy), the
one-step cutover and the fence, on real PostgreSQL 15 -> 17 under concurrent
application writes. Each test ends with an independent digest of every table
and no replication object left on either side.

With the apply inside the target server, the follow pod is only a watcher:
test_every_pod_killed_after_the_copy shows what survives when it is gone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from local import workload
from steps import cleanup, cutover, engines, finish, freeze, grant, state
from steps.errors import StepError
from steps.settings import load_settings
from tests.conftest import DB_UPGRADE, step_env, tmpfs_volume
from tests.digests import sequences_not_behind
from tests.digests import table_digests as digests

pytestmark = pytest.mark.slow

SIZE = 20_000  # customers: ~6 MB, a copy of a second or two


def leftovers(src: str, tgt: str) -> dict:
    with psycopg.connect(src) as a, psycopg.connect(tgt) as b:
        return {
            "slots": a.execute("SELECT count(*) FROM pg_replication_slots WHERE database = current_database()").fetchone()[0],
            "source publications": a.execute("SELECT count(*) FROM pg_publication").fetchone()[0],
            "subscriptions": b.execute("SELECT count(*) FROM pg_subscription WHERE subdbid = "
                                       "(SELECT oid FROM pg_database WHERE datname = current_database())").fetchone()[0],
            "target publications": b.execute("SELECT count(*) FROM pg_publication").fetchone()[0],
            "target db_upgrade": b.execute("SELECT count(*) FROM pg_namespace WHERE nspname = 'db_upgrade'").fetchone()[0],
        }


def can_login(uri: str) -> bool:
    try:
        psycopg.connect(uri, connect_timeout=5).close()
        return True
    except psycopg.OperationalError as exc:
        assert "not permitted to log in" in str(exc), exc
        return False


class Run:
    def __init__(self, pair, dbs, tmp_path: Path, **extra):
        self.src, self.tgt = dbs
        self.pair = pair
        workload.ensure_app_role(pair.target.uri())
        workload.ensure_app_role(self.src)
        with psycopg.connect(self.src, autocommit=True) as conn:  # a frozen earlier test must not leak
            conn.execute(sql.SQL("ALTER ROLE {} RESET default_transaction_read_only").format(
                sql.Identifier(workload.APP_ROLE)))
        workload.SIZES[f"n{SIZE}"] = SIZE
        workload.load_sample(self.src, f"n{SIZE}")
        readonly, unfreeze = workload.freeze_sql_files(tmp_path / "sql")
        settings = dict(DB_UPGRADE_READONLY_SQL=readonly, DB_UPGRADE_UNFREEZE_SQL=unfreeze,
                        DB_UPGRADE_LAG_THRESHOLD_BYTES=256 * 1024, DB_UPGRADE_POLL_INTERVAL=0.2,
                        DB_UPGRADE_CATCHUP_TIMEOUT=180, DB_UPGRADE_TABLE_JOBS=2, DB_UPGRADE_INDEX_JOBS=2,
                        DB_UPGRADE_FREEZE_TIMEOUT=20, DB_UPGRADE_ENGINE="native",
                        DB_UPGRADE_APP_ROLES=workload.APP_ROLE, DB_UPGRADE_SWITCH="none")
        self.env = step_env(self.src, self.tgt, tmp_path / "work", **{**settings, **extra})
        self.s = load_settings(**{k.removeprefix("DB_UPGRADE_").lower(): v for k, v in self.env.items()
                                  if k.startswith("DB_UPGRADE_")}, source_pguri=self.src, target_pguri=self.tgt)
        self.engine = engines.get(self.s)
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, str] = {}
        self.writer: workload.Writer | None = None
        state.begin(self.s)
        grant.grant_replication(self.s)

    def start(self, step: str) -> subprocess.Popen:
        proc = subprocess.Popen([DB_UPGRADE, "step", step], env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.procs[step] = proc
        return proc

    def wait(self, step: str, timeout: float = 120) -> int:
        out, _ = self.procs[step].communicate(timeout=timeout)
        self.logs[step] = self.logs.get(step, "") + out
        return self.procs[step].returncode

    def kill(self, step: str) -> None:
        """As a pod dies: the step and everything it started (pgcopydb runs in a session of its own)."""
        proc = self.procs[step]
        os.killpg(proc.pid, signal.SIGKILL)
        workdir = str(self.s.dir).encode()
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if workdir in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(int(pid), signal.SIGKILL)
            except OSError:
                continue
        self.wait(step)

    def writing(self, rate: int = 150, threads: int = 3) -> None:
        self.writer = workload.Writer(workload.app_uri(self.src), rate=rate, threads=threads).start()

    def wait_caught_up(self) -> None:
        from steps import catchup

        catchup.wait_caught_up(self.s)

    def close(self) -> None:
        for step, proc in self.procs.items():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                self.wait(step)
        if self.writer is not None:
            self.writer.stop()
        # Whatever happened: the application role can log in and write again.
        with psycopg.connect(self.pair.target.uri(), autocommit=True) as conn:
            conn.execute(sql.SQL("ALTER ROLE {} LOGIN").format(sql.Identifier(workload.APP_ROLE)))
        with psycopg.connect(self.src, autocommit=True) as conn:
            conn.execute(sql.SQL("ALTER ROLE {} RESET default_transaction_read_only").format(
                sql.Identifier(workload.APP_ROLE)))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        try:
            self.close()
        finally:
            if exc[0] is not None:
                for step, text in self.logs.items():
                    print(f"--- {step}\n{text[-4000:]}")


def test_cutover_under_writes_is_exact_fenced_and_leaves_nothing(pair, dbs, tmp_path):
    with Run(pair, dbs, tmp_path) as run:
        run.writing()
        run.start("follow")
        run.wait_caught_up()
        # The fence: the application's role cannot reach the target before the switch.
        assert not can_login(workload.app_uri(run.tgt))
        run.start("verify-prepare")
        time.sleep(3)  # writes flow through the subscription, not only during the copy
        result = cutover.cutover(run.s)
        assert run.wait("follow", 60) == 0, run.logs["follow"][-3000:]
        assert run.wait("verify-prepare", 60) == 0, run.logs["verify-prepare"][-3000:]
        stats = run.writer.stop()
        run.writer = None
        assert stats.refused > 0 and stats.ok > 300, stats
        assert digests(run.src) == digests(run.tgt)
        assert sequences_not_behind(run.src, run.tgt)
        assert result["verify"].ok
        st = state.load(run.s)
        assert st.switch_started_at and st.write_downtime_seconds == result["write_downtime_seconds"]
        print(f"write-downtime {result['write_downtime_seconds']:.2f}s: "
              + ", ".join(f"{k} {v:.3f}s" for k, v in result["timings"].items()))
        # After the switch the fence is lifted; the old database stays frozen.
        assert can_login(workload.app_uri(run.tgt))
        with pytest.raises(psycopg.Error):
            with psycopg.connect(workload.app_uri(run.src), autocommit=True) as app:
                app.execute(sql.SQL("INSERT INTO {}.customers (email) VALUES ('late@example.com')").format(
                    sql.Identifier(workload.SCHEMA)))
        cleanup.cleanup(run.s)
        cleanup.cleanup(run.s)  # twice: harmless
        assert leftovers(run.src, run.tgt) == {"slots": 0, "source publications": 0, "subscriptions": 0,
                                               "target publications": 0, "target db_upgrade": 0}


def test_every_pod_killed_after_the_copy(pair, dbs, tmp_path):
    """The apply runs in the target server: with the follow and verify pods gone,
    changes keep arriving, and a re-run of follow just watches."""
    with Run(pair, dbs, tmp_path) as run:
        run.writing(rate=200)
        run.start("follow")
        run.wait_caught_up()
        run.start("verify-prepare")
        time.sleep(1)
        run.kill("follow")
        run.kill("verify-prepare")
        ok_at_kill = run.writer.stats.ok
        time.sleep(4)
        assert run.writer.stats.ok > ok_at_kill + 100
        assert run.engine.lag() is not None and run.engine.lag() < 1024 * 1024  # still applying, no pod at all
        run.start("follow")
        run.start("verify-prepare")
        time.sleep(2)
        result = cutover.cutover(run.s)
        assert run.wait("follow", 60) == 0, run.logs["follow"][-3000:]
        assert "watching it" in run.logs["follow"]
        run.writer.stop()
        run.writer = None
        assert digests(run.src) == digests(run.tgt) and result["verify"].ok
        cleanup.cleanup(run.s)
        assert leftovers(run.src, run.tgt)["slots"] == 0


def test_killed_during_the_copy_starts_over_loudly(pair, dbs, tmp_path):
    with Run(pair, dbs, tmp_path, DB_UPGRADE_TABLE_JOBS=1) as run:
        run.writing(rate=100)
        run.start("follow")
        deadline = time.monotonic() + 60
        while not (state.load(run.s).follow_started_at and run.engine.copy_progress()):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        run.kill("follow")
        run.start("follow")
        run.wait_caught_up()
        assert state.load(run.s).copy_restarts, "the restart is recorded"
        end = finish.finish(run.s)  # an abort: no freeze
        assert run.wait("follow", 60) == 0
        assert "RESTARTING THE COPY FROM SCRATCH" in run.logs["follow"]
        assert run.engine.reached(end)
        run.writer.stop()
        run.writer = None
        # Quiet now: the subscription applies the last writes, then both sides are equal.
        end2 = state.load(run.s).end_position
        assert end2 == end  # finish keeps the first end
        time.sleep(1)
        with psycopg.connect(run.src, autocommit=True) as conn:  # a last barrier after the writer stopped
            conn.execute("INSERT INTO db_upgrade.barrier (id) VALUES ('quiet')")
        while not run.engine.reached("barrier:quiet"):
            time.sleep(0.05)
        assert digests(run.src) == digests(run.tgt)
        cleanup.cleanup(run.s)
        assert leftovers(run.src, run.tgt)["slots"] == 0


def test_abort_leaves_the_source_untouched(pair, dbs, tmp_path):
    with Run(pair, dbs, tmp_path) as run:
        run.writing(rate=100)
        run.start("follow")
        run.wait_caught_up()
        finish.finish(run.s)
        assert run.wait("follow", 60) == 0
        stats = run.writer.stop()
        run.writer = None
        assert stats.refused == 0, stats  # never frozen
        cleanup.cleanup(run.s)
        assert can_login(workload.app_uri(run.tgt))  # cleanup lifted the fence
        assert leftovers(run.src, run.tgt) == {"slots": 0, "source publications": 0, "subscriptions": 0,
                                               "target publications": 0, "target db_upgrade": 0}


def test_a_failed_verify_restores_writes_and_the_fence(pair, dbs, tmp_path):
    with Run(pair, dbs, tmp_path) as run:
        run.writing(rate=100)
        run.start("follow")
        run.wait_caught_up()
        run.writer.stop()
        run.writer = None
        with psycopg.connect(run.tgt, autocommit=True) as conn:  # a row the target lost
            conn.execute("SET session_replication_role = replica")
            conn.execute(sql.SQL("DELETE FROM {}.orders WHERE id = (SELECT min(id) FROM {}.orders)").format(
                sql.Identifier(workload.SCHEMA), sql.Identifier(workload.SCHEMA)))
        s = run.s.model_copy(update={"skip_verify_preparation": True})
        with pytest.raises(StepError, match="orders"):
            cutover.cutover(s)
        st = state.load(run.s)
        assert st.cutover_failed_at and not st.switch_started_at and st.unfrozen_at >= st.frozen_at
        with psycopg.connect(workload.app_uri(run.src), autocommit=True) as app:  # writes are back
            app.execute(sql.SQL("INSERT INTO {}.customers (email) VALUES ('after@example.com')").format(
                sql.Identifier(workload.SCHEMA)))
        assert not can_login(workload.app_uri(run.tgt))  # still fenced
        freeze.unfreeze_after_failure(run.s)  # the exit handler's backstop: harmless here
        assert run.wait("follow", 60) == 0  # the end position was set: follow let go
        cleanup.cleanup(run.s)


def test_a_table_created_after_the_copy_is_named_and_blocks_the_cutover(pair, dbs, tmp_path):
    with Run(pair, dbs, tmp_path) as run:
        run.start("follow")
        run.wait_caught_up()
        with psycopg.connect(run.src, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE TABLE {}.late (id int PRIMARY KEY)").format(sql.Identifier(workload.SCHEMA)))
        deadline = time.monotonic() + 30
        while not state.load(run.s).new_objects:
            assert time.monotonic() < deadline, "the new table was not detected"
            time.sleep(0.2)
        assert state.load(run.s).new_objects == ["table shop.late"]
        with pytest.raises(StepError, match="shop.late"):
            cutover.cutover(run.s)
        assert not state.load(run.s).frozen_at  # refused before anything was frozen
        finish.finish(run.s)
        assert run.wait("follow", 60) == 0
        assert "NOT REPLICATED" in run.logs["follow"]
        cleanup.cleanup(run.s)


def test_source_and_target_restarts_while_streaming(pair, dbs, tmp_path):
    with Run(pair, dbs, tmp_path) as run:
        run.writing(rate=100)
        run.start("follow")
        run.wait_caught_up()
        pair.target.restart()
        time.sleep(1)
        pair.source.restart()
        run.writer.stop()  # its connections died with the source
        run.writing(rate=100)
        time.sleep(3)
        run.writer.stop()
        run.writer = None
        end = finish.finish(run.s)
        assert run.wait("follow", 120) == 0, run.logs["follow"][-3000:]
        assert run.engine.reached(end)
        assert digests(run.src) == digests(run.tgt)
        cleanup.cleanup(run.s)
        assert leftovers(run.src, run.tgt)["slots"] == 0


def test_a_retried_cutover_never_reuses_the_first_attempts_end(pair, dbs, tmp_path):
    """What `argo retry` does after a failed cutover (with keep-slot-on-failure): the
    cutover runs again in the same run. Writes made between the attempts must reach
    the target: the retry sets an end of its own instead of the stale one."""
    with Run(pair, dbs, tmp_path, DB_UPGRADE_DRAIN_TIMEOUT=3) as run:
        run.writing(rate=100)
        run.start("follow")
        run.wait_caught_up()
        s = run.s.model_copy(update={"skip_verify_preparation": True, "drain_timeout": 3.0})
        with psycopg.connect(run.tgt, autocommit=True) as conn:  # a stopped stream: refused before any freeze
            conn.execute("ALTER SUBSCRIPTION db_upgrade DISABLE")
            with pytest.raises(StepError, match="is disabled; nothing was frozen"):
                cutover.cutover(s)
            assert not state.load(run.s).frozen_at
            conn.execute("ALTER SUBSCRIPTION db_upgrade ENABLE")
        lock = psycopg.connect(run.tgt)  # the apply stalls behind a lock: the drain cannot finish in time
        lock.execute(sql.SQL("LOCK TABLE {}.orders IN ACCESS EXCLUSIVE MODE").format(sql.Identifier(workload.SCHEMA)))
        try:
            with pytest.raises(StepError, match="did not reach the end position"):
                cutover.cutover(s)
        finally:
            lock.close()
        first = state.load(run.s)
        assert first.unfrozen_at >= first.frozen_at and not first.switch_started_at
        time.sleep(2)  # the application writes again on the source between the attempts
        result = cutover.cutover(s)
        second = state.load(run.s)
        assert second.end_position != first.end_position and second.end_position_set_at > first.frozen_at
        run.writer.stop()
        run.writer = None
        assert result["verify"].ok and digests(run.src) == digests(run.tgt)
        assert sequences_not_behind(run.src, run.tgt)
        assert run.wait("follow", 60) == 0
        cleanup.cleanup(run.s)
        assert leftovers(run.src, run.tgt)["slots"] == 0


def test_a_silent_follow_during_the_copy_stops_wait_caught_up(dbs):
    """An OOM-killed follow records no failure: its pulse stops, and wait-caught-up gives up
    instead of polling for hours while the slot holds WAL."""
    from steps import catchup

    src, tgt = dbs
    s = load_settings(source_pguri=src, target_pguri=tgt, poll_interval=0.1, catchup_timeout=30)
    state.record(s, follow_started_at=state.now() - 600, follow_alive_at=state.now() - 300)
    with pytest.raises(StepError, match="follow step has been silent for .* during the initial copy"):
        catchup.wait_caught_up(s)


def test_a_rehearsal_cutover_predicts_the_window_and_freezes_nothing(pair, dbs, tmp_path):
    with Run(pair, dbs, tmp_path, DB_UPGRADE_MODE="rehearsal", DB_UPGRADE_APP_ROLES="") as run:
        run.writing(rate=100)
        run.start("follow")
        run.wait_caught_up()
        run.start("verify-prepare")
        result = cutover.cutover(run.s)
        assert run.wait("follow", 60) == 0 and run.wait("verify-prepare", 60) == 0
        stats = run.writer.stop()
        run.writer = None
        assert stats.refused == 0, stats  # the source was never frozen
        st = state.load(run.s)
        assert not st.frozen_at and not st.switch_started_at and st.drained_at
        assert 0 < result["predicted_write_downtime_seconds"] == st.predicted_write_downtime_seconds < 30
        print(f"predicted write-downtime {result['predicted_write_downtime_seconds']:.2f}s")
        cleanup.cleanup(run.s)
        assert leftovers(run.src, run.tgt)["slots"] == 0


@pytest.fixture
def full_volume(tmp_path):
    """A work volume with (almost) no room: a tmpfs of 16 MB, filled."""
    with tmpfs_volume(tmp_path / "volume", "16m") as mnt:
        filler = mnt / "filler"
        try:
            with open(filler, "wb") as f:
                f.write(b"\0" * (16 * 1024 * 1024))
        except OSError:
            pass
        yield mnt, filler


def test_a_full_work_volume_during_the_copy_is_one_line_and_a_rerun_starts_over(pair, dbs, tmp_path, full_volume):
    """The native engine's copy writes only pgcopydb's schema dump to the volume: when that
    does not fit, follow fails with one line; with room again, the re-run starts the copy over."""
    mnt, filler = full_volume
    with Run(pair, dbs, tmp_path) as run:
        workdir = mnt / "work"
        run.env["DB_UPGRADE_DIR"] = str(workdir)
        run.s = run.s.model_copy(update={"dir": workdir})
        run.start("follow")
        assert run.wait("follow", 120) != 0
        errors = [ln for ln in run.logs["follow"].splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and ("full" in errors[0] or "No space left" in errors[0]), errors
        filler.unlink()
        run.writing(rate=100)
        run.start("follow")
        run.wait_caught_up()
        end = finish.finish(run.s)
        assert run.wait("follow", 60) == 0
        assert "RESTARTING THE COPY FROM SCRATCH" in run.logs["follow"]
        run.writer.stop()
        run.writer = None
        with psycopg.connect(run.src, autocommit=True) as conn:
            conn.execute("INSERT INTO db_upgrade.barrier (id) VALUES ('quiet')")
        while not run.engine.reached("barrier:quiet"):
            time.sleep(0.05)
        assert run.engine.reached(end) and digests(run.src) == digests(run.tgt)
        cleanup.cleanup(run.s)
