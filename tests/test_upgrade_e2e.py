"""The whole upgrade, step by step, PostgreSQL 15 -> 17 with pgcopydb 0.17,
under concurrent inserts, updates and deletes through the application role."""

import subprocess
import time

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from local import workload
from steps import catchup, cleanup, cutover, finish, freeze, grant, preflight, state
from steps.settings import load_settings
from tests.conftest import DB_UPGRADE, step_env
from tests.digests import sequences, table_digests

MIGRATOR = 'mi"grator user'
MIGRATOR_PASSWORD = "Mig-secret-0"


def as_migrator(uri: str) -> str:
    return make_conninfo(**{**conninfo_to_dict(uri), "user": MIGRATOR, "password": MIGRATOR_PASSWORD})


def setup_roles(server_uri: str) -> None:
    with psycopg.connect(server_uri, autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (MIGRATOR,)).fetchone():
            # A superuser without the REPLICATION attribute: grant-replication has work to do.
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN SUPERUSER NOREPLICATION PASSWORD {}").format(
                sql.Identifier(MIGRATOR), sql.Literal(MIGRATOR_PASSWORD)))
    workload.ensure_app_role(server_uri)


@pytest.mark.slow
def test_upgrade_under_writes_loses_nothing(pair, dbs, tmp_path):
    """The steps as a workflow runs them, with the default engine, as a migration role
    and an application role whose names need quoting."""
    src_db, tgt_db = dbs
    setup_roles(pair.source.uri())
    setup_roles(pair.target.uri())
    source, target = as_migrator(src_db), tgt_db
    workload.load_sample(source, "small")
    readonly, unfreeze = workload.freeze_sql_files(tmp_path / "sql")
    workdir = tmp_path / "work"
    env = step_env(source, target, workdir, DB_UPGRADE_READONLY_SQL=readonly, DB_UPGRADE_UNFREEZE_SQL=unfreeze,
                   DB_UPGRADE_LAG_THRESHOLD_BYTES=256 * 1024, DB_UPGRADE_POLL_INTERVAL=0.5,
                   DB_UPGRADE_CATCHUP_TIMEOUT=300, DB_UPGRADE_TABLE_JOBS=2, DB_UPGRADE_INDEX_JOBS=2,
                   DB_UPGRADE_SLOT_NAME="e2e_slot", DB_UPGRADE_APP_ROLES=workload.APP_ROLE)
    s = load_settings(source_pguri=source, target_pguri=target, dir=workdir, readonly_sql=readonly,
                      unfreeze_sql=unfreeze, lag_threshold_bytes=256 * 1024, poll_interval=0.5,
                      catchup_timeout=120, slot_name="e2e_slot", app_roles=workload.APP_ROLE)

    writer = workload.Writer(workload.app_uri(src_db), rate=100, threads=3).start()
    time.sleep(1)
    preflight.preflight(s)
    assert grant.grant_replication(s) is True
    assert grant.grant_replication(s) is True  # twice: harmless, still remembers it granted
    follow = subprocess.Popen([DB_UPGRADE, "step", "follow"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    prepare = None
    try:
        lag = catchup.wait_caught_up(s)
        assert lag <= 256 * 1024
        prepare = subprocess.Popen([DB_UPGRADE, "step", "verify-prepare"], env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
        time.sleep(2)  # writes keep flowing during follow, not only during the copy
        ok_before = writer.stats.ok
        assert ok_before > 100, writer.stats
        result = cutover.cutover(s)
        with pytest.raises(psycopg.Error):  # the application role can no longer write on the source
            with psycopg.connect(workload.app_uri(src_db), autocommit=True) as app:
                app.execute(sql.SQL("INSERT INTO {}.customers (email) VALUES ('late@example.com')").format(
                    sql.Identifier(workload.SCHEMA)))
        endpos = finish.finish(s)  # after the cutover: keeps its end
        out, _ = follow.communicate(timeout=180)
        (tmp_path / "follow.log").write_text(out)
        assert follow.returncode == 0, out[-3000:]
        assert prepare.wait(timeout=60) == 0
    finally:
        for proc in (follow, prepare):
            if proc is not None and proc.poll() is None:
                proc.kill()
                print(proc.communicate()[0][-5000:])
        stats = writer.stop()
    report = result["verify"]
    assert endpos == state.load(s).end_position and endpos.startswith("barrier:")
    assert report.ok and len(report.tables) == 5, report
    assert stats.refused > 0 and stats.first_refused_at is not None, stats
    # Independent comparison: all rows equal, sequences not behind.
    assert table_digests(source) == table_digests(target)
    src_seq, tgt_seq = sequences(source), sequences(target)
    assert src_seq and all(tgt_seq[k] >= v for k, v in src_seq.items()), (src_seq, tgt_seq)

    freeze.unfreeze(s)  # the role setting is cluster-wide: give the other tests their writer back
    freeze.unfreeze(s)  # twice: harmless
    cleanup.cleanup(s)
    cleanup.cleanup(s)  # twice: harmless
    with psycopg.connect(source) as conn:
        assert conn.execute("SELECT count(*) FROM pg_replication_slots").fetchone()[0] == 0
        assert conn.execute("SELECT rolreplication FROM pg_roles WHERE rolname = %s", (MIGRATOR,)).fetchone()[0] is False
