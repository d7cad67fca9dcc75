"""The pgcopydb-follow engine's methods (steps/engines/base.py) against real
PostgreSQL 15 -> 17 and pgcopydb 0.17: what the pods without the work volume
(wait-caught-up, the cutover, cleanup) can ask it, from the databases alone.
Plus pgcopydb's catalog read on a synthetic one (fast)."""

import sqlite3
import subprocess
import sys
import time

import psycopg
import pytest

from local import workload
from steps import freeze, state, verify
from steps.engines import get
from steps.engines.pgcopydb_follow import PgcopydbFollow, catalog
from steps.errors import StepError
from steps.pg import lsn, origin_progress
from tests.test_faults import FOLLOW_STEP, Run, slot_count, table_digests

# The engine's follow() as the pod's dispatcher runs it, without the dispatcher's
# own "already done" shortcut (steps/follow.py), which predates stale ends.
ENGINE_FOLLOW = [sys.executable, "-c", "from steps.cli import run_step; from steps.engines import get; "
                 "run_step(lambda s: get(s).follow())"]


# -- pgcopydb's catalog, read-only (pure: a synthetic SQLite file) -------------

def fake_catalog(workdir, sizes: dict[int, int], parts: dict[int, int], done: list[tuple[int, int]]):
    """The tables of pgcopydb 0.17's catalog that copy_bytes reads, as 0.17 creates them."""
    (workdir / "schema").mkdir(parents=True)
    conn = sqlite3.connect(workdir / "schema" / "source.db")
    conn.executescript("""
        CREATE TABLE s_table(oid integer primary key, datname text, qname text, nspname text, relname text,
            amname text, restore_list_name text, relpages integer, reltuples integer, exclude_data boolean,
            part_key text);
        CREATE TABLE s_table_size(oid integer primary key references s_table(oid), bytes integer, bytes_pretty text);
        CREATE TABLE s_table_part(oid integer references s_table(oid), partnum integer, partcount integer,
            min integer, max integer, count integer, primary key(oid, partnum));
        CREATE TABLE s_index(oid integer primary key, qname text, nspname text, relname text, restore_list_name text,
            tableoid references s_table(oid), isprimary bool, isunique bool, columns text, sql text);
        CREATE TABLE summary(pid integer, tableoid integer references s_table(oid), partnum integer,
            indexoid integer references s_index(oid), conoid integer, start_time_epoch integer,
            done_time_epoch integer, duration integer, bytes integer, command text, unique(tableoid, partnum));
    """)
    for oid, size in sizes.items():
        conn.execute("INSERT INTO s_table (oid, nspname, relname) VALUES (?, 'shop', ?)", (oid, f"t{oid}"))
        conn.execute("INSERT INTO s_table_size VALUES (?, ?, '')", (oid, size))
    for oid, n in parts.items():
        for part in range(n):
            conn.execute("INSERT INTO s_table_part (oid, partnum, partcount) VALUES (?, ?, ?)", (oid, part, n))
    for oid, part in done:
        conn.execute("INSERT INTO summary (tableoid, partnum, start_time_epoch, done_time_epoch) VALUES (?, ?, 1, 2)",
                     (oid, part))
    # An index build and an unfinished COPY: neither counts as copied bytes.
    conn.execute("INSERT INTO summary (indexoid, start_time_epoch, done_time_epoch) VALUES (99, 1, 2)")
    conn.execute("INSERT INTO summary (tableoid, partnum, start_time_epoch) VALUES (3, 0, 1)")
    conn.commit()
    conn.close()


def test_copy_bytes_counts_done_tables_and_parts_of_split_ones(tmp_path):
    fake_catalog(tmp_path, sizes={1: 1000, 2: 4000, 3: 500}, parts={2: 4}, done=[(1, 0), (2, 0), (2, 2)])
    assert catalog.copy_bytes(tmp_path) == (1000 + 2000, 5500)
    assert catalog.knows_table(tmp_path, "shop", "t2") and not catalog.knows_table(tmp_path, "shop", "t9")


def test_copy_bytes_none_without_a_catalog_or_sizes(tmp_path):
    assert catalog.copy_bytes(tmp_path) is None
    fake_catalog(tmp_path / "empty", sizes={}, parts={}, done=[])
    assert catalog.copy_bytes(tmp_path / "empty") is None


def test_durable_position_is_the_highest_whole_message_in_the_latest_files(tmp_path):
    """What repair.confirmed_beyond_volume compares with the slot: the maximum
    (not the last) LSN of pgcopydb 0.17's envelope lines, in the file being
    written or, if that holds nothing yet, the one before; inner JSON ignored."""
    from steps.engines.pgcopydb_follow.repair import durable_position

    cdc = tmp_path / "cdc"
    cdc.mkdir()
    assert durable_position(tmp_path) == 0
    (cdc / "000000010000000000000002.json").write_text(
        '{"action":"B","xid":"901","lsn":"0/2FFFF00","timestamp":"t","message":{"xid":901}}\n'
        '{"action":"C","xid":"901","lsn":"0/2FFFF80","timestamp":"t","message":{"xid":901,"lsn":"9/0"}}\n')
    partial = cdc / "000000010000000000000003.json.partial"
    partial.write_text("")
    (cdc / "latest").symlink_to(partial)
    assert durable_position(tmp_path) == 0x2FFFF80
    partial.write_text(
        '{"action":"C","xid":"902","lsn":"0/3000400","timestamp":"t","message":{"xid":902}}\n'
        '{"action":"I","xid":"903","lsn":"0/30001A0","timestamp":"t","message":{"lsn":"F/FFFFFFFF"}}\n'
        '{"action":"K","lsn":"0/3000300","timestamp":"t"}\n')
    assert durable_position(tmp_path) == 0x3000400  # the COMMIT, above the later lines
    (cdc / "900.json").write_text('{"xid":900,"commit_lsn":"A/0"}')  # transaction metadata: not a CDC file
    assert durable_position(tmp_path) == 0x3000400


def test_the_origin_is_trusted_only_at_the_last_commit_carrying_it():
    """repair.trusted_origin on pg_walinspect's Transaction records (PostgreSQL 17's
    xactdesc format): an ABORT that moved the origin to its own setup is caught;
    one that carried the previous, committed setup is harmless; other origins,
    and no COMMIT at all, do not vouch."""
    from steps.engines.pgcopydb_follow.repair import trusted_origin

    commit = ("COMMIT", "2026-12-01 16:10:36.9 UTC; origin: node 1, lsn 0/2B75470, at 2026-12-01 16:10:36.9 UTC")
    stale_abort = ("ABORT", "2026-12-01 16:10:38.3 UTC; origin: node 1, lsn 0/2B75470, at 2026-12-01 16:10:36.9 UTC")
    cut_abort = ("ABORT", "2026-12-01 16:10:38.3 UTC; origin: node 1, lsn 0/2B755B0, at 2026-12-01 16:10:36.9 UTC")
    other = ("COMMIT", "2026-12-01 16:10:37.0 UTC; origin: node 2, lsn 0/2B755B0, at 2026-12-01 16:10:37.0 UTC")
    plain = ("COMMIT", "2026-12-01 16:10:37.1 UTC")
    assert trusted_origin(1, "0/2B75470", [commit])
    assert trusted_origin(1, "0/2B75470", [commit, plain, stale_abort])
    assert not trusted_origin(1, "0/2B755B0", [commit, cut_abort])
    assert not trusted_origin(1, "0/2B755B0", [commit, other, cut_abort])
    assert not trusted_origin(1, "0/2B75470", [plain, stale_abort])


def test_an_end_is_stale_once_writes_were_restored_after_it():
    from steps.engines.pgcopydb_follow.follow import stale_end

    assert not stale_end(state.RunState())
    assert not stale_end(state.RunState(end_position="0/10", end_position_set_at=10.0))  # abort: never frozen
    assert not stale_end(state.RunState(end_position="0/10", end_position_set_at=10.0, frozen_at=9.0,
                                        unfrozen_at=5.0))  # unfrozen before an earlier freeze
    assert stale_end(state.RunState(end_position="0/10", end_position_set_at=10.0, frozen_at=9.0, unfrozen_at=11.0))


def test_the_heartbeat_pads_only_while_frozen():
    from steps.engines.pgcopydb_follow.drain import frozen

    assert not frozen(state.RunState())
    assert frozen(state.RunState(frozen_at=10.0)) and frozen(state.RunState(frozen_at=10.0, unfrozen_at=5.0))
    assert not frozen(state.RunState(frozen_at=10.0, unfrozen_at=12.0))


def test_get_picks_the_engine():
    from steps.settings import load_settings

    e = get(load_settings(engine="pgcopydb-follow"))
    assert isinstance(e, PgcopydbFollow) and e.name == "pgcopydb-follow" and not e.apply_in_target


# -- the engine on real servers -------------------------------------------------

def objects_left(uri: str, slot: str) -> dict:
    with psycopg.connect(uri) as conn:
        return dict(zip(("slots", "origins", "pgcopydb", "heartbeat", "run_state"), conn.execute(
            "SELECT (SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s),"
            "       (SELECT count(*) FROM pg_replication_origin WHERE roname = %s),"
            "       to_regnamespace('pgcopydb') IS NOT NULL, to_regclass('db_upgrade.heartbeat') IS NOT NULL,"
            "       to_regclass('db_upgrade.run_state') IS NOT NULL", (slot, slot)).fetchone()))


@pytest.mark.slow
def test_engine_methods_from_the_databases_alone(pair, dbs, tmp_path, monkeypatch):
    """lag, copy progress, the end, reached and cleanup through an engine with no
    work dir (as wait-caught-up, the cutover and cleanup run), follow in its step."""
    with Run(pair, dbs, tmp_path, "engine_methods", size=30_000) as r:
        volumeless = PgcopydbFollow(r.s.model_copy(update={"dir": None}))
        r.writer = workload.Writer(workload.app_uri(r.src_db), rate=100, threads=2).start()
        r.start_follow()
        seen_progress, lags_during_copy = set(), []
        deadline = time.monotonic() + 120
        while True:  # during the copy: no lag; progress from the run state once follow recorded it
            lag = volumeless.lag()
            st = state.load(r.s)
            if st.copy_done_at:
                break
            lags_during_copy.append(lag)
            p = volumeless.copy_progress()
            if p is not None:
                assert 0 <= p[0] <= p[1] and p[1] > 1_000_000, p
                seen_progress.add(p)
            assert time.monotonic() < deadline and r.follow.poll() is None, r.follow_log()[-3000:]
            time.sleep(0.2)
        assert lags_during_copy and all(lag is None for lag in lags_during_copy)
        assert seen_progress, "no copy progress recorded in the run state during the copy"
        done, total = volumeless.copy_progress()
        assert done == total == st.copy_bytes_total
        r.wait_caught_up()
        assert volumeless.lag() is not None

        # The heartbeat, from the end of the copy on: the origin moves on an idle source.
        r.writer.stop()
        with psycopg.connect(r.tgt_db, autocommit=True) as tgt:
            before = origin_progress(tgt, r.slot)
            # pgcopydb's pipelined apply syncs about every 2 s: a few of them, not one.
            deadline = time.monotonic() + 10
            while origin_progress(tgt, r.slot) <= before:
                assert time.monotonic() < deadline, "the heartbeat did not move the target's origin"
                time.sleep(0.2)

        # cleanup while follow streams: refuses within its bound, changes nothing.
        monkeypatch.setattr("steps.engines.pgcopydb_follow.ACTIVE_WAIT", 1.0)
        with pytest.raises(StepError, match="still in use"):
            volumeless.cleanup()
        assert slot_count(r.src_db, r.slot) == 1 and r.follow.poll() is None

        end = volumeless.set_end()
        assert volumeless.set_end() == end  # keeps the first
        st = state.load(r.s)
        assert st.end_position == end and st.end_position_set_at
        t = time.monotonic()
        while not volumeless.reached(end):
            assert time.monotonic() - t < 60, r.follow_log()[-3000:]
            time.sleep(0.05)
        drained = time.monotonic() - t
        assert r.wait_follow(timeout=60) == 0, r.follow_log()[-3000:]
        assert volumeless.reached(end) and not volumeless.reached("FF/0")
        assert state.load(r.s).follow_done_at
        with psycopg.connect(r.tgt_db) as tgt:
            assert origin_progress(tgt, r.slot, flush=True) >= lsn(end)

        monkeypatch.setattr("steps.engines.pgcopydb_follow.ACTIVE_WAIT", 30.0)
        volumeless.cleanup()
        volumeless.cleanup()  # idempotent
        assert objects_left(r.src_db, r.slot) == dict(slots=0, origins=0, pgcopydb=False, heartbeat=False,
                                                      run_state=True)
        assert objects_left(r.tgt_db, r.slot) == dict(slots=0, origins=0, pgcopydb=False, heartbeat=False,
                                                      run_state=True)  # run_state: a copy of the source's
        print(f"\nengine: {len(seen_progress)} progress readings during the copy; end {end} reached "
              f"{drained:.1f}s after set_end")


@pytest.mark.slow
def test_follow_refuses_a_run_it_cannot_continue(pair, dbs, tmp_path):
    """One error line, nothing created: an end position recorded before follow
    ever started, or a run whose copy another engine made."""
    with Run(pair, dbs, tmp_path, "engine_refuses") as r:
        state.record(r.s, end_position="0/1000", end_position_set_at=state.now())
        proc = subprocess.run(FOLLOW_STEP, env=r.env, capture_output=True, text=True, timeout=60)
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
        assert proc.returncode == 1 and len(errors) == 1 and "before follow ever started" in errors[0], proc.stderr
        state.record(r.s, end_position=None, follow_started_at=state.now(), engine="native")
        proc = subprocess.run(FOLLOW_STEP, env=r.env, capture_output=True, text=True, timeout=60)
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
        assert proc.returncode == 1 and len(errors) == 1 and "native engine" in errors[0], proc.stderr
        assert slot_count(r.src_db, r.slot) == 0 and not (r.workdir / "schema").exists()


def test_set_end_since_and_stream_problem_from_the_run_state(pair, dbs, tmp_path):
    """No pgcopydb needed: what the cutover asks before it freezes, read from the run state."""
    src_db, tgt_db = dbs
    from steps.settings import load_settings

    e = PgcopydbFollow(load_settings(source_pguri=src_db, target_pguri=tgt_db, engine="pgcopydb-follow",
                                     slot_name="engine_problem"))
    assert "has not started" in e.stream_problem()
    state.record(e.s, follow_started_at=state.now(), follow_alive_at=state.now())
    assert e.stream_problem() is None
    state.record(e.s, follow_failed_at=state.now() + 1, follow_error="pgcopydb exited 12")
    assert "failed (pgcopydb exited 12)" in e.stream_problem()
    state.record(e.s, follow_failed_at=None, follow_alive_at=state.now() - 120)
    assert "not been seen for" in e.stream_problem()
    state.record(e.s, follow_alive_at=state.now())
    first = e.set_end()
    st = state.load(e.s)
    assert e.set_end() == first and e.set_end(since=st.end_position_set_at - 5) == first
    state.record(e.s, follow_done_at=state.now())  # pgcopydb stopped at the end...
    assert "already stopped" in e.stream_problem()  # ...which the target has not reached (no origin here)
    time.sleep(0.01)
    second = e.set_end(since=state.now())  # a new freeze: the old end is stale
    assert lsn(second) > lsn(first) and state.load(e.s).end_position == second
    assert "already stopped" in e.stream_problem()


@pytest.mark.slow
def test_a_cutover_that_gave_the_writes_back_can_run_again(pair, dbs, tmp_path):
    """Freeze, drain to an end, then writes restored (verify failed, or the cutover
    was stopped): the end is stale. The cutover refuses before freezing; follow run
    again streams on; a second freeze and end complete the upgrade, exact."""
    with Run(pair, dbs, tmp_path, "engine_again") as r:
        r.start_caught_up(rate=100, threads=2)
        frozen = freeze.freeze(r.s)
        first = r.engine.set_end(since=frozen)
        r.wait_reached(first)
        assert r.wait_follow() == 0, r.follow_log()[-3000:]
        freeze.unfreeze(r.s)
        time.sleep(1)  # the application writes again
        assert "already stopped" in r.engine.stream_problem()
        r.start_follow(ENGINE_FOLLOW)
        deadline = time.monotonic() + 60
        while "is stale" not in r.follow_log() or "resuming the interrupted run" not in r.follow_log():
            assert time.monotonic() < deadline and r.follow.poll() is None, r.follow_log()[-3000:]
            time.sleep(0.1)
        assert r.engine.stream_problem() is None
        r.wait_caught_up()
        frozen = freeze.freeze(r.s)
        second = r.engine.set_end(since=frozen)
        assert lsn(second) > lsn(first)
        drained = r.wait_reached(second)
        assert r.wait_follow() == 0, r.follow_log()[-3000:]
        r.writer.stop()
        assert table_digests(r.src_db) == table_digests(r.tgt_db)
        assert verify.verify(r.s).ok
        print(f"\nsecond cutover: end {first} -> {second}, drained in {drained:.2f}s; "
              f"{r.writer.stats.ok} writes, {r.writer.stats.refused} refused during the two freezes")
