"""verify through the native engine (steps/engines/native: pgcopydb copies, a
subscription applies) under the application's writes: the verify-prepare step
keeps the comparison current, and a row the target lost after its copy is
caught by key, not by re-reading the table."""

from __future__ import annotations

import time

import psycopg
import pytest
from psycopg import sql

from local import workload
from steps import state, verify
from steps.errors import StepError
from tests.test_native_engine import Run

pytestmark = pytest.mark.slow


def test_verify_through_the_native_engine_is_bounded_and_catches_a_lost_row(pair, dbs, tmp_path):
    with Run(pair, dbs, tmp_path, DB_UPGRADE_POLL_INTERVAL=0.5) as run:
        run.writing(rate=150)
        run.start("follow")
        run.wait_caught_up()
        run.start("verify-prepare")
        deadline = time.monotonic() + 120
        while not state.load(run.s).verify_prepared_at:
            assert run.procs["verify-prepare"].poll() is None, run.wait("verify-prepare")
            assert time.monotonic() < deadline, "the preparation did not complete"
            time.sleep(0.2)
        rounds = state.load(run.s).verify_rounds or 0
        deadline = time.monotonic() + 30
        while (state.load(run.s).verify_rounds or 0) < rounds + 3:  # rounds while the application writes
            assert run.procs["verify-prepare"].poll() is None, run.wait("verify-prepare")
            assert time.monotonic() < deadline, "no rounds"
            time.sleep(0.2)
        st = verify.status(run.s)
        assert st.prepared and st.pending_keys < 2000, st
        run.writer.stop()
        run.writer = None
        with psycopg.connect(run.tgt, autocommit=True) as conn:  # a row the target loses, as a broken apply would
            conn.execute("SET session_replication_role = replica")
            conn.execute(sql.SQL("DELETE FROM {}.customers WHERE id = (SELECT min(id) FROM {}.customers)").format(
                sql.Identifier(workload.SCHEMA), sql.Identifier(workload.SCHEMA)))
        end = run.engine.set_end()  # writes have stopped: the end position, then the drain
        while not run.engine.reached(end):
            time.sleep(0.02)
        assert run.wait("follow", 60) == 0
        assert run.wait("verify-prepare", 30) == 0  # the end position without a cutover: it stops by itself
        with pytest.raises(StepError, match="customers"):
            verify.verify(run.s)
        report = state.load(run.s).verify
        assert report["method"] == "bounded" and report["differing_keys"].keys() == {"shop.customers"}
        assert report["keys_rechecked"] < 2000 and "shop.customers" not in report["whole_tables"]
        # the keyless audit table (REPLICA IDENTITY FULL, updated and deleted): by its checksum, not re-read
        assert report["by_checksum"] == [f"{workload.SCHEMA}.{sql.Identifier(workload.AUDIT).as_string()}"], report
        assert report["whole_tables"] == [], report
