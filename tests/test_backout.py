"""The back-out window on real PostgreSQL 15 (old) and 17 (new): a native-engine
cutover that prepares the reverse stream inside its frozen window, the
application writing on the NEW database, then a rollback that brings every one
of those writes back to the old database, verified, and leaves nothing; a
rollback whose verify fails, which restores writes on the new database; and
end alone. Each check of the data uses a digest of its own, independent of
steps.verify.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import threading
import time
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo
from psycopg.types.json import Jsonb
from pydantic import SecretStr

from local import workload
from steps import backout, cleanup, cutover, fence, grant, late_writes, state
from steps.backout import statements as bq
from steps.errors import StepError
from steps.settings import load_settings
from tests.conftest import DB_UPGRADE, step_env
from tests.digests import table_digests as digests

pytestmark = pytest.mark.slow

SIZE = 2_000  # customers (orders 4x, events 8x): a copy well under a second
S = sql.Identifier(workload.SCHEMA)


def sequences(uri: str) -> dict[str, int]:
    with psycopg.connect(uri) as conn:
        return dict(conn.execute("SELECT sequencename, coalesce(last_value, 0) FROM pg_sequences "
                                 "WHERE schemaname = %s", (workload.SCHEMA,)).fetchall())


def ours_left(src: str, tgt: str, name: str) -> dict:
    """Everything of the back-out (and of the rollback's verify tracking), by name, on both sides."""
    barrier = "SELECT count(*) FROM pg_class WHERE oid = to_regclass('db_upgrade.backout_barrier')"
    like = name.replace("_", "\\_") + "%"
    with psycopg.connect(src) as a, psycopg.connect(tgt) as b:
        return {
            "old subscription": a.execute("SELECT count(*) FROM pg_subscription WHERE subname LIKE %s",
                                          (like,)).fetchone()[0],
            "old barrier": a.execute(barrier).fetchone()[0],
            "old triggers": a.execute("SELECT count(*) FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
                                      "JOIN pg_namespace n ON n.oid = c.relnamespace "
                                      "WHERE n.nspname = %s AND NOT t.tgisinternal", (workload.SCHEMA,)).fetchone()[0],
            "old db_upgrade tables": a.execute(
                "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = "
                "'db_upgrade' AND c.relkind = 'r' AND c.relname NOT IN ('run_state', 'barrier')").fetchone()[0],
            "new slot": b.execute("SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE %s",
                                  (like,)).fetchone()[0],
            "new publication": b.execute("SELECT count(*) FROM pg_publication WHERE pubname LIKE %s",
                                         (like,)).fetchone()[0],
            "new barrier": b.execute(barrier).fetchone()[0],
            "new rollback record": b.execute(
                "SELECT count(*) FROM pg_class WHERE oid = to_regclass('db_upgrade.run_state')").fetchone()[0]
            and b.execute("SELECT count(*) FROM db_upgrade.run_state WHERE run_id LIKE '%-rollback'").fetchone()[0],
        }


NOTHING = {"old subscription": 0, "old barrier": 0, "old triggers": 0, "old db_upgrade tables": 0, "new slot": 0,
           "new publication": 0, "new barrier": 0, "new rollback record": 0}


def app_can_write(uri: str) -> bool:
    try:
        with psycopg.connect(workload.app_uri(uri), autocommit=True, connect_timeout=5) as conn:
            conn.execute(sql.SQL("INSERT INTO {}.customers (email) VALUES (%s)").format(S),
                         (f"probe-{secrets.token_hex(4)}@example.com",))
        return True
    except psycopg.Error:
        return False


def reset_app_role(pair) -> None:
    """A frozen or fenced role from an earlier test must not leak (roles are per server)."""
    for uri in (pair.source.uri(), pair.target.uri()):
        workload.ensure_app_role(uri)
        with psycopg.connect(uri, autocommit=True) as conn:
            role = sql.Identifier(workload.APP_ROLE)
            conn.execute(sql.SQL("ALTER ROLE {} LOGIN").format(role))
            conn.execute(sql.SQL("ALTER ROLE {} RESET default_transaction_read_only").format(role))


AWKWARD = ["null", "NULL", "it's'", "back\\slash\\\\", "tab\there", "ünïcödé 🐘", "", " trailing ", "\\N"]


def awkward_writes(uri: str) -> int:
    """Production-like changes as the application, on the new database: a TOASTed jsonb,
    an update that leaves it unchanged (pgoutput sends it as 'unchanged TOAST'), awkward
    text, full-precision numerics, bytea with backslashes, deletes. Returns the rows changed."""
    n = 0
    with psycopg.connect(workload.app_uri(uri), autocommit=True) as conn:
        big = Jsonb({"blob": "".join(secrets.token_hex(16) for _ in range(4000)), "q": "it's' \\ null"})
        for i, text in enumerate(AWKWARD):
            cid = conn.execute(sql.SQL("INSERT INTO {}.customers (email, profile) VALUES (%s, %s) RETURNING id")
                               .format(S), (f"{text}-{i}@x", big if i % 3 == 0 else Jsonb({"t": text}))).fetchone()[0]
            conn.execute(sql.SQL("UPDATE {}.customers SET email = %s WHERE id = %s").format(S), (f"u{text}{i}", cid))
            conn.execute(sql.SQL("INSERT INTO {}.orders (customer_id, amount, status, receipt) VALUES "
                                 "(%s, %s, %s, %s)").format(S),
                         (cid, "9999999999.9999" if i % 2 else "-0.0001", text, b"\\x00\\" + text.encode()))
            n += 3
        n += conn.execute(sql.SQL("UPDATE {}.orders SET status = %s WHERE id IN (SELECT id FROM {}.orders "
                                  "ORDER BY id LIMIT 5)").format(S, S), ("it's' \\ null",)).rowcount
        n += conn.execute(sql.SQL("DELETE FROM {}.orders WHERE id IN (SELECT id FROM {}.orders ORDER BY id DESC "
                                  "OFFSET 20 LIMIT 3)").format(S, S)).rowcount
        conn.execute(sql.SQL("INSERT INTO {}.events (at, kind, payload) VALUES (now(), %s, %s)").format(S),
                     ("ünïcödé", Jsonb({"n": "9999999999.99999999999999", "s": "null"})))
        n += 1
    return n


class Upgrade:
    """A native-engine upgrade up to a cutover, with the back-out window opened the way
    the cutover opens it: prepare() right before the fence lifts, start() after."""

    def __init__(self, pair, dbs, tmp_path: Path, monkeypatch, **extra):
        self.src, self.tgt = dbs
        self.pair = pair
        reset_app_role(pair)
        workload.SIZES[f"n{SIZE}"] = SIZE
        workload.load_sample(self.src, f"n{SIZE}")
        readonly, unfreeze = workload.freeze_sql_files(tmp_path / "sql")
        self.name = f"bo{secrets.token_hex(3)}"
        self.env = step_env(self.src, self.tgt, tmp_path / "work", DB_UPGRADE_READONLY_SQL=readonly,
                            DB_UPGRADE_UNFREEZE_SQL=unfreeze, DB_UPGRADE_LAG_THRESHOLD_BYTES=256 * 1024,
                            DB_UPGRADE_POLL_INTERVAL=0.2, DB_UPGRADE_CATCHUP_TIMEOUT=120,
                            DB_UPGRADE_TABLE_JOBS=2, DB_UPGRADE_INDEX_JOBS=2, DB_UPGRADE_FREEZE_TIMEOUT=20,
                            DB_UPGRADE_ENGINE="native", DB_UPGRADE_APP_ROLES=workload.APP_ROLE,
                            DB_UPGRADE_SWITCH="none", DB_UPGRADE_SLOT_NAME=self.name,
                            DB_UPGRADE_SKIP_VERIFY_PREPARATION="true", DB_UPGRADE_SETTLE_TIMEOUT=5,
                            DB_UPGRADE_BACKOUT="true", DB_UPGRADE_BACKOUT_WINDOW_SECONDS=3600, **extra)
        monkeypatch.setenv("DB_UPGRADE_SWITCH", "none")  # the switch reads its own variables
        self.s = load_settings(**{k.removeprefix("DB_UPGRADE_").lower(): v for k, v in self.env.items()
                                  if k.startswith("DB_UPGRADE_")}, source_pguri=self.src, target_pguri=self.tgt)
        self.backout_name = backout.names(self.s)
        self.follow: subprocess.Popen | None = None
        self.writer: workload.Writer | None = None
        self.prepare_seconds: list[float] = []
        # The cutover's wiring point for prepare(): after verify, right before the fence
        # lifts (prepare() keeps a second call in the same window, if the cutover makes it).
        lift = fence.lift

        def prepare_then_lift(s):
            self.prepare_seconds.append(backout.prepare(s))
            return lift(s)

        monkeypatch.setattr(fence, "lift", prepare_then_lift)
        monkeypatch.setattr(late_writes, "WATCH", 0.5)  # the cutover's late-writes watch, shortened
        state.begin(self.s)
        grant.grant_replication(self.s)

    def cut_over(self, through: str | None = None) -> dict:
        """Through PgBouncer (`through`: the application's URI there) the switch moves the
        writer; otherwise the test does, as an application restarted onto the new database."""
        self.writer = workload.Writer(through or workload.app_uri(self.src), rate=150, threads=3,
                                      pooled=through is not None).start()
        self.follow = subprocess.Popen([DB_UPGRADE, "step", "follow"], env=self.env, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True, start_new_session=True)
        from steps import catchup

        catchup.wait_caught_up(self.s)
        time.sleep(0.5)  # writes flow through the forward subscription
        result = cutover.cutover(self.s)
        self.ok_at_switch = self.writer.stats.ok  # every commit from here on is on the new database
        if through is None:
            self.writer.switch_to(workload.app_uri(self.tgt))  # the application restarts onto the new database
        out, _ = self.follow.communicate(timeout=60)
        assert self.follow.returncode == 0, out[-3000:]
        backout.start(self.s)
        return result

    def close(self) -> None:
        if self.follow is not None and self.follow.poll() is None:
            os.killpg(self.follow.pid, signal.SIGKILL)
            self.follow.wait()
        if self.writer is not None:
            self.writer.stop()
        try:
            backout.end(self.s)
        finally:
            reset_app_role(self.pair)


@pytest.fixture
def upgrade(pair, dbs, tmp_path, monkeypatch):
    u = Upgrade(pair, dbs, tmp_path, monkeypatch)
    yield u
    u.close()


def test_rollback_brings_every_write_back_verified_and_leaves_nothing(upgrade):
    u = upgrade
    result = u.cut_over()
    st = state.load(u.s)
    assert u.prepare_seconds and st.backout_prepare_seconds > 0
    assert st.backout_prepared_at < st.switch_started_at  # inside the frozen window, before the fence lifted
    assert st.backout_deadline_at == pytest.approx(st.backout_started_at + 3600, abs=1)
    # The forward stream is gone before the reverse one runs (no loop, no WAL kept on the old server).
    with psycopg.connect(u.src) as conn:
        assert conn.execute("SELECT count(*) FROM pg_replication_slots WHERE database = current_database()"
                            ).fetchone()[0] == 0
    before = u.writer.stats.ok
    # The rollback's verify preparation runs beside the window, as its step's pod does.
    preparing = threading.Thread(target=backout.verify_prepare, args=(u.s,), daemon=True)
    t0 = time.monotonic()
    preparing.start()
    changed = awkward_writes(u.tgt)
    while not state.load(backout._reversed(u.s)).verify_prepared_at:
        assert preparing.is_alive() and time.monotonic() < t0 + 60, "the rollback's verify preparation failed"
        time.sleep(0.2)
    prepared_in = time.monotonic() - t0
    time.sleep(1)  # the application keeps writing on the new database, rounds re-check it
    assert u.writer.stats.ok - before > 100, u.writer.stats
    status = backout.status(u.s)
    assert status.phase == "open" and status.applying and 3500 < status.time_left_seconds <= 3600, status

    rolled = backout.rollback(u.s)

    assert rolled["status"] == "rolled back" and rolled["verification"].startswith("verified"), rolled
    assert "changed rows by key" in rolled["verification"], rolled  # prepared: only what changed, in the window
    preparing.join(10)
    assert not preparing.is_alive()  # it stopped once the rollback began
    # Both sides frozen/fenced or idle now: nothing writes while we compare.
    new, old = digests(u.tgt), digests(u.src)
    assert old == new
    assert any(n[0] > SIZE for n in old.values())
    old_seq, new_seq = sequences(u.src), sequences(u.tgt)
    assert old_seq and all(old_seq[k] >= v for k, v in new_seq.items()), (old_seq, new_seq)
    # Every row changed on the new database after the cutover is counted, and the count is not inflated:
    # each of the writer's transactions changes at most one row; the forward apply worker may flush the
    # counters of its last rows (up to a second of the writer's 150/s) after prepare() read them.
    on_new = u.writer.stats.ok - u.ok_at_switch
    print(f"\nwrites_after_cutover {rolled['writes_after_cutover']}: ours {changed}, writer commits on new {on_new}")
    assert changed <= rolled["writes_after_cutover"] <= changed + on_new + 150, rolled
    st = state.load(u.s)
    assert st.rolled_back_at and st.rollback_switch_started_at and st.backout_ended_at
    assert st.rollback_write_downtime_seconds == rolled["write_downtime_seconds"] > 0
    print(f"\nbackout prepare {st.backout_prepare_seconds * 1000:.0f} ms inside the cutover's "
          f"{result['write_downtime_seconds']:.2f}s window; rollback's verify prepared in {prepared_in:.1f}s; "
          f"rollback write-downtime "
          f"{rolled['write_downtime_seconds']:.2f}s: " + ", ".join(f"{k} {v:.3f}s" for k, v in rolled["timings"].items())
          + f"; {rolled['writes_after_cutover']} row changes carried back")
    # The new database refuses the application (frozen, fenced); the old one takes its writes again.
    assert not app_can_write(u.tgt)
    n_before = digests(u.src)["customers"][0]
    u.writer.switch_to(workload.app_uri(u.src))
    deadline = time.monotonic() + 10
    while digests(u.src)["customers"][0] == n_before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert digests(u.src)["customers"][0] > n_before
    assert ours_left(u.src, u.tgt, u.backout_name) == NOTHING
    assert backout.status(u.s).phase == "rolled back"
    assert backout.rollback(u.s)["status"] == "rolled back"  # a second call: nothing more
    u.writer.stop()
    u.writer = None
    cleanup.cleanup(u.s)
    assert ours_left(u.src, u.tgt, u.backout_name) == NOTHING


def test_rollback_whose_verify_fails_restores_writes_on_the_new_database(upgrade):
    u = upgrade
    u.cut_over()
    time.sleep(1)
    # Someone changes the old database behind the reverse stream (a superuser, past the freeze).
    with psycopg.connect(u.src, autocommit=True) as conn:
        conn.execute(sql.SQL("UPDATE {}.customers SET profile = '{{\"tampered\": true}}' WHERE id = 7").format(S))
    with pytest.raises(StepError, match="verify") as failed:
        backout.rollback(u.s)
    assert "customers" in str(failed.value)
    st = state.load(u.s)
    assert st.rollback_failed_at and st.rollback_unfrozen_at >= st.rollback_frozen_at
    assert st.rollback_switch_started_at is None and st.rolled_back_at is None
    # Writes go on on the new database; the old one stays frozen; the window stays open.
    assert app_can_write(u.tgt)
    assert not app_can_write(u.src)
    ok = u.writer.stats.ok
    time.sleep(1)
    assert u.writer.stats.ok > ok
    assert backout.status(u.s).phase == "open"
    backout.end(u.s)
    backout.end(u.s)  # idempotent
    assert ours_left(u.src, u.tgt, u.backout_name) == NOTHING
    assert backout.status(u.s).phase == "ended"
    with pytest.raises(StepError, match="has ended"):
        backout.rollback(u.s)
    assert app_can_write(u.tgt)


def test_end_alone_leaves_nothing_and_status_reports_lag_and_time_left(pair, dbs, tmp_path, monkeypatch):
    """No forward copy here (both sides loaded alike): prepare, start, writes on the new
    database reach the old one; end, twice, leaves nothing on either side."""
    src, tgt = dbs
    reset_app_role(pair)
    workload.load_sample(src, "tiny")
    workload.load_sample(tgt, "tiny")
    monkeypatch.setenv("DB_UPGRADE_SWITCH", "none")
    s = load_settings(source_pguri=src, target_pguri=tgt, slot_name=f"bo{secrets.token_hex(3)}",
                      backout_window_seconds=600, engine="native")
    name = backout.names(s)
    state.begin(s)
    assert backout.check(s) == []
    bad = s.model_copy(update={"backout_pguri": SecretStr(make_conninfo(tgt, port=1, password="s3cret-x"))})
    problems = backout.check(bad)
    assert len(problems) == 1 and "cannot connect to the new one" in problems[0] and "s3cret-x" not in problems[0]
    # A subscription that cannot reach the new database: no window, nothing left, no password anywhere.
    backout.prepare(s)
    with pytest.raises(StepError, match="creating the subscription on the old database failed") as failed:
        backout.start(bad)
    assert "s3cret-x" not in str(failed.value)
    assert ours_left(src, tgt, name) == NOTHING and state.load(s).backout_ended_at
    assert "s3cret-x" not in pair.source.logfile.read_text(errors="replace")
    assert backout.prepare(s) > 0
    backout.start(s)
    with psycopg.connect(tgt, autocommit=True) as conn:
        conn.execute(sql.SQL("INSERT INTO {}.customers (email) VALUES ('after-cutover@x')").format(S))
    deadline = time.monotonic() + 20
    with psycopg.connect(src, autocommit=True) as conn:
        while not conn.execute(sql.SQL("SELECT 1 FROM {}.customers WHERE email = 'after-cutover@x'").format(S)
                               ).fetchone():
            assert time.monotonic() < deadline, "the reverse stream did not carry the write"
            time.sleep(0.1)
    st = backout.status(s)
    assert st.phase == "open" and st.lag_bytes is not None and st.retained_bytes is not None
    assert 500 < st.time_left_seconds <= 600 and any("left" in line for line in st.lines())
    backout.end(s)
    backout.end(s)
    assert ours_left(src, tgt, name) == NOTHING
    with psycopg.connect(tgt) as conn:  # the schema prepare() created on the new side went too
        assert conn.execute("SELECT count(*) FROM pg_namespace WHERE nspname = 'db_upgrade'").fetchone()[0] == 0
    assert backout.status(s).phase == "ended"
    with psycopg.connect(src) as conn:
        assert conn.execute("SELECT count(*) FROM pg_class WHERE oid = to_regclass(%s)",
                            (f"db_upgrade.{bq.BARRIER}",)).fetchone()[0] == 0


def test_rollback_through_pgbouncer_is_a_stall_not_an_error(upgrade, monkeypatch):
    """The cutover and the rollback both through PgBouncer: the application keeps one
    address, sees no failed transaction, and ends on the old database with every write
    it made on the new one."""
    from local.pgbouncer import PgBouncer
    from steps.switch import include
    from steps.switch.settings import TargetEntry

    u = upgrade
    bouncer = PgBouncer(databases={"app-db": TargetEntry.from_uri(u.src)},
                        users={workload.APP_ROLE: workload.APP_PASSWORD}).start()
    try:
        for k, v in bouncer.switch_env("app-db", TargetEntry.from_uri(u.tgt)).items():
            monkeypatch.setenv(k, v)
        through = bouncer.uri("app-db", workload.APP_ROLE, workload.APP_PASSWORD)
        u.cut_over(through=through)
        assert include.current(bouncer.include_file.read_text(), "app-db")["dbname"] == \
            TargetEntry.from_uri(u.tgt).dbname
        with psycopg.connect(through, autocommit=True, prepare_threshold=None) as conn:
            for i in range(20):
                conn.execute(sql.SQL("INSERT INTO {}.customers (email, profile) VALUES (%s, %s)").format(S),
                             (f"via-pgbouncer-{i}@x", Jsonb({"i": i, "s": "it's' \\ null"})))
        time.sleep(1)
        rolled = backout.rollback(u.s)
        new_rows = digests(u.tgt)
        ok = u.writer.stats.ok
        deadline = time.monotonic() + 10
        while u.writer.stats.ok < ok + 50:
            assert time.monotonic() < deadline, u.writer.stats
            time.sleep(0.05)
        stats = u.writer.stop()
        u.writer = None
        entry = include.current(bouncer.include_file.read_text(), "app-db")
    finally:
        bouncer.cleanup()
    assert rolled["status"] == "rolled back", rolled
    assert stats.failed_transactions == 0, stats.errors
    # PgBouncer points at the old database again, as its entry was before the cutover.
    assert entry["dbname"] == TargetEntry.from_uri(u.src).dbname
    assert digests(u.tgt) == new_rows  # frozen since the rollback: the writer went on on the old one
    with psycopg.connect(u.src) as conn:
        assert conn.execute(sql.SQL("SELECT count(*) FROM {}.customers WHERE email LIKE %s").format(S),
                            ("via-pgbouncer-%",)).fetchone()[0] == 20
    print(f"\npgbouncer: rollback write-downtime {rolled['write_downtime_seconds']:.2f}s, max write stall "
          f"{stats.max_write_stall_seconds:.2f}s over the cutover and the rollback, {stats.ok} transactions, "
          f"{stats.failed_transactions} failed")
    assert ours_left(u.src, u.tgt, u.backout_name) == NOTHING
