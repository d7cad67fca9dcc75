"""verify under pgbench TPC-B (uniformly random updates: every bucket of a
table is dirty within seconds), PostgreSQL 15 -> 17 with native logical
replication made by hand. The verify-prepare step keeps the comparison
current while pgbench writes for 60 s; a round then re-checks only the last
seconds' keys, and the final check a bounded number of them; pgbench_history
(no key, REPLICA IDENTITY FULL as preflight asks, insert-only) is compared by
the checksum kept from its decoded inserts, never re-read. Counts are
asserted; times are printed (speed targets belong in bench/).

    DB_UPGRADE_TEST_PGBENCH_SCALE=70 DB_UPGRADE_TEST_PGBENCH_RATE=500 DB_UPGRADE_TEST_PGBENCH_SECONDS=120 \
        .venv/bin/pytest tests/test_verify_pgbench.py -q -s      # the measurement in docs/verify.md"""

from __future__ import annotations

import os
import subprocess
import time

import psycopg
import pytest
from psycopg import sql

from steps import state, verify
from steps.errors import StepError
from tests.conftest import DB_UPGRADE
from tests.test_verify_bounded import replicated

pytestmark = pytest.mark.slow

PGBENCH = "/usr/lib/postgresql/15/bin/pgbench"
SCALE = int(os.environ.get("DB_UPGRADE_TEST_PGBENCH_SCALE", "2"))  # 10 for the measurement in docs/verify.md
RATE = int(os.environ.get("DB_UPGRADE_TEST_PGBENCH_RATE", "300"))
SECONDS = int(os.environ.get("DB_UPGRADE_TEST_PGBENCH_SECONDS", "60"))
# seconds before pgbench ends: the cutover takes over (the reconcile step stops) ...
TAKEOVER = int(os.environ.get("DB_UPGRADE_TEST_PGBENCH_TAKEOVER", "10"))
# ... and runs its settle round this long before the writes end
SETTLE = int(os.environ.get("DB_UPGRADE_TEST_PGBENCH_SETTLE", "4"))
# An account pgbench never updates (its aids start at 1): changed on the target only, mid-load.
COLD = "INSERT INTO pgbench_accounts VALUES (0, 1, 0, 'cold')"
CORRUPT = "UPDATE pgbench_accounts SET filler = 'changed on the target only' WHERE aid = 0"
HEAL = "UPDATE pgbench_accounts SET filler = 'cold' WHERE aid = 0"
BARRIER = ("CREATE SCHEMA db_upgrade; CREATE TABLE db_upgrade.test_barrier (n bigint PRIMARY KEY); "
           "ALTER TABLE pgbench_history REPLICA IDENTITY FULL;")  # what preflight asks of a table without a key
TABLES = "pgbench_accounts, pgbench_branches, pgbench_tellers, pgbench_history, db_upgrade.test_barrier"


def pgbench(uri: str, *args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([PGBENCH, *args, uri], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def digests(uri: str) -> dict:
    """Independent of steps.verify: each table's rows, sorted, hashed."""
    with psycopg.connect(uri) as c:
        return {t: c.execute(sql.SQL("SELECT count(*), md5(coalesce(string_agg(t::text, E'\\n' ORDER BY t::text), "
                                     "'')) FROM {} t").format(sql.Identifier(t))).fetchone()
                for t in ("pgbench_accounts", "pgbench_branches", "pgbench_tellers", "pgbench_history")}


def test_pgbench_rounds_recheck_only_the_last_seconds(dbs, capsys, tmp_path):
    src, tgt = dbs
    for uri, steps_ in ((src, "dtgp"), (tgt, "dtp")):  # the target: the same tables, empty
        out = pgbench(uri, "-i", "-s", str(SCALE), "-I", steps_, "-q").communicate(timeout=600)[0]
        assert "done" in out, out
    with replicated(dbs, schema=BARRIER, data=COLD, published=TABLES) as r:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DB_UPGRADE_", "PGCOPYDB_"))}
        env.update(PGCOPYDB_SOURCE_PGURI=src, PGCOPYDB_TARGET_PGURI=tgt, DB_UPGRADE_SLOT_NAME=r.slot,
                   DB_UPGRADE_RUN_ID=r.s.run_id, DB_UPGRADE_POLL_INTERVAL="1")
        logfile = tmp_path / "verify-prepare.log"
        reconcile = subprocess.Popen([DB_UPGRADE, "step", "verify-prepare"], env=env, stdout=logfile.open("w"),
                                     stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + 300
            while not state.load(r.s).verify_prepared_at:
                assert reconcile.poll() is None, logfile.read_text()
                assert time.monotonic() < deadline, "the preparation did not complete"
                time.sleep(0.5)
            st = state.load(r.s)
            rounds_before = st.verify_rounds or 0
            bench = pgbench(src, "-n", "-c", "4", "-j", "2", "-R", str(RATE), "-T", str(SECONDS))
            started = time.monotonic()
            seen = {}
            corrupted = False
            while time.monotonic() < started + SECONDS - TAKEOVER:
                st = state.load(r.s)
                if st.verify_last_round and st.verify_last_round_at not in seen:
                    seen[st.verify_last_round_at] = (time.monotonic(), st.verify_last_round)
                if not corrupted and time.monotonic() > started + SECONDS / 2:
                    # A row the target changes on its own, mid-load: rounds keep finding it different.
                    r.target(CORRUPT)
                    corrupted = True
                time.sleep(0.2)
            # The cutover takes over while pgbench still writes: the reconcile
            # step stops by itself, the settle runs the last round.
            state.record(r.s, cutover_started_at=state.now())
            assert reconcile.wait(timeout=30) == 0
            time.sleep(max(0.0, started + SECONDS - SETTLE - time.monotonic()))
            settle = verify.round(r.s)
            assert bench.poll() is None, "pgbench ended before the settle round: the machine is too slow for this test"
            out = bench.communicate()[0]  # the freeze: writes end
            assert bench.returncode == 0, out
            r.drained()
            with pytest.raises(StepError, match="pgbench_accounts"):
                verify.verify(r.s)
            first = state.load(r.s).verify
            assert first["differing_keys"] == {"public.pgbench_accounts": [["0"]]}
            r.target(HEAL)
            report = verify.verify(r.s)
            assert report.keys_rechecked == first["keys_rechecked"]  # the final check changes nothing: the same again
        finally:
            if reconcile.poll() is None:
                reconcile.kill()
        log = logfile.read_text()
        assert report.ok, report.summary()
        assert digests(src) == digests(tgt)
        txns = int(next(line for line in out.splitlines() if "transactions actually processed" in line)
                   .split(":")[1].split("/")[0])
        rounds = [rr for t, rr in sorted(seen.values(), key=lambda x: x[0]) if t > started + 5]
        assert len(rounds) >= 10, (len(rounds), log[-3000:])
        changed = txns * 3  # each TPC-B transaction updates an account, a teller and a branch
        # A round re-checks the keys of the last seconds only (4 writers at RATE tps, a round every
        # second plus its own time): far less than what changed in the minute.
        late = rounds[-5:]
        assert max(rr["keys_checked"] for rr in late) <= 6 * RATE * 3, late
        # ... and over the minute, every change was re-checked by some round (an account row per transaction).
        assert sum(rr["keys_checked"] for rr in rounds) >= 0.7 * txns * (SECONDS - TAKEOVER - 5) / SECONDS
        assert changed > 20 * max(rr["keys_checked"] for rr in late)
        # The final check: the keys changed since the settle round, seconds ago; pgbench_history (no key) by
        # its checksum, with the rows inserted since that round: nothing re-read whole.
        assert 0 < first["keys_rechecked"] <= (SETTLE + 2) * RATE * 3, (first["keys_rechecked"], settle)
        assert first["whole_tables"] == report.whole_tables == []
        assert first["by_checksum"] == report.by_checksum == ["public.pgbench_history"]
        assert 0 < first["keyless_rows"] <= (SETTLE + 2) * RATE, first["keyless_rows"]
        history = next(t for t in report.tables if t.table == "public.pgbench_history")
        assert history.how == "checksum" and history.source_rows == digests(src)["pgbench_history"][0]
        assert state.load(r.s).verify_rounds > rounds_before + 10
        with capsys.disabled():
            secs = sorted(rr["seconds"] for rr in rounds)
            print(f"\npgbench scale {SCALE}, {RATE} tps for {SECONDS}s: {txns} transactions, {len(rounds)} rounds, "
                  f"round time median {secs[len(secs) // 2]:.3f}s max {secs[-1]:.3f}s, keys per round median "
                  f"{sorted(rr['keys_checked'] for rr in rounds)[len(rounds) // 2]}; final verify re-checked "
                  f"{first['keys_rechecked']} keys, {first['keyless_rows']} pgbench_history rows by checksum and "
                  f"{len(first['whole_tables'])} whole table(s) in "
                  f"{first['seconds']:.3f}s (" + ", ".join(f"{k} {v * 1000:.0f}" for k, v in first["timings"].items())
                  + " ms); a round's parts "
                  "(median, ms): " + ", ".join(
                      f"{k} {sorted(rr['timings'].get(k, 0) for rr in rounds)[len(rounds) // 2] * 1000:.0f}"
                      for k in rounds[-1]["timings"]))
